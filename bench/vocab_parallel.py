"""Vocabulary-parallel CCE scaling: 1 GPU (full classifier) vs R GPUs (classifier sharded by
vocabulary, fusedlm.linear_cross_entropy(..., process_group=pg) over NCCL).

    python bench/vocab_parallel.py --out bench/out                  # 1 and 2 GPUs (mp.spawn)
    python bench/vocab_parallel.py --worlds 1,2,4 --out bench/out   # more GPUs
    torchrun --nproc-per-node 2 bench/vocab_parallel.py --out bench/out   # one world size
    python bench/vocab_parallel.py --device cpu --tokens 64 --hidden 32 --vocab 1000 --out /tmp/vp

Default shape: Gemma 2 2B's head, N=8192 tokens, D=2304, V=256000, bfloat16, softcap 30.
Every rank builds the same hidden states and targets and its own shard of the same full
classifier (one seed), so the per-world losses must agree (checked, printed).

Per world size and rank: forward time and forward+backward time (median of --iters, CUDA
events; each iteration starts after a barrier; the row reports the slowest rank), peak
memory (max_memory_allocated during forward+backward, total and over what was allocated
before the call), the loss and the max |loss - loss(1 GPU)|. One CSV row per world size in
<out>/vocab_parallel.csv, with the speed-up over 1 GPU.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import fusedlm  # noqa: E402
from fusedlm.parallel import vocab_shard_range  # noqa: E402

FIELDS = ["world", "n", "d", "v", "v_local", "dtype", "softcap", "fwd_ms", "fwd_bwd_ms",
          "speedup_fwd", "speedup_fwd_bwd", "peak_mib", "peak_extra_mib", "loss",
          "loss_abs_diff_vs_1", "device", "torch", "fusedlm"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", dest="n", type=int, default=8192, help="N")
    p.add_argument("--hidden", dest="d", type=int, default=2304, help="D")
    p.add_argument("--vocab", dest="v", type=int, default=256000, help="V")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--softcap", type=float, default=30.0, help="0 disables")
    p.add_argument("--worlds", default="1,2", help="comma-separated world sizes (mp.spawn)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: gloo + wall-clock timing, for a smoke test of the script")
    p.add_argument("--out", default="bench/out")
    return p.parse_args(argv)


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, warmup, iters, group):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if group is not None:
                dist.barrier(group=group)
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def make_inputs(args, rank, world, device):
    """Same e / targets on every rank; this rank's rows of one full classifier."""
    dtype = DTYPES[args.dtype]
    g = torch.Generator(device=device).manual_seed(0)
    e = (torch.randn(args.n, args.d, device=device, generator=g) / 2).to(dtype)
    y = torch.randint(0, args.v, (args.n,), device=device, generator=g)
    start, end = vocab_shard_range(args.v, rank, world)
    # Generate the full classifier in row blocks so no rank needs it all at once.
    c = torch.empty(end - start, args.d, dtype=dtype, device=device)
    block = 16384
    for b0 in range(0, args.v, block):
        b1 = min(b0 + block, args.v)
        rows = (torch.randn(b1 - b0, args.d, device=device, generator=g) / args.d**0.5)
        lo, hi = max(b0, start), min(b1, end)
        if lo < hi:
            c[lo - start:hi - start] = rows[lo - b0:hi - b0].to(dtype)
    return e.requires_grad_(), c.requires_grad_(), y


