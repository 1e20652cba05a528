"""Timers and floors.

CPU: ``time.perf_counter`` around a sample of ``n`` calls (``n`` calibrated so a sample
takes >= ``min_sample_s``), warm-up first, then median / p20 / p80 of the per-call time over
the samples. Providers of one (op, shape, mode) are measured **interleaved**, one sample of
each in turn (``measure_interleaved``), so a burst of load from the other users of a shared
machine hits all of them alike and their ratios stay meaningful.

GPU: device time from ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls;
a CUDA-event loop when triton is absent) and full-call time = wall time of one call plus
``torch.cuda.synchronize()`` (what a caller pays: Python, dispatch, launches and the kernels).
Floors measured in the same run: the bandwidth of a large device-to-device copy (bytes read +
written) and the time of an empty kernel launch.

Peak memory: the bytes a call allocates above what is live before it. On a GPU,
``torch.cuda.max_memory_allocated``; on the CPU, the process's peak RSS (``VmHWM``, reset
through ``/proc/self/clear_refs``) with glibc told to ``mmap`` every block >= 64 KiB, so a
freed tensor goes back to the OS and the high-water mark sees each call's own peak.
"""
import ctypes
import gc
import math
import os
import re
import statistics
import time

import torch


def quantiles(xs):
    """(median, p20, p80) of a list of numbers."""
    xs = sorted(xs)
    if not xs:
        return float("nan"), float("nan"), float("nan")

    def q(p):
        k = (len(xs) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
    return statistics.median(xs), q(0.2), q(0.8)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _as_pair(f):
    """A benchmark callable is `fn` or `(setup, fn)`: `setup()` runs untimed before each call
    and its result is passed to `fn` (e.g. a fresh forward before a timed backward)."""
    return f if isinstance(f, tuple) else (None, f)


def _timed_calls(f, n, device):
    """Seconds spent in `n` calls of `f` (setup excluded)."""
    setup, fn = _as_pair(f)
    if setup is None:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(device)
        return time.perf_counter() - t0
    total = 0.0
    for _ in range(n):
        arg = setup()
        _sync(device)
        t0 = time.perf_counter()
        fn(arg)
        _sync(device)
        total += time.perf_counter() - t0
        del arg
    return total


def calibrate(f, device="cpu", min_sample_s=2e-3, max_n=1000):
    """Calls per sample so that a sample lasts at least `min_sample_s`."""
    dt = max(_timed_calls(f, 1, device), 1e-7)
    return int(min(max_n, max(1, math.ceil(min_sample_s / dt))))


def measure_interleaved(fns, device="cpu", reps=15, warmup=3, min_sample_s=2e-3, max_time_s=20.0):
    """Full-call time of each of `fns` ({name: callable or (setup, callable)}), in ms per
    call: {name: (median, p20, p80)}. Samples of the providers alternate; each sample is `n`
    calls (calibrated per provider) closed by a device synchronisation. Stops early (with at
    least 3 samples each) once `max_time_s` is spent."""
    for f in fns.values():
        _timed_calls(f, warmup, device)
    ns = {k: calibrate(f, device, min_sample_s) for k, f in fns.items()}
    samples = {k: [] for k in fns}
    start = time.perf_counter()
    for r in range(reps):
        for k, f in fns.items():
            samples[k].append(_timed_calls(f, ns[k], device) / ns[k] * 1e3)
        if r >= 2 and time.perf_counter() - start > max_time_s:
            break
    return {k: quantiles(v) for k, v in samples.items()}


def device_time(f, reps=50, warmup=10):
    """GPU device time in ms: (median, p20, p80). `f` is a callable or `(setup, fn)`."""
    setup, fn = _as_pair(f)
    if setup is not None:  # events around the timed part only
        times = []
        cache = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")
        for i in range(warmup + reps):
            arg = setup()
            cache.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn(arg)
            e.record()
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(s.elapsed_time(e))
            del arg
        return quantiles(times)
    try:
        from triton.testing import do_bench
        res = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8], return_mode="median")
        return tuple(float(x) for x in res)
    except ImportError:
        pass
    for _ in range(warmup):
        fn()
    cache = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")
    times = []
    for _ in range(reps):
        cache.zero_()  # flush L2 as do_bench does
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return quantiles(times)


# ---------------------------------------------------------------------------------------
# Hardware floors (GPU)
# ---------------------------------------------------------------------------------------
def copy_bandwidth_gbps(nbytes=1 << 30):
    """Measured device-to-device copy bandwidth, GB/s counting bytes read + written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = device_time(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return tuple(2 * nbytes / (t * 1e-3) / 1e9 for t in ms), ms


def empty_launch_ms():
    """Device time of an empty kernel launch (a Triton kernel with no body; a one-element
    fill when triton is absent)."""
    try:
        import triton

        @triton.jit
        def _empty(x_ptr):
            pass

        x = torch.empty(1, device="cuda")
        return device_time(lambda: _empty[(1,)](x))
    except ImportError:
        x = torch.empty(1, device="cuda")
        return device_time(lambda: x.fill_(0))


# ---------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------
_MMAP_SET = False


def _cpu_mmap_small_threshold():
    global _MMAP_SET
    if _MMAP_SET:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        _MMAP_SET = bool(libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024))
    except OSError:
        _MMAP_SET = False
    return _MMAP_SET


def _status_mib(key):
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.M)
    return int(m.group(1)) / 1024 if m else float("nan")


def peak_memory_mib(fn, device="cpu"):
    """MiB a call to `fn` allocates above what is live before it (its peak), or NaN where
    it cannot be measured. The call's result is dropped before returning."""
    setup, call = _as_pair(fn)
    if setup is not None:
        arg = setup()
        fn = lambda: call(arg)  # noqa: E731  (the setup's own memory is live before: not counted)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del out
        return (peak - base) / 2**20
    if not (_cpu_mmap_small_threshold() and os.path.exists("/proc/self/clear_refs")):
        return float("nan")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return float("nan")
    base = _status_mib("VmRSS")
    out = fn()
    peak = _status_mib("VmHWM")
    del out
    return max(peak - base, 0.0)


def enable_cpu_peak_memory():
    """Call once, early (before the big inputs are allocated)."""
    return _cpu_mmap_small_threshold()
