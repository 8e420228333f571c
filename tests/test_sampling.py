"""CPU tests of fusedlm.sample and fusedlm.temperature_logprobs."""
import math

import pytest
import torch
from torch.library import opcheck

import fusedlm


def truncated_probs(logits, tau, top_k=0, top_p=1.0, min_p=0.0):
    """float64 reference of the processed distribution (temperature, top-k, top-p, min-p)."""
    l = logits.double()
    keep = torch.ones_like(l, dtype=torch.bool)
    if top_k:
        keep &= l >= torch.topk(l, top_k).values[-1]
    if top_p < 1.0:
        p = torch.softmax(torch.where(keep, l / tau, -math.inf), -1)
        order = torch.argsort(p, descending=True)
        cum = torch.cumsum(p[order], 0)
        last = int((cum < top_p * cum[-1]).sum())
        keep &= l >= l[order[last]]
    if min_p > 0:
        keep &= l >= l.max() + tau * math.log(min_p)
    return torch.softmax(torch.where(keep, l / tau, -math.inf), -1)


def chi_square_pvalue(observed, expected):
    """Pearson chi-square goodness-of-fit p-value (regularised upper incomplete gamma). Bins
    expecting fewer than 5 draws are pooled into one (merged into the smallest other bin if
    the pool still expects fewer than 5): the chi-square law only holds for such counts, and
    one draw in a bin expecting 0.01 would read as p ~ 1e-18."""
    observed, expected = observed.double(), expected.double()
    small = expected < 5
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum().reshape(1)])
        expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
        if expected[-1] < 5 and expected.numel() > 1:
            i = expected[:-1].argmin()
            observed[i] += observed[-1]
            expected[i] += expected[-1]
            observed, expected = observed[:-1], expected[:-1]
    if observed.numel() < 2:
        return 1.0
    stat = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(observed.numel() - 1), dtype=torch.float64)
    return torch.special.gammaincc(dof / 2, stat / 2).item()


def assert_draws_fit(draw_tokens, probs, n, alpha=1e-3):
    """Draws (draw_tokens(n): n token ids) never outside probs' support and a chi-square fit
    to probs on it. Every run draws from fresh seeds, so a fit is rejected only when a second,
    independent batch fits badly too: a false alarm then costs alpha**2 = 1e-6 a test (one
    batch at 1e-4 failed CI by chance, p = 1e-5), while a real bias fails both batches."""
    support = probs > 0
    pvalues = []
    for _ in range(2):
        counts = torch.bincount(draw_tokens(n).cpu(), minlength=probs.numel()).double()
        assert counts[~support].sum() == 0, "drew a token outside the (truncated) support"
        if support.sum() < 2:
            return
        pvalues.append(chi_square_pvalue(counts[support], probs[support] * n))
        if pvalues[-1] > alpha:
            return
    raise AssertionError(f"two independent batches of {n} draws misfit: p-values {pvalues}, "
                         f"last counts {counts[support].tolist()}, expected {(probs[support] * n).tolist()}")


def draw(logits_row, tau, n, **kw):
    logits = logits_row.expand(n, -1).contiguous()
    seeds = torch.randint(0, 2**62, (n,))
    return fusedlm.sample(logits, tau, seed=seeds, **kw)


# top_p = 0.7 and 0.55 alone go by rejection (the first draw kept when inside the top-p set,
# else a draw from the set; with 12 entries that happens in ~30-45% of the rows), 0.3 takes the
# threshold at once.
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("trunc", [{}, dict(top_k=5), dict(top_p=0.7), dict(top_p=0.55), dict(top_p=0.3),
                                   dict(min_p=0.1), dict(top_k=8, top_p=0.9, min_p=0.02)],
                         ids=["none", "top_k", "top_p", "top_p_055", "top_p_03", "min_p", "all"])
def test_empirical_distribution_matches_softmax(tau, trunc):
    logits = torch.randn(12) * 1.5
    assert_draws_fit(lambda n: draw(logits, tau, n, **trunc), truncated_probs(logits, tau, **trunc), 40000)


def test_the_fit_check_rejects_a_biased_or_leaking_sampler():
    probs = torch.softmax(torch.randn(12, dtype=torch.float64), 0)
    probs[3] = 0.0
    probs /= probs.sum()
    assert_draws_fit(lambda n: torch.multinomial(probs, n, replacement=True), probs, 40000)
    biased = probs.clone()
    top2 = biased.topk(2).indices
    biased[top2[0]] -= 0.03  # 3 points of mass moved: ~10 sigma at 40000 draws
    biased[top2[1]] += 0.03
    with pytest.raises(AssertionError, match="misfit"):
        assert_draws_fit(lambda n: torch.multinomial(biased, n, replacement=True), probs, 40000)
    leaking = probs.clone()
    leaking[3] = 1e-3
    with pytest.raises(AssertionError, match="outside"):
        assert_draws_fit(lambda n: torch.multinomial(leaking, n, replacement=True), probs, 40000)


# Top-p by rejection over several 64-entry tiles (round-1 draws go through the tile keys too),
# with exact ties at the boundary (logits rounded to 0.25) and masked entries.
@pytest.mark.parametrize("top_p", [0.6, 0.85])
def test_top_p_by_rejection_over_tiles_matches_the_truncated_softmax(top_p):
    g = torch.Generator().manual_seed(int(top_p * 100))
    logits = (torch.randn(300, generator=g) * 4).round() / 4
    logits[::7] = float("-inf")
    tau = 0.7
    assert_draws_fit(lambda n: draw(logits, tau, n, top_p=top_p), truncated_probs(logits, tau, top_p=top_p), 60000)


