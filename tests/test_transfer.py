"""CPU tests of fusedlm.transfer (attention copy / distillation on timm ViTs).

Every check compares against an explicit, non-fused float64 reference that walks the timm
ViT block by block and materialises the softmax attention maps.
"""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")
from timm.layers import Attention  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from fusedlm.transfer import (AttentionTransfer, AttentionTransferWarning,  # noqa: E402
                              architecture_signature, attention_distill_loss,
                              attention_distill_loss_from_qk, default_layers)

IMG, PATCH = 16, 4
N_TOK = (IMG // PATCH) ** 2 + 1  # patches + CLS


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def make_vit(seed=0, depth=3, heads=4, dim=32, img=IMG, qk_norm=False, reg_tokens=0,
             num_classes=5, dtype=torch.float64):
    """A tiny ViT with large random weights, so that attention maps are far from uniform
    (timm's own init gives nearly uniform maps, which would make copy ~ no-op)."""
    torch.manual_seed(seed)
    m = VisionTransformer(img_size=img, patch_size=PATCH, in_chans=3, num_classes=num_classes,
                          embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=2.0,
                          qkv_bias=True, qk_norm=qk_norm, reg_tokens=reg_tokens)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("qkv.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 2.0 / math.sqrt(p.shape[1]))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m.to(dtype)


def images(b=3, seed=0, dtype=torch.float64, img=IMG):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, img, img, generator=g).to(dtype)


# ------------------------------------------------------------------ explicit reference

def ref_qkv(attn, x):
    b, n, _ = x.shape
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias)
    q, k, v = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return attn.q_norm(q), attn.k_norm(k), v


def ref_logits(q, k, scale):
    return (q * scale) @ k.transpose(-2, -1)


def ref_vit(model, x, probs_for=None, record=None):
    """Explicit ViT forward. ``probs_for(i, q, k, v, attn) -> [B, H, N, N]`` may replace the
    attention probabilities of layer ``i`` (None: own softmax); ``record[i] = (q, k, logits)``."""
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for i, blk in enumerate(model.blocks):
        attn = blk.attn
        q, k, v = ref_qkv(attn, blk.norm1(h))
        logits = ref_logits(q, k, attn.scale)
        if record is not None:
            record[i] = (q, k, logits)
        p = probs_for(i, q, k, v, attn) if probs_for is not None else None
        if p is None:
            p = logits.softmax(-1)
        o = (p @ v).transpose(1, 2).reshape(h.shape[0], h.shape[1], -1)
        h = h + blk.ls1(attn.proj(o))
        h = h + blk.ls2(blk.mlp(blk.norm2(h)))
    return model.forward_head(model.norm(h))


