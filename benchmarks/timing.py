"""Timers and floors.

CPU: the thread CPU time with one torch thread, else ``time.perf_counter`` (see ``clock``),
around a sample of ``n`` calls (``n`` calibrated so a sample
takes >= ``min_sample_s``), warm-up first, then median / p20 / p80 of the per-call time over
the samples. Providers of one (op, shape, mode) are measured **interleaved**, one sample of
each in turn (``measure_interleaved``), so a burst of load from the other users of a shared
machine hits all of them alike and their ratios stay meaningful.

GPU: device time from ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls;
a CUDA-event loop when triton is absent) and full-call time = wall time of one call plus
``torch.cuda.synchronize()``, each call synchronised (what a caller pays: Python, dispatch,
launches and the kernels).
Floors measured in the same run: the bandwidth of a large device-to-device copy (bytes read +
written) and the time of an empty kernel launch.

Peak memory: the bytes a call allocates above what is live before it. On a GPU,
``torch.cuda.max_memory_allocated``; on the CPU, the running sum of the allocation and free
events of torch's CPU allocator recorded by ``torch.profiler`` (``profile_memory=True``) in
one extra, untimed call.
"""
import gc
import math
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


def clock(device="cpu"):
    """(seconds function, name) of the clock the timings use.

    On the CPU with one torch thread every instruction of a call runs on the calling thread,
    so its thread CPU time (``time.thread_time``: user + system, page faults included) is the
    call's cost with the time other processes held the core left out: on a shared machine
    that is the figure that does not move with their load (it equals the wall time on an
    idle machine). With more threads, or on a GPU, wall time (``time.perf_counter``)."""
    if device == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time, "thread-cpu-time"
    return time.perf_counter, "wall"


def _as_pair(f):
    """A benchmark callable is `fn` or `(setup, fn)`: `setup()` runs untimed before each call
    and its result is passed to `fn` (e.g. a fresh forward before a timed backward)."""
    return f if isinstance(f, tuple) else (None, f)


def _timed_calls(f, n, device):
    """Seconds spent in `n` calls of `f` (setup excluded)."""
    setup, fn = _as_pair(f)
    now = clock(device)[0]
    if setup is None:
        _sync(device)
        t0 = now()
        for _ in range(n):
            fn()
            _sync(device)  # on a GPU: one call + synchronize, what a caller waits for
        return now() - t0
    total = 0.0
    for _ in range(n):
        arg = setup()
        _sync(device)
        t0 = now()
        fn(arg)
        _sync(device)
        total += now() - t0
        del arg
    return total


def calibrate(f, device="cpu", min_sample_s=2e-3, max_n=1000):
    """Calls per sample so that a sample lasts at least `min_sample_s`."""
    dt = max(_timed_calls(f, 1, device), 1e-7)
    return int(min(max_n, max(1, math.ceil(min_sample_s / dt))))


def measure_interleaved(fns, device="cpu", reps=15, warmup=3, min_sample_s=2e-3, max_time_s=20.0, counts=None):
    """Full-call time of each of `fns` ({name: callable or (setup, callable)}), in ms per
    call: {name: (median, p20, p80)}. Samples of the providers alternate; each sample is `n`
    calls (calibrated per provider) closed by a device synchronisation. Stops early (with at
    least 3 samples each) once `max_time_s` is spent. ``counts`` (a dict): filled with the
    number of samples each quantile was taken over (a row records it: ``samples``)."""
    for f in fns.values():
        _timed_calls(f, warmup, device)
    ns = {k: calibrate(f, device, min_sample_s) for k, f in fns.items()}
    samples = {k: [] for k in fns}
    start = time.perf_counter()  # the time budget is wall time
    for r in range(reps):
        for k, f in fns.items():
            samples[k].append(_timed_calls(f, ns[k], device) / ns[k] * 1e3)
        if r >= 2 and time.perf_counter() - start > max_time_s:
            break
    if counts is not None:
        counts.update({k: len(v) for k, v in samples.items()})
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
    src = dst = None  # free both before emptying the cache
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
def _cpu_peak_bytes(fn):
    """Peak of the bytes torch's CPU allocator holds during `fn()` above what it held before
    (``rmkernels_train.memory.cpu_peak_bytes``: the profiler's allocation events)."""
    from rmkernels_train.memory import cpu_peak_bytes

    return cpu_peak_bytes(fn)


