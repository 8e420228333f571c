"""CPU tests of fusedlm.adaptive: the AdaptiveDecoder head, adaptive generation on tiny
random-init Hugging Face models (no downloads), the LPO losses and the trainer."""
import copy
import json
import math

import pytest
import torch

import fusedlm
from fusedlm.adaptive import (AdaptiveDecoder, LPOConfig, LPOTrainer, evaluate_rewards, generate,
                              left_pad, lpo_loss)
from fusedlm.adaptive.lpo import FORMS

transformers = pytest.importorskip("transformers")


def tiny_llama(vocab=64, seed=0, init=0.02):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4,
                                   intermediate_size=64, max_position_embeddings=64,
                                   initializer_range=init, bos_token_id=1, eos_token_id=2,
                                   pad_token_id=0, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(vocab=64, seed=0, init=0.02):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  initializer_range=init, bos_token_id=1, eos_token_id=2,
                                  pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
PROMPTS = [[5, 6, 7, 8, 9, 10], [3, 4], [11, 12, 13], [14], [20, 21, 22, 23]]


def random_head(level, d=32, temps=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), seed=1):
    torch.manual_seed(seed)
    head = AdaptiveDecoder(d, temps, level=level, mlp_hidden=24, zero_init=False)
    with torch.no_grad():
        head.mlp[-1].weight.mul_(20.0)  # a non-trivial distribution over temperatures
    return head


# --------------------------------------------------------------------------- head
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_head_shapes_levels_and_select(level):
    head = AdaptiveDecoder(16, level=level, mlp_hidden=8)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(16, 8), (8, 8), (8, 6)]
    assert sum(isinstance(m, torch.nn.SiLU) for m in head.mlp) == 2
    h = torch.randn(5, 7, 16)
    assert head(h).shape == (5, 7, 6)
    p = head.probs(h)
    torch.testing.assert_close(p, torch.full_like(p, 1 / 6))  # zero-init: exactly uniform
    assert head.level == level and head.temperatures.tolist() == pytest.approx([0, .2, .4, .6, .8, 1])
    head = random_head(level, d=16)
    idx, tau, lp = head.select(h[:, 0], "argmax")
    assert idx.shape == tau.shape == lp.shape == (5,)
    assert torch.equal(idx, head(h[:, 0]).argmax(-1))
    torch.testing.assert_close(tau, head.temperatures[idx])
    torch.testing.assert_close(lp, head.log_probs(h[:, 0]).gather(-1, idx[:, None])[:, 0])
    # tau sampling (Eq. 5) follows P(tau | h)
    row = h[:1, 0].expand(20000, -1)
    g = torch.Generator().manual_seed(0)
    idx, _, _ = head.select(row, "sample", generator=g)
    freq = torch.bincount(idx, minlength=6).double() / 20000
    torch.testing.assert_close(freq, head.probs(h[:1, 0])[0].double(), atol=0.015, rtol=0)
    with pytest.raises(ValueError):
        AdaptiveDecoder(16, level="paragraph")
    with pytest.raises(ValueError):
        head(torch.randn(2, 15))


def test_head_save_load_roundtrip(tmp_path):
    head = random_head("sequence", d=16, temps=(0.0, 0.5, 1.3))
    path = tmp_path / "sub" / "head.pt"
    head.save(path)
    loaded = AdaptiveDecoder.load(path)
    assert loaded.level == "sequence" and loaded.temperatures.tolist() == pytest.approx([0, .5, 1.3])
    assert loaded.mlp_hidden == 24 and loaded.num_layers == 3
    h = torch.randn(4, 16)
    torch.testing.assert_close(loaded(h), head(h))


