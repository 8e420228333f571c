"""Vocabulary-parallel Cut Cross-Entropy (tensor parallelism over the classifier).

With tensor parallelism the classifier (un-embedding) ``C[V, D]`` is split by rows across
the ``R`` ranks of a process group: rank ``r`` holds the contiguous shard
``C[start_r : start_r + V_r]`` (and the matching slice of the bias), while the hidden states
``e`` and the targets are replicated on every rank of the group. Each rank runs the fused
CCE kernels on its shard only, producing per-token ``(lse_r, target_logit_r, logit_sum_r)``
with the targets it owns (ids of other ranks count as ignored locally, so their target logit
is 0 there). One all-gather of these ``3 * N`` floats per rank then gives every rank the
full-vocabulary statistics::

    lse          = log sum_r exp(lse_r)            (a stable logsumexp over ranks)
    target_logit = sum_r target_logit_r
    logit_sum    = sum_r logit_sum_r               (label smoothing uses V = sum_r V_r)

and the loss is the same expression of them as :func:`fusedlm.linear_cross_entropy`. The
returned loss is therefore the full-vocabulary loss, identical on every rank of the group.

Backward follows Megatron-LM's conventions: the gather's backward hands each rank the
gradient of its own slot (no communication: the loss is replicated, so every rank already
holds the same upstream gradient), the fused backward kernel gives the rank its ``dC``
shard (and ``dbias`` shard) and a partial ``dE`` over its vocabulary rows, and ``dE`` is
all-reduced (summed) over the group -- the "copy to tensor-parallel region" of Megatron:
identity in forward, all-reduce in backward. So after ``loss.backward()`` every rank holds
the full ``dE`` and its own ``dC`` shard.

All communication goes through ``torch.distributed`` collectives on ``process_group``
(NCCL on GPUs, gloo on CPUs): per call one all-gather of the shard sizes (skipped when
``vocab_start_index``/``vocab_size`` are given), one all-gather of the statistics in forward
and one all-reduce of ``dE`` in backward. No host synchronisation happens on GPUs.

Requirements: every rank of the group calls the function with the same ``e`` and
``targets`` (replicated, as after a tensor-parallel block) and back-propagates the same
upstream gradient (the usual ``loss.backward()`` on every rank); the gradients are those of
that one loss, not of the sum of the per-rank copies.

Using it with DDP and FSDP2
---------------------------
The function works on plain local tensors; ``DTensor`` inputs are converted with
``.to_local()`` (``c``/``bias`` must then be ``Shard(0)`` on a 1-D mesh over the group and
``e`` ``Replicate()``), so the gradients flow back as DTensors of the same placements.

* **DDP** (data parallel x tensor parallel): build a 2-D layout, e.g. with
  ``init_device_mesh("cuda", (dp, tp), mesh_dim_names=("dp", "tp"))``; each rank keeps its
  vocabulary shard as an ordinary ``nn.Parameter`` and the model is wrapped with
  ``DDP(model, process_group=mesh["dp"].get_group())``; the loss uses
  ``process_group=mesh["tp"].get_group()``. DDP then averages every gradient (including the
  ``dC`` shards, which are replicated along ``dp``) over the data-parallel replicas only.
  Never wrap a vocabulary-sharded parameter with DDP over the tensor-parallel ranks: DDP
  would average different shards together.
* **FSDP2** (``torch.distributed.fsdp.fully_shard``): shard over the data-parallel mesh
  dimension only, ``fully_shard(module, mesh=mesh["dp"])``. Inside the module's forward
  FSDP2 has all-gathered the parameters over ``dp``, so the classifier parameter is this
  rank's plain local vocabulary shard: compute the loss inside the ``forward`` of the FSDP2
  module that owns the classifier (tested with the root module, which FSDP2 does not
  reshard after forward). If the classifier is a tensor-parallel DTensor
  (``parallelize_module(..., ColwiseParallel())`` gives ``Shard(0)`` weights), pass it
  as is or as ``weight.to_local()``; either way the loss needs no DTensor support.

Both layouts are tested on CPU (gloo, a 2 x 2 dp x tp mesh) against one process with the
full classifier: ``tests/test_vocab_parallel.py``. See ``docs/integrations.md``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .cce import (_autocast_operands, _check_inputs, _check_targets, _shift_targets, _should_check_targets,
                  cce_statistics, linear_cross_entropy, loss_from_statistics)

__all__ = ["vocab_parallel_linear_cross_entropy", "vocab_shard_range", "shard_vocab"]


# ----------------------------------------------------------------------------- helpers


def _is_device_mesh(obj) -> bool:
    # (isinstance, not hasattr: dynamo cannot look up attributes of a ProcessGroup, which
    # made the vocabulary-parallel loss fail under torch.compile)
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - torch without DeviceMesh
        return False
    return isinstance(obj, DeviceMesh)


def _resolve_group(process_group):
    """Accept a ProcessGroup, ``dist.group.WORLD`` or a 1-D DeviceMesh."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab-parallel linear_cross_entropy needs an initialised "
                           "torch.distributed process group (dist.init_process_group)")
    if _is_device_mesh(process_group):
        if process_group.ndim != 1:
            raise ValueError("process_group: pass a 1-D DeviceMesh (e.g. mesh['tp']), got a "
                             f"{process_group.ndim}-D mesh")
        process_group = process_group.get_group()
    return process_group