# The rejection rule itself: a tokens-only top-p call keeps the plain call's token (the same
# seed: Philox round 0) exactly when that token lies in the top-p set, and otherwise draws
# another one from the set; log-prob calls draw from the set at once.
def test_top_p_by_rejection_keeps_the_plain_draw_inside_the_set():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(256, 700, generator=g) * 2
    tau = torch.rand(256, generator=g) + 0.2
    seeds = torch.randint(0, 2**62, (256,), generator=g)
    plain = fusedlm.sample(logits, tau, seed=seeds)
    got = fusedlm.sample(logits, tau, seed=seeds, top_p=0.8)
    with_logprobs = fusedlm.sample(logits, tau, seed=seeds, top_p=0.8, return_logprobs=True)[0]
    inside = torch.stack([truncated_probs(logits[i], tau[i].item(), top_p=0.8) > 0 for i in range(256)])
    rows = torch.arange(256)
    first_inside = inside[rows, plain]
    assert 10 < (~first_inside).sum() < 128  # both outcomes occur
    assert torch.equal(got[first_inside], plain[first_inside])
    assert inside[rows, got].all() and inside[rows, with_logprobs].all()
    assert (got[~first_inside] != plain[~first_inside]).all()


def top_p_boundary_case(dtype, configs, width, seed):
    """Rows of 6 distinct logits (among `width` entries, the others -inf) whose top_p is the
    float32-rounded share of their k largest (k >= 1, share >= 0.5): the (k+1)-th largest lies
    on the top-p boundary up to rounding, and either side may keep it (the CPU's float64
    cumulative sum as much as the GPU's fixed-point masses). Returns the logits, top_p, each
    entry's rank in its row (0 = largest; -inf entries 6) and k."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.full((configs, width), float("-inf"))
    top_p, k = torch.empty(configs), torch.empty(configs, dtype=torch.long)
    ranks = torch.full((configs, width), 6, dtype=torch.long)
    for c in range(configs):
        while True:
            row = (torch.randn(6, generator=g) * 1.2).to(dtype).float()
            w, order = torch.softmax(row.double(), 0).sort(descending=True)
            cum = w.cumsum(0)
            ks = [j for j in range(1, 5) if 0.5 <= cum[j - 1] < 0.97 and w[j] > 0.08]
            if row.unique().numel() == 6 and ks:
                break
        k[c] = ks[int(torch.randint(len(ks), (1,), generator=g))]
        top_p[c] = float(cum[k[c] - 1])
        at = torch.randperm(width, generator=g)[:6]
        logits[c, at] = row
        ranks[c, at[order]] = torch.arange(6)
    return logits, top_p, ranks, k


def assert_top_p_boundary_draws(device, dtype, configs=48, width=8, copies=512):
    """Top-p by rejection near the boundary (top_p_boundary_case): whether a row's set keeps the
    boundary entry is decided by rounding, but then the draws follow the truncated softmax of
    that set: never an entry past the boundary, every entry before it, and the boundary entry
    as often as the set gives it (a first draw of it kept whenever the set holds it). On CUDA
    the check's float32 sums leave such draws to the threshold's selection (see
    top_p_check_kernel); keeping them for redraws instead would halve their share or worse.
    Widths keep every row 16-byte aligned: the CUDA sums group a row's entries by its
    alignment, and at this boundary that rounding decides the set, so the copies of a row at
    other alignments may keep the boundary entry where these do not."""
    logits, top_p, ranks, k = top_p_boundary_case(dtype, configs, width, seed=configs + width)
    rows = logits.to(dtype).repeat_interleave(copies, 0).to(device)
    b = rows.shape[0]
    tokens = fusedlm.sample(rows, torch.ones(b, device=device), seed=torch.randint(0, 2**62, (b,), device=device),
                            top_p=top_p.repeat_interleave(copies).to(device)).cpu().view(configs, copies)
    drawn = ranks.gather(1, tokens)  # ranks of the drawn entries
    assert (drawn <= k[:, None]).all(), "drew an entry past the top-p boundary"
    kept_boundary = 0
    for c in range(configs):
        in_set = int(k[c]) + int((drawn[c] == k[c]).any())
        kept_boundary += in_set > k[c]
        w = torch.softmax(logits[c][ranks[c] < 6].double(), 0).sort(descending=True).values[:in_set]
        counts = torch.bincount(drawn[c], minlength=in_set).double()
        pvalue = chi_square_pvalue(counts, w / w.sum() * copies)
        assert pvalue > 1e-6, (c, pvalue, counts.tolist(), (w / w.sum() * copies).tolist())
    return kept_boundary


# Rows whose top_p sits on an entry's cumulative share (see assert_top_p_boundary_draws).
@pytest.mark.parametrize("width", [8, 704])
def test_top_p_by_rejection_near_the_boundary(width):
    kept_boundary = assert_top_p_boundary_draws("cpu", torch.float32, width=width)
    assert 0 < kept_boundary < 48  # the float32 top_p rounds either way


def philox_block(seed, offset, group):
    """Philox4x32-10 of csrc/common/philox.h (the sampler's noise of tiles 2 * group and
    2 * group + 1 for a row keyed by seed and offset), in Python: four 32-bit words."""
    x, y, z, w = group & 0xFFFFFFFF, group >> 32, offset & 0xFFFFFFFF, offset >> 32
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    for _ in range(10):
        p0, p1 = 0xD2511F53 * x, 0xCD9E8D57 * z
        x, y, z, w = (p1 >> 32) ^ y ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ w ^ k1, p0 & 0xFFFFFFFF
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return x, y, z, w


# Keys whose tile-0 words have their top 24 bits all ones (1 in 2^24; found by a search over
# offsets): word 0 is tile 0's noise, word 1 its uniform. Such a word made u = 1: the noise an
# infinite key (its tile won against any mass) and the uniform a target past the tile's mass
# (the CPU then took the tile's last entry, even a -inf one).
TOP_WORD_KEYS = [(12345, 20520893, 0), (12345, 11038633, 1)]


def assert_top_words_draw_right(device):
    for seed, offset, word in TOP_WORD_KEYS:
        assert philox_block(seed, offset, 0)[word] >> 8 == 0xFFFFFF  # the case is what it claims
        row = torch.full((1, 256), float("-inf"))
        if word == 0:  # tile 0's noise: the tile holds a mass e^-30 of tile 1's
            row[0, :64], row[0, 64], want = 0.0, 30.0, 64
        else:  # tile 0's uniform, the only tile with finite entries
            row[0, 0], row[0, 1], want = 0.0, -30.0, 0
        for dtype in (torch.float32, torch.bfloat16):
            token = fusedlm.sample(row.to(device, dtype), 1.0, seed=torch.tensor([seed], device=device),
                                   offset=torch.tensor([offset], device=device))
            assert token.item() == want, (seed, offset, word, dtype, token.item())


def test_top_philox_words_draw_right():
    assert_top_words_draw_right("cpu")


# A key whose tile-1 noise word is 0xfffffffc (found by a search over offsets): its Gumbel
# noise is ~20.9 nats, tile 0's ~0.01. Tile 1 then wins against a tile up to ~20.9 nats more
# massive, as exact Gumbel-max says (computed here in float64 from the same words); the 24-bit
# noise stopped at 16.6 nats, so such tiles never won.
TAIL_NOISE_KEY = (12345, 210958243)


def gumbel_of_word(bits):
    """The sampler's Gumbel noise of a 32-bit word, in float64 (see exponential_from_bits)."""
    if bits >= 0xF8000000:  # near u = 1: from the complement's 32 bits
        e = -math.log1p(-((bits ^ 0xFFFFFFFF) + 0.5) * 2.0**-32)
    else:
        e = -math.log(((bits >> 8) + 0.5) * 2.0**-24)
    return -math.log(e)