# --------------------------------------------------------------------------- generation
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_tau0_equals_hf_greedy(arch):
    model = MODELS[arch](init=0.3)
    ids, mask = left_pad(PROMPTS, 0)
    # the head's argmax is tau = 0 (bias), so this goes through the head path
    head = AdaptiveDecoder(32, (1.0, 0.0, 0.5), level="token", mlp_hidden=8)
    with torch.no_grad():
        head.mlp[-1].bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                         pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]
    out = generate(model, head, ids, mask, max_new_tokens=10, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out.tokens, ref)
    assert (out.temperatures == 0).all() and (out.tau_index == 1).all()
    assert torch.equal(out.sequences[:, :ids.shape[1]], ids)
    # with a stop token that some rows hit early (and a fixed tau = 0 instead of the head)
    eos = int(ref[1, 2])
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                         pad_token_id=0, eos_token_id=eos)[:, ids.shape[1]:]
    for check_every in (1, 3):
        out = generate(model, None, ids, mask, temperature=0.0, max_new_tokens=10, eos_token_id=eos,
                       pad_token_id=0, eos_check_every=check_every)
        assert torch.equal(out.tokens, ref), check_every
        n = out.tokens.shape[1]
        assert out.finished[1]
        assert out.lengths[1] <= 3 and out.response_mask[1].sum() == out.lengths[1]
        assert out.responses()[1] == ref[1, : int(out.lengths[1]) - 1].tolist()
        assert (out.tokens[1, int(out.lengths[1]):] == 0).all() and n == ref.shape[1]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hidden_state_is_what_the_unembedding_reads(arch):
    model = MODELS[arch](init=0.3)
    ids, mask = left_pad(PROMPTS, 0)
    head = random_head("token")
    out = generate(model, head, ids, mask, max_new_tokens=5, eos_token_id=None, pad_token_id=0,
                   tau_mode="sample", seed=3, output_hidden_states=True,
                   output_temperature_logprobs=True)
    logits = model.get_output_embeddings()(out.hidden_states).float()  # [B, n, V]
    raw = torch.log_softmax(logits, -1).gather(-1, out.tokens[..., None])[..., 0]
    torch.testing.assert_close(out.raw_logprobs, raw, atol=1e-4, rtol=1e-4)
    # the [B, n, K] table matches the kernel on the same logits, and the sampled token's
    # processed log-prob is the column of the temperature that was used
    table = fusedlm.temperature_logprobs(logits.reshape(-1, logits.shape[-1]),
                                         out.tokens.reshape(-1), head.temperatures)
    torch.testing.assert_close(out.temperature_logprobs, table.view(out.tokens.shape + (6,)),
                               atol=1e-4, rtol=1e-4)
    used = out.temperature_logprobs.gather(-1, out.tau_index[..., None])[..., 0]
    torch.testing.assert_close(out.logprobs, used, atol=1e-4, rtol=1e-4)
    # the recorded log P(tau | h) is the head's on those hidden states
    lp = head.log_probs(out.hidden_states).gather(-1, out.tau_index[..., None])[..., 0]
    torch.testing.assert_close(out.tau_logprob, lp, atol=1e-5, rtol=1e-5)


