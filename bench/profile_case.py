"""One CCE forward + backward at a benchmark shape, for Nsight Compute:
    ncu -k regex:forward_kernel -c 1 python bench/profile_case.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import fusedlm  # noqa: E402
from run import cce_inputs  # noqa: E402

n, d, v = (int(x) for x in os.environ.get("SHAPE", "8192x2304x256000").split("x"))
e, c, y = cce_inputs(n, d, v, os.environ.get("REGIME", "random"))
e.requires_grad_()
c.requires_grad_()
loss = fusedlm.linear_cross_entropy(e, c, y, filter_eps=None)
loss.backward()
torch.cuda.synchronize()
print("profile case done", float(loss))
