"""Attention transfer for timm Vision Transformers (Li et al., NeurIPS 2024).

:class:`AttentionTransfer` holds a frozen teacher and a student ViT and patches the
``timm.layers.Attention`` modules of the selected layers, per instance and reversibly (the
instance gets its own ``forward``; :meth:`AttentionTransfer.unpatch` deletes it again):

* teacher layers: the same computation as timm's fused path, plus the post-``q_norm`` /
  ``k_norm`` queries and keys are left in a per-layer slot;
* student layers, ``mode="copy"``: ``SDPA(q_t, k_t, v_s)`` i.e. ``softmax(q_t k_t^T * scale_t)
  @ v_s`` followed by the student's own projection; the student's Q and K are not used.
  ``"copy_q"``: ``SDPA(q_t, k_s, v_s)``; ``"copy_k"``: ``SDPA(q_s, k_t, v_s)``;
* student layers, ``mode="distill"``: the student's own attention (fused SDPA) plus the
  attention cross-entropy against the teacher (materialised for these layers only).
"""
from __future__ import annotations

import copy
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import attention_distill_loss_from_qk

__all__ = [
    "MODES",
    "AttentionTransfer",
    "AttentionTransferWarning",
    "TransferOutput",
    "architecture_signature",
    "build_student",
    "default_layers",
]

MODES = ("copy", "copy_q", "copy_k", "distill")

LayerSpec = Union[None, str, slice, Iterable[int], Mapping[int, int]]


class AttentionTransferWarning(UserWarning):
    """Teacher/student architecture mismatch or an automatic layer mapping."""


class TransferOutput(NamedTuple):
    logits: Tensor        #: the student's (or, in copy modes, the combined model's) logits
    aux_loss: Tensor      #: ``weight * sum(layer_losses)``; a zero scalar when not distilling
    layer_losses: Tensor  #: ``[len(layers)]`` unweighted per-layer CE, detached (empty if none)


# --------------------------------------------------------------------------- model helpers

def _timm_attention_cls():
    try:
        from timm.layers import Attention
    except ImportError as err:  # pragma: no cover - timm is a test/demo dependency
        raise ImportError("fusedlm.transfer works on timm models: `pip install timm`") from err
    return Attention


def _attention_modules(model: nn.Module, who: str) -> List[nn.Module]:
    """The ``Attention`` module of every block, refusing anything we cannot patch faithfully."""
    attention_cls = _timm_attention_cls()
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"{who}: expected a timm VisionTransformer-like model with `.blocks`, "
                        f"got {type(model).__name__}")
    mods = []
    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None)
        if (not isinstance(attn, attention_cls) or type(attn).forward is not attention_cls.forward
                or getattr(attn, "qkv", None) is None):
            raise TypeError(
                f"{who} block {i}: unsupported attention module {type(attn).__name__}; "
                "AttentionTransfer patches timm.layers.Attention (standard ViT blocks) only")
        mods.append(attn)
    return mods


def _num_tokens(model: nn.Module) -> Optional[int]:
    pe = getattr(model, "patch_embed", None)
    n = getattr(pe, "num_patches", None)
    if n is None or getattr(model, "dynamic_img_size", False):
        return None
    return int(n) + int(getattr(model, "num_prefix_tokens", 0))


