"""The hot paths never make the host wait for the GPU: under torch's sync debug mode "error"
every synchronising call (``.item()``, ``bool(tensor)``, ``nonzero``, a blocking copy to or
from the device, a stream synchronisation) raises."""
import contextlib

import pytest
import torch

import fusedlm

pytestmark = pytest.mark.cuda


@contextlib.contextmanager
def no_host_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_guard_catches_a_sync():
    # (the guard is live: otherwise the tests below could not fail)
    x = torch.ones(3, device="cuda")
    with pytest.raises(RuntimeError, match="synchroniz"):
        with no_host_sync():
            x.sum().item()


CCE_OPTIONS = [
    dict(),
    dict(filter_eps=None),
    dict(reduction="sum", bias=True),
    dict(reduction="none", softcap=30.0),
    dict(label_smoothing=0.1, z_loss=1e-4),
    dict(label_smoothing=0.1, softcap=20.0),
    dict(shift=True, return_lse=True),
    dict(frozen_c=True),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("options", CCE_OPTIONS, ids=lambda o: ",".join(o) or "default")
def test_cce_forward_and_backward(options, dtype, monkeypatch):
    options = dict(options)
    use_bias, frozen_c = options.pop("bias", False), options.pop("frozen_c", False)
    monkeypatch.setenv("FUSEDLM_CCE_WORKSPACE_MB", "1")  # the backward in 3 vocabulary chunks
    v, d = 9001, 136
    e = torch.randn(2, 45, d, device="cuda", dtype=dtype, requires_grad=True)
    c = (torch.randn(v, d, device="cuda", dtype=dtype) * 0.1).requires_grad_(not frozen_c)
    bias = torch.randn(v, device="cuda", dtype=dtype, requires_grad=True) if use_bias else None
    targets = torch.randint(0, v, (2, 45), device="cuda")
    targets[0, :5] = -100
    with no_host_sync():
        out = fusedlm.linear_cross_entropy(e, c, targets, bias, **options)
        loss = out[0] if isinstance(out, tuple) else out
        loss.sum().backward()
        with torch.no_grad():
            fusedlm.linear_cross_entropy(e, c, targets, bias, **options)
    assert e.grad is not None and (c.grad is None) == frozen_c


SAMPLE_OPTIONS = [
    dict(),
    dict(top_k=50),
    dict(top_p=0.9),                        # top-p by rejection
    dict(top_p=0.9, return_logprobs=True),  # top-p threshold
    dict(top_k=40, top_p=0.8, min_p=0.05, return_logprobs=True),
    dict(min_p=0.1),
    dict(seed=7, offset=3),
    dict(row_seeds=True),
    dict(generator=True),
]


@pytest.mark.parametrize("batch", [1, 37])
@pytest.mark.parametrize("options", SAMPLE_OPTIONS, ids=lambda o: ",".join(o) or "default")
def test_sample(options, batch):
    options = dict(options)
    v = 50257
    logits = torch.randn(batch, v, device="cuda", dtype=torch.bfloat16) * 3
    tau = torch.rand(batch, device="cuda") + 0.2
    if options.pop("row_seeds", False):
        options["seed"] = torch.randint(0, 2**40, (batch,), device="cuda")
        options["offset"] = torch.arange(batch, device="cuda")
    if options.pop("generator", False):
        options["generator"] = torch.Generator(device="cuda").manual_seed(3)
    with no_host_sync():
        fusedlm.sample(logits, tau, **options)
        fusedlm.sample(logits, 0.7, **options)  # a number for every row


def test_temperature_logprobs():
    logits = torch.randn(9, 1000, device="cuda")
    tokens = torch.randint(0, 1000, (9,), device="cuda")
    temps_gpu = torch.tensor([0.0, 0.5, 1.0], device="cuda")
    with no_host_sync():
        fusedlm.temperature_logprobs(logits, tokens, temps_gpu)
        fusedlm.temperature_logprobs(logits, tokens, [0.0, 0.7, 1.3])  # numbers: copied, not waited on
