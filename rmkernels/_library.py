"""The ``rmkernels`` op namespace.

Two layers of ops, each schema written once, here in Python (so every op exists even when
the compiled extension is absent):

* kernel ops, ``rmkernels::<name>_kernel``: one per compiled kernel, implemented in C++ for
  the CPU and CUDA dispatch keys (``csrc/cpu/*.cpp``, ``csrc/cuda/*_binding.cpp``);
* public ops, ``rmkernels::<name>``: ``torch.library.custom_op``s with a trailing
  ``backend: str`` argument, which route to the reference (pure PyTorch), the kernel op
  (``cpu``/``cuda``) or the Triton launcher. They carry ``register_fake`` and
  ``register_autograd``; backward passes are public ops too.
"""
import torch

from rmkernels import _ext  # noqa: F401  (loads _C, which registers the kernel ops' impls)

lib = torch.library.Library("rmkernels", "FRAGMENT")


def define_kernel_op(schema):
    """Define ``rmkernels::<schema>``; its CPU/CUDA implementations come from ``_C``."""
    lib.define(schema)
    name = schema.split("(", 1)[0]
    return getattr(torch.ops.rmkernels, name).default


def acc_dtype(dtype):
    """Arithmetic dtype of the kernels: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32
