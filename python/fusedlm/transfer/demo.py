"""Miniature, offline reproduction of attention transfer (Li et al., NeurIPS 2024).

Data: scikit-learn's 8x8 handwritten digits (shipped with the package, no download),
upsampled to 16x16. A small timm ViT *teacher* is trained first on the whole training pool;
*students* of the same architecture then get only a small labelled subset and are trained
(same recipe, same budget) from scratch, with attention copy, and with attention
distillation, over several seeds. Reported: test accuracy mean +- std over seeds and the
fraction of the teacher-vs-scratch gap each method recovers, (acc - scratch) / (teacher -
scratch).

    python -m fusedlm.transfer.demo --quick            # the `make demo` setting
    python -m fusedlm.transfer.demo --seeds 5 --out bench/out/transfer
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import AttentionTransfer, build_student, default_layers

METHODS = ("scratch", "copy", "copy_q", "copy_k", "distill", "finetune")
DEFAULT_METHODS = ("scratch", "copy", "distill")


@dataclass
class Setting:
    img_size: int = 16
    patch_size: int = 4
    embed_dim: int = 48
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 2.0
    n_test: int = 497            # held-out test images (stratified)
    n_student: int = 300         # labelled images the students get (subset of the pool)
    teacher_epochs: int = 80
    student_epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 3
    shift: int = 2               # random-translation augmentation, in pixels
    distill_weight: float = 3.0


QUICK = Setting()                                           # ~3 min on 2 idle CPU cores
FULL = Setting(teacher_epochs=150, student_epochs=200)      # + 5 seeds and all methods


# ------------------------------------------------------------------------------- data

def load_digits_tensors(setting: Setting, data_seed: int = 0):
    """(pool_x, pool_y, student_idx, test_x, test_y); images normalised, [N, 1, S, S]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    if setting.img_size != 8:
        x = F.interpolate(x, size=(setting.img_size, setting.img_size), mode="bilinear",
                          align_corners=False)
    idx = list(range(len(y)))
    pool_i, test_i = train_test_split(idx, test_size=setting.n_test, random_state=data_seed,
                                      stratify=d.target)
    pool_x, pool_y = x[pool_i], y[pool_i]
    mean, std = pool_x.mean(), pool_x.std()
    pool_x, test_x = (pool_x - mean) / std, (x[test_i] - mean) / std
    stud_i, _ = train_test_split(list(range(len(pool_i))), train_size=setting.n_student,
                                 random_state=data_seed, stratify=pool_y.numpy())
    return pool_x, pool_y, torch.tensor(sorted(stud_i)), test_x, y[test_i]


def random_shift(x: Tensor, shift: int, gen: torch.Generator) -> Tensor:
    """Translate every image by its own random offset in [-shift, shift]^2 (zero fill)."""
    if shift <= 0:
        return x
    b, c, h, w = x.shape
    pad = F.pad(x, (shift, shift, shift, shift), value=float(x.min()))
    oy = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]        # [B, H, 1]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]        # [B, 1, W]
    bi = torch.arange(b)[:, None, None]
    return torch.stack([pad[bi, ch, rows, cols] for ch in range(c)], dim=1)


# ------------------------------------------------------------------------------ models

def make_vit(setting: Setting, num_classes: int = 10) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(
        img_size=setting.img_size, patch_size=setting.patch_size, in_chans=1,
        num_classes=num_classes, embed_dim=setting.embed_dim, depth=setting.depth,
        num_heads=setting.num_heads, mlp_ratio=setting.mlp_ratio, qkv_bias=True)


