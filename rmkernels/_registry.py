"""The op registry: every ``torch.ops.rmkernels`` op built from one declaration.

An op family declares (in ``rmkernels/ops/<family>.py``):

* its kernels, ``Kernel(name, reference=..., triton="module:function", fake=...)``: one
  computation with one implementation per backend, all with the kernel op's signature (its
  schema is ``ops/_schemas.py``'s ``KERNEL_OPS[name]``). The registry defines the kernel op
  ``rmkernels::<name>`` (whose CPU/CUDA implementations ``_C`` registers) and its fake;
  calling ``kernel(backend, *args)`` runs the reference, the Triton host function
  (``rmkernels.triton.<module>.<function>``, imported on first use) or the kernel op.
* its public ops, ``Op(name, fake=..., kernel=..., prepare=..., check=..., autograd=...)``
  (or ``body=`` for an op composed of others' routing): the registry defines the
  ``torch.library.custom_op`` ``rmkernels::<name>`` with the schema ``PUBLIC_OPS[name]`` plus a
  trailing ``str backend``, its fake, its autograd (``Autograd``: the backward op's name, a
  ``setup_context`` and a backward that calls the backward op), and the eager fast path
  (``rmkernels._library.eager_fast_path``). The op is then called as ``op(*args, backend)``.

The custom op's body checks ``backend`` (one of the four names, able to run on the tensors'
device: ``_backend.resolve``'s rule and ``RuntimeError``) and runs the declaration's ``check`` hook (argument
sizes, dtypes, devices, and the data checks of CPU tensors) before routing, for every
backend: a direct ``torch.ops.rmkernels.<name>(...)`` call with bad arguments raises a clear
``ValueError``/``TypeError`` naming the argument, and the data checks run in every mode
(eager, ``torch.compile``, export). The eager fast path skips the hook: the public function
has already checked the same arguments. The fakes (``_checked_fake``: meta tensors, and
FakeTensorMode while ``torch.compile`` / export trace) run the hook too, with the data checks
off, after checking that every tensor is on one device (a meta tensor among CPU ones reaches the
fake); the kernel ops' fakes check the one device.
"""
import contextlib
import importlib
import inspect
from functools import partial

import torch

from rmkernels._library import eager_fast_path, lib
from rmkernels.ops._schemas import KERNEL_OPS, NO_BACKEND, PUBLIC_OPS

ROUTED_BACKENDS = ("reference", "cpu", "cuda", "triton")

KERNELS = {}  # name -> Kernel
OPS = {}  # name -> Op

_triton_modules = {}


def triton_function(spec):
    """The Triton host function ``"module:function"`` of ``rmkernels.triton``, its module
    imported on first use (importing triton costs seconds; ``import rmkernels`` never does)."""
    module, function = spec.split(":")
    mod = _triton_modules.get(module)
    if mod is None:
        mod = _triton_modules[module] = importlib.import_module(f"rmkernels.triton.{module}")
    return getattr(mod, function)


def _arg_names(schema):
    return [a.name for a in torch._C.parse_schema(f"x{schema}").arguments]


def _with_backend(schema):
    args, ret = schema.split(") -> ", 1)
    return f"{args}, str backend) -> {ret}" if args != "(" else f"(str backend) -> {ret}"


class Kernel:
    """One computation, one implementation per backend (see the module docstring)."""

    def __init__(self, name, *, reference, triton, fake):
        lib.define(name + KERNEL_OPS[name])
        torch.library.register_fake(f"rmkernels::{name}", _checked_fake(name, fake), lib=lib)
        lib.impl(name, _no_kernel(name), "CompositeExplicitAutograd")
        self.name = name
        self.reference = reference
        self.triton = triton
        self.op = getattr(torch.ops.rmkernels, name).default
        KERNELS[name] = self

    def __call__(self, backend, *args):
        if backend == "reference":
            return self.reference(*args)
        if backend == "triton":
            return triton_function(self.triton)(*args)
        return self.op(*args)  # cpu / cuda: the dispatcher picks the tensors' device

    def __repr__(self):
        return f"Kernel({self.name!r}, triton={self.triton!r})"


