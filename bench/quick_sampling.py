"""Quick sampler timing (eager and CUDA-graph replay) for iterating on the kernel."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import fusedlm  # noqa: E402
from run import copy_bandwidth, cuda_time, graph_time  # noqa: E402

bw = copy_bandwidth()
for v, dtype in ((128256, torch.float32), (128256, torch.bfloat16)):
    for b in (1, 64, 256, 1024):
        logits = torch.randn(b, v, device="cuda", dtype=dtype) * 3
        tau = torch.rand(b, device="cuda") * 1.2
        seeds = torch.arange(b, device="cuda")
        floor_us = b * v * logits.element_size() / bw * 1e6
        fn = lambda: fusedlm.sample(logits, tau, seed=seeds)
        fl = lambda: fusedlm.sample(logits, tau, seed=seeds, return_logprobs=True)
        t, tg, tl = cuda_time(fn, 5, 30) * 1e3, graph_time(fn) * 1e3, cuda_time(fl, 5, 30) * 1e3

        def multinomial():
            return torch.multinomial(torch.softmax(logits.float() / tau.clamp_min(1e-5)[:, None], -1), 1)

        tm = cuda_time(multinomial, 5, 30) * 1e3
        print(f"V={v} {str(dtype):>14} B={b:5d}: eager {t:7.1f} us, graph {tg:7.1f} us "
              f"({tg / floor_us:5.2f}x floor {floor_us:6.1f} us), with logprobs {tl:7.1f} us | "
              f"torch softmax+multinomial {tm:7.1f} us ({tm / t:4.1f}x slower)")
