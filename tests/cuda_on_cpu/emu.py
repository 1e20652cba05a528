"""Run the torch-free CUDA launchers on the CPU from pytest (the CUDA-on-CPU layer).

A test describes a program: input tensors (any strides), output buffers, and calls of the C
entry points in ``shims/*.cpp`` (one per launcher)::

    prog = Program()
    idx = prog.out((B,), torch.int64)
    prog.call("rmk_last_token_index", prog.inp(mask), 1, B, T, mask.stride(0), mask.stride(1), idx)
    res = prog.run()                # in the AddressSanitizer worker; "tsan" for races
    res.rcs[0] == 0; res[idx]       # the cudaError_t of each call; the output as a tensor

``inp(t)`` passes a pointer to a malloc'd copy of exactly the storage span t's view covers,
so one element past the view is outside the allocation. Outputs start filled with 0xFF bytes
(NaN for floats) unless ``fill`` says otherwise, so unwritten elements show.

The calls run in a worker process (worker.py) with the sanitizer runtime preloaded; one
worker per variant lives for the pytest session and is restarted after a failure. A
sanitizer report, a divergent barrier (reported at once by the scheduler) or a worker that
takes longer than ``timeout`` seconds fails the test with the worker's report.
"""
import atexit
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from . import build

HERE = os.path.dirname(os.path.abspath(__file__))

DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}  # cuda_common.cuh DType

SANITIZER_OPTIONS = {
    "asan": ("ASAN_OPTIONS", "detect_leaks=0:halt_on_error=1:abort_on_error=0:detect_stack_use_after_return=0:"
                             "allocator_may_return_null=1:symbolize=1:exitcode=86"),
    "tsan": ("TSAN_OPTIONS", "halt_on_error=1:exitcode=86:report_signal_unsafe=0:history_size=4"),
}


class EmuFailure(AssertionError):
    """A launch under the CUDA-on-CPU layer failed: sanitizer report, divergent barrier,
    crash or timeout. The message is the worker's report."""


class Buf:
    def __init__(self, name, shape, dtype, nbytes):
        self.name, self.shape, self.dtype, self.nbytes = name, tuple(shape), dtype, nbytes


def _span_elems(t):
    if t.numel() == 0:
        return 0
    assert all(s >= 0 for s in t.stride()), "negative strides are not supported"
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


