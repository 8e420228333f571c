"""Build fusedlm._C.

A CUDAExtension when torch is a CUDA build and a CUDA toolkit (nvcc) is found, else a
CPU-only CppExtension. Overrides (first match wins):
  FUSEDLM_CPU_ONLY=1    never compile CUDA sources
  FUSEDLM_FORCE_CUDA=1  compile CUDA sources or fail loudly
TORCH_CUDA_ARCH_LIST picks the GPU targets (default "8.0;9.0a": A100-class and Hopper with
wgmma); MAX_JOBS is capped by cores and memory. Never decides by torch.cuda.is_available():
build machines often have no GPU.
"""
import glob
import os
import shutil
import sys


def _guess_cuda_home():
    """torch guesses CUDA_HOME as dirname(dirname(which nvcc)); a wrapper nvcc in
    /usr/local/bin then yields /usr/local, which has no headers. Pick a real toolkit before
    torch.utils.cpp_extension reads CUDA_HOME at import."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")) and os.path.exists(
            os.path.join(home, "bin", "nvcc")
        ):
            os.environ["CUDA_HOME"] = home
            return


def _cap_max_jobs():
    """Each nvcc/g++ job on torch headers wants ~1.5-2.5 GB: cap by cores and memory."""
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    cap = max(1, min(cores, int(mem_gb // 2.5)))
    asked = int(os.environ.get("MAX_JOBS", cap))
    os.environ["MAX_JOBS"] = str(max(1, min(asked, cap)))


_guess_cuda_home()
_cap_max_jobs()

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def want_cuda():
    if _flag("FUSEDLM_CPU_ONLY"):
        return False, "FUSEDLM_CPU_ONLY set"
    if _flag("FUSEDLM_FORCE_CUDA"):
        if torch.version.cuda is None or CUDA_HOME is None:
            raise RuntimeError(
                f"FUSEDLM_FORCE_CUDA=1 but torch {torch.__version__} has no CUDA or no toolkit "
                f"was found (CUDA_HOME={CUDA_HOME})"
            )
        return True, "FUSEDLM_FORCE_CUDA set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit (nvcc) found"
    return True, f"torch CUDA {torch.version.cuda}, toolkit at {CUDA_HOME}"


def nvidia_wheel_include_dirs():
    """Headers from the nvidia-* wheels a CUDA torch pulls in (a slim toolkit may lack them)."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = set()
    for base in nvidia.__path__:
        dirs.update(glob.glob(os.path.join(base, "*", "include")))
    return sorted(d for d in dirs if os.path.isdir(d))


def link_args():
    """A C++ compiler that finds only libstdc++.a (e.g. a g++ whose libstdc++.so is not on its
    search path) links a second copy of libstdc++ into the extension. Its symbols must stay
    local: exported, some bind to the copy torch loaded and some to ours, and formatting a
    number (any error message with a number in it) then crashes the process (seen on an
    Ubuntu 24.04 machine with such a g++: a 5-line torch extension segfaulted the same way)."""
    return ["-Wl,--exclude-libs,ALL"] if sys.platform.startswith("linux") else []


def get_extensions():
    use_cuda, why = want_cuda()
    print(f"[fusedlm] building {'CUDA' if use_cuda else 'CPU-only'} extension: {why}")
    debug = _flag("FUSEDLM_DEBUG")
    sources = ["csrc/ops.cpp"]
    extra = {
        # Python's CFLAGS carry -g, which doubles compile time of torch headers.
        "cxx": ["-O0", "-g"] if debug else ["-O3", "-g0"],
        "nvcc": [
            "-O3",
            "-lineinfo",
            "-std=c++17",
            "--expt-relaxed-constexpr",
            "-Xptxas=-v" if _flag("FUSEDLM_PTXAS_VERBOSE") else "-Xptxas=-O3",
        ],
    }
    ext_cls = CppExtension
    if use_cuda:
        # Without a visible GPU torch cannot guess the targets (and crashes): set them.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        if "9.0a" in os.environ["TORCH_CUDA_ARCH_LIST"]:
            # sm_90a code (wgmma) is compiled: let the host pick the Hopper main loop on sm_90.
            extra["nvcc"].append("-DFUSEDLM_HAS_SM90A")
        ext_cls = CUDAExtension
        sources += ["csrc/ops_cuda.cpp"] + sorted(glob.glob("csrc/*/*.cu"))
        extra["cxx"].append("-DFUSEDLM_WITH_CUDA")
    else:
        del extra["nvcc"]
    ext = ext_cls(
        "fusedlm._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra,
        extra_link_args=link_args(),
        py_limited_api=True,
    )
    if use_cuda:
        ext.include_dirs.extend(nvidia_wheel_include_dirs())
    return [ext]


setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
