"""Latent Preference Optimization losses (Dhuliawala et al., 2024, §3.3).

Notation: for a reply ``y`` generated with temperatures ``tau_t`` from hidden states
``h_t`` (``t`` over the reply's tokens, EOS included), ``P(tau | h)`` is the head and
``p_k(y_t) = softmax(W h_t / tau_k)[y_t]`` the frozen LM.

* ``form="separate"`` (Eq. 10, the paper's default, "temperatures as separate tokens"):
  ``L = -log sigmoid(beta * (log P(tau^c) - log P(tau^r)))`` with
  ``log P(tau) = sum_t log P(tau_t | h_t)`` at token level and ``log P(tau | h_T)`` at
  sequence level. No reference model.
* ``form="latent"`` (Eq. 11, "temperatures as latents"): DPO on the reply's likelihood with
  tau marginalised, ``log P'(y) = sum_t log sum_k P(tau_k | h_t) p_k(y_t)`` (token level),
  against the same quantity under a reference head (default: the uniform head, i.e. the
  frozen LM with the untrained head):
  ``L = -log sigmoid(beta * [(log P'(y^c) - log P'_ref(y^c)) - (log P'(y^r) - log P'_ref(y^r))])``.
  At sequence level one tau is shared by the whole reply, so the marginal is
  ``log sum_k P(tau_k | h_T) prod_t p_k(y_t)`` (the paper writes Eq. 11 per token; for a
  single shared tau this is the exact latent-variable likelihood).
* ``form="nll"``: ``-log P(tau^c)`` only (the paper's L_NLL ablation, Table 4).

Gradients flow only into the head: the ``[.., K]`` table ``log p_k(y_t)`` comes from the
frozen LM (``fusedlm.temperature_logprobs``) and needs none.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import is_real_number
from .head import AdaptiveDecoder, check_level

__all__ = ["lpo_loss", "dpo_loss", "tau_sequence_logprob", "latent_sequence_logprob", "FORMS"]

FORMS = ("separate", "latent", "nll")


def _get(side: Any, name: str, required: bool = True):
    value = side.get(name) if isinstance(side, Mapping) else getattr(side, name, None)
    if value is None and required:
        raise ValueError(f"LPO input is missing {name!r}")
    return value


def check_beta(beta) -> float:
    """DPO's beta must be finite and > 0: 0 gives a constant loss (log 2, no gradient) and a
    negative beta reverses the preference, both without an error otherwise."""
    if not is_real_number(beta) or not 0 < float(beta) < math.inf:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    return float(beta)


def _check_pairs(head, form, chosen, rejected, reference) -> None:
    """Row counts and shapes that would otherwise broadcast into a wrong loss."""
    pairs = None
    for side_name, side in (("chosen", chosen), ("rejected", rejected)):
        hidden, mask = _get(side, "hidden_states"), _get(side, "response_mask")
        if hidden.dim() != 3 or mask.dim() != 2 or mask.shape[0] != hidden.shape[0]:
            raise ValueError(f"{side_name}: hidden_states must be [P, n, D] and response_mask [P, n_tok] "
                             f"with the same P, got {tuple(hidden.shape)} and {tuple(mask.shape)}")
        if pairs is None:
            pairs = hidden.shape[0]
        elif hidden.shape[0] != pairs:
            raise ValueError(f"chosen has {pairs} rows but rejected has {hidden.shape[0]}: one row per pair")
        if form == "latent":
            name, want = "temperature_logprobs", tuple(mask.shape) + (head.num_temperatures,)
        else:
            name, want = "tau_index", tuple(mask.shape)
        got = tuple(_get(side, name).shape)
        if got != want:
            raise ValueError(f"{side_name}: {name} must have shape {want}, got {got}")
    if pairs == 0:
        raise ValueError("no preference pairs (P = 0): the mean loss would be NaN")
    if isinstance(reference, tuple):
        if len(reference) != 2 or any(not isinstance(r, Tensor) or r.shape != (pairs,) for r in reference):
            raise ValueError(f"reference must be a head or two [P] = [{pairs}] tensors (chosen, rejected)")


def _head_logp(head: Optional[AdaptiveDecoder], hidden: Tensor, k: int) -> Tensor:
    if head is None:  # uniform reference
        return torch.full(hidden.shape[:-1] + (k,), -math.log(k), device=hidden.device)
    return head.log_probs(hidden)


def tau_sequence_logprob(head: AdaptiveDecoder, hidden: Tensor, tau_index: Tensor,
                         response_mask: Tensor, level: Optional[str] = None,
                         length_normalize: bool = False) -> Tensor:
    """``log P(tau | h)`` of the temperatures a reply was generated with, shape ``[B]``.

    ``hidden`` ``[B, n, D]`` (sequence level reads ``hidden[:, 0]``, the last prompt token),
    ``tau_index`` ``[B, n]`` indices into ``head.temperatures``, ``response_mask`` ``[B, n]``.
    """
    level = check_level(level or head.level)
    # An index < 0 marks a step without a head temperature (after EOS, or a fixed-temperature
    # generation): inside the reply it would be read as index 0. (A host sync.)
    if bool(((tau_index < 0) & response_mask.bool()).any()):
        raise ValueError("tau_index is -1 inside the response: these replies were not generated "
                         "with the head's temperatures (e.g. a fixed temperature)")
    if level == "sequence":
        logp = head.log_probs(hidden[:, 0])
        return logp.gather(-1, tau_index[:, :1].clamp(min=0))[:, 0]
    logp = head.log_probs(hidden).gather(-1, tau_index.clamp(min=0)[..., None])[..., 0]
    mask = response_mask.bool()
    total = torch.where(mask, logp, torch.zeros_like(logp)).sum(-1)  # (not * mask: inf * 0 = NaN)
    return total / mask.sum(-1).clamp(min=1) if length_normalize else total


def latent_sequence_logprob(head: Optional[AdaptiveDecoder], hidden: Tensor,
                            temperature_logprobs: Tensor, response_mask: Tensor,
                            level: str = "token", length_normalize: bool = False) -> Tensor:
    """``log P'(y)`` with tau marginalised, shape ``[B]``. ``temperature_logprobs`` is the
    ``[B, n, K]`` table ``log p_k(y_t)`` (see :func:`fusedlm.temperature_logprobs`);
    ``head=None`` is the uniform head (the latent loss's default reference)."""
    check_level(level)
    k = temperature_logprobs.shape[-1]
    mask = response_mask.to(torch.float32)
    tlp = temperature_logprobs.float()
    # Masked positions contribute 0 (not -inf * 0 = NaN).
    tlp = torch.where(response_mask[..., None], tlp, torch.zeros_like(tlp))
    if level == "sequence":
        logp = _head_logp(head, hidden[:, 0], k).float()
        total = torch.logsumexp(logp + tlp.sum(1), dim=-1)
    else:
        logp = _head_logp(head, hidden, k).float()
        per_token = torch.logsumexp(logp + tlp, dim=-1)
        total = (torch.where(response_mask, per_token, torch.zeros_like(per_token))).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if length_normalize else total


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Optional[Tensor] = None,
             ref_rejected: Optional[Tensor] = None, beta: float = 1.0,
             reduction: str = "mean") -> Tensor:
    """``-log sigmoid(beta * [(pc - rc) - (pr - rr)])`` (references default to 0)."""
    beta = check_beta(beta)
    if (ref_chosen is None) != (ref_rejected is None):
        raise ValueError("dpo_loss: pass both references or neither")
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
              if t is not None}
    if len(shapes) > 1:  # (they would broadcast)
        raise ValueError(f"dpo_loss: the log-likelihoods must share one shape (one entry per pair), "
                         f"got {sorted(shapes)}")
    margin = policy_chosen - policy_rejected
    if ref_chosen is not None:
        margin = margin - (ref_chosen - ref_rejected)
    losses = -F.logsigmoid(beta * margin)
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    if reduction == "none":
        return losses
    raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")