def assert_tail_noise_draws_right(device):
    seed, offset = TAIL_NOISE_KEY
    x, _, z, _ = philox_block(seed, offset, 0)
    lead = gumbel_of_word(z) - gumbel_of_word(x)  # how far below tile 0 tile 1 may be and win
    assert 20 < lead < 22  # the case is what it claims
    for deficit in (15.0, 18.0, lead - 0.3, lead + 0.3, 25.0):
        row = torch.full((1, 128), float("-inf"))
        row[0, 0], row[0, 64] = 0.0, -deficit
        token = fusedlm.sample(row.to(device), 1.0, seed=torch.tensor([seed], device=device),
                               offset=torch.tensor([offset], device=device)).item()
        assert token == (64 if deficit < lead else 0), (deficit, lead, token)


def test_tail_noise_draws_right():
    assert_tail_noise_draws_right("cpu")


def tied_maxima_counts(tau, n, device="cpu", dtype=torch.float32):
    """Draws from n copies of a row whose maximum (12.0) sits in two tiles (entries 100 and
    3000); returns how often each of the two was drawn."""
    row = torch.randn(4096)
    row[100] = row[3000] = 12.0
    logits = row.to(device, dtype).expand(n, -1).contiguous()
    tokens = fusedlm.sample(logits, tau, seed=torch.randint(0, 2**62, (n,), device=device)).cpu()
    return int((tokens == 100).sum()), int((tokens == 3000).sum())


# Two tiles holding the same maximum split the draws evenly at any temperature > 0, down to
# tau = 1e-7 where max / tau is ~1.2e8 (the tile keys must not round the noise away).
@pytest.mark.parametrize("tau", [1e-7, 1e-6, 1.0])
def test_tied_maxima_in_two_tiles_split_evenly(tau):
    n1, n2 = tied_maxima_counts(tau, 20000)
    assert n1 + n2 > 0.9 * 20000 and abs(n1 - n2) <= 5 * math.sqrt(n1 + n2), (n1, n2)


def logits_of_tiny_case(tau, b, v):
    """Rows with one clear maximum (float32; some rows all below -25, some near 1e4, some of
    size ~1e35), the same for the same arguments."""
    g = torch.Generator().manual_seed(hash((tau, b, v)) % 2**31)
    logits = torch.randn(b, v, generator=g) * 3
    logits[::2] -= 40.0
    logits[1::4] += 1e4
    logits[torch.arange(b), logits.argmax(1)] += 0.5  # (near 1e4, float32 steps of ~0.001 tie often)
    logits[3::8] *= 1e35
    return logits


def tiny_temperature_case(tau, b, v, device="cpu"):
    """logits_of_tiny_case sampled at a tiny tau: the tokens, their log-probs, the expected
    maxima and raw log-probs. At such tau the softmax is one-hot in float arithmetic: the
    maximum is drawn with log-prob 0."""
    logits = logits_of_tiny_case(tau, b, v)
    top2 = logits.topk(2, dim=1).values
    assert (top2[:, 0] > top2[:, 1]).all()
    tokens, logp, raw = fusedlm.sample(logits.to(device), torch.full((b,), tau, device=device),
                                       seed=torch.randint(0, 2**62, (b,), device=device), return_logprobs=True)
    want_raw = torch.log_softmax(logits.double(), 1).gather(1, logits.argmax(1, keepdim=True)).squeeze(1)
    return tokens.cpu(), logp.cpu(), raw.cpu(), logits.argmax(1), want_raw


