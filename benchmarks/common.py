"""What every per-op script shares: environment, providers, the correctness check and the
measure-all-providers-side-by-side loop that produces tidy rows."""
import datetime
import os
import platform
import re
import sys

import torch

from benchmarks import timing

FIELDS = ["op", "shape", "dims", "dtype", "provider", "mode", "metric", "median", "p20", "p80", "unit",
          "bytes", "device", "device_name", "threads", "clock", "torch", "rmkernels", "date", "run_id", "note",
          "command", "commit", "cpu_isa", "huge_pages", "samples"]
# command .. huge_pages: what produced a row, besides its date and machine (report.provenance lists
# them per run): the command (set by the entry point: benchmarks/run.py, a --results run), the
# checkout's commit (+ "-dirty" with uncommitted changes to tracked files), the variant of the C++
# CPU loops the process ran and whether their fresh outputs went into huge pages (both change CPU
# timings); samples: how many interleaved samples a time is over.


# ---------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------
def pick_device(requested=None):
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if m:
            name = m.group(1).strip()
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def device_slug(device):
    """File name of the results: e.g. ``cpu-amd-epyc-2c`` or ``nvidia-h100-80gb-hbm3``."""
    if device == "cuda":
        base = torch.cuda.get_device_name()
    else:
        name = device_name(device).split(" (")[0]
        base = f"cpu-{name}-{os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")


def rmk_version():
    try:
        import rmkernels
        return rmkernels.__version__
    except Exception as e:  # pragma: no cover
        return f"unimportable ({e})"


