"""``python -m rmkernels.info``: what this installation was built with and can run."""
import platform
import sys


def info():
    import torch

    import rmkernels as rmk
    from rmkernels import _backend, _ext

    try:
        from rmkernels._build_config import BUILD_CONFIG
    except ImportError:
        BUILD_CONFIG = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    lines = [
        f"rmkernels {rmk.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"triton {triton_version}",
        f"imported from: {_ext.PACKAGE_DIR}" + (" (a source checkout)" if _ext.SOURCE_CHECKOUT else ""),
        f"build config (setup.py): {BUILD_CONFIG}" + (
            " (setup.py's last build from this checkout; its _C is not here: a non-editable install puts it in "
            "site-packages)" if _ext.SOURCE_CHECKOUT and not _ext.CPP_AVAILABLE and BUILD_CONFIG else ""),
        f"extension _C loaded: {_ext.CPP_AVAILABLE}" + (f" ({_ext.LOAD_ERROR})" if _ext.LOAD_ERROR else ""),
        f"C++ CPU loop kernels: {_ext.CPU_ISA or 'none'} (RMKERNELS_CPU_ISA=base|v3 caps it)",
        _huge_pages_line(_ext),
        f"CUDA kernels built: {_ext.CUDA_BUILT}" + (f", archs {_ext.CUDA_ARCHS}" if _ext.CUDA_BUILT else ""),
        f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
    ]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        lines.append(f"backends for {dev} tensors (fastest first): {', '.join(_backend.available_backends(dev))}")
        for name, why in _backend.backend_report(dev).items():
            if why is not None:
                if _ext.LOAD_ERROR and f"({_ext.LOAD_ERROR})" in why:  # said once, on the "_C loaded" line
                    why = why.replace(f"({_ext.LOAD_ERROR})", "(why: above)")
                lines.append(f"  {name}: unavailable: {why}")
    return "\n".join(lines)


def _huge_pages_line(_ext):
    """Whether the C++ CPU kernels write their fresh [B, T] outputs (and pooling's gradient of the
    hidden states) in huge pages (csrc/cpu/memory.cpp)."""
    huge = getattr(_ext._C, "huge_pages", None) if _ext.CPP_AVAILABLE else None
    if huge is None:
        return "C++ CPU outputs in huge pages: no (no C++ kernels)"
    size, why = huge()
    if size:
        return (f"C++ CPU outputs in huge pages: yes, {size >> 20} MiB pages while a fresh [B, T] output "
                "or pooling's [B, T, H] gradient is written "
                "(RMKERNELS_HUGE_PAGES=0 turns it off)")
    return f"C++ CPU outputs in huge pages: no ({why})"


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m rmkernels.info",
        description="Print what this rmkernels installation was built with (setup.py's build config, the C++ "
                    "extension, its CPU loop variants and CUDA archs) and which backends can run here, for CPU "
                    "and (when there is a GPU) CUDA tensors, with the reason for each one that cannot.")
    parser.parse_args(argv)
    print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