def test_generate_levels_and_determinism():
    model = tiny_llama(init=0.3)
    rows = [p for p in PROMPTS for _ in range(4)]
    ids, mask = left_pad(rows, 0)
    kw = dict(max_new_tokens=8, eos_token_id=None, pad_token_id=0, tau_mode="sample",
              output_hidden_states=True)
    seq = generate(model, random_head("sequence"), ids, mask, seed=11, **kw)
    assert (seq.tau_index == seq.tau_index[:, :1]).all()  # one tau per reply
    assert len(set(seq.tau_index[:, 0].tolist())) > 1   # sampled, so rows differ
    tok = generate(model, random_head("token"), ids, mask, seed=11, **kw)
    assert (tok.tau_index != tok.tau_index[:, :1]).any()  # tau changes along the reply
    again = generate(model, random_head("token"), ids, mask, seed=11, **kw)
    assert torch.equal(tok.tokens, again.tokens) and torch.equal(tok.tau_index, again.tau_index)
    other = generate(model, random_head("token"), ids, mask, seed=12, **kw)
    assert not torch.equal(tok.tokens, other.tokens)
    # per-row fixed temperatures as a [B] tensor (the fixed-tau baseline path)
    taus = torch.tensor([0.0, 1.0] * (len(rows) // 2))
    fixed = generate(model, None, ids, mask, temperature=taus, seed=5, max_new_tokens=4,
                     eos_token_id=None, pad_token_id=0)
    greedy = generate(model, None, ids, mask, temperature=0.0, max_new_tokens=4,
                      eos_token_id=None, pad_token_id=0)
    assert torch.equal(fixed.tokens[::2], greedy.tokens[::2])
    assert torch.equal(fixed.temperatures, taus[:, None].expand(-1, 4))
    with pytest.raises(ValueError):
        generate(model, None, ids, mask)


# --------------------------------------------------------------------------- losses
def _side(p, n, d, k, level, gen):
    hidden = torch.randn(p, n, d, generator=gen)
    lengths = torch.randint(1, n + 1, (p,), generator=gen)
    mask = torch.arange(n)[None] < lengths[:, None]
    tau_index = torch.randint(0, k, (p, n), generator=gen)
    if level == "sequence":
        tau_index = tau_index[:, :1].expand(-1, n).clone()
    logits = torch.randn(p, n, 11, generator=gen) * 2
    tokens = torch.randint(0, 11, (p, n), generator=gen)
    tokens[:, 0] = logits[:, 0].argmax(-1)  # so tau = 0 has finite mass somewhere
    return dict(hidden_states=hidden, response_mask=mask, tau_index=tau_index,
                logits=logits, tokens=tokens)


def _hand_p_tau(head, h):
    """P(tau_k | h) with plain float64 math from the head's weights."""
    x = h.double()
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    for i, lin in enumerate(linears):
        x = x @ lin.weight.double().T + lin.bias.double()
        if i < len(linears) - 1:
            x = x * (1 / (1 + torch.exp(-x)))
    e = [math.exp(v) for v in x.tolist()]
    return [v / sum(e) for v in e]


def _hand_p_token(logits_row, token, tau):
    l = logits_row.double().tolist()
    if tau == 0:
        return 1.0 if token == max(range(len(l)), key=lambda i: (l[i], -i)) else 0.0
    e = [math.exp(v / tau) for v in l]
    return e[token] / sum(e)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_lpo_loss_separate_matches_hand_computation(level):
    gen = torch.Generator().manual_seed(0)
    head = random_head(level, d=8)
    c, r = (_side(3, 4, 8, 6, level, gen) for _ in range(2))
    beta = 0.7
    got = lpo_loss(head, c, r, form="separate", beta=beta, reduction="none")
    want = []
    for i in range(3):
        logp = []
        for side in (c, r):
            total = 0.0
            steps = [0] if level == "sequence" else [t for t in range(4) if side["response_mask"][i, t]]
            for t in steps:
                total += math.log(_hand_p_tau(head, side["hidden_states"][i, t])[int(side["tau_index"][i, t])])
            logp.append(total)
        want.append(-math.log(1 / (1 + math.exp(-beta * (logp[0] - logp[1])))))
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lpo_loss(head, c, r, beta=beta), got.mean())
    # NLL ablation: -log P(tau_chosen)
    nll = lpo_loss(head, c, r, form="nll", reduction="none")
    assert nll.shape == (3,) and (nll > 0).all()
    with pytest.raises(ValueError):
        lpo_loss(head, c, r, form="joint")


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_lpo_loss_latent_matches_hand_computation(level):
    gen = torch.Generator().manual_seed(1)
    temps = (0.0, 0.3, 0.7, 1.0)
    head = random_head(level, d=8, temps=temps)
    ref_head = random_head(level, d=8, temps=temps, seed=7)
    c, r = (_side(3, 4, 8, 4, level, gen) for _ in range(2))
    for side in (c, r):
        flat = fusedlm.temperature_logprobs(side["logits"].reshape(-1, 11), side["tokens"].reshape(-1),
                                            list(temps))
        side["temperature_logprobs"] = flat.view(3, 4, 4)

    def hand_loglik(h, side, i, p_tau_fn):
        steps = [t for t in range(4) if side["response_mask"][i, t]]
        tok = lambda t, k: _hand_p_token(side["logits"][i, t], int(side["tokens"][i, t]), temps[k])
        if level == "sequence":  # one shared tau: log sum_k P_k prod_t p_k(y_t)
            p = p_tau_fn(side["hidden_states"][i, 0])
            return math.log(sum(p[k] * math.prod(tok(t, k) for t in steps) for k in range(4)))
        return sum(math.log(sum(p_tau_fn(side["hidden_states"][i, t])[k] * tok(t, k)
                                for k in range(4))) for t in steps)

    beta = 1.3
    for reference, ref_fn in ((None, lambda h: [0.25] * 4),
                              (ref_head, lambda h: _hand_p_tau(ref_head, h))):
        got = lpo_loss(head, c, r, form="latent", beta=beta, reference=reference, reduction="none")
        want = []
        for i in range(3):
            pol = [hand_loglik(None, s, i, lambda h: _hand_p_tau(head, h)) for s in (c, r)]
            ref = [hand_loglik(None, s, i, ref_fn) for s in (c, r)]
            m = (pol[0] - ref[0]) - (pol[1] - ref[1])
            want.append(-math.log(1 / (1 + math.exp(-beta * m))))
        torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64),
                                   atol=1e-4, rtol=1e-4)


