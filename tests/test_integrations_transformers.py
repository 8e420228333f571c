"""fusedlm.integrations.transformers: patched HF causal LMs give the unpatched loss and
gradients. Tiny random-init configs built locally (no downloads), float32 on CPU."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from fusedlm.integrations import transformers as fl_hf  # noqa: E402
from fusedlm.integrations.transformers import UnsupportedModelError, patch, unpatch  # noqa: E402

V = 97
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2)

# name -> (config class, model class, config overrides, softcap the patch must detect)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, None),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, None),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, None),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(head_dim=8, final_logit_softcapping=2.0), 2.0),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(head_dim=8, final_logit_softcapping=3.0), 3.0),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                  bos_token_id=0, eos_token_id=0), None),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.5), None),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=4.0), None),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                     router_aux_loss_coef=0.1), None),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def make_model(name, dtype=torch.float32):
    cfg_cls, model_cls, overrides, _ = FAMILIES[name]
    kw = dict(overrides) if name == "gpt2" else {**COMMON, **overrides}
    cfg = getattr(transformers, cfg_cls)(**kw)
    model = getattr(transformers, model_cls)(cfg).to(dtype)
    return model.eval()  # no dropout: patched and unpatched runs see identical networks


def make_batch(b=2, t=9):
    ids = torch.randint(0, V, (b, t))
    labels = ids.clone()
    labels[0, :3] = -100          # prompt tokens
    labels[1, -2:] = -100         # padding
    return ids, labels


def loss_and_grads(model, **inputs):
    out = model(**inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    return out, grads


def assert_grads_close(got, want, **tol):
    for g, w in zip(got, want):
        if w is None:
            assert g is None or float(g.abs().max()) == 0.0
        else:
            torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_same_loss_and_grads_as_unpatched(name, monkeypatch):
    model = make_model(name)
    ids, labels = make_batch()
    ref, ref_grads = loss_and_grads(model, input_ids=ids, labels=labels)

    calls = []
    real = fl_hf.linear_cross_entropy

    def spy(*args, **kw):
        calls.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(fl_hf, "linear_cross_entropy", spy)
    patch(model, filter_eps=None)
    out, grads = loss_and_grads(model, input_ids=ids, labels=labels)
    assert len(calls) == 1 and calls[0]["shift"] and calls[0]["filter_eps"] is None
    assert calls[0]["softcap"] == FAMILIES[name][3]
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
    if name in ("gpt2", "gemma2"):  # tied embeddings: one parameter, gradient from both uses
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_frozen_lm_head_lora_style():
    """A frozen (untied) lm_head, as in LoRA fine-tuning: the patched model's loss and the
    gradients of everything that trains match the unpatched model's, and lm_head gets none."""
    model = make_model("llama")
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    model.get_output_embeddings().weight.requires_grad_(False)
    ids, labels = make_batch()
    ref, ref_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    patch(model, filter_eps=None)
    out, grads = loss_and_grads(model, input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
    model(input_ids=ids, labels=labels).loss.backward()
    assert model.get_output_embeddings().weight.grad is None
    assert model.get_input_embeddings().weight.grad is not None


def test_gradient_accumulation_num_items_and_shift_labels():
    model = make_model("llama")
    ids, labels = make_batch()
    n = torch.tensor(23)
    ref, ref_grads = loss_and_grads(model, input_ids=ids, labels=labels, num_items_in_batch=n)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    ref2 = model(input_ids=ids, labels=labels, shift_labels=shifted).loss
    patch(model)
    out, grads = loss_and_grads(model, input_ids=ids, labels=labels, num_items_in_batch=n)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
    out2 = model(input_ids=ids, labels=labels, shift_labels=shifted)
    torch.testing.assert_close(out2.loss, ref2, rtol=1e-5, atol=1e-6)


def test_bfloat16_within_dtype_tolerance():
    model = make_model("gemma2", torch.bfloat16)
    ids, labels = make_batch()
    ref, ref_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    patch(model)  # default filter_eps="auto"
    out, grads = loss_and_grads(model, input_ids=ids, labels=labels)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss.float(), rtol=2e-2, atol=2e-2)
    for g, w in zip(grads, ref_grads):
        if w is not None:
            scale = float(w.float().abs().max()) + 1e-6
            assert float((g.float() - w.float()).abs().max()) <= 5e-2 * scale


