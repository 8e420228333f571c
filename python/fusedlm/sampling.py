"""Temperature sampling in one pass over the logits, with a per-row temperature.

``sample`` draws an exact sample from ``softmax(l / tau)`` over the kept vocabulary with a
hierarchical Gumbel-max: the row is cut into 64-entry tiles, each tile's key is
``log sum_{v in tile} exp(l_v / tau)`` plus Gumbel noise (Philox keyed by the row's
``(seed, offset)``; one block of four words per pair of tiles, counter ``tile // 2``), the
tile with the largest key wins, and the token inside it is drawn by inverse CDF with a
second Philox uniform of that tile. One exp per logit and one random draw per tile.
``tau = 0`` is an exact argmax (lowest index on ties), never a uniform draw or a NaN. The
CPU and CUDA kernels implement the same procedure and draw the same tokens up to float
rounding at near-ties.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ._checks import is_real_number
from ._ops import ops

__all__ = ["sample", "temperature_logprobs"]

_SEED_HIGH = 2**62
MAX_TEMPERATURE_LOGPROBS = 16  # temperatures per temperature_logprobs call (the kernels' K)


def _per_row(value, batch: int, device, dtype, name: str, check) -> Optional[Tensor]:
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.dim() == 0:  # a scalar tensor: the same value for every row (no host read)
            value = value.reshape(1).expand(batch)
        if value.shape != (batch,):
            raise ValueError(f"{name} must be a scalar or a ({batch},) tensor, got shape "
                             f"{tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but logits are on {device}")
        if not dtype.is_floating_point:
            _check_integer_tensor(value, name)
        else:
            _check_real_tensor(value, name)
        # (detached: the ops have no gradient, so a temperature that requires grad would
        # otherwise give outputs that require grad and backpropagate nothing)
        value = value.detach()
        return value if value.dtype == dtype else value.to(dtype)  # (.to costs ~1 us even as a no-op)
    if not is_real_number(value):
        raise TypeError(f"{name} must be a number or a ({batch},) tensor, got {type(value).__name__}")
    check(value)
    # (numpy scalars; 50.0 as top_k)
    value = _as_float(value, name) if dtype.is_floating_point else int(value)
    if torch.compiler.is_compiling():
        # In a compiled graph a CPU tensor keeps the call out of CUDA graphs (reduce-overhead),
        # and the fill is part of the graph anyway.
        return torch.full((batch,), value, dtype=dtype, device=device)
    # One value for every row: a 0-d CPU tensor, which the op passes to its kernels by value
    # (a [B] tensor filled on the device cost a kernel per call).
    return torch.tensor(value, dtype=dtype)


def _as_float(value, name: str) -> float:
    try:
        return float(value)
    except OverflowError:  # (an int past float's range, e.g. 10**400)
        raise ValueError(f"{name} must be finite, got {value}") from None


def _switched_off(value, off_when) -> bool:
    """A number meaning "no truncation" (top_k = 0 or >= V, top_p = 1, min_p = 0): the call then
    runs as if it were not given, so that passing it changes neither the kernel nor the draws
    (top-p's rejection path runs only for top_p alone)."""
    return value is not None and not isinstance(value, Tensor) and is_real_number(value) and off_when(value)


def _check_integer_tensor(value: Tensor, name: str) -> None:
    """An integer parameter given as a tensor must hold integers: a float tensor would be
    truncated silently (e.g. seeds drawn with torch.rand would all become 0)."""
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")


def _check_real_tensor(value: Tensor, name: str) -> None:
    """A real-valued parameter given as a tensor (a complex one lost its imaginary part with
    only a warning)."""
    if value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must be a real tensor, got {value.dtype}")


def _check_temperature(t: float, name: str = "temperature") -> None:
    if not 0 <= _as_float(t, name) < math.inf:  # also rejects NaN
        raise ValueError(f"{name} must be finite and >= 0 (0 = greedy), got {t}")


def _is_whole(x) -> bool:
    return isinstance(x, numbers.Integral) or (math.isfinite(x) and float(x).is_integer())


def _check_top_k(k: int) -> None:
    if not _is_whole(k) or k < 0:
        raise ValueError(f"top_k must be a non-negative integer (0 = off), got {k}")


def _check_offset(o: int) -> None:
    if not _is_whole(o) or not 0 <= o < 2**63:
        raise ValueError(f"offset must be an integer in [0, 2^63), got {o}")


def _check_top_p(p: float) -> None:
    if not 0.0 < _as_float(p, "top_p") <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {p}")


def _check_min_p(p: float) -> None:
    if not 0.0 <= _as_float(p, "min_p") <= 1.0:
        raise ValueError(f"min_p must be in [0, 1] (0 = off), got {p}")


def _row_seeds(seed, batch: int, device, generator) -> Tensor:
    if seed is None:
        # Draw from torch's generator (torch.manual_seed / generator= are respected); the
        # draw stays on the device, so this is CUDA-graph safe and needs no host sync.
        return torch.randint(0, _SEED_HIGH, (batch,), device=device, generator=generator)
    if isinstance(seed, Tensor):
        if seed.shape != (batch,):
            raise ValueError(f"seed tensor must have shape ({batch},), got {tuple(seed.shape)}")
        if seed.device != device:
            raise ValueError(f"seed is on {seed.device} but logits are on {device}")
        _check_integer_tensor(seed, "seed")
        return seed if seed.dtype == torch.int64 else seed.to(torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be None, an int or an int64 tensor, got {type(seed).__name__}")
    # One int for the batch (taken modulo 2^62): distinct per-row streams derived from it,
    # (row * 0x5851F42D4C957F2D + seed) mod 2^62, so identical rows do not draw identical
    # tokens. Pass a seed tensor for position-independent seeds.
    base = int(seed) % _SEED_HIGH
    # One 0-d tensor, from which the op derives the rows' seeds: on the host (passed to the
    # kernels by value), or under torch.compile on the device (see _per_row; the kernels read
    # it). Forming the rows' seeds in the graph instead went wrong: Inductor folded the formula
    # into index arithmetic, which overflowed (CPU) or failed to compile (Triton: 32-bit).
    if torch.compiler.is_compiling():
        return torch.full((), base, dtype=torch.int64, device=device)
    return torch.tensor(base, dtype=torch.int64)


def _check_logits(logits, op: str) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(f"{op}: logits must be a [B, V] tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{op}: logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError(f"{op}: logits must have at least one column")


def sample(
    logits: Tensor,
    temperature: Union[float, Tensor],
    *,
    top_k: Union[int, Tensor, None] = None,
    top_p: Union[float, Tensor, None] = None,
    min_p: Union[float, Tensor, None] = None,
    seed: Union[int, Tensor, None] = None,
    offset: Union[int, Tensor, None] = None,
    generator: Optional[torch.Generator] = None,
    return_logprobs: bool = False,
):
    """Sample one token per row from ``softmax(logits / temperature)``.

    Args:
        logits: ``[B, V]`` float32, bfloat16 or float16 (read as is, no float32 copy on the
            GPU). ``-inf`` entries are never drawn; NaN entries count as ``-inf``. A row of
            all ``-inf`` (or NaN) returns token 0 and NaN log-probs. ``+inf`` entries count as
            the largest float: a row holding any draws uniformly among them.
        temperature: a number or a ``[B]`` (or 0-d) tensor; 0 = exact argmax (lowest index
            on ties). Negative, NaN or infinite raises ``ValueError`` (for CUDA tensors the
            check runs inside the kernel without a host sync: such rows return token 0 and
            NaN log-probs).
        top_k, top_p, min_p: optional truncation, scalar or ``[B]``, applied in this order to
            the tempered distribution (``top_k=0`` or ``>= V``, ``top_p=1``, ``min_p=0`` are
            off: given as numbers, the call draws as if they were not passed). Values
            outside ``top_k >= 0``, ``0 < top_p <= 1``, ``0 <= min_p <= 1`` raise
            ``ValueError``, or for CUDA tensors give such a row token 0 and NaN log-probs. Ties
            at a truncation boundary are all kept. top-p keeps the smallest set of largest
            entries whose mass reaches ``top_p``; on CUDA the masses are float32 exps summed
            in 2^-31 fixed point, so the boundary may differ from a float64 sum by one entry
            when the mass is within ~1e-6 + V * 2^-32 of ``top_p`` (and for such a row, with
            the row's alignment and batch size). Tokens-only calls
            with ``top_p`` alone (no ``top_k`` or ``min_p``) and ``0.5 <= top_p < 1`` draw
            by rejection: a draw from the whole tempered distribution is kept when it lies in
            the top-p set (probability >= top_p), else the row is drawn from the set: the
            top-p distribution (on CUDA of the threshold's set: draws near its boundary are
            left to the threshold), in two passes over most rows instead of five; calls
            with ``return_logprobs=True`` need the threshold anyway and draw from the set at
            once, so for the same seed their token may differ from a tokens-only call's.
        seed: None (draw per-row seeds from ``generator`` / torch's default generator: one
            small kernel), an int (taken modulo 2^62; row ``b`` draws with seed
            ``(b * 0x5851F42D4C957F2D + seed) mod 2^62``), or an int64 ``[B]`` tensor (a
            row's token then depends only on its logits, seed and offset, not on its batch
            position).
        offset: int in ``[0, 2^63)`` or int64 ``[B]`` tensor selecting an independent stream
            for the same seed (e.g. the decoding step). Default 0. Negative values raise, except
            in a CUDA tensor (not read on the host), where such a row draws from the stream of
            ``2^64 + offset``.
        generator: a ``torch.Generator`` for the per-row seeds when ``seed`` is None.
        return_logprobs: also return the chosen token's log-prob under the processed
            (tempered, truncated) distribution and under the raw ``softmax(logits)``.
            Not differentiable: the outputs never require grad.

    Returns:
        ``tokens`` (int64 ``[B]``), or ``(tokens, logprob, raw_logprob)``.

    Numbers (temperature, an int seed, offset, truncation values) reach the kernels by value:
    unlike ``[B]`` tensors made for them, they launch no kernel of their own, which matters in
    a decode step of a few microseconds. Under ``torch.compile`` they become small device
    tensors in the graph instead, so that CUDA graphs (``mode="reduce-overhead"``) capture the
    call; the draws are the same.
    """
    _check_logits(logits, "sample")
    if not isinstance(return_logprobs, bool):
        raise TypeError(f"return_logprobs must be a bool, got {type(return_logprobs).__name__}")
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both (a seed fixes the draws by itself)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    batch, device = logits.shape[0], logits.device
    if temperature is None:
        raise TypeError("temperature must be a number or a [B] tensor, got None")
    tau = _per_row(temperature, batch, device, torch.float32, "temperature", _check_temperature)
    if _switched_off(top_k, lambda k: _is_whole(k) and (k == 0 or k >= logits.shape[1])):
        top_k = None
    if _switched_off(top_p, lambda p: p == 1):
        top_p = None
    if _switched_off(min_p, lambda p: p == 0):
        min_p = None
    k = _per_row(top_k, batch, device, torch.int64, "top_k", _check_top_k)
    p = _per_row(top_p, batch, device, torch.float32, "top_p", _check_top_p)
    mp = _per_row(min_p, batch, device, torch.float32, "min_p", _check_min_p)
    seeds = _row_seeds(seed, batch, device, generator)
    # No offset = 0 for every row, without a zero-filled tensor (one kernel less).
    offsets = _per_row(offset, batch, device, torch.int64, "offset", _check_offset)
    # (detached: the ops have no gradient; their outputs never require one)
    tokens, logprob, raw_logprob = ops.sample(logits.detach(), tau, seeds, offsets, k, p, mp, return_logprobs)
    if return_logprobs:
        return tokens, logprob, raw_logprob
    return tokens


def temperature_logprobs(logits: Tensor, tokens: Tensor,
                         temperatures: Union[Tensor, Sequence[float], float]) -> Tensor:
    """``log p(tokens[b] | softmax(logits[b] / temperatures[k]))`` for every row and all K
    temperatures at once: ``[B, K]`` float32, one pass over the logits (shared max, K
    running sums). ``tau = 0`` gives 0 if the token is the argmax and ``-inf`` otherwise.
    NaN logits count as ``-inf`` (as in :func:`sample`).
    Used by LPO's latent-temperature loss. Not differentiable (the output never requires
    grad).

    Args:
        logits: ``[B, V]`` float32, bfloat16 or float16.
        tokens: integer ``[B]`` tensor on the logits' device, each in ``[0, V)`` (checked for
            CPU tensors; on CUDA an out-of-range token gives NaN, without a host sync).
        temperatures: 1 to 16 values >= 0 (a float, a sequence or a 1-D tensor). Negative, NaN
            or infinite values raise when given on the host; in a CUDA tensor they give NaN.
    """
    _check_logits(logits, "temperature_logprobs")
    batch, device = logits.shape[0], logits.device
    if not isinstance(tokens, Tensor) or tokens.shape != (batch,):
        raise ValueError(f"temperature_logprobs: tokens must be a ({batch},) tensor, got "
                         f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}")
    if tokens.device != device:
        raise ValueError(f"temperature_logprobs: tokens are on {tokens.device} but logits are on {device}")
    _check_integer_tensor(tokens, "tokens")
    if is_real_number(temperatures):
        temperatures = [temperatures]
    from_numbers = not isinstance(temperatures, Tensor)
    if from_numbers:
        try:
            values = list(temperatures)  # (a list, a tuple, a numpy array, ...)
        except TypeError:
            raise TypeError("temperature_logprobs: temperatures must be a number, a sequence of numbers "
                            f"or a 1-D tensor, got {type(temperatures).__name__}") from None
        if not all(is_real_number(t) for t in values):
            raise TypeError(f"temperature_logprobs: temperatures must be numbers, got {values}")
        for t in values:  # (checked as numbers: no tensor read, so torch.compile keeps one graph)
            _check_temperature(t, "temperature_logprobs: temperatures")
        temperatures = torch.tensor(values, dtype=torch.float32)
    _check_real_tensor(temperatures, "temperature_logprobs: temperatures")
    if temperatures.dim() != 1 or not 1 <= temperatures.numel() <= MAX_TEMPERATURE_LOGPROBS:
        raise ValueError(f"temperature_logprobs: temperatures must hold 1 to {MAX_TEMPERATURE_LOGPROBS} "
                         f"values, got shape {tuple(temperatures.shape)}")
    temperatures = temperatures.detach()  # (no gradient: see the docstring)
    if temperatures.device.type == "cpu" and not from_numbers and not torch.compiler.is_compiling():
        # (a CUDA tensor is not read on the host: no sync; under torch.compile the CPU op checks
        # its own tensor, for logits on the CPU)
        for t in temperatures.tolist():
            _check_temperature(t, "temperature_logprobs: temperatures")
    # (numbers: the host does not wait for the copy of the pageable tensor built here)
    temperatures = temperatures.to(device=device, dtype=torch.float32, non_blocking=from_numbers)
    return ops.temperature_logprobs(logits.detach(), tokens.to(torch.int64), temperatures)
