#!/usr/bin/env bash
# Builds sampler variants into torch-free shared libraries for ab.py, here, without a GPU
# (sm_90a; ~1-2 min per variant, in parallel), then packs them for the device's `carry`:
#   bench/sampler_ab/build.sh bench/out/ab main x=bench/out/x_sampling_cuda.cu
# `main` is csrc/'s sampling_cuda.cu; NAME=FILE builds FILE (a whole variant of that file)
# against a copy of csrc/. Writes DIR/NAME.so, the ptxas report DIR/NAME.log (registers and
# spills per kernel), and DIR.tgz (the .so files compress ~3x; carry the .tgz, not DIR, as
# the carry holds 64 MiB), which the device unpacks with `tar xzf DIR.tgz`. compare.py lists
# what changed between the builds (registers, spills, each kernel's SASS) before any device time.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$1; shift
mkdir -p "$out"
for spec in "$@"; do
  name=${spec%%=*}
  src=$( [[ $spec == *=* ]] && echo "${spec#*=}" || echo csrc/sampling/sampling_cuda.cu )
  tree=$(mktemp -d)
  cp -r csrc/. "$tree"
  cp "$src" "$tree/sampling/sampling_cuda.cu"
  ( nvcc -std=c++17 -O3 -arch=sm_90a -I"$tree" -shared -Xcompiler -fPIC -Xptxas -v \
      -o "$out/$name.so" bench/sampler_ab/wrap.cu > "$out/$name.log" 2>&1 \
    && echo "built $name" || echo "FAILED $name (see $out/$name.log)"; rm -rf "$tree" ) &
done
wait
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")"
echo "packed $out.tgz ($(du -h "$out.tgz" | cut -f1))"
