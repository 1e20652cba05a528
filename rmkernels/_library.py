"""The ``rmkernels`` op namespace (``lib``), the accumulation-dtype rule and the eager fast path.

The ops themselves are built by :mod:`rmkernels._registry` from one declaration each, their
schemas all in ``rmkernels/ops/_schemas.py`` (in Python, so every op exists even when the
compiled extension is absent):

* kernel ops, ``rmkernels::<name>_kernel``: one per compiled kernel, implemented in C++ for
  the CPU and CUDA dispatch keys (``csrc/cpu/*.cpp``, ``csrc/cuda/*_binding.cpp``);
* public ops, ``rmkernels::<name>``: ``torch.library.custom_op``s with a trailing
  ``backend: str`` argument, which route to the reference (pure PyTorch), the kernel op
  (``cpu``/``cuda``) or the Triton launcher. They carry ``register_fake`` and
  ``register_autograd``; backward passes are public ops too.

In plain eager mode the public functions skip the public ops' Python dispatch machinery
(``eager_fast_path``): they run the ops' bodies directly, in a ``torch.autograd.Function``
made of the ops' own ``setup_context`` and backward. ``RMKERNELS_EAGER_FAST_PATH=0`` (read
at import) turns that off.
"""
import os

import torch
from torch import Tensor
from torch.nn import Parameter

from rmkernels import _ext  # noqa: F401  (loads _C, which registers the kernel ops' impls)

lib = torch.library.Library("rmkernels", "FRAGMENT")


def acc_dtype(dtype):
    """Arithmetic dtype of the kernels: float64 for float64 inputs, float32 otherwise (the one
    definition in Python; ``csrc/include/rmkernels`` has the C++ one)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_dtype(t, dtype):
    """``t.to(dtype)``, without the call when ``t`` has that dtype already (``.to`` then returns
    ``t`` itself, after ~1.3 us of dispatch on the host): for the public functions' hot paths."""
    return t if t.dtype == dtype else t.to(dtype)


def detached(t):
    """``t.detach()`` where autograd records ``t`` (``requires_grad``), else ``t`` itself (the same
    data, no view made: ~0.6 us of host time saved a call)."""
    return t.detach() if t.requires_grad else t


def acc_scalar(value, dtype):
    """A Python float option as the kernels hold it in ``dtype``: rounded to it, past its range
    +-inf (a clamp of 1e300 on float32 is no clamp; torch's ``clamp`` / ``full`` would raise)."""
    if dtype == torch.float64:
        return float(value)
    return torch.tensor(float(value), dtype=torch.float64).to(dtype).item()


EAGER_FAST_PATH = os.environ.get("RMKERNELS_EAGER_FAST_PATH", "1") != "0"
_PLAIN_TENSORS = (Tensor, Parameter)
# Argument types that are never tensors: skipped without isinstance(a, Tensor), whose metaclass
# check costs ~0.2 us an argument.
_NOT_TENSORS = frozenset((type(None), bool, int, float, str, torch.dtype))
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def use_eager_path(*args):
    """Whether a public function may skip its public op: plain eager PyTorch only. Not while
    tracing (``torch.compile``, export, ``torch.jit.trace``), under functorch transforms,
    Python dispatch modes (FakeTensorMode, FlopCounterMode, make_fx, ...) or torch function
    modes, nor when a tensor among ``args`` is a subclass (FakeTensor, DTensor, ...;
    ``nn.Parameter`` is plain), nor for a functorch wrapper that outlived its transform (a
    "dead" one, which ``autograd.Function.apply`` would unwrap: the fast path calls the C
    ``apply`` directly): these need the op itself (its fake, its dispatcher entry). About 1 us."""
    if not EAGER_FAST_PATH or torch.compiler.is_compiling():
        return False
    if (torch._C._are_functorch_transforms_active() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled() or torch._C._get_tracing_state() is not None):
        return False
    for a in args:
        t = type(a)
        if t in _NOT_TENSORS:
            continue
        if t in _PLAIN_TENSORS:
            if _is_functorch_wrapped(a):
                return False
        elif isinstance(a, Tensor):
            return False
    return True


def eager_fast_path(op, forward, setup_context=None, backward=None):
    """``op`` (a public op) as a function with an eager fast path.

    ``forward`` is the op's body (the routing to reference / Triton / kernel op), called with
    the op's arguments; ``setup_context`` and ``backward`` are those of the op's
    ``register_autograd``, with ``backward`` calling the backward op's body instead of the
    backward op. Where ``use_eager_path`` holds, the result runs ``forward`` directly, or, when
    autograd records, in a ``torch.autograd.Function`` built from the three (what
    ``register_autograd`` builds, less the dispatch); elsewhere it calls ``op``.
    """
    function = None
    if backward is not None:
        # setup_context is called here, as register_autograd's Function does: a Function with a
        # setup_context staticmethod binds its arguments with inspect.signature (~30 us a call)
        def function_forward(ctx, *args):
            out = forward(*args)
            setup_context(ctx, args, out)
            return out

        once = torch.autograd.function.once_differentiable(backward)

        def function_backward(ctx, *grads):
            # Differentiable once, like the op (its backward op has no autograd). Grad mode is on
            # only under create_graph=True; once_differentiable's no_grad costs a few us a call.
            return once(ctx, *grads) if torch.is_grad_enabled() else backward(ctx, *grads)

        function = type(f"{op.__name__}_eager", (torch.autograd.Function,), {
            "forward": staticmethod(function_forward), "backward": staticmethod(function_backward)})
        # What Function.apply runs once no functorch transform is active and its arguments hold
        # no dead functorch wrapper (use_eager_path's conditions): the C apply, without the
        # Python layer's unwrapping pass over the arguments (~3 us a call).
        apply = super(torch.autograd.Function, function).apply

    def call(*args):
        if not use_eager_path(*args):
            return op(*args)
        if function is not None and torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return apply(*args)
        return forward(*args)

    return call
