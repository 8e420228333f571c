"""Side-by-side timing of sampler builds made by build.sh (torch-free libraries loaded by ctypes,
so the device spends no time building: ~10 s of device time per build and case).

    python bench/sampler_ab/ab.py DIR main,x --cases b64,b8 --rounds 2

For each case: µs per decode-like step (bench/run.py's step_time, as the #5 bar is judged) and
per call in a graph of 20, and a hash of 16 draws' tokens (equal hashes: the builds drew the
same tokens). Each build runs in its own process per round (builds alternate, and a variant
that hangs costs one --timeout, not the call); the logits, temperatures and seeds are
quick_sampling-like: randn * 3, tau ~ U(0, 1.2) per row ("t0" cases: tau = 0), seed = row.
TRUNCATED cases draw with top-k / top-p (and log-probs) through ab_sample_truncated.
"""
import argparse
import ctypes
import hashlib
import os
import subprocess
import sys
import types

CASES = {  # name: (B, V, dtype, tau = 0 on every row)
    "b1": (1, 128256, "bf16", False), "b8": (8, 128256, "bf16", False), "b16": (16, 128256, "bf16", False),
    "b32": (32, 128256, "bf16", False), "b64": (64, 128256, "bf16", False), "b64t0": (64, 128256, "bf16", True),
    "b256": (256, 128256, "bf16", False), "b8v": (8, 256000, "bf16", False), "b64v": (64, 256000, "bf16", False),
    "h64": (64, 128256, "fp16", False), "f8": (8, 128256, "fp32", False), "f64": (64, 128256, "fp32", False),
    "f64v": (64, 256000, "fp32", False), "f256": (256, 128256, "fp32", False),
    "b64o": (64, 100000, "bf16", False), "b50": (50, 128256, "bf16", False),
}
# Truncated draws (bench/run.py's TOP_K and TOP_P): name: (B, V, dtype, top_k, top_p, log-probs).
# Top-p with log-probs always takes the threshold path; tokens-only top-p draws by rejection
# first (its threshold only for rows whose draw fell outside the set).
TRUNCATED = {
    "k1f": (1, 128256, "fp32", 50, 1.0, False), "k1": (1, 128256, "bf16", 50, 1.0, False),
    "k4f": (4, 128256, "fp32", 50, 1.0, False), "k8f": (8, 128256, "fp32", 50, 1.0, False),
    "k8fs": (8, 50257, "fp32", 50, 1.0, False),
    "k4": (4, 128256, "bf16", 50, 1.0, False), "k8": (8, 128256, "bf16", 50, 1.0, False),
    "k16": (16, 128256, "bf16", 50, 1.0, False), "k32": (32, 128256, "bf16", 50, 1.0, False),
    "k64": (64, 128256, "bf16", 50, 1.0, False),
    "k256f": (256, 128256, "fp32", 50, 1.0, False), "k64f": (64, 128256, "fp32", 50, 1.0, False),
    "k1024": (1024, 128256, "bf16", 50, 1.0, False), "k64w": (64, 128256, "bf16", 20000, 1.0, False),
    "kp64t": (64, 128256, "bf16", 50, 0.9, False),
    "p1f": (1, 128256, "fp32", 0, 0.9, True), "p1": (1, 128256, "bf16", 0, 0.9, True),
    "p4": (4, 128256, "bf16", 0, 0.9, True), "p8": (8, 128256, "bf16", 0, 0.9, True),
    "p16": (16, 128256, "bf16", 0, 0.9, True), "p32": (32, 128256, "bf16", 0, 0.9, True),
    "p64": (64, 128256, "bf16", 0, 0.9, True), "p64f": (64, 128256, "fp32", 0, 0.9, True),
    "p256f": (256, 128256, "fp32", 0, 0.9, True),
    "r1f": (1, 128256, "fp32", 0, 0.9, False), "r8": (8, 128256, "bf16", 0, 0.9, False),
    "r6": (6, 128256, "bf16", 0, 0.9, False), "r6f": (6, 128256, "fp32", 0, 0.9, False),
    "r8f": (8, 128256, "fp32", 0, 0.9, False), "r8v": (8, 256000, "bf16", 0, 0.9, False),
    "r8vf": (8, 256000, "fp32", 0, 0.9, False), "r64": (64, 128256, "bf16", 0, 0.9, False),
    "r1024": (1024, 128256, "bf16", 0, 0.9, False), "r1024v": (1024, 256000, "bf16", 0, 0.9, False),
    "kp1f": (1, 128256, "fp32", 50, 0.9, True), "kp8": (8, 128256, "bf16", 50, 0.9, True),
    "kp256": (256, 128256, "bf16", 50, 0.9, True), "p1024": (1024, 128256, "bf16", 0, 0.9, True),
    "p1024f": (1024, 128256, "fp32", 0, 0.9, True), "k1024l": (1024, 128256, "bf16", 50, 1.0, True),
    # plain draws with log-probs (no truncation)
    "l64": (64, 128256, "bf16", 0, 1.0, True), "l256": (256, 128256, "bf16", 0, 1.0, True),
    "l1024": (1024, 128256, "bf16", 0, 1.0, True), "l1024h": (1024, 128256, "fp16", 0, 1.0, True),
    "l1024v": (1024, 256000, "bf16", 0, 1.0, True), "l8": (8, 128256, "bf16", 0, 1.0, True),
    "l1024f": (1024, 128256, "fp32", 0, 1.0, True), "l64h": (64, 128256, "fp16", 0, 1.0, True),
    "k64hl": (64, 128256, "fp16", 50, 1.0, True), "k8h": (8, 128256, "fp16", 50, 1.0, False),
    # the same at tau = 1 on every row ("t1")
    "l64t1": (64, 128256, "bf16", 0, 1.0, True), "l1024t1": (1024, 128256, "bf16", 0, 1.0, True),
    "l1024ft1": (1024, 128256, "fp32", 0, 1.0, True),
}
# temperature_logprobs (LPO): name: (B, V, dtype, K temperatures); timed per call in a graph of
# 20, with the sum of the outputs instead of a token hash (rounding may differ between builds).
LPO = {"t1024": (1024, 128256, "bf16", 4), "t1024k8": (1024, 128256, "bf16", 8), "t256f": (256, 128256, "fp32", 4)}
DTYPE_CODE = {"fp32": 0, "bf16": 1, "fp16": 2}  # fusedlm::DType