def vocab_shard_range(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, end)`` of rank's contiguous vocabulary shard with ``torch.chunk``'s split
    (the first shards get ``ceil(V / R)`` rows), the layout of ``DTensor``'s ``Shard(0)``
    and of FSDP2."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    chunk = -(-vocab_size // world_size)
    start = min(rank * chunk, vocab_size)
    return start, min(start + chunk, vocab_size)


def shard_vocab(t: Tensor, process_group=None) -> Tensor:
    """This rank's contiguous vocabulary shard (rows, dim 0) of a full classifier or bias,
    with :func:`vocab_shard_range`'s split; a copy, so it can become an ``nn.Parameter``."""
    pg = _resolve_group(process_group if process_group is not None else dist.group.WORLD)
    start, end = vocab_shard_range(t.shape[0], dist.get_rank(pg), dist.get_world_size(pg))
    return t[start:end].detach().clone()


def _unwrap_dtensor(t: Optional[Tensor], name: str, shard: bool) -> Optional[Tensor]:
    if t is None:
        return None
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # pragma: no cover - old torch
        return t
    if not isinstance(t, DTensor):
        return t
    placements = tuple(t.placements)
    if shard:
        if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
            raise ValueError(f"{name} is a DTensor with placements {placements}: the vocab-"
                             "parallel loss needs the local vocabulary shard (Shard(0) on a 1-D "
                             "mesh over the process group), or pass a plain local tensor")
    elif not all(isinstance(p, Replicate) for p in placements):
        raise ValueError(f"{name} is a DTensor with placements {placements}: the hidden states "
                         "must be replicated over the tensor-parallel group")
    return t.to_local()


class _CopyToParallelRegion(torch.autograd.Function):
    """Identity in forward; all-reduce (sum) of the gradient over the group in backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _GatherStatistics(torch.autograd.Function):
    """All-gather of the per-rank statistics [k, N] into [R, k, N]. Backward hands this rank
    the gradient of its own slot: the consumer is replicated on every rank, so every rank
    already holds the full upstream gradient (Megatron's convention; no communication)."""

    @staticmethod
    def forward(ctx, x, group, rank, world):
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x, group=group)
        ctx.rank = rank
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank], None, None, None


def _shard_offsets(v_local: int, device, group, world: int):
    """Every rank's shard size, a [world] int64 tensor on ``device``: one tiny all-gather,
    no host synchronisation."""
    size = torch.full((1,), v_local, dtype=torch.int64, device=device)  # no host copy
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    return torch.cat(sizes)


# ----------------------------------------------------------------------------- the loss


