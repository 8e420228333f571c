"""Tables (markdown) and plots from a bench/run.py CSV, with the issue bars checked, e.g.
    python bench/report.py bench/results/bench_all_H100_80GB_HBM3.csv --plot bench/out/report.png
Needs only the standard library; --plot needs matplotlib."""
import argparse
import csv
import os
import sys
from collections import defaultdict


def load(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class _Measured(dict):
    """(method, pass) -> value; NaN for a row the run does not have (e.g. a method that
    failed, which run.py skips): its cells read nan and its bars "missing"."""

    def __missing__(self, key):
        return float("nan")


def cce_tables(rows):
    t = defaultdict(_Measured)  # (case, regime) -> (method, pass) -> ms
    mem = defaultdict(_Measured)
    ratios = {}  # (case, regime, method, pass) -> the row's own ratio
    for r in rows:
        if r["suite"] == "cce":
            if r["ratio"]:
                ratios[(r["case"], r["regime"], r["method"], r["pass"])] = float(r["ratio"])
            t[(r["case"], r["regime"])][(r["method"], r["pass"])] = float(r["time_ms"])
            mem[(r["case"], r["regime"])][(r["method"], r["pass"])] = float(r["peak_extra_mib"])
    out = ["| shape | regime | GEMM | torch.compile | apple CCE | Liger | fusedlm | fusedlm exact |",
           "|---|---|---|---|---|---|---|---|"]
    # A backward that recomputes the logits and skips nothing costs 4 GEMMs (forward,
    # recompute, dE, dC): the last column is that floor over the fwd+bwd bar's time (> 1: no
    # recompute design meets the bar unless the filter skips tiles).
    # Runs since session 12 also time every method under sustained load (`*_steady` passes:
    # back-to-back calls at the GPU's power limit); their ratios follow the others after "|".
    bars = ["| shape | regime | fwd / GEMM (first; alternating \\| sustained) | fwd+bwd / min(compile, apple) "
            "(\\| sustained) | exact / GEMM (first; alternating \\| sustained) | "
            "fwd extra MiB (≤ 8 MB + 8 B/token) | fwd+bwd extra MiB (≤ 256 MB at the Gemma shape) | "
            "4 GEMMs / (0.9 × min(compile, apple)) |", "|---|---|---|---|---|---|---|---|"]

    def pair(m, key):
        f, fb = m.get((key, "fwd")), m.get((key, "fwd+bwd"))
        return "–" if f is None else f"{f:.1f} / {fb:.1f}"

    # The sustained-load table (each method's GEMM column is the GEMM timed in alternation
    # with that method).
    steady_rows = []
    for (case, regime), m in t.items():
        if ("fusedlm", "fwd_steady") not in m:
            continue
        cells = [f"{m[(k, 'fwd_steady')]:.1f} / {m[(k, 'fwd+bwd_steady')]:.1f}" if (k, "fwd_steady") in m else "–"
                 for k in ("torch_compile", "apple_cce", "liger", "fusedlm")]
        steady_rows.append(f"| {case} | {regime} | {m[('fusedlm', 'gemm_steady')]:.1f} | " + " | ".join(cells) +
                           f" | {m.get(('fusedlm_exact', 'fwd+bwd_steady'), float('nan')):.1f} |")
    if steady_rows:
        steady_rows[:0] = ["", "Under sustained load (back-to-back calls at the power limit), ms:", "",
                           "| shape | regime | GEMM | torch.compile | apple CCE | Liger | fusedlm | fusedlm exact |",
                           "|---|---|---|---|---|---|---|---|"]
    # Runs since session 18 also time a frozen classifier (LoRA: only dE), ms (extra MiB).
    frozen_rows = []
    for (case, regime), m in t.items():
        if ("fusedlm", "fwd+bwd_frozen_c") not in m:
            continue
        cells = [f"{m[(k, 'fwd+bwd_frozen_c')]:.1f} ({mem[(case, regime)][(k, 'fwd+bwd_frozen_c')]:.0f})"
                 if (k, "fwd+bwd_frozen_c") in m else "–"
                 for k in ("torch_compile", "apple_cce", "liger", "fusedlm", "fusedlm_exact")]
        frozen_rows.append(f"| {case} | {regime} | {m[('cublas_gemm', 'gemm')]:.1f} | " + " | ".join(cells) + " |")
    if frozen_rows:
        frozen_rows[:0] = ["", "Frozen classifier (gradient of e only), fwd+bwd ms (extra MiB beyond the gradient):",
                           "", "| shape | regime | GEMM | torch.compile | apple CCE | Liger | fusedlm | fusedlm exact |",
                           "|---|---|---|---|---|---|---|---|"]
    for (case, regime), m in t.items():
        gemm = m[("cublas_gemm", "gemm")]
        out.append(f"| {case} | {regime} | {gemm:.1f} | {pair(m, 'torch_compile')} | {pair(m, 'apple_cce')} | "
                   f"{pair(m, 'liger')} | {pair(m, 'fusedlm')} | {m[('fusedlm_exact', 'fwd+bwd')]:.1f} |")
        fwd = m[("fusedlm", "fwd")] / gemm
        alt = m.get(("fusedlm", "fwd_interleaved"))
        alt_ratio = alt / m[("fusedlm", "gemm_interleaved")] if alt is not None else None
        peers = [m[(k, "fwd+bwd")] for k in ("torch_compile", "apple_cce") if (k, "fwd+bwd") in m]
        fb = m[("fusedlm", "fwd+bwd")] / min(peers) if peers else float("nan")
        if len(peers) < 2:
            print(f"warning: {case} {regime}: the fwd+bwd bar's min() has {len(peers)} of its 2 peers", file=sys.stderr)
        exact = m[("fusedlm_exact", "fwd+bwd")] / gemm
        # (runs since session 6 also time the exact fwd+bwd alternating with the GEMM)
        exact_alt = ratios.get((case, regime, "fusedlm_exact", "fwd+bwd_interleaved"))
        ok = lambda x, limit: (  # noqa: E731
            "missing" if x != x else f"{x:.2f} {'met' if x <= limit else 'NOT met'}")
        # Sustained-load ratios, when the run has them (" \\| x" after the other ratios).
        steady = lambda x, limit: "" if x is None else f" \\| {ok(x, limit)}"  # noqa: E731
        fwd_s = ratios.get((case, regime, "fusedlm", "fwd_steady"))
        peers_s = [m[(k, "fwd+bwd_steady")] for k in ("torch_compile", "apple_cce") if (k, "fwd+bwd_steady") in m]
        fb_s = m[("fusedlm", "fwd+bwd_steady")] / min(peers_s) if peers_s and ("fusedlm", "fwd+bwd_steady") in m else None
        exact_s = ratios.get((case, regime, "fusedlm_exact", "fwd+bwd_steady"))
        alt_txt = f"; {ok(alt_ratio, 1.10)}" if alt_ratio is not None else ""
        dense_floor = 4 * gemm / (0.9 * min(peers)) if peers else float("nan")
        exact_txt = ok(exact, 4.4) + (f"; {ok(exact_alt, 4.4)}" if exact_alt is not None else "") + steady(exact_s, 4.4)
        # Memory bars (MB = 10^6 bytes): the forward's extra memory (a forward without
        # gradients, "loss only": with them it also keeps the N x V/256 tile maxima for the
        # backward) against 8 MB + 8 bytes per token; fwd+bwd's beyond the gradients against
        # 256 MB at the Gemma shape (only there).
        tokens = int(case.split("x")[0])
        fwd_mib, fb_mib = mem[(case, regime)][("fusedlm", "fwd")], mem[(case, regime)][("fusedlm", "fwd+bwd")]
        fwd_mem = ok(fwd_mib, (8e6 + 8 * tokens) / 2**20)
        fb_mem = ok(fb_mib, 256e6 / 2**20) if case == "8192x2304x256000" else f"{fb_mib:.2f}"
        bars.append(f"| {case} | {regime} | {ok(fwd, 1.10)}{alt_txt}{steady(fwd_s, 1.10)} | {ok(fb, 0.90)}"
                    f"{steady(fb_s, 0.90)} | {exact_txt} | {fwd_mem} | {fb_mem} | {dense_floor:.2f} |")
    return out + steady_rows + frozen_rows, bars


def _us(m, method, p="sample_graph20"):
    """One case's time of (method, pass) in µs, or – when that row is absent."""
    return "–" if (method, p) not in m else f"{m[(method, p)][0] * 1e3:.1f}"


def sampling_tables(rows):
    t = defaultdict(dict)  # (V, dtype, B) -> (method, pass) -> (ms, ratio)
    for r in rows:
        if r["suite"] != "sampling" or not r["case"].startswith("B"):
            continue
        b, v = r["case"][1:].split("xV")
        t[(int(v), r["dtype"], int(b))][(r["method"], r["pass"])] = (float(r["time_ms"]), float(r["ratio"]))
    # The bars are judged on sample_step (runs since session 21): a graph of 20 decode-like
    # steps, each a copy that writes the logits then the call, less the copies alone. Older runs
    # have only sample_graph20 (20 back-to-back calls, where each call's kernels can become
    # resident during the previous call's tail): they are judged on it.
    out = ["| V | dtype | B | graph, 1 call (× floor) | graph, 20 calls: per call (× floor) | decode-like step "
           "(× floor) | with log-probs, as judged (× floor) | torch amax, as judged (× floor) | torch "
           "softmax+multinomial eager | bar (judged on the step, else the graph of 20) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for (v, dtype, b), m in sorted(t.items()):
        def cell(method, p):
            x = m.get((method, p))
            return "–" if x is None else f"{x[0] * 1e3:.1f} ({x[1]:.2f}×)"
        judged = "sample_step" if ("fusedlm", "sample_step") in m else "sample_graph20"
        x = m.get(("fusedlm", judged))
        how = "" if judged == "sample_step" else " (graph of 20)"
        if x is None:  # (a capture that failed)
            bar = "n/a" if b == 1 or b >= 64 else ""
        elif b == 1:  # judged per call; one call per replay adds the replay latency
            bar = "≤ 15 µs: " + ("met" if x[0] * 1e3 <= 15 else "NOT met") + how
        elif b >= 64:
            bar = "≤ 1.5× floor: " + ("met" if x[1] <= 1.5 else "NOT met") + how
        else:
            bar = ""
        out.append(f"| {v} | {dtype} | {b} | {cell('fusedlm', 'sample_graph')} | {cell('fusedlm', 'sample_graph20')} | "
                   f"{cell('fusedlm', 'sample_step')} | {cell('fusedlm_logprobs', judged)} | "
                   f"{cell('torch_amax_read', judged)} | "
                   f"{m[('torch_softmax_multinomial', 'sample')][0] * 1e3:.0f} µs | {bar} |")
    speed = t.get((128256, "fp32", 256), {})
    if ("fusedlm", "sample") in speed and ("torch_softmax_multinomial", "sample") in speed:
        x = speed[("torch_softmax_multinomial", "sample")][0] / speed[("fusedlm", "sample")][0]
        out.append(f"\nB = 256, V = 128256, fp32: {x:.1f}× faster than torch softmax + multinomial, both eager "
                   f"(bar ≥ 8×: {'met' if x >= 8 else 'NOT met'}).")
    if any(("fusedlm_top_p", "sample_graph20") in m for m in t.values()):
        out += ["", "Truncated sampling (top_p = 0.9 / top_k = 50; µs per call in a graph of 20, torch eager):", "",
                "| V | dtype | B | fusedlm | fusedlm top-p | fusedlm top-k | torch top-p (sort) |", "|---|---|---|---|---|---|---|"]
        for (v, dtype, b), m in sorted(t.items()):
            out.append(f"| {v} | {dtype} | {b} | {_us(m, 'fusedlm')} | {_us(m, 'fusedlm_top_p')} | "
                       f"{_us(m, 'fusedlm_top_k')} | {_us(m, 'torch_top_p_sort', 'sample')} |")
    if any(("flashinfer_softmax_sample", "sample_graph20") in m for m in t.values()):
        out += ["", "Against FlashInfer's kernels (its temperature softmax, then its sampler; 16-bit logits "
                "converted to float32 first; µs per call in a graph of 20):", "",
                "| V | dtype | B | fusedlm | FlashInfer softmax + sample | FlashInfer logits / tau + sample | "
                "fusedlm top-p | FlashInfer top-p | fusedlm top-k | FlashInfer top-k |", "|---|---|---|---|---|---|---|---|---|---|"]
        for (v, dtype, b), m in sorted(t.items()):
            cells = [_us(m, method) for method in ("fusedlm", "flashinfer_softmax_sample", "flashinfer_scaled_logits",
                                                   "fusedlm_top_p", "flashinfer_top_p", "fusedlm_top_k",
                                                   "flashinfer_top_k")]
            out.append(f"| {v} | {dtype} | {b} | " + " | ".join(cells) + " |")
    tiny = {r["pass"]: float(r["time_ms"]) * 1e3 for r in rows
            if r["suite"] == "sampling" and r["case"] == "one_element"}
    if tiny:
        out.append(f"\nA one-element kernel in the same run: {tiny.get('sample_graph', float('nan')):.1f} µs per "
                   f"graph replay, {tiny.get('sample_graph20', float('nan')):.1f} µs per call in a graph of 20.")
    return out, t


def model_table(rows):
    """A training step of whole models: ms and peak MiB over the weights per method."""
    steps = defaultdict(dict)
    for r in rows:
        if r["suite"] == "model":
            steps[r["case"]][r["method"]] = (float(r["time_ms"]), float(r["peak_extra_mib"]))
    methods = ["hf_eager", "fusedlm", "liger", "apple_cce", "hf_compile", "fusedlm_compile"]
    out = ["| model, tokens | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for case, m in steps.items():
        cells = [f"{m[k][0]:.1f} ms, {m[k][1]:.0f} MiB" if k in m else "–" for k in methods]
        out.append(f"| {case} | " + " | ".join(cells) + " |")
    return out if steps else []


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cce = defaultdict(dict)
    for r in rows:
        if r["suite"] == "cce" and r["pass"] in ("fwd", "fwd+bwd"):
            cce[(r["case"], r["regime"])][(r["method"], r["pass"])] = float(r["time_ms"])
    _, samp = sampling_tables(rows)
    # (a run of the sampling suite alone: the sampling panel only)
    fig, axes = plt.subplots(1, 2 if cce else 1, figsize=(15 if cce else 8, 5), squeeze=False)
    samp_ax = axes[0][-1]
    if cce:
        cce_ax = axes[0][0]
        methods = ["torch_compile", "apple_cce", "liger", "fusedlm", "fusedlm_exact"]
        cases = list(cce)
        for i, method in enumerate(methods):
            ys = [cce[k].get((method, "fwd+bwd"), 0) for k in cases]
            cce_ax.bar([j + i * 0.16 for j in range(len(cases))], ys, width=0.16, label=method)
        cce_ax.set_xticks([j + 0.32 for j in range(len(cases))])
        cce_ax.set_xticklabels([f"{c.replace('x', ' x ')}\n{r}" for c, r in cases], fontsize=7, rotation=12)
        cce_ax.set_ylabel("forward + backward, ms")
        cce_ax.set_title("CCE (bf16)")
        cce_ax.legend(fontsize=8)
    for (v, dtype) in sorted({(v, d) for v, d, _ in samp}):
        bs = sorted(b for vv, d, b in samp if (vv, d) == (v, dtype))
        ys = [samp[(v, dtype, b)].get(("fusedlm", "sample_step"),
                                      samp[(v, dtype, b)].get(("fusedlm", "sample_graph20"), (0, float("nan"))))[1]
              for b in bs]
        samp_ax.plot(bs, ys, marker="o", label=f"V={v} {dtype}")
    samp_ax.axhline(1.5, color="gray", linestyle="--", label="bar: 1.5× floor")
    samp_ax.set_xscale("log", base=2)
    samp_ax.set_yscale("log")
    samp_ax.set_xlabel("batch B")
    samp_ax.set_ylabel("time per call ÷ memory floor (decode-like graph steps)")
    samp_ax.set_title("fusedlm.sample")
    samp_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv")
    parser.add_argument("--plot", help="write a PNG with the CCE and sampling results")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.csv):
        parser.error(f"no such file: {args.csv}")
    rows = load(args.csv)
    if rows and not {"suite", "case", "method", "pass", "time_ms", "gpu"} <= rows[0].keys():
        parser.error(f"{args.csv} is not a bench/run.py CSV (its columns: {list(rows[0])})")
    gpu = rows[0]["gpu"] if rows else "?"
    print(f"# {args.csv} ({gpu})")
    if any(r["suite"] == "cce" for r in rows):  # (a run of the sampling suite alone has none)
        table, bars = cce_tables(rows)
        print("\n## CCE, ms (forward / forward+backward)\n\n" + "\n".join(table) +
              "\n\n## CCE bars (issue #4)\n\n" + "\n".join(bars))
    print("\n## Sampling, µs per call\n\n" + "\n".join(sampling_tables(rows)[0]))
    models = model_table(rows)
    if models:
        print("\n## Training step of a whole model (forward + backward, bf16; peak memory over the "
              "weights, gradients included)\n\n" + "\n".join(models))
    if args.plot:
        plot(rows, args.plot)
        print(f"\nwrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