# Tiny (down to subnormal) temperatures draw the maximum with log-prob 0, for logits of any
# sign and size.
@pytest.mark.parametrize("tau", [1e-6, 1e-9, 1e-38, 1e-44])
def test_tiny_temperatures_draw_the_maximum(tau):
    tokens, logp, raw, want, want_raw = tiny_temperature_case(tau, 37, 3001)
    assert (tokens == want).all()
    assert logp.abs().max() <= 1e-6
    torch.testing.assert_close(raw.double(), want_raw, rtol=1e-5, atol=1e-5)
    out = fusedlm.temperature_logprobs(logits_of_tiny_case(tau, 37, 3001), want, [tau])
    assert out.abs().max() <= 1e-6


def huge_logits_case(tau, b, v, device="cpu"):
    """Rows of logits ~1e35 apart sampled at an ordinary tau: one-hot on the maximum, which
    is drawn with log-prob 0 (logits / tau near float32's limit)."""
    g = torch.Generator().manual_seed(b * v)
    logits = torch.randn(b, v, generator=g) * 1e35
    tokens, logp = fusedlm.sample(logits.to(device), tau, seed=torch.randint(0, 2**62, (b,), device=device),
                                  return_logprobs=True)[:2]
    return tokens.cpu(), logp.cpu(), logits.argmax(1)


@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_huge_logits_draw_the_maximum(tau):
    tokens, logp, want = huge_logits_case(tau, 37, 3001)
    assert (tokens == want).all() and logp.abs().max() <= 1e-6


def test_temperature_zero_is_exact_argmax_lowest_index():
    logits = torch.randn(64, 1000)
    logits[:, 17] = 50.0
    logits[:, 500] = 50.0  # a tie: index 17 must win
    logits[:, 900] = float("-inf")
    tokens, logprob, raw = fusedlm.sample(logits, 0.0, return_logprobs=True)
    assert (tokens == 17).all()
    assert (logprob == 0).all()
    torch.testing.assert_close(raw, torch.log_softmax(logits, -1)[:, 17])
    mixed_tau = torch.tensor([0.0, 1.0] * 32)
    tokens = fusedlm.sample(logits, mixed_tau)
    assert (tokens[::2] == 17).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logprobs_match_reference(dtype):
    logits = (torch.randn(16, 301) * 2).to(dtype)
    tau = torch.rand(16) * 1.5 + 0.1
    tokens, logprob, raw = fusedlm.sample(logits, tau, top_k=50, return_logprobs=True)
    l = logits.double()
    for b in range(16):
        p = truncated_probs(l[b], tau[b].item(), top_k=50)
        assert p[tokens[b]] > 0
        assert math.isclose(logprob[b].item(), p[tokens[b]].log().item(), rel_tol=1e-5, abs_tol=1e-5)
        want_raw = torch.log_softmax(l[b], -1)[tokens[b]].item()
        assert math.isclose(raw[b].item(), want_raw, rel_tol=1e-5, abs_tol=1e-5)


def test_seed_reproducible_and_independent_of_batch_position():
    logits = torch.randn(32, 5000)
    tau = torch.rand(32) + 0.5
    seeds = torch.randint(0, 2**62, (32,))
    a = fusedlm.sample(logits, tau, seed=seeds)
    assert torch.equal(a, fusedlm.sample(logits, tau, seed=seeds))
    perm = torch.randperm(32)
    b = fusedlm.sample(logits[perm], tau[perm], seed=seeds[perm])
    assert torch.equal(b, a[perm])
    single = fusedlm.sample(logits[5:6], tau[5:6], seed=seeds[5:6])
    assert single.item() == a[5].item()
    # a different offset gives a different stream
    c = fusedlm.sample(logits, tau, seed=seeds, offset=1)
    assert not torch.equal(a, c)


def test_torch_generator_is_respected():
    logits = torch.randn(8, 2000)
    torch.manual_seed(123)
    a = fusedlm.sample(logits, 1.0)
    torch.manual_seed(123)
    b = fusedlm.sample(logits, 1.0)
    g = torch.Generator().manual_seed(7)
    c = fusedlm.sample(logits, 1.0, generator=g)
    g.manual_seed(7)
    d = fusedlm.sample(logits, 1.0, generator=g)
    assert torch.equal(a, b) and torch.equal(c, d)


def test_int_seed_gives_distinct_rows():
    logits = torch.zeros(64, 1000)
    tokens = fusedlm.sample(logits, 1.0, seed=0)
    assert len(set(tokens.tolist())) > 50


def derived_seeds(seed, batch):
    """The per-row seeds of an int seed, as documented: (row * 0x5851F42D4C957F2D + seed mod
    2^62) mod 2^62, in Python integers (no int64 wrap-around to rely on)."""
    return torch.tensor([(r * 0x5851F42D4C957F2D + seed % 2**62) % 2**62 for r in range(batch)])


