"""`python -m fusedlm demo`: small, offline demonstrations of each method.

The CCE demo trains a tiny causal LM twice from the same initialisation on a synthetic
corpus: once with ``fusedlm.linear_cross_entropy`` and once with the naive
``F.cross_entropy(hidden @ W.T)``, and shows that the loss curves agree while fusedlm never
holds the [tokens, vocab] logits.
"""
from __future__ import annotations

import argparse
import importlib
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import fusedlm


def synthetic_corpus(num_sequences: int, seq_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Sequences from a fixed sparse Markov chain: each token has 4 possible successors with
    probabilities (0.7, 0.2, 0.07, 0.03), so the best achievable loss is about 0.9 nats."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    probs = torch.tensor([0.7, 0.2, 0.07, 0.03])
    out = torch.empty(num_sequences, seq_len, dtype=torch.long)
    out[:, 0] = torch.randint(0, vocab, (num_sequences,), generator=g)
    for t in range(1, seq_len):
        choice = torch.multinomial(probs, num_sequences, replacement=True, generator=g)
        out[:, t] = successors[out[:, t - 1], choice]
    return out


class TinyCausalLM(nn.Module):
    def __init__(self, vocab: int, dim: int = 64, layers: int = 2, heads: int = 4, max_len: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.embed(ids) + self.pos(torch.arange(t, device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        return self.norm(self.blocks(x, mask=mask, is_causal=True))


def _train(model, data, steps, batch, loss_kind, lr=3e-3, desc=""):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in tqdm(range(steps), desc=desc, leave=False):
        idx = torch.randint(0, data.shape[0], (batch,), generator=g)
        ids = data[idx].to(model.lm_head.weight.device)
        h = model.hidden(ids)
        if loss_kind == "fusedlm":
            loss = fusedlm.linear_cross_entropy(h, model.lm_head.weight, ids, shift=True)
        else:
            logits = model.lm_head(h[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _loss_memory(model, ids, loss_kind) -> str:
    """Peak extra memory of the loss alone (forward+backward), measured on CUDA; on the CPU,
    the bytes of the float32 logits the naive path materialises vs fusedlm's per-token stats."""
    n, v = ids.numel(), model.lm_head.weight.shape[0]
    if ids.is_cuda:
        h = model.hidden(ids).detach().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if loss_kind == "fusedlm":
            loss = fusedlm.linear_cross_entropy(h, model.lm_head.weight, ids, shift=True)
        else:
            logits = model.lm_head(h[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, v), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.cuda.synchronize()
        return f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.2f} MiB (measured)"
    nbytes = 3 * n * 4 if loss_kind == "fusedlm" else n * v * 4 * 2  # logits + their grad
    return f"{nbytes / 2**20:.2f} MiB (computed: {'3 floats/token' if loss_kind == 'fusedlm' else 'N x V float32 logits + grad'})"


def cce_demo(args) -> int:
    device = torch.device(args.device)
    vocab, seq_len = (256, 32) if args.quick else (4096, 128)
    steps = 80 if args.quick else 300
    batch = 16
    data = synthetic_corpus(512, seq_len, vocab)
    torch.manual_seed(0)
    model_a = TinyCausalLM(vocab).to(device)
    model_b = TinyCausalLM(vocab).to(device)
    model_b.load_state_dict(model_a.state_dict())
    print(f"[cce] tiny causal LM: vocab {vocab}, seq {seq_len}, batch {batch}, {steps} steps on {device}")
    t0 = time.time()
    fused = _train(model_a, data, steps, batch, "fusedlm", desc="fusedlm loss")
    t1 = time.time()
    naive = _train(model_b, data, steps, batch, "naive", desc="naive loss")
    t2 = time.time()
    diff = max(abs(a - b) for a, b in zip(fused, naive))
    print(f"{'step':>6} {'fusedlm':>10} {'naive':>10}")
    for i in list(range(0, steps, max(1, steps // 8))) + [steps - 1]:
        print(f"{i:>6} {fused[i]:>10.4f} {naive[i]:>10.4f}")
    ids = data[:batch].to(device)
    print(f"max |loss difference| over {steps} steps: {diff:.2e}")
    print(f"time: fusedlm {t1 - t0:.1f}s, naive {t2 - t1:.1f}s")
    print(f"loss memory: fusedlm {_loss_memory(model_a, ids, 'fusedlm')}, "
          f"naive {_loss_memory(model_b, ids, 'naive')}")
    os.makedirs(args.out, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(naive, label="naive F.cross_entropy", lw=3, alpha=0.5)
        ax.plot(fused, label="fusedlm.linear_cross_entropy", lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
        fig.tight_layout()
        path = os.path.join(args.out, "cce_loss_curves.png")
        fig.savefig(path, dpi=120)
        print(f"plot: {path}")
    except ImportError:
        print("matplotlib not installed: no plot")
    ok = diff < 5e-3 * max(1.0, abs(naive[0])) and fused[-1] < 0.75 * fused[0]
    print("CCE demo:", "OK (curves agree, loss went down)" if ok else "MISMATCH")
    return 0 if ok else 1


# Demos of the other methods live in their subpackages and are run when present.
_OTHER_DEMOS = {"adaptive": "fusedlm.adaptive.demo", "transfer": "fusedlm.transfer.demo"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedlm demo", description=__doc__)
    parser.add_argument("--only", choices=["cce", *_OTHER_DEMOS], help="run one demo")
    parser.add_argument("--quick", action="store_true", help="small settings (CPU, minutes)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench/out")
    args = parser.parse_args(argv)
    status = 0
    if args.only in (None, "cce"):
        status |= cce_demo(args)
    for name, module in _OTHER_DEMOS.items():
        if args.only not in (None, name):
            continue
        try:
            demo = importlib.import_module(module)
        except ModuleNotFoundError:
            print(f"[{name}] demo not available in this build")
            continue
        sub = ["--out", os.path.join(args.out, name), "--device", args.device]
        status |= demo.main(sub + (["--quick"] if args.quick else []))
    return status
