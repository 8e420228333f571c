"""Speed of light for the sampler's decode-like step: kernels that only read the logits
(16-byte loads, U in flight per thread, an integer maximum per warp written out) on grids like
the sampler's, timed as bench/run.py times the sampler (step_time: a copy writes the logits,
then the probe; graph_time: 20 back-to-back calls), against the memory floor. Needs CuPy (its
runtime compiler builds the probes); the fusedlm extension is not used.

    python bench/read_probe.py
"""
import os
import sys
import types

import cupy as cp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.modules.setdefault("fusedlm", types.ModuleType("fusedlm"))  # (run.py imports it; not used here)
from run import copy_bandwidth, graph_time, step_time  # noqa: E402

SOURCE = r"""
// Row blockIdx.x, split blockIdx.y of gridDim.y: its vectors read U at a time per thread.
template <int U>
__device__ void read_row(const uint4* __restrict__ x, long long vecs_per_row, long long ld_vecs, unsigned* out) {
  const long long chunk = (vecs_per_row + gridDim.y - 1) / gridDim.y;
  const long long begin = blockIdx.y * chunk, end = min(vecs_per_row, begin + chunk);
  const uint4* row = x + blockIdx.x * ld_vecs;
  unsigned m = 0;
  for (long long i = begin + threadIdx.x; i < end; i += (long long)blockDim.x * U) {
    uint4 q[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const long long j = i + (long long)u * blockDim.x;
      q[u] = j < end ? __ldg(row + j) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) m = max(m, max(max(q[u].x, q[u].y), max(q[u].z, q[u].w)));
  }
  m = __reduce_max_sync(0xffffffffu, m);
  if (threadIdx.x % 32 == 0) out[(blockIdx.x * gridDim.y + blockIdx.y) * (blockDim.x / 32) + threadIdx.x / 32] = m;
}
extern "C" __global__ void read8(const uint4* x, long long v, long long ld, unsigned* out) { read_row<8>(x, v, ld, out); }
extern "C" __global__ void read16(const uint4* x, long long v, long long ld, unsigned* out) { read_row<16>(x, v, ld, out); }
extern "C" __global__ void empty(const uint4*, long long, long long, unsigned* out) {
  if (threadIdx.x == 1u << 30) out[0] = 0;  // (never: a kernel that does nothing, not optimised away)
}
"""
CASES = [(64, 128256, torch.bfloat16), (64, 256000, torch.bfloat16), (64, 128256, torch.float32),
         (64, 256000, torch.float32)]
# (kernel, splits per row, threads): the sampler's B = 64 grid is 2 x 512 (a cluster of two)
GRIDS = [("empty", 2, 512), ("read8", 2, 512), ("read16", 2, 512), ("read8", 4, 256), ("read16", 4, 256),
         ("read8", 8, 256), ("read8", 4, 512), ("read8", 1, 1024)]


def main():
    module = cp.RawModule(code=SOURCE, options=("-std=c++17",))
    out = torch.empty(1 << 20, dtype=torch.int32, device="cuda")

    def launcher(name, x, splits, threads):
        kernel = module.get_function(name)
        args = (np.uint64(x.data_ptr()), np.int64(x.shape[1] * x.element_size() // 16),
                np.int64(x.stride(0) * x.element_size() // 16), np.uint64(out.data_ptr()))

        def call():  # on torch's current stream, so that CUDA graphs capture it
            with cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
                kernel((x.shape[0], splits), (threads,), args)
        return call

    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    for b, v, dtype in CASES:
        x = torch.randn(b, v, device="cuda").to(dtype)
        source = x.clone()
        floor_us = x.numel() * x.element_size() / bandwidth * 1e6
        print(f"B={b} V={v} {dtype}: floor {floor_us:.2f} us", flush=True)
        for name, splits, threads in GRIDS:
            call = launcher(name, x, splits, threads)
            steps = [t for t in (step_time(lambda: x.copy_(source), call) for _ in range(2)) if t is not None]
            g20 = graph_time(call, calls=20)
            step = (f"{min(steps) * 1e3:6.2f}-{max(steps) * 1e3:6.2f} us ({min(steps) * 1e3 / floor_us:4.2f}x)"
                    if steps else "n/a")
            print(f"  {name:6s} grid ({b}, {splits}) x {threads:4d}: step {step}  "
                  f"graph of 20 {g20 * 1e3 if g20 else float('nan'):6.2f} us", flush=True)


if __name__ == "__main__":
    main()
