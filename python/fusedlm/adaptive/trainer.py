"""LPO training loop: preference-pair generation with head-sampled temperatures, a reward
callable, and AdamW on the head only (the LM is frozen)."""
from __future__ import annotations

import contextlib
import copy
import math
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..sampling import MAX_TEMPERATURE_LOGPROBS
from .generation import generate, left_pad
from .head import AdaptiveDecoder
from .lpo import FORMS, check_beta, lpo_loss

__all__ = ["LPOConfig", "LPOTrainer", "PreferencePairs", "evaluate_rewards", "prompt_ids"]

RewardFn = Callable[[Any, List[List[int]]], Sequence[float]]


def prompt_ids(prompt: Any) -> List[int]:
    """Token ids of a prompt given as a list of ints or a dict with ``"input_ids"``."""
    if isinstance(prompt, dict):
        prompt = prompt["input_ids"]
    if isinstance(prompt, Tensor):
        prompt = prompt.tolist()
    return [int(t) for t in prompt]


def _mix_seed(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2))) & (2**62 - 1)
    return h


@dataclass
class LPOConfig:
    """Hyper-parameters of :class:`LPOTrainer`. The paper reports N=16 samples per prompt
    and one pair (best vs worst reward) per prompt; it does not report beta, the learning
    rate, batch size or epochs (the defaults here are ours)."""

    loss: str = "separate"          # "separate" (Eq. 10), "latent" (Eq. 11) or "nll"
    beta: float = 1.0
    num_samples: int = 16           # N responses per prompt
    max_new_tokens: int = 64
    rounds: int = 1                 # >1: regenerate pairs with the updated head (on-policy)
    epochs: int = 4                 # passes over each round's pairs
    batch_size: int = 32            # pairs per optimizer step
    lr: float = 1e-3
    weight_decay: float = 0.0
    gen_batch_size: int = 256       # rows (prompts x samples) per generate() call
    length_normalize: bool = False
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    eos_token_id: Any = "config"
    pad_token_id: Optional[int] = None
    seed: int = 0
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 0       # optimizer steps; 0 = only at the end of each round
    progress: bool = True

    def __post_init__(self):
        if self.loss not in FORMS:
            raise ValueError(f"loss must be one of {FORMS}, got {self.loss!r}")
        if self.num_samples < 2:
            raise ValueError("num_samples must be >= 2 (a pair needs two responses)")
        check_beta(self.beta)
        for name in ("max_new_tokens", "rounds", "epochs", "batch_size", "gen_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.loss == "latent" and (self.top_k, self.top_p, self.min_p) != (None, None, None):
            # Eq. 11 marginalises log p(y_t | tau_k) of the full tempered softmax
            # (fusedlm.temperature_logprobs); with truncation the replies came from another
            # distribution.
            raise ValueError("loss='latent' needs untruncated sampling: top_k, top_p and min_p "
                             "must be None")


@dataclass
class PreferencePairs:
    """One (chosen, rejected) pair per prompt whose N rewards were not all equal.

    ``chosen``/``rejected`` hold ``hidden_states`` ``[P, n, D]`` (``n = 1`` at sequence
    level), ``response_mask``/``tau_index`` ``[P, n_tok]`` and, for the latent loss,
    ``temperature_logprobs`` ``[P, n_tok, K]``."""

    chosen: Dict[str, Tensor]
    rejected: Dict[str, Tensor]
    prompt_index: Tensor
    chosen_reward: Tensor
    rejected_reward: Tensor
    stats: Dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.prompt_index.numel())

    def select(self, idx: Tensor) -> "PreferencePairs":
        return PreferencePairs({k: v[idx] for k, v in self.chosen.items()},
                               {k: v[idx] for k, v in self.rejected.items()},
                               self.prompt_index[idx], self.chosen_reward[idx],
                               self.rejected_reward[idx], dict(self.stats))