def assert_numbers_match_tensors(logits, device):
    """Numbers given to sample (passed to the op as 0-d CPU tensors, one value for every row)
    draw what the same values as [B] tensors draw, an int seed what its derived per-row seeds
    draw; with and without log-probs."""
    b = logits.shape[0]
    rows = lambda v, dt: torch.full((b,), v, dtype=dt, device=device)  # noqa: E731
    for seed in (0, 12345, -7, 2**70 + 3):
        for kw, as_tensors in (
                (dict(), dict()),
                (dict(top_k=5), dict(top_k=rows(5, torch.long))),
                (dict(top_p=0.9), dict(top_p=rows(0.9, torch.float32))),
                (dict(top_k=40, top_p=0.8, min_p=0.01, offset=3),
                 dict(top_k=rows(40, torch.long), top_p=rows(0.8, torch.float32),
                      min_p=rows(0.01, torch.float32), offset=rows(3, torch.long)))):
            for logprobs in (False, True):
                got = fusedlm.sample(logits, 0.7, seed=seed, return_logprobs=logprobs, **kw)
                want = fusedlm.sample(logits, rows(0.7, torch.float32), seed=derived_seeds(seed, b).to(device),
                                      return_logprobs=logprobs, **as_tensors)
                for g, w in zip(got if logprobs else (got,), want if logprobs else (want,)):
                    assert torch.equal(g, w), (seed, kw, logprobs)
    # numpy scalars as numbers (a float one for an integer parameter, as whole numbers are)
    np = pytest.importorskip("numpy")
    assert torch.equal(fusedlm.sample(logits, np.float32(0.7), seed=np.int64(5), top_k=np.float32(40.0),
                                      offset=np.float32(3.0)),
                       fusedlm.sample(logits, 0.7, seed=5, top_k=40, offset=3))


def test_numbers_match_tensors():
    assert_numbers_match_tensors(torch.randn(37, 3000) * 2, "cpu")


def test_numbers_under_torch_compile():
    # Compiled, numbers become [B] device tensors in the graph (a CPU tensor there would keep
    # a CUDA graph from forming): the same draws as eager.
    logits = torch.randn(64, 500)
    fn = torch.compile(lambda l: fusedlm.sample(l, 0.7, seed=5, top_k=20, offset=2, return_logprobs=True),
                       fullgraph=True)
    for a, b in zip(fn(logits), fusedlm.sample(logits, 0.7, seed=5, top_k=20, offset=2, return_logprobs=True)):
        assert torch.equal(a, b)


def test_int_seed_rows_are_the_documented_derivation():
    # The op derives the rows' seeds from a 0-d seed; a changed formula would change every
    # int-seeded draw (checked here against tokens drawn with explicit per-row seeds).
    logits = torch.randn(300, 700)
    tokens = fusedlm.sample(logits, 1.0, seed=987654321987)
    assert torch.equal(tokens, fusedlm.sample(logits, 1.0, seed=derived_seeds(987654321987, 300)))


def test_masked_and_all_masked_rows():
    logits = torch.full((3, 50), float("-inf"))
    logits[0, [3, 7]] = 0.0
    logits[2, 10] = 1.0
    tokens, logprob, raw = fusedlm.sample(logits, torch.tensor([1.0, 1.0, 0.0]),
                                          return_logprobs=True)
    assert tokens[0].item() in (3, 7)
    assert math.isclose(logprob[0].item(), math.log(0.5), rel_tol=1e-6)
    assert tokens[1].item() == 0 and math.isnan(logprob[1].item()) and math.isnan(raw[1].item())
    assert tokens[2].item() == 10


@pytest.mark.parametrize("trunc", [{}, dict(top_k=5), dict(top_p=0.8), dict(min_p=0.1)],
                         ids=["plain", "top_k", "top_p", "min_p"])
def test_nan_logits_count_as_minus_inf(trunc):
    logits = torch.randn(7, 301) * 2
    nan_at = torch.rand(7, 301) < 0.1
    nan_at[:, 0] = True  # also the first entry, where an argmax scan starts
    nan_at[6] = True     # a row of NaN only: like a row of -inf
    tau = torch.tensor([0.0, 0.7, 1.3, 0.0, 1.3, 0.5, 1.0])
    seeds = torch.arange(7) * 7919
    got = fusedlm.sample(logits.masked_fill(nan_at, float("nan")), tau, seed=seeds, return_logprobs=True, **trunc)
    want = fusedlm.sample(logits.masked_fill(nan_at, float("-inf")), tau, seed=seeds, return_logprobs=True,
                          **trunc)
    assert torch.equal(got[0], want[0])
    for x, y in zip(got[1:], want[1:]):
        assert torch.allclose(x, y, equal_nan=True)
    assert got[0][6] == 0 and got[1][6].isnan() and not got[1][:6].isnan().any()


@pytest.mark.parametrize("vocab", [1, 3, 1031])
@pytest.mark.parametrize("batch", [1, 5])
def test_odd_shapes(vocab, batch):
    logits = torch.randn(batch, vocab)
    tokens = fusedlm.sample(logits, torch.rand(batch) + 0.1)
    assert tokens.shape == (batch,) and tokens.dtype == torch.int64
    assert ((tokens >= 0) & (tokens < vocab)).all()


def test_temperature_logprobs_reference():
    logits = torch.randn(6, 257) * 3
    tokens = torch.randint(0, 257, (6,))
    tokens[0] = logits[0].argmax()
    taus = [0.0, 0.3, 1.0, 1.7]
    out = fusedlm.temperature_logprobs(logits, tokens, taus)
    assert out.shape == (6, 4)
    for k, tau in enumerate(taus):
        if tau == 0:
            want = torch.where(tokens == logits.argmax(-1), 0.0, -math.inf)
        else:
            want = torch.log_softmax(logits.double() / tau, -1).gather(1, tokens[:, None])[:, 0].float()
        torch.testing.assert_close(out[:, k], want, rtol=1e-5, atol=1e-5)