def lpo_loss(head: AdaptiveDecoder, chosen, rejected, *, form: str = "separate",
             beta: float = 1.0, reference: Union[None, AdaptiveDecoder, Tuple[Tensor, Tensor]] = None,
             level: Optional[str] = None, length_normalize: bool = False,
             reduction: str = "mean", return_stats: bool = False):
    """LPO loss for a batch of preference pairs.

    Args:
        head: the :class:`AdaptiveDecoder` being trained.
        chosen, rejected: objects or dicts with ``hidden_states`` ``[P, n, D]`` (``n`` may be
            1 at sequence level), ``response_mask`` ``[P, n]``, ``tau_index`` ``[P, n]``
            (``separate``/``nll``) and ``temperature_logprobs`` ``[P, n, K]`` (``latent``), e.g.
            two :class:`AdaptiveGeneration` outputs row-aligned, or :class:`PreferencePairs` sides.
        form: ``"separate"`` (Eq. 10), ``"latent"`` (Eq. 11) or ``"nll"`` (ablation).
        beta: DPO's beta.
        reference: latent form only: None (uniform head), a frozen head, or precomputed
            ``(ref_chosen [P], ref_rejected [P])`` log-likelihoods.
        level: ``"token"``/``"sequence"``; default ``head.level``.
        length_normalize: divide the summed token-level log-probs by the reply length (the
            paper sums; off by default).
        return_stats: also return ``{"margin": [P], "accuracy": float}`` (margin > 0 rate).
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    check_beta(beta)
    level = check_level(level or head.level)
    _check_pairs(head, form, chosen, rejected, reference)
    # (detached: only the head trains, also when the hidden states carry the LM's graph)
    hc, hr = _get(chosen, "hidden_states").detach(), _get(rejected, "hidden_states").detach()
    mc, mr = _get(chosen, "response_mask").bool(), _get(rejected, "response_mask").bool()
    if form in ("separate", "nll"):
        pc = tau_sequence_logprob(head, hc, _get(chosen, "tau_index"), mc, level, length_normalize)
        if form == "nll":
            loss = -pc
            loss = loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss
            return (loss, {"margin": pc.detach(), "accuracy": float("nan")}) if return_stats else loss
        pr = tau_sequence_logprob(head, hr, _get(rejected, "tau_index"), mr, level, length_normalize)
        rc = rr = None
    else:
        tc, tr = _get(chosen, "temperature_logprobs"), _get(rejected, "temperature_logprobs")
        pc = latent_sequence_logprob(head, hc, tc, mc, level, length_normalize)
        pr = latent_sequence_logprob(head, hr, tr, mr, level, length_normalize)
        if isinstance(reference, tuple):
            rc, rr = reference
        else:
            with torch.no_grad():
                rc = latent_sequence_logprob(reference, hc, tc, mc, level, length_normalize)
                rr = latent_sequence_logprob(reference, hr, tr, mr, level, length_normalize)
    loss = dpo_loss(pc, pr, rc, rr, beta=beta, reduction=reduction)
    if not return_stats:
        return loss
    margin = (pc - pr) if rc is None else (pc - rc) - (pr - rr)
    margin = margin.detach()
    return loss, {"margin": margin, "accuracy": float((margin > 0).float().mean())}