def _pad_to(x: Tensor, n: int, value=0) -> Tensor:
    if x.shape[1] == n:
        return x
    pad = x.new_full((x.shape[0], n - x.shape[1]) + tuple(x.shape[2:]), value)
    return torch.cat([x, pad], 1)


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model):
    """``model`` in eval mode (no dropout) while replies are generated; each module's own
    flag is restored after, so a caller's model in training mode stays so."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _rollouts(model, head, prompts, num_samples, *, level, tau_mode, temperature, seed,
              gen_batch_size, max_new_tokens, eos_token_id, pad_token_id, top_k=None,
              top_p=None, min_p=None, outputs=False, latent=False, progress=False, desc=""):
    """Generate ``num_samples`` replies for every prompt, in chunks of whole prompts.
    Yields ``(prompt_indices, generation)`` with rows ordered prompt-major."""
    device = _device_of(model)
    per_call = max(1, gen_batch_size // num_samples)
    pad = 0 if pad_token_id is None else pad_token_id
    chunks = range(0, len(prompts), per_call)
    for c, start in enumerate(tqdm(chunks, desc=desc, leave=False, disable=not progress)):
        idx = list(range(start, min(start + per_call, len(prompts))))
        rows = [prompt_ids(prompts[i]) for i in idx for _ in range(num_samples)]
        ids, mask = left_pad(rows, pad, device)
        with _eval_mode(model):
            gen = generate(model, head, ids, mask, max_new_tokens=max_new_tokens,
                           eos_token_id=eos_token_id, pad_token_id=pad_token_id, level=level,
                           tau_mode=tau_mode, temperature=temperature, top_k=top_k,
                           top_p=top_p, min_p=min_p, seed=_mix_seed(seed, c),
                           output_hidden_states=outputs, output_temperature_logprobs=latent)
        yield idx, gen


@torch.no_grad()
def evaluate_rewards(model, head: Optional[AdaptiveDecoder], prompts: Sequence[Any],
                     reward_fn: RewardFn, *, num_samples: int = 8,
                     temperature: Optional[float] = None, level: Optional[str] = None,
                     tau_mode: str = "argmax", max_new_tokens: int = 64,
                     eos_token_id: Any = "config", pad_token_id: Optional[int] = None,
                     gen_batch_size: int = 256, seed: int = 0, progress: bool = False,
                     **sample_kw) -> Dict[str, Any]:
    """Mean reward of ``num_samples`` replies per prompt, decoded with the head (``tau_mode``)
    or a fixed ``temperature``. Returns ``{"reward": float, "per_prompt": [P] tensor,
    "mean_tau": [P] tensor, "tau_by_position": [P, max_new_tokens]}`` (mean tau over each
    prompt's generated tokens, and per reply position; NaN where no reply reached it)."""
    per_prompt = torch.zeros(len(prompts))
    mean_tau = torch.zeros(len(prompts))
    tau_pos = torch.full((len(prompts), max_new_tokens), float("nan"))
    for idx, gen in _rollouts(model, head, prompts, num_samples, level=level, tau_mode=tau_mode,
                              temperature=temperature, seed=seed, gen_batch_size=gen_batch_size,
                              max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                              pad_token_id=pad_token_id, progress=progress, desc="eval",
                              **sample_kw):
        responses = gen.responses()
        m = gen.response_mask.float()
        taus = ((gen.temperatures * m).sum(-1) / m.sum(-1).clamp(min=1)).cpu()
        n = gen.tokens.shape[1]
        pos_sum = (gen.temperatures * m).view(len(idx), num_samples, n).sum(1).cpu()
        pos_cnt = m.view(len(idx), num_samples, n).sum(1).cpu()
        for j, i in enumerate(idx):
            r = reward_fn(prompts[i], responses[j * num_samples:(j + 1) * num_samples])
            per_prompt[i] = float(torch.as_tensor(list(r), dtype=torch.float64).mean())
            mean_tau[i] = float(taus[j * num_samples:(j + 1) * num_samples].mean())
            tau_pos[i, :n] = torch.where(pos_cnt[j] > 0, pos_sum[j] / pos_cnt[j].clamp(min=1),
                                         torch.full_like(pos_sum[j], float("nan")))
    return {"reward": float(per_prompt.mean()), "per_prompt": per_prompt, "mean_tau": mean_tau,
            "tau_by_position": tau_pos}


class LPOTrainer:
    """Train an :class:`AdaptiveDecoder` with LPO on a frozen causal LM.

    ``reward_fn(prompt, responses) -> N floats`` scores the ``N = num_samples`` replies of one
    prompt (``prompt`` is the object from ``prompts``: a list of token ids or a dict with
    ``"input_ids"`` and any metadata; ``responses`` are token-id lists without EOS/padding).
    Scoring a whole group lets a reward depend on the other replies (e.g. diversity).

        trainer = LPOTrainer(model, head, reward_fn, LPOConfig(num_samples=16))
        history = trainer.fit(train_prompts)
    """

    def __init__(self, model, head: AdaptiveDecoder, reward_fn: RewardFn,
                 config: Optional[LPOConfig] = None):
        self.model = model
        self.head = head
        self.reward_fn = reward_fn
        self.config = config or LPOConfig()
        if self.config.loss == "latent" and head.num_temperatures > MAX_TEMPERATURE_LOGPROBS:
            # (fusedlm.temperature_logprobs takes at most 16: fail here, not after the first generation)
            raise ValueError(f"loss='latent' supports at most {MAX_TEMPERATURE_LOGPROBS} temperatures, "
                             f"the head has {head.num_temperatures}")
        # (The LM is left as it is: replies are generated without gradients and in eval mode,
        # and the losses detach its hidden states, so only the head trains.)
        self.device = _device_of(model)
        head.to(self.device)
        # Reference of the latent loss: the head as it was before training (uniform when
        # zero-initialised), frozen.
        self.ref_head = copy.deepcopy(head).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(head.parameters(), lr=self.config.lr,
                                           weight_decay=self.config.weight_decay)
        self.step = 0
        self.round = 0
        self._round_step = 0  # optimizer steps taken in the current round
        self._round_start_head: Optional[Dict[str, Tensor]] = None
        self.history: List[Dict[str, float]] = []

    # --------------------------------------------------------------- data
    @torch.no_grad()
    def build_pairs(self, prompts: Sequence[Any], seed: Optional[int] = None) -> PreferencePairs:
        """N replies per prompt with head-sampled temperatures (Eq. 5), scored by the reward;
        best = chosen, worst = rejected (random among ties); prompts whose N rewards are all
        equal give no pair."""
        cfg = self.config
        seed = _mix_seed(cfg.seed, self.round) if seed is None else seed
        rng = random.Random(seed)
        level = self.head.level
        latent = cfg.loss == "latent"
        was_training = self.head.training
        self.head.eval()
        sides = {"chosen": [], "rejected": []}
        kept, rc, rr, all_rewards = [], [], [], []
        n_tok = cfg.max_new_tokens
        for idx, gen in _rollouts(self.model, self.head, prompts, cfg.num_samples, level=level,
                                  tau_mode="sample", temperature=None, seed=seed,
                                  gen_batch_size=cfg.gen_batch_size,
                                  max_new_tokens=cfg.max_new_tokens,
                                  eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                                  top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p,
                                  outputs=True, latent=latent, progress=cfg.progress,
                                  desc=f"LPO pairs (round {self.round})"):
            responses = gen.responses()
            rows_c, rows_r = [], []
            for j, i in enumerate(idx):
                lo = j * cfg.num_samples
                rewards = [float(r) for r in self.reward_fn(prompts[i],
                                                            responses[lo:lo + cfg.num_samples])]
                if len(rewards) != cfg.num_samples:
                    raise ValueError(f"reward_fn returned {len(rewards)} rewards for "
                                     f"{cfg.num_samples} responses")
                if any(math.isnan(r) for r in rewards):
                    raise ValueError(f"reward_fn returned NaN for prompt {i}: {rewards}")
                all_rewards.extend(rewards)
                best, worst = max(rewards), min(rewards)
                if best == worst:
                    continue
                c = rng.choice([k for k, r in enumerate(rewards) if r == best])
                r_ = rng.choice([k for k, r in enumerate(rewards) if r == worst])
                rows_c.append(lo + c)
                rows_r.append(lo + r_)
                kept.append(i)
                rc.append(best)
                rr.append(worst)
            for name, rows in (("chosen", rows_c), ("rejected", rows_r)):
                if not rows:
                    continue
                rows_t = torch.tensor(rows, device=gen.tokens.device)
                hidden = gen.hidden_states[rows_t]
                side = {
                    "hidden_states": _pad_to(hidden[:, :1] if level == "sequence" else hidden,
                                             1 if level == "sequence" else n_tok),
                    "response_mask": _pad_to(gen.response_mask[rows_t], n_tok, False),
                    "tau_index": _pad_to(gen.tau_index[rows_t], n_tok, 0),
                    "tokens": _pad_to(gen.tokens[rows_t], n_tok, 0),
                }
                if latent:
                    side["temperature_logprobs"] = _pad_to(gen.temperature_logprobs[rows_t], n_tok, 0.0)
                sides[name].append(side)
        self.head.train(was_training)
        if not kept:
            empty = {}
            return PreferencePairs(empty, empty, torch.zeros(0, dtype=torch.long),
                                   torch.zeros(0), torch.zeros(0),
                                   {"pairs": 0, "sample_reward": _mean(all_rewards)})
        cat = {name: {k: torch.cat([s[k] for s in parts]) for k in parts[0]}
               for name, parts in sides.items()}
        pairs = PreferencePairs(cat["chosen"], cat["rejected"], torch.tensor(kept),
                                torch.tensor(rc), torch.tensor(rr),
                                {"pairs": len(kept), "prompts": len(prompts),
                                 "sample_reward": _mean(all_rewards)})
        if latent:  # reference log-likelihoods, computed once
            with torch.no_grad():
                from .lpo import latent_sequence_logprob
                for side in (pairs.chosen, pairs.rejected):
                    side["ref_logp"] = latent_sequence_logprob(
                        self.ref_head, side["hidden_states"], side["temperature_logprobs"],
                        side["response_mask"].bool(), level, cfg.length_normalize)
        return pairs

    # --------------------------------------------------------------- optimisation
    def train_on_pairs(self, pairs: PreferencePairs, epochs: Optional[int] = None) -> List[float]:
        cfg = self.config
        epochs = cfg.epochs if epochs is None else epochs
        losses: List[float] = []
        if len(pairs) == 0:
            return losses
        g = torch.Generator().manual_seed(_mix_seed(cfg.seed, self.round, 1))
        n_batches = math.ceil(len(pairs) / cfg.batch_size)
        self.head.train()
        bar = tqdm(total=epochs * n_batches, desc=f"LPO train (round {self.round})", leave=False,
                   disable=not cfg.progress)
        done = self._round_step  # steps of this round already taken (resumed mid-round)
        bar.update(done)
        self._round_step = 0
        for _ in range(epochs):
            perm = torch.randperm(len(pairs), generator=g)
            for b in range(n_batches):
                if self._round_step < done:  # (the same batches as before the interruption)
                    self._round_step += 1
                    continue
                batch = pairs.select(perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                                     .to(pairs.prompt_index.device))
                ref = None
                if cfg.loss == "latent":
                    ref = (batch.chosen["ref_logp"], batch.rejected["ref_logp"])
                loss, stats = lpo_loss(self.head, batch.chosen, batch.rejected, form=cfg.loss,
                                       beta=cfg.beta, reference=ref,
                                       length_normalize=cfg.length_normalize, return_stats=True)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.step += 1
                self._round_step += 1
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", acc=f"{stats['accuracy']:.2f}")
                if cfg.checkpoint_dir and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        bar.close()
        self._round_step = 0
        return losses

    def fit(self, prompts: Sequence[Any], eval_fn: Optional[Callable[["LPOTrainer"], Dict]] = None
            ) -> List[Dict[str, float]]:
        """``rounds`` x (build pairs with the current head, train ``epochs`` on them).
        ``eval_fn(trainer)`` (optional) is called after every round; its dict is logged."""
        cfg = self.config
        start = self.round
        for _ in range(start, cfg.rounds):
            if self._round_step == 0:
                self._round_start_head = _cpu_state(self.head)
                pairs = self.build_pairs(prompts)
            else:  # resumed mid-round: the round's pairs again, from the head it started with
                trained = _cpu_state(self.head)
                self.head.load_state_dict(self._round_start_head)
                pairs = self.build_pairs(prompts)
                self.head.load_state_dict(trained)
            losses = self.train_on_pairs(pairs)
            entry = {"round": self.round, "step": self.step, **pairs.stats,
                     "loss_first": losses[0] if losses else float("nan"),
                     "loss_last": losses[-1] if losses else float("nan")}
            self.round += 1
            if eval_fn is not None:
                entry.update(eval_fn(self))
            self.history.append(entry)
            if cfg.checkpoint_dir:
                self.save_checkpoint()
        return self.history

    # --------------------------------------------------------------- checkpoints
    def save_checkpoint(self, path: Optional[str] = None) -> str:
        if path is None and not self.config.checkpoint_dir:
            raise ValueError("save_checkpoint: pass a path or set LPOConfig.checkpoint_dir")
        path = path or os.path.join(self.config.checkpoint_dir, "lpo_checkpoint.pt")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        # Mid-round, the round's first head and the steps taken let a resume rebuild the same
        # pairs and skip the batches already trained.
        mid_round = self._round_step > 0 and self._round_start_head is not None
        torch.save({"head_config": self.head.config(),
                    "head": _cpu_state(self.head),
                    "ref_head": _cpu_state(self.ref_head),
                    "round_start_head": self._round_start_head if mid_round else None,
                    "round_step": self._round_step if mid_round else 0,
                    "optimizer": self.optimizer.state_dict(), "step": self.step,
                    "round": self.round, "history": self.history,
                    "config": {k: v for k, v in asdict(self.config).items()
                               if isinstance(v, (int, float, str, bool, type(None)))}}, path)
        self.head.save(os.path.join(os.path.dirname(path) or ".", "head.pt"))
        return path

    def load_checkpoint(self, path: str) -> None:
        blob = torch.load(path, map_location="cpu", weights_only=False)
        saved, current = blob.get("head_config"), self.head.config()
        # (zero_init only decides the initial weights, which the checkpoint replaces)
        diff = {k: (saved.get(k), current.get(k)) for k in sorted(set(saved or {}) | set(current))
                if k != "zero_init" and saved is not None and saved.get(k) != current.get(k)}
        if diff:
            raise ValueError(f"{path} holds a head of another configuration (saved, current): "
                             f"{diff}")
        self.head.load_state_dict(blob["head"])
        self.ref_head.load_state_dict(blob["ref_head"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.step, self.round = int(blob["step"]), int(blob["round"])
        self._round_step = int(blob.get("round_step") or 0)
        self._round_start_head = blob.get("round_start_head")
        self.history = list(blob.get("history", []))


def _cpu_state(module: torch.nn.Module) -> Dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _mean(values) -> float:
    return float(sum(values) / len(values)) if values else float("nan")
