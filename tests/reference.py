"""Naive float64 references: materialise the logits and call PyTorch."""
import torch
import torch.nn.functional as F


def reference_logits(e, c, bias=None, softcap=None):
    logits = e.double() @ c.double().T
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def reference_loss_from_logits(logits, targets, *, ignore_index=-100, reduction="mean",
                               label_smoothing=0.0, z_loss=0.0, shift=False):
    """Same semantics as fusedlm.linear_cross_entropy, on explicit logits (..., V)."""
    if shift:
        pad = torch.full_like(targets[..., :1], ignore_index)
        targets = torch.cat([targets[..., 1:], pad], dim=-1)
    batch_shape = targets.shape
    logits = logits.reshape(-1, logits.shape[-1])
    y = targets.reshape(-1).long()
    per_token = F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="none",
                                label_smoothing=label_smoothing)
    valid = y != ignore_index
    if z_loss > 0:
        per_token = per_token + z_loss * torch.logsumexp(logits, -1).square()
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token.reshape(batch_shape)
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / valid.sum()


def reference_loss(e, c, targets, bias=None, *, softcap=None, **kw):
    logits = reference_logits(e.reshape(-1, e.shape[-1]), c, bias, softcap)
    logits = logits.reshape(*e.shape[:-1], c.shape[0])
    return reference_loss_from_logits(logits, targets, **kw)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