def git_commit():
    """The checkout's commit (short), with "-dirty" when tracked files have uncommitted changes;
    "" outside a git checkout."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=30)
        if head.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head.stdout.strip() + ("-dirty" if dirty else "")


def cpu_kernel_fields():
    """(variant of the C++ CPU loops, huge pages for their fresh outputs) of this process, as
    ``python -m rmkernels.info`` says them; ("", "") without the C++ kernels."""
    try:
        from rmkernels import _ext
    except Exception:  # pragma: no cover
        return "", ""
    if not _ext.CPP_AVAILABLE:
        return "", ""
    huge = getattr(_ext._C, "huge_pages", None)
    size, why = huge() if huge is not None else (0, "not built")
    return _ext.CPU_ISA or "", f"{size >> 20} MiB pages" if size else f"off ({why})"


_PROCESS_FIELDS = {}


def env_fields(device):
    now = datetime.datetime.now(datetime.timezone.utc)
    if not _PROCESS_FIELDS:
        isa, huge = cpu_kernel_fields()
        _PROCESS_FIELDS.update(commit=git_commit(), cpu_isa=isa, huge_pages=huge)
    return dict(device=device, device_name=device_name(device), threads=torch.get_num_threads(),
                clock=timing.clock(device)[1],
                torch=torch.__version__, rmkernels=rmk_version(), date=now.strftime("%Y-%m-%d %H:%M UTC"),
                **_PROCESS_FIELDS)


def rmk_backends(device):
    """The rmkernels backends to benchmark on `device`: every built one but ``reference``
    (the ground truth the outputs are checked against) and Triton under the CPU interpreter
    (which measures the interpreter)."""
    import rmkernels as rmk
    out = []
    for b in rmk.available_backends(device):
        if b == "reference" or (b == "triton" and device != "cuda"):
            continue
        out.append(b)
    return out


def has_op(name):
    import rmkernels as rmk
    return hasattr(rmk, name)


def cpu_kernel_pages_write(make, write):
    """A CPU floor in the pages the C++ kernels write a fresh output in (``OutputPages``,
    csrc/cpu/memory.cpp), or None without the C++ kernels: a callable that makes a block
    (``make()``), advises it for huge pages where the kernels would (``_C.advise_huge_pages``),
    writes it (``write(block)``) and withdraws the advice, as the kernels do after their writes."""
    from rmkernels import _ext

    if not _ext.CPP_AVAILABLE:
        return None

    def call():
        out = make()
        advised = _ext._C.advise_huge_pages(out.data_ptr(), out.nbytes)
        write(out)
        if advised:
            _ext._C.advise_huge_pages(out.data_ptr(), out.nbytes, False)
        return out
    return call


# ---------------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------------
def _flat(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for y in x for t in _flat(y)]
    return [t for t in (getattr(x, f) for f in getattr(x, "_fields", ())) if isinstance(t, torch.Tensor)]


def primary(out):
    """The tensor a benchmark differentiates: the output, or the first of a tuple."""
    return out if isinstance(out, torch.Tensor) else _flat(out)[0]


def mismatch(got, want, atol, rtol):
    """None if every tensor of `got` matches `want`, else a message saying where not."""
    g, w = _flat(got), _flat(want)
    if len(g) != len(w):
        return f"{len(g)} outputs, expected {len(w)}"
    for i, (a, b) in enumerate(zip(g, w)):
        a, b = a.detach().float().cpu(), b.detach().float().cpu()
        if a.shape != b.shape:
            a, b = a.reshape(-1), b.reshape(-1)
            if a.shape != b.shape:
                return f"output {i}: shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        bad = ~torch.isclose(a, b, atol=atol, rtol=rtol, equal_nan=True)
        if bad.any():
            j = int(bad.flatten().nonzero()[0])
            return (f"output {i}: {int(bad.sum())}/{bad.numel()} elements differ, max |diff| "
                    f"{float((a - b).abs().nan_to_num().max()):.3g}, first at flat {j}: "
                    f"{float(a.flatten()[j]):.6g} vs {float(b.flatten()[j]):.6g}")
    return None


def grads_of(fn, inputs, grad_idx, seed=0):
    """(output, grads of the primary output w.r.t. inputs[grad_idx]) with a fixed random
    upstream gradient."""
    out = fn(*inputs)
    p = primary(out)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    gout = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
    grads = torch.autograd.grad(p, [inputs[i] for i in grad_idx], gout, allow_unused=True)
    return out, grads


def tolerances(dtype, op):
    if dtype in (torch.bfloat16, torch.float16):
        return 3e-2, 3e-2
    if op == "gae":  # whitening divides by a std: absolute error scales with 1/std
        return 2e-4, 1e-4
    return 1e-4, 1e-4


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------
def bench_shape(op, shape, providers, inputs, *, grad_idx=(), reference=None, device="cpu",
                modes=("forward", "backward", "full"), bytes_per_mode=None, provider_bytes=None, floors=None,
                quick=False, log=print):
    """Check each provider of `providers` ({name: fn(*inputs)}) against `reference`, then
    time all of them side by side in each mode; return tidy rows (dicts, FIELDS). The fewest
    bytes a call must move (GB/s, distance to the memory floor): ``bytes_per_mode`` ({mode:
    bytes}), or for a provider that makes a smaller call than the others (the op alone)
    ``provider_bytes[provider]`` ({mode: bytes}). ``floors`` ({name: (callable, modes, bytes,
    note)}): what any call must at least do (no output to check), timed in the same interleaved
    samples as the providers of each of its modes; rows with the floor's name as provider."""
    env = env_fields(device)
    base = dict(op=op, shape=shape.name, dims=shape.dims_str(), dtype=shape.dtype, note=shape.note, **env)
    rows = []
    atol, rtol = tolerances(shape.torch_dtype, op)
    differentiable = bool(grad_idx)
    if not differentiable:
        modes = tuple(m for m in modes if m == "forward")
    grad_inputs = [inputs[i] for i in grad_idx]

    # 1. correctness (this also compiles the `compile` provider, forward and backward)
    ref_fn = reference or next(iter(providers.values()))
    if differentiable:
        want = grads_of(ref_fn, inputs, grad_idx)
    else:
        with torch.no_grad():
            want = ref_fn(*inputs)
    ok = {}
    for name, fn in providers.items():
        try:
            if differentiable:
                got = grads_of(fn, inputs, grad_idx)
            else:
                with torch.no_grad():
                    got = fn(*inputs)
            err = mismatch(got, want, atol, rtol)
        except Exception as e:  # a provider that cannot run is reported, not fatal
            err = f"{type(e).__name__}: {e}"
        ok[name] = err is None
        rows.append(dict(base, provider=name, mode="check", metric="correct", median=float(err is None),
                         p20=float("nan"), p80=float("nan"), unit="bool", bytes=0,
                         note=(base["note"] + "; " if base["note"] else "") + (err or "matches reference")))
        if err:
            log(f"  !! {op}/{shape.name}/{name}: output differs from the reference, not timed: {err}")
    timed = {k: v for k, v in providers.items() if ok[k]}

    # 2. timing, all providers of a mode side by side
    reps = 3 if quick else 15
    max_time = 1.0 if quick else 25.0
    for mode in modes:
        calls = {}
        for name, fn in timed.items():
            if mode == "forward":
                if differentiable:
                    calls[name] = (lambda fn=fn: fn(*inputs))
                else:
                    calls[name] = (lambda fn=fn: _no_grad(fn, inputs))
            elif mode == "backward":  # a fresh forward (untimed) before each timed backward
                calls[name] = (lambda fn=fn: primary(fn(*inputs)),
                               lambda p: torch.autograd.grad(p, grad_inputs, torch.ones_like(p), allow_unused=True))
            else:
                calls[name] = (lambda fn=fn: _fwd_bwd(fn, inputs, grad_inputs))
        if not calls:
            continue
        floor_calls = {k: f for k, (f, in_modes, _, _) in (floors or {}).items() if mode in in_modes}
        counts = {}
        res = timing.measure_interleaved({**calls, **floor_calls}, device=device, reps=reps,
                                         warmup=1 if quick else 3, max_time_s=max_time, counts=counts)
        for name in floor_calls:
            _, _, fbytes, fnote = floors[name]
            fbase = dict(base, provider=name, mode=mode, unit="ms", bytes=fbytes, note=fnote)
            rows.append(dict(fbase, metric="call_ms", median=res[name][0], p20=res[name][1], p80=res[name][2],
                             samples=counts[name]))
            if device == "cuda":
                d = timing.device_time(floor_calls[name])
                rows.append(dict(fbase, metric="device_ms", median=d[0], p20=d[1], p80=d[2]))

        def bytes_of(name, mode=mode):
            return ((provider_bytes or {}).get(name) or bytes_per_mode or {}).get(mode, 0)
        for name in calls:
            med, p20, p80 = res[name]
            nbytes = bytes_of(name)
            rows.append(dict(base, provider=name, mode=mode, metric="call_ms", median=med, p20=p20, p80=p80,
                             unit="ms", bytes=nbytes, samples=counts[name]))
            if nbytes:
                rows.append(dict(base, provider=name, mode=mode, metric="call_GBps", median=nbytes / med / 1e6,
                                 p20=nbytes / p80 / 1e6, p80=nbytes / p20 / 1e6, unit="GB/s", bytes=nbytes))
        if device == "cuda":
            for name, call in calls.items():
                nbytes = bytes_of(name)
                med, p20, p80 = timing.device_time(call)
                rows.append(dict(base, provider=name, mode=mode, metric="device_ms", median=med, p20=p20, p80=p80,
                                 unit="ms", bytes=nbytes))
                if nbytes:
                    rows.append(dict(base, provider=name, mode=mode, metric="device_GBps",
                                     median=nbytes / med / 1e6, p20=nbytes / p80 / 1e6, p80=nbytes / p20 / 1e6,
                                     unit="GB/s", bytes=nbytes))
        for name, call in calls.items():
            mib = timing.peak_memory_mib(call, device)
            rows.append(dict(base, provider=name, mode=mode, metric="peak_MiB", median=mib, p20=mib, p80=mib,
                             unit="MiB", bytes=bytes_of(name)))
        line = "  ".join(f"{k} {v[0]:.4g}" for k, v in res.items())
        log(f"  {op:8s} {shape.name:7s} {mode:8s} ms/call: {line}")
        calls.clear()
    return rows


