"""CPU tests of fusedlm.linear_cross_entropy against float64 references."""
import itertools

import math

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import fusedlm
from reference import reference_logits, reference_loss, reference_loss_from_logits, rel_err

N, D, V = 37, 65, 1031


def make_inputs(n=N, d=D, v=V, dtype=torch.float64, bias=False, ignore_frac=0.2, batch=None,
                scale=1.0):
    shape = (n,) if batch is None else (batch, n)
    e = (torch.randn(*shape, d, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    c = (torch.randn(v, d, dtype=torch.float64) / d**0.25).to(dtype).requires_grad_()
    b = torch.randn(v, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, v, shape)
    y[torch.rand(shape) < ignore_frac] = -100
    return e, c, y, b


OPTIONS = [
    dict(),
    dict(bias=True),
    dict(softcap=4.0),
    dict(label_smoothing=0.1),
    dict(z_loss=1e-3),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(shift=True, batch=3),
    dict(bias=True, softcap=3.0, label_smoothing=0.2, z_loss=1e-2, reduction="none"),
]


def _split(opts):
    opts = dict(opts)
    make_kw = {k: opts.pop(k) for k in ("bias", "batch") if k in opts}
    return make_kw, opts


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_matches_float64_reference(opts):
    make_kw, loss_kw = _split(opts)
    e, c, y, b = make_inputs(**make_kw)
    loss = fusedlm.linear_cross_entropy(e, c, y, b, filter_eps=None, **loss_kw)
    ref = reference_loss(e, c, y, b, **loss_kw)
    # grad_output != 1 (and random per element for reduction="none")
    g_out = torch.randn_like(ref)
    params = [t for t in (e, c, b) if t is not None]
    grads = torch.autograd.grad(loss, params, g_out)
    ref_grads = torch.autograd.grad(ref, params, g_out)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_low_precision_error_within_pytorch_own(dtype, softcap):
    """Error vs float64 must not exceed twice PyTorch's own error in the same dtype."""
    e, c, y, b = make_inputs(dtype=dtype, bias=True)
    loss = fusedlm.linear_cross_entropy(e, c, y, b, softcap=softcap, filter_eps=None)
    grads = torch.autograd.grad(loss, (e, c, b))

    e64, c64, b64 = (t.detach().double().requires_grad_() for t in (e, c, b))
    ref = reference_loss(e64, c64, y, b64, softcap=softcap)
    ref_grads = torch.autograd.grad(ref, (e64, c64, b64))

    # PyTorch in the same dtype: low-precision logits, then F.cross_entropy.
    e_t, c_t, b_t = (t.detach().clone().requires_grad_() for t in (e, c, b))
    logits = e_t @ c_t.T + b_t
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    torch_loss = F.cross_entropy(logits, y)
    torch_grads = torch.autograd.grad(torch_loss, (e_t, c_t, b_t))

    floor = 1e-6  # float32 accumulation rounding, below any low-precision error
    assert rel_err(loss, ref) <= 2 * rel_err(torch_loss, ref) + floor
    for got, tg, want in zip(grads, torch_grads, ref_grads):
        assert got.dtype == dtype
        assert rel_err(got, want) <= 2 * rel_err(tg, want) + floor


def test_gradcheck_float64():
    e, c, y, b = make_inputs(n=5, d=4, v=7, bias=True, ignore_frac=0.3)
    y[0] = 3
    for kw in (dict(), dict(softcap=2.0, label_smoothing=0.1, z_loss=0.01)):
        fn = lambda e_, c_, b_: fusedlm.linear_cross_entropy(e_, c_, y, b_, filter_eps=None, **kw)
        assert torch.autograd.gradcheck(fn, (e, c, b))


def test_filtered_loss_identical_and_gradient_close():
    # Peaked logits: most softmax entries are far below 2^-12, so filtering really skips.
    e, c, y, _ = make_inputs(dtype=torch.float32, ignore_frac=0.0, scale=4.0)
    exact = fusedlm.linear_cross_entropy(e, c, y, filter_eps=None)
    filtered = fusedlm.linear_cross_entropy(e, c, y, filter_eps=2**-12)
    assert torch.equal(exact, filtered)
    g_exact = torch.autograd.grad(exact, (e, c))
    g_filtered = torch.autograd.grad(filtered, (e, c))
    for a, b in zip(g_filtered, g_exact):
        # each dropped entry is < eps; documented bound on the relative gradient error
        assert rel_err(a, b) < 1e-2
    # and the filter really changed something (the test could otherwise pass vacuously)
    assert any(not torch.equal(a, b) for a, b in zip(g_filtered, g_exact))


def test_label_smoothing_with_filter_is_exact_in_the_uniform_term():
    e, c, y, b = make_inputs(bias=True)
    loss = fusedlm.linear_cross_entropy(e, c, y, b, label_smoothing=0.3, filter_eps=0.0)
    ref = reference_loss(e, c, y, b, label_smoothing=0.3)
    for got, want in zip(torch.autograd.grad(loss, (e, c, b)), torch.autograd.grad(ref, (e, c, b))):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("block_elements", [1, 3 * 17 + 5])
def test_label_smoothing_uniform_term_in_row_blocks(monkeypatch, block_elements):
    # The uniform term is added a block of rows at a time (no float32 copy of a whole
    # gradient): blocks of one row, and ragged blocks, give the reference gradients.
    monkeypatch.setattr(fusedlm.cce, "_BLOCK_ELEMENTS", block_elements)
    e, c, y, b = make_inputs(bias=True)
    for dtype in (torch.float64, torch.float32):
        e_, c_, b_ = (t.detach().to(dtype).requires_grad_() for t in (e, c, b))
        loss = fusedlm.linear_cross_entropy(e_, c_, y, b_, label_smoothing=0.3, filter_eps=0.0)
        ref = reference_loss(e, c, y, b, label_smoothing=0.3)
        tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        for got, want in zip(torch.autograd.grad(loss, (e_, c_, b_)), torch.autograd.grad(ref, (e, c, b))):
            assert got.dtype == dtype
            torch.testing.assert_close(got.double(), want, **tol)


def test_return_lse_and_z_loss_agree():
    e, c, y, _ = make_inputs(ignore_frac=0.0)
    loss, lse = fusedlm.linear_cross_entropy(e, c, y, return_lse=True, filter_eps=None)
    torch.testing.assert_close(lse, torch.logsumexp(reference_logits(e, c), -1))
    combined = loss + 1e-2 * lse.square().mean()
    direct = fusedlm.linear_cross_entropy(e, c, y, z_loss=1e-2, filter_eps=None)
    torch.testing.assert_close(combined, direct)
    g1 = torch.autograd.grad(combined, (e, c))
    g2 = torch.autograd.grad(direct, (e, c))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_all_ignored_mean_is_nan_like_pytorch():
    e, c, y, _ = make_inputs()
    y[:] = -100
    loss = fusedlm.linear_cross_entropy(e, c, y)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(e.detach() @ c.detach().T, y))
    assert fusedlm.linear_cross_entropy(e, c, y, reduction="sum").item() == 0.0


def test_int32_targets_module_and_autocast():
    e, c, y, _ = make_inputs(dtype=torch.float32, ignore_frac=0.0)
    ref = fusedlm.linear_cross_entropy(e, c, y)
    torch.testing.assert_close(fusedlm.LinearCrossEntropy()(e, c, y.int()), ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = fusedlm.linear_cross_entropy(e, c, y)
    assert auto.dtype == torch.float32
    assert rel_err(auto, ref) < 2e-2


@pytest.mark.parametrize("case", range(5))
def test_opcheck(case):
    e, c, y, b = make_inputs(n=9, d=8, v=13, bias=case % 2 == 0, dtype=[torch.float32, torch.float64][case % 2])
    e, c = e.detach(), c.detach()
    b = b.detach() if b is not None else None
    record = case >= 2
    lse, tl, zs, tile_max = torch.ops.fusedlm.cce_forward(e, c, y, b, float(case), -100, record)
    assert tile_max.shape == ((9, 1) if record else (0, 0))
    opcheck(torch.ops.fusedlm.cce_forward.default, (e, c, y, b, float(case), -100, record))
    ga, gt, gs = torch.randn_like(lse), torch.randn_like(tl), torch.randn_like(zs)
    hint = (tile_max, tl) if record else (None, None)
    opcheck(torch.ops.fusedlm.cce_backward.default,
            (e, c, y, b, lse, ga, gt, gs, float(case), [-1.0, 1e-3][case % 2], False, *hint))
    need_e, need_c, need_b = case % 2 == 0, case % 3 == 0, case != 4  # some gradients skipped
    args = (e, c, y, b, lse, ga, gt, gs, float(case), -1.0, False, *hint, need_e, need_c, need_b)
    opcheck(torch.ops.fusedlm.cce_backward.default, args)
    grad_e, grad_c, grad_b = torch.ops.fusedlm.cce_backward(*args)
    assert grad_e.shape == (e.shape if need_e else (0,)) and grad_c.shape == (c.shape if need_c else (0,))
    assert grad_b.shape == (b.shape if b is not None and need_b else (0,))


@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_recorded_tile_max_is_each_rows_largest_logit_per_tile(softcap):
    e, c, y, b = make_inputs(n=7, d=16, v=600, bias=True, dtype=torch.float64)
    e, c, b = e.detach(), c.detach(), b.detach()
    *_, tile_max = torch.ops.fusedlm.cce_forward(e, c, y, b, softcap, -100, True)
    logits = e @ c.T + b
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    width = fusedlm._ops.TILE_MAX_WIDTH
    padded = torch.full((7, 3 * width), -torch.inf, dtype=logits.dtype)
    padded[:, :600] = logits
    torch.testing.assert_close(tile_max, padded.view(7, 3, width).amax(-1))


def test_filter_drops_a_target_entry_only_when_its_gradient_is_that_small():
    """filter_eps skips softmax entries below it and the target entry when
    |grad_lse * p + grad_target| < filter_eps * |grad_lse| (a confidently right token)."""
    n, d, v, eps = 6, 64, 40, 1e-3
    c = 3.0 * torch.linalg.qr(torch.randn(d, v, dtype=torch.float64))[0].T  # orthogonal rows
    y = torch.randint(0, v, (n,))
    e = torch.zeros(n, d, dtype=torch.float64)
    e[:3] = 40.0 * c[y[:3]]  # rows 0-2: target logit 360, the others 0 (softmax 1 and e^-360)
    # rows 3-5: e = 0, a uniform softmax (1/40 everywhere, the target's gradient -39/40)
    lse, tl, zs, _ = torch.ops.fusedlm.cce_forward(e, c, y, None, 0.0, -100)
    g_l = torch.rand(n, dtype=torch.float64) + 0.5
    g_t = -g_l  # cross-entropy's gradient at the target: g * (p - 1)
    grad_e, grad_c, _ = torch.ops.fusedlm.cce_backward(
        e, c, y, None, lse, g_l, g_t, torch.zeros(n, dtype=torch.float64), 0.0, eps, False)
    p = torch.softmax(e @ c.T, dim=-1)
    onehot = torch.nn.functional.one_hot(y, v).bool()
    g = g_l[:, None] * p + g_t[:, None] * onehot
    kept = torch.where(onehot, g.abs() >= eps * g_l[:, None].abs(), p >= eps)
    assert not kept[:3].any() and kept[3:][onehot[3:]].all()  # the test covers both cases
    g = torch.where(kept, g, 0.0)
    torch.testing.assert_close(grad_e, g @ c)
    torch.testing.assert_close(grad_c, g.T @ e)


@pytest.mark.parametrize("frozen", ["c", "e", "e+c", "c+b"])
def test_frozen_inputs_get_no_gradient(frozen):
    """A frozen classifier (LoRA) or frozen hidden states: that gradient is never computed
    (None, and the op returns it empty); the others equal the full backward's, with the
    options whose extra terms are added outside the kernel (label smoothing, z-loss)."""
    e, c, y, b = make_inputs(n=11, d=16, v=37, bias=True, dtype=torch.float64)
    kw = dict(softcap=4.0 if frozen == "e" else None, label_smoothing=0.1, z_loss=1e-2)
    loss = fusedlm.linear_cross_entropy(e, c, y, b, **kw)
    full = dict(zip("ecb", torch.autograd.grad(loss, (e, c, b))))
    for name, t in zip("ecb", (e, c, b)):
        t.requires_grad_(name not in frozen)
    params = [t for t in (e, c, b) if t.requires_grad]
    loss = fusedlm.linear_cross_entropy(e, c, y, b, **kw)
    part = torch.autograd.grad(loss, params)
    want = [k for k in "ecb" if k not in frozen]
    for k, got in zip(want, part, strict=True):
        torch.testing.assert_close(got, full[k], rtol=1e-12, atol=1e-12)

    def loss_of(*trained):  # the frozen inputs stay constants
        it = iter(trained)
        e_, c_, b_ = (next(it) if t.requires_grad else t for t in (e, c, b))
        return fusedlm.linear_cross_entropy(e_, c_, y, b_, **kw)

    assert torch.autograd.gradcheck(loss_of, params)


def test_torch_compile_fullgraph():
    e, c, y, b = make_inputs(dtype=torch.float32, bias=True)

    def loss_fn(e_, c_, b_):
        return fusedlm.linear_cross_entropy(e_, c_, y, b_, softcap=5.0, label_smoothing=0.1,
                                            z_loss=1e-3, shift=False, filter_eps=None)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got_loss = compiled(e, c, b)
    got_grads = torch.autograd.grad(got_loss, (e, c, b))  # runs the AOT-compiled backward
    want_loss = loss_fn(e, c, b)
    want_grads = torch.autograd.grad(want_loss, (e, c, b))
    torch.testing.assert_close(got_loss, want_loss)
    for a, b_ in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b_)


def test_torch_compile_inductor_training_step():
    e, c, y, _ = make_inputs(dtype=torch.float32, ignore_frac=0.1)
    fn = torch.compile(lambda e_, c_: fusedlm.linear_cross_entropy(e_, c_, y, shift=True),
                       fullgraph=True)
    loss = fn(e, c)
    loss.backward()
    ref = reference_loss(e, c, y, shift=True)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert e.grad is not None and torch.isfinite(e.grad).all()


def test_torch_compile_label_smoothing_does_not_recompile_per_length():
    # Under compile the label-smoothing term (added outside the kernels when filtering) stays
    # one expression: a loop over row blocks would pin N and recompile for every new length
    # (12 lengths > dynamo's recompile limit of 8: a hard failure with fullgraph=True).
    torch._dynamo.reset()
    c = torch.randn(V, D, requires_grad=True)
    fn = torch.compile(lambda e_, c_, y_: fusedlm.linear_cross_entropy(e_, c_, y_, label_smoothing=0.1),
                       fullgraph=True, dynamic=True, backend="aot_eager")
    for n in range(9, 21):
        e = torch.randn(n, D, requires_grad=True)
        y = torch.randint(0, V, (n,))
        got = torch.autograd.grad(fn(e, c, y), (e, c))
        want = torch.autograd.grad(fusedlm.linear_cross_entropy(e, c, y, label_smoothing=0.1), (e, c))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_forward_mode_ad_is_refused_not_zero():
    # Dual tensors do not set requires_grad; they must not take the no-gradient shortcut,
    # whose op would drop the tangent (a silent zero derivative).
    e, c, y, _ = make_inputs(dtype=torch.float64)
    e, c = e.detach(), c.detach()
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(e, torch.ones_like(e))
        with pytest.raises((NotImplementedError, RuntimeError)):
            fusedlm.linear_cross_entropy(dual, c, y)
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.func.jvp(lambda e_: fusedlm.linear_cross_entropy(e_, c, y), (e,), (torch.ones_like(e),))


BAD_CALLS = [
    ("targets shape", lambda e, c, y: fusedlm.linear_cross_entropy(e, c, y[:-1]), ValueError),
    ("c not 2-D", lambda e, c, y: fusedlm.linear_cross_entropy(e, c[None], y), ValueError),
    ("D mismatch", lambda e, c, y: fusedlm.linear_cross_entropy(e, c[:, :-1], y), ValueError),
    ("dtype mismatch", lambda e, c, y: fusedlm.linear_cross_entropy(e.double(), c, y), TypeError),
    ("float targets", lambda e, c, y: fusedlm.linear_cross_entropy(e, c, y.double()), TypeError),
    ("int e", lambda e, c, y: fusedlm.linear_cross_entropy(e.detach().long(), c, y), TypeError),
    ("device", lambda e, c, y: fusedlm.linear_cross_entropy(e, c.to("meta"), y), ValueError),
    ("target too big", lambda e, c, y: fusedlm.linear_cross_entropy(e, c, y.clamp_min(0) + V), IndexError),
    ("negative target", lambda e, c, y: fusedlm.linear_cross_entropy(e, c, y.clamp_min(0) - 5), IndexError),
    ("reduction", lambda e, c, y: fusedlm.linear_cross_entropy(e, c, y, reduction="avg"), ValueError),
    ("softcap", lambda e, c, y: fusedlm.linear_cross_entropy(e, c, y, softcap=-1.0), ValueError),
    ("smoothing", lambda e, c, y: fusedlm.linear_cross_entropy(e, c, y, label_smoothing=2.0), ValueError),
    ("filter_eps", lambda e, c, y: fusedlm.linear_cross_entropy(e, c, y, filter_eps="fast"), ValueError),
    ("bias shape", lambda e, c, y: fusedlm.linear_cross_entropy(e, c, y, torch.zeros(3, dtype=c.dtype)), ValueError),
    ("empty vocabulary", lambda e, c, y: fusedlm.linear_cross_entropy(e, c[:0], torch.full_like(y, -100)), ValueError),  # not IndexError from the targets
    ("softcap inf", lambda e, c, y: fusedlm.linear_cross_entropy(e, c, y, softcap=math.inf), ValueError),
    ("softcap below float32", lambda e, c, y: fusedlm.linear_cross_entropy(e, c, y, softcap=1e-300), ValueError),
    ("softcap string", lambda e, c, y: fusedlm.linear_cross_entropy(e, c, y, softcap="5"), TypeError),
    ("smoothing None", lambda e, c, y: fusedlm.linear_cross_entropy(e, c, y, label_smoothing=None), TypeError),
    # (apple's CCE takes shift=n; here only 1 exists, and a string used to count as True)
    ("shift by 2", lambda e, c, y: fusedlm.linear_cross_entropy(e[None], c, y[None], shift=2), ValueError),
    ("shift string", lambda e, c, y: fusedlm.linear_cross_entropy(e[None], c, y[None], shift="no"), ValueError),
    ("z_loss inf", lambda e, c, y: fusedlm.linear_cross_entropy(e, c, y, z_loss=math.inf), ValueError),
    ("filter_eps 1", lambda e, c, y: fusedlm.linear_cross_entropy(e, c, y, filter_eps=1.0), ValueError),
    ("filter_eps bool", lambda e, c, y: fusedlm.linear_cross_entropy(e, c, y, filter_eps=True), TypeError),
    ("ignore_index float", lambda e, c, y: fusedlm.linear_cross_entropy(e, c, y, ignore_index=3.7), TypeError),
    ("ignore_index huge", lambda e, c, y: fusedlm.linear_cross_entropy(e, c, y, ignore_index=2**70), ValueError),
    ("D = 0", lambda e, c, y: fusedlm.linear_cross_entropy(e[:, :0], c[:, :0], y), ValueError),
    ("shift with 1-D e", lambda e, c, y: fusedlm.linear_cross_entropy(e[0], c, y[0], shift=True), ValueError),
    ("e not a tensor", lambda e, c, y: fusedlm.linear_cross_entropy(e.tolist(), c, y), TypeError),
    ("module option", lambda e, c, y: fusedlm.LinearCrossEntropy(foo=1), TypeError),
    ("module reduction", lambda e, c, y: fusedlm.LinearCrossEntropy(reduction="x"), ValueError),
    # (options are checked when the module is built, not at its first call)
    ("module softcap", lambda e, c, y: fusedlm.LinearCrossEntropy(softcap=-1.0), ValueError),
    ("module smoothing", lambda e, c, y: fusedlm.LinearCrossEntropy(label_smoothing=2.0), ValueError),
    ("module filter_eps", lambda e, c, y: fusedlm.LinearCrossEntropy(filter_eps="fast"), ValueError),
    ("module shift", lambda e, c, y: fusedlm.LinearCrossEntropy(shift=2), ValueError),
    ("module ignore_index", lambda e, c, y: fusedlm.LinearCrossEntropy(ignore_index=3.7), TypeError),
    # (past float32's range the kernels' softcap became inf, and the loss NaN)
    ("softcap past float32", lambda e, c, y: fusedlm.linear_cross_entropy(e, c, y, softcap=3.5e38), ValueError),
]


def test_autocast_casts_only_float32_and_16_bit_operands():
    e, c, y, _ = make_inputs(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError):  # integers are refused, not cast
            fusedlm.linear_cross_entropy(e.detach().long(), c.detach().long(), y)
        assert fusedlm.linear_cross_entropy(e.double(), c.double(), y).dtype == torch.float64
        assert fusedlm.linear_cross_entropy(e, c, y).dtype == torch.float32  # (bf16 statistics, float32 loss)


@pytest.mark.parametrize("frozen_c", [False, True])
def test_second_derivatives_raise(frozen_c):
    """Not twice differentiable: differentiating a gradient raises. (A gradient without a
    graph made a gradient penalty add silent zeros: loss + |g|^2 backpropagated as loss.)"""
    e, c, y, _ = make_inputs(dtype=torch.float64)
    c.requires_grad_(not frozen_c)
    loss = fusedlm.linear_cross_entropy(e, c, y, filter_eps=None)
    (g,) = torch.autograd.grad(loss, e, create_graph=True)
    assert g.requires_grad
    with pytest.raises(RuntimeError, match="differentiable once"):
        (loss + g.pow(2).sum()).backward()
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(g.sum(), e)
    # first derivatives alone are unaffected, with or without create_graph
    (g1,) = torch.autograd.grad(fusedlm.linear_cross_entropy(e, c, y, filter_eps=None), e)
    torch.testing.assert_close(g.detach(), g1)


def test_leading_minus_inf_logits():
    """A bias of -inf at column 0 (a masked token) gave NaN on CPU: the running maximum
    started at -inf and exp(-inf - -inf) is NaN."""
    e, c, y, _ = make_inputs(dtype=torch.float64)
    bias = torch.zeros(c.shape[0], dtype=torch.float64)
    bias[:2] = -math.inf
    y = y.clamp_min(2)
    got = fusedlm.linear_cross_entropy(e, c, y, bias, filter_eps=None)
    want = torch.nn.functional.cross_entropy(e @ c.T + bias, y)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name,call,exc", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_bad_input_raises_clear_error(name, call, exc):
    e, c, y, _ = make_inputs(dtype=torch.float32)
    with pytest.raises(exc):
        call(e, c, y)


def test_op_level_errors_for_direct_callers():
    e, c, y, _ = make_inputs(n=4, d=3, v=5, dtype=torch.float32)
    with pytest.raises(ValueError, match="disagree on D"):
        torch.ops.fusedlm.cce_forward(e.detach(), c.detach()[:, :2], y, None, 0.0, -100)
    with pytest.raises(IndexError, match="outside"):
        torch.ops.fusedlm.cce_forward(e.detach(), c.detach(), y.clamp_min(0) + 5, None, 0.0, -100)


@pytest.mark.parametrize("shift", [False, True])
def test_out_of_range_target_is_named_at_its_index_in_the_callers_tensor(shift):
    """Not at its index in the flattened (and shifted) targets the kernels see."""
    e, c, y, _ = make_inputs(dtype=torch.float32, batch=2)
    y = y.clamp_min(0)
    y[1, 3] = c.shape[0] + 7
    with pytest.raises(IndexError, match=rf"targets\[1, 3\] = {c.shape[0] + 7} is outside"):
        fusedlm.linear_cross_entropy(e, c, y, shift=shift)
    if shift:  # a sequence's first target is never predicted: not checked, not used
        y[1, 3], y[0, 0] = 0, -5
        fusedlm.linear_cross_entropy(e, c, y, shift=True)


def test_reduction_none_shapes_and_zero_at_ignored():
    e, c, y, _ = make_inputs(batch=2)
    out = fusedlm.linear_cross_entropy(e, c, y, reduction="none", shift=True)
    assert out.shape == y.shape
    assert (out[..., -1] == 0).all()
    assert (out[..., :-1][y[..., 1:] == -100] == 0).all()


def test_shift_with_int32_targets_and_an_ignore_index_past_int32():
    # The shift pads each sequence's last target with ignore_index: an int32 pad overflowed.
    e, c, y, _ = make_inputs(dtype=torch.float64, batch=2)
    y = y.clamp_min(0)  # (no -100 entries: the pad is the only ignored target)
    big = 2**40
    got = fusedlm.linear_cross_entropy(e, c, y.to(torch.int32), shift=True, ignore_index=big)
    want = fusedlm.linear_cross_entropy(e, c, y, shift=True, ignore_index=big)
    torch.testing.assert_close(got, want)
    ref = fusedlm.linear_cross_entropy(e[:, :-1], c, y[:, 1:])  # (nothing ignored)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(fusedlm.linear_cross_entropy(e, c, y, shift=1), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_peaked_row_keeps_its_softmax_tail(dtype):
    """A confident row over a large vocabulary: the target's logit 0, the others near -17.4,
    each of whose exps is below half an ulp of 1. Summed one by one into a float32 running sum
    that already holds the maximum they all rounded away (loss 0 instead of ~0.0036, and no
    gradient); the sums are in double now. Loss and gradients within float32 accuracy of
    float64, and at least as close as PyTorch's float32 cross-entropy."""
    v = 128256
    c = (-17.4 + 0.3 * torch.rand(v, 1)).to(dtype)
    c[0] = 0.0
    e = torch.ones(3, 1, dtype=dtype)
    y = torch.zeros(3, dtype=torch.long)
    e_, c_ = e.clone().requires_grad_(), c.clone().requires_grad_()
    loss = fusedlm.linear_cross_entropy(e_, c_, y, filter_eps=None)  # (bf16's filter drops the tail)
    grads = torch.autograd.grad(loss, (e_, c_))
    e64, c64 = e.double().requires_grad_(), c.double().requires_grad_()
    ref = reference_loss(e64, c64, y)
    ref_grads = torch.autograd.grad(ref, (e64, c64))
    torch_f32 = F.cross_entropy(e.float() @ c.float().T, y)
    assert ref.item() > 3e-3
    assert rel_err(loss, ref) < 1e-4 and rel_err(loss, ref) <= rel_err(torch_f32, ref)
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 2e-2  # (the gradients are rounded to dtype)
