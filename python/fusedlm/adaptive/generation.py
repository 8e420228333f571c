"""Batched adaptive-temperature decoding for Hugging Face causal LMs.

The loop keeps everything on the device: the head picks a temperature per row (a ``[B]``
tensor), ``fusedlm.sample`` draws the token with that per-row temperature (0 = exact
argmax), and per-row Philox seeds + the step index as offset make every draw reproducible.
The only host synchronisation is the early-stop test ``finished.all()``, evaluated once
every ``eos_check_every`` steps (and never when ``eos_token_id`` is None); between checks,
finished rows keep being fed ``pad_token_id`` (their outputs are masked), as in HF.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

import fusedlm
from fusedlm.sampling import _check_integer_tensor

from .head import AdaptiveDecoder, TAU_MODES, check_level

__all__ = ["generate", "AdaptiveGeneration", "left_pad"]

_SEED_MIX = 0x5851F42D4C957F2D
_SEED_MASK = 2**62 - 1


@dataclass
class AdaptiveGeneration:
    """Output of :func:`generate` (``B`` rows, ``n`` generated steps, ``K`` temperatures).

    ``tokens[b, t]`` was sampled from ``softmax(W h / temperatures[b, t])`` where ``h =
    hidden_states[b, t]`` (the LM's last hidden state before step ``t``; ``t = 0`` is the
    last prompt token). After a row's EOS, ``tokens`` holds ``pad_token_id`` and
    ``response_mask`` is False (the EOS itself is kept and masked True).
    """

    sequences: Tensor            # [B, T + n] prompt (left padded) + generated tokens
    tokens: Tensor               # [B, n] int64 generated tokens
    response_mask: Tensor        # [B, n] bool, True up to and including EOS
    tau_index: Tensor            # [B, n] int64 index into temperatures (-1: fixed tau / after EOS)
    temperatures: Tensor         # [B, n] float32 temperature used per token (0 after EOS)
    tau_logprob: Optional[Tensor]  # [B, n] log P(tau | h) of the head at generation time
    logprobs: Tensor             # [B, n] log p(token) under the tempered distribution
    raw_logprobs: Tensor         # [B, n] log p(token) under softmax(logits)
    lengths: Tensor              # [B] number of generated tokens (incl. EOS)
    finished: Tensor             # [B] bool, row emitted EOS
    hidden_states: Optional[Tensor] = None         # [B, n, D] (output_hidden_states=True)
    temperature_logprobs: Optional[Tensor] = None  # [B, n, K] log p(token | tau_k)
    attention_mask: Optional[Tensor] = None        # [B, T + n]

    def responses(self) -> List[List[int]]:
        """Generated token ids per row, without the EOS and the padding."""
        out = []
        toks, finished, lengths = self.tokens.tolist(), self.finished.tolist(), self.lengths.tolist()
        for row, fin, n in zip(toks, finished, lengths):
            out.append(row[: n - 1] if fin else row[:n])
        return out


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, device=None):
    """Left-pad token-id lists into ``(input_ids, attention_mask)``."""
    if len(prompts) == 0:
        raise ValueError("no prompts")
    width = max(len(p) for p in prompts)
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:  # (its row would be generated from a fully masked context)
        raise ValueError(f"empty prompt at index {empty[0]}")
    ids = torch.full((len(prompts), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _config_token(model, name: str):
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(cfg, name, None) if cfg is not None else None
        if value is not None:
            return value
    return None


# Philox offsets of the temperature draws (token draws use offset = step < 2^62).
_TAU_STREAM = 2**62


def _row_seeds(seed, batch: int, device) -> Tensor:
    if seed is None:
        return torch.randint(0, 2**62, (batch,), device=device)
    if isinstance(seed, Tensor):
        if seed.shape != (batch,):
            raise ValueError(f"seed tensor must have shape ({batch},), got {tuple(seed.shape)}")
        _check_integer_tensor(seed, "seed")  # (torch.rand seeds cast to int64 would all be 0)
        return seed.to(device=device, dtype=torch.int64)
    rows = torch.arange(batch, device=device, dtype=torch.int64)
    return (rows * _SEED_MIX + int(seed) * 0x9E3779B97F4A7C15 % 2**62) & _SEED_MASK


@torch.no_grad()
def generate(
    model,
    head: Optional[AdaptiveDecoder],
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    *,
    max_new_tokens: int = 64,
    eos_token_id: Union[int, Sequence[int], None] = "config",
    pad_token_id: Optional[int] = None,
    level: Optional[str] = None,
    tau_mode: str = "argmax",
    temperature: Union[float, Tensor, None] = None,
    top_k=None,
    top_p=None,
    min_p=None,
    seed: Union[int, Tensor, None] = None,
    eos_check_every: int = 4,
    output_hidden_states: bool = False,
    output_temperature_logprobs: bool = False,
) -> AdaptiveGeneration:
    """Sample replies from a Hugging Face causal LM with per-row, per-step temperatures
    chosen by an :class:`AdaptiveDecoder` (or a fixed ``temperature`` baseline).

    Args:
        model: a causal LM returning ``logits``, ``hidden_states`` (``output_hidden_states``)
            and ``past_key_values`` (KV cache); ``hidden_states[-1]`` must be the vector its
            un-embedding reads (true for Llama and GPT-2: after the final norm).
        head: the adaptive head, or None with a fixed ``temperature``.
        input_ids: ``[B, T]`` prompts, **left** padded; ``attention_mask`` marks real tokens
            (default: all ones). Positions are ``cumsum(attention_mask) - 1``, as in HF.
        max_new_tokens: at most this many tokens per row.
        eos_token_id: int or list (stop tokens); default: from the model's generation config;
            None = never stop early.
        pad_token_id: written after EOS (default: the config's pad id, else the first EOS id,
            else 0).
        level: ``"token"``/``"sequence"``; default ``head.level``.
        tau_mode: ``"argmax"`` (inference, paper Eq. 4) or ``"sample"`` (LPO data, Eq. 5).
        temperature: a float or ``[B]`` tensor used instead of the head (fixed-tau baseline);
            with a head it overrides it too.
        top_k, top_p, min_p: passed to :func:`fusedlm.sample`.
        seed: int, int64 ``[B]`` tensor (per-row streams, independent of batch position) or
            None (drawn from torch's generator). The token at step ``t`` uses Philox
            ``(seed_b, offset=t)``; the head's tau draws (``tau_mode="sample"``) use the same
            row seeds at offset ``2^62 + t``, an independent stream.
        eos_check_every: steps between the (only) host syncs that test whether all rows hit EOS.
        output_hidden_states: also return the ``[B, n, D]`` hidden states the head read
            (needed by LPO to recompute ``log P(tau | h)`` with gradients).
        output_temperature_logprobs: also return ``[B, n, K]`` ``log p(token | tau_k)`` for all
            the head's temperatures (LPO's latent loss, Eq. 11), via
            :func:`fusedlm.temperature_logprobs`.
    """
    if head is None and temperature is None:
        raise ValueError("pass an AdaptiveDecoder head or a fixed temperature")
    level = level or (head.level if head is not None else "sequence")
    check_level(level)
    if tau_mode not in TAU_MODES:
        raise ValueError(f"tau_mode must be one of {TAU_MODES}, got {tau_mode!r}")
    if output_temperature_logprobs and head is None:
        raise ValueError("output_temperature_logprobs needs a head (its temperatures)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not isinstance(eos_check_every, int) or eos_check_every < 1:
        raise ValueError(f"eos_check_every must be an int >= 1, got {eos_check_every!r}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got {tuple(input_ids.shape)}")
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    # Generation appends after the last column: prompts must be left-padded and not empty.
    # (One host sync per call, before the decode loop.)
    if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any() | (attention_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be left-padded and non-empty: every row of attention_mask "
                         "must be 0 ... 0 1 ... 1 with a 1 in the last column (see left_pad)")

    if isinstance(eos_token_id, str):
        eos_token_id = _config_token(model, "eos_token_id")
    eos_ids = None
    if eos_token_id is not None:
        eos_list = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        eos_ids = torch.tensor(eos_list, dtype=torch.long, device=device)
    if pad_token_id is None:
        pad_token_id = _config_token(model, "pad_token_id")
        if pad_token_id is None:
            pad_token_id = int(eos_ids[0]) if eos_ids is not None else 0

    fixed_tau = None
    if temperature is not None:
        if isinstance(temperature, Tensor):
            fixed_tau = temperature.to(device=device, dtype=torch.float32).expand(batch).clone()
        else:
            if not float(temperature) >= 0:
                raise ValueError(f"temperature must be >= 0, got {temperature}")
            fixed_tau = torch.full((batch,), float(temperature), device=device)
    if head is not None:
        head_temps = head.temperatures.to(device)
    row_seeds = _row_seeds(seed, batch, device)

    full_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, max_new_tokens)], 1)
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill_(attention_mask == 0, 1)
    next_pos = position_ids[:, -1:] + 1
    kw = {}
    if _accepts(model, "logits_to_keep"):
        kw["logits_to_keep"] = 1
    # transformers >= 5.x renamed the KV-cache argument/output `past_key_values` -> `cache`.
    cache_name = "cache" if _accepts(model, "cache") else "past_key_values"

    tokens = torch.full((batch, max_new_tokens), int(pad_token_id), dtype=torch.long, device=device)
    mask = torch.zeros((batch, max_new_tokens), dtype=torch.bool, device=device)
    tau_idx = torch.full((batch, max_new_tokens), -1, dtype=torch.long, device=device)
    taus = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
    tau_lp = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
    lps = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
    raw_lps = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
    hiddens = None
    tlp = None
    if output_temperature_logprobs:
        tlp = torch.zeros((batch, max_new_tokens, head.num_temperatures), dtype=torch.float32,
                          device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)

    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, output_hidden_states=True, return_dict=True, **kw)
    seq_choice = None
    steps = 0
    for t in range(max_new_tokens):
        logits = out.logits[:, -1]
        if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            logits = logits.float()  # fusedlm reads fp32/bf16/fp16 logits as they are
        h = out.hidden_states[-1][:, -1]
        if output_hidden_states:
            if hiddens is None:
                hiddens = h.new_zeros((batch, max_new_tokens, h.shape[-1]))
            hiddens[:, t] = h
        if fixed_tau is not None:
            tau = fixed_tau
        elif level == "token" or seq_choice is None:
            # (sampled temperatures use the row's seed, on a stream apart from the tokens':
            # a row's draws do not depend on its batch position)
            idx, tau, lp_tau = head.select(h, tau_mode, seed=row_seeds.to(h.device),
                                           offset=_TAU_STREAM + t)
            idx, tau, lp_tau = idx.to(device), tau.to(device), lp_tau.to(device)
            seq_choice = (idx, tau, lp_tau)
        else:
            idx, tau, lp_tau = seq_choice
        if fixed_tau is None:
            tau_idx[:, t] = idx
            tau_lp[:, t] = lp_tau
        taus[:, t] = tau
        tok, lp, raw = fusedlm.sample(logits, tau, top_k=top_k, top_p=top_p, min_p=min_p,
                                      seed=row_seeds, offset=t, return_logprobs=True)
        alive = ~finished
        tok = torch.where(alive, tok, torch.full_like(tok, int(pad_token_id)))
        tokens[:, t] = tok
        mask[:, t] = alive
        lps[:, t] = torch.where(alive, lp, torch.zeros_like(lp))
        raw_lps[:, t] = torch.where(alive, raw, torch.zeros_like(raw))
        if tlp is not None:
            tlp_t = fusedlm.temperature_logprobs(logits, tok, head_temps)
            tlp[:, t] = torch.where(alive[:, None], tlp_t, torch.zeros_like(tlp_t))
        if eos_ids is not None:
            finished = finished | (alive & torch.isin(tok, eos_ids))
        steps = t + 1
        if t + 1 == max_new_tokens:
            break
        # The one host sync of the loop (see the module docstring).
        if eos_ids is not None and (t + 1) % eos_check_every == 0 and bool(finished.all()):
            break
        out = model(input_ids=tok[:, None], attention_mask=full_mask[:, : prompt_len + t + 1],
                    position_ids=next_pos + t, use_cache=True, output_hidden_states=True,
                    return_dict=True, **{cache_name: getattr(out, cache_name)})

    lengths = mask.sum(-1)
    dead = ~mask  # after EOS: no temperature was used
    tau_idx.masked_fill_(dead, -1)
    taus.masked_fill_(dead, 0.0)
    tau_lp.masked_fill_(dead, 0.0)
    n = max(1, int(lengths.max()))  # trim the steps after every row finished (outside the loop)
    n = min(n, steps)
    tokens = tokens[:, :n]
    return AdaptiveGeneration(
        sequences=torch.cat([input_ids, tokens], 1),
        tokens=tokens,
        response_mask=mask[:, :n],
        tau_index=tau_idx[:, :n],
        temperatures=taus[:, :n],
        tau_logprob=None if fixed_tau is not None else tau_lp[:, :n],
        logprobs=lps[:, :n],
        raw_logprobs=raw_lps[:, :n],
        lengths=lengths,
        finished=finished,
        hidden_states=None if hiddens is None else hiddens[:, :n],
        temperature_logprobs=None if tlp is None else tlp[:, :n],
        attention_mask=full_mask[:, : prompt_len + n],
    )