def _no_kernel(name):
    """The kernel op ``name``'s fallback (``CompositeExplicitAutograd``): what the dispatcher
    runs when no kernel of ``_C`` (CPU/CUDA) or fake (meta) fits the call. A call whose tensor
    arguments are all None has no device to dispatch on (the dispatcher's own error is "There
    were no tensor arguments to this function"): the first None one is named, as the
    kernels' checks name it when another tensor is given. Otherwise the tensors are on a
    device no kernel is built for (or ``_C`` is not loaded): a ``RuntimeError`` saying so."""
    args = torch._C.parse_schema(f"x{KERNEL_OPS[name]}").arguments
    tensor_args = [a.name for a in args if str(a.type) == "Tensor"]

    def fallback(*values):
        given = dict(zip([a.name for a in args], values))
        missing = next((n for n in tensor_args if given.get(n) is None), None)
        if missing is not None:
            raise TypeError(f"{missing} must be a tensor, got None")  # the kernels' own message
        from rmkernels import _ext

        devices = sorted({str(v.device) for v in values if isinstance(v, torch.Tensor)})
        why = "" if _ext.CPP_AVAILABLE else f" (the compiled extension is not loaded: {_ext.LOAD_ERROR})"
        raise RuntimeError(f"rmkernels::{name} has no kernel for tensors on {', '.join(devices)}{why}; the "
                           f"public ops run on the reference or Triton backends there")

    fallback.__name__ = f"{name}_no_kernel"
    return fallback


class Autograd:
    """The autograd of a public op: ``backward_op`` (the public op of the backward),
    ``setup_context(ctx, inputs, output)`` as ``register_autograd`` takes it, and
    ``backward(call_backward, ctx, *grads)``, where ``call_backward`` is the backward op (the
    op path) or its body (the eager fast path)."""

    def __init__(self, backward_op, setup_context, backward):
        self.backward_op = backward_op
        self.setup_context = setup_context
        self.backward = backward


def check_one_device(name, args, names):
    """Every tensor argument on one device (a meta tensor among CPU ones sends the call to the
    op's fake, which would otherwise return uninitialised tensors of the other device); the
    message names each tensor argument's device. No op's schema takes a Tensor[]."""
    tensors = [(n, a) for n, a in zip(names, args) if isinstance(a, torch.Tensor)]
    if len({a.device for _, a in tensors}) > 1:
        raise ValueError(f"rmkernels::{name}: the tensor arguments must be on one device, got "
                         f"{', '.join(f'{n} on {a.device}' for n, a in tensors)}")


def check_backend_fits(backend, args):
    """A direct call's ``backend`` must run on its tensors' device (``_backend.resolve``'s rule
    and message: ``cuda`` on CPU tensors would run the CPU kernel, ``triton`` on CPU tensors
    without the interpreter fail inside Triton)."""
    from rmkernels import _backend

    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    if device is not None and backend != "reference":
        _backend.resolve(backend, device)


def _checked_fake(name, fake, check=None, has_backend=False):
    """The fake of op ``name`` (meta tensors, FakeTensorMode while torch.compile / export
    trace): first the checks that need no data, those of the op's body: one device for the
    tensors, the backend name, and the ``check`` hook with the data checks off
    (``_checks.shape_checks_only``), so a bad call fails there as it does in eager mode."""
    from rmkernels import _checks

    schema = _with_backend(PUBLIC_OPS[name]) if has_backend else PUBLIC_OPS.get(name, KERNEL_OPS.get(name))
    names = _arg_names(schema)

    def checked(*args, **kwargs):
        check_one_device(name, list(args) + list(kwargs.values()), names[:len(args)] + list(kwargs))
        if has_backend:
            check_backend(args[-1] if args else kwargs.get("backend"))
        if check is not None:
            with _checks.shape_checks_only():
                check(*args, **kwargs)
        return fake(*args, **kwargs)

    checked.__name__ = getattr(fake, "__name__", "fake")
    return checked