def peak_memory_mib(fn, device="cpu"):
    """MiB a call to `fn` allocates above what is live before it (its peak), or NaN where
    it cannot be measured. `fn` is a callable or `(setup, fn)` (the setup's memory is live
    before the call: not counted). The call's result is dropped before returning."""
    setup, call = _as_pair(fn)
    if setup is not None:
        arg = setup()
        fn = lambda: call(arg)  # noqa: E731
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
    try:
        return _cpu_peak_bytes(fn) / 2**20
    except Exception:  # profiler unavailable: report nothing rather than a wrong figure
        return float("nan")


_ALLOCATOR_SET = None
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_STEADY_MMAP = 32 * 2**20  # glibc's own ceiling for its dynamic mmap threshold


def _libc():
    import ctypes

    return ctypes.CDLL("libc.so.6")


def steady_allocator():
    """Put glibc malloc in the state a warmed-up training process reaches anyway, and keep
    it there: blocks up to 32 MiB come from the heap (``M_MMAP_THRESHOLD`` = 32 MiB, glibc's
    own ceiling for its dynamic threshold) and freed heap memory is kept
    (``M_TRIM_THRESHOLD`` = 1 GiB). Without this, whether a 16 MiB gradient buffer is
    recycled or freshly mmapped (4096 page faults) depends on the allocation history of the
    process, and that, not the op, decides CPU timings of the backward passes. Blocks over
    32 MiB are mmapped (and faulted in) on every call, for every provider alike, as glibc
    always does. Returns True if it was applied (glibc only)."""
    global _ALLOCATOR_SET
    if _ALLOCATOR_SET is None:
        try:
            libc = _libc()
            _ALLOCATOR_SET = bool(libc.mallopt(_M_MMAP_THRESHOLD, _STEADY_MMAP)) and \
                bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**30))
        except (OSError, AttributeError):
            _ALLOCATOR_SET = False
    return _ALLOCATOR_SET


OUTPUT_MEMORY = ("recycled", "fresh pages")


class output_memory:
    """Context in which every call's large CPU outputs land in memory of a given state, for
    every provider alike (glibc; ``ok`` is False and nothing changes elsewhere):

    - ``"recycled"``: blocks up to 1 GiB come from the heap (``M_MMAP_THRESHOLD`` raised until
      exit) and ``reserve_bytes`` of it are touched and freed on entry (kept: the steady trim
      threshold), so an output is carved from pages the process already touched from the first
      call on, as a warmed-up caching allocator gives (without the reserve the heap grows by a
      fresh block per call until its free blocks happen to coalesce into one large enough);
    - ``"fresh pages"``: before each call (untimed, ``calls``) ``malloc_trim(0)`` returns every
      free page to the kernel, so each output is faulted in and zeroed page by page as it is
      first written: what a plain glibc process pays for a block over 32 MiB on every call.

    Outside it, which of the two a call meets depends on the allocation history of the
    process (a free heap block big enough is reused whatever the mmap threshold), so a
    comparison with a floor (writing the output once) is made in each state, both sides alike.
    ``calls(fns)`` turns {name: callable} into what ``measure_interleaved`` takes."""

    def __init__(self, state, reserve_bytes=256 * 2**20):
        if state not in OUTPUT_MEMORY:
            raise ValueError(f"state must be one of {OUTPUT_MEMORY}, got {state!r}")
        self.state = state
        self.reserve_bytes = reserve_bytes
        self.ok = False

    def __enter__(self):
        self.ok = bool(steady_allocator())
        if self.ok and self.state == "recycled":
            self.ok = bool(_libc().mallopt(_M_MMAP_THRESHOLD, 2**30))
            if self.ok:
                torch.empty(self.reserve_bytes, dtype=torch.uint8).fill_(0)  # touched, freed, kept
        return self

    def __exit__(self, *exc):
        if self.ok and self.state == "recycled":
            _libc().mallopt(_M_MMAP_THRESHOLD, _STEADY_MMAP)

    def calls(self, fns):
        if not (self.ok and self.state == "fresh pages"):
            return dict(fns)
        trim = _libc().malloc_trim
        return {k: (lambda: trim(0), (lambda _, f=f: f())) for k, f in fns.items()}


def enable_cpu_peak_memory():
    """Set-up of a CPU benchmark process: the steady allocator (see ``steady_allocator``).
    CPU peak memory itself needs nothing (it reads the profiler's allocation events)."""
    return steady_allocator()
