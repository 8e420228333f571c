#!/usr/bin/env bash
# One device call: build for the local GPU, run the CUDA tests and compute-sanitizer.
# Usage on the GPU machine: bash bench/device_check.sh [pytest args]
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
start=$SECONDS
MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} FUSEDLM_FORCE_CUDA=1 \
  python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $((SECONDS - start)) s"
python3 -m pytest -q -m cuda -p no:cacheprovider tests "$@" 2>&1 | tee "$OUT/test_cuda.log" | tail -40
if [ "${SANITIZE:-1}" = "1" ]; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 9 python3 bench/sanitize_case.py > "$OUT/sanitize_$tool.log" 2>&1
    echo "compute-sanitizer $tool: exit $? ($(grep -c -E 'ERROR SUMMARY: 0 errors|RACECHECK SUMMARY: 0 hazards' "$OUT/sanitize_$tool.log") clean summaries)"
    tail -3 "$OUT/sanitize_$tool.log"
  done
  # initcheck over the sampling kernels, each tensor a fresh allocation (no caching allocator:
  # a reused block would count as written): no kernel reads a workspace word no launch wrote.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool initcheck --error-exitcode 9 \
    python3 bench/sanitize_case.py sampling > "$OUT/sanitize_initcheck.log" 2>&1
  echo "compute-sanitizer initcheck (sampling): exit $?"
  tail -3 "$OUT/sanitize_initcheck.log"
fi