def check_backend(backend):
    if backend not in ROUTED_BACKENDS:
        raise ValueError(f"backend must be one of {ROUTED_BACKENDS} when an op is called directly, got {backend!r}")


class Op:
    """A public op ``rmkernels::<name>`` (see the module docstring).

    ``kernel`` with ``prepare(*args) -> kernel args`` (default: the op's own arguments) makes
    the body ``kernel(backend, *prepare(*args))``; ``body(*args, backend)`` replaces that for
    ops composed of other ops' routing (``OPS[name].body``). ``check(*args, backend)`` is the
    argument-check hook of direct calls.
    """

    def __init__(self, name, *, fake, kernel=None, prepare=None, body=None, check=None, autograd=None):
        self.name = name
        has_backend = name not in NO_BACKEND
        schema = _with_backend(PUBLIC_OPS[name]) if has_backend else PUBLIC_OPS[name]
        names = _arg_names(schema)
        if body is None:
            if prepare is None:
                def body(*args):
                    return kernel(args[-1], *args[:-1])
            else:
                def body(*args):
                    return kernel(args[-1], *prepare(*args[:-1]))
        body = _without_autocast(body)
        self.body = body
        self.kernel = kernel

        def op_body(*args, **kwargs):
            if kwargs:
                args = _bind(name, names, args, kwargs)
            if has_backend:
                check_backend(args[-1])
            if check is not None:
                check(*args)
            if has_backend:  # after the argument checks: a bad argument is named whatever the backend
                check_backend_fits(args[-1], args)
            out = body(*args)
            if isinstance(out, torch.Tensor) and any(out is a for a in args):
                out = out.clone()  # an op's output never aliases its input (a body may return one)
            return out

        op_body.__name__ = name
        op_body.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
        custom = torch.library.custom_op(f"rmkernels::{name}", op_body, mutates_args=(), schema=schema)
        custom.register_fake(_checked_fake(name, fake, check, has_backend))
        self.custom_op = custom
        self.op = getattr(torch.ops.rmkernels, name)
        if autograd is None:
            self._call = eager_fast_path(self.op, body)
        else:
            backward_op = OPS[autograd.backward_op]
            custom.register_autograd(partial(autograd.backward, getattr(torch.ops.rmkernels, backward_op.name)),
                                     setup_context=autograd.setup_context)
            self._call = eager_fast_path(self.op, body, autograd.setup_context,
                                         partial(autograd.backward, backward_op.body))
        OPS[name] = self

    def __call__(self, *args):
        """The op, or its body in plain eager mode (``rmkernels._library.eager_fast_path``)."""
        return self._call(*args)

    def __repr__(self):
        return f"Op({self.name!r})"


def _without_autocast(body):
    """``body`` run with autocast off: an op computes in its arithmetic dtype (float32 for
    float32, bf16 and fp16 inputs, float64 for float64) whatever autocast region it is called
    in, on every backend: under ``torch.autocast`` the reference's matmuls and the host
    functions' torch ops would otherwise run in autocast's dtype (the reference's log-probs came
    back bf16, 7.5e-2 off). One check when autocast is off (~0.1 us)."""
    def run(*args):
        if not torch._C._is_any_autocast_enabled():
            return body(*args)
        with contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return body(*args)

    run.__name__ = getattr(body, "__name__", "body")
    return run


def _bind(name, names, args, kwargs):
    out = list(args)
    for n in names[len(args):]:
        if n not in kwargs:
            raise TypeError(f"rmkernels::{name}() missing argument {n!r}")
        out.append(kwargs.pop(n))
    if kwargs:
        raise TypeError(f"rmkernels::{name}() got unexpected arguments {sorted(kwargs)}")
    return tuple(out)