class Program:
    def __init__(self):
        self.buffers, self.inputs, self.calls, self.outputs = {}, {}, [], []

    def _name(self):
        return f"b{len(self.buffers)}"

    def inp(self, t, *, output=False):
        """A device copy of the storage span that the view `t` covers (its strides are the
        caller's to pass). With output=True the kernel's writes to it are read back."""
        t = t.detach()
        span = _span_elems(t)
        flat = t.as_strided((span,), (1,)).contiguous() if span else t.new_empty(0)
        raw = flat.view(torch.uint8)
        name = self._name()
        b = Buf(name, (span,), t.dtype, span * t.element_size())
        self.buffers[name] = {"nbytes": b.nbytes, "input": True}
        self.inputs[name] = raw.numpy().copy()
        if output:
            self.outputs.append(name)
        return b

    def out(self, shape, dtype, fill=0xFF):
        shape = tuple(int(s) for s in shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
        name = self._name()
        b = Buf(name, shape, dtype, nbytes)
        self.buffers[name] = {"nbytes": nbytes, "fill": int(fill)}
        self.outputs.append(name)
        return b

    def call(self, fn, *args):
        enc = []
        for a in args:
            if isinstance(a, Buf):
                enc.append(("p", a.name))
            elif isinstance(a, tuple) and len(a) == 2 and isinstance(a[0], Buf) and isinstance(a[1], int):
                if not 0 <= a[1] <= a[0].nbytes:
                    raise ValueError(f"argument {a!r} of {fn}: byte offset outside {a[0].name}'s {a[0].nbytes} bytes")
                enc.append(("q", [a[0].name, a[1]]))  # (buffer, byte offset): a pointer into it
            elif a is None:
                enc.append(("p", None))
            elif isinstance(a, (bool, int, np.integer)):
                enc.append(("i", int(a)))
            elif isinstance(a, (float, np.floating)):
                enc.append(("f", float(a)))
            else:
                raise TypeError(f"argument {a!r} of {fn}: Buf, (Buf, byte offset), None, int or float")
        self.calls.append({"fn": fn, "args": enc})

    def run(self, variant="asan", timeout=600):
        return _worker(variant).run(self, timeout)


class Result:
    def __init__(self, rcs, bufs, raw):
        self.rcs, self._bufs, self._raw = rcs, bufs, raw

    def __getitem__(self, buf):
        raw = torch.from_numpy(self._raw[buf.name].copy())
        return raw.view(buf.dtype).reshape(buf.shape) if buf.nbytes else torch.empty(buf.shape, dtype=buf.dtype)


class Worker:
    def __init__(self, variant):
        self.variant = variant
        self.proc = None
        self.tmp = tempfile.mkdtemp(prefix=f"rmk_emu_{variant}_")
        self.n = 0

    def _start(self):
        lib = build.build(self.variant)
        env = dict(os.environ)
        env["LD_PRELOAD"] = build.sanitizer_runtime(self.variant)
        key, opts = SANITIZER_OPTIONS[self.variant]
        env[key] = opts
        env["OPENBLAS_NUM_THREADS"] = "1"
        # The layer's per-thread state uses initial-exec TLS (emu.h, RMK_EMU_TLS), so the
        # library's whole TLS segment (with the kernels' __shared__ arrays) must fit in the static
        # TLS space glibc keeps for libraries loaded later: 1 MiB of it (default: a few KiB).
        tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
        env["GLIBC_TUNABLES"] = ":".join(tunables + ["glibc.rtld.optional_static_tls=1048576"])
        env["OMP_NUM_THREADS"] = "1"
        self.log_path = os.path.join(self.tmp, f"stderr-{time.time_ns()}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "worker.py"), lib], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, env=env, text=True, bufsize=1)

    def _report(self, what):
        self.log.flush()
        with open(self.log_path) as f:
            text = f.read()
        self.stop()
        return EmuFailure(f"CUDA-on-CPU ({self.variant}) {what}:\n{text[-12000:]}")

    def stop(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    def run(self, prog, timeout):
        if self.variant == "tsan":
            # A fresh process for every ThreadSanitizer program: its state from an earlier
            # program can hide a race in a later one (test_layer.py's cross-block race went
            # unreported after a one-block launch of the same kernel in the same process).
            self.stop()
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.n += 1
        d = os.path.join(self.tmp, f"case{self.n}")
        os.makedirs(d)
        try:
            with open(os.path.join(d, "case.json"), "w") as f:
                json.dump({"buffers": prog.buffers, "calls": prog.calls, "outputs": prog.outputs}, f)
            np.savez(os.path.join(d, "in.npz"), **prog.inputs)
            try:
                self.proc.stdin.write(json.dumps({"dir": d}) + "\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                raise self._report(f"worker died before the request (exit {self.proc.poll()})") from None
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not ready:
                raise self._report(f"timed out after {timeout} s (a hang: a barrier or a loop that never ends)")
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                raise self._report(f"worker stopped with exit code {self.proc.returncode}")
            rcs = json.loads(line)["rcs"]
            with np.load(os.path.join(d, "out.npz"), allow_pickle=False) as z:
                raw = {k: z[k] for k in z.files}
            return Result(rcs, prog.buffers, raw)
        finally:
            shutil.rmtree(d, ignore_errors=True)


_WORKERS = {}


def _worker(variant):
    w = _WORKERS.get(variant)
    if w is None:
        w = _WORKERS[variant] = Worker(variant)
    return w


@atexit.register
def _stop_all():
    for w in _WORKERS.values():
        w.stop()
        shutil.rmtree(w.tmp, ignore_errors=True)
