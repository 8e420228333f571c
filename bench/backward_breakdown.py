"""Per-kernel CUDA time of one CCE forward+backward (torch profiler), e.g.
    SHAPE=8192x2304x256000 REGIME=random python bench/backward_breakdown.py"""
import os
import sys

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
for _ in range(2):
    torch.autograd.grad(fusedlm.linear_cross_entropy(e, c, y, filter_eps=eps), (e, c))
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    torch.autograd.grad(fusedlm.linear_cross_entropy(e, c, y, filter_eps=eps), (e, c))
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
