"""fusedlm benchmarks: one harness, one CSV schema.

    python bench/run.py --suite cce --out bench/out        # CCE vs naive / compile / peers
    python bench/run.py --suite sampling --out bench/out   # sampler vs torch paths (+ FlashInfer)
    python bench/run.py --suite model --out bench/out      # a training step of whole HF models

Each row: suite, case, method, dtype, regime, pass, time_ms (CUDA events, median), peak extra
memory (MiB over the memory held before the call, minus the gradients' own size), ratio to
the suite's reference (one cuBLAS GEMM for CCE, the memory floor for sampling), GPU, versions.
CCE passes: `fwd` / `fwd+bwd` timed call by call (a host sync after each, so each call starts
after a pause, at boost clocks), `fwd_interleaved` alternating with the GEMM, and `*_steady`
under sustained load (back-to-back calls at the GPU's power limit, as in a training loop).
Model passes: `train_step` (forward + backward of a random-init Hugging Face causal LM, bf16,
gradients set to None before each step; peak memory over the weights, the gradients
included), unpatched against fusedlm's patch, Liger's loss-only patch and apple's CCE on the
base model's hidden states, and torch.compile of the whole model, unpatched and patched;
ratios to the unpatched eager step.
FlashInfer's sampling kernels join the sampling suite when FUSEDLM_BENCH_FLASHINFER names a
library built by bench/peers/build_flashinfer.sh.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import fusedlm  # noqa: E402

FIELDS = ["suite", "case", "method", "dtype", "regime", "pass", "time_ms", "peak_extra_mib",
          "ratio", "ratio_to", "gpu", "torch", "fusedlm", "peers"]


def cuda_time(fn, warmup=3, reps=10):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def interleaved_times(fn_a, fn_b, rounds=5, reps=10):
    """Median times of fn_a and fn_b measured in alternation (a, b, a, b, ...), so that both
    see the same clocks: an H100 runs the same GEMM up to ~10% faster right after a pause
    than after seconds of full load (power limit)."""
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(cuda_time(fn_a, warmup=1, reps=reps))
        tb.append(cuda_time(fn_b, warmup=1, reps=reps))
    return statistics.median(ta), statistics.median(tb)


def steady_times(fns, settle_s=1.0, block_s=0.2, rounds=5):
    """Median time per call of each fn under sustained load, as in a training loop: calls
    back to back with no host sync between them, after ~settle_s of such load (an H100 then
    sits at its power limit: 1.4-1.5 GHz for these GEMM-sized kernels instead of up to
    1.98 GHz right after a pause). Rounds of blocks (~block_s of calls each) alternate
    between the fns, so all see the same clocks."""
    per_call = []
    for fn in fns:  # one timed call each, to size the blocks
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        per_call.append(max(start.elapsed_time(end), 1e-3) * 1e-3)
    counts = [max(2, round(block_s / t)) for t in per_call]
    settle_end = time.perf_counter() + settle_s
    while time.perf_counter() < settle_end:
        for fn, n in zip(fns, counts):
            for _ in range(n):
                fn()
        torch.cuda.synchronize()
    events = [[] for _ in fns]
    for _ in range(rounds):
        for i, (fn, n) in enumerate(zip(fns, counts)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            events[i].append((start, end, n))
    torch.cuda.synchronize()
    return [statistics.median(s.elapsed_time(e) / n for s, e, n in ev) for ev in events]


def capture_graph(fn, calls):
    """A CUDA graph of `calls` back-to-back calls of fn (after 3 warm-up calls on a side
    stream), or None when fn cannot be captured."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except Exception:
        return None
    return graph


def graph_time(fn, reps=50, calls=1):
    """Median time per call of fn replayed from a CUDA graph holding `calls` back-to-back
    calls (no host launch overhead), or None when fn cannot be captured. With calls=1 each
    timing includes the graph's own launch latency (10-20 us on the H100s measured for a
    one-element kernel, against ~1.4 us per call with calls=20)."""
    graph = capture_graph(fn, calls)
    return None if graph is None else cuda_time(graph.replay, warmup=3, reps=reps) / calls


