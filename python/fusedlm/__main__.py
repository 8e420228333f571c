"""Command line: ``python -m fusedlm {info,demo,lpo}``."""
import sys

import torch


def info() -> int:
    import fusedlm

    print(f"fusedlm {fusedlm.__version__} | torch {torch.__version__}")
    print(f"CUDA kernels built: {fusedlm.cuda_available()}")
    print(f"CUDA device visible: {torch.cuda.is_available()}"
          + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
    if fusedlm.cuda_available() and torch.cuda.is_available():
        from . import _C

        sampling, cce = _C.hopper_paths()  # (needs this build's sm_90 / sm_90a code on an sm_90 GPU)
        print(f"Hopper paths on this device: sampling clusters and PDL {sampling}, CCE wgmma {cce}")
    return 0


def _info_command(rest) -> int:
    if rest in (["-h"], ["--help"]):
        print("usage: python -m fusedlm info\n  what was built and which device is visible")
        return 0
    if rest:
        print(f"python -m fusedlm info takes no arguments, got {rest}")
        return 2
    return info()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"info": _info_command, "demo": None, "lpo": None}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: python -m fusedlm {info,demo,lpo} [options]\n"
              "  info   what was built and which device is visible\n"
              "  demo   offline demonstrations (add --quick for the small CPU setting)\n"
              "  lpo    train an adaptive-decoding head with LPO (see fusedlm.adaptive)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if argv[0] == "lpo":
        try:
            from .adaptive.cli import main as lpo_main
        except ModuleNotFoundError:
            print("fusedlm.adaptive is not available in this build")
            return 2
        return lpo_main(argv[1:])
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
