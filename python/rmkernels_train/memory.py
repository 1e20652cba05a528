"""Live tensor memory on the CPU, the analogue of a GPU allocator's ``max_memory_allocated``.

torch's CPU allocator keeps no statistics of its own. With ``torch.profiler.profile(
profile_memory=True)`` it reports each allocation (``+bytes``) and free (``-bytes``) made on
the profiled thread while the profiler runs, with ``total_allocated``: its count of the bytes
of the blocks it knows of that are alive. :func:`allocator_events` reads them from a
finished profiler, in time order.

- :func:`cpu_peak_bytes` (``benchmarks/timing.py``: one op call): the running sum of the
  events, its maximum above what was live before.
- :class:`LiveTensorProfile` (``rmkernels-train reward --profile-memory``): absolute live
  bytes. The per-thread sum misses what another thread frees (measured: under 2-rank
  ``--fsdp`` on gloo its live bytes at each step's start grew step after step, by about a
  decoder layer's gradients, on some ranks: blocks whose last reference a gloo worker thread
  dropped), and a block allocated before the profiler started is not known at all. So
  :meth:`LiveTensorProfile.enable` turns on the allocator's own accounting (the c10 flag
  ``caffe2_report_cpu_memory_usage``, set through ctypes; it stays on for the rest of the
  process, since a block freed after it were turned off would stay in its count): from then on
  every block allocated on any thread is known and every free of it, on any thread, is
  subtracted (the same run's live bytes at each step's start then stay equal); the profiler
  runs over the training steps only, and its events' ``total_allocated`` is the live bytes.
"""
import contextlib
import ctypes
import os

import torch

STEP_MARK = "rmkernels_train.step"  # record_function name of a profiled step: "<STEP_MARK> <n>"


def _walk(events):
    for e in events:
        yield e
        yield from _walk(e.children)


def allocator_events(prof, device="cpu"):
    """``[(time_ns, nbytes, total_allocated)]`` of the allocator events on ``device`` of a
    finished ``torch.profiler.profile(profile_memory=True)``, in time order: ``nbytes > 0``
    an allocation, ``< 0`` a free; ``total_allocated`` the allocator's live bytes after it."""
    out = []
    for e in _walk(prof.profiler.kineto_results.experimental_event_tree()):
        f = e.typed[1]
        if type(f).__name__ == "_ExtraFields_Allocation" and str(f.device) == device:
            out.append((e.start_time_ns, f.alloc_size, f.total_allocated))
    out.sort(key=lambda x: x[0])
    return out


def running_peak(events, base=0):
    """``(peak, end)``: the largest and the last value of ``base`` plus the running sum of
    the events' ``nbytes``; ``peak`` is at least ``base``."""
    cur = peak = base
    for _, n, *_ in events:
        cur += n
        peak = max(peak, cur)
    return peak, cur


def cpu_peak_bytes(fn):
    """Peak of the bytes torch's CPU allocator holds during ``fn()`` above what it held
    before, from the calling thread's events (the result of ``fn`` is dropped inside the
    window)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    return running_peak(allocator_events(prof))[0]


def _accounting_flag():
    """The c10 flag that makes the CPU allocator keep its count of live bytes (every thread)."""
    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    names = [n for n in ("libc10.so", "libc10.dylib", "c10.dll") if os.path.exists(os.path.join(libdir, n))]
    if not names:
        raise OSError(f"no c10 library in {libdir}")
    return ctypes.c_bool.in_dll(ctypes.CDLL(os.path.join(libdir, names[0])), "FLAGS_caffe2_report_cpu_memory_usage")


class LiveTensorProfile:
    """Live tensor bytes (torch's CPU allocator) over training steps, per process:
    :meth:`enable` before the data and model exist, :meth:`begin` before the first step to
    measure, each such step inside :meth:`step` (a ``record_function`` mark), :meth:`stop`
    after the last. :meth:`stop` returns, in MiB:

    - ``peak_MiB``: the largest live tensor bytes during the marked steps -- absolute: all
      that was allocated since :meth:`enable` and is still alive, so it includes what was
      live when the first marked step began (the model's parameters and buffers, DDP's
      gradient buckets, anything else still referenced) and what the steps allocate
      (gradients, activations, FSDP's gathered layers, AdamW state and its temporaries);
    - ``at_step_start_MiB``: the live bytes as each marked step began (from the second step
      on the same, when nothing leaks);
    - ``step_peak_MiB``: the peak within each marked step;
    - ``events``: how many allocator events the steps made.

    A CPU measure: blocks allocated before :meth:`enable` are not counted (they are not
    known to the allocator's accounting). On a GPU ``torch.cuda.max_memory_allocated`` is the
    allocator's own figure."""

    def __init__(self):
        self.prof = None
        self.result = None

    def enable(self):
        """Turn on the allocator's accounting of live bytes (every thread; for the rest of
        the process). Raises RuntimeError where this torch build has no such switch."""
        try:
            _accounting_flag().value = True
        except (OSError, ValueError, AttributeError) as e:
            raise RuntimeError(f"this torch build does not expose its CPU allocator's accounting "
                               f"(FLAGS_caffe2_report_cpu_memory_usage in libc10): {e}") from None
        return self

    def begin(self):
        """Start the profiler (with :meth:`enable` done before)."""
        from torch.profiler import ProfilerActivity, profile

        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.prof.__enter__()
        return self

    @property
    def active(self):
        return self.prof is not None

    def step(self, n):
        """Context manager marking training step ``n`` (nothing once stopped)."""
        if self.prof is None:
            return contextlib.nullcontext()
        return torch.profiler.record_function(f"{STEP_MARK} {n}")

    def stop(self):
        """Stop the profiler and return the figures (the same ones on later calls)."""
        if self.prof is None:
            return self.result
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        marks = sorted((e.start_ns(), e.end_ns()) for e in prof.profiler.kineto_results.events()
                       if e.name().startswith(STEP_MARK + " "))
        events = allocator_events(prof)
        del prof
        self.result = self.figures(events, marks)
        return self.result

    @staticmethod
    def figures(events, windows):
        """:meth:`stop`'s figures from :func:`allocator_events` and the steps' ``(start_ns,
        end_ns)`` windows (in time order). The live bytes as a step begins: the first event
        at or after its start, less that event's bytes."""
        mib = 2 ** -20
        starts, peaks, counted = [], [], 0
        for a, b in windows:
            inside = [e for e in events if a <= e[0] <= b]
            after = [e for e in events if e[0] >= a]
            if not after:
                continue
            start = after[0][2] - after[0][1]
            starts.append(start)
            peaks.append(max([start] + [e[2] for e in inside]))
            counted += len(inside)
        return {"steps": len(windows), "events": counted,
                "peak_MiB": round(max(peaks) * mib, 2) if peaks else None,
                "at_step_start_MiB": [round(x * mib, 2) for x in starts],
                "step_peak_MiB": [round(x * mib, 2) for x in peaks]}
