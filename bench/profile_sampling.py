"""Per-kernel GPU time of fusedlm.sample (torch profiler, eager calls), e.g.
    python bench/profile_sampling.py"""
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import fusedlm  # noqa: E402

REPS = 20
gen = torch.Generator(device="cuda").manual_seed(0)
for v, dtype, b in [(128256, torch.float32, 1), (128256, torch.float32, 64), (128256, torch.bfloat16, 64),
                    (128256, torch.float32, 256), (128256, torch.bfloat16, 256)]:
    logits = torch.randn(b, v, device="cuda", dtype=dtype, generator=gen) * 3
    tau = torch.rand(b, device="cuda", generator=gen) * 1.2
    seeds = torch.arange(b, device="cuda")
    for _ in range(3):
        fusedlm.sample(logits, tau, seed=seeds)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPS):
            fusedlm.sample(logits, tau, seed=seeds)
        torch.cuda.synchronize()
    parts = []
    for ev in prof.key_averages():
        if ev.device_type.name == "CUDA" and ev.count >= REPS:
            name = ev.key.split("(")[0].split("<")[0].replace("void ", "")[-28:]
            parts.append(f"{name} {ev.device_time_total / ev.count:.1f} us")
    print(f"V={v} {str(dtype)[6:]} B={b}: " + " | ".join(parts), flush=True)
