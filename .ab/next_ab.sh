# Device call 2 (after .ab/next.sh; no carry): the A/B of main (.ab/base) and the branch.
export PYTHONUNBUFFERED=1
start=$SECONDS
for i in 1 2; do
  PYTHONPATH=$PWD/.ab/base/python python3 .ab/tp.py
  PYTHONPATH=$PWD/python python3 .ab/tp.py
  FUSEDLM_RADIX_AGGREGATE=1 PYTHONPATH=$PWD/python python3 .ab/tp.py | sed 's/^new /aggr/'
done
for i in 1 2; do
  PYTHONPATH=$PWD/.ab/base/python python3 .ab/bwd.py
  PYTHONPATH=$PWD/python python3 .ab/bwd.py
done
echo "total: $((SECONDS - start)) s"
