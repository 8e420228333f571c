"""Quick CCE timing at the benchmark shapes (fusedlm vs one cuBLAS GEMM), for iterating on
kernels: python bench/quick_cce.py"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import fusedlm  # noqa: E402
from run import cce_inputs, cuda_time  # noqa: E402

path = "mma.sync (forced)" if os.environ.get("FUSEDLM_DISABLE_WGMMA") == "1" else "default"
print(f"main loop: {path}")
for (n, d, v), regime in [(shape, regime) for shape in [(8192, 2304, 256000), (8192, 4096, 128256),
                                                       (16384, 2048, 32000)]
                          for regime in ("random", "peaked")]:
    e, c, y = cce_inputs(n, d, v, regime)
    gemm = cuda_time(lambda: e @ c.T)
    fwd = cuda_time(lambda: fusedlm.linear_cross_entropy(e, c, y))
    eg, cg = e.detach().requires_grad_(), c.detach().requires_grad_()
    fb = cuda_time(lambda: torch.autograd.grad(fusedlm.linear_cross_entropy(eg, cg, y), (eg, cg)))
    fbx = cuda_time(lambda: torch.autograd.grad(fusedlm.linear_cross_entropy(eg, cg, y, filter_eps=None), (eg, cg)))
    tflop = 2 * n * d * v / 1e12
    print(f"{n}x{d}x{v} {regime}: gemm {gemm:.2f} ms ({tflop / gemm * 1e3:.0f} TF/s) | fwd {fwd:.2f} ms "
          f"({fwd / gemm:.2f}x, {tflop / fwd * 1e3:.0f} TF/s) | fwd+bwd {fb:.2f} ms | "
          f"exact fwd+bwd {fbx:.2f} ms ({fbx / gemm:.2f}x)", flush=True)
