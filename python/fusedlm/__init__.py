"""fusedlm: fused kernels for Cut Cross-Entropy, adaptive temperature sampling and
attention transfer.

    >>> import torch, fusedlm
    >>> e = torch.randn(8, 16, requires_grad=True)       # hidden states [N, D]
    >>> c = torch.randn(100, 16, requires_grad=True)     # classifier [V, D]
    >>> y = torch.randint(0, 100, (8,))
    >>> loss = fusedlm.linear_cross_entropy(e, c, y)     # no [N, V] logits in memory
    >>> loss.backward()
"""
import torch

try:
    from . import _C  # noqa: F401  registers torch.ops.fusedlm.*
except ImportError as err:  # pragma: no cover - only on a broken install
    raise ImportError(
        "fusedlm's compiled extension (fusedlm._C) is missing or does not load: build it with "
        "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace` "
        f"against the installed torch {torch.__version__}. Original error: {err}"
    ) from err

from . import _ops  # noqa: F401,E402  fake (meta) implementations for torch.compile
from .cce import linear_cross_entropy, LinearCrossEntropy  # noqa: E402
from .sampling import sample, temperature_logprobs  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "linear_cross_entropy",
    "LinearCrossEntropy",
    "sample",
    "temperature_logprobs",
    "cuda_available",
    "__version__",
]


def cuda_available() -> bool:
    """True when the extension was compiled with its CUDA kernels (a CUDA GPU is still
    needed to run them: see ``torch.cuda.is_available()``)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fusedlm::cce_forward", "CUDA")
