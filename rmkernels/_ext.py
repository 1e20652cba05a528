"""Loading of the compiled extension ``rmkernels._C``.

The op schemas are defined in Python (:mod:`rmkernels._library`), so every op exists
without the extension; ``_C`` only registers the C++ CPU and CUDA implementations. A
missing or broken ``_C`` leaves the ``reference`` and ``triton`` backends working and
warns once, saying why.
"""
import importlib.machinery
import os
import sys
import warnings

import torch  # noqa: F401  (_C links against libtorch: load it first)

CPP_AVAILABLE = False  # the C++ CPU kernels are registered
CUDA_BUILT = False  # the CUDA kernels are registered
CUDA_ARCHS = ""
CPU_ISA = ""  # the variant of the C++ CPU loop kernels in use (csrc/include/rmkernels/cpu_simd.h)
LOAD_ERROR = None  # why _C is not there, as a string
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))  # where this rmkernels was imported from


def _source_checkout(package_dir):
    """The source checkout (a folder with setup.py and csrc/) that ``package_dir`` is the
    ``rmkernels`` folder of, or None."""
    root = os.path.dirname(os.path.abspath(package_dir))
    if os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "csrc")):
        return root
    return None


def _has_extension_file(package_dir):
    try:
        names = os.listdir(package_dir)
    except OSError:
        return False
    return any(n.startswith("_C.") and n.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)) for n in names)


def _other_copy(package_dir, search_path):
    """Another ``rmkernels`` package on ``search_path`` (sys.path: site-packages, where a
    non-editable install puts it) than the one in ``package_dir``: the first that has a built
    _C, else the first at all; None if there is none. Another checkout without _C is no
    installed copy."""
    here = os.path.realpath(package_dir)
    found = []
    for entry in search_path:
        if not isinstance(entry, str):
            continue
        candidate = os.path.join(os.path.abspath(entry or os.getcwd()), "rmkernels")
        if (os.path.realpath(candidate) != here and os.path.isfile(os.path.join(candidate, "__init__.py"))
                and (_source_checkout(candidate) is None or _has_extension_file(candidate))):
            found.append(candidate)
    return next((c for c in found if _has_extension_file(c)), found[0] if found else None)


def _checkout_reason(checkout, package_dir, search_path):
    """(why _C is missing, what to do) when rmkernels was imported from the source checkout
    ``checkout``, where no _C file is built. A non-editable install (`pip install .` in the
    checkout) puts the built _C in site-packages only; run from the checkout, the checkout's
    rmkernels/ comes first on sys.path and is what gets imported."""
    why = f"rmkernels was imported from the source checkout {package_dir}, where no rmkernels._C is built"
    other = _other_copy(package_dir, search_path)
    if other is not None:
        why += (f"; it shadows the rmkernels installed in {os.path.dirname(other)}"
                + (", which has its _C" if _has_extension_file(other) else " (which has no _C either)")
                + ", because the current directory (or PYTHONPATH) comes first on sys.path")
        todo = ("Run from another directory to use the installed copy, or build _C in the checkout with "
                "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`) in "
                f"{checkout}.")
    else:
        todo = ("Build _C in the checkout with `pip install --no-build-isolation -e .` (or `python setup.py "
                f"build_ext --inplace`) in {checkout}.")
    return why, todo


# The checkout PACKAGE_DIR is in (setup.py and csrc/ beside it), or None for an installed package.
SOURCE_CHECKOUT = _source_checkout(PACKAGE_DIR)

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
    todo = "Rebuild with `pip install --no-build-isolation .` to get them."
    if no_file:
        # No file to load: Python's own message would be "cannot import name '_C' from
        # partially initialized module ... (most likely due to a circular import)".
        try:
            from rmkernels._build_config import BUILD_CONFIG

            built = BUILD_CONFIG.get("cpp", True)
        except ImportError:
            built = True
        if SOURCE_CHECKOUT is not None:
            # setup.py writes _build_config.py into the checkout for any build, also a non-editable
            # install's, whose _C went to site-packages: "installed without it" would be wrong here.
            LOAD_ERROR, todo = _checkout_reason(SOURCE_CHECKOUT, PACKAGE_DIR, sys.path)
        elif not built:
            LOAD_ERROR = "rmkernels was installed without it (RMKERNELS_BUILD_EXT=0)"
        else:
            LOAD_ERROR = "no rmkernels._C file is installed next to the package"
    else:
        LOAD_ERROR = f"{type(e).__name__}: {e}"
    triton_here = importlib.util.find_spec("triton") is not None
    warnings.warn(
        "rmkernels: the compiled extension rmkernels._C could not be loaded "
        f"({LOAD_ERROR}); the 'cpu' and 'cuda' backends are unavailable, the 'reference' "
        + ("and 'triton' backends work" if triton_here else "backend works ('triton' too once triton is installed)")
        + ". " + todo,
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