BAD = [
    ("negative tau", lambda l: fusedlm.sample(l, -0.5), ValueError),
    ("nan tau", lambda l: fusedlm.sample(l, float("nan")), ValueError),
    ("negative tau tensor", lambda l: fusedlm.sample(l, torch.tensor([1.0, -1.0, 1.0])), ValueError),
    ("nan tau tensor", lambda l: fusedlm.sample(l, torch.tensor([1.0, math.nan, 1.0])), ValueError),
    ("tau shape", lambda l: fusedlm.sample(l, torch.ones(2)), ValueError),
    ("1-D logits", lambda l: fusedlm.sample(l[0], 1.0), ValueError),
    ("int logits", lambda l: fusedlm.sample(l.long(), 1.0), TypeError),
    ("top_p", lambda l: fusedlm.sample(l, 1.0, top_p=0.0), ValueError),
    ("top_k", lambda l: fusedlm.sample(l, 1.0, top_k=-1), ValueError),
    ("min_p", lambda l: fusedlm.sample(l, 1.0, min_p=1.5), ValueError),
    ("seed type", lambda l: fusedlm.sample(l, 1.0, seed=1.5), TypeError),
    # Integer parameters as float / bool tensors would be truncated silently.
    ("float seed tensor", lambda l: fusedlm.sample(l, 1.0, seed=torch.rand(3)), TypeError),
    ("bool seed tensor", lambda l: fusedlm.sample(l, 1.0, seed=torch.ones(3, dtype=torch.bool)), TypeError),
    ("float offset tensor", lambda l: fusedlm.sample(l, 1.0, seed=0, offset=torch.rand(3)), TypeError),
    ("float top_k tensor", lambda l: fusedlm.sample(l, 1.0, top_k=torch.full((3,), 2.5)), TypeError),
    ("negative tau in temperature_logprobs",
     lambda l: fusedlm.temperature_logprobs(l, torch.tensor([0, 1, 2]), [1.0, -1.0]), ValueError),
    ("token range", lambda l: fusedlm.temperature_logprobs(l, torch.tensor([0, 1, 99]), [1.0]), IndexError),
    ("inf tau", lambda l: fusedlm.sample(l, math.inf), ValueError),
    ("inf tau tensor", lambda l: fusedlm.sample(l, torch.tensor([1.0, math.inf, 1.0])), ValueError),
    ("bool tau", lambda l: fusedlm.sample(l, True), TypeError),
    ("no tau", lambda l: fusedlm.sample(l, None), TypeError),
    ("list tau", lambda l: fusedlm.sample(l, [1.0, 1.0, 1.0]), TypeError),
    # Per-row truncation values of CPU tensors (CUDA rows with them return token 0 and NaN).
    ("top_p tensor 0", lambda l: fusedlm.sample(l, 1.0, top_p=torch.tensor([0.5, 0.0, 0.9])), ValueError),
    ("top_p tensor nan", lambda l: fusedlm.sample(l, 1.0, top_p=torch.tensor([0.5, math.nan, 0.9])), ValueError),
    ("top_p tensor 1.5", lambda l: fusedlm.sample(l, 1.0, top_p=torch.tensor([0.5, 1.5, 0.9])), ValueError),
    ("min_p tensor 1.5", lambda l: fusedlm.sample(l, 1.0, min_p=torch.tensor([0.1, 1.5, 0.1])), ValueError),
    ("min_p tensor nan", lambda l: fusedlm.sample(l, 1.0, min_p=torch.tensor([0.1, math.nan, 0.1])), ValueError),
    ("top_k tensor -5", lambda l: fusedlm.sample(l, 1.0, top_k=torch.tensor([5, -5, 5])), ValueError),
    ("top_k nan", lambda l: fusedlm.sample(l, 1.0, top_k=math.nan), ValueError),
    ("offset float", lambda l: fusedlm.sample(l, 1.0, seed=0, offset=1.5), ValueError),
    ("offset negative", lambda l: fusedlm.sample(l, 1.0, seed=0, offset=-1), ValueError),
    ("offset bool", lambda l: fusedlm.sample(l, 1.0, seed=0, offset=True), TypeError),
    ("return_logprobs str", lambda l: fusedlm.sample(l, 1.0, return_logprobs="False"), TypeError),
    # The op itself, with numbers as 0-d host tensors (checked on the host, as CPU tensors are).
    ("op host tau", lambda l: torch.ops.fusedlm.sample(l, torch.tensor(-1.0), torch.tensor(1), None, None, None, None),
     ValueError),
    ("op host top_p", lambda l: torch.ops.fusedlm.sample(l, torch.tensor(1.0), torch.tensor(1), None, None,
                                                         torch.tensor(1.5), None), ValueError),
    ("op host seed dtype", lambda l: torch.ops.fusedlm.sample(l, torch.tensor(1.0), torch.tensor(1.0), None, None, None,
                                                              None), ValueError),
    ("seed and generator", lambda l: fusedlm.sample(l, 1.0, seed=0, generator=torch.Generator()), ValueError),
    ("tl int logits", lambda l: fusedlm.temperature_logprobs(l.long(), torch.tensor([0, 1, 2]), [1.0]), TypeError),
    ("tl 17 temperatures", lambda l: fusedlm.temperature_logprobs(l, torch.tensor([0, 1, 2]), [1.0] * 17), ValueError),
    ("tl float tokens", lambda l: fusedlm.temperature_logprobs(l, torch.tensor([0.0, 1.0, 2.0]), [1.0]), TypeError),
    ("tl tokens shape", lambda l: fusedlm.temperature_logprobs(l, torch.tensor([0, 1]), [1.0]), ValueError),
    ("tl inf temperature", lambda l: fusedlm.temperature_logprobs(l, torch.tensor([0, 1, 2]), [math.inf]), ValueError),
    # (a complex temperature lost its imaginary part with only a warning)
    ("complex tau tensor", lambda l: fusedlm.sample(l, torch.ones(3, dtype=torch.complex64)), TypeError),
    ("complex top_p tensor", lambda l: fusedlm.sample(l, 1.0, top_p=torch.full((3,), 0.5 + 0j)), TypeError),
    ("tl complex temperatures", lambda l: fusedlm.temperature_logprobs(l, torch.tensor([0, 1, 2]),
                                                                       torch.tensor([1 + 1j])), TypeError),
    ("tl no temperatures", lambda l: fusedlm.temperature_logprobs(l, torch.tensor([0, 1, 2]), None), TypeError),
    ("tl bool temperatures", lambda l: fusedlm.temperature_logprobs(l, torch.tensor([0, 1, 2]), True), TypeError),
    ("tl huge temperature", lambda l: fusedlm.temperature_logprobs(l, torch.tensor([0, 1, 2]), [10**400]), ValueError),
    ("op tl int logits", lambda l: torch.ops.fusedlm.temperature_logprobs(l.long(), torch.tensor([0, 1, 2]),
                                                                          torch.tensor([1.0])), ValueError),
    ("huge tau", lambda l: fusedlm.sample(l, 10**400), ValueError),
    ("huge top_p", lambda l: fusedlm.sample(l, 1.0, top_p=10**400), ValueError),
    ("negative offset tensor", lambda l: fusedlm.sample(l, 1.0, seed=0, offset=torch.tensor([0, -1, 0])), ValueError),
    ("op host offset", lambda l: torch.ops.fusedlm.sample(l, torch.tensor(1.0), torch.tensor(1), torch.tensor(-1),
                                                          None, None, None), ValueError),
    ("generator type", lambda l: fusedlm.sample(l, 1.0, generator=5), TypeError),
]


