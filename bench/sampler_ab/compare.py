"""What changed between sampler builds made by build.sh, here, without a GPU: per function, the
registers, stack and spills from the ptxas reports (DIR/NAME.log), and per kernel the SASS
(cuobjdump of DIR/NAME.so) with addresses, branch targets and the file's hash in names left
out, so that only real changes in the machine code remain.

    python bench/sampler_ab/compare.py DIR main x [y ...]          # ptxas reports
    python bench/sampler_ab/compare.py DIR main x --sass           # and the kernels' SASS

A kernel's SASS includes the out-of-line functions it calls, so a change to one of those
shows in every caller; the "changed" column counts differing instruction runs (difflib), a
rough size of the change.
"""
import argparse
import difflib
import os
import re
import shutil
import subprocess
import sys

_HASHED = re.compile(r"_(?:INTERNAL|GLOBAL__N_)_[0-9a-f]+_\d+_\w+?_[0-9a-f]{8}")


def ptxas_report(text):
    """{mangled function: {"regs": n, "stack": b, "spill_stores": b, "spill_loads": b}}."""
    out, current = {}, None
    for line in text.splitlines():
        m = re.search(r"Function properties for (\S+)", line) or re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            current = m.group(1)
            out.setdefault(current, {})
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            out[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            out[current]["regs"] = int(m.group(1))
    return out


def sass_functions(text):
    """{mangled function: [normalised instructions]} from cuobjdump -sass output."""
    out, current = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = m.group(1)
            out[current] = []
            continue
        if current is None or not re.match(r"\s*/\*[0-9a-f]{4,}\*/", line):  # instructions only
            continue
        ins = re.sub(r"/\*.*?\*/", "", line)  # addresses and encodings
        ins = _HASHED.sub("_H_", ins)
        ins = re.sub(r"0x[0-9a-f]+", "0x_", ins)  # branch targets, offsets
        out[current].append(" ".join(ins.strip("{} ").split()))
    return out


def readable(names):
    """Demangled, shortened names (c++filt when it is here)."""
    names = list(names)
    if shutil.which("c++filt"):
        names = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    short = []
    for n in names:
        n = _HASHED.sub("", n)
        n = re.sub(r"\(anonymous namespace\)::|fusedlm::sampling_cuda::|::", " ", n)
        short.append(" ".join(re.sub(r"\(.*", "", n).split()))
    return short


def changed_runs(a, b):
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    return sum(op != "equal" for op, *_ in ops)


def stable_names(per_build):
    """The builds' dicts keyed by names without the file hash (which may differ between
    builds), and a real name for each key (to demangle)."""
    keyed = [{_HASHED.sub("_H_", n): v for n, v in d.items()} for d in per_build]
    real = {}
    for d in per_build:
        for n in d:
            real.setdefault(_HASHED.sub("_H_", n), n)
    return keyed, real


def compare_reports(reports, builds):
    lines = []
    reports, real = stable_names(reports)
    names = sorted(real)
    for name, label in zip(names, readable(real[n] for n in names)):
        values = [r.get(name) for r in reports]
        if len({str(v) for v in values}) > 1:
            cells = ["-" if v is None else (f"{v['regs']} regs, " if "regs" in v else "") +
                     f"{v.get('stack', 0)}/{v.get('spill_stores', 0)}/{v.get('spill_loads', 0)}" for v in values]
            lines.append(f"{label[:110]}\n    " + "  ".join(f"{b}: {c}" for b, c in zip(builds, cells)))
    return lines


def compare_sass(functions, builds):
    lines = []
    functions, real = stable_names(functions)
    base = functions[0]
    names = [n for n in base if any(f.get(n) != base[n] for f in functions[1:])]
    for name, label in zip(names, readable(real[n] for n in names)):
        cells = [f"{b}: {len(f.get(name, []))} ins, {changed_runs(base[name], f.get(name, []))} changed"
                 for b, f in zip(builds[1:], functions[1:])]
        lines.append(f"{label[:110]}\n    {builds[0]}: {len(base[name])} ins  " + "  ".join(cells))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="build.sh's output folder")
    parser.add_argument("builds", nargs="+", help="NAME ... (the first is the baseline)")
    parser.add_argument("--sass", action="store_true", help="also compare the kernels' SASS (cuobjdump)")
    parser.add_argument("--cuobjdump", default=shutil.which("cuobjdump") or "cuobjdump")
    args = parser.parse_args(argv)
    if len(args.builds) < 2:
        parser.error("name a baseline and at least one build")
    reports = [ptxas_report(open(os.path.join(args.dir, f"{b}.log")).read()) for b in args.builds]
    lines = compare_reports(reports, args.builds)
    print("ptxas (registers, stack / spill stores / spill loads in bytes), functions that differ:")
    print("\n".join(lines) if lines else "    none")
    if args.sass:
        dumps = [subprocess.run([args.cuobjdump, "-sass", os.path.join(args.dir, f"{b}.so")], capture_output=True,
                                text=True, check=True).stdout for b in args.builds]
        kernels = [{n: ins for n, ins in sass_functions(d).items() if "kernel" in n} for d in dumps]
        lines = compare_sass(kernels, args.builds)
        print("SASS of the kernels that differ from the baseline:")
        print("\n".join(lines) if lines else "    none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
