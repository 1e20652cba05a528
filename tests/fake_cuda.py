"""A stand-in CUDA device for CPU-only machines: which tensors a piece of Python puts on the
CPU when its inputs are on the GPU.

    with fake_cuda():
        x = torch.randn(4, 3).to("cuda")      # x.device == cuda:0, its data on the CPU
        x + torch.ones(3)                       # RuntimeError: ... two devices, cuda:0 and cpu
        torch.zeros(4, device=x.device)         # fine: on the (fake) GPU

A tensor "on the GPU" is a ``FakeCudaTensor``: its data is a real CPU tensor, so values,
``.item()`` and data-dependent Python all work, while ``.device`` says ``cuda:0``. Every aten
op is first run on fake tensors with the devices the real ones would have (torch's own
``FakeTensorMode`` with its own device rules: CPU scalars mix with GPU tensors, ``index_add_``
wants one device, ...) and raises as the real GPU run would; then it runs on the CPU data and
its outputs go to the device the fake run gave them. The fake run's output devices are kept per
op and per what the device rules read (each tensor's device, dtype and shape, and the other
arguments: ``_rule_key``), so a loop or a model's repeated layers pay for it once (a PPO step
here: 54 s -> 20 s). A Python custom op
(``torch.ops.rmkernels.*``) runs its body op by op, so its insides are checked too. Factories
asked for ``device="cuda"`` make fake GPU tensors. Inside the C++ layer the stand-in is the
``meta`` device (no CUDA runtime is asked for streams or guards), so autograd works.
:func:`patch_runtime` answers the ``torch.cuda`` queries of a one-GPU machine.

Not covered: CUDA kernels (rmkernels' cuda backend: tests/cuda_on_cpu runs them), the C++
bindings, streams, events and graphs. Triton kernels run in Triton's interpreter when
TRITON_INTERPRET=1 (``patch_runtime(..., triton=True)``). What it is for: the Python that runs
on a GPU -- the ops' Python layer, the Triton host code, the drop-ins, the training loops, the
benchmark runner -- checked here before a lent GPU's minutes are spent on it.
"""
import contextlib
import copy

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
    UnsupportedOperatorException,
)
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
_STANDIN = torch.device("meta")  # what the C++ layer sees


class FakeCudaTensor(torch.Tensor):
    """A tensor that says it is on ``cuda:0``; ``.elem`` holds its data on the CPU."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem):
        r = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=_STANDIN, requires_grad=elem.requires_grad)
        r.elem = elem
        return r

    @property
    def device(self):
        return CUDA

    @property
    def is_cuda(self):
        return True

    @property
    def is_meta(self):
        return False

    def get_device(self):
        return 0

    # storage identity (which tensors share memory: safetensors, HF's tied weights) is the data's
    def data_ptr(self):
        return self.elem.data_ptr()

    def untyped_storage(self):
        return self.elem.untyped_storage()

    def __reduce_ex__(self, proto):
        """``torch.save`` writes the data (as a GPU tensor's would be), as a plain tensor."""
        return self.elem.detach().__reduce_ex__(proto)

    def __deepcopy__(self, memo):
        """``copy.deepcopy`` (of a model on the stand-in): a copy of the data, still on it."""
        if id(self) not in memo:
            out = FakeCudaTensor(self.elem.detach().clone()).requires_grad_(self.requires_grad)
            out.__dict__.update((k, copy.deepcopy(v, memo)) for k, v in self.__dict__.items() if k != "elem")
            memo[id(self)] = out
        return memo[id(self)]

    def __repr__(self):
        return f"FakeCudaTensor({self.elem!r}, device='cuda:0')"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError("a FakeCudaTensor was used outside `with fake_cuda():`")


def _unwrap(x):
    return x.elem if isinstance(x, FakeCudaTensor) else x


def _is_cuda(d):
    return (isinstance(d, torch.device) and d.type == "cuda") or (isinstance(d, str) and d.startswith("cuda"))


def _swap_devices(kwargs, to):
    """``device=`` of a factory: cuda, or meta, which is what the C++ layer (autograd's
    zero-filled gradients, ``new_*`` of a stand-in tensor) asks for on the stand-in's behalf."""
    def gpu(v):
        return _is_cuda(v) or (isinstance(v, torch.device) and v.type == "meta") or v == "meta"
    return {k: (to if gpu(v) else v) for k, v in kwargs.items()}


# ops that torch has for CUDA tensors only, run on the CPU data in their arithmetic
_CUDA_ONLY = {
    # bf16/fp16 GEMM with float32 output (cuBLAS): the float32 products of the operands' values
    torch.ops.aten.mm.dtype: lambda a, b, out_dtype: torch.mm(a.to(out_dtype), b.to(out_dtype)),
}


def _custom_op_body(func):
    """The Python function of a ``torch.library.custom_op`` (None for other ops)."""
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(func._schema.name) if hasattr(func, "_schema") else None
    return None if opdef is None else opdef._init_fn


_UNKNOWN = object()
_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)