@pytest.mark.parametrize("name,call,exc", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(name, call, exc):
    with pytest.raises(exc):
        call(torch.randn(3, 20))


def test_integer_tensors_of_any_integer_dtype_are_accepted():
    logits = torch.randn(3, 20)
    a = fusedlm.sample(logits, 1.0, seed=torch.arange(3, dtype=torch.int32), top_k=torch.full((3,), 5, dtype=torch.int16))
    b = fusedlm.sample(logits, 1.0, seed=torch.arange(3), top_k=5)
    assert torch.equal(a, b)


def test_loose_but_valid_arguments():
    """Forms a user may pass: a 0-d temperature tensor (one value for every row), any int
    seed (taken modulo 2^62), int32 tokens and a scalar temperature in temperature_logprobs;
    outputs never require grad (the ops are not differentiable)."""
    logits = torch.randn(3, 20, requires_grad=True)
    seeds = torch.arange(3)
    assert torch.equal(fusedlm.sample(logits, torch.tensor(0.7), seed=seeds), fusedlm.sample(logits, 0.7, seed=seeds))
    assert torch.equal(fusedlm.sample(logits, 1.0, seed=2**70 + 5), fusedlm.sample(logits, 1.0, seed=(2**70 + 5) % 2**62))
    out = fusedlm.sample(logits, 1.0, seed=seeds, return_logprobs=True)
    assert not any(t.requires_grad for t in out)
    lp = fusedlm.temperature_logprobs(logits, torch.tensor([0, 1, 2], dtype=torch.int32), 0.5)
    assert lp.shape == (3, 1) and not lp.requires_grad
    torch.testing.assert_close(lp, fusedlm.temperature_logprobs(logits, torch.tensor([0, 1, 2]), [0.5]))
    np = pytest.importorskip("numpy")
    torch.testing.assert_close(fusedlm.temperature_logprobs(logits, torch.tensor([0, 1, 2]), np.array([0.5])), lp)


def test_parameters_that_require_grad_give_outputs_that_do_not():
    """The ops have no gradient: a temperature (or truncation) tensor that requires grad must
    not give outputs that require grad and then backpropagate nothing."""
    logits = torch.randn(3, 20)
    tau = torch.full((3,), 0.8, requires_grad=True)
    out = fusedlm.sample(logits, tau, seed=torch.arange(3), top_p=torch.full((3,), 0.9, requires_grad=True),
                         min_p=torch.full((3,), 0.01, requires_grad=True), return_logprobs=True)
    assert not any(t.requires_grad for t in out)
    taus = torch.tensor([0.5, 1.0], requires_grad=True)
    assert not fusedlm.temperature_logprobs(logits, torch.tensor([0, 1, 2]), taus).requires_grad


def test_truncation_values_meaning_off_draw_as_if_not_given():
    """top_k = 0 or >= V, top_p = 1 and min_p = 0 are off: given as numbers they leave the
    tokens of the same seed as they are (top_p alone draws by rejection; with another
    truncation argument, even one that is off, it used to take the threshold path)."""
    logits = torch.randn(64, 500) * 2
    seeds = torch.arange(64) * 7919
    for base in (dict(), dict(top_p=0.9), dict(top_k=20), dict(min_p=0.05)):
        want = fusedlm.sample(logits, 1.0, seed=seeds, **base)
        for off in (dict(top_k=0), dict(top_k=500), dict(top_k=10**30), dict(top_k=2**63), dict(top_p=1.0),
                    dict(min_p=0.0)):
            if off.keys() & base.keys():
                continue
            assert torch.equal(fusedlm.sample(logits, 1.0, seed=seeds, **base, **off), want), (base, off)


def assert_nan_token_logprobs_are_minus_inf(device, dtype=torch.float32):
    """A token whose logit is NaN has log-prob -inf at every temperature (NaN counts as -inf),
    not NaN, which would spread through LPO's log-sum-exp over the temperatures."""
    logits = torch.randn(4, 300) * 2
    logits[:, 17] = math.nan
    logits[3, 5:40] = math.nan  # also NaN entries around it
    out = fusedlm.temperature_logprobs(logits.to(dtype).to(device), torch.full((4,), 17, device=device),
                                       [0.0, 0.5, 1.0, 2.0]).cpu()
    assert (out == -math.inf).all(), out


def test_nan_token_logprobs_are_minus_inf():
    assert_nan_token_logprobs_are_minus_inf("cpu")


def test_temperature_logprobs_under_torch_compile_fullgraph():
    logits = torch.randn(5, 70)
    tokens = torch.randint(0, 70, (5,))
    fn = torch.compile(lambda l, t: fusedlm.temperature_logprobs(l, t, [0.0, 0.5, 1.0]), fullgraph=True)
    torch.testing.assert_close(fn(logits, tokens), fusedlm.temperature_logprobs(logits, tokens, [0.0, 0.5, 1.0]))


# +inf logits count as the largest float in every sum: a row holding any draws uniformly among
# its +inf entries (log-prob -log(count)), with and without truncation. (Before: NaN sums, a
# token elsewhere.)
def assert_plus_inf_rows_draw_among_them(device, dtype=torch.float32, v=300, n=4000):
    logits = torch.randn(n, v) * 3
    logits[:, [7, 150, 299]] = math.inf
    logits[::2, 7] = -math.inf  # half the rows: two +inf entries
    logits = logits.to(dtype).to(device)
    seeds = torch.randint(0, 2**62, (n,), device=device)
    for trunc in ({}, dict(top_k=5), dict(top_p=0.9), dict(top_p=0.3), dict(min_p=0.1)):
        tokens = fusedlm.sample(logits, 0.8, seed=seeds, **trunc).cpu()
        tokens_lp, lp, raw = (t.cpu() for t in fusedlm.sample(logits, 0.8, seed=seeds, return_logprobs=True, **trunc))
        for t in (tokens, tokens_lp):
            assert (t[::2] != 7).all() and torch.isin(t, torch.tensor([7, 150, 299])).all(), trunc
            share = (t[1::2] == 150).float().mean().item()  # rows with three: each 1/3
            assert abs(share - 1 / 3) < 0.05, (trunc, share)
        count = torch.where(torch.arange(n) % 2 == 0, 2.0, 3.0)
        torch.testing.assert_close(lp, -count.log())
        torch.testing.assert_close(raw, -count.log())
    greedy = fusedlm.sample(logits, 0.0, return_logprobs=True)
    assert torch.equal(greedy[0].cpu(), torch.where(torch.arange(n) % 2 == 0, 150, 7))
    out = fusedlm.temperature_logprobs(logits, torch.full((n,), 150, device=device), [0.5, 1.0]).cpu()
    torch.testing.assert_close(out, -count.log()[:, None].expand(n, 2))


def test_plus_inf_logits_draw_among_them():
    assert_plus_inf_rows_draw_among_them("cpu")


def test_temperature_logprobs_error_names_the_op():
    with pytest.raises(ValueError, match="temperature_logprobs"):
        fusedlm.temperature_logprobs(torch.randn(3, 20), torch.tensor([0, 1, 2]), [-1.0])


def test_opcheck_ops():
    logits = torch.randn(4, 33)
    args = (logits, torch.tensor([0.0, 0.5, 1.0, 2.0]), torch.arange(4), torch.zeros(4, dtype=torch.long),
            torch.tensor([0, 3, 0, 10]), torch.tensor([1.0, 0.9, 0.5, 1.0]), None)
    opcheck(torch.ops.fusedlm.sample.default, args)
    no_offset = args[:3] + (None,) + args[4:]  # None = offset 0 for every row
    opcheck(torch.ops.fusedlm.sample.default, no_offset)
    for a, b in zip(torch.ops.fusedlm.sample(*args), torch.ops.fusedlm.sample(*no_offset)):
        assert torch.equal(a, b)
    tokens_only = args + (False,)  # need_logprobs=False: the same tokens, empty log-prob outputs
    opcheck(torch.ops.fusedlm.sample.default, tokens_only)
    tokens, lp, raw = torch.ops.fusedlm.sample(*tokens_only)
    assert torch.equal(tokens, torch.ops.fusedlm.sample(*args)[0]) and lp.shape == raw.shape == (0,)
    # Per-row parameters given as 0-d CPU tensors (one value for every row; a batch seed).
    host_scalars = (logits, torch.tensor(0.8), torch.tensor(42), torch.tensor(7), torch.tensor(3),
                    torch.tensor(0.9), torch.tensor(0.05))
    opcheck(torch.ops.fusedlm.sample.default, host_scalars)
    opcheck(torch.ops.fusedlm.temperature_logprobs.default,
            (logits, torch.tensor([1, 2, 3, 4]), torch.tensor([0.0, 0.5, 1.0])))


def test_torch_compile_fullgraph():
    logits = torch.randn(8, 100)
    seeds = torch.arange(8)
    fn = torch.compile(lambda l, t: fusedlm.sample(l, t, seed=seeds, top_p=0.9,
                                                   return_logprobs=True), fullgraph=True)
    tau = torch.rand(8)
    got = fn(logits, tau)
    want = fusedlm.sample(logits, tau, seed=seeds, top_p=0.9, return_logprobs=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