def test_logits_on_request_tuple_output_and_no_labels():
    model = make_model("gemma2")
    ids, labels = make_batch()
    ref = model(input_ids=ids, labels=labels)
    plain = model(input_ids=ids).logits
    patch(model)
    # Without labels the original forward runs untouched.
    torch.testing.assert_close(model(input_ids=ids).logits, plain)
    # Per call...
    out = model(input_ids=ids, labels=labels, return_logits=True)
    assert type(out.logits) is torch.Tensor
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    # ...or for every call.
    patch(model, return_logits=True)
    torch.testing.assert_close(model(input_ids=ids, labels=labels).logits, ref.logits)
    # return_dict=False: HF tuples drop None entries, so loss comes first.
    tup = model(input_ids=ids, labels=labels, return_dict=False, use_cache=False)
    assert isinstance(tup, tuple)
    torch.testing.assert_close(tup[0], ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tup[1], ref.logits)
    unpatch(model)
    tup = model(input_ids=ids, labels=labels, return_dict=False, use_cache=False)
    assert len(tup) == 2


def test_unpatch_restores_exactly():
    model = make_model("gpt2")
    head = model.get_output_embeddings()
    before = (dict(model.__dict__), dict(head.__dict__))
    patch(model)
    assert fl_hf.is_patched(model) and "forward" in model.__dict__
    patch(model, z_loss=1e-4)  # re-patching replaces the options, stacks nothing
    unpatch(model)
    assert not fl_hf.is_patched(model)
    assert model.__dict__.keys() == before[0].keys() and head.__dict__.keys() == before[1].keys()
    assert model.forward.__func__ is type(model).forward
    assert head.forward.__func__ is type(head).forward
    unpatch(model)  # no-op

    # Deep copies (EMA / reference models) and pickles of a patched model use their own
    # parameters and can be unpatched on their own.
    patch(model)
    ids, labels = make_batch()
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.get_output_embeddings().weight.mul_(1.5)
    loaded = pickle.loads(pickle.dumps(clone))
    fused = clone(input_ids=ids, labels=labels).loss
    assert not torch.allclose(fused, model(input_ids=ids, labels=labels).loss)
    torch.testing.assert_close(loaded(input_ids=ids, labels=labels).loss, fused)
    torch.testing.assert_close(unpatch(clone)(input_ids=ids, labels=labels).loss, fused,
                               rtol=1e-5, atol=1e-6)
    assert fl_hf.is_patched(model) and fl_hf.is_patched(loaded)
    unpatch(model)
    assert model.__dict__.keys() == before[0].keys()

    # An instance-level forward that was there before (accelerate hooks do this) comes back.
    def custom(*a, **k):
        return type(model).forward(model, *a, **k)

    model.forward = custom
    patch(model)
    assert model.forward is not custom
    unpatch(model)
    assert model.forward is custom


def test_trainer_step_matches_unpatched(tmp_path, monkeypatch):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments

    base = make_model("llama")
    ids = torch.randint(0, V, (8, 10))
    data = []
    for i in range(8):
        labels = ids[i].clone()
        labels[: 1 + i % 4] = -100  # uneven label counts: num_items_in_batch matters
        data.append({"input_ids": ids[i], "labels": labels})

    def train(model, out):
        args = TrainingArguments(
            output_dir=str(tmp_path / out), per_device_train_batch_size=2,
            gradient_accumulation_steps=2, max_steps=2, learning_rate=0.5, optim="sgd",
            lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no",
            logging_steps=1, dataloader_num_workers=0, seed=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        result = trainer.train()
        return result.training_loss

    ref_model = copy.deepcopy(base)
    ref_loss = train(ref_model, "ref")
    reductions = []
    real = fl_hf.linear_cross_entropy

    def spy(*args, **kw):
        reductions.append(kw["reduction"])
        return real(*args, **kw)

    monkeypatch.setattr(fl_hf, "linear_cross_entropy", spy)
    model = patch(copy.deepcopy(base))
    loss = train(model, "patched")
    assert fl_hf.is_patched(model)
    # 2 steps x 2 accumulated micro-batches, each normalised by num_items_in_batch.
    assert reductions == ["sum"] * 4
    assert abs(loss - ref_loss) <= 1e-4 * abs(ref_loss)
    for (k, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=k)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters()))