def architecture_signature(model: nn.Module) -> Dict[str, Any]:
    """A comparable description of a ViT's architecture (the classifier head is left out: the
    teacher may have none or another number of classes)."""
    sig: Dict[str, Any] = {"class": type(model).__name__}
    for name in ("embed_dim", "num_prefix_tokens", "has_class_token", "no_embed_class",
                 "global_pool", "dynamic_img_size"):
        if hasattr(model, name):
            sig[name] = getattr(model, name)
    pe = getattr(model, "patch_embed", None)
    if pe is not None:
        for name in ("img_size", "patch_size", "grid_size"):
            if hasattr(pe, name):
                sig[f"patch_embed.{name}"] = tuple(getattr(pe, name))
        proj = getattr(pe, "proj", None)
        if isinstance(proj, nn.Conv2d):
            sig["in_chans"] = proj.in_channels
    for name in ("norm_pre", "norm", "fc_norm"):
        mod = getattr(model, name, None)
        if mod is not None:
            sig[name] = type(mod).__name__
    blocks = list(getattr(model, "blocks", []))
    sig["depth"] = len(blocks)

    def describe(blk: nn.Module) -> Tuple:
        attn = getattr(blk, "attn", None)
        mlp = getattr(blk, "mlp", None)
        fc1 = getattr(mlp, "fc1", None)
        return (
            type(blk).__name__, type(attn).__name__,
            getattr(attn, "num_heads", None), getattr(attn, "head_dim", None),
            type(getattr(attn, "q_norm", None)).__name__,
            type(getattr(attn, "norm", None)).__name__,
            getattr(attn, "gate", None) is not None,
            getattr(getattr(attn, "qkv", None), "bias", None) is not None,
            type(mlp).__name__, getattr(fc1, "out_features", None),
            type(getattr(blk, "norm1", None)).__name__, type(getattr(blk, "ls1", None)).__name__,
        )

    names = ("block", "attn", "num_heads", "head_dim", "qk_norm", "scale_norm", "gated",
             "qkv_bias", "mlp", "mlp_hidden", "norm_layer", "layer_scale")
    per_block = [describe(b) for b in blocks]
    for j, name in enumerate(names):
        values = [d[j] for d in per_block]
        sig[f"blocks.{name}"] = values[0] if len(set(values)) == 1 else tuple(values)
    return sig


def build_student(teacher: nn.Module) -> nn.Module:
    """A freshly initialised network with exactly the teacher's architecture (a deep copy
    whose parameters are all re-initialised with the model's own init, drawing from the global
    torch RNG)."""
    for attn in _attention_modules(teacher, "teacher"):
        if "forward" in attn.__dict__:
            raise RuntimeError("the teacher is currently patched; unpatch it before building "
                               "a student from it")
    student = copy.deepcopy(teacher)
    for mod in student.modules():
        if mod is not student and hasattr(mod, "reset_parameters"):
            mod.reset_parameters()
    if hasattr(student, "init_weights"):
        student.init_weights()
    student.requires_grad_(True)
    student.train()
    return student


