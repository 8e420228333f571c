"""Attention-distillation losses (pure PyTorch, no compiled ops).

The loss of Li et al. (NeurIPS 2024) for one layer is the cross-entropy between the
teacher's and the student's attention distributions, both given as *pre-softmax, already
scaled* logits ``s = (q @ k^T) * scale``::

    CE = -sum_j softmax(t)_ij * log_softmax(s)_ij      # one value per (batch, head, query row)
    loss = mean over batch, heads and query rows        # one scalar per layer

All tokens take part (CLS and register tokens included, as rows and as columns). There is
no temperature. The gradient with respect to the student logits is ``(p_s - p_t) / R`` where
``R = B * H * N`` is the number of rows averaged over.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["attention_distill_loss", "attention_distill_loss_from_qk", "attention_logits"]


def _acc(t: Tensor) -> Tensor:
    """Upcast to float32 (float64 stays float64)."""
    return t if t.dtype == torch.float64 else t.float()


def attention_distill_loss(teacher_logits: Tensor, student_logits: Tensor,
                           teacher_group: int = 1) -> Tensor:
    """Cross-entropy between teacher and student attention maps, from pre-softmax logits.

    Args:
        teacher_logits: ``[B, H * teacher_group, N, M]`` scaled teacher logits. No gradient
            flows into them.
        student_logits: ``[B, H, N, M]`` scaled student logits.
        teacher_group: when the teacher has ``teacher_group`` times more heads than the
            student, student head ``h`` is matched to the *average of the probabilities* of
            teacher heads ``h * G ... h * G + G - 1``.

    Returns:
        A float32 scalar (float64 for float64 inputs):
        ``-(p_t * log_softmax(s)).sum(-1).mean()``.
    """
    if teacher_logits.dim() != 4 or student_logits.dim() != 4:
        raise ValueError("attention logits must be [batch, heads, queries, keys]")
    b, h, n, m = student_logits.shape
    if teacher_logits.shape != (b, h * teacher_group, n, m):
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} do not match student logits "
            f"{tuple(student_logits.shape)} with teacher_group={teacher_group}")
    with torch.no_grad():
        p_t = _acc(teacher_logits).softmax(dim=-1)
        if teacher_group > 1:
            p_t = p_t.unflatten(1, (h, teacher_group)).mean(dim=2)
    log_p_s = _acc(student_logits).log_softmax(dim=-1)
    return -(p_t * log_p_s).sum(dim=-1).mean()


def attention_logits(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Scaled attention logits ``(q * scale) @ k^T`` in float32 or float64 (autocast is
    switched off: the loss is sensitive to the precision of the logits)."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        return (_acc(q) * scale) @ _acc(k).transpose(-2, -1)


def attention_distill_loss_from_qk(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor,
                                   scale_s: Optional[float] = None,
                                   scale_t: Optional[float] = None,
                                   teacher_group: int = 1) -> Tensor:
    """:func:`attention_distill_loss` computed from queries and keys ``[B, H, N, D]``.

    ``scale_*`` default to ``D ** -0.5`` of the respective side. The ``[B, H, N, N]`` maps are
    materialised here (in float32) for the distilled layer only.
    """
    scale_s = q_s.shape[-1] ** -0.5 if scale_s is None else scale_s
    scale_t = q_t.shape[-1] ** -0.5 if scale_t is None else scale_t
    with torch.no_grad():
        t = attention_logits(q_t, k_t, scale_t)
    s = attention_logits(q_s, k_s, scale_s)
    return attention_distill_loss(t, s, teacher_group)