def test_clear_errors_for_unsupported_models():
    with pytest.raises(UnsupportedModelError, match="not a Hugging Face"):
        patch(torch.nn.Linear(4, 4))
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32))
    with pytest.raises(UnsupportedModelError, match="ForMaskedLM"):
        patch(bert)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        patch(t5)
    seq = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**COMMON))
    with pytest.raises(UnsupportedModelError):
        patch(seq)
    with pytest.raises(TypeError, match="unsupported loss options"):
        patch(make_model("llama"), reduction="sum")
    assert not fl_hf.is_patched(bert) and not fl_hf.is_patched(seq)

    # A family that post-processes its logits in a way the fused loss cannot reproduce
    # fails loudly at the first forward with labels instead of returning a wrong loss.
    class LogSoftmaxHead(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits.log_softmax(-1)
            return out

    model = patch(LogSoftmaxHead(transformers.LlamaConfig(**COMMON)))
    ids, labels = make_batch()
    with pytest.raises(UnsupportedModelError, match="log_softmax"):
        model(input_ids=ids, labels=labels)
    model(input_ids=ids)  # still usable without labels


def _run_ranks(worker, world, tmp_path, path):
    """``worker(rank, world, store, path)`` in ``world`` processes. fork: the children inherit
    the imported modules (spawn would re-import for seconds). With a GPU, spawn: a forked
    child fails once autograd started its device threads (any backward of an earlier test)
    or CUDA started in this process."""
    import torch.multiprocessing as mp

    method = "fork" if "fork" in mp.get_all_start_methods() and not torch.cuda.is_available() else "spawn"
    mp.start_processes(worker, args=(world, str(tmp_path / "store"), path), nprocs=world,
                       join=True, start_method=method)


def _dist_worker(rank, world, store, path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    try:
        data = torch.load(path, weights_only=False)
        mesh = init_device_mesh("cpu", (world,))
        results = {}
        for wrap in ("ddp", "fsdp2"):
            for patched in (False, True):
                model = transformers.Gemma2ForCausalLM(data["cfg"]).eval()
                model.load_state_dict(data["state"])
                if patched:
                    patch(model, filter_eps=None)  # patch first, then wrap
                if wrap == "ddp":
                    wrapped = DDP(model)
                else:
                    for layer in model.model.layers:
                        fully_shard(layer, mesh=mesh)
                    wrapped = fully_shard(model, mesh=mesh)  # lm_head stays in the root unit
                out = wrapped(input_ids=data["ids"][rank], labels=data["labels"][rank])
                out.loss.backward()
                grads = {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                         for k, p in model.named_parameters()}
                results[wrap, patched] = (out.loss.detach(), grads)
        torch.save(results, f"{path}.rank{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp2_two_cpu_ranks(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    model = make_model("gemma2")  # tied embeddings + softcap
    ids = torch.randint(0, V, (2, 2, 7))
    labels = ids.clone()
    labels[0, 0, :2] = -100
    path = str(tmp_path / "inputs.pt")
    torch.save(dict(cfg=model.config, state=model.state_dict(), ids=ids, labels=labels), path)
    _run_ranks(_dist_worker, 2, tmp_path, path)
    for rank in range(2):
        res = torch.load(f"{path}.rank{rank}", weights_only=False)
        for wrap in ("ddp", "fsdp2"):
            (ref_loss, ref_grads), (loss, grads) = res[wrap, False], res[wrap, True]
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
            assert ref_grads.keys() == grads.keys()
            for k in grads:
                torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def test_moe_tuple_output_keeps_the_router_loss():
    # return_dict=False drops None fields: the router aux loss comes before the logits
    model = make_model("mixtral")
    ids, labels = make_batch()
    want = model(input_ids=ids, labels=labels, return_dict=False)
    patch(model)
    got = model(input_ids=ids, labels=labels, return_dict=False)
    torch.testing.assert_close(got[0], want[0])  # the loss, router aux loss included
    torch.testing.assert_close(got[1], want[1])  # the aux loss itself


def test_refuses_what_it_would_get_wrong():
    class OwnLoss(transformers.LlamaForCausalLM):
        """Computes its loss itself (as Qwen2Audio does), not with self.loss_function."""

        def forward(self, input_ids=None, labels=None, **kwargs):
            hidden = self.model(input_ids=input_ids, **kwargs).last_hidden_state
            logits = self.lm_head(hidden)
            loss = None
            if labels is not None:
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
            return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)

    with pytest.raises(UnsupportedModelError, match="loss itself"):
        patch(OwnLoss(transformers.LlamaConfig(**COMMON)))

    class LearnedScale(transformers.LlamaForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            self.logit_scale = torch.nn.Parameter(torch.tensor(0.7))

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * self.logit_scale
            return out

    model = patch(LearnedScale(transformers.LlamaConfig(**COMMON)))
    ids, labels = make_batch()
    with pytest.raises(UnsupportedModelError, match="learnable"):  # it would get no gradient
        model(input_ids=ids, labels=labels)

    with pytest.raises(UnsupportedModelError, match="torch.compile wrapper"):
        patch(torch.compile(make_model("llama")))


def _jetmoe():
    return transformers.JetMoeForCausalLM(transformers.JetMoeConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_key_value_heads=2,
        kv_channels=8, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
        aux_loss_coef=0.5))


def _qwen3_vl_moe():
    text = dict(COMMON, num_hidden_layers=1, head_dim=8, moe_intermediate_size=16, num_experts=4,
                num_experts_per_tok=2, router_aux_loss_coef=0.5, output_router_logits=True,
                decoder_sparse_step=1, rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=1, deepstack_visual_indexes=[0])
    return transformers.Qwen3VLMoeForConditionalGeneration(transformers.Qwen3VLMoeConfig(
        text_config=text, vision_config=vision, image_token_id=V - 1, video_token_id=V - 2,
        vision_start_token_id=V - 3))


@pytest.mark.parametrize("build", [_jetmoe, _qwen3_vl_moe])
def test_router_aux_loss_with_the_forwards_own_coefficient(build):
    # JetMoE weighs its router aux loss by self.aux_loss_coef, Qwen3-VL-MoE (Glm4vMoe, ...) by
    # self.config.text_config.router_aux_loss_coef: only model.router_aux_loss_coef was added.
    model = build().eval()
    ids, labels = make_batch()
    ids.clamp_(max=V - 4)  # (no image / video tokens)
    labels = torch.where(labels < 0, labels, ids)
    ref, ref_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    ref_tuple = model(input_ids=ids, labels=labels, return_dict=False)[0]
    assert float(ref.aux_loss.detach()) > 0
    patch(model, filter_eps=None)
    out, grads = loss_and_grads(model, input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
    got_tuple = model(input_ids=ids, labels=labels, return_dict=False)[0]
    torch.testing.assert_close(got_tuple, ref_tuple, rtol=1e-5, atol=1e-6)


def test_bamba_z_loss_is_reproduced():
    # BambaForCausalLM adds z_loss_coefficient * mean(logsumexp(logits)^2) over every position
    # (ignored ones too) when labels are given; the patched loss had dropped it.
    cfg = transformers.BambaConfig(**COMMON, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1,
                                   mamba_d_state=8, mamba_chunk_size=8, attn_layer_indices=[1],
                                   z_loss_coefficient=0.1)
    model = transformers.BambaForCausalLM(cfg).eval()
    ids, labels = make_batch()
    n = torch.tensor(11)
    ref, ref_grads = loss_and_grads(model, input_ids=ids, labels=labels, use_cache=False)
    ref_n = model(input_ids=ids, labels=labels, use_cache=False, num_items_in_batch=n).loss
    patch(model, filter_eps=None)
    out, grads = loss_and_grads(model, input_ids=ids, labels=labels, use_cache=False)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
    out_n = model(input_ids=ids, labels=labels, use_cache=False, num_items_in_batch=n)
    torch.testing.assert_close(out_n.loss, ref_n, rtol=1e-5, atol=1e-6)


class _RouterLoss(transformers.LlamaForCausalLM):
    """Adds a loss term that needs no labels, as GraniteDocling does."""

    def forward(self, input_ids=None, labels=None, router_labels=None, return_dict=True, **kwargs):
        logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        if router_labels is not None:  # (also computed without labels)
            router_loss = (self.model.embed_tokens.weight.mean() - router_labels).square()
            loss = router_loss if loss is None else loss + router_loss
        out = transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)
        return out if return_dict else out.to_tuple()


def test_extra_loss_terms_are_added_or_refused():
    model = _RouterLoss(transformers.LlamaConfig(**COMMON)).eval()
    ids, labels = make_batch()
    router_labels = torch.tensor(0.5)
    ref = model(input_ids=ids, labels=labels, router_labels=router_labels).loss
    patch(model, filter_eps=None)
    for return_dict in (True, False):
        got = model(input_ids=ids, labels=labels, router_labels=router_labels, return_dict=return_dict)
        torch.testing.assert_close(got.loss if return_dict else got[0], ref, rtol=1e-5, atol=1e-6)

    # Terms it does not know are refused, not dropped (the label-free forward never adds them).
    class ZLoss(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state)
            loss = None
            if labels is not None:
                loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
                loss = loss + 0.1 * logits.logsumexp(-1).mean()  # not Bamba's z-loss
            return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)

    class LocalCoefficient(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            out = self.model(input_ids=input_ids)
            logits = self.lm_head(out.last_hidden_state)
            loss = None
            coef = 0.1 * len(out)
            aux_loss = out.last_hidden_state.square().mean()
            if labels is not None:
                loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
                loss += coef * aux_loss  # a coefficient it cannot find
            return transformers.modeling_outputs.MoeCausalLMOutputWithPast(
                loss=loss, aux_loss=aux_loss, logits=logits)

    for cls, match in ((ZLoss, "logsumexp"), (LocalCoefficient, "coef \\* aux_loss")):
        with pytest.raises(UnsupportedModelError, match=match):
            patch(cls(transformers.LlamaConfig(**COMMON)))


def test_subclasses_that_compute_their_own_loss_after_super_forward():
    class SmoothedLoss(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            out = super().forward(input_ids=input_ids, **kwargs)
            loss = None
            if labels is not None:
                loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                       label_smoothing=0.2)
            return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=out.logits)

    class DoubledLoss(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            if out.loss is not None:
                out.loss = out.loss * 2
            return out

    class MasksLabels(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            if labels is not None:
                labels = labels.masked_fill(labels == 0, -100)
            return super().forward(input_ids=input_ids, labels=labels, **kwargs)

    cfg = transformers.LlamaConfig(**COMMON)
    for cls, match in ((SmoothedLoss, "loss of its own"), (DoubledLoss, "loss of its own"),
                       (MasksLabels, "changes its labels")):
        with pytest.raises(UnsupportedModelError, match=match):
            patch(cls(cfg))

    # The parent's loss does not see what a subclass does to the logits after super().forward()
    class ScalesLogits(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    model = patch(ScalesLogits(cfg))
    ids, labels = make_batch()
    with pytest.raises(UnsupportedModelError, match="after super"):
        model(input_ids=ids, labels=labels)

    # Subclasses that pass the parent's loss on are patched as before.
    class Plain(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    class PassesLossOn(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            out = super().forward(input_ids=input_ids, labels=labels, **kwargs)
            return transformers.modeling_outputs.CausalLMOutputWithPast(loss=out.loss, logits=out.logits)

    for cls in (Plain, PassesLossOn):
        model = cls(cfg).eval()
        ref = model(input_ids=ids, labels=labels).loss
        patch(model, filter_eps=None)
        torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, ref, rtol=1e-5, atol=1e-6)


def test_loss_over_part_of_the_logits_is_refused():
    # GIT's logits start with its image tokens, which it slices off before the loss: patching
    # it succeeded, then the first forward with labels raised a bare shape ValueError.
    cfg = transformers.GitConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, image_size=16, patch_size=8))
    with pytest.raises(UnsupportedModelError, match="shifted_logits"):
        patch(transformers.GitForCausalLM(cfg))

    # Slicing the logits to the labels (as Blip2 does) is found at the forward.
    class TailLoss(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state)
            loss = None
            if labels is not None:
                logits = logits[:, -labels.shape[1]:]
                loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
            return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)

    model = TailLoss(transformers.LlamaConfig(**COMMON)).eval()
    ids, labels = make_batch()
    ref = model(input_ids=ids, labels=labels).loss
    patch(model, filter_eps=None)
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(UnsupportedModelError, match="part of the logits"):
        model(input_ids=ids, labels=labels[:, 3:])


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_torch_compile_with_logits_on_request(name):
    # (the logits are computed from the recorded scalings / softcap, as the loss is)
    model = make_model(name)
    ids, labels = make_batch()
    ref = model(input_ids=ids, labels=labels)
    compiled = torch.compile(patch(model, return_logits=True), backend="aot_eager")
    out = compiled(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_logits_probe_view_chain_ends():
    # Reading a probe's _base returned a new probe view with a _base of its own, without end;
    # dynamo (torch 2.11) walks that chain when it meets the probe in a resumed frame, and
    # recursed until it failed (torch.compile of a patched Llama on CUDA).
    from fusedlm.integrations.transformers import _CapturingHeadForward

    model = make_model("llama")
    patch(model)
    head = model.get_output_embeddings()
    state = model.__dict__[fl_hf._STATE_ATTR]
    state.local.capture = fl_hf._Capture(want_logits=False)
    try:
        probe = _CapturingHeadForward(model, head)(torch.randn(2, 3, 32))
    finally:
        state.local.capture = None
    t, steps = probe, 0
    while t._is_view() and steps < 10:
        t, steps = t._base, steps + 1
    assert steps <= 1 and not t._is_view()


def _set_first_logits(logits):
    logits[..., :5] = -1e4  # vocabulary masking written into the logits


def _assign_data(logits):
    logits.data = logits.data * 2


def _scale_without_grad(logits):
    with torch.no_grad():  # scaled values, but no gradient through the scaling
        logits.mul_(2)


def _scale_by_changing_buffer(logits):
    scale = torch.tensor(2.0)
    out = logits * scale
    scale.fill_(5.0)  # the logits keep the scale they were multiplied by
    return out


# What a model's forward does to its lm_head output l before the loss -> whether the patch
# must refuse it (True) or fold it in (False). Writes into aliases (views, .data, .T) used to
# go unrecorded (the loss of the unmodified logits), and reads such as .data / .mT were
# passed through as if they were not the logits.
POST_PROCESSING = {
    "in-place softcap": (lambda l: (l.div_(2.0), l.tanh_(), l.mul_(2.0), None)[-1], False),
    "scale then softcap": (lambda l: torch.tanh(l * 0.5 / 3.0) * 3.0, False),
    "metadata reads": (lambda l: (l.grad, l._base, l.requires_grad, l.shape, None)[-1], False),
    "item assignment": (_set_first_logits, True),
    "masked_fill_": (lambda l: (l.masked_fill_(torch.rand(l.shape[-1]) < 0.5, -1e4), None)[-1], True),
    "write through a view": (lambda l: (l.view(l.shape).mul_(2), None)[-1], True),
    "write through .data": (lambda l: (l.data.mul_(2), None)[-1], True),
    "write through .T": (lambda l: (l.T.mul_(2), None)[-1], True),
    "copy_ into .data": (lambda l: (l.data.copy_(l.data * 3), None)[-1], True),
    "returns .T.T": (lambda l: l.T.T, True),
    "returns .data * 2": (lambda l: l.data * 2, True),
    "divides by l.data.norm()": (lambda l: l / l.data.norm(), True),
    "multiplies by l.mT.sum()": (lambda l: l * l.mT.sum(), True),
    # (a second review's cases)
    "a scale read with .item()": (lambda l: l * (l.sum().item() + 1.0), True),
    "a scale read with tolist()": (lambda l: l * (1 + len(str(l.tolist()))), True),
    "a probe inside a list argument": (lambda l: l * (torch.stack([l]).sum() + 1), True),
    "F.dropout in place on a view": (lambda l: (F.dropout(l.view(l.shape), 0.5, True, True), None)[-1], True),
    "F.relu in place on a view": (lambda l: (F.relu(l.view(l.shape), inplace=True), None)[-1], True),
    "aten mul_ on a view": (lambda l: (torch.ops.aten.mul_.Scalar(l.view(l.shape), 2), None)[-1], True),
    "assigns .data": (_assign_data, True),
    "casts to int and back": (lambda l: l.to(torch.int64).to(torch.float32), True),
    "casts to bfloat16": (lambda l: l.to(torch.bfloat16), True),
    "casts to float64": (lambda l: l.double(), False),
    "scales in place under no_grad": (_scale_without_grad, True),
    "a [V] bias": (lambda l: l + torch.linspace(-1, 1, V), True),
    "divides by 0": (lambda l: l / 0, True),
    "scales a copy, then writes the original": (lambda l: (l * 2, l.mul_(3))[0], False),
    "clones, then writes the original": (lambda l: (l.clone(), l.mul_(3))[0], False),
    "scales by a buffer changed after": (_scale_by_changing_buffer, False),
}


@pytest.mark.parametrize("case", list(POST_PROCESSING))
def test_post_processing_is_folded_or_refused_never_wrong(case):
    fn, refused = POST_PROCESSING[case]

    class Model(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state)
            out = fn(logits)
            logits = logits if out is None else out
            loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size)
            return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)

    torch.manual_seed(0)
    model = Model(transformers.LlamaConfig(**COMMON)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # logits of a few units: a lost scale shows
    ids, labels = make_batch()
    params = [p for p in model.parameters() if p.requires_grad]
    ref = model(input_ids=ids, labels=labels).loss
    patch(model, filter_eps=None)
    if refused:
        with pytest.raises(UnsupportedModelError):
            model(input_ids=ids, labels=labels)
        return
    loss = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    try:  # (some in-place post-processings leave the unpatched model without a backward)
        ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    except RuntimeError:
        return
    for g, w in zip(grads, ref_grads):
        if w is not None:
            assert float((g - w).abs().max()) <= 1e-4 * float(w.abs().max()) + 1e-7


def _dtensor_worker(rank, world, store, path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = make_model("llama")
        patch(model)
        mesh = init_device_mesh("cpu", (world,))
        inner = model.model.forward

        def dtensor_states(*args, **kwargs):  # as under tensor parallelism
            out = inner(*args, **kwargs)
            out.last_hidden_state = DTensor.from_local(out.last_hidden_state, mesh, [Replicate()])
            return out

        model.model.forward = dtensor_states
        ids, labels = make_batch()
        try:
            model(input_ids=ids, labels=labels)
            result = "no error"
        except UnsupportedModelError as err:
            result = str(err)
        torch.save(result, f"{path}.rank{rank}")
    finally:
        dist.destroy_process_group()


def test_dtensor_hidden_states_get_the_clear_error(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    path = str(tmp_path / "result")
    _run_ranks(_dtensor_worker, 1, tmp_path, path)
    assert "DTensor" in torch.load(f"{path}.rank0")