def test_gradients_reach_only_the_head():
    model = tiny_llama(init=0.3)
    for p in model.parameters():
        assert p.requires_grad  # not frozen here: generate() itself must not leak graph
    ids, mask = left_pad([p for p in PROMPTS for _ in range(2)], 0)
    for level in ("token", "sequence"):
        head = random_head(level)
        out = generate(model, head, ids, mask, max_new_tokens=5, eos_token_id=None, pad_token_id=0,
                       tau_mode="sample", seed=0, output_hidden_states=True,
                       output_temperature_logprobs=True)
        side = lambda rows: {k: getattr(out, k)[rows] for k in
                             ("hidden_states", "response_mask", "tau_index", "temperature_logprobs")}
        c, r = side(slice(0, None, 2)), side(slice(1, None, 2))
        for form in ("separate", "latent"):
            head.zero_grad(set_to_none=True)
            lpo_loss(head, c, r, form=form).backward()
            assert all(p.grad is None for p in model.parameters()), form
            for name, p in head.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, (level, form, name)


# --------------------------------------------------------------------------- trainer
def toy_task(model, n_prompts, gen_seed):
    """Kind A (first token 3): reward = reply equals the LM's greedy reply -> low tau wins.
    Kind B (first token 4): reward = reply unique within its group -> high tau wins."""
    g = torch.Generator().manual_seed(gen_seed)
    prompts = []
    for i in range(n_prompts):
        body = torch.randint(10, 60, (3,), generator=g).tolist()
        prompts.append({"input_ids": [1, 3 if i % 2 == 0 else 4] + body, "kind": "AB"[i % 2]})
    ids, mask = left_pad([p["input_ids"] for p in prompts], 0)
    greedy = generate(model, None, ids, mask, temperature=0.0, max_new_tokens=3, eos_token_id=None,
                      pad_token_id=0).tokens.tolist()
    for p, gr in zip(prompts, greedy):
        p["greedy"] = gr

    def reward(prompt, responses):
        if prompt["kind"] == "A":
            return [float(resp == prompt["greedy"]) for resp in responses]
        keys = [tuple(resp) for resp in responses]
        return [float(keys.count(k) == 1) for k in keys]

    return prompts, reward


def test_trainer_improves_reward_on_toy_task(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama(init=0.2, seed=0)
    train, reward = toy_task(model, 48, 0)
    test, _ = toy_task(model, 32, 1)
    ev = dict(num_samples=8, max_new_tokens=3, eos_token_id=None, pad_token_id=0, seed=1)
    for level in ("sequence", "token"):
        torch.manual_seed(0)
        head = AdaptiveDecoder(32, level=level, mlp_hidden=32, zero_init=False)
        before = evaluate_rewards(model, head, test, reward, tau_mode="sample", **ev)
        lm_state = {k: v.clone() for k, v in model.state_dict().items()}
        cfg = LPOConfig(num_samples=8, max_new_tokens=3, eos_token_id=None, pad_token_id=0,
                        epochs=6, batch_size=16, lr=3e-3, rounds=3, progress=False, seed=0,
                        checkpoint_dir=str(tmp_path / level))
        trainer = LPOTrainer(model, head, reward, cfg)
        history = trainer.fit(train)
        assert trainer.step <= 3 * 6 * 3  # bounded number of optimizer steps
        assert history[0]["pairs"] > 10
        after = evaluate_rewards(model, head.eval(), test, reward, **ev)  # argmax tau
        kinds = torch.tensor([p["kind"] == "A" for p in test])
        # (+0.15 held for this seed only by luck: over seeds 0-4 the token-level gain was
        # 0.07-0.25 here, and -0.08-0.33 with the earlier temperature-draw stream)
        assert after["reward"] > before["reward"] + 0.05, (level, before["reward"], after["reward"])
        assert after["mean_tau"][kinds].mean() < 0.2 < after["mean_tau"][~kinds].mean(), level
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in lm_state.items())
        # the checkpoint reloads into a fresh trainer and the head file into a fresh head
        loaded = AdaptiveDecoder.load(tmp_path / level / "head.pt")
        h = torch.randn(3, 32)
        torch.testing.assert_close(loaded(h), head(h))
        fresh = LPOTrainer(model, AdaptiveDecoder(32, level=level, mlp_hidden=32), reward, cfg)
        fresh.load_checkpoint(str(tmp_path / level / "lpo_checkpoint.pt"))
        assert fresh.step == trainer.step and fresh.round == cfg.rounds
        torch.testing.assert_close(fresh.head(h), head(h))