def ref_ce(t_logits, s_logits, group=1):
    """-sum softmax(t) * log_softmax(s), mean over (B, H, N); teacher heads averaged in
    groups of ``group`` consecutive heads."""
    p_t = t_logits.softmax(-1)
    if group > 1:
        b, h, n, m = p_t.shape
        p_t = p_t.reshape(b, h // group, group, n, m).mean(2)
    return -(p_t * s_logits.log_softmax(-1)).sum(-1).mean()


def copy_probs(t_rec, mode, layers, heads=None, t_layer=None, group_share=1, group_avg=1):
    """Reference probabilities for the copy modes from the teacher's recorded (q, k)."""
    def probs_for(i, q, k, v, attn):
        if i not in layers:
            return None
        qt, kt, lt = t_rec[(t_layer or {}).get(i, i)]
        own = ref_logits(q, k, attn.scale).softmax(-1)
        if mode == "copy":
            pt = lt.softmax(-1)
            if group_share > 1:
                pt = pt.repeat_interleave(group_share, dim=1)
            if group_avg > 1:
                b, h, n, m = pt.shape
                pt = pt.reshape(b, h // group_avg, group_avg, n, m).mean(2)
        elif mode == "copy_q":
            pt = ref_logits(qt, k, attn.scale).softmax(-1)
        else:
            pt = ref_logits(q, kt, attn.scale).softmax(-1)
        if heads is None:
            return pt
        out = own.clone()
        out[:, heads] = pt[:, heads]
        return out
    return probs_for


def max_diff(a, b):
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------ copy

@pytest.mark.parametrize("mode", ["copy", "copy_q", "copy_k"])
@pytest.mark.parametrize("layers", [None, "all"])
def test_copy_with_student_equal_teacher_reproduces_teacher(mode, layers):
    teacher = make_vit(seed=1, qk_norm=True, reg_tokens=1)
    x = images()
    expected = teacher(x)
    at = AttentionTransfer(copy.deepcopy(teacher), teacher, mode=mode, layers=layers)
    for train in (True, False):
        at.train(train)
        out = at(x)
        assert max_diff(out.logits, expected) < 1e-12
        assert out.aux_loss.item() == 0.0 and out.layer_losses.numel() == 0


@pytest.mark.parametrize("mode", ["copy", "copy_q", "copy_k"])
@pytest.mark.parametrize("heads", [None, [1, 3]])
def test_copy_matches_explicit_reference(mode, heads):
    teacher, student = make_vit(seed=1, qk_norm=True), make_vit(seed=2, qk_norm=True)
    x = images()
    layers = [0, 2]
    t_rec = {}
    ref_vit(teacher, x, record=t_rec)
    probs = copy_probs(t_rec, mode, layers, heads)
    expected = ref_vit(student, x, probs)
    own = ref_vit(student, x)
    assert max_diff(expected, own) > 1e-2  # the transfer really changes the student

    at = AttentionTransfer(student, teacher, mode=mode, layers=layers, heads=heads)
    out = at(x)
    assert max_diff(out.logits, expected) < 1e-10


@pytest.mark.parametrize("s_heads,t_heads", [(4, 2), (2, 4)])
def test_copy_head_count_mismatch(s_heads, t_heads):
    teacher = make_vit(seed=1, heads=t_heads)
    student = make_vit(seed=2, heads=s_heads)
    x = images()
    t_rec = {}
    ref_vit(teacher, x, record=t_rec)
    share = s_heads // t_heads if s_heads > t_heads else 1
    avg = t_heads // s_heads if t_heads > s_heads else 1
    expected = ref_vit(student, x, copy_probs(t_rec, "copy", [0, 1, 2], None,
                                              group_share=share, group_avg=avg))
    with pytest.warns(AttentionTransferWarning, match="num_heads"):
        at = AttentionTransfer(student, teacher, mode="copy", layers="all")
    assert max_diff(at(x).logits, expected) < 1e-10


def test_copy_leaves_student_qk_unused():
    teacher, student = make_vit(seed=1, depth=3), make_vit(seed=2, depth=3)
    at = AttentionTransfer(student, teacher, mode="copy", layers=[0, 1])
    at(images()).logits.square().sum().backward()
    d = student.embed_dim
    for i, blk in enumerate(student.blocks):
        g = blk.attn.qkv.weight.grad
        qk_grad = g[: 2 * d].abs().max().item()
        v_grad = g[2 * d:].abs().max().item()
        assert v_grad > 0
        assert (qk_grad == 0) == (i in (0, 1)), (i, qk_grad)
    assert all(p.grad is None for p in teacher.parameters())


def test_copy_depth_mismatch_maps_by_relative_depth():
    teacher, student = make_vit(seed=1, depth=4), make_vit(seed=2, depth=2)
    x = images()
    with pytest.warns(AttentionTransferWarning, match="depth"):
        at = AttentionTransfer(student, teacher, mode="copy", layers="all")
    assert at.layers == [(0, 1), (1, 3)]
    t_rec = {}
    ref_vit(teacher, x, record=t_rec)
    expected = ref_vit(student, x, copy_probs(t_rec, "copy", [0, 1], t_layer={0: 1, 1: 3}))
    assert max_diff(at(x).logits, expected) < 1e-10
    at.unpatch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AttentionTransferWarning)
        at = AttentionTransfer(student, teacher, mode="copy", layers={1: 0})
    assert at.layers == [(1, 0)]
    expected = ref_vit(student, x, copy_probs(t_rec, "copy", [1], t_layer={1: 0}))
    assert max_diff(at(x).logits, expected) < 1e-10


def test_copy_needs_wrapper_not_bare_student():
    teacher, student = make_vit(seed=1), make_vit(seed=2)
    AttentionTransfer(student, teacher, mode="copy")
    with pytest.raises(RuntimeError, match="call the AttentionTransfer module"):
        student(images())


# --------------------------------------------------------------------------- distill

def test_distill_loss_matches_explicit_reference():
    teacher, student = make_vit(seed=1, depth=4, qk_norm=True), make_vit(seed=2, depth=4,
                                                                         qk_norm=True)
    x = images()
    at = AttentionTransfer(student, teacher, mode="distill", layers=[0, 2], weight=3.0)
    at.train()
    out = at(x)
    t_rec, s_rec = {}, {}
    ref_vit(teacher, x, record=t_rec)
    expected_logits = ref_vit(student, x, record=s_rec)
    per_layer = torch.stack([ref_ce(t_rec[i][2], s_rec[i][2]) for i in (0, 2)])
    assert max_diff(out.logits, expected_logits) < 1e-10  # own attention is kept
    assert max_diff(out.layer_losses, per_layer) < 1e-10
    assert abs(out.aux_loss.item() - 3.0 * per_layer.sum().item()) < 1e-9
    assert not out.layer_losses.requires_grad and out.aux_loss.requires_grad
    assert at.layer_loss_dict(out).keys() == {"attn_distill/layer0", "attn_distill/layer2"}


def test_distill_self_loss_is_teacher_entropy_and_gradient_zero():
    teacher = make_vit(seed=1, depth=3)
    student = copy.deepcopy(teacher)
    x = images()
    at = AttentionTransfer(student, teacher, mode="distill", layers="all")
    at.train()
    out = at(x)
    t_rec = {}
    ref_vit(teacher, x, record=t_rec)
    for i in range(3):
        p = t_rec[i][2].softmax(-1)
        entropy = -(p * p.log()).sum(-1).mean()
        assert abs(out.layer_losses[i].item() - entropy.item()) < 1e-10
        assert entropy.item() < 0.9 * math.log(N_TOK)  # maps are far from uniform
    out.aux_loss.backward()
    grads = [p.grad.abs().max().item() for p in student.parameters() if p.grad is not None]
    assert grads and max(grads) < 1e-12


def test_distill_gradient_is_p_s_minus_p_t():
    b, h, n = 2, 3, 7
    t = torch.randn(b, h, n, n, dtype=torch.float64) * 3
    s = (torch.randn(b, h, n, n, dtype=torch.float64) * 3).requires_grad_()
    loss = attention_distill_loss(t, s)
    assert abs(loss.item() - ref_ce(t, s).item()) < 1e-12
    (grad,) = torch.autograd.grad(loss, s)
    hand = (s.softmax(-1) - t.softmax(-1)) / (b * h * n)
    assert max_diff(grad, hand) < 1e-14
    # grouped teacher heads: target is the mean of the group's probabilities
    t2 = torch.randn(b, 2 * h, n, n, dtype=torch.float64)
    (grad,) = torch.autograd.grad(attention_distill_loss(t2, s, teacher_group=2), s)
    p_t = t2.softmax(-1).reshape(b, h, 2, n, n).mean(2)
    assert max_diff(grad, (s.softmax(-1) - p_t) / (b * h * n)) < 1e-14


def test_distill_loss_from_qk_gradcheck():
    q_s, k_s = (torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in "ab")
    q_t, k_t = (torch.randn(2, 2, 5, 4, dtype=torch.float64) for _ in "ab")
    assert torch.autograd.gradcheck(
        lambda a, c: attention_distill_loss_from_qk(a, c, q_t, k_t), (q_s, k_s))
    # chain rule through the logits: dL/dq = scale * dS @ k
    loss = attention_distill_loss_from_qk(q_s, k_s, q_t, k_t, scale_s=0.5, scale_t=0.5)
    (gq,) = torch.autograd.grad(loss, q_s)
    ds = (ref_logits(q_s, k_s, 0.5).softmax(-1) - ref_logits(q_t, k_t, 0.5).softmax(-1)) / 20
    assert max_diff(gq, 0.5 * ds @ k_s) < 1e-14


def test_distill_only_chosen_layers_and_heads_get_gradient():
    teacher, student = make_vit(seed=1, depth=4), make_vit(seed=2, depth=4)
    at = AttentionTransfer(student, teacher, mode="distill", layers=[0, 1], heads=[2])
    at.train()
    x = images()
    out = at(x)
    t_rec, s_rec = {}, {}
    ref_vit(teacher, x, record=t_rec)
    ref_vit(student, x, record=s_rec)
    expected = [ref_ce(t_rec[i][2][:, [2]], s_rec[i][2][:, [2]]) for i in (0, 1)]
    assert max_diff(out.layer_losses, torch.stack(expected)) < 1e-10
    out.aux_loss.backward()
    d, hd = student.embed_dim, student.blocks[0].attn.head_dim
    for i, blk in enumerate(student.blocks):
        g = blk.attn.qkv.weight.grad
        if i >= 2:  # after the last distilled layer: untouched
            assert g is None or g.abs().max().item() == 0
            continue
        q_rows = g[:d].reshape(4, hd, -1).abs().amax(dim=(1, 2))
        k_rows = g[d:2 * d].reshape(4, hd, -1).abs().amax(dim=(1, 2))
        if i == 1:  # the last distilled layer: only head 2's Q/K get gradient
            assert q_rows[2] > 0 and k_rows[2] > 0
            assert q_rows[[0, 1, 3]].max() == 0 and k_rows[[0, 1, 3]].max() == 0
            assert g[2 * d:].abs().max().item() == 0  # V does not enter the loss


def test_distill_eval_runs_student_only():
    teacher, student = make_vit(seed=1), make_vit(seed=2)
    calls = []
    teacher.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    at = AttentionTransfer(student, teacher, mode="distill")
    x = images()
    at.eval()
    out = at(x)
    assert not calls and out.aux_loss.item() == 0.0
    assert max_diff(out.logits, ref_vit(student, x)) < 1e-10
    at.train()
    at(x)
    assert len(calls) == 1


def test_teacher_frozen_and_kept_in_eval():
    teacher, student = make_vit(seed=1), make_vit(seed=2)
    at = AttentionTransfer(student, teacher, mode="distill", layers="all")
    at.train()
    assert student.training and not teacher.training
    out = at(images())
    (F.cross_entropy(out.logits, torch.tensor([0, 1, 2])) + out.aux_loss).backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


@pytest.mark.parametrize("mode", ["copy", "distill"])
def test_activation_checkpointing_gives_same_gradients(mode):
    teacher, student = make_vit(seed=1), make_vit(seed=2)
    at = AttentionTransfer(student, teacher, mode=mode, layers="all")
    at.train()
    x = images()
    grads = []
    for ckpt in (False, True):
        student.set_grad_checkpointing(ckpt)
        student.zero_grad(set_to_none=True)
        out = at(x)
        (out.logits.square().sum() + out.aux_loss).backward()
        grads.append([p.grad.clone() for p in student.parameters()])
    for a, b in zip(*grads):
        assert max_diff(a, b) < 1e-10


@pytest.mark.parametrize("mode", ["copy", "distill"])
def test_checkpointing_keeps_the_last_training_calls_teacher_activations(mode):
    # An evaluation call between a training call and its backward must not change the
    # teacher activations the checkpointed backward recomputes from; a second training call
    # before the backward is refused (its recompute would be ambiguous), not silently wrong.
    teacher, student = make_vit(seed=1), make_vit(seed=2)
    at = AttentionTransfer(student, teacher, mode=mode, layers="all")
    xa, xb = images(seed=1), images(b=5, seed=2)
    grads = []
    for ckpt, evaluate in ((False, False), (True, True)):
        student.set_grad_checkpointing(ckpt)
        student.zero_grad(set_to_none=True)
        at.train()
        out = at(xa)
        if evaluate:
            at.eval()
            with torch.no_grad():
                at(xb)
            at.train()
        (out.logits.square().sum() + out.aux_loss).backward()
        grads.append([p.grad.clone() for p in student.parameters()])
    for a, b in zip(*grads):
        assert max_diff(a, b) < 1e-10
    out = at(xa)
    with pytest.raises(RuntimeError, match="run backward"):
        at(xb)
    (out.logits.sum() + out.aux_loss).backward()  # then the next call is fine again
    at(xb)
    student.set_grad_checkpointing(False)
    oa, ob = at(xa), at(xb)  # without checkpointing, several calls before one backward work
    (oa.logits.sum() + ob.logits.sum() + oa.aux_loss + ob.aux_loss).backward()


def test_reentrant_checkpointing_is_refused_in_distill_mode():
    # Reentrant checkpointing runs the blocks without gradients in the forward: the
    # distillation loss computed there would not train the student.
    set_reentrant = getattr(timm.layers, "set_reentrant_ckpt", None)
    if set_reentrant is None:
        pytest.skip("this timm has no set_reentrant_ckpt")
    teacher, student = make_vit(seed=1), make_vit(seed=2)
    at = AttentionTransfer(student, teacher, mode="distill", layers="all").train()
    student.set_grad_checkpointing(True)
    set_reentrant(True)
    try:
        with pytest.raises(RuntimeError, match="non-reentrant"):
            at(images())
    finally:
        set_reentrant(False)


@pytest.mark.parametrize("mode", ["copy", "distill"])
def test_bare_student_never_uses_stale_teacher_activations(mode):
    teacher, student = make_vit(seed=1), make_vit(seed=2)
    plain = copy.deepcopy(student)
    at = AttentionTransfer(student, teacher, mode=mode, layers="all").train()
    at(images(b=3))  # leaves this call's teacher activations in the slots
    student.eval()
    plain.eval()
    for b in (3, 2):
        if mode == "copy":  # the student alone cannot run: it needs the teacher
            with pytest.raises(RuntimeError, match="call the AttentionTransfer module"):
                student(images(b=b, seed=7))
        else:  # distill: the student alone is the plain model (inference, EMA copies)
            want = plain(images(b=b, seed=7))
            assert max_diff(student(images(b=b, seed=7)), want) < 1e-10
            ema = copy.deepcopy(student)
            assert max_diff(ema(images(b=b, seed=7)), want) < 1e-10


@pytest.mark.parametrize("mode", ["copy", "distill"])
def test_deepcopy_of_the_wrapper_is_self_contained(mode):
    # e.g. an EMA of the whole dual model: the copy's patched layers use the copy's teacher
    teacher, student = make_vit(seed=1), make_vit(seed=2)
    at = AttentionTransfer(student, teacher, mode=mode, layers="all")
    twin = copy.deepcopy(at)
    for training in (True, False):
        at.train(training)
        twin.train(training)
        x = images(b=4, seed=3)
        got, want = twin(x), at(x)
        assert torch.equal(got.logits, want.logits) and torch.equal(got.aux_loss, want.aux_loss)
    at.unpatch()
    twin.eval()
    assert twin(images(b=2)).logits.shape == (2, 5)


# -------------------------------------------------------------------- patch / unpatch

def test_only_chosen_layers_are_patched():
    teacher, student = make_vit(seed=1, depth=4), make_vit(seed=2, depth=4)
    at = AttentionTransfer(student, teacher, mode="copy", layers=[1, 2])
    assert ["forward" in b.attn.__dict__ for b in student.blocks] == [False, True, True, False]
    assert ["forward" in b.attn.__dict__ for b in teacher.blocks] == [False, True, True, False]
    # unpatched layers are exactly timm's: same output as the reference with own attention
    t_rec = {}
    x = images()
    ref_vit(teacher, x, record=t_rec)
    expected = ref_vit(student, x, copy_probs(t_rec, "copy", [1, 2]))
    assert max_diff(at(x).logits, expected) < 1e-10
    at.unpatch()


@pytest.mark.parametrize("mode", ["copy", "copy_q", "distill"])
def test_unpatch_restores_original_modules_exactly(mode):
    teacher, student = make_vit(seed=1, depth=3), make_vit(seed=2, depth=3)
    teacher.blocks[2].attn.qkv.weight.requires_grad_(False)  # a non-default flag to restore
    teacher.train()
    x = images()
    before = {"t": teacher(x), "s": student(x)}
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_state = {k: v.clone() for k, v in student.state_dict().items()}
    flags = [p.requires_grad for p in teacher.parameters()]

    at = AttentionTransfer(student, teacher, mode=mode, layers="all")
    at.train()
    at(x)
    assert any("forward" in b.attn.__dict__ for b in student.blocks)
    at.unpatch()
    at.unpatch()  # idempotent

    for model in (teacher, student):
        for blk in model.blocks:
            assert "forward" not in blk.attn.__dict__
            assert blk.attn.forward.__func__ is Attention.forward
            assert not blk.attn._forward_hooks and not blk.attn._forward_pre_hooks
    assert teacher.training
    assert [p.requires_grad for p in teacher.parameters()] == flags
    assert all(torch.equal(v, t_state[k]) for k, v in teacher.state_dict().items())
    assert all(torch.equal(v, s_state[k]) for k, v in student.state_dict().items())
    assert torch.equal(teacher(x), before["t"]) and torch.equal(student(x), before["s"])
    with pytest.raises(RuntimeError, match="unpatched"):
        at(x)
    # re-patching and the context-manager form work too
    with at:
        assert "forward" in student.blocks[0].attn.__dict__
    assert "forward" not in student.blocks[0].attn.__dict__


def test_double_patching_is_refused():
    teacher, student = make_vit(seed=1), make_vit(seed=2)
    AttentionTransfer(student, teacher, mode="copy", layers="all")
    with pytest.raises(RuntimeError, match="already"):
        AttentionTransfer(make_vit(seed=3), teacher, mode="copy", layers="all")


# ------------------------------------------------------------------ API and policies

def test_default_layers():
    assert default_layers(24, "distill") == list(range(18))  # all but the last 6
    assert default_layers(24, "copy") == list(range(21))     # all but the last 3
    assert default_layers(12, "distill") == list(range(9))
    assert default_layers(4, "distill") == default_layers(4, "copy") == [0, 1, 2]
    assert default_layers(1, "distill") == [0]
    at = AttentionTransfer(make_vit(seed=2, depth=4), make_vit(seed=1, depth=4))
    assert at.mode == "distill" and at.weight == 3.0 and at.layers == [(0, 0), (1, 1), (2, 2)]
    at = AttentionTransfer(None, make_vit(seed=3, depth=4), layers=slice(None, -2))
    assert at.layers == [(0, 0), (1, 1)]


def test_default_student_is_fresh_copy_of_teacher_architecture():
    teacher = make_vit(seed=1, qk_norm=True)
    teacher.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AttentionTransferWarning)
        at = AttentionTransfer(None, teacher, mode="distill")
    s = at.student
    assert s is not teacher and architecture_signature(s) == architecture_signature(teacher)
    assert all(p.requires_grad for p in s.parameters())
    t_params = dict(teacher.named_parameters())
    for name, p in s.named_parameters():
        if name.endswith("weight") and p.ndim >= 2:  # re-initialised, not copied
            assert not torch.equal(p, t_params[name]), name
    at.unpatch()
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.filterwarnings("ignore::fusedlm.transfer.AttentionTransferWarning")
def test_mismatches_are_warned_or_refused():
    teacher = make_vit(seed=1, heads=4)
    with pytest.warns(AttentionTransferWarning, match="mlp_hidden"):
        m = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=32, depth=3,
                              num_heads=4, mlp_ratio=4.0, qkv_bias=True, num_classes=5)
        AttentionTransfer(m.double(), teacher, mode="distill").unpatch()
    with pytest.raises(ValueError, match="one count must divide the other"):
        AttentionTransfer(make_vit(seed=2, heads=8, dim=24), make_vit(seed=3, heads=3,
                                                                      dim=24), mode="copy")
    with pytest.raises(ValueError, match="equal head counts"):
        AttentionTransfer(make_vit(seed=2, heads=2), make_vit(seed=3, heads=4), mode="copy_q")
    with pytest.raises(ValueError, match="equal head dims"):
        AttentionTransfer(make_vit(seed=2, heads=2), make_vit(seed=3, heads=2, dim=16),
                          mode="copy_k")
    with pytest.raises(ValueError, match="tokens"):
        AttentionTransfer(make_vit(seed=2, img=24), make_vit(seed=3), mode="copy")
    with pytest.raises(ValueError, match="mode"):
        AttentionTransfer(None, make_vit(seed=3), mode="copy_v")
    with pytest.raises(TypeError, match="slice"):
        AttentionTransfer(None, make_vit(seed=4), layers=2)
    with pytest.raises(ValueError, match="different modules"):
        t = make_vit(seed=5)
        AttentionTransfer(t, t)


