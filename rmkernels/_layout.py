"""Layout of the gradients the kernels write (one rule for every backend; the C++ mirror is
``rmkernels::grad_buffer`` in ``csrc/include/rmkernels/op_checks.h``).

``grad_hidden`` takes ``hidden_states``' strides when those are non-overlapping and dense
(then a fresh tensor with them is exactly ``empty_like``), else it is contiguous: an
overlapping view (``x.unfold(1, 8, 1)``, ``as_strided`` with overlaps) or one with gaps has no
layout a fresh tensor can share, and ``empty_like`` would invent one from the sorted strides,
with H possibly not innermost (the kernels write rows of H contiguous elements).
"""
import torch


def grad_buffer(t, *, zero=True):
    """A fresh tensor of t's shape and dtype for t's gradient: t's strides when t is
    non-overlapping and dense, else contiguous. Zero-filled unless ``zero=False``."""
    g = torch.empty_like(t)
    if g.stride() != t.stride():
        g = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return g.zero_() if zero else g
