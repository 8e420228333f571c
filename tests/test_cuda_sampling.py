"""GPU tests of the fused sampling kernels (pytest -m cuda)."""
import math
import re

import pytest
import torch

import fusedlm
from test_sampling import (assert_draws_fit, assert_nan_token_logprobs_are_minus_inf,
                           assert_numbers_match_tensors, assert_plus_inf_rows_draw_among_them,
                           assert_tail_noise_draws_right, assert_top_p_boundary_draws,
                           assert_top_words_draw_right, huge_logits_case, logits_of_tiny_case,
                           tied_maxima_counts, tiny_temperature_case, truncated_probs)

pytestmark = pytest.mark.cuda
DEV = "cuda"


# (V, row stride): 5003 rows are not 16-byte aligned (unaligned fallback kernel); 5120 rows are
# (main kernel, partial last batch); a 5003-wide view of 5120-wide rows takes the main kernel
# with a ragged row end.
@pytest.mark.parametrize("v,ld", [(5003, 5003), (5120, 5120), (5003, 5120)],
                         ids=["unaligned", "aligned", "aligned_view"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_same_tokens_as_cpu(dtype, v, ld):
    logits = (torch.randn(512, ld) * 2).to(dtype)
    tau = torch.rand(512) * 1.5
    tau[::7] = 0.0
    seeds = torch.randint(0, 2**62, (512,))
    offs = torch.randint(0, 100, (512,))
    cpu = fusedlm.sample(logits[:, :v].contiguous(), tau, seed=seeds, offset=offs,
                         return_logprobs=True)
    gpu = fusedlm.sample(logits.to(DEV)[:, :v], tau.to(DEV), seed=seeds.to(DEV), offset=offs.to(DEV),
                         return_logprobs=True)
    mismatch = (cpu[0] != gpu[0].cpu()).float().mean().item()
    assert mismatch <= 0.002, mismatch  # only float-rounding near-ties may differ
    assert_logprobs_close(cpu, gpu, cpu[0] == gpu[0].cpu(), logits[:, :v], tau, 1e-4)


def assert_logprobs_close(cpu, gpu, same, logits, tau, tol):
    """The log-probs of the rows whose tokens agree. A processed log-prob is a difference of
    terms of size max|l| / tau, formed in float32 on the GPU (float64 on the CPU), so each
    row is also allowed a few float32 ulps of that size (tau = 0.005 with logits near 13 makes
    it ~2600: an ulp there is 2.4e-4)."""
    finite = logits.float().isfinite()
    largest = logits.float().masked_fill(~finite, 0.0).abs().amax(1)  # -inf / NaN entries add no error
    for a, g, t in ((cpu[1], gpu[1], tau), (cpu[2], gpu[2], torch.ones_like(tau))):
        size = largest / torch.where(t > 0, t, torch.ones_like(t))
        atol = (tol + 8 * torch.finfo(torch.float32).eps * size)[same].double()
        a, g = a[same].double(), g.cpu()[same].double()
        bad = ~(((a - g).abs() <= atol + tol * a.abs()) | (a.isnan() & g.isnan()))
        assert not bad.any(), f"rows {same.nonzero().flatten()[bad].tolist()}: cpu {a[bad].tolist()}, gpu {g[bad].tolist()}"


def assert_same_tokens_as_cpu(logits, tau, **kw):
    """CUDA tokens equal the CPU kernel's for the same seeds (up to float-rounding near-ties),
    and so do the log-probs of the rows that agree. With top-p, a row whose kept mass lands
    within float rounding of top_p may keep one boundary entry more or less on one side
    (the CPU sums in float64, the GPU in 2^-31 fixed point): its processed log-prob then
    moves by that entry's share (~1e-4 for these rows), so top-p rows are compared at 2e-3;
    where that boundary is a group of tied entries (rounded logits), the whole group's share
    moves, so such rows (top_p_boundary_near_tie) are left out of the log-prob comparison.
    (H200, session 47: one row of 300, fp16, a 2.2% share, in one run of the whole suite.)"""
    b = logits.shape[0]
    seeds = torch.randint(0, 2**62, (b,))
    cpu = fusedlm.sample(logits.float().cpu(), tau, seed=seeds, return_logprobs=True, **kw)
    gpu = fusedlm.sample(logits.to(DEV), tau.to(DEV), seed=seeds.to(DEV), return_logprobs=True, **kw)
    same = cpu[0] == gpu[0].cpu()
    assert (~same).sum() <= max(1, int(0.002 * b)), (~same).sum()
    if kw.get("top_p") is not None:
        same &= ~top_p_boundary_near_tie(logits, tau, kw["top_p"], kw.get("top_k"))
    assert_logprobs_close(cpu, gpu, same, logits, tau, 2e-3 if kw.get("top_p") is not None else 1e-4)


def top_p_boundary_near_tie(logits, tau, top_p, top_k=None, within=1e-5, share=1e-3):
    """Rows (tau > 0) whose top-p set float32 rounding may extend or cut by a run of tied
    logits that weighs at least `share`: the tempered softmax over the top-k entries (ties at
    the k-th kept; NaN counts as -inf, as in the kernels), summed in float64 from the largest
    logit down, reaches within `within` of top_p at the end of one run, so that the next run
    is kept on one side of that rounding and not on the other."""
    x = logits.double().cpu()
    x = x.masked_fill(x.isnan(), float("-inf"))
    b, v = x.shape
    if top_k is not None:  # (an int or a tensor per row; 0 or >= V: no top-k)
        k = torch.as_tensor(top_k).cpu().long().reshape(-1, 1).expand(b, 1)
        kth = x.sort(dim=1, descending=True).values.gather(1, (k - 1).clamp(0, v - 1))
        x = x.masked_fill((x < kth) & (k > 0) & (k < v), float("-inf"))
    tau = tau.double().cpu()
    ordered, order = x.sort(dim=1, descending=True)
    cum = torch.softmax(x / tau.clamp_min(1e-30).unsqueeze(1), dim=1).gather(1, order).cumsum(1)
    run_ends = torch.ones_like(ordered, dtype=torch.bool)
    run_ends[:, :-1] = ordered[:, :-1] != ordered[:, 1:]
    p = torch.as_tensor(top_p, dtype=torch.float64).cpu().reshape(-1).expand(b)
    near = torch.zeros(b, dtype=torch.bool)
    for r in range(b):
        if tau[r] > 0:
            ends = cum[r][run_ends[r]]  # the mass at and above each run, largest logits first
            next_run = torch.cat([ends[1:] - ends[:-1], ends.new_zeros(1)])
            near[r] = (((ends - p[r]).abs() <= within) & (next_run >= share)).any()
    return near


# How a row's splits are merged depends on their number: 64 x 128256 rows take 4 splits
# (on sm_90: 2, a cluster) and 8 x 128256 take 8 (a cluster on sm_90), 300 x 128256 one
# (see sampling_cuda.cu);
# 50257-wide rows are not 16-byte aligned (many splits, merged by the finish kernel).
@pytest.mark.parametrize("b,v", [(64, 128256), (8, 128256), (300, 128256), (64, 50257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_split_merges_same_tokens_as_cpu(b, v, dtype):
    logits = (torch.randn(b, v) * 3).to(dtype)
    tau = torch.rand(b) * 1.5
    tau[::9] = 0.0
    assert_same_tokens_as_cpu(logits, tau)


def maximum_with_a_large_shift(dtype, near):
    """A value of `dtype` near `near` whose product with float32 log2(e) rounds far from the
    exact product (the kernels' raw_shift), and that shift."""
    log2e = float(torch.tensor(1.4426950408889634, dtype=torch.float32))
    candidates = torch.arange(near, near + 64, dtype=torch.float32).to(dtype).unique().tolist()
    shifts = [m * log2e - float(torch.tensor(m * log2e, dtype=torch.float32)) for m in candidates]
    best = max(range(len(candidates)), key=lambda i: abs(shifts[i]))
    return candidates[best], abs(shifts[best])


# Rows of tau exactly 1 with log-probs reuse the tempered terms as the raw log-sum-exp's
# (tile_sums' kRawIsSum); the other rows form the raw terms on their own, as FFMAs against the
# tile maximum's rounded scaled value, corrected by raw_shift. Both kinds side by side, in the
# draw's layouts (B = 5: a row split over a cluster; 64: 2-CTA clusters; 300: one CTA a row),
# with a masked stretch in a tau = 1 row: the tokens and log-probs match the CPU's; the raw
# log-probs of all rows, and at tau = 1 the processed ones too, are log_softmax(logits) in
# float64 to ~1e-5. With offset, every tile's maximum is one value whose raw_shift is >= 2e-4:
# a sum not corrected by it would be off by that much (times ln 2) in every row.
@pytest.mark.parametrize("offset", [0.0, 3000.0])
@pytest.mark.parametrize("b", [5, 64, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_tau_one_and_raw_logprobs(b, dtype, offset):
    v = 128256
    logits = torch.randn(b, v) * 3 + offset
    if offset:
        top, shift = maximum_with_a_large_shift(dtype, offset + 12)
        assert shift * math.log(2) > 5e-5
        logits = logits.clamp(max=top)
        logits[:, ::64] = top
    logits = logits.to(dtype)
    logits[0, 1000:5000] = -float("inf")
    tau = torch.rand(b) * 1.5
    tau[::2] = 1.0
    tau[3::7] = 0.0
    assert_same_tokens_as_cpu(logits, tau)
    tokens, logprob, raw = fusedlm.sample(logits.to(DEV), tau.to(DEV), seed=torch.randint(0, 2**62, (b,)).to(DEV),
                                          return_logprobs=True)
    ref = torch.log_softmax(logits.double(), -1).gather(1, tokens.cpu()[:, None])[:, 0]
    for got, rows in ((raw, torch.ones(b, dtype=torch.bool)), (logprob, tau == 1.0)):
        err = (got.cpu().double() - ref)[rows].abs()
        assert (err <= 1e-5 + 1e-6 * ref[rows].abs()).all(), (err.max().item(), rows.nonzero().flatten().tolist())


# NaN logits count as -inf on both devices: the CUDA kernels give bit-identical results with
# the NaN entries replaced by -inf (tiles holding a NaN take the clamped exp path), and the
# same tokens as the CPU. Column 0, a whole tile of row 1 and ~0.1% of the rest are NaN;
# tau = 0 rows take the argmax.
@pytest.mark.parametrize("trunc", [{}, dict(top_k=50), dict(top_p=0.9)], ids=["plain", "top_k", "top_p"])
@pytest.mark.parametrize("b,v", [(64, 128256), (300, 5120), (64, 50257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_nan_logits_count_as_minus_inf(dtype, b, v, trunc):
    logits = torch.randn(b, v) * 3
    nan_at = torch.rand(b, v) < 0.001
    nan_at[:, 0] = True
    nan_at[1, 64:128] = True
    logits = logits.masked_fill(nan_at, float("nan")).to(dtype)
    tau = torch.rand(b) * 1.5 + 0.05
    tau[1::4] = 1.0  # (with log-probs: the tempered sums reused as raw ones, row 1's NaN tile clamped)
    tau[::9] = 0.0
    seeds = torch.randint(0, 2**62, (b,), device=DEV)
    with_nan = fusedlm.sample(logits.to(DEV), tau.to(DEV), seed=seeds, return_logprobs=True, **trunc)
    with_inf = fusedlm.sample(logits.masked_fill(nan_at, float("-inf")).to(DEV), tau.to(DEV), seed=seeds,
                              return_logprobs=True, **trunc)
    for x, y in zip(with_nan, with_inf):
        assert torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num())
    assert not with_nan[1][tau.to(DEV) > 0].isnan().any()
    assert_same_tokens_as_cpu(logits, tau, **trunc)


# Each truncation alone and all three together.
each_truncation = pytest.mark.parametrize(
    "trunc", [dict(top_k=50), dict(top_p=0.9), dict(min_p=0.02), dict(top_k=1000, top_p=0.95, min_p=0.001)],
    ids=["top_k", "top_p", "min_p", "all"])


# Truncation thresholds (radix selection on the GPU, a sort on the CPU): masked entries,
# many exact ties (logits rounded to 0.5) and NaN-free rows of odd width.
@each_truncation
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_truncated_same_tokens_as_cpu(trunc, ties, dtype):
    logits = torch.randn(64, 50257) * 3
    if ties:
        logits = (logits * 2).round() / 2
    logits[:, ::17] = float("-inf")
    logits = logits.to(dtype)
    tau = torch.rand(64) * 1.5 + 0.05
    assert_same_tokens_as_cpu(logits, tau, **trunc)


# The truncation kernel splits a row over a cluster of up to 16 CTAs when rows are few
# (on an H100 or H200, B = 1, 3: 16 CTAs, where all the rows' clusters of 16 fit at once;
# B = 7: 8; B = 40: 2), of 2 smaller CTAs while rows number up to twice the SMs (B = 200 on
# an H100), uses one CTA per row otherwise (B = 300); V = 37 leaves some of the CTAs an
# empty slice.
@each_truncation
@pytest.mark.parametrize("batch,vocab", [(1, 128256), (3, 20011), (7, 50257), (40, 32000), (200, 5001),
                                         (150, 50257), (300, 5001), (1, 37)])
def test_truncated_row_split_same_tokens_as_cpu(trunc, batch, vocab):
    logits = (torch.randn(batch, vocab) * 6).round() / 2  # exact ties
    logits[:, ::13] = float("-inf")
    tau = torch.rand(batch) * 1.5 + 0.05
    seeds = torch.randint(0, 2**62, (8, batch))  # 8 draws per row: B = 1 is tested too
    cpu = torch.stack([fusedlm.sample(logits, tau, seed=s, **trunc) for s in seeds])
    gpu = torch.stack([fusedlm.sample(logits.to(DEV), tau.to(DEV), seed=s.to(DEV), **trunc)
                       for s in seeds]).cpu()
    assert (cpu != gpu).sum() <= max(1, int(0.002 * cpu.numel()))


# 16-bit rows take two radix passes instead of three (their keys' low bits are constant), so
# the third pass's bits are filled in: thresholds (hence the kept sets and the processed
# log-probs) must equal the CPU's whether the threshold is negative (key low bits all 1),
# positive (all 0) or mixed, at exact ties and next to -inf entries, in every layout (H200,
# B = 1: a cluster of 16 CTAs; 7: 8; 16: 4, as 16 clusters of 8 would not all fit at once;
# 40: 2; 300: one CTA a row). Small batches draw several times.
@pytest.mark.parametrize("shift", [-20.0, 0.0, 20.0], ids=["negative", "mixed", "positive"])
@pytest.mark.parametrize("batch,vocab", [(1, 128256), (7, 50257), (16, 20011), (40, 32000), (300, 5001)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_truncation_thresholds_match_cpu(dtype, batch, vocab, shift):
    logits = (torch.randn(batch, vocab) * 6).round() / 2 + shift  # exact ties
    logits[:, ::13] = float("-inf")
    logits = logits.to(dtype)
    for trunc in (dict(top_k=50), dict(top_p=0.9), dict(top_k=1000, top_p=0.95, min_p=0.001)):
        for _ in range(1 if batch >= 40 else 4):
            assert_same_tokens_as_cpu(logits, torch.rand(batch) * 1.5 + 0.05, **trunc)


# Tokens-only rows and rows with log-probs fold their tiles in different instantiations (the
# latter also sums the raw log-sum-exp of each tile) but must give the same tile keys, hence
# identical tokens, for any temperature (1e-3 .. 10), with masked halves and peaked rows, in
# every layout (B = 1: 63 one-warp splits merged by the finish kernel, B = 8: a cluster of 8
# splits on sm_90, B = 64: a cluster of 2 on sm_90, else 4 splits, B = 300: one split,
# 10^6-wide rows: many splits).
@pytest.mark.parametrize("b,v", [(1, 128256), (8, 128256), (64, 128256), (300, 5120), (3, 1000000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_tokens_only_same_tokens_as_with_logprobs(b, v, dtype):
    g = torch.Generator(device=DEV).manual_seed(b + v)
    draws = 32 if b == 1 else 2  # seeds per row
    logits = torch.randn(b, v, device=DEV, generator=g) * 3
    logits[::3, v // 2:] = float("-inf")
    logits[1::4, 5] += 40
    logits = logits.to(dtype)
    tau = 10 ** (torch.rand(b, device=DEV, generator=g) * 4 - 3)
    for _ in range(draws):
        seeds = torch.randint(0, 2**62, (b,), device=DEV, generator=g)
        tokens = fusedlm.sample(logits, tau, seed=seeds)
        assert torch.equal(tokens, fusedlm.sample(logits, tau, seed=seeds, return_logprobs=True)[0])


# The same for truncated draws: with log-probs a kept tile's tempered sum is taken relative to
# the tile's maximum over all entries (which the raw sum needs), without them relative to the
# kept maximum; the two are the same entry, so the keys and tokens must be identical, also
# for tiles holding NaN (the clamped path) or +inf (in the last row, which then always draws
# it; not at B = 1), and for tiles with nothing kept. Tokens-only 16-bit calls on few rows are
# drawn by the truncation kernel itself (B = 1, 8), the others by sample_kernel (B = 64: a
# cluster of 2 on sm_90; B = 300: one CTA a row). (Top-p alone is left out: tokens-only, it
# draws by rejection. Logits beyond ~7e8 in magnitude: see the next test.)
@pytest.mark.parametrize("trunc", [dict(top_k=50), dict(min_p=0.02), dict(top_k=200, top_p=0.95)],
                         ids=["top_k", "min_p", "top_k_top_p"])
@pytest.mark.parametrize("b,v", [(1, 128256), (8, 128256), (64, 128256), (300, 5120)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_truncated_tokens_only_same_tokens_as_with_logprobs(b, v, dtype, trunc):
    g = torch.Generator(device=DEV).manual_seed(3 * b + v)
    logits = torch.randn(b, v, device=DEV, generator=g) * 3
    logits[::3, v // 2:] = float("-inf")
    logits[1::4, 5] += 40
    logits[torch.rand(b, v, device=DEV, generator=g) < 0.001] = float("nan")
    if b > 1:
        logits[-1, 77] = float("inf")
    logits = logits.to(dtype)
    tau = 10 ** (torch.rand(b, device=DEV, generator=g) * 4 - 3)
    for _ in range(16 if b == 1 else 2):
        seeds = torch.randint(0, 2**62, (b,), device=DEV, generator=g)
        tokens = fusedlm.sample(logits, tau, seed=seeds, **trunc)
        tokens_lp, logprob, raw_logprob = fusedlm.sample(logits, tau, seed=seeds, return_logprobs=True, **trunc)
        assert torch.equal(tokens, tokens_lp)
        assert not logprob.isnan().any() and not raw_logprob.isnan().any()


# Logits near +-1e9 (|max| >= 2^30 / log2 e) at a tau of a few of their ulps (> 1): the tempered
# terms are flat (FFMAs against max / tau, as without log-probs), the raw ones are not (max *
# log2 e is past 2^30), so with log-probs a tile's raw sum is formed relative to its maximum
# on its own (tile_sums_raw_far) and its tempered sum stays the tokens-only one (the keys, and
# so the tokens, are the same; a difference in their last bits would show only on near-ties).
# Here: untruncated and truncated rows, with NaN and -inf entries, beside ordinary rows, in
# the draw's layouts; the tokens-only draws equal the log-prob ones, tokens and log-probs
# match the CPU's, and the raw log-probs are float64's log_softmax (differences of logits a
# few ulps apart are exact). (min-p: its bound max + tau ln(min_p) rounded to nearest in
# float32 fell on the logits' grid in about half the rows and kept the value below it: 6 of
# 300 rows drew other tokens than the CPU, before the bound was rounded up.)
@pytest.mark.parametrize("trunc", [{}, dict(top_k=50), dict(min_p=0.02)], ids=["plain", "top_k", "min_p"])
@pytest.mark.parametrize("b,v", [(5, 128256), (64, 128256), (300, 5120)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_logits_near_1e9_same_tokens_with_and_without_logprobs(b, v, dtype, trunc):
    big = 6e4 if dtype == torch.float16 else 1e9  # (fp16: 6e4 * log2 e is flat; a control)
    base = torch.tensor(-big).to(dtype).float()  # (logits base + k ulp stay in its binade)
    ulp = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(-base.item()))
    g = torch.Generator().manual_seed(b + v)
    logits = torch.randn(b, v, generator=g) * 3
    huge = torch.arange(b) % 3 != 2  # (every third row ordinary)
    steps = torch.randint(0, 12, (b, v), generator=g).float()
    sign = torch.where(torch.arange(b) % 2 == 0, -1.0, 1.0)[:, None]
    logits[huge] = (sign * base + steps * ulp)[huge]
    logits = logits.to(dtype)
    logits[0, 100:300] = float("-inf")
    logits[1, 7] = float("nan")
    tau = torch.where(huge, ulp * (0.5 + 2.5 * torch.rand(b, generator=g)), 0.3 + torch.rand(b, generator=g))
    assert_same_tokens_as_cpu(logits, tau, **trunc)
    raw_ref = torch.log_softmax(logits.double().nan_to_num(nan=-float("inf")), -1)
    logits, tau = logits.to(DEV), tau.to(DEV)
    for _ in range(4):
        seeds = torch.randint(0, 2**62, (b,), generator=g).to(DEV)
        tokens = fusedlm.sample(logits, tau, seed=seeds, **trunc)
        tokens_lp, _, raw = fusedlm.sample(logits, tau, seed=seeds, return_logprobs=True, **trunc)
        assert torch.equal(tokens, tokens_lp)
        ref = raw_ref.gather(1, tokens.cpu()[:, None])[:, 0]
        err = (raw.cpu().double() - ref).abs()
        assert (err <= 1e-5 + 1e-6 * ref.abs()).all(), (err.max().item(), err.argmax().item())


# Tokens-only draws of 16-bit rows whose warps hold two batches or more (here: clusters at B = 8,
# V = 256000 and at B = 64; one CTA a row at B = 256) sum only the tiles whose key can still win,
# bounded through their vectors' maxima (race_batch_bounded). Here every tile sits at an end of
# that bound with the same mass: half hold one entry a in one vector (mass at its lower end),
# half 64 entries a - tau ln 64 (at its upper end), so every tile races on its noise alone and
# the bound excludes nothing that is not clearly behind. The draw must be the exhaustive one
# (the log-prob kernel sums every tile) and split evenly between the two kinds.
@pytest.mark.parametrize("b,v", [(8, 256000), (64, 128256), (64, 256000), (256, 128256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_bounded_race_draws_tiles_at_both_ends_of_the_bound(b, v, dtype):
    a, gap = 4.0, 2.0  # (a and a - gap exact in both dtypes)
    tau = torch.full((b,), gap / math.log(64), device=DEV)
    logits = torch.full((b, v), float("-inf"), device=DEV)
    tiles = torch.arange(v, device=DEV) // 64
    single = (tiles + torch.arange(b, device=DEV)[:, None]) % 2 == 0  # (the kinds alternate by row too)
    logits[single & (torch.arange(v, device=DEV) % 64 == 17)] = a
    logits[~single] = a - gap
    logits = logits.to(dtype)
    g = torch.Generator(device=DEV).manual_seed(b)
    singles = draws = 0
    for _ in range(max(10, 2560 // b)):
        seeds = torch.randint(0, 2**62, (b,), device=DEV, generator=g)
        tokens = fusedlm.sample(logits, tau, seed=seeds)
        assert torch.equal(tokens, fusedlm.sample(logits, tau, seed=seeds, return_logprobs=True)[0])
        singles += single.gather(1, tokens[:, None]).sum().item()
        draws += b
    # Equal masses: P(single) = (single tiles' share of the mass) over (all tiles), about 1/2.
    n_single = single[0].view(-1)[::64].sum().item()
    expected = n_single / math.ceil(v / 64)
    assert abs(singles / draws - expected) <= 5 * math.sqrt(expected * (1 - expected) / draws), (singles, draws)


# Top-p alone on tokens-only calls goes by rejection (see sampling_cpu.h): per-row top_p
# mixing rows below 0.5 (the threshold at once), between 0.5 and 1 (a first draw, tested by
# top_p_check_kernel; rejected rows drawn from the top-p set with round-1 noise) and 1 (drawn
# once), with tau = 0 rows, masked entries and peaked rows, in every layout of the draw and of
# the test (B = 1: clusters of 8 CTAs; 64 x 50257: unaligned rows; B = 200: 2-CTA clusters;
# B = 300: one CTA per row). Tokens-only and log-prob calls (the threshold path) both draw
# the CPU's tokens, up to float-rounding near-ties at the top-p boundary.
# Also NaN entries, a row of -inf only and one of NaN only, and a batch of more than 8 rows per
# SM (the redraw of marked rows then takes one 1024-thread CTA per row, not a cluster).
@pytest.mark.parametrize("b,v", [(1, 128256), (64, 50257), (200, 5120), (300, 5120), ("9 per SM", 2000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_top_p_by_rejection_same_tokens_as_cpu(b, v, dtype):
    if b == "9 per SM":
        b = 9 * torch.cuda.get_device_properties(0).multi_processor_count
    logits = torch.randn(b, v) * 3
    logits[::3, v // 2:] = float("-inf")
    logits[1::4, 7] += 12
    logits[2::5, 3::11] = float("nan")
    if b > 2:
        logits[-1] = float("-inf")
        logits[-2] = float("nan")
    logits = logits.to(dtype)
    p = torch.tensor([0.3, 0.5, 0.6, 0.9, 0.99, 1.0])[torch.arange(b) % 6]
    tau = torch.rand(b) * 1.5 + 0.05
    tau[5::7] = 0.0
    draws = 24 if b == 1 else 3
    tokens_differ = logprob_calls_differ = 0
    for _ in range(draws):
        seeds = torch.randint(0, 2**62, (b,))
        cpu_tokens = fusedlm.sample(logits.float(), tau, seed=seeds, top_p=p)
        tokens = fusedlm.sample(logits.to(DEV), tau.to(DEV), seed=seeds.to(DEV), top_p=p.to(DEV)).cpu()
        tokens_differ += (tokens != cpu_tokens).sum().item()
        cpu = fusedlm.sample(logits.float(), tau, seed=seeds, top_p=p, return_logprobs=True)
        gpu = fusedlm.sample(logits.to(DEV), tau.to(DEV), seed=seeds.to(DEV), top_p=p.to(DEV), return_logprobs=True)
        same = cpu[0] == gpu[0].cpu()
        logprob_calls_differ += (~same).sum().item()
        assert_logprobs_close(cpu, gpu, same, logits, tau, 2e-3)
    allowed = max(1, int(0.002 * b * draws))
    assert tokens_differ <= allowed and logprob_calls_differ <= allowed, (tokens_differ, logprob_calls_differ)


# Draws whose top-p membership is decided by rounding (test_sampling.assert_top_p_boundary_draws):
# the check leaves them to the threshold, whose set they then follow, in the many-rows layout
# (6 entries of 8) and with the six among 704 (-inf elsewhere).
@pytest.mark.parametrize("width", [8, 704])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_top_p_by_rejection_near_the_boundary(dtype, width):
    assert_top_p_boundary_draws(DEV, dtype, width=width)


# Tokens-only draws (the other CUDA tests mostly ask for log-probs too) against the CPU, with
# and without truncation, 16 draws per row so that B = 1 counts too.
@pytest.mark.parametrize("trunc", [{}, dict(top_k=50), dict(top_p=0.9)], ids=["plain", "top_k", "top_p"])
@pytest.mark.parametrize("b", [1, 8, 64])
def test_tokens_only_same_tokens_as_cpu(b, trunc):
    logits = (torch.randn(b, 128256) * 3).to(torch.bfloat16)
    tau = torch.rand(b) * 1.5 + 0.01
    seeds = torch.randint(0, 2**62, (16, b))
    cpu = torch.stack([fusedlm.sample(logits.float(), tau, seed=s, **trunc) for s in seeds])
    gpu = torch.stack([fusedlm.sample(logits.to(DEV), tau.to(DEV), seed=s.to(DEV), **trunc)
                       for s in seeds]).cpu()
    assert (cpu != gpu).sum() <= max(1, int(0.002 * cpu.numel()))


# Tokens-only draws with top-k / min-p on few rows are drawn by the truncation kernel itself
# once it has the row's threshold (draw_in_truncation: a lane a tile, over the row's 16, 8 or 4
# CTAs; float32 rows only where a CTA's slice is one batch of loads, here all but V = 256000);
# with log-probs sample_kernel draws them. Both race the same tile keys
# (bit for bit since session 45: tile_sums_kept_and_raw), so the tokens must
# be identical: at tau = 0 (the argmax), with truncation by count, by mass
# ratio or off (top_k >= V), with masked entries, NaN and +inf in the partial last tile (the
# rare paths, through its copy in shared memory), a row of -inf and a row with an invalid
# top_k (token 0), for widths of one partial tile up to 256000.
@pytest.mark.parametrize("trunc", [dict(top_k=50), dict(min_p=0.05), dict(top_k=1000, min_p=0.001),
                                   dict(top_k=10**6)], ids=["top_k", "min_p", "both", "top_k_off"])
@pytest.mark.parametrize("b,v", [(1, 128256), (3, 50264), (8, 20000), (1, 256000), (2, 40)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_truncation_kernel_draws_the_tokens_of_sample_kernel(dtype, b, v, trunc):
    g = torch.Generator(device=DEV).manual_seed(b * 7 + v)
    logits = torch.randn(b, v, device=DEV, generator=g) * 3
    logits[:, 5::17] = float("-inf")
    logits[0, -3] = float("nan")
    if b >= 2:
        logits[1, -2] = float("inf")  # (that row draws its +inf entry)
    if b >= 3:
        logits[2] = float("-inf")
    logits = logits.to(dtype)
    # Per-row values (a scalar top_k >= V would switch the truncation off), one row's invalid.
    kw = {name: torch.full((b,), x, device=DEV) for name, x in trunc.items()}
    if b >= 8:
        kw["top_k" if "top_k" in kw else "min_p"][3] = -1
    for tau in (0.0, 0.05, 0.7, 2.0):
        taus = torch.full((b,), tau, device=DEV)
        taus[-1] = 1.0 - tau / 4  # (every batch mixes temperatures; b = 1 sees tau = 0 too)
        if b == 1:
            taus[0] = tau
        seeds = torch.randint(0, 2**62, (b,), device=DEV, generator=g)
        tokens = fusedlm.sample(logits, taus, seed=seeds, **kw)
        with_logprobs = fusedlm.sample(logits, taus, seed=seeds, return_logprobs=True, **kw)[0]
        assert torch.equal(tokens, with_logprobs), (tau, tokens.tolist(), with_logprobs.tolist())
    if b >= 8:
        assert tokens[3].item() == 0


# The same rows drawn alone (by the truncation kernel, in clusters: on sm_90 no sample_kernel
# runs; each CTA's slice is one batch of loads, so its rolled instantiation), in a batch of 8
# (the same) and of 300 (truncation in 256-thread CTAs, then sample_kernel) draw the same
# tokens, with the same tile keys bit for bit.
@pytest.mark.parametrize("trunc", [dict(top_k=50), dict(top_k=200, min_p=0.02)], ids=["top_k", "top_k_min_p"])
def test_truncated_row_tokens_do_not_depend_on_the_batch(trunc):
    rows = (torch.randn(4, 128256, device=DEV) * 3).to(torch.bfloat16)
    tau = torch.tensor([0.0, 0.3, 1.0, 2.0], device=DEV)
    seeds = torch.randint(0, 2**62, (4,), device=DEV)
    alone = torch.cat([fusedlm.sample(rows[i:i + 1], tau[i:i + 1], seed=seeds[i:i + 1], **trunc) for i in range(4)])
    if fusedlm._C.hopper_paths()[0]:  # (B = 1: clusters of 8 or 16 CTAs, 126-251 tiles each)
        names = cuda_kernels(lambda: fusedlm.sample(rows[:1], tau[1:2], seed=seeds[:1], **trunc))
        assert truncation_kernels_rolled(names) == [True] and not any("sample_" in n for n in names), names
    # (B = 8: on an H200 8 CTAs a row, each thread's four vectors of the rolled loop all in the row)
    for b in (8, 300):
        batch, t, s, at = rows_among_random_rows(rows, tau, seeds, b)
        assert torch.equal(fusedlm.sample(batch, t, seed=s, **trunc)[at], alone), b
    assert torch.equal(fusedlm.sample(rows, tau, seed=seeds, **trunc), alone)


# 16-bit rows of V = 5000 drawn in a batch of 100 take one CTA a row (the drawing truncation
# kernel, unrolled), alone a cluster of up to 16 CTAs on sm_90 (rolled): the same tokens.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rolled_and_unrolled_truncation_draws_agree(dtype):
    rows = (torch.randn(100, 5000, device=DEV) * 3).to(dtype)
    tau = torch.rand(100, device=DEV) * 1.5
    tau[0] = 0.0
    seeds = torch.randint(0, 2**62, (100,), device=DEV)
    for trunc in (dict(top_k=50), dict(top_k=200, min_p=0.02), dict(top_k=1000, top_p=0.9)):
        batch = fusedlm.sample(rows, tau, seed=seeds, **trunc)
        alone = torch.cat([fusedlm.sample(rows[i:i + 1], tau[i:i + 1], seed=seeds[i:i + 1], **trunc)
                           for i in range(0, 100, 9)])
        assert torch.equal(batch[::9], alone), trunc
    if fusedlm._C.hopper_paths()[0]:  # (one CTA a row while rows number between half the SMs and all)
        sms = torch.cuda.get_device_properties(DEV).multi_processor_count
        for b, rolled in ((min(100, sms), False), (1, True)):
            names = cuda_kernels(lambda: fusedlm.sample(rows[:b], tau[:b], seed=seeds[:b], top_k=50))
            assert truncation_kernels_rolled(names) == [rolled] and not any("sample_" in n for n in names), names


# Float32 rows draw in the truncation kernel only where each CTA's slice of the row is one
# batch of loads (512 threads x 4 vectors of 4: 8192 entries); with two batches the separate
# draw was faster. On sm_90, V = 128256: B = 1 in clusters of 16 (8016 entries a CTA) draws
# there, B = 8 in clusters of 8 (16032) does not; both draw the tokens of sample_kernel.
def test_float32_rows_draw_in_the_truncation_kernel_where_a_slice_is_one_batch():
    rows = torch.randn(8, 128256, device=DEV) * 3
    tau = torch.rand(8, device=DEV) + 0.1
    seeds = torch.randint(0, 2**62, (8,), device=DEV)
    for b in (1, 8):
        tokens = fusedlm.sample(rows[:b], tau[:b], seed=seeds[:b], top_k=50)
        with_logprobs = fusedlm.sample(rows[:b], tau[:b], seed=seeds[:b], top_k=50, return_logprobs=True)[0]
        assert torch.equal(tokens, with_logprobs), b
        if fusedlm._C.hopper_paths()[0]:
            names = cuda_kernels(lambda: fusedlm.sample(rows[:b], tau[:b], seed=seeds[:b], top_k=50))
            drew_there = not any("sample_" in n for n in names)
            assert drew_there == (b == 1), (b, names)


def rows_among_random_rows(rows, tau, seeds, b):
    """A batch of b random rows (randn * 3, random tau and seeds) with `rows`, their tau and
    seeds spread evenly among them: the batch, its tau and seeds, and the rows' positions."""
    n, v = rows.shape
    batch = (torch.randn(b, v, device=rows.device) * 3).to(rows.dtype)
    at = torch.arange(n, device=rows.device) * (b // n)
    batch[at] = rows
    t, s = torch.rand(b, device=rows.device), torch.randint(0, 2**62, (b,), device=rows.device)
    t[at], s[at] = tau, seeds
    return batch, t, s, at


def truncation_kernels_rolled(names):
    """For each truncation_kernel among the kernel names, whether it is the rolled instantiation
    (its fourth template argument)."""
    found = [re.search(r"truncation_kernel<([^>]*)>", n) for n in names]
    args = [[arg.strip() for arg in m.group(1).split(",")] for m in found if m]
    return [len(a) == 4 and a[3] in ("true", "(bool)1") for a in args]


# A row's token does not depend on the batch around it, though the layout does: alone it is
# split over 63 one-warp CTAs (merged by the finish kernel), in a batch of 8 over a cluster of
# 8 CTAs (sm_90), in a batch of 64 over a cluster of 2 (sm_90), in a batch of 300 it has one CTA.
@pytest.mark.parametrize("return_logprobs", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_tokens_do_not_depend_on_the_layout(dtype, return_logprobs):
    rows = (torch.randn(4, 128256, device=DEV) * 3).to(dtype)
    tau = torch.tensor([0.05, 0.5, 1.0, 2.0], device=DEV)
    seeds = torch.randint(0, 2**62, (4,), device=DEV)

    def tokens(logits, t, s):
        out = fusedlm.sample(logits, t, seed=s, return_logprobs=return_logprobs)
        return out[0] if return_logprobs else out

    alone = torch.cat([tokens(rows[i:i + 1], tau[i:i + 1], seeds[i:i + 1]) for i in range(4)])
    for b in (8, 64, 300):
        batch, t, s, at = rows_among_random_rows(rows, tau, seeds, b)
        assert torch.equal(tokens(batch, t, s)[at], alone), b


@pytest.mark.parametrize("dtype,v", [(torch.bfloat16, 5120), (torch.float32, 5003)], ids=["aligned", "unaligned"])
def test_numbers_match_tensors_cuda(dtype, v):
    assert_numbers_match_tensors((torch.randn(64, v, device=DEV) * 2).to(dtype), DEV)


def cuda_kernels(fn):
    """The CUDA kernels one call of fn launches, by name, in order."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [e.name for e in sorted(events, key=lambda e: e.time_range.start)]


@pytest.mark.parametrize("kw", [{}, dict(top_p=0.9), dict(top_k=50, min_p=0.05, offset=2)],
                         ids=["plain", "top_p", "top_k_min_p_offset"])
def test_numbers_launch_no_kernel_of_their_own(kw):
    # A temperature, seed or truncation value given as a number reaches the kernels by value:
    # the call launches exactly the kernels of a call with [B] tensors (no fill kernels).
    logits = torch.randn(64, 128256, device=DEV, dtype=torch.bfloat16)
    as_tensors = {k: torch.full((64,), v, device=DEV) for k, v in kw.items()}
    tau, seeds = torch.full((64,), 0.7, device=DEV), torch.arange(64, device=DEV)
    with_numbers = cuda_kernels(lambda: fusedlm.sample(logits, 0.7, seed=3, **kw))
    with_tensors = cuda_kernels(lambda: fusedlm.sample(logits, tau, seed=seeds, **as_tensors))
    assert with_numbers == with_tensors and all("sampl" in n or "trunc" in n or "top_p" in n for n in with_numbers), (
        with_numbers, with_tensors)


def test_op_checks_host_numbers_cuda():
    logits = torch.randn(4, 1000, device=DEV)
    with pytest.raises(ValueError, match="temperature"):
        torch.ops.fusedlm.sample(logits, torch.tensor(math.nan), torch.tensor(1), None, None, None, None)
    for k, p, mp in ((torch.tensor(-2), None, None), (None, torch.tensor(0.0), None), (None, None, torch.tensor(2.0))):
        with pytest.raises(ValueError, match="top_k|top_p|min_p"):
            torch.ops.fusedlm.sample(logits, torch.tensor(1.0), torch.tensor(1), None, k, p, mp)


def sampling_kernel_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key for e in prof.key_averages() if "sample" in e.key}


# On sm_90 the splits of a row merge in a thread-block cluster (no finish kernel) when the
# batch is small but not tiny (B = 8, 16: clusters of 8 CTAs; B = 64: of two 16-warp CTAs,
# with up to four batches a warp at V = 256000);
# FUSEDLM_NO_CLUSTERS=1 turns that off (splits merged by the finish kernel). Same tokens
# either way; log-probs within rounding (the partials differ).
@pytest.mark.parametrize("trunc", [{}, dict(top_p=0.9)], ids=["plain", "top_p"])
@pytest.mark.parametrize("b,v", [(8, 128256), (16, 128256), (8, 256000), (64, 128256), (64, 256000)])
def test_cluster_merge_same_as_finish_kernel(b, v, trunc, monkeypatch):
    if not fusedlm._C.hopper_paths()[0]:
        pytest.skip("clusters need sm_90 code on an sm_90 device")
    logits = (torch.randn(b, v, device=DEV) * 3).to(torch.bfloat16)
    tau = torch.rand(b, device=DEV) * 1.5
    tau[::5] = 0.0
    seeds = torch.randint(0, 2**62, (b,), device=DEV)

    def draw():
        return (fusedlm.sample(logits, tau, seed=seeds, **trunc),
                fusedlm.sample(logits, tau, seed=seeds, return_logprobs=True, **trunc))

    assert not any("finish" in k for k in sampling_kernel_names(draw))
    clustered = draw()
    monkeypatch.setenv("FUSEDLM_NO_CLUSTERS", "1")
    assert any("finish" in k for k in sampling_kernel_names(draw))
    plain = draw()
    assert torch.equal(clustered[0], plain[0]) and torch.equal(clustered[1][0], plain[1][0])
    for x, y in zip(clustered[1][1:], plain[1][1:]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("tau", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("trunc", [{}, dict(top_k=6), dict(top_p=0.8), dict(top_p=0.55), dict(top_p=0.3),
                                   dict(min_p=0.05), dict(top_k=9, top_p=0.95, min_p=0.01)],
                         ids=["none", "top_k", "top_p", "top_p_055", "top_p_03", "min_p", "all"])
def test_chi_square(tau, trunc):
    logits = torch.randn(16) * 1.5

    def draw_tokens(n):
        return fusedlm.sample(logits.to(DEV).expand(n, -1).contiguous(), tau,
                              seed=torch.randint(0, 2**62, (n,), device=DEV), **trunc)

    assert_draws_fit(draw_tokens, truncated_probs(logits, tau, **trunc), 100000)


# As on the CPU (test_sampling.py): tied maxima in two tiles split the draws evenly at any
# tau > 0. (Keys summed into one float rounded the noise to the base's ulp: at tau = 1e-6 the
# lower tile won ~8% more often.)
@pytest.mark.parametrize("tau", [1e-7, 1e-6, 1e-3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tied_maxima_in_two_tiles_split_evenly(tau, dtype):
    n1, n2 = tied_maxima_counts(tau, 20000, DEV, dtype)
    assert n1 + n2 > 0.9 * 20000 and abs(n1 - n2) <= 5 * math.sqrt(n1 + n2), (n1, n2)


# +inf logits: drawn uniformly among them (aligned rows of 300 float32 entries, unaligned
# 16-bit rows of 301), every truncation, log-probs -log(count), greedy and temperature_logprobs.
@pytest.mark.parametrize("v", [300, 301])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_plus_inf_logits_draw_among_them(dtype, v):
    assert_plus_inf_rows_draw_among_them(DEV, dtype, v=v)


# Per-row values the host does not read for CUDA tensors (no sync): rows with an invalid
# temperature, top_k, top_p or min_p return token 0 and NaN log-probs, in the plain, truncated
# and by-rejection paths; the other rows draw the CPU's tokens.
@pytest.mark.parametrize("return_logprobs", [False, True])
def test_invalid_row_values_give_token_0(return_logprobs):
    b, v = 12, 5120
    logits = torch.randn(b, v) * 2
    seeds = torch.randint(0, 2**62, (b,))
    tau = torch.full((b,), 0.8)
    tau[1], tau[2], tau[3] = -1.0, math.nan, math.inf
    cases = [dict(top_p=torch.tensor([0.9, 0.9, 0.9, 0.9, 0.0, math.nan, 1.5, 0.9, 0.6, 0.3, 0.9, 1.0])),
             dict(min_p=torch.tensor([0.1, 0.1, 0.1, 0.1, 1.5, math.nan, -0.1, 0.1, 0.0, 1.0, 0.1, 0.1])),
             dict(top_k=torch.tensor([5, 5, 5, 5, -5, -1, 5, 5, 0, 1, 5, 5]))]
    for trunc in cases:
        invalid = torch.zeros(b, dtype=torch.bool)
        invalid[1:4] = True
        name, values = next(iter(trunc.items()))
        invalid[4:7 if name != "top_k" else 6] = True
        gpu = fusedlm.sample(logits.to(DEV), tau.to(DEV), seed=seeds.to(DEV), return_logprobs=return_logprobs,
                             **{name: values.to(DEV)})
        tokens = (gpu[0] if return_logprobs else gpu).cpu()
        assert (tokens[invalid] == 0).all(), (name, tokens)
        if return_logprobs:
            assert gpu[1].cpu()[invalid].isnan().all() and gpu[2].cpu()[invalid].isnan().all()
        ok = ~invalid
        cpu = fusedlm.sample(logits[ok], tau[ok], seed=seeds[ok], return_logprobs=return_logprobs,
                             **{name: values[ok]})
        assert (tokens[ok] != (cpu[0] if return_logprobs else cpu)).sum() <= 1, name


# Philox words with their top 24 bits set (test_sampling.TOP_WORD_KEYS): no infinite tile key,
# no inverse-CDF target past the tile (1 in 2^24 tiles; the tiny-temperature test below drew a
# wrong tile about once in 10^4 rows before).
def test_top_philox_words_draw_right():
    assert_top_words_draw_right(DEV)
    assert_tail_noise_draws_right(DEV)


# As on the CPU: tiny (down to subnormal) temperatures draw the maximum with log-prob 0, for
# logits of any sign and size, in every layout. (Tile keys and log-sum-exps held
# max / tau in float32: a subnormal tau overflowed it to inf (all-negative rows: "fully
# masked", token 0), and once max / tau passed ~2^31 the tile sums, taken relative to its
# rounded value, overflowed or vanished (logits near 1e4 at tau = 1e-6: random tokens); the
# processed log-prob, a difference of two such terms, was off by their ulps.)
@pytest.mark.parametrize("tau", [1e-6, 1e-9, 1e-20, 1e-38, 1e-44])
@pytest.mark.parametrize("b,v", [(8, 128256), (64, 128256), (300, 5120), (64, 50257), (5, 5003)])
def test_tiny_temperatures_draw_the_maximum(tau, b, v):
    tokens, logp, raw, want, want_raw = tiny_temperature_case(tau, b, v, DEV)
    assert (tokens == want).all(), (tokens != want).nonzero().flatten().tolist()
    assert logp.abs().max() <= 1e-6, logp.abs().max()
    torch.testing.assert_close(raw.double(), want_raw, rtol=1e-5, atol=1e-5)
    # temperature_logprobs of the maximum at that tau: 0 as well
    out = fusedlm.temperature_logprobs(logits_of_tiny_case(tau, b, v).to(DEV), want.to(DEV), [tau]).cpu()
    assert out.abs().max() <= 1e-6, out.abs().max()


@pytest.mark.parametrize("tau", [0.5, 1.0])
@pytest.mark.parametrize("b,v", [(8, 128256), (300, 5120), (5, 5003)])
def test_huge_logits_draw_the_maximum(tau, b, v):
    tokens, logp, want = huge_logits_case(tau, b, v, DEV)
    assert (tokens == want).all() and logp.abs().max() <= 1e-6


def test_greedy_exact_with_ties_and_masks():
    logits = torch.randn(300, 128256, device=DEV)
    logits[:, 1000] = 30.0
    logits[:, 90000] = 30.0
    logits[:, :500] = float("-inf")
    tokens = fusedlm.sample(logits, 0.0)
    assert (tokens == 1000).all()
    masked = torch.full((2, 77), float("-inf"), device=DEV)
    t, lp, raw = fusedlm.sample(masked, 1.0, return_logprobs=True)
    assert (t == 0).all() and torch.isnan(lp).all() and torch.isnan(raw).all()


# Rows of only -inf and NaN (NaN first, so the first non-NaN index is not 0) at tau = 0 and 1
# return token 0 and NaN log-probs as on the CPU, next to ordinary rows, in every layout
# (B = 1: 8-CTA clusters; 8 and 64: clusters; 300: one CTA per row; V = 5003: unaligned rows).
@pytest.mark.parametrize("b,v", [(1, 128256), (8, 128256), (64, 128256), (300, 5120), (8, 5003)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_without_a_finite_entry_draw_token_0(b, v, dtype):
    logits = torch.randn(b, v) * 3
    masked = torch.arange(b) % 2 == 0
    logits[~masked, 0] = -30.0  # (never an ordinary row's token: its tau = 0 rows took index 0 as argmax)
    logits[masked] = float("-inf")
    logits[masked, 0] = float("nan")
    logits[masked, 3::7] = float("nan")
    logits = logits.to(dtype)
    tau = torch.tensor([0.0, 0.0, 1.0, 0.7])[torch.arange(b) % 4]
    seeds = torch.arange(b) + 11
    for logprobs in (False, True):
        cpu = fusedlm.sample(logits.float(), tau, seed=seeds, return_logprobs=logprobs)
        gpu = fusedlm.sample(logits.to(DEV), tau.to(DEV), seed=seeds.to(DEV), return_logprobs=logprobs)
        cpu_tokens, gpu_tokens = (cpu[0], gpu[0].cpu()) if logprobs else (cpu, gpu.cpu())
        assert (gpu_tokens[masked] == 0).all() and (cpu_tokens[masked] == 0).all()
        assert (gpu_tokens[~masked] > 0).all()
        if logprobs:
            assert gpu[1].cpu()[masked].isnan().all() and gpu[2].cpu()[masked].isnan().all()
            assert gpu[1].cpu()[~masked].isfinite().all()


# tau = 0 rows among sampled ones: the lowest index of the maximum (ties inside a tile and
# across tiles, NaN entries, a +inf entry, a ragged last tile), and the raw log-prob.
@pytest.mark.parametrize("b,v", [(8, 128256), (64, 128256), (300, 5120), (64, 5003)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_greedy_rows_take_the_first_maximum(dtype, b, v):
    logits = (torch.randn(b, v) * 3).round()  # integers: many exact ties in every dtype
    logits[0, 70:75] = float("nan")
    logits[0, 100], logits[0, 101], logits[0, v - 1] = 50.0, 50.0, 50.0  # tied in a tile and in the last
    logits[1, 65], logits[1, 5000] = 40.0, 40.0  # tied in two tiles (of two splits for long rows)
    logits[2, v - 1] = 60.0  # in the ragged last tile
    logits[3, 3] = float("inf")
    logits = logits.to(dtype)
    tau = torch.rand(b) + 0.1
    tau[::3] = 0.0
    tau[:4] = 0.0
    clean = logits.float().nan_to_num(nan=float("-inf"), posinf=float("inf"))
    expected = clean.argmax(1)
    tokens, _, raw = fusedlm.sample(logits.to(DEV), tau.to(DEV), seed=torch.arange(b, device=DEV), return_logprobs=True)
    tokens_only = fusedlm.sample(logits.to(DEV), tau.to(DEV), seed=torch.arange(b, device=DEV))
    greedy = tau == 0
    assert torch.equal(tokens.cpu()[greedy], expected[greedy])
    assert torch.equal(tokens_only.cpu()[greedy], expected[greedy])
    finite = greedy & clean.isfinite().any(1) & ~clean.isposinf().any(1)
    want = (clean.double().gather(1, expected[:, None])[:, 0] - clean.double().logsumexp(1))[finite]
    assert torch.allclose(raw.cpu().double()[finite], want, atol=1e-4, rtol=1e-5)


def test_invalid_temperature_tensor_is_flagged_without_sync():
    logits = torch.randn(3, 50, device=DEV)
    t, lp, _ = fusedlm.sample(logits, torch.tensor([1.0, -1.0, float("nan")], device=DEV),
                              return_logprobs=True)
    assert t[1] == 0 and t[2] == 0 and torch.isnan(lp[1:]).all() and torch.isfinite(lp[0])


@pytest.mark.parametrize("v", [1, 3, 50257, 128256, 256000])
@pytest.mark.parametrize("b", [1, 37, 4096])
def test_shapes(b, v):
    if b * v > 4096 * 128256:
        pytest.skip("large enough")
    logits = torch.randn(b, v, device=DEV, dtype=torch.bfloat16)
    tokens, lp, raw = fusedlm.sample(logits, torch.rand(b, device=DEV), return_logprobs=True)
    assert ((tokens >= 0) & (tokens < v)).all()
    ref = torch.log_softmax(logits.float(), -1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(raw, ref, rtol=1e-4, atol=1e-4)


def test_position_independent_and_graph_safe():
    logits = torch.randn(64, 32000, device=DEV)
    tau = torch.rand(64, device=DEV) + 0.2
    seeds = torch.randint(0, 2**62, (64,), device=DEV)
    a = fusedlm.sample(logits, tau, seed=seeds)
    perm = torch.randperm(64, device=DEV)
    assert torch.equal(fusedlm.sample(logits[perm], tau[perm], seed=seeds[perm]), a[perm])
    out = torch.empty_like(a)
    g = torch.cuda.CUDAGraph()
    fusedlm.sample(logits, tau, seed=seeds)  # warm up
    with torch.cuda.graph(g):
        out.copy_(fusedlm.sample(logits, tau, seed=seeds))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, a)


def test_temperature_logprobs_greedy_takes_the_first_of_tied_maxima():
    logits = torch.randn(5, 50257)
    logits[:, 7] = logits[:, 40000] = 9.0  # tied maxima (rows of odd width: unaligned starts)
    tokens = torch.tensor([7, 40000, 7, 40000, 3])
    out = fusedlm.temperature_logprobs(logits.to(DEV), tokens.to(DEV), [0.0, 1.0]).cpu()
    assert out[:, 0].tolist() == [0.0, -math.inf, 0.0, -math.inf, -math.inf]
    torch.testing.assert_close(out, fusedlm.temperature_logprobs(logits, tokens, [0.0, 1.0]), rtol=1e-4, atol=1e-4)


def test_temperature_logprobs_cuda_matches_cpu():
    logits = torch.randn(33, 4099) * 2
    tokens = torch.randint(0, 4099, (33,))
    taus = [0.0, 0.2, 0.6, 1.0]
    cpu = fusedlm.temperature_logprobs(logits, tokens, taus)
    gpu = fusedlm.temperature_logprobs(logits.to(DEV), tokens.to(DEV), taus)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)


# The one-pass kernel (running maximum, sums rescaled as it grows) in every dtype, both
# temperature counts it is built for (up to 4 and up to 16), aligned and unaligned rows (a
# column slice: entries before the first 16-byte boundary), NaN entries, rows that rise
# late (the maximum in the last entries) and tokens at the argmax, against the CPU (float64).
@pytest.mark.parametrize("taus", [[0.0, 0.2, 0.6, 1.0], [1.0, 0.05, 0.3, 0.7, 0.0, 1.5, 2.0, 3.0, 0.9]],
                         ids=["K4", "K9"])
@pytest.mark.parametrize("v,sliced", [(5120, False), (50257, False), (5003, True)], ids=["aligned", "odd", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_temperature_logprobs_one_pass_matches_cpu(dtype, v, sliced, taus):
    b = 37
    full = torch.randn(b, v + 1) * 3
    full[::4, -3:] += 20  # the row's maximum among its last entries: the sums rescale late
    full[1::5, 3::101] = float("nan")
    logits = (full[:, 1:] if sliced else full[:, :v]).to(dtype)
    tokens = torch.randint(0, v, (b,))
    tokens[::3] = logits.float().nan_to_num(nan=-math.inf).argmax(dim=1)[::3]
    cpu = fusedlm.temperature_logprobs(logits.float(), tokens, taus)
    gpu = fusedlm.temperature_logprobs(logits.to(DEV), tokens.to(DEV), taus).cpu()
    assert gpu.isfinite().sum() == cpu.isfinite().sum()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)


def test_temperature_logprobs_rows_without_a_finite_entry_are_nan():
    # Rows of only -inf, only NaN, and -inf with NaN first: NaN at every tau, as on the CPU (a
    # tau = 0 row of -inf gave 0 or -inf: its argmax is the first non-NaN entry).
    logits = torch.randn(4, 3001)
    logits[0] = float("-inf")
    logits[1] = float("nan")
    logits[2] = float("-inf")
    logits[2, :5] = float("nan")
    tokens = torch.tensor([0, 1, 5, 7])
    taus = [0.0, 0.5, 1.0]
    cpu = fusedlm.temperature_logprobs(logits, tokens, taus)
    gpu = fusedlm.temperature_logprobs(logits.to(DEV), tokens.to(DEV), taus).cpu()
    assert cpu[:3].isnan().all() and gpu[:3].isnan().all(), gpu
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4, equal_nan=True)


def test_torch_compile_fullgraph_cuda():
    logits = torch.randn(8, 1000, device=DEV)
    seeds = torch.arange(8, device=DEV)
    fn = torch.compile(lambda l, t: fusedlm.sample(l, t, seed=seeds), fullgraph=True)
    tau = torch.rand(8, device=DEV)
    assert torch.equal(fn(logits, tau), fusedlm.sample(logits, tau, seed=seeds))


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_torch_compile_numbers_cuda(mode):
    # Compiled, an int seed reaches the op as a 0-d device tensor from which the kernels
    # derive the rows' seeds (forming them in the graph failed to compile for Triton: a 62-bit
    # constant in 32-bit index arithmetic); numbers are [B] device tensors. Same draws as eager,
    # and no CUDA-graph skips (a host tensor in the graph would keep it from forming).
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    logits = torch.randn(8, 5120, device=DEV)
    kw = dict(seed=5, top_p=0.9, offset=3, return_logprobs=True)
    fn = torch.compile(lambda l: fusedlm.sample(l, 0.7, **kw), mode=mode, fullgraph=True)
    want = fusedlm.sample(logits, 0.7, **kw)
    for _ in range(3):  # (reduce-overhead: warm-up, recording, replay)
        got = fn(logits)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1:], want[1:], rtol=0, atol=0)
    assert not torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]


@pytest.mark.parametrize("v", [3000, 3072])  # (unaligned and aligned rows: both kernels)
def test_zero_dim_device_seed_is_the_batch_seed(v):
    # A 0-d seed on the device is read by the kernels: the same rows' seeds as the host value.
    logits = torch.randn(70, v, device=DEV).bfloat16()  # (B = 1, 8: clusters; 70: a CTA per row)
    tau = torch.rand(70, device=DEV)
    for b in (1, 8, 70):
        host = torch.ops.fusedlm.sample(logits[:b], tau[:b], torch.tensor(123456789), None, None, None, None, False)[0]
        device = torch.ops.fusedlm.sample(logits[:b], tau[:b], torch.tensor(123456789, device=DEV), None, None, None,
                                          None, False)[0]
        assert torch.equal(host, device)
    with pytest.raises(ValueError, match="seed must be"):
        torch.ops.fusedlm.sample(logits, tau, torch.tensor(1.0, device=DEV), None, None, None, None, False)


@pytest.mark.parametrize("need_logprobs", [True, False])
def test_opcheck_cuda(need_logprobs):
    logits = torch.randn(4, 5003, device=DEV)  # unaligned rows; and 5120-wide aligned ones
    for l in (logits, torch.randn(4, 5120, device=DEV, dtype=torch.bfloat16)):
        args = (l, torch.tensor([0.0, 0.5, 1.0, 2.0], device=DEV), torch.arange(4, device=DEV),
                torch.zeros(4, dtype=torch.long, device=DEV), torch.tensor([0, 3, 0, 10], device=DEV),
                torch.tensor([1.0, 0.9, 0.5, 1.0], device=DEV), None, need_logprobs)
        torch.library.opcheck(torch.ops.fusedlm.sample.default, args)
        host_scalars = (l, torch.tensor(0.8), torch.tensor(42), torch.tensor(7), torch.tensor(3),
                        torch.tensor(0.9), torch.tensor(0.05), need_logprobs)  # one value for every row
        torch.library.opcheck(torch.ops.fusedlm.sample.default, host_scalars)
        device_seed = (l, torch.tensor(0.8), torch.tensor(42, device=DEV), None, None, None, None, need_logprobs)
        torch.library.opcheck(torch.ops.fusedlm.sample.default, device_seed)  # (the compiled path's form)
        tokens, lp, raw = torch.ops.fusedlm.sample(*args)
        assert lp.shape == raw.shape == ((4,) if need_logprobs else (0,))


def random_configuration(rng, g):
    """Logits, temperatures and truncation of one random case (masks, NaN entries, ties,
    greedy rows, scalar or per-row top-k / top-p, min-p)."""
    b = rng.choice([1, 3, 64, 300])
    v = rng.choice([1, 2, 63, 64, 65, 1000, 5003, 50257])
    logits = torch.randn(b, v, generator=g) * rng.choice([0.5, 2.0, 8.0])
    if rng.random() < 0.3:
        logits[torch.rand(b, v, generator=g) < rng.choice([0.5, 0.99])] = -math.inf
    if rng.random() < 0.2:
        logits[torch.rand(b, v, generator=g) < 0.01] = math.nan
    if rng.random() < 0.2 and v > 3:
        logits[:, : v // 2] = logits[:, :1]  # ties
    logits = logits.to(rng.choice([torch.float32, torch.bfloat16, torch.float16]))
    tau = torch.rand(b, generator=g) * rng.choice([0.3, 1.5])
    tau[torch.rand(b, generator=g) < 0.2] = 0.0
    kw = {}
    if rng.random() < 0.4:
        kw["top_k"] = rng.choice([1, 5, v, v + 10]) if rng.random() < 0.5 else torch.randint(1, v + 3, (b,), generator=g)
    if rng.random() < 0.4:
        kw["top_p"] = rng.choice([0.01, 0.5, 0.9, 1.0]) if rng.random() < 0.5 else torch.rand(b, generator=g) * 0.99 + 0.01
    if rng.random() < 0.3:
        kw["min_p"] = rng.choice([0.05, 0.5])
    return logits, tau, kw


def test_random_configurations_match_cpu():
    """Random mixes of the sampler's options (a fuzz: 450 such cases passed on an H100): the
    CPU kernel's tokens for the same seeds, its log-probs for the rows that agree, no masked
    or NaN entry drawn in a row with a finite one, and tau = 0 rows at their maximum."""
    import random

    rng = random.Random(torch.randint(0, 2**31, ()).item())  # the conftest's fresh seed
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    for case in range(40):
        logits, tau, kw = random_configuration(rng, g)
        b, v = logits.shape
        seeds = torch.randint(0, 2**62, (b,), generator=g)
        cpu = fusedlm.sample(logits.float(), tau, seed=seeds, return_logprobs=True, **kw)
        gpu = fusedlm.sample(logits.to(DEV), tau.to(DEV), seed=seeds.to(DEV), return_logprobs=True,
                             **{k: x.to(DEV) if torch.is_tensor(x) else x for k, x in kw.items()})
        where = f"case {case}: {b} x {v} {logits.dtype} {sorted(kw)}"
        tokens = gpu[0].cpu()
        assert ((tokens >= 0) & (tokens < v)).all(), where
        lf = logits.float()
        drawable = (lf > -math.inf).any(1)  # (NaN counts as -inf)
        picked = lf.gather(1, tokens[:, None])[:, 0]
        assert not (drawable & ~(picked > -math.inf)).any(), where
        greedy = (tau == 0) & drawable
        assert (picked[greedy] == lf.nan_to_num(nan=-math.inf)[greedy].amax(1)).all(), where
        same = cpu[0] == tokens
        assert (~same).sum() <= max(1, int(0.002 * b)), where  # (float-rounding near-ties)
        assert_logprobs_close(cpu, gpu, same, logits, tau, 2e-3 if "top_p" in kw or "min_p" in kw else 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_nan_token_logprobs_are_minus_inf(dtype):
    assert_nan_token_logprobs_are_minus_inf(DEV, dtype)
