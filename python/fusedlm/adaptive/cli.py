"""``python -m fusedlm lpo``: train an AdaptiveDecoder head with LPO.

Examples::

    # the demo's tiny Llama and its synthetic factual/creative task (offline, ~1 min on CPU)
    python -m fusedlm lpo --model demo --out runs/lpo_demo

    # a local Hugging Face causal LM, prompts from JSONL, exact-match reward
    python -m fusedlm lpo --model /models/llama --prompts train.jsonl --reward exact \\
        --level sequence --num-samples 16 --out runs/lpo

JSONL prompt records: ``{"prompt": "text"}`` (tokenised with the model's tokenizer; add
``--chat`` to apply its chat template) or ``{"input_ids": [...]}``, plus any fields the
reward reads (``answer`` for the built-in rewards). Rewards:

* ``exact``: 1 if the reply equals ``answer`` (token ids if ``answer`` is a list, else the
  decoded text, stripped);
* ``contains``: 1 if the decoded reply contains ``answer``;
* ``unique``: 1 for a non-empty reply that no other reply of the group produced (diversity);
* ``pkg.module:function``: ``function(record, texts, ids) -> list of N floats`` (texts are
  None without a tokenizer).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, Callable, List, Optional

import torch

from ..sampling import MAX_TEMPERATURE_LOGPROBS
from .head import AdaptiveDecoder, DEFAULT_TEMPERATURES, check_temperatures
from .lpo import FORMS, check_beta
from .trainer import LPOConfig, LPOTrainer, evaluate_rewards


def _checked(parse):
    """An argparse type from a parse-and-check function of the library: its ValueError
    message becomes the argparse error (raised before the model loads)."""
    def argument(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return argument


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


# Options read only for a Hugging Face model: with --model demo (its own task, reward, stop
# token and float32 LM) they are refused, not ignored.
HF_ONLY = ("prompts", "eval_prompts", "reward", "chat", "eos_token_id", "dtype")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fusedlm lpo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="Hugging Face model directory (loaded offline), or 'demo'")
    p.add_argument("--prompts", help="JSONL training prompts (not needed with --model demo)")
    p.add_argument("--eval-prompts", help="JSONL prompts to report the reward on before/after")
    p.add_argument("--reward", default=None,
                   help="exact | contains | unique | pkg.module:function (default: exact)")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--level", choices=["sequence", "token"], default="sequence")
    p.add_argument("--loss", choices=list(FORMS), default="separate",
                   help="separate = Eq. 10 (default), latent = Eq. 11, nll = ablation")
    p.add_argument("--temperatures", type=_checked(lambda text: check_temperatures(text.split(","))),
                   default=list(DEFAULT_TEMPERATURES))
    p.add_argument("--mlp-hidden", type=int, default=None,
                   help="head MLP width (default 2048 as in the paper; 128 with --model demo)")
    p.add_argument("--num-layers", type=_at_least(1), default=3)
    p.add_argument("--num-samples", type=_at_least(2), default=None,
                   help="N replies per prompt (default 16 as in the paper; 8 with --model demo)")
    p.add_argument("--max-new-tokens", type=_at_least(1), default=None,
                   help="default 256 (4 with --model demo)")
    p.add_argument("--eos-token-id", type=int, action="append",
                   help="stop token (repeatable); default: the model's generation config")
    p.add_argument("--beta", type=_checked(lambda text: check_beta(float(text))), default=1.0)
    p.add_argument("--rounds", type=_at_least(1), default=1)
    p.add_argument("--epochs", type=_at_least(1), default=4)
    p.add_argument("--batch-size", type=_at_least(1), default=32, help="pairs per optimizer step")
    p.add_argument("--gen-batch-size", type=_at_least(1), default=256, help="rows per generate() call")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/lpo", help="checkpoint directory (head.pt goes here)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="optimizer steps (0 = per round)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/lpo_checkpoint.pt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="LM dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default; 1 is best for --model demo "
                        "on a shared CPU)")
    p.add_argument("--no-progress", action="store_true")
    return p


def read_jsonl(path: str) -> List[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _tokenize(records: List[dict], tokenizer, chat: bool) -> List[dict]:
    out = []
    for rec in records:
        rec = dict(rec)
        if "input_ids" not in rec:
            if tokenizer is None:
                raise SystemExit("prompts have no input_ids and the model has no tokenizer")
            text = rec["prompt"]
            if chat:
                ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                    add_generation_prompt=True, tokenize=True)
                if isinstance(ids, Mapping):  # (transformers 5: a BatchEncoding)
                    ids = ids["input_ids"]
            else:
                ids = tokenizer(text)["input_ids"]
            rec["input_ids"] = list(ids)
        out.append(rec)
    return out


def make_reward(spec: str, tokenizer) -> Callable[[Any, List[List[int]]], List[float]]:
    def decode(ids):
        return None if tokenizer is None else [tokenizer.decode(r, skip_special_tokens=True)
                                               for r in ids]

    if spec == "exact":
        def reward(rec, ids):
            ans = rec["answer"]
            if isinstance(ans, list):
                return [float(r == ans) for r in ids]
            return [float(t.strip() == str(ans).strip()) for t in _need_text(decode(ids))]
    elif spec == "contains":
        def reward(rec, ids):
            return [float(str(rec["answer"]) in t) for t in _need_text(decode(ids))]
    elif spec == "unique":
        def reward(rec, ids):
            keys = [tuple(r) for r in ids]
            return [float(len(k) > 0 and keys.count(k) == 1) for k in keys]
    elif ":" in spec:
        module, name = spec.split(":", 1)
        fn = getattr(importlib.import_module(module), name)

        def reward(rec, ids):
            return list(fn(rec, decode(ids), ids))
    else:
        raise SystemExit(f"unknown reward {spec!r}: exact, contains, unique or module:function")
    return reward


def _need_text(texts):
    if texts is None:
        raise SystemExit("this reward needs a tokenizer (or token-id answers)")
    return texts


def _load_hf(path: str, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # a bare model directory: prompts must then be token ids
        tokenizer = None
    return model.to(device).eval(), tokenizer


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.model == "demo":
        given = [f"--{name.replace('_', '-')}" for name in HF_ONLY
                 if getattr(args, name) not in (None, False)]
        if given:
            parser.error(f"{', '.join(given)}: not used with --model demo (its task sets them)")
    if args.loss == "latent" and len(args.temperatures) > MAX_TEMPERATURE_LOGPROBS:
        parser.error(f"--loss latent supports at most {MAX_TEMPERATURE_LOGPROBS} temperatures")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    temperatures = args.temperatures
    eos: Any = args.eos_token_id if args.eos_token_id else "config"
    pad = None
    if args.model == "demo":
        from . import demo

        s = demo.QUICK
        task = demo.Task(s)
        torch.manual_seed(args.seed)
        model = demo.build_lm(task, s, device)
        print(f"[lpo] pre-training the demo's tiny Llama ({s.lm_steps} steps) ...")
        demo.train_lm(model, task, s, args.seed, progress=not args.no_progress)
        g = torch.Generator().manual_seed(10_000 + args.seed)
        train = task.prompts(s.train_prompts, g)
        evals = task.prompts(s.eval_prompts, g)
        reward = task.reward
        eos, pad = demo.EOS, demo.PAD
        defaults = dict(max_new_tokens=4, num_samples=s.num_samples, mlp_hidden=s.head_hidden)
    else:
        if not args.prompts:
            raise SystemExit("--prompts is required with a Hugging Face model")
        model, tokenizer = _load_hf(args.model, device, dtype)
        train = _tokenize(read_jsonl(args.prompts), tokenizer, args.chat)
        evals = _tokenize(read_jsonl(args.eval_prompts), tokenizer, args.chat) if args.eval_prompts else None
        reward = make_reward(args.reward or "exact", tokenizer)
        if tokenizer is not None and tokenizer.pad_token_id is not None:
            pad = tokenizer.pad_token_id
        defaults = dict(max_new_tokens=256, num_samples=16, mlp_hidden=2048)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    hidden = model.get_output_embeddings().weight.shape[1]
    head = AdaptiveDecoder(hidden, temperatures, level=args.level, mlp_hidden=args.mlp_hidden,
                           num_layers=args.num_layers)
    cfg = LPOConfig(loss=args.loss, beta=args.beta, num_samples=args.num_samples,
                    max_new_tokens=args.max_new_tokens, rounds=args.rounds, epochs=args.epochs,
                    batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                    gen_batch_size=args.gen_batch_size, eos_token_id=eos, pad_token_id=pad,
                    seed=args.seed, checkpoint_dir=args.out,
                    checkpoint_every=args.checkpoint_every, progress=not args.no_progress)
    trainer = LPOTrainer(model, head, reward, cfg)
    ckpt = os.path.join(args.out, "lpo_checkpoint.pt")
    if args.resume and os.path.exists(ckpt):
        trainer.load_checkpoint(ckpt)
        print(f"[lpo] resumed from {ckpt} (round {trainer.round}, step {trainer.step})")

    def evaluate(tag):
        if not evals:
            return {}
        r = evaluate_rewards(model, head.eval(), evals, reward, num_samples=cfg.num_samples,
                             max_new_tokens=cfg.max_new_tokens, eos_token_id=eos,
                             pad_token_id=pad, gen_batch_size=cfg.gen_batch_size, seed=args.seed)
        head.train()
        print(f"[lpo] {tag}: eval reward {r['reward']:.4f}, mean τ {float(r['mean_tau'].mean()):.3f}")
        return {"eval_reward": r["reward"]}

    print(f"[lpo] {len(train)} prompts, N={cfg.num_samples}, level {args.level}, loss {args.loss}, "
          f"temperatures {temperatures}, device {device}")
    evaluate("before")
    t0 = time.time()
    history = trainer.fit(train, eval_fn=lambda tr: evaluate(f"after round {tr.round}"))
    for h in history:
        print("[lpo] " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in h.items()))
    path = trainer.save_checkpoint()
    print(f"[lpo] done in {time.time() - t0:.1f}s: head {os.path.join(args.out, 'head.pt')}, "
          f"checkpoint {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
