import sys, os
sys.path.insert(1, os.path.join(os.getcwd(), "bench"))
import torch, fusedlm
from torch.profiler import ProfilerActivity, profile
from run import cce_inputs, cuda_time
tag = "base" if "/.ab/" in fusedlm.__file__ else "new "
for n, d, v in [(8192, 2304, 256000), (8192, 4096, 128256), (16384, 2048, 32000)]:
    for regime, eps in [("random", None), ("random", "auto"), ("peaked", "auto")]:
        e, c, y = cce_inputs(n, d, v, regime)
        e.requires_grad_(); c.requires_grad_()
        f = lambda: torch.autograd.grad(fusedlm.linear_cross_entropy(e, c, y, filter_eps=eps), (e, c))
        f(); torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            f(); torch.cuda.synchronize()
        parts = {}
        for ev in prof.key_averages():
            for k in ("forward_kernel", "grad_tile_kernel", "grad_ec_wgmma"):
                if k in ev.key: parts[k] = parts.get(k, 0) + ev.device_time_total / 1e3
        t = cuda_time(f, reps=5)
        print(tag, f"{v} {regime} eps={eps}: fwd+bwd {t:.2f} ms |", " ".join(f"{k.split('_')[1] if k!='forward_kernel' else 'fwd'} {x:.2f}" for k, x in parts.items()), flush=True)
        del e, c, y
