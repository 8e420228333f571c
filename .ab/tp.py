# Truncated sampling A/B: us per call in a graph of 20, plus whether base and new draw the
# same tokens (same seeds) - printed per build; compare the token hashes across builds.
import sys, os
sys.path.insert(1, os.path.join(os.getcwd(), "bench"))
import torch, fusedlm
from run import graph_time
out = []
for v in (128256, 256000):
    for dt in (torch.float32, torch.bfloat16):
        for b in (1, 64, 256):
            torch.manual_seed(0)
            l = torch.randn(b, v, device="cuda", dtype=dt) * 3
            tau = torch.rand(b, device="cuda") * 1.2
            seeds = torch.arange(b, device="cuda")
            for name, kw in (("plain", {}), ("top_p", dict(top_p=0.9)), ("top_k", dict(top_k=50)),
                             ("both", dict(top_k=1000, top_p=0.95))):
                t = graph_time(lambda: fusedlm.sample(l, tau, seed=seeds, **kw), calls=20) * 1e3
                tok = fusedlm.sample(l, tau, seed=seeds, **kw)
                out.append(f"{str(dt)[6:][:4]} B{b} {name} {t:.1f}us h{int(tok.sum()) % 100000}")
print("base" if "/.ab/" in fusedlm.__file__ else "new ", " | ".join(out), flush=True)