class _Plain(nn.Module):
    """Scratch / fine-tune: the student alone, with the same output type as the wrapper."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.student = model

    def forward(self, x):
        logits = self.student(x)
        z = logits.new_zeros((), dtype=torch.float32)
        return logits, z, logits.new_zeros((0,), dtype=torch.float32)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, device, batch: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        logits = model(x[i:i + batch].to(device))[0]
        correct += (logits.argmax(-1).cpu() == y[i:i + batch]).sum().item()
    return correct / len(y)


def train(model: nn.Module, x: Tensor, y: Tensor, test_x: Tensor, test_y: Tensor,
          setting: Setting, epochs: int, seed: int, device, desc: str,
          layer_names: Sequence[str] = ()) -> Dict:
    """AdamW + linear warm-up + cosine decay; the same recipe for every method."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": setting.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=setting.lr)
    steps_per_epoch = math.ceil(len(y) / setting.batch_size)
    total, warm = epochs * steps_per_epoch, setting.warmup_epochs * steps_per_epoch

    def lr_at(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    curve, layer_sum = [], torch.zeros(len(layer_names))
    from tqdm.auto import tqdm
    bar = tqdm(range(epochs), desc=desc, leave=False, dynamic_ncols=True, disable=None)
    t0 = time.perf_counter()
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(y), generator=gen)
        ce_sum, aux_sum, n_seen = 0.0, 0.0, 0
        layer_sum.zero_()
        for i in range(0, len(y), setting.batch_size):
            idx = perm[i:i + setting.batch_size]
            xb = random_shift(x[idx], setting.shift, gen).to(device)
            yb = y[idx].to(device)
            logits, aux, layer_losses = model(xb)
            ce = F.cross_entropy(logits, yb)
            loss = ce + aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            ce_sum += ce.item() * len(idx)
            aux_sum += aux.item() * len(idx)
            if layer_losses.numel():
                if layer_sum.numel() != layer_losses.numel():
                    layer_sum = torch.zeros(layer_losses.numel())
                layer_sum += layer_losses.detach().cpu() * len(idx)
            n_seen += len(idx)
        acc = evaluate(model, test_x, test_y, device)
        curve.append(acc)
        bar.set_postfix(ce=f"{ce_sum / n_seen:.3f}", aux=f"{aux_sum / n_seen:.3f}",
                        test=f"{acc:.3f}")
    return {
        "test_acc": curve[-1], "curve": curve, "train_ce": ce_sum / n_seen,
        "aux": aux_sum / n_seen, "seconds": time.perf_counter() - t0,
        "layer_losses": {n: v / n_seen for n, v in zip(
            layer_names or [f"layer{i}" for i in range(layer_sum.numel())], layer_sum.tolist())},
    }


def build_method(method: str, teacher: nn.Module, setting: Setting, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    student = build_student(teacher)           # fresh init of the teacher's architecture
    if method == "scratch":
        return _Plain(student)
    if method == "finetune":                   # reference: start from the teacher's weights
        student.load_state_dict(teacher.state_dict())
        student.reset_classifier(student.num_classes)
        return _Plain(student)
    return AttentionTransfer(student, teacher, mode=method, weight=setting.distill_weight)


# ----------------------------------------------------------------------------- report

def summarise(runs: List[Dict], teacher_acc: float, methods: Sequence[str]) -> List[Dict]:
    by = {m: [r["test_acc"] for r in runs if r["method"] == m] for m in methods}
    scratch = statistics.mean(by["scratch"]) if by.get("scratch") else None
    gap = None if scratch is None else teacher_acc - scratch
    rows = [{"method": "teacher", "n": 1, "mean": teacher_acc, "std": 0.0, "min": teacher_acc,
             "max": teacher_acc, "gap_recovered": 1.0 if gap else None}]
    for m in methods:
        accs = by[m]
        mean = statistics.mean(accs)
        rows.append({
            "method": m, "n": len(accs), "mean": mean,
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "min": min(accs), "max": max(accs),
            "gap_recovered": (mean - scratch) / gap if gap and abs(gap) > 1e-12 else None,
        })
    return rows


def format_table(rows: List[Dict]) -> str:
    lines = ["| method | test acc (%) mean ± std | min–max | seeds | gap recovered |",
             "|---|---|---|---|---|"]
    for r in rows:
        g = "—" if r["gap_recovered"] is None else f"{100 * r['gap_recovered']:.0f}%"
        acc = (f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}" if r["n"] > 1
               else f"{100 * r['mean']:.1f}")
        lines.append(f"| {r['method']} | {acc} | {100 * r['min']:.1f}–{100 * r['max']:.1f} | "
                     f"{r['n']} | {g} |")
    return "\n".join(lines)