def default_layers(depth: int, mode: str) -> List[int]:
    """Paper/official-code defaults, scaled with depth: distillation uses all but the last
    ``round(depth / 4)`` layers (all but 6 of 24 for ViT-L), the copy modes all but the last
    ``round(depth / 8)`` (all but 3 of 24, the released code's default). Halves round up."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    excluded = int(depth * (6 if mode == "distill" else 3) / 24 + 0.5)
    return list(range(max(depth - excluded, 1)))


def _index(i: int, n: int, who: str) -> int:
    if isinstance(i, bool) or not isinstance(i, int):
        raise TypeError(f"{who} index must be an int, got {i!r}")
    if not -n <= i < n:
        raise IndexError(f"{who} index {i} out of range for {n}")
    return i % n


def _depth_map(i: int, s_depth: int, t_depth: int) -> int:
    """Student layer ``i`` -> the teacher layer at the same relative depth (end-aligned: the
    last student layer maps to the last teacher layer)."""
    return min(t_depth - 1, max(0, round((i + 1) * t_depth / s_depth) - 1))


def _resolve_layers(layers: LayerSpec, mode: str, s_depth: int,
                    t_depth: int) -> List[Tuple[int, int]]:
    if isinstance(layers, Mapping):
        pairs = [(_index(s, s_depth, "student layer"), _index(t, t_depth, "teacher layer"))
                 for s, t in layers.items()]
    else:
        if layers is None:
            idx = default_layers(s_depth, mode)
        elif isinstance(layers, str):
            if layers != "all":
                raise ValueError(f"layers={layers!r}: the only string accepted is 'all'")
            idx = list(range(s_depth))
        elif isinstance(layers, slice):
            idx = list(range(s_depth))[layers]
        elif isinstance(layers, int):
            raise TypeError("layers must be a list of layer indices, a slice, 'all', a dict "
                            "{student_layer: teacher_layer} or None; for one layer pass [i], "
                            "for all but the last k pass slice(None, -k)")
        else:
            idx = [_index(i, s_depth, "student layer") for i in layers]
        if s_depth != t_depth:
            pairs = [(i, _depth_map(i, s_depth, t_depth)) for i in idx]
            warnings.warn(
                f"student depth {s_depth} != teacher depth {t_depth}: student layers are mapped "
                f"to teacher layers at the same relative depth {dict(pairs)}; pass layers as a "
                "dict {student_layer: teacher_layer} to choose the mapping yourself",
                AttentionTransferWarning, stacklevel=3)
        else:
            pairs = [(i, i) for i in idx]
    students = [s for s, _ in pairs]
    if len(set(students)) != len(students):
        raise ValueError(f"a student layer is listed twice in {pairs}")
    if not pairs:
        raise ValueError("no layer selected for attention transfer")
    return sorted(pairs)


# ----------------------------------------------------------------------- per-layer plans

@dataclass
class _HeadPlan:
    sel: List[int]                   # student heads that receive the teacher's attention
    rest: List[int]                  # student heads that keep their own attention
    t_idx: Optional[List[int]]       # teacher head per transferred slot (None: identity)
    v_idx: Optional[List[int]]       # student V head per transferred slot (None: identity)
    sel_idx: Optional[List[int]]     # student heads as an index (None: identity)
    group: int                       # teacher heads averaged into one student head
    inv_perm: Optional[List[int]]    # cat([sel, rest]) -> head order (None: no rest)


def _head_plan(heads: Optional[Iterable[int]], hs: int, ht: int, mode: str,
               layer: Tuple[int, int]) -> _HeadPlan:
    sel = list(range(hs)) if heads is None else sorted({_index(h, hs, "head") for h in heads})
    if not sel:
        raise ValueError("heads selects no head")
    if hs == ht:
        group, t_of = 1, (lambda j: [j])
    elif mode in ("copy_q", "copy_k"):
        raise ValueError(f"mode={mode!r} needs equal head counts; student layer {layer[0]} has "
                         f"{hs} heads, teacher layer {layer[1]} has {ht}")
    elif hs % ht == 0:       # several student heads share one teacher head
        group, t_of = 1, (lambda j: [j // (hs // ht)])
    elif ht % hs == 0:       # one student head gets the mean of a group of teacher heads
        g = ht // hs
        group, t_of = g, (lambda j: [j * g + i for i in range(g)])
    else:
        raise ValueError(
            f"student layer {layer[0]} has {hs} heads and teacher layer {layer[1]} has {ht}: "
            "one count must divide the other (heads are matched head-to-head, shared, or "
            "averaged over groups)")
    t_idx = [t for j in sel for t in t_of(j)]
    v_idx = [j for j in sel for _ in range(group)]
    rest = [j for j in range(hs) if j not in sel]
    perm = sel + rest
    ident = lambda idx, n: None if idx == list(range(n)) else idx  # noqa: E731
    return _HeadPlan(
        sel=sel, rest=rest, t_idx=ident(t_idx, ht), v_idx=ident(v_idx, hs),
        sel_idx=ident(sel, hs), group=group,
        inv_perm=[perm.index(j) for j in range(hs)] if rest else None)


class _GraphSentinel:
    """An object kept in a call's autograd graph (node metadata): freed with the graph."""


@dataclass(eq=False)
class _CallState:
    """Shared by one wrapper's patched layers: whether its forward is running, and the
    graph-building calls whose backward has not started yet (activation checkpointing
    recomputes the student's layers in that backward, from the slots)."""
    active: bool = False
    graph_call: bool = False  # the running call records a graph (grad mode on)
    pending: Set[int] = field(default_factory=set)
    calls: int = 0


@dataclass(eq=False)
class _Slot:
    """Teacher layer -> student layer(s) hand-over: the teacher's q / k of the last call that
    recorded a graph (a call without one restores them afterwards)."""
    scale: float
    state: _CallState
    q: Optional[Tensor] = None
    k: Optional[Tensor] = None


@dataclass(eq=False)
class _Link:
    student_layer: int
    teacher_layer: int
    mode: str
    slot: _Slot
    plan: _HeadPlan
    loss: Optional[Tensor] = field(default=None)


