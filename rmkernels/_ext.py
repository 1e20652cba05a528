"""Loading of the compiled extension ``rmkernels._C``.

The op schemas are defined in Python (:mod:`rmkernels._library`), so every op exists
without the extension; ``_C`` only registers the C++ CPU and CUDA implementations. A
missing or broken ``_C`` leaves the ``reference`` and ``triton`` backends working and
warns once, saying why.
"""
import os
import warnings

import torch  # noqa: F401  (_C links against libtorch: load it first)

CPP_AVAILABLE = False  # the C++ CPU kernels are registered
CUDA_BUILT = False  # the CUDA kernels are registered
CUDA_ARCHS = ""
CPU_ISA = ""  # the variant of the C++ CPU loop kernels in use (csrc/include/rmkernels/cpu_simd.h)
LOAD_ERROR = None  # why _C is not there, as a string

try:
    from rmkernels import _C  # noqa: F401  (registers the kernels as a side effect)

    CPP_AVAILABLE = True
    CUDA_BUILT = bool(_C.WITH_CUDA)
    CUDA_ARCHS = _C.CUDA_ARCHS
    CPU_ISA = _C.CPU_ISA
except ImportError as e:  # not built (no compiler, RMKERNELS_BUILD_EXT=0) or a failed load
    import importlib.util

    try:
        no_file = importlib.util.find_spec("rmkernels._C") is None
    except (ImportError, ValueError):  # a finder refused it: its message is the reason
        no_file = False
    if no_file:
        # No file to load: Python's own message would be "cannot import name '_C' from
        # partially initialized module ... (most likely due to a circular import)".
        try:
            from rmkernels._build_config import BUILD_CONFIG

            built = BUILD_CONFIG.get("cpp", True)
        except ImportError:
            built = True
        LOAD_ERROR = ("rmkernels was installed without it (RMKERNELS_BUILD_EXT=0)" if not built else
                      "no rmkernels._C file is installed next to the package")
    else:
        LOAD_ERROR = f"{type(e).__name__}: {e}"
    triton_here = importlib.util.find_spec("triton") is not None
    warnings.warn(
        "rmkernels: the compiled extension rmkernels._C could not be loaded "
        f"({LOAD_ERROR}); the 'cpu' and 'cuda' backends are unavailable, the 'reference' "
        + ("and 'triton' backends work" if triton_here else "backend works ('triton' too once triton is installed)")
        + ". Rebuild with `pip install --no-build-isolation .` to get them.",
        RuntimeWarning,
        stacklevel=2,
    )

# RMKERNELS_CPU_ISA's values (csrc/cpu/simd.cpp reads it when the first C++ CPU kernel runs and
# ignores any other value): said here, once, rather than ignored silently.
CPU_ISA_CAPS = ("base", "v3", "v4")  # v4: no cap below AVX-512
_cap = os.environ.get("RMKERNELS_CPU_ISA")
if _cap and _cap not in CPU_ISA_CAPS:
    warnings.warn(f"rmkernels: RMKERNELS_CPU_ISA={_cap!r} is not one of {', '.join(CPU_ISA_CAPS)}: ignored (the C++ "
                  f"CPU kernels use the best variant this CPU runs)", RuntimeWarning, stacklevel=2)
