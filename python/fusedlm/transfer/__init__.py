"""Attention transfer for Vision Transformers (Li et al., "On the Surprising Effectiveness of
Attention Transfer for Vision Transformers", NeurIPS 2024), on timm ``VisionTransformer``s.

    >>> import timm, torch, torch.nn.functional as F
    >>> from fusedlm.transfer import AttentionTransfer
    >>> teacher = timm.create_model("vit_tiny_patch16_224", num_classes=10)   # pre-trained
    >>> at = AttentionTransfer(None, teacher, mode="distill")   # student = fresh copy of arch
    >>> out = at(torch.randn(2, 3, 224, 224))
    >>> loss = F.cross_entropy(out.logits, torch.tensor([1, 2])) + out.aux_loss

Pure PyTorch: this subpackage does not use fusedlm's compiled ops. See
``docs/attention_transfer.md``.
"""
from .core import (MODES, AttentionTransfer, AttentionTransferWarning, TransferOutput,
                   architecture_signature, build_student, default_layers)
from .losses import attention_distill_loss, attention_distill_loss_from_qk, attention_logits

__all__ = [
    "MODES",
    "AttentionTransfer",
    "AttentionTransferWarning",
    "TransferOutput",
    "architecture_signature",
    "build_student",
    "default_layers",
    "attention_distill_loss",
    "attention_distill_loss_from_qk",
    "attention_logits",
]
