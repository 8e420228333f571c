"""Quick sampler timing (CUDA-graph replay) for iterating on the kernel.

Each line: graph-replay time of fusedlm.sample and its ratio to the memory floor (B * V * bytes
at the measured copy bandwidth); for fp32 B=256 also eager torch softmax + multinomial.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import fusedlm  # noqa: E402
from run import copy_bandwidth, cuda_time, graph_time  # noqa: E402

CASES = ([(128256, torch.float32, b) for b in (1, 8, 64, 256, 1024)]
         + [(128256, torch.bfloat16, b) for b in (1, 8, 64, 256, 1024)]
         + [(256000, torch.float32, 1024)])

TOP_P = float(sys.argv[1]) if len(sys.argv) > 1 else None  # e.g. 0.9: top-p calls, graph of 20
if TOP_P is not None:
    CASES = [(v, dt, b) for v in (128256, 256000) for dt in (torch.float32, torch.bfloat16)
             for b in (1, 8, 64, 256, 1024)]
bw = copy_bandwidth()
print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s")
gen = torch.Generator(device="cuda").manual_seed(0)
for v, dtype, b in CASES:
    logits = torch.randn(b, v, device="cuda", dtype=dtype, generator=gen) * 3
    tau = torch.rand(b, device="cuda", generator=gen) * 1.2
    seeds = torch.arange(b, device="cuda")
    floor_us = b * v * logits.element_size() / bw * 1e6
    if TOP_P is not None:
        tg = graph_time(lambda: fusedlm.sample(logits, tau, seed=seeds, top_p=TOP_P), calls=20)
        print(f"V={v} {str(dtype)[6:]} B={b:5d} top-p {TOP_P}: {tg * 1e3:7.1f} us per call (graph of 20)", flush=True)
        continue
    tg = graph_time(lambda: fusedlm.sample(logits, tau, seed=seeds))
    line = f"{tg * 1e3:6.1f} us {tg * 1e3 / floor_us:5.2f}x" if tg else "capture failed"
    if dtype == torch.float32 and b == 256:
        tm = cuda_time(lambda: torch.multinomial(
            torch.softmax(logits / tau.clamp_min(1e-5)[:, None], -1), 1), 5, 30)
        line += f" | torch softmax+multinomial eager {tm * 1e3:6.1f} us"
    name = "fp32" if dtype == torch.float32 else "bf16"
    print(f"V={v} {name} B={b:5d} floor {floor_us:6.1f} us | {line}", flush=True)
