"""Argument validation shared by the ops: every error names the argument, what was
expected and what was given, and is raised before any kernel runs.

``checks(True)`` / ``RMKERNELS_CHECK=1`` also turns on the data-dependent checks that need
a device-to-host copy on a GPU (rows with no valid token, malformed lengths/cu_seqlens).
Those always run for CPU tensors, and never while ``torch.compile`` traces.
"""
import numbers
import operator
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)

_checks_override = []


class checks:
    """``rmk.checks(True)`` turns the data checks on for GPU tensors; usable as a context
    manager (``with rmk.checks(True): ...``) or as a plain call that sets the default."""

    def __init__(self, enabled=True):
        self._enabled = bool(enabled)
        self._prev = list(_checks_override)
        _checks_override.append(self._enabled)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _checks_override[:] = self._prev
        return False


_shape_only = []  # non-empty while an op's fake runs its check hook: no data to read


class shape_checks_only:
    """Context in which the data-dependent checks are off: an op's fake (meta tensors,
    FakeTensorMode under ``torch.compile`` / export) runs its check hook in it, so the
    argument checks that need no data (sizes, dtypes, devices, options) run there too."""

    def __enter__(self):
        _shape_only.append(True)
        return self

    def __exit__(self, *exc):
        _shape_only.pop()
        return False


def data_checks_enabled(device):
    """Whether the data-dependent checks run for tensors on `device`."""
    if torch.compiler.is_compiling() or _shape_only or device.type == "meta":
        return False
    if device.type == "cpu":
        return True
    if _checks_override:
        return _checks_override[-1]
    value = os.environ.get("RMKERNELS_CHECK", "0")
    if value not in ("0", "1", ""):
        raise ValueError(f"RMKERNELS_CHECK must be 0 or 1, got {value!r}")
    return value == "1"


def _dtype_name(t):
    return str(t).replace("torch.", "")


def check_tensor(name, t, *, ndims=None, dtypes=None, device=None, allow_none=False):
    """Type, rank, dtype and device check of one tensor argument."""
    if t is None:
        if allow_none:
            return
        raise TypeError(f"{name} must be a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndims is not None:
        ndims = (ndims,) if isinstance(ndims, int) else tuple(ndims)
        if t.dim() not in ndims:
            want = " or ".join(f"{n}-D" for n in ndims)
            raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(
            f"{name} must have dtype in ({', '.join(_dtype_name(d) for d in dtypes)}), got {_dtype_name(t.dtype)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")


def is_real(value):
    """Whether ``value`` is a number option: a Python int or float, or a NumPy scalar
    (``np.float32(0.1)``; any ``numbers.Real``). Not a bool, and not a tensor (its value would
    need a host synchronisation)."""
    t = type(value)
    if t is float or t is int:  # the common case, without the ABC check (~0.5 us a call)
        return True
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def check_int(name, value, what=""):
    """An integer option as a Python int in int64's range (what the kernels take): an int or a
    NumPy integer (``operator.index``); not a bool, a float, a str or a tensor (its value would
    need a host synchronisation on a GPU). ``what`` says what it is in the message."""
    try:
        if isinstance(value, (bool, torch.Tensor)):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int{what}, got {value!r}") from None
    if not -(2**63) <= v < 2**63:
        raise ValueError(f"{name} must fit in int64 ([-2**63, 2**63)), got {v}")
    return v


def check_float(name, value, *, lo=None, hi=None, lo_open=False, hi_open=False):
    """A real number (:func:`is_real`) in [lo, hi] (open ends where asked), returned as a
    Python float."""
    if not is_real(value):
        raise TypeError(f"{name} must be a real number (a Python float or int, or a NumPy scalar), "
                        f"got {type(value).__name__}")
    v = float(value)
    bad = (v != v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (
        hi is not None and (v >= hi if hi_open else v > hi))
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return v


def check_nonneg(name, value):
    """A finite Python number >= 0 (an eps added to a std or variance, a discount)."""
    return check_float(name, value, lo=0.0, hi=float("inf"), hi_open=True)


def check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def true_rows(flags):
    """int64 indices of the True entries of the 1-D bool ``flags`` (the rows a data check names),
    with ``torch.nonzero`` (~10 us a call on the CPU) run only when one is True: a passing
    check costs one ``any``."""
    if not bool(flags.any()):
        return flags.new_zeros(0, dtype=torch.int64)
    return torch.nonzero(flags).flatten()


def min_max(x):
    """(min, max) of the non-empty integer tensor ``x`` as Python ints, in one pass and, on a
    GPU, one device-to-host copy (two ``int()`` of ``torch.aminmax``'s results would wait for the
    device twice; on the CPU they read memory, cheaper than a stack)."""
    lo, hi = torch.aminmax(x)
    if x.device.type == "cpu":
        return int(lo), int(hi)
    lo, hi = torch.stack((lo, hi)).tolist()
    return lo, hi


def rows_str(rows, limit=10):
    rows = [int(r) for r in rows]
    s = ", ".join(str(r) for r in rows[:limit])
    return s + (f", ... ({len(rows)} rows)" if len(rows) > limit else "")