def plot(rows: List[Dict], runs: List[Dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["method"] for r in rows]
    means = [100 * r["mean"] for r in rows]
    stds = [100 * r["std"] for r in rows]
    colors = ["0.5"] + [f"C{i}" for i in range(len(rows) - 1)]
    ax0.bar(names, means, yerr=stds, capsize=4, color=colors, alpha=0.8)
    for i, r in enumerate(rows[1:], start=1):
        accs = [100 * x["test_acc"] for x in runs if x["method"] == r["method"]]
        ax0.scatter([i] * len(accs), accs, color="k", s=10, zorder=3)
    lo = min(100 * x["test_acc"] for x in runs)
    ax0.set_ylim(max(0.0, lo - 5), 100)
    ax0.set_ylabel("test accuracy (%)")
    ax0.set_title("final test accuracy (bars: mean ± std, dots: seeds)")
    for i, r in enumerate(rows):
        if r["gap_recovered"] is not None and r["method"] not in ("teacher", "scratch"):
            ax0.annotate(f"{100 * r['gap_recovered']:.0f}% of gap", (i, means[i] + stds[i]),
                         xytext=(0, 6), textcoords="offset points", ha="center", va="bottom",
                         fontsize=8)
    for i, r in enumerate(rows[1:]):
        curves = [x["curve"] for x in runs if x["method"] == r["method"]]
        mean_curve = [100 * statistics.mean(c) for c in zip(*curves)]
        ax1.plot(range(1, len(mean_curve) + 1), mean_curve, color=f"C{i}", label=r["method"])
    ax1.axhline(100 * rows[0]["mean"], color="0.5", ls="--", label="teacher")
    ax1.set_xlabel("student epoch")
    ax1.set_ylabel("test accuracy (%), mean over seeds")
    ax1.set_ylim(max(0.0, lo - 25), 100)
    ax1.legend(loc="lower right")
    ax1.set_title("test accuracy during training")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusedlm.transfer.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small setting used by `make demo`: 3 seeds of scratch/copy/distill, "
                         "100 student epochs (default: 5 seeds of every method, 200 epochs)")
    ap.add_argument("--seeds", type=int, default=None,
                    help="student seeds per method (default 3 with --quick, else 5)")
    ap.add_argument("--methods", default=None,
                    help=f"comma-separated subset of {','.join(METHODS)}; scratch is always run "
                         f"(default {','.join(DEFAULT_METHODS)} with --quick, else all)")
    ap.add_argument("--out", default=os.path.join("bench", "out", "transfer"))
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: these tiny matmuls gain little from "
                         "more, and several threads slow down badly on a busy machine)")
    ap.add_argument("--n-student", type=int, default=None,
                    help="labelled images for the students (default: setting's)")
    ap.add_argument("--epochs", type=int, default=None, help="student epochs (default: setting's)")
    ap.add_argument("--teacher-epochs", type=int, default=None,
                    help="teacher epochs (default: setting's)")
    args = ap.parse_args(argv)

    setting = Setting(**asdict(QUICK if args.quick else FULL))
    if args.n_student is not None:
        setting.n_student = args.n_student
    if args.epochs is not None:
        setting.student_epochs = args.epochs
    if args.teacher_epochs is not None:
        setting.teacher_epochs = args.teacher_epochs
    if args.seeds is None:
        args.seeds = 3 if args.quick else 5
    if args.methods is None:
        args.methods = ",".join(DEFAULT_METHODS if args.quick else METHODS)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or args.seeds < 1:
        ap.error(f"unknown method(s) {bad}" if bad else "--seeds must be >= 1")
    if "scratch" not in methods:
        methods.insert(0, "scratch")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()

    pool_x, pool_y, stud_i, test_x, test_y = load_digits_tensors(setting)
    print(f"[transfer demo] {'quick' if args.quick else 'full'} setting on {device}: "
          f"digits {setting.img_size}x{setting.img_size}, ViT dim {setting.embed_dim} depth "
          f"{setting.depth} heads {setting.num_heads} patch {setting.patch_size}; teacher on "
          f"{len(pool_y)} images x {setting.teacher_epochs} ep; students on {len(stud_i)} "
          f"images x {setting.student_epochs} ep; test {len(test_y)}; seeds {args.seeds}",
          flush=True)
    print(f"[transfer demo] transferred layers: copy {default_layers(setting.depth, 'copy')}, "
          f"distill {default_layers(setting.depth, 'distill')} (of {setting.depth})", flush=True)

    torch.manual_seed(1234)
    teacher = make_vit(setting).to(device)
    t_res = train(_Plain(teacher), pool_x, pool_y, test_x, test_y, setting,
                  setting.teacher_epochs, seed=1234, device=device, desc="teacher")
    teacher_acc = t_res["test_acc"]
    print(f"  teacher: test acc {100 * teacher_acc:.1f}%  ({t_res['seconds']:.0f}s)", flush=True)

    sx, sy = pool_x[stud_i], pool_y[stud_i]
    runs: List[Dict] = []
    for method in methods:
        for seed in range(args.seeds):
            model = build_method(method, teacher, setting, seed).to(device)
            names = ([f"layer{s}" for s, _ in model.layers]
                     if isinstance(model, AttentionTransfer) and method == "distill" else [])
            res = train(model, sx, sy, test_x, test_y, setting, setting.student_epochs,
                        seed=seed, device=device, desc=f"{method} s{seed}", layer_names=names)
            if isinstance(model, AttentionTransfer):
                model.unpatch()
            res.update(method=method, seed=seed)
            runs.append(res)
            layers = " ".join(f"{k}={v:.3f}" for k, v in res["layer_losses"].items())
            print(f"  {method:8s} seed {seed}: test acc {100 * res['test_acc']:.1f}%  "
                  f"train ce {res['train_ce']:.3f}  aux {res['aux']:.3f} "
                  f"{('[' + layers + '] ') if layers else ''}({res['seconds']:.0f}s)", flush=True)

    rows = summarise(runs, teacher_acc, methods)
    wall = time.perf_counter() - t_start
    table = format_table(rows)
    print()
    print(table)
    print(f"\ngap recovered = (acc - scratch) / (teacher - scratch); wall time {wall:.0f}s "
          f"on {device} ({torch.get_num_threads()} threads)")

    with open(os.path.join(args.out, "runs.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", "test_acc", "train_ce", "aux_loss", "seconds",
                    "layer_losses"])
        w.writerow(["teacher", 1234, f"{teacher_acc:.4f}", f"{t_res['train_ce']:.4f}", "0",
                    f"{t_res['seconds']:.1f}", ""])
        for r in runs:
            w.writerow([r["method"], r["seed"], f"{r['test_acc']:.4f}", f"{r['train_ce']:.4f}",
                        f"{r['aux']:.4f}", f"{r['seconds']:.1f}",
                        ";".join(f"{k}={v:.4f}" for k, v in r["layer_losses"].items())])
    with open(os.path.join(args.out, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(table + f"\n\nwall time {wall:.0f}s on {device}\n")
    title = (f"attention transfer on digits ({'quick' if args.quick else 'full'}): ViT-d"
             f"{setting.embed_dim}x{setting.depth}, students on {len(stud_i)} images, "
             f"{args.seeds} seeds")
    plot(rows, runs, os.path.join(args.out, "transfer.png"), title)
    print(f"wrote {args.out}/runs.csv, summary.csv, summary.md, transfer.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