def passed(rows):
    """The providers whose correctness check (a ``mode="check"`` row) in ``rows`` passed: only
    those are timed, anywhere."""
    return {r["provider"] for r in rows if r["mode"] == "check" and r["median"] == 1.0}


def _no_grad(fn, inputs):
    with torch.no_grad():
        return fn(*inputs)


def _fwd_bwd(fn, inputs, grad_inputs):
    p = primary(fn(*inputs))
    return torch.autograd.grad(p, grad_inputs, torch.ones_like(p), allow_unused=True)


def standalone_main(module, argv=None):
    """`python benchmarks/bench_<op>.py [--shapes ...] [--quick]`: run one op, print rows."""
    import argparse
    ap = argparse.ArgumentParser(description=module.__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", help="shape names (default: this op's named shapes)")
    ap.add_argument("--providers", nargs="*", help="only these providers")
    ap.add_argument("--device", choices=("cpu", "cuda"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="the *-t smoke-test shapes")
    ap.add_argument("--threads", type=int)
    if hasattr(module, "write_results"):
        ap.add_argument("--results", action="store_true",
                        help="write this op's committed benchmarks/results/<device>-*.csv and .md (every named shape "
                             "and provider, the full method, one thread; the other options do not apply)")
    args = ap.parse_args(argv)
    if getattr(args, "results", False):
        return module.write_results(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    timing.enable_cpu_peak_memory()
    rows = []
    for op in module.OPS:
        rows += module.run(op, device=device, shapes=args.shapes, quick=args.quick, tiny=args.tiny,
                           only=args.providers)
    from benchmarks import report
    print(report.markdown(rows))
    return rows


def select(providers, only):
    if not only:
        return providers
    return {k: v for k, v in providers.items() if k in only}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def write_op_results(measure, *, name, title, script, argv=None, method=""):
    """A one-op ``--results`` run (``bench_group_adv.py``, ``bench_reinforce.py``): one CPU thread,
    ``measure(device)`` -> tidy rows, written to the committed ``benchmarks/results/<device>-<name>.csv``
    and ``.md`` (the report's rows, table and targets) with the date, machine, command, the load
    average before and after, and ``method`` (how the rows were timed). Returns the rows."""
    import time

    from benchmarks import report
    from benchmarks.run import COMMITTED_DIR

    torch.set_num_threads(1)
    timing.enable_cpu_peak_memory()
    device = "cpu"
    load0 = os.getloadavg()[0]
    rows = measure(device)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    cmd = f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv)
    for r in rows:
        r["run_id"], r["command"] = run_id, cmd.strip()
    slug = device_slug(device)
    csv_path = os.path.join(COMMITTED_DIR, f"{slug}-{name}.csv")
    report.write_csv(rows, csv_path, merge=False)
    table_rows = report.read_csv(csv_path)  # the table and the plots are drawn from the CSV as written
    md = report.markdown(table_rows, title=f"rmkernels benchmarks: {title} on {slug}")
    md += (f"\n\nWritten by `{cmd.strip()}` ({rows[0]['date']}, {device_name(device)}, 1 torch thread, clock "
           f"{timing.clock(device)[1]}; 1-minute load average {load0:.1f} at the start, "
           f"{os.getloadavg()[0]:.1f} at the end). {method}\n")
    with open(os.path.join(COMMITTED_DIR, f"{slug}-{name}.md"), "w") as f:
        f.write(md)
    # <slug>-<name>-<op>.png: apart from a full run's <slug>-<op>.png, drawn from the main CSV
    plots = report.plots(table_rows, COMMITTED_DIR, f"{slug}-{name}")
    log(f"wrote {csv_path}, {slug}-{name}.md" + "".join(f", {os.path.basename(p)}" for p in plots))
    return rows
