"""Cut Cross-Entropy: the cross-entropy of ``e @ c.T (+ bias)`` without materialising the
[N, V] logits.

The op computes three per-token statistics in one pass over the vocabulary: the
log-sum-exp of the logits, the target logit and the sum of the logits. Every loss option
(ignore_index, reductions, label smoothing, z-loss, softcap, returning the LSE) is a small
expression of those statistics, so autograd hands the backward op exactly three per-token
coefficients and the backward kernel recomputes logit tiles and forms
``dz = grad_lse * softmax + grad_target * onehot + grad_sum`` on the fly.
"""
from __future__ import annotations

import inspect
import math
import operator
import os
from typing import Optional, Union

import torch
from torch import Tensor
from torch.autograd import forward_ad

from ._checks import is_real_number
from ._ops import ops

__all__ = ["linear_cross_entropy", "LinearCrossEntropy", "cce_statistics", "loss_from_statistics",
           "resolve_filter_eps"]

_REDUCTIONS = ("mean", "sum", "none")


def resolve_filter_eps(filter_eps: Union[str, float, None], dtype: torch.dtype) -> float:
    """Gradient-filter threshold as passed to the backward kernel; -1.0 means exact.

    ``"auto"`` follows apple's CCE: ``finfo(dtype).eps / 32`` (2^-12 for bfloat16, 2^-15 for
    float16, 2^-28 for float32): softmax entries below it would round away when added to a
    value of order one in that dtype.
    """
    if filter_eps is None:
        return -1.0
    if isinstance(filter_eps, str):
        if filter_eps != "auto":
            raise ValueError(f'filter_eps must be "auto", None or a float >= 0, got {filter_eps!r}')
        return torch.finfo(dtype).eps / 32
    if not is_real_number(filter_eps):
        raise TypeError(f'filter_eps must be "auto", None or a float in [0, 1), got {filter_eps!r}')
    filter_eps = float(filter_eps)
    if not 0 <= filter_eps < 1:  # (1 or more would drop every gradient)
        raise ValueError(f"filter_eps must be in [0, 1), got {filter_eps}")
    return filter_eps


def _kernel_filter(filter_eps: float, softcap: float, uses_logit_sum: bool):
    """(filter_eps the backward kernels apply, whether the uniform grad_sum term is added
    outside them)."""
    if filter_eps >= 0 and uses_logit_sum:
        if softcap == 0.0:
            # The grad_sum term touches every logit; the filter would drop it on skipped
            # tiles. Without a softcap it separates exactly, so it is added outside.
            return filter_eps, True
        return -1.0, False  # softcap + label smoothing: no filtering (exact)
    return filter_eps, False


# Rows per block of the label-smoothing terms below: ~16M elements (64 MB of float32), so
# that no float32 copy of a whole [V, D] or [N, D] tensor is made. (Under torch.compile the
# terms stay single expressions: a loop over the rows would pin N and V to their values and
# recompile for every new N; the compiler fuses the casts of the elementwise one anyway.)
_BLOCK_ELEMENTS = 1 << 24


