"""Loading of the compiled extension ``rmkernels._C``.

The op schemas are defined in Python (:mod:`rmkernels._library`), so every op exists
without the extension; ``_C`` only registers the C++ CPU and CUDA implementations. A
missing or broken ``_C`` leaves the ``reference`` and ``triton`` backends working and
warns once, saying why.
"""
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
    LOAD_ERROR = f"{type(e).__name__}: {e}"
    warnings.warn(
        "rmkernels: the compiled extension rmkernels._C could not be loaded "
        f"({LOAD_ERROR}); the 'cpu' and 'cuda' backends are unavailable, the 'reference' "
        "and 'triton' backends work. Rebuild with `pip install --no-build-isolation .` "
        "to get them.",
        RuntimeWarning,
        stacklevel=2,
    )
