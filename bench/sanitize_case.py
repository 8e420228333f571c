"""A small run of every CUDA kernel, for compute-sanitizer (memcheck / racecheck):
    compute-sanitizer --tool memcheck python bench/sanitize_case.py
With the argument `sampling`, only the sampling kernels (e.g. for initcheck: every workspace
word a sampling kernel reads was written before); with `cce`, only the CCE kernels.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import fusedlm  # noqa: E402

torch.manual_seed(0)
SAMPLING_ONLY, CCE_ONLY = sys.argv[1:] == ["sampling"], sys.argv[1:] == ["cce"]
if not SAMPLING_ONLY:
    for dtype in (torch.bfloat16, torch.float32):
        for n, d, v in ((37, 72, 300), (130, 64, 129)):
            e = torch.randn(n, d, device="cuda", dtype=dtype, requires_grad=True)
            c = torch.randn(v, d, device="cuda", dtype=dtype, requires_grad=True)
            b = torch.randn(v, device="cuda", dtype=dtype, requires_grad=True)
            y = torch.randint(0, v, (n,), device="cuda")
            y[::4] = -100
            loss = fusedlm.linear_cross_entropy(e, c, y, b, softcap=10.0, label_smoothing=0.1)
            loss.backward()
    # Large enough that each gradient-tile CTA takes several vocabulary tiles (Hopper path).
    e = torch.randn(2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    c = torch.randn(32000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 32000, (2048,), device="cuda")
    fusedlm.linear_cross_entropy(e, c, y, filter_eps=None).backward()
    # Filtered backward with the forward's tile maxima (whole tiles skipped), half the rows
    # confidently right, over several vocabulary chunks (a 1 MB workspace is read per call);
    # 5 row tiles (an odd count).
    os.environ["FUSEDLM_CCE_WORKSPACE_MB"] = "1"
    c = torch.randn(9000, 64, device="cuda", dtype=torch.bfloat16) / 8
    y = torch.randint(0, 9000, (600,), device="cuda")
    e = torch.randn(600, 64, device="cuda", dtype=torch.bfloat16)
    e[:300] += 40 * c[y[:300]]
    b = torch.randn(9000, device="cuda", dtype=torch.bfloat16)
    for t in (e, c, b):
        t.requires_grad_()
    fusedlm.linear_cross_entropy(e, c, y, b).backward()
    # The same in row blocks of 256 rows (pointer offsets per block; the last block partial).
    os.environ["FUSEDLM_CCE_ROWS_PER_LAUNCH"] = "256"
    fusedlm.linear_cross_entropy(e, c, y, b).backward()
    fusedlm.linear_cross_entropy(e, c, y, b, filter_eps=None).backward()
    del os.environ["FUSEDLM_CCE_ROWS_PER_LAUNCH"]
    del os.environ["FUSEDLM_CCE_WORKSPACE_MB"]
    # Quadrant skips: each 64-token block has its softmax mass in one 64-wide vocabulary block
    # (the rest ~1e-7, filtered out), so the Hopper dE / dC warpgroups skip each other's steps;
    # then the same with the mma.sync dE / dC after the Hopper gradient tiles (whole-tile skips).
    # (Targets inside the mass: a target outside it would keep its own block.)
    rows = torch.arange(1000, device="cuda")
    mass = (3 * (rows // 64) + rows // 128) % 16  # all four quadrant positions
    e = 0.1 * torch.randn(1000, 24, device="cuda")
    e[rows, mass] += 12.0
    c = 0.01 * torch.randn(1031, 24, device="cuda")
    c[torch.arange(1031, device="cuda"), torch.arange(1031, device="cuda") // 64 % 16] += 1.0
    y = torch.clamp(mass * 64 + torch.randint(0, 64, (1000,), device="cuda"), max=1030)
    e, c = e.bfloat16().requires_grad_(), c.bfloat16().requires_grad_()
    fusedlm.linear_cross_entropy(e, c, y).backward()
    os.environ["FUSEDLM_CCE_MMA_SYNC_GEMMS"] = "1"
    fusedlm.linear_cross_entropy(e, c, y).backward()
    del os.environ["FUSEDLM_CCE_MMA_SYNC_GEMMS"]
    # Frozen classifier / frozen hidden states (one of the dE / dC GEMMs skipped; e+c: only
    # the bias), exact and filtered, on both dE / dC pairings, over several chunks.
    os.environ["FUSEDLM_CCE_WORKSPACE_MB"] = "1"
    e = torch.randn(600, 72, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(9000, 72, device="cuda", dtype=torch.bfloat16) / 8
    b = torch.randn(9000, device="cuda", dtype=torch.bfloat16).requires_grad_()
    y = torch.randint(0, 9000, (600,), device="cuda")
    for pairing in ("hopper", "mma_sync"):
        if pairing == "mma_sync":
            os.environ["FUSEDLM_CCE_MMA_SYNC_GEMMS"] = "1"
        for frozen in ("c", "e", "e+c", "c+b"):
            for name, t in zip("ecb", (e, c, b)):
                t.requires_grad_(name not in frozen)
            for filter_eps in ("auto", None):
                fusedlm.linear_cross_entropy(e, c, y, b, filter_eps=filter_eps).backward()
    del os.environ["FUSEDLM_CCE_MMA_SYNC_GEMMS"], os.environ["FUSEDLM_CCE_WORKSPACE_MB"]
if CCE_ONLY:
    torch.cuda.synchronize()
    print("sanitize case done")
    sys.exit(0)
logits = torch.randn(5, 3001, device="cuda")
fusedlm.sample(logits, torch.tensor([0.0, 0.5, 1.0, 2.0, 1.0], device="cuda"), top_k=10, top_p=0.9,
               min_p=0.01, return_logprobs=True)
fusedlm.sample(logits.bfloat16(), 1.0)
# Numbers reach the kernels by value (no [B] tensors): temperature, an int seed, truncation.
fusedlm.sample(logits, 0.7, seed=3, offset=2, top_k=10, top_p=0.9, min_p=0.01, return_logprobs=True)
fusedlm.sample(torch.randn(64, 5120, device="cuda").bfloat16(), 0.7, seed=3, top_p=0.9)
# An int seed as torch.compile passes it: a 0-d tensor on the device, read by the kernels
# (aligned and unaligned rows, a finish kernel's split plan and clusters).
for rows, width, logprobs in ((5, 5120, True), (5, 5003, False), (64, 5120, False), (300, 5120, True)):
    torch.ops.fusedlm.sample(torch.randn(rows, width, device="cuda"), torch.rand(rows, device="cuda"),
                             torch.tensor(7, device="cuda"), None, None, torch.full((rows,), 0.9, device="cuda"),
                             None, logprobs)
fusedlm.temperature_logprobs(logits, torch.arange(5, device="cuda"), [0.0, 0.5, 1.0])
# A row's splits merged by the finish kernel (B = 1; B = 8, 64 without clusters), in a cluster
# (B = 8: 8 CTAs, B = 64: 2 CTAs of 16 warps) or a single split drawing the token (B = 200,
# 300); tokens only and with log-probs, with and without truncation (the radix passes; B = 200:
# a row's truncation over 2 CTAs).
for batch in (1, 8, 64, 200, 300):
    big = torch.randn(batch, 128256, device="cuda", dtype=torch.bfloat16) * 3
    tau = torch.rand(batch, device="cuda")
    tau[::5] = 0.0  # tau = 0 rows: the argmax
    fusedlm.sample(big, tau, seed=torch.arange(batch, device="cuda"), return_logprobs=True)
    fusedlm.sample(big, tau, seed=torch.arange(batch, device="cuda"))
    fusedlm.sample(big, tau, top_k=50, top_p=0.9)
    # Top-p alone (by rejection): rows below 0.5, between, and 1; tokens only and with log-probs.
    p = torch.tensor([0.3, 0.6, 0.9, 1.0], device="cuda")[torch.arange(batch, device="cuda") % 4]
    fusedlm.sample(big, tau, top_p=p)
    fusedlm.sample(big, tau, top_p=p, return_logprobs=True)
    fusedlm.sample(big[:, :5003], tau, top_p=p)  # unaligned rows
# B = 64, V = 256000: 2-CTA clusters whose warps hold up to four batches (16-bit: bounded races).
for dtype in (torch.bfloat16, torch.float32):
    wide = torch.randn(64, 256000, device="cuda", dtype=dtype) * 3
    fusedlm.sample(wide, tau[:64], seed=torch.arange(64, device="cuda"))
    fusedlm.sample(wide, tau[:64], return_logprobs=True)
    fusedlm.sample(wide, tau[:64], top_p=p[:64])
del wide
# Float32 rows drawn by the truncation kernel (few rows whose CTA slices are one batch): NaN,
# +inf and -inf entries, a masked row, tau = 0 / 1 rows; top-k, min-p, top-p by rejection.
small = torch.randn(3, 20000, device="cuda") * 3
small[:, 5::17] = float("-inf")
small[0, -3], small[1, -2], small[2] = float("nan"), float("inf"), float("-inf")
for rows, tau_values in ((big[:1].float(), [0.7]), (small, [0.0, 1.0, 0.7])):
    for trunc in (dict(top_k=50), dict(min_p=0.05), dict(top_p=0.9), dict(top_p=0.6)):
        fusedlm.sample(rows, torch.tensor(tau_values, device="cuda"), **trunc)
os.environ["FUSEDLM_NO_CLUSTERS"] = "1"
fusedlm.sample(big[:8], tau[:8])
fusedlm.sample(big[:8], tau[:8], top_p=0.9, return_logprobs=True)
fusedlm.sample(big[:64], tau[:64], return_logprobs=True)
fusedlm.sample(big[:8], tau[:8], top_p=0.9)  # by rejection, no clusters
fusedlm.sample(big[:64], tau[:64], top_p=0.9)
del os.environ["FUSEDLM_NO_CLUSTERS"]
# Top-p by rejection with more than 8 rows per SM (the redraw: one CTA per marked row), on rows
# whose boundary entry is drawn often (truncation then keeps or redraws those draws).
sms = torch.cuda.get_device_properties(0).multi_processor_count
many = torch.randn(9 * sms, 2000, device="cuda") * 3
fusedlm.sample(many, torch.rand(9 * sms, device="cuda") + 0.1, top_p=0.7)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_sampling import assert_top_p_boundary_draws  # noqa: E402
assert_top_p_boundary_draws("cuda", torch.float32, configs=8, width=704, copies=64)
fusedlm.sample(torch.randn(2, 1000000, device="cuda"), torch.rand(2, device="cuda"))
# NaN entries (the clamped exp path, the NaN-skipping argmax of tau = 0 rows).
nan_rows = torch.randn(64, 128256, device="cuda", dtype=torch.bfloat16)
nan_rows[:, ::101] = float("nan")
fusedlm.sample(nan_rows, torch.rand(64, device="cuda") * (torch.arange(64, device="cuda") % 3 > 0),
               return_logprobs=True)
# Tokens only (bounded tile races, race_batch_bounded): NaN tiles and a tiny tau take the exact sums.
fusedlm.sample(nan_rows, torch.rand(64, device="cuda") * (torch.arange(64, device="cuda") % 3 > 0))
fusedlm.sample(nan_rows, torch.full((64,), 1e-5, device="cuda"))
torch.cuda.synchronize()
print("sanitize case done")
