"""Helpers shared by the Triton kernels of rmkernels: block sizes, the arithmetic dtype, host
floats passed at full precision, symmetric clamps, round-to-nearest bf16 stores, and the
option codes as ``tl.constexpr`` values (``rmkernels/_codes.py`` defines them once)."""
import math

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from rmkernels import _codes
from rmkernels._backend import triton_interpreting
from rmkernels._library import acc_dtype  # noqa: F401  (the arithmetic dtype rule, one definition)

# Option codes as compile-time constants of the kernels (``if EST == K3:``).
REDUCE_NONE = tl.constexpr(int(_codes.Reduction.NONE))
REDUCE_MEAN = tl.constexpr(int(_codes.Reduction.MEAN))
REDUCE_SUM = tl.constexpr(int(_codes.Reduction.SUM))
KL_K1 = tl.constexpr(int(_codes.KLEstimator.K1))
KL_ABS = tl.constexpr(int(_codes.KLEstimator.ABS))
KL_K2 = tl.constexpr(int(_codes.KLEstimator.K2))
KL_K3 = tl.constexpr(int(_codes.KLEstimator.K3))
MODE_ROW = tl.constexpr(int(_codes.GaeSegmentMode.ROW))
MODE_SEGMENT_AGGREGATE = tl.constexpr(int(_codes.GaeSegmentMode.SEGMENT_AGGREGATE))
MODE_SEGMENT_FINAL = tl.constexpr(int(_codes.GaeSegmentMode.SEGMENT_FINAL))


def block_size(n, cap, floor=16):
    """The power of two covering n elements, between floor and cap."""
    return max(floor, min(cap, triton.next_power_of_2(max(int(n), 1))))


def split_float(v):
    """(hi, lo) fp32 pair of a host float (see ``scalar``): compiled Triton passes Python floats
    as fp32, hi + lo keeps ~48 bits."""
    with np.errstate(over="ignore"):
        hi = float(np.float32(v))
    if not math.isfinite(hi):  # inf, NaN, or beyond float32's range: as float32 had it, lo 0 (not NaN)
        return hi, 0.0
    return hi, float(np.float32(float(v) - hi))


@triton.jit
def scalar(hi, lo, ty):
    """A host float passed as two fp32 scalars (``split_float``), in the dtype ty: enough for
    float64 inputs."""
    return (tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)).to(ty)


interpreting = triton_interpreting  # the one definition is rmkernels._backend's


if interpreting():  # no libdevice under the interpreter; its tl.exp / tl.log are numpy's
    @triton.jit
    def exp(x):
        """exp(x) to within a few ulp over the whole range (numpy's, here)."""
        return tl.exp(x)

    @triton.jit
    def log1p(z):
        """log(1 + z) for z >= 0, accurate for tiny z: log(u) * z / (u - 1) with u = 1 + z
        corrects the rounding of u."""
        u = 1.0 + z
        one = u == 1.0
        return tl.where(one, z, tl.log(u) * (z / tl.where(one, 1.0, u - 1.0)))
else:
    @triton.jit
    def exp(x):
        """libdevice's exp: a few ulp over the whole range. tl.exp on a GPU is ex2.approx of
        x * log2(e), whose relative error grows with |x| (the Bradley-Terry losses of confident
        pairs, exp(-|d|), missed 1e-6 on an H200, 2026-11-30)."""
        return libdevice.exp(x)

    @triton.jit
    def log1p(z):
        """libdevice's log1p (tl.log on a GPU is lg2.approx, coarse near 1)."""
        return libdevice.log1p(z)


@triton.jit
def clamp_sym(x, c):
    """x clamped to [-c, c] when c > 0 (0 = no clamp); NaN stays NaN (comparisons with NaN are
    false)."""
    y = tl.where(x < -c, -c, tl.where(x > c, c, x))
    return tl.where(c > 0, y, x)


@triton.jit
def _to_bf16_rn(x):
    """float32 -> bfloat16 rounded to nearest, ties to even, on every path. Compiled Triton
    rounds so already (fptrunc); the interpreter truncates (its bf16 conversion drops the low
    16 bits), so the rounding is done here in integer arithmetic, the same on both. NaN stays a
    quiet NaN, overflow gives inf, like the hardware conversion."""
    u = x.to(tl.uint32, bitcast=True)
    r = u + (0x7FFF + ((u >> 16) & 1))
    hi = tl.where(x != x, (u >> 16) | 0x40, r >> 16)
    return hi.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def to_store(x, ty: tl.constexpr):
    """x (arithmetic dtype) converted for a store into a tensor of dtype ty, rounding to nearest
    (bf16 through ``_to_bf16_rn``, whose result the compiled and the interpreted kernels share)."""
    if ty == tl.bfloat16:
        return _to_bf16_rn(x.to(tl.float32))
    else:
        return x.to(ty)


def check_tensor(name, t, *, dims=None, shape=None, dtype=None, dtypes=None, device=None, contiguous=False):
    """The host functions' argument checks (the kernel ops' TORCH_CHECKs, as ValueError /
    TypeError naming the argument), before anything is allocated or launched."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {list(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {list(t.stride())}")


FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_code(name, value, enum):
    """An option code of ``enum`` (rmkernels/_codes.py)."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in {int(m) for m in enum}:
        raise ValueError(f"{name} must be a {enum.__name__} code {sorted(int(m) for m in enum)}, got {value!r}")
