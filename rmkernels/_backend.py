"""Backend selection.

Every public function takes ``backend=None``: one of ``"reference"`` (pure PyTorch, always
available), ``"cpu"`` (C++), ``"cuda"`` (CUDA C++), ``"triton"``, or ``None``/``"auto"``
for the fastest available one for the tensors' device. The default comes from
``rmk.use_backend(name)`` (innermost wins), else the ``RMKERNELS_BACKEND`` environment
variable, else ``"auto"``.
"""
import contextlib
import functools
import importlib.util
import os

import torch

from rmkernels import _ext

BACKENDS = ("reference", "cpu", "cuda", "triton")
_AUTO = ("auto", None)

_override_stack = []  # set by use_backend


def _probe_triton():
    """(installed, why not) for the Triton backend, found without importing triton."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton==3.6.0)"
    return True, ""


@functools.lru_cache(maxsize=None)
def _interpreter_problem():
    """Why the Triton interpreter cannot run here, or None: triton 3.6's interpreter calls
    int() on 1-element numpy arrays, which numpy >= 2.4 refuses (every kernel fails)."""
    from importlib import metadata

    try:
        triton_v, numpy_v = metadata.version("triton"), metadata.version("numpy")
    except metadata.PackageNotFoundError:
        return None
    major_minor = lambda v: tuple(int(x) for x in v.split(".")[:2] if x.isdigit())
    if major_minor(triton_v) == (3, 6) and major_minor(numpy_v) >= (2, 4):
        return (f"triton {triton_v}'s interpreter (TRITON_INTERPRET=1) needs numpy < 2.4, numpy {numpy_v} is "
                f"installed (pip install 'numpy<2.4')")
    return None


_TRITON_INSTALLED, _TRITON_WHY = _probe_triton()


def triton_interpreting():
    """True under the Triton interpreter (TRITON_INTERPRET=1, which must be set before triton
    is imported): Triton programs run one after the other on CPU tensors, through numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_name(name, what):
    if name in _AUTO:
        return None
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS} or 'auto'/None, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name):
    """Context manager that sets the default backend of every rmkernels op inside it."""
    _check_name(name, "use_backend(name)")
    _override_stack.append(name)
    try:
        yield
    finally:
        _override_stack.pop()


def default_backend():
    if _override_stack:
        return _override_stack[-1]
    return os.environ.get("RMKERNELS_BACKEND") or "auto"


def _why_not(name, device_type):
    """Why backend `name` cannot run on `device_type` tensors, or None if it can."""
    if name == "reference":
        return None
    if name == "cpu":
        if not _ext.CPP_AVAILABLE:
            return f"the C++ extension is not loaded ({_ext.LOAD_ERROR})"
        if device_type != "cpu":
            return f"it runs on CPU tensors, the tensors are on {device_type}"
        return None
    if name == "cuda":
        if not _ext.CPP_AVAILABLE:
            return f"the C++ extension is not loaded ({_ext.LOAD_ERROR})"
        if not _ext.CUDA_BUILT:
            return "the extension was built without CUDA (CPU-only torch, no nvcc, or RMKERNELS_SKIP_CUDA_BUILD)"
        if device_type != "cuda":
            return f"it runs on CUDA tensors, the tensors are on {device_type}"
        return None
    if name == "triton":
        if not _TRITON_INSTALLED:
            if device_type != "cuda" and not triton_interpreting():
                return f"{_TRITON_WHY}, and on {device_type} tensors it runs only under TRITON_INTERPRET=1"
            return _TRITON_WHY
        if device_type == "cuda":
            return None
        if device_type == "cpu" and triton_interpreting():
            return _interpreter_problem()
        return (f"it runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1), "
                f"the tensors are on {device_type}")
    return f"unknown backend {name!r}"


def available_backends(device="cpu"):
    """The backends that can run on tensors of `device` here, fastest first."""
    device_type = torch.device(device).type
    order = ("cuda", "triton", "cpu", "reference") if device_type == "cuda" else ("cpu", "triton", "reference")
    return [b for b in order if _why_not(b, device_type) is None]


def backend_report(device="cpu"):
    """{backend: None if available else the reason} for tensors of `device`."""
    device_type = torch.device(device).type
    return {b: _why_not(b, device_type) for b in BACKENDS}


def resolve(backend, device):
    """The backend to run for tensors on `device`, given the user's `backend` argument.

    Raises RuntimeError naming the available backends and why the others are not, when the
    requested one cannot run.
    """
    name = _check_name(backend, "backend")
    if name is None:  # None and "auto" alike: the default, itself auto unless set
        name = _check_name(default_backend(), "the default backend (use_backend / RMKERNELS_BACKEND)")
    device_type = device.type
    if name is None:  # auto: the fastest available; triton under the interpreter is never auto
        if device_type == "cuda":
            for b in ("cuda", "triton"):
                if _why_not(b, device_type) is None:
                    return b
        elif device_type == "cpu" and _ext.CPP_AVAILABLE:
            return "cpu"
        return "reference"
    why = _why_not(name, device_type)
    if why is not None:
        report = backend_report(device)
        avail = available_backends(device)
        others = "; ".join(f"{b}: {w}" for b, w in report.items() if w is not None and b != name)
        raise RuntimeError(
            f"rmkernels backend {name!r} is not available for {device_type} tensors: {why}. "
            f"Available: {', '.join(avail)}." + (f" Not available either: {others}." if others else "")
        )
    return name
