"""GPU tests at sizes past 32-bit indexing: N * V, V * D and N * D above 2^31 elements in CCE,
B * V above 2^31 in sampling; and more CCE tokens than one backward launch takes (~780k on
Hopper: the forward and backward then run in row blocks). An index product formed in 32 bits would read or write the wrong
rows there; the other GPU tests are far below these sizes. References are float64, computed
in row chunks (the logits never exist whole)."""
import pytest
import torch

import fusedlm

pytestmark = pytest.mark.cuda
DEV = "cuda"


def need_free_gib(gib):
    torch.cuda.empty_cache()  # (blocks cached by earlier tests count as used)
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory, {free / 2**30:.1f} free")


def chunked_reference(e, c, y, b, g_out, c_rows, chunk_rows):
    """Per-row loss, dE in row chunks (yielded) and dC of the vocabulary rows `c_rows`, all
    float64 from the same 16-bit values (cross-entropy, reduction="none", ignore_index -100)."""
    c64, b64 = c.detach().double(), b.detach().double()
    grad_c = torch.zeros(len(c_rows), c.shape[1], dtype=torch.float64, device=DEV)
    for r0 in range(0, e.shape[0], chunk_rows):
        rows = slice(r0, min(r0 + chunk_rows, e.shape[0]))
        e64 = e[rows].detach().double()
        logits = torch.addmm(b64, e64, c64.T)
        valid = y[rows] != -100
        yv = y[rows].clamp_min(0)
        lse = torch.logsumexp(logits, 1)
        loss = torch.where(valid, lse - logits.gather(1, yv[:, None])[:, 0], 0.0)
        g = torch.softmax(logits, 1)
        del logits
        g[torch.arange(g.shape[0], device=DEV), yv] -= 1.0
        g *= torch.where(valid, g_out[rows].double(), 0.0)[:, None]
        grad_c += g[:, c_rows].T @ e64
        yield rows, loss, g @ c64
        del g
    yield None, None, grad_c


def rowwise_rel_err(got, want):
    return ((got.double() - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-30))


@pytest.mark.parametrize("n,d,v", [(17011, 72, 262147),   # N * V = 4.5e9 > 2^32
                                   (300, 8264, 262147),   # V * D = 2.2e9 > 2^31
                                   (262147, 8264, 1031),  # N * D = 2.2e9 > 2^31
                                   (5300000, 16, 1031)],  # more tokens than one backward launch takes
                         ids=["tokens_x_vocab", "vocab_x_features", "tokens_x_features", "row_blocks"])
def test_cce_past_32_bit_sizes_match_reference(n, d, v):
    need_free_gib(40)
    gen = torch.Generator(device=DEV).manual_seed(n + d + v)
    e = torch.randn(n, d, device=DEV, generator=gen).to(torch.bfloat16).requires_grad_()
    c = (torch.randn(v, d, device=DEV, generator=gen) * (2.0 / d**0.5)).to(torch.bfloat16).requires_grad_()
    b = torch.randn(v, device=DEV, generator=gen).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, v, (n,), device=DEV, generator=gen)
    y[torch.rand(n, device=DEV, generator=gen) < 0.1] = -100
    y[-1] = v - 1  # the last row and the last class
    loss = fusedlm.linear_cross_entropy(e, c, y, b, reduction="none", filter_eps=None)
    g_out = torch.rand(n, device=DEV, generator=gen) + 0.5
    ge, gc, gb = torch.autograd.grad(loss, (e, c, b), g_out)
    # dC is compared on the first, last and some random vocabulary rows (all of them would
    # need V x D float64); dE and the loss on every row.
    c_rows = torch.cat([torch.arange(64, device=DEV), torch.arange(v - 64, v, device=DEV),
                        torch.randint(0, v, (256,), device=DEV, generator=gen)]).unique()
    chunk_rows = max(1, min((1 << 28) // v, (1 << 27) // d))  # ~2 GB of float64 logits, 1 GB of e
    for rows, ref_loss, ref_ge in chunked_reference(e, c, y, b, g_out, c_rows, chunk_rows):
        if rows is None:
            ref_gc = ref_ge
            break
        assert (loss[rows].double() - ref_loss).abs().max().item() < 2e-3
        valid = y[rows] != -100
        assert (ge[rows][~valid] == 0).all()
        assert rowwise_rel_err(ge[rows][valid], ref_ge[valid]).max().item() < 3e-2
    big = ref_gc.norm(dim=1) > 1e-3 * ref_gc.norm(dim=1).max()
    assert rowwise_rel_err(gc[c_rows][big], ref_gc[big]).max().item() < 3e-2
    assert torch.isfinite(gc).all() and torch.isfinite(gb).all()
    if d < 1000:
        # The filtered path (per-tile maxima recorded in the forward, N x V/256 floats, and the
        # skip hints) with a threshold nothing falls below: the exact gradients again.
        loss_f = fusedlm.linear_cross_entropy(e, c, y, b, reduction="none", filter_eps=1e-30)
        assert torch.equal(loss_f, loss)
        for got, want in zip(torch.autograd.grad(loss_f, (e, c), g_out), (ge, gc)):
            keep = want.float().norm(dim=1) > 0
            assert rowwise_rel_err(got[keep], want[keep].double()).max().item() < 1e-3


@pytest.mark.parametrize("v", [262144, 262147], ids=["aligned_rows", "unaligned_rows"])
@pytest.mark.parametrize("trunc", [{}, dict(top_k=50), dict(top_p=0.9), dict(min_p=0.1)],
                         ids=["plain", "top_k", "top_p", "min_p"])
def test_sampling_past_32_bit_sizes_draws_the_planted_token(v, trunc):
    """B * V = 2.2e9 bf16 logits (4.4 GB): each row holds one entry 60 above the rest, at a
    random column (the last rows: near the end of the buffer), so every draw must return it
    and its log-probs must be ~0; a 32-bit row offset would read another row's entries."""
    need_free_gib(12)
    b = 8300
    gen = torch.Generator(device=DEV).manual_seed(v)
    logits = torch.randn(b, v, device=DEV, dtype=torch.bfloat16, generator=gen)
    planted = torch.randint(0, v, (b,), device=DEV, generator=gen)
    planted[-1] = v - 1
    logits[torch.arange(b, device=DEV), planted] = 60.0
    tau = torch.rand(b, device=DEV, generator=gen) * 1.5
    tau[::5] = 0.0
    tokens, logprob, raw_logprob = fusedlm.sample(logits, tau, seed=7, return_logprobs=True, **trunc)
    assert torch.equal(tokens, planted)
    assert logprob.abs().max().item() < 1e-5 and raw_logprob.abs().max().item() < 1e-5
    if not trunc:
        lp = fusedlm.temperature_logprobs(logits, planted, [0.0, 0.7, 1.0])
        assert lp.abs().max().item() < 1e-5