def step_time(produce, fn, rounds=5, reps=8, steps=20):
    """Per-step time fn adds to a decode-like CUDA graph of `steps` steps, each `produce`
    (a copy that writes fn's input, as an LM head writes the logits) then fn: the graph's
    time less that of the same graph of producers alone (the two timed in alternation, so
    that both see the same clocks), per step; None when fn cannot be captured or the
    difference is not positive (noise). Unlike back-to-back calls of fn, each fn follows
    another operation here, so a kernel of fn cannot become resident while the previous fn
    call finishes (programmatic dependent launch), and its input is freshly written."""
    with_fn = capture_graph(lambda: (produce(), fn()), steps)
    alone = capture_graph(produce, steps)
    if with_fn is None or alone is None:
        return None
    t_with, t_alone = interleaved_times(with_fn.replay, alone.replay, rounds=rounds, reps=reps)
    per_step = (t_with - t_alone) / steps
    return per_step if per_step > 0 else None


def peak_extra_mib(fn, exclude_bytes=0):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base - exclude_bytes
    del out
    return peak / 2**20


def flashinfer_library():
    """FlashInfer's sampling kernels through bench/peers/flashinfer_sampling.cu (ctypes), or None."""
    path = os.environ.get("FUSEDLM_BENCH_FLASHINFER")
    if not path:
        return None
    lib = ctypes.CDLL(os.path.abspath(path))
    lib.fi_version.restype = ctypes.c_char_p
    return lib


def peer_versions():
    from importlib import metadata

    names = []
    for mod, dist in (("cut_cross_entropy", "cut-cross-entropy"), ("liger_kernel", "liger-kernel"),
                      ("triton", "triton")):
        try:
            names.append(f"{mod}={metadata.version(dist)}")
        except Exception:
            pass
    fi = flashinfer_library()
    if fi is not None:
        names.append(f"flashinfer={fi.fi_version().decode()} (kernels from its headers)")
    return ";".join(names)


# ------------------------------------------------------------------------------- CCE
def cce_methods(softcap=None):
    def naive(e, c, y):
        return F.cross_entropy((e @ c.T).float(), y)

    # One compilation per shape and per requires_grad pattern (the frozen-classifier pass):
    # more than dynamo's default 8, past which it silently falls back to eager. dynamic=False:
    # with one compiled object over several shapes, dynamo's automatic dynamic shapes would
    # otherwise compile the second and later shapes with symbolic sizes.
    torch._dynamo.config.recompile_limit = 64
    compiled = torch.compile(naive, dynamic=False)
    methods = {"torch_naive": naive, "torch_compile": compiled,
               "fusedlm": lambda e, c, y: fusedlm.linear_cross_entropy(e, c, y),
               "fusedlm_exact": lambda e, c, y: fusedlm.linear_cross_entropy(e, c, y, filter_eps=None)}
    if hasattr(F, "linear_cross_entropy"):  # PyTorch's own (2.13+): batch-chunked
        methods["torch_linear_ce"] = lambda e, c, y: F.linear_cross_entropy(e, c, y)
    try:
        from cut_cross_entropy import linear_cross_entropy as apple_cce

        methods["apple_cce"] = lambda e, c, y: apple_cce(e, c, y)
    except Exception as err:
        print(f"apple cut_cross_entropy unavailable: {err}")
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        methods["liger"] = lambda e, c, y: liger(c, e, y)
    except Exception as err:
        print(f"liger unavailable: {err}")
    return methods


