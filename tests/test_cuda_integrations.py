"""GPU tests of the layers above the kernels (pytest -m cuda): patched Hugging Face models
training on the CUDA CCE kernels, and adaptive generation / LPO training on the CUDA
sampler, against the unpatched models and the same runs on the CPU."""
import copy

import pytest
import torch

from fusedlm.adaptive import AdaptiveDecoder, LPOConfig, LPOTrainer, generate, left_pad

transformers = pytest.importorskip("transformers")

from fusedlm.integrations.transformers import patch  # noqa: E402
from test_adaptive import tiny_llama, toy_task  # noqa: E402
from test_integrations_transformers import FAMILIES, V, make_model  # noqa: E402
from test_integrations_transformers import loss_and_grads as output_and_grads  # noqa: E402

pytestmark = pytest.mark.cuda
DEV = "cuda"


def batch(b=3, t=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100   # prompt tokens
    labels[2, -7:] = -100  # padding
    return ids.to(DEV), labels.to(DEV)


def sharpen(model, target=4.0):
    """Scale the lm_head so that the logits reach a few units: at init they stay below ~0.5,
    where a softcap of 2-3 is nearly the identity (a lost softcap would go unnoticed)."""
    head = model.get_output_embeddings()
    with torch.no_grad():
        ids = torch.arange(16, device=head.weight.device)[None] % V
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        head.weight.mul_(target / float((h.float() @ head.weight.float().T).abs().max()))


def loss_and_grads(model, ids, labels):
    out, grads = output_and_grads(model, input_ids=ids, labels=labels)
    return out.loss, grads


def max_errors(grads, truth):
    """Per parameter: max |g - truth|, relative to max |truth|."""
    errs = []
    for g, w in zip(grads, truth):
        if w is None:
            assert g is None or float(g.abs().max()) == 0.0
            continue
        w = w.double().cpu()
        errs.append(float((g.double().cpu() - w).abs().max()) / (float(w.abs().max()) + 1e-30))
    return torch.tensor(errs)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_patched_model_on_cuda_within_the_unpatched_models_error(name):
    """bf16 on the GPU: the patched model's loss and every parameter's gradient are as close
    to the float64 truth (the same bf16 weights, in float64 on the CPU) as the unpatched bf16
    model's are."""
    torch.manual_seed(0)
    model = make_model(name, torch.bfloat16)  # eval: no dropout
    sharpen(model)
    ids, labels = batch()
    # (Mixtral's grouped expert matmul has no float64 kernel: float32 is its truth, ~1e5x
    # closer than bf16)
    truth_dtype = torch.float32 if name == "mixtral" else torch.float64
    truth_loss, truth = loss_and_grads(copy.deepcopy(model).to(truth_dtype), ids.cpu(), labels.cpu())
    model = model.to(DEV)
    ref_loss, ref = loss_and_grads(model, ids, labels)
    patch(model)  # filter_eps="auto": the default a user gets
    loss, grads = loss_and_grads(model, ids, labels)
    assert loss.dtype == torch.float32 and loss.device.type == DEV
    ref_err = abs(float(ref_loss.detach()) - float(truth_loss.detach()))
    assert abs(float(loss.detach()) - float(truth_loss.detach())) <= 2 * ref_err + 2e-4 * abs(float(truth_loss.detach()))
    got, want = max_errors(grads, truth), max_errors(ref, truth)
    assert (got <= 2 * want + 1e-2).all(), (got, want)
    assert float(got.median()) <= 1.5 * float(want.median()) + 1e-3, (got, want)


@pytest.mark.parametrize("name", ["llama", "gemma2", "gemma3", "cohere", "mixtral"])
def test_patched_model_on_cuda_float32_exact_mode(name):
    """float32 on the GPU (TF32 tensor cores in the CCE kernels), exact mode: the same loss and
    gradients as the unpatched float32 model to TF32 accuracy."""
    torch.manual_seed(0)
    model = make_model(name).to(DEV)
    sharpen(model)
    ids, labels = batch()
    ref_loss, ref = loss_and_grads(model, ids, labels)
    patch(model, filter_eps=None)
    loss, grads = loss_and_grads(model, ids, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-3, atol=2e-3)
    assert (max_errors(grads, ref) <= 1e-2).all()


def test_patched_llama_under_torch_compile_on_cuda():
    torch.manual_seed(0)
    model = make_model("llama").to(DEV, torch.bfloat16)
    ids, labels = batch()
    patch(model)
    eager_loss, eager = loss_and_grads(model, ids, labels)
    compiled = torch.compile(model)
    for _ in range(2):  # (the second call runs the compiled graph without recompiling)
        loss, grads = loss_and_grads(compiled, ids, labels)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-2, atol=1e-2)
        assert (max_errors(grads, eager) <= 5e-2).all()


def test_adaptive_generation_on_cuda_matches_the_cpu():
    # float64 LM on both devices: the logits agree to ~1e-6 (the rotary tables are float32 on
    # both, from different libm's), so the CUDA sampler (tokens and head-sampled temperatures
    # on per-row Philox streams) draws what the CPU kernel draws.
    model = tiny_llama(init=0.3).double()
    torch.manual_seed(0)
    head = AdaptiveDecoder(32, level="token", mlp_hidden=16, zero_init=False)
    rows = [[5, 6, 7], [3, 4, 9, 1], [11], [14, 15, 16, 17, 18]] * 3
    ids, mask = left_pad(rows, 0)
    seeds = torch.arange(len(rows)) * 7919 + 3
    kw = dict(max_new_tokens=8, eos_token_id=None, pad_token_id=0, tau_mode="sample",
              output_hidden_states=True, output_temperature_logprobs=True)
    cpu = generate(model, head, ids, mask, seed=seeds, **kw)
    gpu = generate(model.to(DEV), head.to(DEV), ids.to(DEV), mask.to(DEV), seed=seeds.to(DEV), **kw)
    assert torch.equal(gpu.tau_index.cpu(), cpu.tau_index)
    assert torch.equal(gpu.tokens.cpu(), cpu.tokens)
    assert len(set(cpu.tau_index.flatten().tolist())) > 1
    torch.testing.assert_close(gpu.hidden_states.cpu(), cpu.hidden_states, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gpu.temperature_logprobs.cpu(), cpu.temperature_logprobs,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gpu.logprobs.cpu(), cpu.logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss", ["separate", "latent"])
def test_lpo_training_on_cuda_matches_the_cpu(loss):
    model = tiny_llama(init=0.2).double()
    train, reward = toy_task(model, 16, 0)

    def fit(device):
        torch.manual_seed(0)
        head = AdaptiveDecoder(32, level="token", mlp_hidden=16, zero_init=False)
        cfg = LPOConfig(num_samples=8, max_new_tokens=3, eos_token_id=None, pad_token_id=0,
                        epochs=2, batch_size=4, lr=3e-3, rounds=1, progress=False, seed=0,
                        loss=loss)
        trainer = LPOTrainer(model.to(device), head, reward, cfg)
        return trainer, trainer.fit(train)

    cpu, cpu_hist = fit("cpu")
    gpu, gpu_hist = fit(DEV)
    assert gpu_hist[0]["pairs"] == cpu_hist[0]["pairs"] > 0
    assert gpu.step == cpu.step > 0
    for (k, a), b in zip(cpu.head.state_dict().items(), gpu.head.state_dict().values()):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5, msg=k)
    assert next(gpu.head.parameters()).device.type == DEV
