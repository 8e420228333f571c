# Next session, device call 1 (run with carry [".ab"]): build main (.ab/base) and the branch
# exp/ec-epilogue side by side, then the CCE and sampling GPU tests on the branch.
# Call 2 (no carry, so the builds stay): bash .ab/next_ab.sh
set -o pipefail
# .ab/base = main's sources (make it here, before the call: git archive main csrc python setup.py
# pyproject.toml | tar -x -C .ab/base)
[ -d .ab/base/csrc ] || { echo "missing .ab/base (see above)"; exit 1; }
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
start=$SECONDS
( cd .ab/base && MAX_JOBS=8 TORCH_CUDA_ARCH_LIST=9.0a FUSEDLM_FORCE_CUDA=1 python3 setup.py -q build_ext --inplace > /tmp/base_build.log 2>&1 || tail -30 /tmp/base_build.log ) &
MAX_JOBS=8 TORCH_CUDA_ARCH_LIST=9.0a FUSEDLM_FORCE_CUDA=1 python3 setup.py -q build_ext --inplace > /tmp/new_build.log 2>&1 || tail -30 /tmp/new_build.log
wait
echo "builds: $((SECONDS - start)) s"
python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda_cce.py tests/test_cuda_sampling.py 2>&1 | tail -6
FUSEDLM_RADIX_AGGREGATE=1 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda_sampling.py 2>&1 | tail -3
echo "tests done: $((SECONDS - start)) s"
echo "total: $((SECONDS - start)) s"