def test_cli_trains_a_head_for_a_local_hf_model(tmp_path):
    from fusedlm.adaptive import cli

    model = tiny_llama(init=0.3)
    model.save_pretrained(tmp_path / "model")
    ids, mask = left_pad([[1, 3, 10 + i] for i in range(8)], 0)
    greedy = generate(model, None, ids, mask, temperature=0.0, max_new_tokens=2,
                      eos_token_id=None, pad_token_id=0).tokens.tolist()
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"input_ids": [1, 3, 10 + i], "answer": greedy[i]}) + "\n")
    rc = cli.main(["--model", str(tmp_path / "model"), "--prompts", str(tmp_path / "prompts.jsonl"),
                   "--eval-prompts", str(tmp_path / "prompts.jsonl"), "--reward", "exact",
                   "--num-samples", "4", "--max-new-tokens", "2", "--eos-token-id", "63",
                   "--mlp-hidden", "16", "--epochs", "2", "--level", "token", "--loss", "latent",
                   "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress"])
    assert rc == 0
    head = AdaptiveDecoder.load(tmp_path / "run" / "head.pt")
    assert head.level == "token" and head.hidden_size == 32 and head.mlp_hidden == 16
    assert (tmp_path / "run" / "lpo_checkpoint.pt").exists()
    with pytest.raises(SystemExit):
        cli.main(["--help"])


def test_demo_task_rewards_and_one_tiny_seed():
    from dataclasses import replace

    from fusedlm.adaptive import demo

    s = replace(demo.QUICK, lm_steps=20, train_prompts=16, eval_prompts=8, epochs=1,
                head_hidden=16, losses=("separate",))
    task = demo.Task(s)
    fact = task.fact_prompt(7, 8)
    assert fact["answer"] == [demo.DIGIT0 + 1, demo.DIGIT0 + 5]
    assert task.reward(fact, [fact["answer"], [demo.DIGIT0 + 1, demo.DIGIT0 + 4], []]) == [1.0, 0.0, 0.0]
    cre = task.creative_prompt(2, 5)
    a, b = task.first[2][0], task.second[2][1]
    bad = task.second[0][0]
    assert task.reward(cre, [[a, b], [a, b], [b, a], [a, task.second[2][0]], [a, bad]]) == \
        [0.0, 0.0, 0.0, 1.0, 0.0]
    corpus = task.corpus(200, torch.Generator().manual_seed(0))
    assert corpus.shape == (200, 8) and int(corpus.max()) < task.vocab_size
    rows = demo.run_seed(0, s, torch.device("cpu"), progress=False)
    assert [r["method"] for r in rows][-2:] == ["AD_seq Eq.10", "AD_tok Eq.10"]
    assert all(0.0 <= r["mix"] <= 1.0 for r in rows)
    assert rows[0]["method"] == "fixed τ=0" and rows[0]["creative"] == 0.0  # greedy always collides


def test_generate_bfloat16_model():
    model = tiny_llama(init=0.3).to(torch.bfloat16)
    ids, mask = left_pad(PROMPTS, 0)
    head = random_head("token")  # float32 head on a bfloat16 LM
    out = generate(model, head, ids, mask, max_new_tokens=4, eos_token_id=None, pad_token_id=0,
                   tau_mode="sample", seed=0, output_hidden_states=True,
                   output_temperature_logprobs=True)
    assert out.hidden_states.dtype == torch.bfloat16
    assert torch.isfinite(out.tau_logprob).all() and out.tokens.shape == (5, 4)
    greedy = generate(model, None, ids, mask, temperature=0.0, max_new_tokens=4,
                      eos_token_id=None, pad_token_id=0)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                         pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]
    assert torch.equal(greedy.tokens, ref)


