"""Per-kernel CUDA time of one CCE forward+backward (torch profiler), e.g.
    SHAPE=8192x2304x256000 REGIME=random python bench/backward_breakdown.py
EXACT=1: no filter. STEADY=1: under sustained load (the GPU at its power limit, as in
bench/run.py's *_steady passes): ~2 s of back-to-back calls first, then 3 calls profiled, each
after one cuBLAS GEMM of the same shape (per-call averages)."""
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import fusedlm  # noqa: E402
from run import cce_inputs  # noqa: E402

n, d, v = (int(x) for x in os.environ.get("SHAPE", "8192x2304x256000").split("x"))
e, c, y = cce_inputs(n, d, v, os.environ.get("REGIME", "random"))
e.requires_grad_()
c.requires_grad_()
eps = None if os.environ.get("EXACT") == "1" else "auto"
steady = os.environ.get("STEADY") == "1"


def step():
    if steady:
        e.detach() @ c.detach().T
    torch.autograd.grad(fusedlm.linear_cross_entropy(e, c, y, filter_eps=eps), (e, c))


for _ in range(2):
    step()
torch.cuda.synchronize()
calls = 3 if steady else 1
end = time.perf_counter() + (2.0 if steady else 0.0)
while time.perf_counter() < end:
    step()
    torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(calls):
        step()
    torch.cuda.synchronize()
print(f"{calls} call(s){' each after one GEMM, under sustained load' if steady else ''}:")
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
