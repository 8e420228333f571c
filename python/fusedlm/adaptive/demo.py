"""Miniature, offline reproduction of adaptive decoding with LPO (Dhuliawala et al., 2024).

1. A tiny random-init ``transformers`` Llama is trained with ``fusedlm.linear_cross_entropy``
   on a synthetic corpus of two prompt kinds:
   * **factual** ``<bos> a + b =`` -> the two digits of ``a + b`` (with label noise: a
     fraction of the corpus answers are off by 1 or 2, so the LM's distribution has a
     correct mode and a wrong tail; greedy is best);
   * **creative** ``<bos> NAME category style =`` -> a two-token item ``(x, y)`` of the
     category, uniformly among its valid items (plus some invalid items as noise). The reward
     of each of the N replies to a prompt is 1 if it is valid *and no other reply of the group
     produced it* ("name an item nobody else named"): greedy collides, high tau wins.
2. The LM is frozen; fixed temperatures {0, .2, .4, .6, .8, 1} are evaluated, and
   ``AdaptiveDecoder`` heads (sequence and token level) are trained with LPO (Eq. 10 by
   default) on pairs sampled from the initially uniform head, then decoded with the argmax tau.
3. Everything is repeated over seeds (new corpus sample, LM init, LPO data, head init);
   reported: mean +- std over seeds of the reward on the 50/50 mix and per kind, and the mean
   tau each head picks per prompt kind. A CSV and a PNG go to ``--out``.

    python -m fusedlm.adaptive.demo --quick          # the `make demo` setting (CPU, minutes)
    python -m fusedlm.adaptive.demo --seeds 5 --device cuda
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Sequence, Tuple

import torch

import fusedlm

from .head import AdaptiveDecoder, DEFAULT_TEMPERATURES
from .trainer import LPOConfig, LPOTrainer, evaluate_rewards

# ----------------------------------------------------------------------------- the task
PAD, BOS, EOS, PLUS, EQ, NAME = 0, 1, 2, 3, 4, 5
DIGIT0 = 6                      # digits 0..9 -> 6..15
CAT0 = 16                       # category tokens


@dataclass
class Setting:
    num_categories: int = 4
    first_per_cat: int = 4       # valid items of a category: first x second tokens
    second_per_cat: int = 4
    fact_noise: float = 0.4      # fraction of corpus answers off by +-1/+-2
    item_noise: float = 0.1      # fraction of corpus items that are invalid
    hidden_size: int = 64        # tiny Llama
    layers: int = 2
    lm_steps: int = 800
    lm_batch: int = 64
    lm_lr: float = 3e-3
    head_hidden: int = 128       # AdaptiveDecoder MLP width (2048 in the paper)
    train_prompts: int = 1024    # LPO prompts (half of each kind), one pair per prompt
    eval_prompts: int = 256
    num_samples: int = 8         # N replies per prompt (LPO data and evaluation groups)
    rounds: int = 1              # the paper: one round of data from the uniform head
    epochs: int = 8
    batch_size: int = 32
    lr: float = 3e-3
    beta: float = 1.0
    losses: Tuple[str, ...] = ("separate", "latent")


QUICK = Setting()
FULL = replace(Setting(), lm_steps=2000, train_prompts=4096, eval_prompts=1024, head_hidden=512)

LOSS_LABEL = {"separate": "Eq.10", "latent": "Eq.11", "nll": "NLL"}


class Task:
    """Token layout, corpus sampler and rewards of the mixed factual/creative task."""

    def __init__(self, s: Setting):
        self.s = s
        self.word0 = CAT0 + s.num_categories
        n_first = s.num_categories * s.first_per_cat
        self.first = [list(range(self.word0 + c * s.first_per_cat,
                                 self.word0 + (c + 1) * s.first_per_cat)) for c in range(s.num_categories)]
        second0 = self.word0 + n_first
        self.second = [list(range(second0 + c * s.second_per_cat, second0 + (c + 1) * s.second_per_cat))
                       for c in range(s.num_categories)]
        self.vocab_size = second0 + s.num_categories * s.second_per_cat
        self.all_first = [t for f in self.first for t in f]
        self.all_second = [t for f in self.second for t in f]

    # prompts: dicts with input_ids + metadata (the reward reads the metadata)
    def fact_prompt(self, a: int, b: int) -> dict:
        s = a + b
        return {"kind": "factual", "input_ids": [BOS, DIGIT0 + a, PLUS, DIGIT0 + b, EQ],
                "answer": [DIGIT0 + s // 10, DIGIT0 + s % 10]}

    def creative_prompt(self, c: int, style: int) -> dict:
        return {"kind": "creative", "input_ids": [BOS, NAME, CAT0 + c, DIGIT0 + style, EQ],
                "category": c}

    def prompts(self, n: int, g: torch.Generator) -> List[dict]:
        out = []
        for i in range(n):
            if i % 2 == 0:
                a, b = torch.randint(0, 10, (2,), generator=g).tolist()
                out.append(self.fact_prompt(a, b))
            else:
                c = int(torch.randint(0, self.s.num_categories, (1,), generator=g))
                out.append(self.creative_prompt(c, int(torch.randint(0, 10, (1,), generator=g))))
        return out

    def valid(self, c: int, item: Sequence[int]) -> bool:
        return len(item) == 2 and item[0] in self.first[c] and item[1] in self.second[c]

    def corpus(self, n: int, g: torch.Generator) -> torch.Tensor:
        """``n`` training sequences of 8 tokens (prompt + answer + EOS)."""
        rows = []
        r = torch.rand(n, 2, generator=g).tolist()
        for u_kind, u_noise in r:
            if u_kind < 0.5:
                a, b = torch.randint(0, 10, (2,), generator=g).tolist()
                s = a + b
                if u_noise < self.s.fact_noise:
                    d = [-2, -1, 1, 2][int(torch.randint(0, 4, (1,), generator=g))]
                    s = min(18, max(0, s + d))
                    if s == a + b:
                        s = a + b - d
                rows.append([BOS, DIGIT0 + a, PLUS, DIGIT0 + b, EQ, DIGIT0 + s // 10, DIGIT0 + s % 10, EOS])
            else:
                c = int(torch.randint(0, self.s.num_categories, (1,), generator=g))
                style = int(torch.randint(0, 10, (1,), generator=g))
                if u_noise < self.s.item_noise:
                    while True:
                        x = self.all_first[int(torch.randint(0, len(self.all_first), (1,), generator=g))]
                        y = self.all_second[int(torch.randint(0, len(self.all_second), (1,), generator=g))]
                        if not self.valid(c, [x, y]):
                            break
                else:
                    x = self.first[c][int(torch.randint(0, self.s.first_per_cat, (1,), generator=g))]
                    y = self.second[c][int(torch.randint(0, self.s.second_per_cat, (1,), generator=g))]
                rows.append([BOS, NAME, CAT0 + c, DIGIT0 + style, EQ, x, y, EOS])
        return torch.tensor(rows)

    def reward(self, prompt: dict, responses: List[List[int]]) -> List[float]:
        if prompt["kind"] == "factual":
            return [float(r == prompt["answer"]) for r in responses]
        counts: Dict[tuple, int] = {}
        for r in responses:
            counts[tuple(r)] = counts.get(tuple(r), 0) + 1
        return [float(self.valid(prompt["category"], r) and counts[tuple(r)] == 1) for r in responses]


# ----------------------------------------------------------------------------- the LM
def build_lm(task: Task, s: Setting, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=task.vocab_size, hidden_size=s.hidden_size,
                      num_hidden_layers=s.layers, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=2 * s.hidden_size,
                      max_position_embeddings=32, bos_token_id=BOS, eos_token_id=EOS,
                      pad_token_id=PAD, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(device)


def train_lm(model, task: Task, s: Setting, seed: int, progress: bool = True) -> List[float]:
    """Next-token training with fusedlm.linear_cross_entropy (no [N, V] logits)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    data = task.corpus(s.lm_steps * s.lm_batch // 4, g)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lm_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 50) * max(0.05, 1 - i / s.lm_steps))
    model.train()
    losses = []
    for _ in tqdm(range(s.lm_steps), desc="pre-train tiny LM", leave=False, disable=not progress):
        ids = data[torch.randint(0, data.shape[0], (s.lm_batch,), generator=g)].to(device)
        h = model.model(input_ids=ids).last_hidden_state
        loss = fusedlm.linear_cross_entropy(h, model.lm_head.weight, ids, shift=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


# ----------------------------------------------------------------------------- experiment
def _by_kind(prompts, values) -> Dict[str, float]:
    out = {}
    for kind in ("factual", "creative"):
        v = [float(x) for p, x in zip(prompts, values) if p["kind"] == kind]
        out[kind] = sum(v) / len(v)
    return out


def _kind_mean(prompts, values: torch.Tensor, kind: str) -> torch.Tensor:
    sel = torch.tensor([p["kind"] == kind for p in prompts])
    return values[sel].nanmean(0)


def run_seed(seed: int, s: Setting, device, temperatures=DEFAULT_TEMPERATURES,
             progress: bool = True) -> List[dict]:
    """One seed of the whole pipeline; returns one row per decoding method."""
    torch.manual_seed(seed)
    task = Task(s)
    model = build_lm(task, s, device)
    lm_losses = train_lm(model, task, s, seed, progress)
    g = torch.Generator().manual_seed(10_000 + seed)
    train_prompts = task.prompts(s.train_prompts, g)
    eval_prompts = task.prompts(s.eval_prompts, g)
    common = dict(num_samples=s.num_samples, max_new_tokens=4, eos_token_id=EOS,
                  pad_token_id=PAD, gen_batch_size=4096, seed=seed + 7)
    rows = []

    def record(method, res, t_train=0.0):
        kinds = _by_kind(eval_prompts, res["per_prompt"])
        taus = _by_kind(eval_prompts, res["mean_tau"])
        row = {"seed": seed, "method": method, "mix": res["reward"],
               "factual": kinds["factual"], "creative": kinds["creative"],
               "tau_factual": taus["factual"], "tau_creative": taus["creative"]}
        for kind in ("factual", "creative"):  # tau per reply position: token 1, token 2, EOS
            pos = _kind_mean(eval_prompts, res["tau_by_position"], kind)
            for t in range(3):
                row[f"tau_{kind}_pos{t}"] = float(pos[t])
        row["train_s"] = round(t_train, 2)
        rows.append(row)

    for tau in temperatures:
        record(f"fixed τ={tau:g}", evaluate_rewards(model, None, eval_prompts, task.reward,
                                                    temperature=float(tau), **common))
    for loss in s.losses:
        for level in ("sequence", "token"):
            torch.manual_seed(seed * 100 + (level == "token"))
            head = AdaptiveDecoder(s.hidden_size, temperatures, level=level,
                                   mlp_hidden=s.head_hidden)
            cfg = LPOConfig(loss=loss, beta=s.beta, num_samples=s.num_samples, max_new_tokens=4,
                            rounds=s.rounds, epochs=s.epochs, batch_size=s.batch_size, lr=s.lr,
                            gen_batch_size=4096, eos_token_id=EOS, pad_token_id=PAD, seed=seed,
                            progress=progress)
            t1 = time.time()
            LPOTrainer(model, head, task.reward, cfg).fit(train_prompts)
            t_train = time.time() - t1
            name = f"AD_{'seq' if level == 'sequence' else 'tok'} {LOSS_LABEL[loss]}"
            record(name, evaluate_rewards(model, head.eval(), eval_prompts, task.reward, **common),
                   t_train)
    for r in rows:
        r["lm_final_loss"] = round(sum(lm_losses[-20:]) / 20, 4)
    return rows


def _mean_std(values: List[float]) -> str:
    m = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.3f} ± {sd:.3f}"


def summarize(rows: List[dict]) -> List[dict]:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        out.append({"method": m, **{k: [r[k] for r in rs] for k in
                                    ("mix", "factual", "creative", "tau_factual", "tau_creative")}})
    return out


def print_table(summary: List[dict], n_seeds: int) -> str:
    lines = [f"reward (mean ± std over {n_seeds} seeds; 1 = every reply rewarded)",
             f"{'method':<14} {'mix':>15} {'factual':>15} {'creative':>15} "
             f"{'mean τ factual':>15} {'mean τ creative':>16}"]
    for r in summary:
        lines.append(f"{r['method']:<14} {_mean_std(r['mix']):>15} {_mean_std(r['factual']):>15} "
                     f"{_mean_std(r['creative']):>15} {_mean_std(r['tau_factual']):>15} "
                     f"{_mean_std(r['tau_creative']):>16}")
    text = "\n".join(lines)
    print(text)
    return text


def plot(summary: List[dict], path: str, n_seeds: int) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [r["method"] for r in summary]
    x = range(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 1.5]})
    ax = axes[0]
    width = 0.27
    for j, (key, color) in enumerate((("mix", "tab:gray"), ("factual", "tab:blue"),
                                      ("creative", "tab:orange"))):
        means = [statistics.fmean(r[key]) for r in summary]
        stds = [statistics.stdev(r[key]) if n_seeds > 1 else 0 for r in summary]
        ax.bar([i + (j - 1) * width for i in x], means, width, yerr=stds, capsize=2,
               label=key, color=color)
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("mean reward")
    ax.set_ylim(0, 1.2)
    ax.legend(fontsize=8, ncol=3, loc="upper left")
    ax.set_title(f"fixed τ vs adaptive head (LPO), {n_seeds} seeds")
    ax = axes[1]
    ada = [r for r in summary if r["method"].startswith("AD_")]
    for j, (key, color) in enumerate((("tau_factual", "tab:blue"), ("tau_creative", "tab:orange"))):
        means = [statistics.fmean(r[key]) for r in ada]
        stds = [statistics.stdev(r[key]) if n_seeds > 1 else 0 for r in ada]
        ax.bar([i + (j - 0.5) * 0.38 for i in range(len(ada))], means, 0.38, yerr=stds, capsize=2,
               color=color, label=key.replace("tau_", ""))
    ax.set_xticks(range(len(ada)))
    ax.set_xticklabels([r["method"] for r in ada], rotation=30, ha="right")
    ax.set_ylabel("mean τ chosen")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("τ picked per prompt kind")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedlm.adaptive.demo",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small CPU setting (make demo)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (>= 3 for a spread)")
    parser.add_argument("--out", default=os.path.join("bench", "out", "adaptive"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--losses", default=None,
                        help="comma-separated LPO loss forms among separate (Eq. 10), latent "
                             "(Eq. 11), nll (default: separate,latent)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads while the demo runs (default: 1 on CPU: the "
                             "models are tiny, and extra threads only contend on a shared "
                             "machine; 0 = leave torch's setting)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else 0)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(args, parser)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args, parser) -> int:
    s = QUICK if args.quick else FULL
    if args.losses:
        forms = tuple(f.strip() for f in args.losses.split(",") if f.strip())
        bad = [f for f in forms if f not in LOSS_LABEL]
        if bad or not forms:
            parser.error(f"unknown loss form(s) {bad}; choose from {list(LOSS_LABEL)}")
        s = replace(s, losses=forms)
    device = torch.device(args.device)
    print(f"[adaptive] LPO miniature: tiny Llama (d={s.hidden_size}, {s.layers} layers) on "
          f"{device}, {args.seeds} seeds, {'quick' if args.quick else 'full'} setting, "
          f"LPO losses {', '.join(LOSS_LABEL[f] for f in s.losses)}, N={s.num_samples}")
    t0 = time.time()
    rows = []
    for seed in range(args.seeds):
        ts = time.time()
        rows += run_seed(seed, s, device, progress=not args.no_progress)
        print(f"  seed {seed} done in {time.time() - ts:.1f}s")
    wall = time.time() - t0
    summary = summarize(rows)
    table = print_table(summary, args.seeds)
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "adaptive_results.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, "adaptive_results.txt"), "w") as f:
        f.write(table + f"\nwall time {wall:.1f}s on {device}\n")
    png = os.path.join(args.out, "adaptive_rewards.png")
    print(f"csv: {csv_path}" + (f"\nplot: {png}" if plot(summary, png, args.seeds) else
                                "\nmatplotlib not installed: no plot"))
    mix = {r["method"]: statistics.fmean(r["mix"]) for r in summary}
    best_name, best_fixed = max(((k, v) for k, v in mix.items() if k.startswith("fixed")),
                                key=lambda kv: kv[1])
    verdicts = []
    for r in summary:
        if not r["method"].startswith("AD_"):
            continue
        m = r["method"]
        tf, tc = statistics.fmean(r["tau_factual"]), statistics.fmean(r["tau_creative"])
        beats = mix[m] >= best_fixed
        order = tf < tc
        verdicts.append(f"{m}: mix {mix[m]:.3f} vs best fixed ({best_name}) {best_fixed:.3f} -> "
                        f"{'>= every fixed τ' if beats else 'BELOW the best fixed τ'}; "
                        f"mean τ factual {tf:.2f} vs creative {tc:.2f} -> "
                        f"{'lower on factual' if order else 'NOT lower on factual'}")
    tok = [r for r in summary if r["method"].startswith("AD_tok")]
    if tok:
        verdicts.append("token-level heads, mean τ per reply position (token 1 / token 2 / EOS):")
        for r in tok:
            rs = [x for x in rows if x["method"] == r["method"]]
            parts = []
            for kind in ("factual", "creative"):
                vals = [statistics.fmean(x[f"tau_{kind}_pos{t}"] for x in rs) for t in range(3)]
                parts.append(f"{kind} " + " / ".join(f"{v:.2f}" for v in vals))
            verdicts.append(f"  {r['method']}: " + "; ".join(parts))
    print("\n".join(verdicts))
    with open(os.path.join(args.out, "adaptive_results.txt"), "a") as f:
        f.write("\n".join(verdicts) + "\n")
    print(f"[adaptive] wall time {wall:.1f}s")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