# ----------------------------------------------------------- reproducibility and bad input
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_sampled_temperatures_do_not_depend_on_the_batch_position(level):
    # With a per-row seed tensor a row's reply (tokens and temperatures) depends only on its
    # prompt and seed: the same rows permuted, or one row alone, give the same replies.
    model = tiny_llama(init=0.3)
    rows = [[5, 6, 7], [3, 4, 9], [11, 12, 13], [14, 15, 16]] * 2
    seeds = torch.tensor([101, 202, 303, 404, 505, 606, 707, 808])
    kw = dict(max_new_tokens=6, eos_token_id=None, pad_token_id=0, tau_mode="sample")
    torch.manual_seed(0)
    head = AdaptiveDecoder(32, level=level, zero_init=True)  # uniform P(tau | h): varied draws
    ids, mask = left_pad(rows, 0)
    base = generate(model, head, ids, mask, seed=seeds, **kw)
    perm = torch.tensor([2, 0, 7, 3, 5, 1, 4, 6])
    permuted = generate(model, head, ids[perm], mask[perm], seed=seeds[perm], **kw)
    assert torch.equal(permuted.tokens, base.tokens[perm])
    assert torch.equal(permuted.tau_index, base.tau_index[perm])
    alone = generate(model, head, ids[1:2], mask[1:2], seed=seeds[1:2], **kw)
    assert torch.equal(alone.tau_index, base.tau_index[1:2]) and torch.equal(alone.tokens, base.tokens[1:2])
    assert len(set(base.tau_index.flatten().tolist())) > 1  # (sampled: not all the same)


def test_generate_refuses_inputs_it_would_get_wrong():
    model = tiny_llama()
    ids, mask = left_pad([[5, 6, 7], [3, 4]], 0)
    kw = dict(max_new_tokens=2, eos_token_id=None, pad_token_id=0, temperature=1.0)
    with pytest.raises(TypeError, match="integer tensor"):  # float seeds would all be 0
        generate(model, None, ids, mask, seed=torch.rand(2), **kw)
    with pytest.raises(ValueError, match="left-padded"):  # right padding
        generate(model, None, ids, mask.flip(1), **kw)
    with pytest.raises(ValueError, match="empty prompt"):
        left_pad([[5, 6], []], 0)
    with pytest.raises(ValueError, match="eos_check_every"):
        generate(model, None, ids, mask, eos_check_every=0, **kw)


def test_lpo_loss_refuses_missing_temperatures_and_bad_reduction():
    gen = torch.Generator().manual_seed(0)
    head = random_head("token", d=8)
    chosen, rejected = _side(4, 5, 8, 6, "token", gen), _side(4, 5, 8, 6, "token", gen)
    lpo_loss(head, chosen, rejected)  # valid
    chosen["tau_index"][0, 0] = -1  # a step without a head temperature, inside the reply
    for form in ("separate", "nll"):
        with pytest.raises(ValueError, match="tau_index is -1"):
            lpo_loss(head, chosen, rejected, form=form)
    chosen["response_mask"][0, 0] = False  # outside the reply it is ignored
    lpo_loss(head, chosen, rejected)
    with pytest.raises(ValueError, match="reduction"):
        lpo_loss(head, chosen, rejected, form="nll", reduction="avg")