def run_world(rank, world, args, group, device):
    e, c, y = make_inputs(args, rank, world, device)
    kw = dict(softcap=args.softcap or None)
    if group is not None:
        kw["process_group"] = group

    def fwd():
        return fusedlm.linear_cross_entropy(e, c, y, **kw)

    def fwd_bwd():
        loss = fwd()
        loss.backward()
        e.grad = c.grad = None
        return loss

    timer = Timer(device)
    fwd_ms = timer(lambda: fwd().detach(), args.warmup, args.iters, group)
    fwd_bwd_ms = timer(fwd_bwd, args.warmup, args.iters, group)
    peak, extra = float("nan"), float("nan")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fwd()
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
        e.grad = c.grad = None
    loss = float(fwd().detach())
    stats = torch.tensor([fwd_ms, fwd_bwd_ms, peak, extra, loss], dtype=torch.float64)
    if group is not None:  # the slowest rank sets the pace; memory: the largest rank
        stats_dev = stats.to(device)
        dist.all_reduce(stats_dev, op=dist.ReduceOp.MAX, group=group)
        stats = stats_dev.cpu()
    return dict(world=world, n=args.n, d=args.d, v=args.v, v_local=c.shape[0],
                dtype=args.dtype, softcap=args.softcap, fwd_ms=stats[0].item(),
                fwd_bwd_ms=stats[1].item(), peak_mib=stats[2].item(),
                peak_extra_mib=stats[3].item(), loss=loss,
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=str(torch.__version__), fusedlm=fusedlm.__version__)


def _device(args, local_rank):
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _worker(rank, world, args, store, result_path):
    device = _device(args, rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    init_kw = dict(device_id=device) if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank,
                            world_size=world, **init_kw)
    try:
        row = run_world(rank, world, args, dist.group.WORLD, device)
        if rank == 0:
            torch.save(row, result_path)
    finally:
        dist.destroy_process_group()


def write_rows(rows, out):
    base = next((r for r in rows if r["world"] == 1), None)
    for r in rows:
        if base is not None:
            r["speedup_fwd"] = base["fwd_ms"] / r["fwd_ms"]
            r["speedup_fwd_bwd"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            r["loss_abs_diff_vs_1"] = abs(r["loss"] - base["loss"])
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "vocab_parallel.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    print(f"{'world':>5} {'V/rank':>8} {'fwd ms':>9} {'fwd+bwd ms':>11} {'x fwd':>6} "
          f"{'x f+b':>6} {'peak MiB':>9} {'extra MiB':>9} {'loss':>10}")
    for r in rows:
        print(f"{r['world']:>5} {r['v_local']:>8} {r['fwd_ms']:>9.2f} {r['fwd_bwd_ms']:>11.2f} "
              f"{r.get('speedup_fwd', float('nan')):>6.2f} "
              f"{r.get('speedup_fwd_bwd', float('nan')):>6.2f} {r['peak_mib']:>9.0f} "
              f"{r['peak_extra_mib']:>9.0f} {r['loss']:>10.5f}")
    print(f"wrote {path}")
    if base is not None:
        worst = max(r["loss_abs_diff_vs_1"] for r in rows)
        print(f"max |loss(R GPUs) - loss(1 GPU)| = {worst:.3g}")


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" and not (torch.cuda.is_available() and fusedlm.cuda_available()):
        sys.exit("needs CUDA GPUs and the CUDA build of fusedlm (or pass --device cpu)")
    if "LOCAL_RANK" in os.environ:  # launched by torchrun: one world size
        local_rank = int(os.environ["LOCAL_RANK"])
        device = _device(args, local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                **(dict(device_id=device) if device.type == "cuda" else {}))
        try:
            world = dist.get_world_size()
            row = run_world(dist.get_rank(), world, args, dist.group.WORLD if world > 1 else None,
                            device)
            if dist.get_rank() == 0:
                write_rows([row], args.out)
        finally:
            dist.destroy_process_group()
        return
    worlds = [int(w) for w in args.worlds.split(",")]
    if args.device == "cuda" and max(worlds) > torch.cuda.device_count():
        sys.exit(f"--worlds {args.worlds} needs {max(worlds)} GPUs, "
                 f"found {torch.cuda.device_count()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            if world == 1:  # the single-GPU baseline: plain linear_cross_entropy, no group
                rows.append(run_world(0, 1, args, None, _device(args, 0)))
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                continue
            result = os.path.join(tmp, f"world{world}.pt")
            mp.spawn(_worker, args=(world, args, os.path.join(tmp, f"store{world}"), result),
                     nprocs=world, join=True)
            rows.append(torch.load(result))
    write_rows(rows, args.out)


if __name__ == "__main__":
    main()