def load(path):
    lib = ctypes.CDLL(path)
    lib.ab_sample.argtypes = ([ctypes.c_int, ctypes.c_void_p] + [ctypes.c_longlong] * 3 + [ctypes.c_void_p] * 4
                              + [ctypes.c_int, ctypes.c_int, ctypes.c_void_p])
    lib.ab_splits.argtypes = [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_longlong] * 3 + [ctypes.c_int]
    lib.ab_workspace_floats.argtypes = [ctypes.c_longlong, ctypes.c_int]
    lib.ab_workspace_floats.restype = ctypes.c_longlong
    if hasattr(lib, "ab_temperature_logprobs"):
        lib.ab_temperature_logprobs.argtypes = ([ctypes.c_int, ctypes.c_void_p] + [ctypes.c_longlong] * 3
                                                + [ctypes.c_void_p] * 2 + [ctypes.c_longlong] + [ctypes.c_void_p] * 2)
    if hasattr(lib, "ab_sample_truncated"):
        lib.ab_sample_truncated.argtypes = (
            [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_longlong] * 3 + [ctypes.c_void_p] * 4
            + [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_float, ctypes.c_int] + [ctypes.c_void_p] * 3)
    return lib


def time_build(directory, build, cases):
    """One build's lines, in this process."""
    sys.modules.setdefault("fusedlm", types.ModuleType("fusedlm"))  # (run.py's timers only)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import torch
    from run import graph_time, sampling_inputs, step_time

    lib = load(os.path.join(directory, build + ".so"))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for case in cases:
        if case in LPO:
            time_temperature_logprobs(lib, build, case, dtypes, graph_time)
            continue
        top_k, top_p, need_logprobs = 0, 1.0, False
        if case in TRUNCATED:
            b, v, dname, top_k, top_p, need_logprobs = TRUNCATED[case]
            greedy = False
        else:
            b, v, dname, greedy = CASES[case]
        logits, tau = sampling_inputs(b, v, dtypes[dname])
        if greedy:
            tau.zero_()
        elif case.endswith("t1"):
            tau.fill_(1.0)
        code = DTYPE_CODE[dname]
        splits = lib.ab_splits(code, logits.data_ptr(), b, v, v, sms)
        workspace = torch.empty(lib.ab_workspace_floats(b, splits), device="cuda")
        tokens = torch.empty(b, dtype=torch.long, device="cuda")
        logprobs = torch.empty(2, b, device="cuda")

        def draw(seeds):
            stream = torch.cuda.current_stream().cuda_stream
            if case in TRUNCATED:
                err = lib.ab_sample_truncated(code, logits.data_ptr(), b, v, v, tau.data_ptr(), seeds.data_ptr(),
                                              tokens.data_ptr(), workspace.data_ptr(), splits, sms, top_k, top_p,
                                              int(need_logprobs), logprobs[0].data_ptr() if need_logprobs else None,
                                              logprobs[1].data_ptr() if need_logprobs else None, stream)
            else:
                err = lib.ab_sample(code, logits.data_ptr(), b, v, v, tau.data_ptr(), seeds.data_ptr(),
                                    tokens.data_ptr(), workspace.data_ptr(), splits, sms, stream)
            if err != 0:
                raise RuntimeError(f"{build}: ab_sample returned CUDA error {err}")
            return tokens

        seeds = torch.arange(b, device="cuda")
        drawn = torch.stack([draw(seeds + 1000 * i).clone() for i in range(16)])
        digest = hashlib.md5(drawn.cpu().numpy().tobytes()).hexdigest()[:8]
        source = logits.clone()
        step = step_time(lambda: logits.copy_(source), lambda: draw(seeds))
        g20 = graph_time(lambda: draw(seeds), calls=20)
        step_text = f"{step * 1e3:6.2f}" if step else "   n/a"
        g20_text = f"{g20 * 1e3:6.2f}" if g20 else "   n/a"
        lp_text = ""
        if need_logprobs:  # the timed draw's log-probs: processed and raw sums over the rows
            lp_text = f"  logprobs {logprobs[0].double().sum().item():.9e} {logprobs[1].double().sum().item():.9e}"
        print(f"{case:6s} {build:10s} step {step_text} us  g20 {g20_text} us  splits {splits:3d}  tokens {digest}"
              f"{lp_text}", flush=True)