def test_lpo_loss_refuses_what_would_broadcast_or_train_nothing():
    """Inputs that used to give a loss without an error: a beta <= 0 (log 2 and no gradient,
    or the preference reversed), chosen / rejected / reference rows that broadcast, a
    temperature table of another K (a constant loss), a level typo (read as token level) and
    an empty batch (NaN)."""
    gen = torch.Generator().manual_seed(0)
    head = random_head("sequence", d=8)
    c, r = _side(3, 4, 8, 6, "sequence", gen), _side(3, 4, 8, 6, "sequence", gen)
    for side in (c, r):
        side["temperature_logprobs"] = torch.randn(3, 4, 6, generator=gen).clamp(max=0)
    for form in FORMS:
        lpo_loss(head, c, r, form=form)  # valid
    for beta in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="beta"):
            lpo_loss(head, c, r, beta=beta)
    one_row = {k: v[:1] for k, v in c.items()}
    for form in FORMS:
        with pytest.raises(ValueError, match="rows"):
            lpo_loss(head, one_row, r, form=form)
    with pytest.raises(ValueError, match="temperature_logprobs"):
        lpo_loss(head, c, dict(r, temperature_logprobs=r["temperature_logprobs"][..., :1]), form="latent")
    with pytest.raises(ValueError, match="reference"):
        lpo_loss(head, c, r, form="latent", reference=(torch.zeros(1), torch.zeros(1)))
    with pytest.raises(ValueError, match="level"):
        lpo_loss(head, c, r, level="seq")
    empty = {k: v[:0] for k, v in c.items()}
    with pytest.raises(ValueError, match="no preference pairs"):
        lpo_loss(head, empty, empty)


def test_masked_positions_do_not_reach_the_separate_loss():
    gen = torch.Generator().manual_seed(0)
    head = random_head("token", d=8)
    c, r = _side(3, 4, 8, 6, "token", gen), _side(3, 4, 8, 6, "token", gen)
    c["response_mask"][:, -1] = False
    want = lpo_loss(head, c, r, reduction="none")
    c["hidden_states"][:, -1] = math.inf  # (masked by multiplying, inf * 0 was NaN)
    torch.testing.assert_close(lpo_loss(head, c, r, reduction="none"), want)


def test_head_and_trainer_refuse_settings_that_fail_later_or_train_nothing():
    for temps in ([0.0, math.inf], [0.5, 0.5], [], [-1.0]):
        with pytest.raises(ValueError, match="temperatures"):
            AdaptiveDecoder(8, temps)
    for kw in (dict(hidden_size=0), dict(mlp_hidden=0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            AdaptiveDecoder(**{"hidden_size": 8, **kw})
    for kw in (dict(beta=0.0), dict(beta=-1.0), dict(batch_size=0), dict(epochs=0), dict(rounds=0),
               dict(gen_batch_size=0), dict(max_new_tokens=0)):
        with pytest.raises(ValueError):
            LPOConfig(**kw)
    head17 = AdaptiveDecoder(32, [0.1 * i for i in range(17)], mlp_hidden=8)
    with pytest.raises(ValueError, match="at most 16"):
        LPOTrainer(tiny_llama(), head17, lambda p, rs: [0.0] * len(rs), LPOConfig(loss="latent"))


@pytest.mark.parametrize("args", [["--beta", "0"], ["--temperatures", "0,abc"], ["--temperatures", "1,-1"],
                                  ["--num-samples", "1"], ["--batch-size", "0"], ["--epochs", "0"],
                                  ["--reward", "exact"], ["--dtype", "float16"],
                                  ["--loss", "latent", "--temperatures", ",".join(str(i) for i in range(17))]])
def test_cli_refuses_bad_settings_before_loading_the_model(args, capsys):
    from fusedlm.adaptive.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "demo", *args])  # (--model demo would pre-train its LM first)
    assert exit_info.value.code == 2 and "error" in capsys.readouterr().err


def test_trainer_refuses_latent_loss_with_truncation_and_nan_rewards():
    for kw in (dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1)):
        with pytest.raises(ValueError, match="untruncated"):
            LPOConfig(loss="latent", **kw)
    LPOConfig(loss="separate", top_k=5)  # the separate form reads only log P(tau | h)
    model = tiny_llama()
    cfg = LPOConfig(num_samples=2, max_new_tokens=2, eos_token_id=None, pad_token_id=0,
                    progress=False)
    trainer = LPOTrainer(model, random_head("token"), lambda p, rs: [1.0, float("nan")], cfg)
    with pytest.raises(ValueError, match="NaN"):
        trainer.build_pairs([[5, 6, 7]])
    with pytest.raises(ValueError, match="checkpoint_dir"):
        trainer.save_checkpoint()


def test_checkpoint_of_another_head_configuration_is_refused(tmp_path):
    model = tiny_llama()
    cfg = LPOConfig(num_samples=2, max_new_tokens=2, eos_token_id=None, pad_token_id=0,
                    progress=False, checkpoint_dir=str(tmp_path))
    path = LPOTrainer(model, random_head("token"), lambda p, rs: [0.0, 1.0], cfg).save_checkpoint()
    for other in (random_head("sequence"), random_head("token", temps=(0.0, 0.5, 1.0))):
        with pytest.raises(ValueError, match="another configuration"):
            LPOTrainer(model, other, lambda p, rs: [0.0, 1.0], cfg).load_checkpoint(path)