def _in_backward() -> bool:
    """Whether an autograd backward pass is running (activation checkpointing recomputes
    the student's layers there)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def _teacher_slot_for(link: _Link, module: nn.Module) -> bool:
    """Whether the student layer may use the slot's teacher activations now: inside the
    wrapper's forward, or when a backward recomputes the layer. A bare call of the student
    (or of a copy of it, e.g. an EMA model) never sees them."""
    state = link.slot.state
    if state.active:
        if (link.mode == "distill" and state.graph_call and module.training
                and not torch.is_grad_enabled()):
            raise RuntimeError(
                "the student's blocks run without gradients inside a training call (reentrant "
                "activation checkpointing?): the distillation loss would not train them. Use "
                "non-reentrant checkpointing (timm.layers.set_reentrant_ckpt(False), or "
                "torch.utils.checkpoint with use_reentrant=False)")
        return link.slot.q is not None
    return _in_backward() and link.slot.q is not None


def _take(t: Tensor, idx: Optional[List[int]]) -> Tensor:
    return t if idx is None else t[:, idx]


def _split_qkv(m: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    b, n, _ = x.shape
    qkv = m.qkv(x).reshape(b, n, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


def _gate(m: nn.Module, x: Tensor) -> Optional[Tensor]:
    gate = getattr(m, "gate", None)
    return gate(x).sigmoid() if gate is not None else None


def _output(m: nn.Module, o: Tensor, gate: Optional[Tensor]) -> Tensor:
    b, _, n, _ = o.shape
    x = o.transpose(1, 2).reshape(b, n, m.num_heads * m.head_dim)
    norm = getattr(m, "norm", None)
    if norm is not None:
        x = norm(x)
    if gate is not None:
        x = x * gate
    return m.proj_drop(m.proj(x))


def _teacher_forward(self, x: Tensor, attn_mask: Optional[Tensor] = None,
                     is_causal: bool = False) -> Tensor:
    # (Patched forwards read their slot / link from the module, not from a closure, so that a
    # deepcopy of the models or of the wrapper stays self-consistent.)
    gate = _gate(self, x)
    q, k, v = _split_qkv(self, x)
    q, k = self.q_norm(q), self.k_norm(k)
    slot = self._fusedlm_slot
    if slot.state.active:  # (a bare call of the teacher leaves the slot alone)
        slot.q, slot.k = q, k
    o = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
        dropout_p=self.attn_drop.p if self.training else 0.0)
    return _output(self, o, gate)


def _student_forward(self, x: Tensor, attn_mask: Optional[Tensor] = None,
                     is_causal: bool = False) -> Tensor:
    link = self._fusedlm_link
    plan, slot, mode = link.plan, link.slot, link.mode
    n = x.shape[1]
    gate = _gate(self, x)
    q, k, v = _split_qkv(self, x)
    p = self.attn_drop.p if self.training else 0.0
    use_teacher = _teacher_slot_for(link, self)
    if mode == "distill":
        q, k = self.q_norm(q), self.k_norm(k)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p,
                                           is_causal=is_causal, scale=self.scale)
        if use_teacher:  # the teacher ran (training): distill this layer
            if slot.q.shape[2] != n:
                raise ValueError(f"teacher has {slot.q.shape[2]} tokens, student {n}")
            link.loss = attention_distill_loss_from_qk(
                _take(q, plan.sel_idx), _take(k, plan.sel_idx),
                _take(slot.q, plan.t_idx), _take(slot.k, plan.t_idx),
                scale_s=self.scale, scale_t=slot.scale, teacher_group=plan.group)
        return _output(self, o, gate)

    if not use_teacher:
        raise RuntimeError(
            f"student layer {link.student_layer} is patched for attention {mode} and needs "
            "the teacher's activations: call the AttentionTransfer module, not the student")
    if slot.q.shape[2] != n:
        raise ValueError(f"teacher has {slot.q.shape[2]} tokens, student {n}")
    qt, kt = slot.q.to(v.dtype), slot.k.to(v.dtype)
    if mode == "copy":
        q_src, k_src, scale = _take(qt, plan.t_idx), _take(kt, plan.t_idx), slot.scale
        v_src = _take(v, plan.v_idx)
    else:  # copy_q: teacher queries, own keys; copy_k: own queries, teacher keys
        q_src = qt if mode == "copy_q" else self.q_norm(q)
        k_src = self.k_norm(k) if mode == "copy_q" else kt
        q_src, k_src, scale = _take(q_src, plan.sel_idx), _take(k_src, plan.sel_idx), self.scale
        v_src = _take(v, plan.sel_idx)
    o = F.scaled_dot_product_attention(q_src, k_src, v_src, attn_mask=attn_mask,
                                       dropout_p=p, is_causal=is_causal, scale=scale)
    if plan.group > 1:  # attention is linear in V: mean of maps @ v = mean of outputs
        o = o.unflatten(1, (len(plan.sel), plan.group)).mean(dim=2)
    if plan.inv_perm is not None:
        own = F.scaled_dot_product_attention(
            self.q_norm(q)[:, plan.rest], self.k_norm(k)[:, plan.rest], v[:, plan.rest],
            attn_mask=attn_mask, dropout_p=p, is_causal=is_causal, scale=self.scale)
        o = torch.cat([o, own], dim=1)[:, plan.inv_perm]
    return _output(self, o, gate)


# ------------------------------------------------------------------------------ the module

class AttentionTransfer(nn.Module):
    """Attention copy / distillation from a frozen ``teacher`` ViT into a ``student`` ViT.

    Args:
        student: a timm ``VisionTransformer`` (standard ``Attention`` blocks) or ``None`` to
            build a freshly initialised copy of the teacher's architecture (recommended: a
            mismatched architecture triggers an :class:`AttentionTransferWarning`).
        teacher: the pre-trained ViT. It is frozen (``requires_grad_(False)``) and kept in
            eval mode while patched; both are restored by :meth:`unpatch`.
        mode: ``"copy"`` (student attention = teacher's map applied to the student's V),
            ``"copy_q"`` / ``"copy_k"`` (only the teacher's queries / keys), or
            ``"distill"`` (student keeps its own attention; cross-entropy loss).
        layers: student layers to transfer: ``None`` (default, see :func:`default_layers`),
            ``"all"``, a list of indices, a ``slice`` (``slice(None, -6)`` = all but the last
            6), or a dict ``{student_layer: teacher_layer}``. With different depths and no
            dict, layers are mapped by relative depth (with a warning).
        heads: student heads to transfer in every selected layer (``None`` = all). Other heads
            keep their own attention (copy) or are not distilled.
        weight: distillation loss weight (paper: 3.0). ``aux_loss = weight * sum_l CE_l``.
        truncate_teacher: run the teacher only up to its last needed block (it produces no
            logits); set False to run the teacher's whole ``forward_features``.

    ``forward(x)`` returns :class:`TransferOutput` ``(logits, aux_loss, layer_losses)``. The
    teacher runs on every call in the copy modes (it is part of the model, also at
    inference) and only in training mode for ``"distill"``.
    """

    def __init__(self, student: Optional[nn.Module], teacher: nn.Module, mode: str = "distill",
                 layers: LayerSpec = None, heads: Optional[Iterable[int]] = None,
                 weight: float = 3.0, truncate_teacher: bool = True) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if teacher is None:
            raise ValueError("a teacher model is required")
        if student is None:
            student = build_student(teacher)
        elif student is teacher:
            raise ValueError("student and teacher must be different modules; to start from the "
                             "teacher's weights pass copy.deepcopy(teacher)")
        else:
            t_sig, s_sig = architecture_signature(teacher), architecture_signature(student)
            diff = {k: (t_sig.get(k), s_sig.get(k)) for k in sorted(set(t_sig) | set(s_sig))
                    if t_sig.get(k) != s_sig.get(k)}
            if diff:
                lines = "; ".join(f"{k}: teacher={t!r} student={s!r}" for k, (t, s) in diff.items())
                warnings.warn(
                    "student and teacher architectures differ (" + lines + "). Attention "
                    "transfer is known to fail under architecture mismatch; build the student "
                    "from the teacher's architecture (student=None) unless this is intended.",
                    AttentionTransferWarning, stacklevel=2)
        t_tok, s_tok = _num_tokens(teacher), _num_tokens(student)
        if t_tok is not None and s_tok is not None and t_tok != s_tok:
            raise ValueError(f"teacher sees {t_tok} tokens and student {s_tok}: attention maps "
                             "can only be transferred between equal token sequences")

        self.student = student
        self.teacher = teacher
        self.mode = mode
        self.weight = float(weight)
        self.truncate_teacher = bool(truncate_teacher)
        self._s_attn = _attention_modules(student, "student")
        self._t_attn = _attention_modules(teacher, "teacher")
        self.layers: List[Tuple[int, int]] = _resolve_layers(
            layers, mode, len(self._s_attn), len(self._t_attn))
        heads = None if heads is None else list(heads)

        self._state = _CallState()
        self._slots: Dict[int, _Slot] = {}
        self._links: List[_Link] = []
        for s, t in self.layers:
            sa, ta = self._s_attn[s], self._t_attn[t]
            plan = _head_plan(heads, sa.num_heads, ta.num_heads, mode, (s, t))
            if mode in ("copy_q", "copy_k") and sa.head_dim != ta.head_dim:
                raise ValueError(f"mode={mode!r} needs equal head dims; student layer {s} has "
                                 f"{sa.head_dim}, teacher layer {t} has {ta.head_dim}")
            if t not in self._slots:
                self._slots[t] = _Slot(scale=float(ta.scale), state=self._state)
            self._links.append(_Link(s, t, mode, self._slots[t], plan))
        self._teacher_last = max(self._slots)
        self._saved_teacher: Optional[Tuple[Dict[str, bool], Dict[str, bool]]] = None
        self.patched = False
        self.patch()

    # -------------------------------------------------------------- patch / unpatch
    def patch(self) -> "AttentionTransfer":
        """Install the per-instance forwards (done by the constructor; idempotent)."""
        if self.patched:
            return self
        targets = [self._t_attn[t] for t in self._slots] + \
                  [self._s_attn[link.student_layer] for link in self._links]
        for mod in targets:
            if "forward" in mod.__dict__:
                raise RuntimeError(f"{type(mod).__name__} already has an instance forward "
                                   "(patched by another AttentionTransfer?)")
        for t, slot in self._slots.items():
            attn = self._t_attn[t]
            attn._fusedlm_slot = slot
            attn.forward = types.MethodType(_teacher_forward, attn)
        for link in self._links:
            attn = self._s_attn[link.student_layer]
            attn._fusedlm_link = link
            attn.forward = types.MethodType(_student_forward, attn)
        self._saved_teacher = ({n: m.training for n, m in self.teacher.named_modules()},
                               {n: p.requires_grad for n, p in self.teacher.named_parameters()})
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.patched = True
        return self

    def unpatch(self) -> None:
        """Remove every patched forward and restore the teacher's train mode and
        ``requires_grad`` flags. The models are then exactly as before the wrapper."""
        if not self.patched:
            return
        for t in self._slots:
            del self._t_attn[t].__dict__["forward"]
            del self._t_attn[t]._fusedlm_slot
        for link in self._links:
            del self._s_attn[link.student_layer].__dict__["forward"]
            del self._s_attn[link.student_layer]._fusedlm_link
        modes, flags = self._saved_teacher
        for n, p in self.teacher.named_parameters():
            p.requires_grad_(flags[n])
        for n, m in self.teacher.named_modules():  # (per module: mixed train / eval survive)
            m.training = modes[n]
        self._clear()
        self.patched = False

    def __enter__(self) -> "AttentionTransfer":
        return self.patch()

    def __exit__(self, *exc) -> None:
        self.unpatch()

    def train(self, mode: bool = True) -> "AttentionTransfer":
        super().train(mode)
        if self.patched:
            self.teacher.eval()  # the teacher is always deterministic
        return self

    # ------------------------------------------------------------------- forward
    def _clear(self) -> None:
        for slot in self._slots.values():
            slot.q = slot.k = None
        for link in self._links:
            link.loss = None

    def _run_teacher(self, x: Tensor) -> None:
        t = self.teacher
        dtype = next(t.parameters()).dtype
        if x.is_floating_point() and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(dtype)  # (a bf16 teacher beside a float32 student, without autocast)
        try:
            from timm.models.vision_transformer import VisionTransformer
            plain = (isinstance(t, VisionTransformer)
                     and type(t).forward_features is VisionTransformer.forward_features)
        except ImportError:  # pragma: no cover
            plain = False
        if self.truncate_teacher and plain:
            h = t.norm_pre(t.patch_drop(t._pos_embed(t.patch_embed(x))))
            for i in range(self._teacher_last + 1):
                h = t.blocks[i](h)
        else:
            t.forward_features(x)

    @property
    def uses_teacher(self) -> bool:
        """Whether the next forward runs the teacher (copy modes: always)."""
        return self.mode != "distill" or self.training

    def forward(self, x: Tensor) -> TransferOutput:
        if not self.patched:
            raise RuntimeError("AttentionTransfer was unpatched; call .patch() first")
        state = self._state
        graph_call = torch.is_grad_enabled()
        checkpointing = bool(getattr(self.student, "grad_checkpointing", False))
        if graph_call and checkpointing and state.pending:
            raise RuntimeError(
                "activation checkpointing recomputes the student's patched layers during "
                "backward from the teacher activations of the last training call: run backward "
                "on a call's outputs before the next call with gradients (or turn checkpointing "
                "off to sum the losses of several calls)")
        # The slots keep the teacher activations of the last call that recorded a graph (its
        # backward may recompute the student's layers from them); a call without a graph puts
        # them back when it is done.
        saved = [(slot, slot.q, slot.k) for slot in self._slots.values()]

        def restore_slots() -> None:
            for slot, q, k in saved:
                slot.q, slot.k = q, k

        self._clear()
        state.active, state.graph_call = True, graph_call
        try:
            if self.uses_teacher:
                with torch.no_grad():
                    self._run_teacher(x)
            logits = self.student(x)
        except BaseException:
            restore_slots()
            raise
        finally:
            state.active = False
        if self.mode == "distill" and self.uses_teacher:
            layer_losses = torch.stack([link.loss for link in self._links])
            aux = self.weight * layer_losses.sum()
            layer_losses = layer_losses.detach()
        else:
            dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
            aux = logits.new_zeros((), dtype=dtype)
            layer_losses = logits.new_zeros((0,), dtype=dtype)
        for link in self._links:
            link.loss = None
        if logits.requires_grad or aux.requires_grad:
            if not torch.compiler.is_compiling():
                self._track_backward(logits, aux)
        else:
            restore_slots()
        return TransferOutput(logits, aux, layer_losses)

    def _track_backward(self, *outputs: Tensor) -> None:
        """Marks this call pending until a backward reaches its outputs or its graph is freed."""
        state = self._state
        state.calls += 1
        key = state.calls
        state.pending.add(key)
        sentinel = _GraphSentinel()  # lives in the graph's metadata: dies with the graph
        weakref.finalize(sentinel, state.pending.discard, key)

        def backward_started(grad: Tensor) -> None:
            state.pending.discard(key)

        for t in outputs:
            if t.requires_grad:
                t.register_hook(backward_started)
                if t.grad_fn is not None:
                    t.grad_fn.metadata["fusedlm_transfer_call"] = sentinel

    # ------------------------------------------------------------------- logging
    def layer_loss_dict(self, out: Union[TransferOutput, Tensor],
                        prefix: str = "attn_distill/") -> Dict[str, float]:
        """``{prefix + "layer{i}": value}`` for logging the per-layer (unweighted) losses."""
        losses = out.layer_losses if isinstance(out, TransferOutput) else out
        if losses.numel() == 0:
            return {}
        return {f"{prefix}layer{link.student_layer}": float(v)
                for link, v in zip(self._links, losses.tolist())}

    def extra_repr(self) -> str:
        pairs = ", ".join(f"{s}<-{t}" if s != t else str(s) for s, t in self.layers)
        return (f"mode={self.mode!r}, layers=[{pairs}], weight={self.weight}, "
                f"patched={self.patched}")