def time_temperature_logprobs(lib, build, case, dtypes, graph_time):
    import torch
    b, v, dname, k = LPO[case]
    g = torch.Generator(device="cuda").manual_seed(b * 7 + v)
    logits = (torch.randn(b, v, device="cuda", generator=g) * 3).to(dtypes[dname])
    tokens = torch.randint(0, v, (b,), device="cuda", generator=g)
    temps = torch.tensor([0.0, 0.3, 0.7, 1.0, 1.3, 0.5, 2.0, 0.9][:k], device="cuda")
    out = torch.empty(b, k, device="cuda")

    def call():
        err = lib.ab_temperature_logprobs(DTYPE_CODE[dname], logits.data_ptr(), b, v, v, tokens.data_ptr(),
                                          temps.data_ptr(), k, out.data_ptr(), torch.cuda.current_stream().cuda_stream)
        if err != 0:
            raise RuntimeError(f"{build}: ab_temperature_logprobs returned CUDA error {err}")

    call()
    finite = out[:, 1:].isfinite()
    total = out[:, 1:][finite].double().sum().item()
    g20 = graph_time(call, calls=20)
    print(f"{case:6s} {build:10s} g20 {g20 * 1e3:8.2f} us  sum {total:.6e}  finite {finite.sum().item()}"
          f"  greedy0 {(out[:, 0] == 0).sum().item()}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="build.sh's output directory (unpacked)")
    parser.add_argument("builds", help="comma-separated build names (DIR/NAME.so)")
    names = ",".join(list(CASES) + list(TRUNCATED) + list(LPO))
    parser.add_argument("--cases", default="b64,b8", help=f"comma-separated, of {names}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=90, help="seconds per build and round")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # (a child process)
    args = parser.parse_args()
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES and c not in TRUNCATED and c not in LPO]
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {names}")
    if args.one:
        time_build(args.dir, args.builds, cases)
        return
    lines = []
    for _ in range(args.rounds):
        for build in args.builds.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), args.dir, build, "--cases", args.cases, "--one"]
            first = len(lines)
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                lines += done.stdout.splitlines()
                if done.returncode != 0:
                    lines.append(f"{build}: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
            except subprocess.TimeoutExpired:
                lines.append(f"{build}: no result within {args.timeout:.0f} s (a hang?)")
            print(*lines[first:], sep="\n", flush=True)
    print("\nby case:")
    print(*sorted(lines, key=lambda line: line.split()[0]), sep="\n")  # (stable: rounds stay in order)


if __name__ == "__main__":
    main()