def vocab_parallel_linear_cross_entropy(
    e: Tensor,
    c: Tensor,
    targets: Tensor,
    bias: Optional[Tensor] = None,
    *,
    process_group,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: Optional[float] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    shift: bool = False,
    filter_eps: Union[str, float, None] = "auto",
    accum_fp32: bool = False,
    return_lse: bool = False,
    vocab_start_index: Optional[int] = None,
    vocab_size: Optional[int] = None,
):
    """Full-vocabulary :func:`fusedlm.linear_cross_entropy` with the classifier sharded by
    vocabulary over ``process_group`` (tensor parallelism). Also reached through
    ``fusedlm.linear_cross_entropy(..., process_group=pg)``.

    Args:
        e: hidden states ``(..., D)``, the same on every rank of the group.
        c: this rank's contiguous shard of the classifier, ``(V_r, D)``; rank ``r`` holds rows
            ``[start_r, start_r + V_r)`` with ``start_r = V_0 + ... + V_{r-1}`` (shards may be
            uneven, e.g. :func:`shard_vocab`'s ``torch.chunk`` split).
        targets: **global** class ids ``e.shape[:-1]`` (or ``ignore_index``), the same on
            every rank.
        bias: this rank's shard of the bias, ``(V_r,)``, or None.
        process_group: the tensor-parallel group (a ``ProcessGroup``, ``dist.group.WORLD``
            or a 1-D ``DeviceMesh``).
        vocab_start_index, vocab_size: this rank's first row and the global ``V``; when both
            are given the all-gather of the shard sizes is skipped (they must agree with the
            shards the ranks pass).
        Other options: as in :func:`fusedlm.linear_cross_entropy`; label smoothing averages
        over the global vocabulary, ``return_lse`` returns the global log-sum-exp.

    Returns:
        The full-vocabulary loss (float32, float64 for float64 inputs), identical on every
        rank, and the global LSE if ``return_lse``. Backward leaves every rank with the full
        ``dE`` (all-reduced over the group) and its own ``dC``/``dbias`` shard.

    Example (2 ranks, e.g. ``torchrun --nproc-per-node 2``)::

        dist.init_process_group("nccl")                    # or "gloo" on CPUs
        c_full = ...                                       # (V, D), same on every rank
        c = shard_vocab(c_full).requires_grad_()           # (V / 2, D): this rank's rows
        loss = fusedlm.linear_cross_entropy(e, c, targets, process_group=dist.group.WORLD)
        loss.backward()                                    # e.grad: full dE; c.grad: shard
    """
    pg = _resolve_group(process_group)
    e = _unwrap_dtensor(e, "e", shard=False)
    c = _unwrap_dtensor(c, "c", shard=True)
    bias = _unwrap_dtensor(bias, "bias", shard=True)
    world = dist.get_world_size(pg)
    options = dict(ignore_index=ignore_index, reduction=reduction, softcap=softcap,
                   label_smoothing=label_smoothing, z_loss=z_loss, shift=shift,
                   filter_eps=filter_eps, accum_fp32=accum_fp32, return_lse=return_lse)
    if world == 1:
        return linear_cross_entropy(e, c, targets, bias, **options)
    rank = dist.get_rank(pg)

    e, c, bias = _autocast_operands(e, c, targets, bias)
    _check_inputs(e, c, targets, bias, reduction, softcap, label_smoothing, z_loss)

    # Where this rank's rows sit in the global vocabulary.
    v_local = c.shape[0]
    if (vocab_start_index is None) != (vocab_size is None):
        raise ValueError("pass both vocab_start_index and vocab_size, or neither")
    if vocab_start_index is None:
        sizes = _shard_offsets(v_local, c.device, pg, world)
        start = sizes[:rank].sum()
        v_total = sizes.sum()
        v_total_int = int(v_total) if sizes.device.type == "cpu" else None
    else:
        if not 0 <= vocab_start_index <= vocab_size - v_local:
            raise ValueError(f"vocab_start_index={vocab_start_index} and this shard's {v_local} "
                             f"rows do not fit in vocab_size={vocab_size}")
        start = torch.full((), int(vocab_start_index), dtype=torch.int64, device=c.device)
        v_total = torch.full((), int(vocab_size), dtype=torch.int64, device=c.device)
        v_total_int = int(vocab_size)

    batch_shape = e.shape[:-1]
    # Out-of-range targets would silently count as "owned by nobody": check them on CPUs
    # (free) and on GPUs with FUSEDLM_CHECK_TARGETS=1 (synchronises), as the local op does.
    if _should_check_targets(targets):
        _check_targets(targets, v_total_int if v_total_int is not None else int(v_total), ignore_index, shift)
    if shift:
        targets = _shift_targets(targets, ignore_index)
    e2 = e.reshape(-1, e.shape[-1])
    y = targets.reshape(-1).to(torch.int64)

    # Local targets: ids owned by this rank -> local row, everything else -> -1, a local
    # "ignore" that cannot collide with a row (the user's ignore_index may be >= 0).
    valid = y != ignore_index
    local = y - start.to(y.device)
    owned = valid & (local >= 0) & (local < v_local)
    y_local = torch.where(owned, local, torch.full_like(local, -1))

    uses_logit_sum = label_smoothing > 0
    e2 = _CopyToParallelRegion.apply(e2, pg)
    if v_local > 0:
        lse_r, target_r, sum_r = cce_statistics(
            e2, c, y_local, bias, softcap=softcap, ignore_index=-1, filter_eps=filter_eps,
            accum_fp32=accum_fp32, uses_logit_sum=uses_logit_sum)
    else:  # an empty shard (V < ranks): no rows, but it still joins every collective
        acc = torch.float64 if e2.dtype == torch.float64 else torch.float32
        # Zeros that keep this rank's dE all-reduce in the graph and give c (and bias)
        # their (empty) gradients, as DDP expects of every parameter.
        zero = (e2 * 0).sum(-1).to(acc) + c.sum().to(acc) * 0
        if bias is not None:
            zero = zero + bias.sum().to(acc) * 0
        lse_r, target_r, sum_r = zero - float("inf"), zero, zero
    stats = [lse_r, target_r] + ([sum_r] if uses_logit_sum else [])
    gathered = _GatherStatistics.apply(torch.stack(stats), pg, rank, world)  # [R, k, N]
    lse = torch.logsumexp(gathered[:, 0], dim=0)
    target_logit = gathered[:, 1].sum(0)
    # A target outside [0, V) is owned by no rank: NaN, as the single-device op gives on CUDA
    # (without the check above: no host sync), not the finite loss of a target logit of 0.
    out_of_range = valid & ((y < 0) | (y >= v_total.to(y.device)))
    target_logit = torch.where(out_of_range.to(target_logit.device), torch.full_like(target_logit, float("nan")),
                               target_logit)

    logit_sum = gathered[:, 2].sum(0) if uses_logit_sum else None
    vocab = v_total.to(device=lse.device, dtype=lse.dtype) if uses_logit_sum else None
    return loss_from_statistics(lse, target_logit, logit_sum, valid, vocab, batch_shape,
                                reduction=reduction, label_smoothing=label_smoothing,
                                z_loss=z_loss, return_lse=return_lse)