def test_resume_from_a_mid_round_checkpoint_matches_the_uninterrupted_run(tmp_path):
    model = tiny_llama(init=0.2)
    train, reward = toy_task(model, 24, 0)

    def trainer(directory, every):
        torch.manual_seed(0)
        head = AdaptiveDecoder(32, level="token", mlp_hidden=16, zero_init=False)
        cfg = LPOConfig(num_samples=8, max_new_tokens=3, eos_token_id=None, pad_token_id=0,
                        epochs=2, batch_size=2, lr=3e-3, rounds=2, progress=False, seed=0,
                        checkpoint_dir=str(directory), checkpoint_every=every)
        return LPOTrainer(model, head, reward, cfg)

    whole = trainer(tmp_path / "whole", 0)
    whole.fit(train)
    assert whole.step > 5
    crashing = trainer(tmp_path / "resume", 5)

    class Crash(Exception):
        pass

    save = crashing.save_checkpoint

    def save_then_crash(path=None):
        save(path)
        raise Crash

    crashing.save_checkpoint = save_then_crash
    with pytest.raises(Crash):
        crashing.fit(train)
    resumed = trainer(tmp_path / "resume", 0)
    resumed.load_checkpoint(str(tmp_path / "resume" / "lpo_checkpoint.pt"))
    assert resumed.step == 5
    resumed.fit(train)
    assert resumed.step == whole.step and resumed.round == whole.round
    h = torch.randn(5, 32)
    torch.testing.assert_close(resumed.head(h), whole.head(h))


def test_cli_chat_template_output_as_a_mapping():
    # transformers 5 returns a BatchEncoding (a Mapping, not a dict) from apply_chat_template
    from collections import UserDict

    from fusedlm.adaptive import cli

    class Tokenizer:
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return UserDict(input_ids=[7, 8, 9], attention_mask=[1, 1, 1])

    records = cli._tokenize([{"prompt": "hi"}], Tokenizer(), chat=True)
    assert records[0]["input_ids"] == [7, 8, 9]


def test_lpo_loss_trains_only_the_head_even_with_a_graph_on_the_hidden_states():
    gen = torch.Generator().manual_seed(0)
    head = random_head("token", d=8)
    chosen, rejected = _side(4, 5, 8, 6, "token", gen), _side(4, 5, 8, 6, "token", gen)
    for side in (chosen, rejected):
        side["hidden_states"].requires_grad_()
    lpo_loss(head, chosen, rejected).backward()
    assert chosen["hidden_states"].grad is None and rejected["hidden_states"].grad is None
    assert all(p.grad is not None for p in head.parameters())


def test_trainer_leaves_the_lm_as_it_was_and_generates_without_dropout():
    # A caller's LM in training mode (dropout on, parameters trainable) keeps its flags; the
    # replies are generated in eval mode all the same: the same pairs as from the LM in eval.
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4,
                                   intermediate_size=64, initializer_range=0.3,
                                   attention_dropout=0.5, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg)
    model.model.layers[1].eval()  # mixed flags come back as they were, module by module
    flags = {n: m.training for n, m in model.named_modules()}
    train, reward = toy_task(model.eval(), 12, 0)
    model.train()
    model.model.layers[1].eval()
    lpo = LPOConfig(num_samples=4, max_new_tokens=3, eos_token_id=None, pad_token_id=0,
                    epochs=1, batch_size=4, progress=False, seed=0)

    def pairs(lm):
        torch.manual_seed(0)
        head = AdaptiveDecoder(32, level="token", mlp_hidden=16, zero_init=False)
        return LPOTrainer(lm, head, reward, lpo).build_pairs(train)

    in_training = pairs(model)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(p.requires_grad for p in model.parameters())
    in_eval = pairs(copy.deepcopy(model).eval())
    assert len(in_training) > 0
    for side in ("chosen", "rejected"):
        for k, v in getattr(in_eval, side).items():
            torch.testing.assert_close(getattr(in_training, side)[k], v, rtol=0, atol=0)
