"""Fake (meta) implementations of every fusedlm op, so the ops trace under torch.compile
and FakeTensor without running, and thin typed wrappers over ``torch.ops.fusedlm``."""
import torch
from torch import Tensor

ops = torch.ops.fusedlm

# csrc/cce/tile_max.h: kTileMaxWidth (a test checks that the op's output agrees).
TILE_MAX_WIDTH = 256


def _stat_dtype(e: Tensor) -> torch.dtype:
    # Per-token statistics are float32 (float64 when the inputs are float64).
    return torch.float64 if e.dtype == torch.float64 else torch.float32


@torch.library.register_fake("fusedlm::cce_forward")
def _cce_forward_fake(e, c, targets, bias, softcap, ignore_index, record_tile_max=False):
    torch._check(e.dim() == 2 and c.dim() == 2 and targets.dim() == 1)
    torch._check(e.shape[1] == c.shape[1])
    torch._check(targets.shape[0] == e.shape[0])
    n = e.shape[0]
    dt = _stat_dtype(e)
    # Per row, the largest logit of each TILE_MAX_WIDTH-wide vocabulary tile (on request).
    cols = (c.shape[0] + TILE_MAX_WIDTH - 1) // TILE_MAX_WIDTH
    tile_max = e.new_empty((n, cols) if record_tile_max else (0, 0), dtype=dt)
    return e.new_empty(n, dtype=dt), e.new_empty(n, dtype=dt), e.new_empty(n, dtype=dt), tile_max


@torch.library.register_fake("fusedlm::cce_backward")
def _cce_backward_fake(e, c, targets, bias, lse, grad_lse, grad_target, grad_sum, softcap,
                       filter_eps, accum_fp32, tile_max=None, target_logit=None,
                       need_grad_e=True, need_grad_c=True, need_grad_bias=True):
    torch._check(e.shape[1] == c.shape[1])
    # A gradient not asked for is empty (never computed), as is the bias's without a bias.
    grad_bias = (bias.new_empty(bias.shape if need_grad_bias else (0,)) if bias is not None
                 else c.new_empty(0))
    return (e.new_empty(e.shape if need_grad_e else (0,)),
            c.new_empty(c.shape if need_grad_c else (0,)), grad_bias)


def _same_device(op, logits, *tensors):
    for t in tensors:
        if t is not None:
            torch._check(t.device == logits.device, lambda: f"{op}: a tensor on {t.device}, logits on {logits.device}")


def _same_device_or_host_scalar(op, logits, *tensors):
    # sample's per-row parameters may be 0-d CPU tensors: one value for every row.
    _same_device(op, logits, *(t for t in tensors if t is not None and not (t.dim() == 0 and t.device.type == "cpu")))


@torch.library.register_fake("fusedlm::sample")
def _sample_fake(logits, temperature, seed, offset, top_k, top_p, min_p, need_logprobs=True):
    torch._check(logits.dim() == 2, lambda: "sample: logits must be [B, V]")
    _same_device_or_host_scalar("sample", logits, temperature, seed, offset, top_k, top_p, min_p)
    b = logits.shape[0]
    lp = b if need_logprobs else 0  # log-probs only on request (else empty)
    return (logits.new_empty(b, dtype=torch.int64), logits.new_empty(lp, dtype=torch.float32),
            logits.new_empty(lp, dtype=torch.float32))


@torch.library.register_fake("fusedlm::temperature_logprobs")
def _temperature_logprobs_fake(logits, tokens, temperatures):
    torch._check(logits.dim() == 2 and temperatures.dim() == 1,
                 lambda: "temperature_logprobs: logits must be [B, V] and temperatures 1-D")
    torch._check(tokens.dim() == 1 and tokens.shape[0] == logits.shape[0],
                 lambda: "temperature_logprobs: tokens must be [B]")
    _same_device("temperature_logprobs", logits, tokens, temperatures)
    return logits.new_empty(logits.shape[0], temperatures.shape[0], dtype=torch.float32)