def _rule_key(func, args, kwargs):
    """What torch's device rules for ``func`` depend on: each tensor's kind (stand-in GPU or
    not, and then its device), dtype and shape (a 0-dim CPU tensor mixes with GPU ones; the
    shape decides how many outputs a split has), and every other argument. Two calls with the
    same key get the same output devices, or the same error, from the fake run; None (never
    cached) when an argument is of a kind not listed here."""
    flat, spec = tree_flatten((args, kwargs))
    parts = [func, str(spec)]
    for x in flat:
        if isinstance(x, torch.Tensor):
            parts.append(("T", isinstance(x, FakeCudaTensor), None if isinstance(x, FakeCudaTensor) else x.device,
                          x.dtype, tuple(x.shape), x.requires_grad))
        elif isinstance(x, _PLAIN):
            parts.append((type(x), x))
        else:
            return None
    return tuple(parts)


class _Dispatch(TorchDispatchMode):
    """Every aten op: a fake run for the device rules and output devices, then the CPU run."""

    def __init__(self):
        super().__init__()
        self.fake = FakeTensorMode()
        self.rules = {}  # _rule_key -> the fake run's output devices (None: it had none)

    def _fake(self, x):
        if not isinstance(x, torch.Tensor):
            return x
        if isinstance(x, FakeCudaTensor):
            meta = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
            return FakeTensor(self.fake, meta, _STANDIN)
        return self.fake.from_tensor(x)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        gpu_kwargs = _swap_devices(kwargs, _STANDIN)
        on_gpu = any(isinstance(t, FakeCudaTensor) for t in tree_flatten((args, kwargs))[0]) or any(
            v is _STANDIN for v in gpu_kwargs.values())
        if not on_gpu:  # CPU only: nothing to check, the op as it is
            return func(*args, **kwargs)
        key = _rule_key(func, args, gpu_kwargs)
        out_devices = self.rules.get(key, _UNKNOWN) if key is not None else _UNKNOWN
        if out_devices is _UNKNOWN:
            out_devices = None
            try:
                with self.fake:
                    fout = func(*tree_map(self._fake, args), **tree_map(self._fake, gpu_kwargs))
                out_devices = [CUDA if t.device == _STANDIN else t.device
                               for t in tree_flatten(fout)[0] if isinstance(t, torch.Tensor)]
            except (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException):
                pass  # no fake run for this op: its outputs go to the GPU (below)
            except RuntimeError as e:
                raise RuntimeError(str(e).replace("meta", "cuda:0")) from None
            if key is not None:
                self.rules[key] = out_devices
        body = _custom_op_body(func)
        if body is not None:  # a Python custom op: its body's ops on the stand-in too, one by one
            with self, torch.no_grad():
                out = body(*args, **kwargs)
            got = [t.device for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            if out_devices is not None and got != out_devices:
                raise RuntimeError(f"{func}: outputs on {got}, its fake says {out_devices}")
            return out
        cpu_args, cpu_kwargs = tree_map(_unwrap, args), tree_map(_unwrap, _swap_devices(kwargs, "cpu"))
        if any(isinstance(t, torch.Tensor) and t.is_meta for t in tree_flatten((cpu_args, cpu_kwargs))[0]):
            # made by the C++ layer on the stand-in's behalf from Python data (which it dropped):
            # never compute on it (its "values" are whatever memory holds)
            raise RuntimeError(f"fake_cuda: {func} got a meta tensor the C++ layer made for the stand-in; "
                               f"handle the call that made it in fake_cuda._Function")
        out = _CUDA_ONLY.get(func, func)(*cpu_args, **cpu_kwargs)
        flat = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if out_devices is None:
            out_devices = [CUDA] * len(flat)
        wrapped = {id(t): (FakeCudaTensor(t) if d == CUDA else t) for t, d in zip(flat, out_devices)}
        # an in-place op returns its (wrapped) self
        for a in tree_flatten(args)[0]:
            if isinstance(a, FakeCudaTensor) and id(a.elem) in wrapped:
                wrapped[id(a.elem)] = a
        return tree_map(lambda t: wrapped.get(id(t), t) if isinstance(t, torch.Tensor) else t, out)


class _Function(TorchFunctionMode):
    """What does not reach the dispatcher as a GPU op: ``.to("cuda")`` / ``.cuda()`` of a CPU
    tensor (the binding asks the CUDA runtime first), tensors the bindings build from Python
    data (``torch.tensor(..., device="cuda")``, ``x.new_tensor(data)``, list indices), which
    skip the modes, and ``.tolist()``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            if func is torch.Tensor.cuda:
                device, dtype, copy = CUDA, None, False
            else:
                copy = kwargs.get("copy", False)
                device, dtype, _, _ = torch._C._nn._parse_to(
                    *args[1:], **{k: v for k, v in kwargs.items() if k != "copy"})
            if _is_cuda(device):
                x = args[0]
                if dtype is not None and dtype != x.dtype:
                    x = x.to(dtype)
                if isinstance(x, FakeCudaTensor) and not copy:
                    return x
                return torch.ops.aten._to_copy.default(x, device=CUDA)
        if func in (torch.tensor, torch.as_tensor) and _is_cuda(kwargs.get("device")):
            # built from Python data on the host, then copied (the binding skips the modes)
            x = func(*args, **dict(kwargs, device="cpu"))
            return torch.ops.aten._to_copy.default(x, device=CUDA).requires_grad_(x.requires_grad)
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and isinstance(args[0], FakeCudaTensor):
            # Python lists among the indices become index tensors on the CPU here, as torch
            # builds them (on the GPU) from the list: the C++ layer would build them on the
            # stand-in's meta device, without their values
            index = args[1]
            if isinstance(index, list) or (isinstance(index, tuple) and any(isinstance(i, list) for i in index)):
                as_tensor = (lambda i: torch.tensor(i) if isinstance(i, list) else i)
                index = as_tensor(index) if isinstance(index, list) else tuple(map(as_tensor, index))
                return func(args[0], index, *args[2:], **kwargs)
        if func is torch.Tensor.new_tensor and isinstance(args[0], FakeCudaTensor):
            kw = {k: v for k, v in kwargs.items() if k != "device"}
            x = torch.tensor(args[1], dtype=kw.pop("dtype", args[0].dtype), **kw)
            return torch.ops.aten._to_copy.default(x, device=CUDA).requires_grad_(x.requires_grad)
        if func is torch.Tensor.__deepcopy__ and isinstance(args[0], FakeCudaTensor):
            return FakeCudaTensor.__deepcopy__(*args)
        if func is torch.Tensor.tolist and isinstance(args[0], FakeCudaTensor):
            return args[0].elem.tolist()  # a copy to the host, as on a GPU
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_cuda():
    """Inside: ``"cuda"`` is a stand-in GPU whose tensors live on the CPU (module docstring)."""
    saved = torch.cuda._lazy_init
    torch.cuda._lazy_init = lambda: None
    try:
        with _Dispatch(), _Function():
            yield
    finally:
        torch.cuda._lazy_init = saved


@contextlib.contextmanager
def gpu(*, triton=False):
    """:func:`patch_runtime` and :func:`fake_cuda` together, undone at exit: inside, a one-GPU
    machine stood in for."""
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        patch_runtime(mp, triton=triton)
        with fake_cuda():
            yield


def require_interpreter():
    """Skip the calling test unless the Triton kernels can run here: in the interpreter."""
    import os

    import pytest

    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("the Triton kernels run here only under TRITON_INTERPRET=1 (no GPU here); "
                    ".ci/run runs the triton tests in their own process with it set")


def patch_runtime(monkeypatch, *, triton=False):
    """What a GPU program asks of ``torch.cuda`` and of rmkernels, answered as on a one-GPU
    machine: ``is_available()`` is True, device 0 is current, named "Stand-in GPU", supports
    bf16, has no RNG state of its own to save and has allocated nothing; rmkernels' cuda
    backend is unavailable (its kernels need a GPU: the reference runs in its place), and so
    is the triton backend unless ``triton`` (its kernels then run in Triton's interpreter, on
    the stand-in's CPU data: TRITON_INTERPRET=1 must be set before triton is imported)."""
    from rmkernels import _backend

    c = torch.cuda
    for name, value in (("is_available", lambda: True), ("device_count", lambda: 1), ("current_device", lambda: 0),
                        ("set_device", lambda *a: None), ("get_device_name", lambda *a: "Stand-in GPU"),
                        ("is_bf16_supported", lambda *a, **k: True), ("synchronize", lambda *a, **k: None),
                        ("get_rng_state_all", lambda: []), ("set_rng_state_all", lambda states: None),
                        ("max_memory_allocated", lambda *a, **k: 0), ("memory_allocated", lambda *a, **k: 0),
                        ("reset_peak_memory_stats", lambda *a, **k: None)):
        monkeypatch.setattr(c, name, value)
    why_not = _backend._why_not
    if triton:  # a kernel launch takes GPU tensors only, as Triton's launcher on a GPU does
        from triton.runtime import interpreter

        launch = interpreter.GridExecutor.__call__

        def checked_launch(self, *args, **kwargs):
            for i, a in enumerate(list(args) + list(kwargs.values())):
                if isinstance(a, torch.Tensor) and not isinstance(a, FakeCudaTensor):
                    raise ValueError(f"Pointer argument (at {i}) cannot be accessed from Triton (cpu tensor?)")
            return launch(self, *args, **kwargs)

        monkeypatch.setattr(interpreter.GridExecutor, "__call__", checked_launch)
    gpu_only = ("cuda",) if triton else ("cuda", "triton")
    monkeypatch.setattr(_backend, "_why_not", lambda name, dt: "it runs kernels on a real GPU (this is a stand-in)"
                        if dt == "cuda" and name in gpu_only else why_not(name, dt))
