#!/usr/bin/env bash
# Builds bench/peers/flashinfer_sampling.cu against the headers of a flashinfer-python wheel into
# a shared library that bench/run.py loads when FUSEDLM_BENCH_FLASHINFER=<that library> is set.
#   bash bench/peers/build_flashinfer.sh OUT.so [WHEEL]    (no WHEEL: pip downloads the newest)
# Needs nvcc and the cuRAND headers (the CUDA toolkit's, or those of the nvidia-* wheels of
# $PYTHON, default python3).
# Arch: FLASHINFER_ARCH (default sm_90a). Nothing is installed; the wheel is only unpacked.
set -euo pipefail
out=$(realpath -m "$1")
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
wheel=${2:-}
if [ -z "$wheel" ]; then
  "${PYTHON:-python3}" -m pip download --no-deps -q flashinfer-python -d "$work"
  wheel=$(ls "$work"/flashinfer_python-*.whl)
fi
version=$(basename "$wheel" | cut -d- -f2)
"${PYTHON:-python3}" - "$wheel" "$work/x" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("flashinfer/data/include/")])
PY
curand=$("${PYTHON:-python3}" - <<'PY'
import glob, os, sys
roots = [os.environ.get("CUDA_HOME", "/usr/local/cuda") + "/include"] + glob.glob(
    os.path.join(sys.prefix, "lib", "python3*", "site-packages", "nvidia", "*", "include"))
print(next((r for r in roots if os.path.exists(os.path.join(r, "curand_kernel.h"))), ""))
PY
)
arch=${FLASHINFER_ARCH:-sm_90a}
nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_${arch#sm_},code=$arch -Xcompiler -fPIC -shared \
  -diag-suppress 177 -DFUSEDLM_FLASHINFER_VERSION="\"$version\"" -I "$work/x/flashinfer/data/include" \
  ${curand:+-I "$curand"} -o "$out" "$here/flashinfer_sampling.cu"
echo "built $out (flashinfer $version, $arch)"