# ----------------------------------------------------------- torch.compile / autocast

@pytest.mark.parametrize("mode,heads", [("copy_k", [0, 3]), ("distill", [1])])
def test_torch_compile_matches_eager(mode, heads):
    torch._dynamo.reset()
    teacher = make_vit(seed=1, dtype=torch.float32)
    student = make_vit(seed=2, dtype=torch.float32)
    at = AttentionTransfer(student, teacher, mode=mode, heads=heads, layers=[0, 1])
    at.train()
    x = images(dtype=torch.float32)
    eager = at(x)
    (eager.logits.sum() + eager.aux_loss).backward()
    g_eager = [p.grad.clone() for p in student.parameters()]
    student.zero_grad(set_to_none=True)

    compiled = torch.compile(at, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    (out.logits.sum() + out.aux_loss).backward()
    assert torch.allclose(out.logits, eager.logits, atol=1e-5, rtol=1e-5)
    assert torch.allclose(out.aux_loss, eager.aux_loss, atol=1e-5, rtol=1e-5)
    for p, g in zip(student.parameters(), g_eager):
        assert torch.allclose(p.grad, g, atol=1e-4, rtol=1e-4)
    at.unpatch()


@pytest.mark.parametrize("mode", ["copy", "distill"])
def test_bf16_autocast(mode):
    teacher = make_vit(seed=1, dtype=torch.float32)
    student = make_vit(seed=2, dtype=torch.float32)
    at = AttentionTransfer(student, teacher, mode=mode, layers="all")
    at.train()
    x = images(dtype=torch.float32)
    ref = at(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = at(x)
    assert out.logits.dtype == torch.bfloat16 and out.aux_loss.dtype == torch.float32
    scale = ref.logits.abs().max().item()
    assert max_diff(out.logits.float(), ref.logits) < 0.1 * scale
    if mode == "distill":
        assert abs(out.aux_loss.item() - ref.aux_loss.item()) < 0.05 * ref.aux_loss.item()
    (out.logits.float().square().mean() + out.aux_loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters())


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["copy", "distill"])
def test_cuda_matches_cpu(mode):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    teacher, student = make_vit(seed=1, dtype=torch.float32), make_vit(seed=2,
                                                                       dtype=torch.float32)
    at = AttentionTransfer(student, teacher, mode=mode, layers="all")
    at.train()
    x = images(dtype=torch.float32)
    cpu = at(x)
    at.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        gpu = at(x.cuda())
    assert torch.allclose(gpu.logits.float().cpu(), cpu.logits, atol=0.1, rtol=0.1)
    assert abs(gpu.aux_loss.item() - cpu.aux_loss.item()) < 0.05 * max(1.0, cpu.aux_loss.item())


def test_unpatch_restores_mixed_train_eval_modes_of_the_teacher():
    teacher, student = make_vit(seed=1), make_vit(seed=2)
    teacher.train()
    teacher.blocks[0].eval()
    teacher.head.eval()
    before = {n: m.training for n, m in teacher.named_modules()}
    at = AttentionTransfer(student, teacher, mode="copy", layers="all")
    assert not any(m.training for m in teacher.modules())
    at.unpatch()
    assert {n: m.training for n, m in teacher.named_modules()} == before


def test_lower_precision_teacher_beside_a_float32_student():
    teacher, student = make_vit(seed=1, dtype=torch.bfloat16), make_vit(seed=2, dtype=torch.float32)
    for mode in ("copy", "distill"):
        at = AttentionTransfer(student, teacher, mode=mode, layers="all").train()
        out = at(images(dtype=torch.float32))
        assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
        (out.logits.sum() + out.aux_loss).backward()
        at.unpatch()