def _row_blocks(rows: int, cols: int):
    step = max(1, _BLOCK_ELEMENTS // max(1, cols))
    return range(0, rows, step), step


def _add_outer_(out: Tensor, col: Optional[Tensor], row: Tensor, acc: torch.dtype) -> Tensor:
    """out + col[:, None] * row[None, :] (col None: ones), summed in `acc`; in place."""
    if torch.compiler.is_compiling():
        return (out.to(acc) + (row if col is None else col[:, None] * row)).to(out.dtype)
    starts, step = _row_blocks(out.shape[0], out.shape[1])
    for start in starts:
        block = out[start:start + step]
        term = row if col is None else col[start:start + step, None] * row
        block.copy_(block.to(acc) + term)
    return out


def _weighted_row_sum(weights: Tensor, x: Tensor, acc: torch.dtype) -> Tensor:
    """weights @ x in `acc` ([N] @ [N, D] -> [D])."""
    if torch.compiler.is_compiling():
        return weights.to(acc) @ x.to(acc)
    total = torch.zeros(x.shape[1], dtype=acc, device=x.device)
    starts, step = _row_blocks(x.shape[0], x.shape[1])
    for start in starts:
        total += weights[start:start + step].to(acc) @ x[start:start + step].to(acc)
    return total


def _carries_derivatives(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd could differentiate through any of the tensors: reverse mode
    (requires_grad, grad mode on) or forward mode (dual tensors of forward_ad,
    torch.func.jvp / jacfwd, which do not set requires_grad)."""
    grad_mode = torch.is_grad_enabled()
    return any(t is not None and ((grad_mode and t.requires_grad)
                                  or forward_ad.unpack_dual(t).tangent is not None)
               for t in tensors)


class _NoSecondDerivative(torch.autograd.Function):
    """Passes a first derivative through (as a view); differentiating it raises."""

    @staticmethod
    def forward(ctx, grad, *anchors):
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "fusedlm.linear_cross_entropy is differentiable once: its gradients (from "
            "autograd.grad(..., create_graph=True)) cannot be differentiated again")


class _CCEStatistics(torch.autograd.Function):
    """(lse, target_logit, logit_sum) per token, differentiable w.r.t. e, c and bias."""

    @staticmethod
    def forward(ctx, e, c, targets, bias, softcap, ignore_index, filter_eps, accum_fp32,
                uses_logit_sum):
        kernel_eps, uniform_outside = _kernel_filter(filter_eps, softcap, uses_logit_sum)
        # With a filter, the CUDA forward also records each row's largest logit per vocabulary
        # tile, so the backward never recomputes tiles that hold nothing above the filter
        # (N x V/256 floats, kept until the backward).
        wants_grad = any(ctx.needs_input_grad[i] for i in (0, 1, 3))
        record = e.is_cuda and kernel_eps >= 0 and wants_grad
        lse, target_logit, logit_sum, tile_max = ops.cce_forward(
            e, c, targets, bias, softcap, ignore_index, record)
        hint = (tile_max, target_logit) if record else (None, None)
        ctx.save_for_backward(e, c, targets, bias, lse, *hint)
        ctx.options = (softcap, kernel_eps, uniform_outside, accum_fp32)
        ctx.mark_non_differentiable(targets)
        return lse, target_logit, logit_sum

    @staticmethod
    def backward(ctx, grad_lse, grad_target, grad_sum):
        with torch.no_grad():
            grads = _CCEStatistics._gradients(ctx, grad_lse, grad_target, grad_sum)
        if torch.is_grad_enabled():
            # create_graph=True: the gradients carry no graph (the kernels have no derivative),
            # so a loss built on them would get silent zeros from their term (a gradient
            # penalty, say). They pass through a node whose backward raises instead.
            # (once_differentiable does that only when grad_lse & co require grad.)
            e, c, _, bias = ctx.saved_tensors[:4]
            anchors = [t for t in (e, c, bias) if t is not None and t.requires_grad]
            if anchors:
                grads = tuple(g if g is None else _NoSecondDerivative.apply(g, *anchors) for g in grads)
        return grads

    @staticmethod
    def _gradients(ctx, grad_lse, grad_target, grad_sum):
        e, c, targets, bias, lse, tile_max, target_logit = ctx.saved_tensors
        softcap, filter_eps, uniform_outside, accum_fp32 = ctx.options
        # A frozen classifier (LoRA, a tied embedding kept fixed) or frozen hidden states:
        # the kernels skip that gradient's GEMM and never allocate it.
        need_e, need_c, need_bias = (ctx.needs_input_grad[i] for i in (0, 1, 3))
        kernel_grad_sum = torch.zeros_like(grad_sum) if uniform_outside else grad_sum
        grad_e, grad_c, grad_bias = ops.cce_backward(
            e, c, targets, bias, lse, grad_lse.to(lse.dtype), grad_target.to(lse.dtype),
            kernel_grad_sum.to(lse.dtype), softcap, filter_eps, accum_fp32, tile_max,
            target_logit, need_e, need_c, need_bias)
        if uniform_outside:
            g = grad_sum.to(lse.dtype)
            acc = torch.float64 if lse.dtype == torch.float64 else torch.float32
            if need_e:
                grad_e = _add_outer_(grad_e, g, c.sum(0, dtype=acc), acc)
            if need_c:
                grad_c = _add_outer_(grad_c, None, _weighted_row_sum(g, e, acc), acc)
            if need_bias:
                grad_bias = (grad_bias.to(acc) + g.sum()).to(bias.dtype)
        return (grad_e if need_e else None, grad_c if need_c else None, None,
                grad_bias if need_bias else None, None, None, None, None, None)


def cce_statistics(e: Tensor, c: Tensor, targets: Tensor, bias: Optional[Tensor] = None, *,
                   softcap: Optional[float] = None, ignore_index: int = -100,
                   filter_eps: Union[str, float, None] = "auto", accum_fp32: bool = False,
                   uses_logit_sum: bool = True):
    """Differentiable per-token ``(lse, target_logit, logit_sum)`` of ``e @ c.T + bias``
    (after softcap) for 2-D ``e`` [N, D]; building block of :func:`linear_cross_entropy`
    and of the vocabulary-parallel loss. ``target_logit`` is 0 where ``targets ==
    ignore_index``."""
    softcap, ignore_index = float(softcap or 0.0), int(ignore_index)
    filter_eps = resolve_filter_eps(filter_eps, e.dtype)  # (checked even when unused)
    if not (torch.compiler.is_compiling() or _carries_derivatives(e, c, bias)):
        # Nothing to differentiate: the op alone, without autograd.Function's host time.
        # (Forward-mode AD goes through the Function, which refuses it clearly.)
        lse, target_logit, logit_sum, _ = ops.cce_forward(e, c, targets, bias, softcap, ignore_index, False)
        return lse, target_logit, logit_sum
    return _CCEStatistics.apply(e, c, targets, bias, softcap, ignore_index, filter_eps,
                                bool(accum_fp32), bool(uses_logit_sum))


def _check_tensor_types(e, c, targets, bias) -> None:
    """Before any autocast cast: only floating e / c (and bias) may be cast."""
    if not isinstance(e, Tensor) or not isinstance(c, Tensor) or not isinstance(targets, Tensor):
        raise TypeError("linear_cross_entropy: e, c and targets must be tensors")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias must be None or a tensor, got {type(bias).__name__}")
    if not e.is_floating_point() or not c.is_floating_point():
        raise TypeError(f"e and c must be floating point, got {e.dtype} and {c.dtype}")


def _autocast_operands(e, c, targets, bias):
    """(e, c, bias) as autocast would feed a matmul: float32 / float16 / bfloat16 operands
    take its dtype, float64 stays (as in torch's own matmuls). Types are checked first, so
    integer tensors are refused rather than cast. (Meta tensors have no autocast state.)"""
    _check_tensor_types(e, c, targets, bias)
    if e.device.type == "meta" or not torch.is_autocast_enabled(e.device.type):
        return e, c, bias
    dt = torch.get_autocast_dtype(e.device.type)
    cast = lambda t: t.to(dt) if t is not None and t.dtype != torch.float64 else t  # noqa: E731
    return cast(e), cast(c), cast(bias)


def _number(value, name: str) -> float:
    if not is_real_number(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def _check_ignore_index(ignore_index) -> int:
    try:
        index = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index must be an integer, got {ignore_index!r}") from None
    if not -2**63 <= index < 2**63:
        raise ValueError(f"ignore_index must fit int64, got {index}")
    return index


def _check_inputs(e, c, targets, bias, reduction, softcap, label_smoothing, z_loss):
    """Shapes, devices and options; after _autocast_operands, which checked the tensor types."""
    if e.dim() < 1:
        raise ValueError(f"e must have shape (..., D), got {tuple(e.shape)}")
    if e.shape[-1] == 0:
        raise ValueError("e and c must have D >= 1 features")
    if c.dim() != 2:
        raise ValueError(f"c (the classifier) must have shape (V, D), got {tuple(c.shape)}")
    if e.shape[-1] != c.shape[1]:
        raise ValueError(f"e (..., D={e.shape[-1]}) and c (V, D={c.shape[1]}) disagree on D")
    if tuple(targets.shape) != tuple(e.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(e.shape[:-1])} (e's leading dims), "
                         f"got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 or int32, got {targets.dtype}")
    if e.dtype != c.dtype:
        raise TypeError(f"e and c must share a dtype, got {e.dtype} and {c.dtype} "
                        "(cast one, or run under torch.autocast)")
    if not (e.device == c.device == targets.device):
        raise ValueError(f"e, c and targets must be on one device, got {e.device}, {c.device}, "
                         f"{targets.device}")
    if bias is not None:
        if bias.shape != (c.shape[0],):
            raise ValueError(f"bias must have shape ({c.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != c.dtype or bias.device != c.device:
            raise TypeError(f"bias must match c ({c.dtype} on {c.device}), got {bias.dtype} on "
                            f"{bias.device}")
    _check_options(reduction, softcap, label_smoothing, z_loss)


def _check_options(reduction, softcap, label_smoothing, z_loss):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    # softcap: representable in float32, where the kernels use it (smaller ones became 0 =
    # off there; larger ones inf, and inf * tanh(z / inf) is NaN)
    f32 = torch.finfo(torch.float32)
    if softcap is not None and not f32.tiny <= _number(softcap, "softcap") <= f32.max:
        raise ValueError(f"softcap must be None or a float in [{f32.tiny:.3g}, {f32.max:.3g}], got {softcap}")
    if not 0.0 <= _number(label_smoothing, "label_smoothing") <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not 0.0 <= _number(z_loss, "z_loss") < math.inf:
        raise ValueError(f"z_loss must be finite and >= 0, got {z_loss}")


def _check_targets(targets: Tensor, vocab: int, ignore_index: int, shift: bool) -> None:
    """Targets outside [0, V) that are not ignore_index, reported at their index in the
    caller's tensor (not the flattened, shifted one the kernels see). With shift the first
    position of every sequence is never a target. Synchronous on GPUs, so there only with
    FUSEDLM_CHECK_TARGETS=1; on CPUs always (the CPU op checks again, by flat index)."""
    used = targets[..., 1:] if shift else targets
    bad = (used != ignore_index) & ((used < 0) | (used >= vocab))
    if bool(bad.any()):
        idx = [int(i) for i in bad.nonzero()[0]]
        if shift:
            idx[-1] += 1
        raise IndexError(f"targets[{', '.join(map(str, idx))}] = {int(targets[tuple(idx)])} is outside "
                         f"[0, V={vocab}) and is not ignore_index ({ignore_index})")


def _should_check_targets(targets: Tensor) -> bool:
    return targets.device.type == "cpu" or os.environ.get("FUSEDLM_CHECK_TARGETS", "0") == "1"


def _check_shift(shift) -> bool:
    # (apple's CCE also takes an int: a shift by that many positions; only 1 exists here)
    if isinstance(shift, bool) or (isinstance(shift, int) and shift in (0, 1)):
        return bool(shift)
    raise ValueError(f"shift must be True / False (or 1 / 0), got {shift!r}")


def _shift_targets(targets: Tensor, ignore_index: int) -> Tensor:
    """Position t predicts token t+1: shift left along the last (sequence) dim and mark the
    final position ignored. Only the O(N) targets move; e is never copied."""
    if targets.dtype != torch.int64:  # (an ignore_index past int32 fits the pad)
        targets = targets.to(torch.int64)
    pad = torch.full_like(targets[..., :1], ignore_index)
    return torch.cat([targets[..., 1:], pad], dim=-1)


def linear_cross_entropy(
    e: Tensor,
    c: Tensor,
    targets: Tensor,
    bias: Optional[Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: Optional[float] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    shift: bool = False,
    filter_eps: Union[str, float, None] = "auto",
    accum_fp32: bool = False,
    return_lse: bool = False,
    process_group=None,
):
    """Cross-entropy of the logits ``e @ c.T + bias`` without materialising them.

    Args:
        e: hidden states, shape ``(..., D)``.
        c: classifier (un-embedding) weight, shape ``(V, D)``; same dtype as ``e``.
        targets: class indices, shape ``e.shape[:-1]``, int64/int32.
        bias: optional ``(V,)`` bias.
        ignore_index: targets equal to it contribute no loss and no gradient.
        reduction: ``"mean"`` (over non-ignored tokens; NaN when all are ignored, as in
            ``F.cross_entropy``), ``"sum"`` or ``"none"`` (shape ``e.shape[:-1]``, 0 at
            ignored positions).
        softcap: if set, logits become ``softcap * tanh(logits / softcap)`` (Gemma 2/3).
        label_smoothing: as in ``F.cross_entropy``: ``(1-s) * nll + s * mean_v(-log p_v)``.
        z_loss: adds ``z_loss * lse**2`` per token (PaLM's z-loss).
        shift: position ``t`` predicts ``targets[..., t+1]`` (causal LM labels); the last
            position of every sequence is ignored. Only the targets are shifted: no copy of e.
        filter_eps: backward gradient filter. Logit tiles whose softmax entries are all below
            it are skipped; a tile holding a token's target is skipped only if that entry's
            gradient is as small (for cross-entropy: ``|p_target - 1| < filter_eps``, a
            confidently right token). ``"auto"`` = ``finfo(dtype).eps / 32`` (2^-12 bf16,
            2^-15 fp16), ``None`` = exact gradients. The loss is never filtered. The CPU
            kernel filters per element, the CUDA kernel per tile; on the GPU the forward
            also records each row's largest logit per 256-wide vocabulary tile (``N *
            V / 256`` floats until the backward) so that skipped tiles are not even
            recomputed. With label smoothing and a softcap together filtering is turned off
            (the smoothing term is dense). The skipped entries add up where the softmax is
            flat: with most of V below the threshold (e.g. at initialisation, or a 32k
            vocabulary at logits of scale ~1) ``"auto"`` drops most of dE's softmax term and
            leaves non-target rows of dC near zero; a CPU run at V = 8192 (random bf16 e, c)
            measured 10x bf16 PyTorch's error in dE and 4x in dC (float64 reference). It is
            meant for trained models, whose softmax is peaked (as in apple's CCE); pass
            ``None`` where exact gradients matter.
        accum_fp32: CUDA only: accumulate ``dE`` across vocabulary chunks in float32
            (``dC`` always accumulates in float32 registers). The CPU accumulates in float32
            (float64 for float64 inputs) always.
        return_lse: also return the per-token log-sum-exp (differentiable), shape
            ``e.shape[:-1]``.
        process_group: vocabulary-parallel mode: ``c`` (and ``bias``) hold this rank's
            contiguous shard of the vocabulary and ``targets`` are global ids; see
            :func:`fusedlm.parallel.vocab_parallel_linear_cross_entropy`.

    Returns:
        The loss in float32 (float64 for float64 inputs), and the LSE if ``return_lse``.
        Differentiable once: differentiating its gradients (``create_graph=True``) raises.

    Precision: on CUDA, float32 inputs are multiplied in TF32 (as with
    ``torch.backends.cuda.matmul.allow_tf32 = True``, whatever that flag says); float64 runs
    on the CPU only. A token's loss is ``lse - target_logit``, two float32 numbers of the
    size of its largest logit: it carries an absolute error of about one float32 ulp of that
    logit (~1e-6 at logits near 12), so a very confident token's loss (below ~1e-5) has a
    large relative error, where ``F.cross_entropy`` in float32 keeps it to a few ulps; so
    does that token's target gradient ``p - 1`` (dropped by the default filter for 16-bit
    inputs).

    Memory: the forward keeps O(N) floats beyond its inputs; see the README for the CUDA
    backward's bounded workspace. No host synchronisation happens on the hot path (set
    ``FUSEDLM_CHECK_TARGETS=1`` to validate CUDA targets eagerly, which synchronises).
    """
    ignore_index = _check_ignore_index(ignore_index)
    shift = _check_shift(shift)
    if process_group is not None:
        from .parallel import vocab_parallel_linear_cross_entropy

        return vocab_parallel_linear_cross_entropy(
            e, c, targets, bias, process_group=process_group, ignore_index=ignore_index,
            reduction=reduction, softcap=softcap, label_smoothing=label_smoothing, z_loss=z_loss,
            shift=shift, filter_eps=filter_eps, accum_fp32=accum_fp32, return_lse=return_lse)
    e, c, bias = _autocast_operands(e, c, targets, bias)
    _check_inputs(e, c, targets, bias, reduction, softcap, label_smoothing, z_loss)
    batch_shape = e.shape[:-1]
    if shift and e.dim() < 2:
        raise ValueError(f"shift=True needs e of shape (..., T, D), got {tuple(e.shape)}")
    # (not under torch.compile: data-dependent; the CPU op still checks, by flat index)
    if not torch.compiler.is_compiling() and _should_check_targets(targets):
        _check_targets(targets, c.shape[0], ignore_index, shift)
    if shift:
        targets = _shift_targets(targets, ignore_index)
    e2 = e.reshape(-1, e.shape[-1])
    y = targets.reshape(-1).to(torch.int64)

    lse, target_logit, logit_sum = cce_statistics(
        e2, c, y, bias, softcap=softcap, ignore_index=ignore_index, filter_eps=filter_eps,
        accum_fp32=accum_fp32, uses_logit_sum=label_smoothing > 0)
    return loss_from_statistics(lse, target_logit, logit_sum, y != ignore_index, c.shape[0],
                                batch_shape, reduction=reduction,
                                label_smoothing=label_smoothing, z_loss=z_loss,
                                return_lse=return_lse)


def loss_from_statistics(lse: Tensor, target_logit: Tensor, logit_sum: Optional[Tensor],
                         valid: Tensor, vocab_size, batch_shape, *, reduction: str,
                         label_smoothing: float, z_loss: float, return_lse: bool):
    """The loss of every option as an O(N) expression of the per-token statistics (shared by
    the single-device and the vocabulary-parallel paths). ``vocab_size`` is the full V (an
    int or a tensor); ``logit_sum`` is only read when ``label_smoothing > 0``."""
    nll = lse - target_logit
    if label_smoothing > 0:
        smooth = lse - logit_sum / vocab_size
        per_token = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    else:
        per_token = nll
    if z_loss > 0:
        per_token = per_token + z_loss * lse.square()
    per_token = torch.where(valid, per_token, 0.0)

    if reduction == "none":
        loss = per_token.reshape(batch_shape)
    elif reduction == "sum":
        loss = per_token.sum()
    else:
        loss = per_token.sum() / valid.sum(dtype=per_token.dtype)
    if return_lse:
        return loss, lse.reshape(batch_shape)
    return loss


class LinearCrossEntropy(torch.nn.Module):
    """Module form of :func:`linear_cross_entropy`; keyword options are fixed at init.

    >>> loss_fn = LinearCrossEntropy(reduction="sum", softcap=30.0)
    >>> loss = loss_fn(hidden, lm_head.weight, labels)  # doctest: +SKIP
    """

    def __init__(self, **options):
        super().__init__()
        defaults = {n: p.default for n, p in inspect.signature(linear_cross_entropy).parameters.items()
                    if p.kind == p.KEYWORD_ONLY}
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise TypeError(f"LinearCrossEntropy: unknown options {unknown}; known: {list(defaults)}")
        # (checked here, not at the first call)
        o = {**defaults, **options}
        _check_options(o["reduction"], o["softcap"], o["label_smoothing"], o["z_loss"])
        _check_ignore_index(o["ignore_index"])
        _check_shift(o["shift"])
        resolve_filter_eps(o["filter_eps"], torch.float32)
        self.options = options

    def forward(self, e: Tensor, c: Tensor, targets: Tensor, bias: Optional[Tensor] = None):
        return linear_cross_entropy(e, c, targets, bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