def cce_inputs(n, d, v, regime, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    c = torch.randn(v, d, device="cuda", generator=g) / d**0.5
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    e = torch.randn(n, d, device="cuda", generator=g)
    if regime == "peaked":  # hidden states aligned with the target row, as after training
        e = 0.3 * e + 6.0 * c[y] * d**0.5 / c[y].norm(dim=-1, keepdim=True)
    return e.to(dtype), c.to(dtype), y


def bench_cce(args, rows, meta):
    shapes = [(8192, 2304, 256000), (8192, 4096, 128256), (16384, 2048, 32000)]
    if args.quick:
        shapes = [(4096, 1024, 32000)]
    if args.shapes:
        shapes = args.shapes
    methods = cce_methods()
    for n, d, v in shapes:
        case = f"{n}x{d}x{v}"
        for regime in ("random", "peaked"):
            e, c, y = cce_inputs(n, d, v, regime)
            gemm = cuda_time(lambda: e @ c.T)
            rows.append(dict(meta, suite="cce", case=case, method="cublas_gemm", dtype="bf16",
                             regime=regime, **{"pass": "gemm"}, time_ms=gemm, peak_extra_mib=n * v * 2 / 2**20,
                             ratio=1.0, ratio_to="gemm"))
            for name, fn in methods.items():
                if name == "torch_naive" and n * v > 8192 * 256000:
                    continue
                e_g, c_g = e.detach().requires_grad_(), c.detach().requires_grad_()
                try:
                    t_f = cuda_time(lambda: fn(e, c, y))
                    # The forward again, alternating with the GEMM (same clocks for both).
                    t_fi, gemm_i = interleaved_times(lambda: fn(e, c, y), lambda: e @ c.T)
                    m_f = peak_extra_mib(lambda: fn(e, c, y))

                    def fwd_bwd():
                        loss = fn(e_g, c_g, y)
                        return torch.autograd.grad(loss, (e_g, c_g))

                    t_fb = cuda_time(fwd_bwd)
                    m_fb = peak_extra_mib(fwd_bwd, exclude_bytes=(e.numel() + c.numel()) * 2)

                    def fwd_bwd_frozen_c():  # a frozen classifier (LoRA): only dE is needed
                        return torch.autograd.grad(fn(e_g, c, y), (e_g,))

                    t_fz = cuda_time(fwd_bwd_frozen_c)
                    m_fz = peak_extra_mib(fwd_bwd_frozen_c, exclude_bytes=e.numel() * 2)
                    # The exact-mode bar compares a ~60 ms fwd+bwd with one ~14 ms GEMM; timed in
                    # alternation they see the same (power-limited) clocks, as the forward does.
                    t_fbi, gemm_fbi = (interleaved_times(fwd_bwd, lambda: e @ c.T, rounds=3, reps=5)
                                       if name == "fusedlm_exact" else (None, None))
                    # All three again under sustained load (the GPU at its power limit).
                    t_fs, t_fbs, gemm_s = steady_times([lambda: fn(e, c, y), fwd_bwd, lambda: e @ c.T])
                except Exception as err:  # a peer failing must not stop the run
                    print(f"{name} failed on {case}: {type(err).__name__}: {err}")
                    continue
                for p, t, m, ref, ref_name in (("fwd", t_f, m_f, gemm, "gemm"),
                                               ("fwd_interleaved", t_fi, m_f, gemm_i, "gemm_interleaved"),
                                               ("fwd+bwd", t_fb, m_fb, gemm, "gemm"),
                                               ("fwd+bwd_frozen_c", t_fz, m_fz, gemm, "gemm"),
                                               ("fwd_steady", t_fs, m_f, gemm_s, "gemm_steady"),
                                               ("fwd+bwd_steady", t_fbs, m_fb, gemm_s, "gemm_steady"),
                                               ("gemm_steady", gemm_s, n * v * 2 / 2**20, gemm_s, "gemm_steady")):
                    rows.append(dict(meta, suite="cce", case=case, method=name, dtype="bf16",
                                     regime=regime, **{"pass": p}, time_ms=t, peak_extra_mib=m,
                                     ratio=t / ref, ratio_to=ref_name))
                rows.append(dict(meta, suite="cce", case=case, method=name, dtype="bf16", regime=regime,
                                 **{"pass": "gemm_interleaved"}, time_ms=gemm_i, peak_extra_mib=n * v * 2 / 2**20,
                                 ratio=1.0, ratio_to="gemm_interleaved"))
                if t_fbi is not None:
                    rows.append(dict(meta, suite="cce", case=case, method=name, dtype="bf16", regime=regime,
                                     **{"pass": "fwd+bwd_interleaved"}, time_ms=t_fbi, peak_extra_mib=m_fb,
                                     ratio=t_fbi / gemm_fbi, ratio_to="gemm_fbwd_interleaved"))
                    rows.append(dict(meta, suite="cce", case=case, method=name, dtype="bf16", regime=regime,
                                     **{"pass": "gemm_fbwd_interleaved"}, time_ms=gemm_fbi,
                                     peak_extra_mib=n * v * 2 / 2**20, ratio=1.0, ratio_to="gemm_fbwd_interleaved"))
                    print(f"{case:>20} {regime:>7} {name:>14}: fwd+bwd alternating with the GEMM "
                          f"{t_fbi:.2f} / {gemm_fbi:.2f} = {t_fbi / gemm_fbi:4.2f}x", flush=True)
                print(f"{case:>20} {regime:>7} {name:>14}: fwd {t_f:8.2f} ms ({t_f / gemm:4.2f}x gemm; "
                      f"alternating with it {t_fi:.2f} / {gemm_i:.2f} = {t_fi / gemm_i:4.2f}x) "
                      f"fwd+bwd {t_fb:8.2f} ms (frozen c {t_fz:.2f})  mem fwd {m_f:8.1f} MiB, fwd+bwd {m_fb:8.1f} MiB; sustained: "
                      f"fwd {t_fs:.2f} fwd+bwd {t_fbs:.2f} gemm {gemm_s:.2f} ms ({t_fs / gemm_s:4.2f}x)", flush=True)
            del e, c, y
            torch.cuda.empty_cache()
            write_csv(args.csv_path, rows)  # a run cut short keeps the cases it finished


# -------------------------------------------------------------------------- sampling
def copy_bandwidth():
    x = torch.empty(1 << 28, device="cuda", dtype=torch.float32)
    y = torch.empty_like(x)
    t = cuda_time(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / (t * 1e-3)  # bytes read + written per second


GRAPH_CALLS = 20  # sample_graph20: per-call time in a graph of 20 back-to-back calls


def flashinfer_methods(lib, logits, tau, top_p, top_k):
    """FlashInfer's way to sample with a per-row temperature: its temperature softmax (float32
    probabilities), then a sampler over them (plain, top-p or top-k); its kernels read float32
    only, so 16-bit logits are converted first. Also the plain sampler on logits divided by tau
    (FlashInfer's samplers from logits take no temperature)."""
    b, v = logits.shape
    workspace = torch.empty(1 << 20, dtype=torch.uint8, device=logits.device)  # as flashinfer.softmax

    def call(name, *args):
        err = getattr(lib, name)(*args, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
        if err != 0:
            raise RuntimeError(f"{name}: CUDA error {err}")

    def ptr(t):
        return ctypes.c_void_p(t.data_ptr())

    def probs():
        x = logits.float().contiguous()
        p = torch.empty_like(x)
        call("fi_softmax", ptr(x), ptr(p), ctypes.c_uint(b), ctypes.c_uint(v), ptr(tau), ptr(workspace),
             ctypes.c_size_t(workspace.numel()), ctypes.c_bool(True))
        return p

    def draw(name, x, *args):  # a sampler over x (probabilities or logits): int32 tokens
        out = torch.empty(b, dtype=torch.int32, device=logits.device)
        call(name, ptr(x), ptr(out), *args, ctypes.c_uint64(1234), ctypes.c_uint64(0))
        return out

    def from_probs(name, *extra):  # (these samplers also write a success flag per row)
        valid = torch.empty(b, dtype=torch.bool, device=logits.device)
        return draw(name, probs(), ptr(valid), ctypes.c_uint(b), ctypes.c_uint(v), *extra)

    def scaled_logits():
        x = (logits.float() / tau.clamp_min(1e-5)[:, None]).contiguous()
        return draw("fi_sampling_from_logits", x, ctypes.c_uint(b), ctypes.c_uint(v))

    return {"flashinfer_softmax_sample": lambda: from_probs("fi_sampling_from_probs"),
            "flashinfer_scaled_logits": scaled_logits,
            "flashinfer_top_p": lambda: from_probs("fi_top_p_sampling_from_probs", ctypes.c_float(top_p)),
            "flashinfer_top_k": lambda: from_probs("fi_top_k_sampling_from_probs", ctypes.c_uint(top_k))}


def check_flashinfer(lib):
    """The bindings are called right: rows with one dominant logit give its index everywhere."""
    b, v = 5, 50257
    logits = torch.randn(b, v, device="cuda")
    hot = torch.tensor([(r * 7919 + 11) % v for r in range(b)], device="cuda")
    logits[torch.arange(b), hot] = 60.0
    tau = torch.full((b,), 0.7, device="cuda")
    for name, fn in flashinfer_methods(lib, logits, tau, 0.9, 3).items():
        got = fn().long()
        if not torch.equal(got, hot):
            raise RuntimeError(f"{name}: tokens {got.tolist()}, expected {hot.tolist()}")


TOP_P, TOP_K = 0.9, 50  # the truncated-sampling rows (fusedlm_top_p / _top_k, torch_top_p_sort)


def sampling_inputs(b, v, dtype):
    """A sampling case's logits (randn * 3) and per-row temperatures (U(0, 1.2)), seeded by B
    and V (bench/sampler_ab/ab.py draws its cases with it too): a tokens-only top-p call's time
    depends on whether any row's draw falls outside its top-p set (those rows take a second,
    exact pass), which unseeded data made differ between runs."""
    g = torch.Generator(device="cuda").manual_seed(b * 7 + v)
    logits = (torch.randn(b, v, device="cuda", generator=g) * 3).to(dtype)
    return logits, torch.rand(b, device="cuda", generator=g) * 1.2


def bench_sampling(args, rows, meta):
    """Eager time, one call per graph replay (sample_graph), the per-call time of 20 calls
    in one graph (sample_graph20: without the per-replay launch latency, but each call may
    become resident during the previous one's tail) and the time per step of a graph of 20
    steps, each a copy that writes the logits then the call (sample_step: the device time a
    decode loop's graph pays per step; the bars are judged on it). torch_amax_read (a reduction that only reads the logits
    once) and a one-element kernel show what any kernel pays at these sizes."""
    fi = flashinfer_library()
    if fi is not None:
        check_flashinfer(fi)
    bw = copy_bandwidth()
    print(f"device copy bandwidth: {bw / 1e12:.2f} TB/s")
    tiny = torch.zeros(1, device="cuda")
    t1, t20 = graph_time(lambda: tiny.add_(1)), graph_time(lambda: tiny.add_(1), calls=GRAPH_CALLS)
    for pass_name, value in (("sample_graph", t1), ("sample_graph20", t20)):
        rows.append(dict(meta, suite="sampling", case="one_element", method="torch_add_one_element",
                         dtype="fp32", regime="-", **{"pass": pass_name}, time_ms=value, peak_extra_mib=0.0,
                         ratio="", ratio_to=""))
    print(f"one-element kernel: {t1 * 1e3:.1f} us per graph replay, {t20 * 1e3:.1f} us per call in a graph "
          f"of {GRAPH_CALLS}", flush=True)
    batches = [1, 8, 64, 256, 1024]
    for v in (128256, 256000):
        for dtype in (torch.float32, torch.bfloat16):
            for b in batches:
                logits, tau = sampling_inputs(b, v, dtype)
                seeds = torch.arange(b, device="cuda")
                floor_ms = b * v * logits.element_size() / bw * 1e3
                dname = "fp32" if dtype == torch.float32 else "bf16"

                def torch_multinomial():
                    t = tau.clamp_min(1e-5)[:, None]
                    probs = torch.softmax(logits.float() / t, -1)
                    return torch.multinomial(probs, 1)

                def torch_race():
                    t = tau.clamp_min(1e-5)[:, None]
                    probs = torch.softmax(logits.float() / t, -1)
                    return (probs / torch.empty_like(probs).exponential_()).argmax(-1)

                def torch_top_p_sort():  # the usual top-p: sort, cumulative mass, mask, multinomial
                    t = tau.clamp_min(1e-5)[:, None]
                    probs, order = torch.sort(torch.softmax(logits.float() / t, -1), dim=-1, descending=True)
                    probs = probs.masked_fill(probs.cumsum(-1) - probs > TOP_P, 0.0)
                    return order.gather(-1, torch.multinomial(probs, 1))

                methods = {"fusedlm": lambda: fusedlm.sample(logits, tau, seed=seeds),
                           "fusedlm_logprobs": lambda: fusedlm.sample(logits, tau, seed=seeds,
                                                                      return_logprobs=True),
                           "fusedlm_top_p": lambda: fusedlm.sample(logits, tau, seed=seeds, top_p=TOP_P),
                           "fusedlm_top_p_logprobs": lambda: fusedlm.sample(logits, tau, seed=seeds, top_p=TOP_P,
                                                                            return_logprobs=True),
                           "fusedlm_top_k": lambda: fusedlm.sample(logits, tau, seed=seeds, top_k=TOP_K),
                           "torch_softmax_multinomial": torch_multinomial,
                           "torch_exponential_race": torch_race,
                           "torch_top_p_sort": torch_top_p_sort,
                           "torch_amax_read": lambda: logits.amax(-1)}
                if fi is not None:
                    methods.update(flashinfer_methods(fi, logits, tau, TOP_P, TOP_K))
                source = logits.clone()  # what the producer of sample_step copies in
                for name, fn in methods.items():
                    t = cuda_time(fn, warmup=5, reps=30)
                    graphed = name.startswith(("fusedlm", "flashinfer")) or name == "torch_amax_read"
                    tg = graph_time(fn) if graphed else None
                    tg20 = graph_time(fn, calls=GRAPH_CALLS) if graphed else None
                    stepped = name in ("fusedlm", "fusedlm_logprobs", "torch_amax_read")
                    ts = step_time(lambda: logits.copy_(source), fn) if stepped else None
                    mem = peak_extra_mib(fn)
                    for pass_name, value in (("sample", t), ("sample_graph", tg), ("sample_graph20", tg20),
                                             ("sample_step", ts)):
                        if value is None:
                            continue
                        rows.append(dict(meta, suite="sampling", case=f"B{b}xV{v}", method=name, dtype=dname,
                                         regime="random_tau", **{"pass": pass_name}, time_ms=value,
                                         peak_extra_mib=mem, ratio=value / floor_ms, ratio_to="memory_floor"))
                    graph_txt = (f"graph {tg * 1e3:7.1f} us, {tg20 * 1e3:7.1f} us per call in a graph of "
                                 f"{GRAPH_CALLS} ({tg20 / floor_ms:5.2f}x floor)") if tg is not None else ""
                    if ts is not None:
                        graph_txt += f", {ts * 1e3:7.1f} us per decode-like step ({ts / floor_ms:5.2f}x floor)"
                    print(f"B={b:5d} V={v} {dname}: {name:>26} {t * 1e3:9.1f} us ({t / floor_ms:6.2f}x floor "
                          f"{floor_ms * 1e3:.1f} us), {graph_txt}", flush=True)
                write_csv(args.csv_path, rows)  # a run cut short keeps the cases it finished


# ----------------------------------------------------------------------------- model
# Two models as users train them (random init: speed and memory do not depend on the
# weights): a Llama-3.2-1B-like model (tied embeddings, V = 128256; 4 x 2048 tokens, SDPA) and a
# Gemma-2-2B-like one (V = 256000, final logit softcap 30; 2 x 2048 tokens: its attention is
# HF's eager one, which keeps every layer's attention weights for the backward).
MODEL_CASES = {
    "llama_1b": ("LlamaConfig", "LlamaForCausalLM", (4, 2048), "sdpa",
                 dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)),
    "gemma2_2b": ("Gemma2Config", "Gemma2ForCausalLM", (2, 2048), "eager",
                  dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                       final_logit_softcapping=30.0, tie_word_embeddings=True)),
}


def model_methods(model, name):
    """name -> (setup, loss, teardown) for one model instance: setup patches it, loss(ids,
    labels) returns the training loss, teardown restores the unpatched model."""
    from fusedlm.integrations import transformers as fl_hf

    def hf_loss(ids, labels):
        return model(input_ids=ids, labels=labels).loss

    nothing = lambda: None  # noqa: E731
    methods = {"hf_eager": (nothing, hf_loss, nothing),
               "fusedlm": (lambda: fl_hf.patch(model), hf_loss, lambda: fl_hf.unpatch(model))}
    # torch.compile of the whole model, unpatched (inductor fuses the loss after the logits
    # GEMM) and patched
    compiled = {}

    def compile_setup(patched):
        def setup():
            if patched:
                fl_hf.patch(model)
            compiled["model"] = torch.compile(model)
        return setup

    def compiled_loss(ids, labels):
        return compiled["model"](input_ids=ids, labels=labels).loss

    def compile_teardown():
        compiled.clear()
        fl_hf.unpatch(model)
        torch._dynamo.reset()

    methods["hf_compile"] = (compile_setup(False), compiled_loss, compile_teardown)
    methods["fusedlm_compile"] = (compile_setup(True), compiled_loss, compile_teardown)
    try:
        from cut_cross_entropy import linear_cross_entropy as apple_cce

        softcap = getattr(model.config, "final_logit_softcapping", None)

        def apple_loss(ids, labels):  # as apple's README does it for a model it does not patch
            hidden = model.model(input_ids=ids).last_hidden_state
            return apple_cce(hidden, model.lm_head.weight, labels, shift=True, softcap=softcap)

        methods["apple_cce"] = (nothing, apple_loss, nothing)
    except Exception as err:
        print(f"apple cut_cross_entropy unavailable: {err}")
    try:
        from liger_kernel.transformers import monkey_patch

        apply = getattr(monkey_patch, f"apply_liger_kernel_to_{name.split('_')[0]}")

        mlp = {"geglu": False} if name.startswith("gemma") else {"swiglu": False}

        def liger_setup():  # the loss only: the same layers as every other method
            apply(rope=False, rms_norm=False, fused_linear_cross_entropy=True, model=model, **mlp)

        def liger_teardown():  # (the patch is an instance attribute; absent if it failed)
            model.__dict__.pop("forward", None)

        methods["liger"] = (liger_setup, hf_loss, liger_teardown)
    except Exception as err:
        print(f"liger unavailable: {err}")
    return methods


def bench_model(args, rows, meta):
    import transformers

    for name, (cfg_cls, model_cls, (batch, seq), attention, kw) in MODEL_CASES.items():
        if args.models and name not in args.models:
            continue
        if args.quick:
            batch, seq = 1, 512
        cfg = getattr(transformers, cfg_cls)(**kw)
        cfg._attn_implementation = attention
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = getattr(transformers, model_cls)(cfg).to(torch.bfloat16)
        model.train()
        g = torch.Generator(device="cuda").manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda", generator=g)
        labels = ids.clone()
        labels[:, : seq // 8] = -100  # a prompt: no loss there
        case = f"{name}_{batch}x{seq}"
        base_ms = None
        losses = {}
        for method, (setup, loss_fn, teardown) in model_methods(model, name).items():
            if args.model_methods and method not in args.model_methods:
                continue
            try:
                setup()

                def step():
                    model.zero_grad(set_to_none=True)
                    loss = loss_fn(ids, labels)
                    loss.backward()
                    return loss.detach()

                losses[method] = float(step())
                ms = cuda_time(step, warmup=2, reps=5)
                model.zero_grad(set_to_none=True)  # (the peak's base: the weights alone)
                mem = peak_extra_mib(step)
            except Exception as err:  # a peer that does not support this transformers version
                print(f"{case} {method}: failed: {type(err).__name__}: {err}")
                continue
            finally:
                model.zero_grad(set_to_none=True)
                teardown()
            base_ms = ms if method == "hf_eager" else base_ms
            rows.append(dict(meta, suite="model", case=case, method=method, dtype="bf16", regime="random_init",
                             **{"pass": "train_step"}, time_ms=ms, peak_extra_mib=mem,
                             ratio=ms / base_ms if base_ms else float("nan"), ratio_to="hf_eager"))
            print(f"{case} {method:>10}: step {ms:8.2f} ms, peak over the weights {mem:9.1f} MiB, "
                  f"loss {losses[method]:.5f}", flush=True)
            write_csv(args.csv_path, rows)  # a run cut short keeps the steps it timed
        del model
        torch.cuda.empty_cache()


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            # (6 significant digits: times in ms of a few-us sampler call kept 0.1 us with 4 decimals)
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


# The model suite's methods (apple_cce and liger only when their packages are installed).
MODEL_METHODS = ("hf_eager", "fusedlm", "hf_compile", "fusedlm_compile", "apple_cce", "liger")


def _shapes(text: str) -> list:
    """--shapes: NxDxV,... of positive integers (an argparse error, before any GPU work)."""
    try:
        shapes = [tuple(int(x) for x in s.split("x")) for s in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected NxDxV[,NxDxV...] of positive integers, got {text!r}")
    return shapes


def _names(known):
    def parse(text: str) -> list:
        names = text.split(",")
        unknown = [n for n in names if n not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; known: {list(known)}")
        return names
    return parse


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["cce", "sampling", "model", "all"], default="all")
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--quick", action="store_true",
                        help="one small CCE shape, the models at batch 1 x 512 (the sampling suite is unchanged)")
    parser.add_argument("--shapes", type=_shapes, help="CCE shapes NxDxV, comma-separated (default: the issue's three)")
    parser.add_argument("--models", type=_names(MODEL_CASES),
                        help=f"model suite cases, comma-separated (default: all of {list(MODEL_CASES)})")
    parser.add_argument("--model-methods", type=_names(MODEL_METHODS),
                        help=f"model suite methods, comma-separated (default: all of {list(MODEL_METHODS)})")
    args = parser.parse_args(argv)
    # (an option of a suite that does not run would be ignored silently)
    for option, suite in (("shapes", "cce"), ("models", "model"), ("model_methods", "model")):
        if getattr(args, option) and args.suite not in (suite, "all"):
            parser.error(f"--{option.replace('_', '-')} applies to --suite {suite} (or all), not {args.suite}")
    if not torch.cuda.is_available():
        print("benchmarks need a CUDA GPU")
        return 2
    os.makedirs(args.out, exist_ok=True)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                fusedlm=fusedlm.__version__, peers=peer_versions())
    rows = []
    t0 = time.time()
    args.csv_path = os.path.join(args.out, f"bench_{args.suite}.csv")
    if args.suite in ("cce", "all"):
        bench_cce(args, rows, meta)
    if args.suite in ("sampling", "all"):
        bench_sampling(args, rows, meta)
    if args.suite in ("model", "all"):
        bench_model(args, rows, meta)
    write_csv(args.csv_path, rows)
    print(f"wrote {args.csv_path} ({len(rows)} rows) in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
