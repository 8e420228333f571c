"""Per-kernel GPU time of fusedlm.sample (torch profiler, eager calls), e.g.
    python bench/profile_sampling.py [--top-p 0.9] [--batches 1 64 256]"""
import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import fusedlm  # noqa: E402

REPS = 20
parser = argparse.ArgumentParser()
parser.add_argument("--top-p", type=float, default=None, help="profile top-p calls (tokens only)")
parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
parser.add_argument("--vocab", type=int, default=128256)
args = parser.parse_args()
gen = torch.Generator(device="cuda").manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for b in args.batches:
        logits = torch.randn(b, args.vocab, device="cuda", dtype=dtype, generator=gen) * 3
        tau = torch.rand(b, device="cuda", generator=gen) * 1.2
        seeds = torch.arange(b, device="cuda")
        for _ in range(3):
            fusedlm.sample(logits, tau, seed=seeds, top_p=args.top_p)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(REPS):
                fusedlm.sample(logits, tau, seed=seeds, top_p=args.top_p)
            torch.cuda.synchronize()
        parts = []
        for ev in prof.key_averages():
            if ev.device_type.name == "CUDA" and ev.count >= REPS:
                name = ev.key.split("(")[0].split("<")[0].replace("void ", "")[-28:]
                parts.append(f"{name} x{ev.count // REPS} {ev.device_time_total / ev.count:.1f} us")
        print(f"V={args.vocab} {str(dtype)[6:]} B={b}: " + " | ".join(parts), flush=True)
