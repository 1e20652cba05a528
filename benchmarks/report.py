"""Tidy CSV in, markdown table and PNG plots out (everything drawn from the CSV rows)."""
import csv
import math
import os

from benchmarks.common import FIELDS

# The ways bench_pooling writes pool-l's grad_hidden once: torch.zeros_like, and (CPU) zeroing it
# in the huge pages the C++ kernel's gradient is advised for.
POOL_FLOORS = ("floor-write-grad", "floor-write-grad, huge pages")
PROVIDER_ORDER = ["hf", "torch", "compile", "rmk-cpu", "rmk-cuda", "rmk-triton", *POOL_FLOORS,
                  "kernels-cpu", "kernels-cuda", "kernels-triton"]
OP_ORDER = ["pooling", "bt", "pair", "gae", "grpo", "rpp", "remax", "e2e", "floor"]
MODE_ORDER = ["forward", "backward", "full", "step", "check"]
SHAPE_ORDER = ["pool-s", "pool-l", "bt-s", "bt-l", "pair-l", "gae-s", "gae-l", "gae-xl", "grpo-l", "grpo-xl",
               "grpo-l-bb", "grpo-xl-bb", "grpo-l-t1", "rpp-l", "rpp-xl", "remax-l", "remax-xl"]


def _key(r):
    def idx(lst, x):
        return lst.index(x) if x in lst else len(lst)
    return (idx(OP_ORDER, r["op"]), idx(SHAPE_ORDER, r["shape"]), r["shape"], idx(MODE_ORDER, r["mode"]),
            idx(PROVIDER_ORDER, r["provider"]), r["provider"], r["metric"])


def _num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def read_csv(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("median", "p20", "p80", "bytes"):
            r[k] = _num(r.get(k))
    return rows


def write_csv(rows, path, merge=True):
    """Write `rows`; with `merge`, keep the rows of the file whose (op, shape) groups this run
    did not measure (a group is always replaced whole, so its ratios stay same-run ratios)."""
    old = read_csv(path) if merge else []
    groups = {(r["op"], r["shape"]) for r in rows}
    keep = [r for r in old if (r["op"], r["shape"]) not in groups]
    allrows = sorted(keep + list(rows), key=_key)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in allrows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in FIELDS})
    return allrows


def _get(rows, **kw):
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


def _val(rows, **kw):
    m = _get(rows, **kw)
    return m[0]["median"] if m else float("nan")


def _fmt_ms(x):
    if math.isnan(x):
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 1:
        return f"{x:.2f}"
    if x >= 0.01:
        return f"{x:.3f}"
    return f"{x * 1e3:.1f} us"


def _fmt_f(x, digits):
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def _fmt_x(x):
    if math.isnan(x) or math.isinf(x):
        return "-"
    return f"{x:.0f}x" if x >= 100 else f"{x:.1f}x" if x >= 10 else f"{x:.2f}x"


def floors(rows):
    """(copy GB/s, empty-launch ms) measured in the run, or (nan, nan) on a CPU."""
    return _val(rows, op="floor", metric="copy_GBps"), _val(rows, op="floor", metric="launch_ms")


def markdown(rows, title=None):
    rows = sorted(rows, key=_key)
    out = []
    if title:
        out += [f"# {title}", ""]
    if rows:
        r0 = rows[0]
        out += [f"Device: **{r0['device_name']}** ({r0['device']}, {r0['threads']} threads, clock: "
                f"{r0.get('clock', 'wall')}); torch {r0['torch']}; rmkernels {r0['rmkernels']}; {r0['date']}.", ""]
    copy_gbps, launch_ms = floors(rows)
    gpu = not math.isnan(copy_gbps)
    if gpu:
        out += [f"Floors measured in this run: device-to-device copy **{copy_gbps:.0f} GB/s** (read + write), "
                f"empty kernel launch **{launch_ms * 1e3:.1f} us**.", ""]
    out += targets(rows)
    groups = []
    for r in rows:
        if r["op"] in ("floor", "e2e") or r["mode"] == "check":
            continue
        g = (r["op"], r["shape"], r["mode"])
        if g not in groups:
            groups.append(g)
    if groups:
        out += ["## Per op, shape and mode", "",
                "Median time per full call (p20-p80 of the interleaved samples; n = how many, where recorded), "
                "speedups are same-run ratios of medians. "
                "`peak` = MiB allocated by one call above its inputs. GB/s from the fewest bytes the op must move.",
                ""]
        head = "| op | shape (as run) | mode | provider | ms/call | p20-p80 | vs hf | vs compile | peak MiB | GB/s |"
        sep = "|---|---|---|---|---:|---|---:|---:|---:|---:|"
        if gpu:
            head += " device ms | device GB/s | % copy BW | x floor |"
            sep += "---:|---:|---:|---:|"
        out += [head, sep]
        for op, shape, mode in groups:
            g = _get(rows, op=op, shape=shape, mode=mode)
            hf = _val(g, provider="hf", metric="call_ms")
            comp = _val(g, provider="compile", metric="call_ms")
            provs = []
            for r in g:
                if r["provider"] not in provs:
                    provs.append(r["provider"])
            for p in provs:
                ms = _val(g, provider=p, metric="call_ms")
                cr = _get(g, provider=p, metric="call_ms")
                if not cr:
                    continue
                c = cr[0]
                desc = f"{shape} [{c['dims']}, {c['dtype']}]"
                n = f" (n={c['samples']})" if c.get("samples") not in (None, "") else ""
                spread = f"{_fmt_ms(c['p20'])}-{_fmt_ms(c['p80'])}{n}"
                line = (f"| {op} | {desc} | {mode} | {p} | {_fmt_ms(ms)} | {spread} | "
                        f"{_fmt_x(math.nan if _not_vs_baselines(p) else hf / ms)} | "
                        f"{_fmt_x(math.nan if _not_vs_baselines(p) else comp / ms)} | "
                        f"{_fmt_f(_val(g, provider=p, metric='peak_MiB'), 1)} | "
                        f"{_fmt_f(_val(g, provider=p, metric='call_GBps'), 2)} |")
                if gpu:
                    dms = _val(g, provider=p, metric="device_ms")
                    nbytes = c["bytes"]
                    floor_ms = max(nbytes / (copy_gbps * 1e6), launch_ms) if nbytes else launch_ms
                    dgb = _val(g, provider=p, metric="device_GBps")
                    pct = "-" if math.isnan(dgb) else f"{100 * dgb / copy_gbps:.0f}%"
                    line += f" {_fmt_ms(dms)} | {_fmt_f(dgb, 0)} | {pct} | {_fmt_x(dms / floor_ms)} |"
                out.append(line)
        out.append("")
    e2e = _get(rows, op="e2e")
    if e2e:
        out += ["## End-to-end reward-model step (forward + backward + AdamW)", "",
                "| config | provider | ms/step | p20-p80 | vs hf | peak MiB |", "|---|---|---:|---|---:|---:|"]
        for shape in dict.fromkeys(r["shape"] for r in e2e):
            g = _get(e2e, shape=shape)
            hf = _val(g, provider="hf", metric="step_ms")
            for p in dict.fromkeys(r["provider"] for r in g):
                c = _get(g, provider=p, metric="step_ms")
                if not c:
                    continue
                c = c[0]
                out.append(f"| {shape} [{c['dims']}, {c['dtype']}] | {p} | {_fmt_ms(c['median'])} | "
                           f"{_fmt_ms(c['p20'])}-{_fmt_ms(c['p80'])} | {_fmt_x(hf / c['median'])} | "
                           f"{_val(g, provider=p, metric='peak_MiB'):.0f} |")
        out.append("")
    out += provenance(rows)
    bad = [r for r in rows if r["mode"] == "check" and r["median"] != 1.0]
    if bad:
        out += ["## Providers that failed the correctness check (not timed)", ""]
        out += [f"- {r['op']}/{r['shape']}/{r['provider']}: {r['note']}" for r in bad]
        out.append("")
    return "\n".join(out)


def provenance(rows):
    """A section listing each run whose rows the table holds (a CSV merges runs: a run replaces
    the groups it measured): its id, date, command, commit, threads and clock, and on the CPU the
    variant of the C++ loops and the huge-page mode (common.FIELDS). Rows written before
    those were recorded say so."""
    runs = {}
    for r in rows:
        runs.setdefault(r.get("run_id") or "-", r)
    if not runs:
        return []
    out = ["## Runs", "", "| run | date | command | commit | threads, clock | C++ CPU loops | huge pages |",
           "|---|---|---|---|---|---|---|"]
    for run_id, r in sorted(runs.items()):
        def cell(k, r=r):
            v = r.get(k)
            return f"`{v}`" if v and k == "command" else (v or "not recorded")
        cpu = r.get("device") == "cpu"
        out.append(f"| {run_id} | {r.get('date', '')} | {cell('command')} | {cell('commit')} | "
                   f"{r.get('threads', '')}, {r.get('clock', 'wall')} | {cell('cpu_isa') if cpu else '-'} | "
                   f"{cell('huge_pages') if cpu else '-'} |")
    return out + [""]


def targets(rows):
    """The BENCHMARKS.md targets that this run can judge, met or not."""
    out = []
    dev = rows[0]["device"] if rows else "cpu"
    gae_x = 1000 if dev == "cuda" else 100
    lines = []
    for r in _get(rows, op="gae", shape="gae-s", mode="forward", metric="call_ms"):
        if not r["provider"].startswith("rmk-"):
            continue
        hf = _val(rows, op="gae", shape="gae-s", mode="forward", metric="call_ms", provider="hf")
        x = hf / r["median"]
        lines.append(f"| gae-s full call >= {gae_x}x faster than the hf loop | {r['provider']} | {_fmt_x(x)} | "
                     f"{'met' if x >= gae_x else 'MISSED'} |")
    for (op, shape, mode) in dict.fromkeys((r["op"], r["shape"], r["mode"]) for r in rows
                                           if r["metric"] == "call_ms" and r["provider"].startswith("rmk-")):
        if shape.endswith("-t"):
            continue
        comp = _val(rows, op=op, shape=shape, mode=mode, metric="call_ms", provider="compile")
        if math.isnan(comp):
            continue
        for r in _get(rows, op=op, shape=shape, mode=mode, metric="call_ms"):
            if not r["provider"].startswith("rmk-") or _not_vs_baselines(r["provider"]):
                continue  # the op alone, or timed with the floors: no compile row of its own
            x = comp / r["median"]
            lines.append(f"| faster than compile: {op} {shape} {mode} | {r['provider']} | {_fmt_x(x)} | "
                         f"{'met' if x > 1 else 'MISSED'} |")
    lines += _pool_targets(rows, "device_ms" if dev == "cuda" else "call_ms")
    if dev == "cpu":
        lines += _grpo_targets(rows)
        lines += _lp_targets(rows)
    lines += _overhead_targets(rows, judged=dev == "cuda")
    if dev == "cuda":
        copy_gbps, launch_ms = floors(rows)
        for shape in ("gae-l", "gae-xl"):
            for r in _get(rows, op="gae", shape=shape, mode="forward", metric="device_ms"):
                if not r["provider"].startswith("rmk-") or not r["bytes"]:
                    continue
                x = r["median"] / (r["bytes"] / (copy_gbps * 1e6))
                lines.append(f"| {shape} device time <= 1.25x memory floor | {r['provider']} | {x:.2f}x | "
                             f"{'met' if x <= 1.25 else 'MISSED'} |")
        lines += _grpo_gpu_targets(rows, copy_gbps, launch_ms)
        # issue 14: within 1.25x of the memory floor (the -xl rows split on a GPU, reading the rewards
        # and the mask twice: about 1.4x by bytes)
        for op, shape in (("rpp", "rpp-l"), ("rpp", "rpp-xl"), ("remax", "remax-l"), ("remax", "remax-xl")):
            for r in _get(rows, op=op, shape=shape, mode="forward", metric="device_ms"):
                if not r["provider"].startswith("rmk-") or not r["bytes"] or math.isnan(copy_gbps):
                    continue
                x = r["median"] / max(r["bytes"] / (copy_gbps * 1e6), launch_ms)
                lines.append(f"| {shape} device time <= 1.25x memory floor | {r['provider']} | {x:.2f}x | "
                             f"{'met' if x <= 1.25 else 'MISSED'} |")
        for r in _get(rows, op="bt", shape="bt-l", mode="full", metric="device_ms"):
            if r["provider"].startswith("rmk-") and r["bytes"]:
                x = r["median"] / max(r["bytes"] / (copy_gbps * 1e6), 2 * launch_ms)
                lines.append(f"| bt-l fwd+bwd <= 1.5x memory floor | {r['provider']} | {x:.2f}x | "
                             f"{'met' if x <= 1.5 else 'MISSED'} |")
    if lines:
        out += ["## Targets (BENCHMARKS.md) judged by this run", "",
                "| target | provider | measured | |", "|---|---|---:|---|"] + lines + [""]
    return out


def _lp_targets(rows):
    """lp-s (CPU): the full call's peak memory above its inputs <= 160 MiB, and its time no more
    than the naive path's (full logits, log_softmax)."""
    lines = []
    naive = _val(rows, op="logprobs", shape="lp-s", mode="full", metric="call_ms", provider="naive")
    for r in _get(rows, op="logprobs", shape="lp-s", mode="full", metric="peak_MiB"):
        if r["provider"].startswith("rmk-"):
            lines.append(f"| lp-s full call peak memory above inputs <= 160 MiB | {r['provider']} | "
                         f"{r['median']:.1f} MiB | {'met' if r['median'] <= 160 else 'MISSED'} |")
    for r in _get(rows, op="logprobs", shape="lp-s", mode="full", metric="call_ms"):
        if r["provider"].startswith("rmk-") and not math.isnan(naive):
            x = r["median"] / naive
            lines.append(f"| lp-s full call time <= naive | {r['provider']} | {x:.2f}x naive | "
                         f"{'met' if x <= 1 else 'MISSED'} |")
    return lines


OVERHEAD_TARGET_US = 15.0  # BENCHMARKS.md: any op, full call, C++ backends, on a GPU machine
NO_DATA_CHECKS = "-nochecks"  # bench_overhead.py's provider suffix: a CPU call with the data checks off


def overhead_us(rows, shape, mode, be, data_checks=True):
    """(the call, its kernel ops, the overhead) in us of bench_overhead.py's function ``shape`` on
    backend ``be``: ``rmk-<be>`` (``rmk-<be>-nochecks`` with ``data_checks=False``) and
    ``kernels-<be>`` medians and their difference (NaN where a row is missing)."""
    rmk = f"rmk-{be}" + ("" if data_checks else NO_DATA_CHECKS)
    call, kern = (_val(rows, op="overhead", shape=shape, mode=mode, metric="call_ms", provider=p) * 1e3
                  for p in (rmk, f"kernels-{be}"))
    return call, kern, call - kern


def _overhead_targets(rows, judged):
    """bench_overhead.py's rows: a public function's host time per call above that of the kernel
    ops it reached (``rmk-<be>`` - ``kernels-<be>``, C++ backends), <= 15 us. The call (mode
    ``forward``) is judged on a GPU machine, the target's, and is information elsewhere;
    forward + backward (``full``: torch's autograd engine included) is information, and so is a
    CPU call with the data checks off (``-nochecks``: what a GPU call runs)."""
    lines = []
    for r in _get(rows, op="overhead", metric="call_ms"):
        be = r["provider"][len("rmk-"):] if r["provider"].startswith("rmk-") else None
        checks = not (be or "").endswith(NO_DATA_CHECKS)
        be = be if checks else be[:-len(NO_DATA_CHECKS)]
        if be not in ("cpu", "cuda"):
            continue
        _, kern, us = overhead_us(rows, r["shape"], r["mode"], be, checks)
        if math.isnan(kern):
            continue
        call = "the call" if r["mode"] == "forward" else "forward + backward (torch's autograd engine included)"
        call += "" if checks else " with the data checks off (as on a GPU)"
        what = (f"{r['shape']}, {call}: host time above its kernel ops' ({kern:.1f} us) "
                f"<= {OVERHEAD_TARGET_US:.0f} us")
        if judged and checks and r["mode"] == "forward":
            ok = "met" if us <= OVERHEAD_TARGET_US else "MISSED"
            lines.append(f"| {what} | {r['provider']} | {us:.1f} us | {ok} |")
        else:
            why = "the target is a GPU machine's" if r["mode"] == "forward" else "not the target's call"
            lines.append(f"| (information: {why}) {what} | {r['provider']} | {us:.1f} us | - |")
    return lines


def _fastest(floors):
    """(name, time) of the fastest of ``floors`` ({name: median}) that was measured, or (None, nan):
    a target "within x of writing ... once" is judged against the cheapest way of writing it
    that the run measured (a kernel that writes into huge pages is held to a floor in huge pages)."""
    measured = {k: v for k, v in floors.items() if not math.isnan(v)}
    if not measured:
        return None, math.nan
    name = min(measured, key=measured.get)
    return name, measured[name]


def _other_floors(floors, best, median, what, provider, where=""):
    """The "(information)" rows of a call's ratio to each measured floor but the judged one."""
    return [f"| (information) {what} / `{other}`{where} | {provider} | {median / v:.2f}x | - |"
            for other, v in floors.items() if other != best and not math.isnan(v)]


def _pool_targets(rows, metric):
    """pool-l: the forward >= 50x faster than hf; fwd+bwd within 1.2x of writing grad_hidden once,
    judged against the fastest floor the run measured (:data:`POOL_FLOORS`: on the CPU the huge-page
    one, as a rule); the other floor as information."""
    lines = []
    hf = _val(rows, op="pooling", shape="pool-l", mode="forward", metric=metric, provider="hf")
    for r in _get(rows, op="pooling", shape="pool-l", mode="forward", metric=metric):
        if r["provider"].startswith("rmk-") and not math.isnan(hf):
            x = hf / r["median"]
            lines.append(f"| pool-l forward >= 50x faster than hf | {r['provider']} | {_fmt_x(x)} | "
                         f"{'met' if x >= 50 else 'MISSED'} |")
    floors = {p: _val(rows, op="pooling", shape="pool-l", mode="full", metric=metric, provider=p) for p in POOL_FLOORS}
    best, floor = _fastest(floors)
    for r in _get(rows, op="pooling", shape="pool-l", mode="full", metric=metric):
        if r["provider"].startswith("rmk-") and best is not None:
            x = r["median"] / floor
            lines.append(f"| pool-l fwd+bwd within 1.2x of writing grad_hidden once (`{best}`, the fastest measured) "
                         f"| {r['provider']} | {x:.2f}x | {'met' if x <= 1.2 else 'MISSED'} |")
            lines += _other_floors(floors, best, r["median"], "pool-l fwd+bwd", r["provider"])
    return lines


# The floors of benchmarks/bench_group_adv.floor_rows: writing the float32 [B, T] output once,
# reading the full call's inputs once, and (CPU, information) writing the output once into the
# huge pages the C++ kernels advise their fresh outputs for (csrc/cpu/memory.cpp).
GRPO_FLOORS = ("write-once", "read-inputs", "write-once, huge pages")


def floor_provider(name, state):
    """The provider name of a row of bench_group_adv.floor_rows: ``write-once (fresh pages)``,
    ``rmk-cpu (vs floor, fresh pages)``; without a state (GPU) ``write-once``, ``rmk-cuda (vs
    floor)``. (``_timed_with_floors`` and ``_grpo_targets`` read these names back.)"""
    if name in GRPO_FLOORS:
        return f"{name} ({state})" if state else name
    return f"{name} (vs floor, {state})" if state else f"{name} (vs floor)"


def op_alone(provider):
    """A row of the op alone (``rmk-<backend>-op``, bench_group_adv: group ids and summed scores
    given), not the full call that hf / torch / compile make."""
    return provider.split(" (")[0].endswith("-op")


def _not_vs_baselines(provider):
    """No same-call baseline for this row: the op alone (the baselines' rows are full calls), or
    a row timed interleaved with the floors rather than with the baselines."""
    return op_alone(provider) or _timed_with_floors(provider)


def _timed_with_floors(provider):
    """A row of bench_group_adv.floor_rows (a floor, or an rmk call timed interleaved with the
    floors, not with hf / compile)."""
    return "(vs floor" in provider or provider.split(" (")[0] in GRPO_FLOORS


def _grpo_targets(rows):
    """grpo-l on the CPU (BENCHMARKS.md; one thread): the full call (uid mapping included)
    >= 30x verl's loop, >= 1.5x verl's vectorized GRPO, <= 1.3x writing [B, T] once (the
    ``(vs floor, <state>)`` rows, timed interleaved with the write floors of the same state of
    the output memory, judged against the fastest of them, :func:`_fastest`; the op alone is
    shown too), and, as information, the full call against its memory floor (that write +
    ``read-inputs`` of the same state; the op alone's rows, information: the target is the full
    call's). The same figures at grpo-l-bb (grpo-l's rows in verl's
    balance_batch order), as information: BENCHMARKS.md sets no target there. Rows measured
    with more than one thread are information only (the target is for one thread)."""
    lines = []
    for shape in ("grpo-l", "grpo-l-bb"):
        one_thread = all(str(r.get("threads")) == "1" for r in _get(rows, op="grpo", shape=shape))
        lines += _grpo_shape_targets(rows, shape, judged=shape == "grpo-l" and one_thread)
    return lines


def _grpo_shape_targets(rows, shape, judged):
    q = dict(op="grpo", shape=shape, mode="forward", metric="call_ms")
    loop, vec = (_val(rows, provider=p, **q) for p in ("hf", "verl-vec"))
    info = "" if judged else "(information) "

    def status(ok):
        return ("met" if ok else "MISSED") if judged else "-"

    lines = []
    for r in _get(rows, **q):
        p = r["provider"]
        if p.startswith("rmk-") and not _not_vs_baselines(p):
            for name, base, want in (("verl's loop", loop, 30), ("verl's vectorized GRPO", vec, 1.5)):
                if not math.isnan(base):
                    x = base / r["median"]
                    lines.append(f"| {info}{shape} full call >= {want}x {name} | {p} | {_fmt_x(x)} | "
                                 f"{status(x >= want)} |")
        if "(vs floor" not in p:
            continue
        state = p.split("(vs floor", 1)[1].strip(", )")
        of = f" ({state})" if state else ""
        write_once, read_inputs, write_huge = GRPO_FLOORS
        writes = {f: _val(rows, provider=f + of, **q) for f in (write_once, write_huge)}
        best, write = _fastest(writes)
        read = _val(rows, provider=read_inputs + of, **q)
        alone = op_alone(p)
        what = "the op alone (ids, summed scores given)" if alone else "full call"
        where = f", {state}" if state else ""
        if best is not None:  # the target is the full call's; the op alone is information
            x = r["median"] / write
            head = "(information) " if alone else info
            # the full call's own memory floor against the same write: where the target lies below
            # it, reading the inputs alone puts the target out of reach
            reach = "" if alone or math.isnan(read) else \
                f"; the call's memory floor, inputs read once + that write: {(write + read) / write:.2f}x"
            lines.append(f"| {head}{shape} {what} <= 1.3x writing [B, T] once (`{best}`, the fastest measured{reach})"
                         f"{where} | {p} | {x:.2f}x | {'-' if alone else status(x <= 1.3)} |")
            lines += _other_floors(writes, best, r["median"], f"{shape} {what}", p, where)
        if not alone and best is not None and not math.isnan(read):
            x = r["median"] / (write + read)
            lines.append(f"| (information) {shape} full call / its memory floor (token rewards and mask read once, "
                         f"[B, T] written once){where} | {p} | {x:.2f}x | - |")
    return lines


def grpo_op_bytes(dims):
    """What the group-advantages op alone must move, from a row's ``dims`` ("B=..,T=..,G=.."):
    the bool mask, float32 scores and int64 ids read once, the float32 [B, T] advantages and [B]
    per-sequence values written once (the token rewards' sum and the uid mapping are the full
    call's, outside the op)."""
    d = dict(kv.split("=") for kv in dims.split(","))
    B, T = int(d["B"]), int(d["T"])
    return B * T + B * (4 + 8) + B * T * 4 + B * 4


def _grpo_gpu_targets(rows, copy_gbps, launch_ms):
    """The critic-free estimators on a GPU (issue 14): the op alone (``rmk-<backend>-op``: ids
    and summed scores given) within 1.25x of its memory floor, max(bytes / copy bandwidth,
    one empty launch). That it is one launch is tests/test_group_advantages.py's
    test_cuda_kernel_is_one_launch_at_scale."""
    lines = []
    for shape in ("grpo-l", "grpo-xl", "grpo-l-bb", "grpo-xl-bb", "grpo-l-t1"):
        judged = shape in ("grpo-l", "grpo-xl")  # issue 14's shapes; the balance_batch order and T = 1: information
        for r in _get(rows, op="grpo", shape=shape, mode="forward", metric="device_ms"):
            if not op_alone(r["provider"]) or math.isnan(copy_gbps):
                continue
            x = r["median"] / max(grpo_op_bytes(r["dims"]) / (copy_gbps * 1e6), launch_ms)
            status = ("met" if x <= 1.25 else "MISSED") if judged else "-"
            lines.append(f"| {'' if judged else '(information) '}{shape} op alone device time <= 1.25x memory floor "
                         f"| {r['provider']} | {x:.2f}x | {status} |")
    return lines


def plots(rows, outdir, slug):
    """One PNG per op: time per call by shape and provider (log scale), a panel per mode.
    Returns the written paths (none if matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    ops = [o for o in OP_ORDER if _get(rows, op=o)]
    ops += sorted({r["op"] for r in rows} - set(ops))  # an op of its own run (the token log-probs)
    for op in ops:
        if op == "floor":
            continue
        metric = "step_ms" if op == "e2e" else "call_ms"
        data = [r for r in rows if r["op"] == op and r["metric"] == metric]
        if not data:
            continue
        modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in data)]
        wide = len({r["shape"] for r in data}) > 6
        fig, axes = plt.subplots(1, len(modes), figsize=((7.5 if wide else 4.5) * len(modes), 4.8 if wide else 3.8),
                                 squeeze=False)
        for ax, mode in zip(axes[0], modes):
            d = [r for r in data if r["mode"] == mode]
            shp = list(dict.fromkeys(r["shape"] for r in sorted(d, key=_key)))
            provs = [p for p in PROVIDER_ORDER if any(r["provider"] == p for r in d)]
            provs += sorted({r["provider"] for r in d} - set(provs))
            w = 0.8 / max(len(provs), 1)
            for i, p in enumerate(provs):
                xs, ys, lo, hi = [], [], [], []
                for j, s in enumerate(shp):
                    m = [r for r in d if r["shape"] == s and r["provider"] == p]
                    if m:
                        xs.append(j + i * w - 0.4 + w / 2)
                        ys.append(m[0]["median"])
                        lo.append(m[0]["median"] - m[0]["p20"])
                        hi.append(m[0]["p80"] - m[0]["median"])
                ax.bar(xs, ys, w, yerr=[lo, hi], label=p, capsize=2)
            ax.set_xticks(range(len(shp)))
            many = len(shp) > 6  # bench_overhead's functions: long names, slanted
            ax.set_xticklabels(shp, rotation=40 if many else 0, ha="right" if many else "center",
                               fontsize=7 if many else None)
            ax.set_yscale("log")
            ax.set_title(f"{op} - {mode}")
            ax.set_ylabel("ms per step" if op == "e2e" else "ms per call (median, p20-p80)")
            ax.grid(axis="y", alpha=0.3)
        axes[0][-1].legend(fontsize=8)
        dev = data[0]["device_name"]
        fig.suptitle(f"{op} on {dev}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(outdir, f"{slug}-{op}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def summary(rows):
    """The compact table for the README: per named shape and mode, the median ms/call of
    each provider and the speedups of the rmkernels backends vs hf and vs compile."""
    rows = [r for r in sorted(rows, key=_key) if r["metric"] == "call_ms" and not r["shape"].endswith("-t")]
    if not rows:
        return ""
    provs = [p for p in PROVIDER_ORDER if any(r["provider"] == p for r in rows)]
    ours = [p for p in provs if p.startswith("rmk-")]
    head = "| op | shape (as run) | mode | " + " | ".join(f"{p} ms" for p in provs)
    head += "".join(f" | {p} vs hf | {p} vs compile" for p in ours) + " |"
    out = [head, "|" + "---|" * (3 + len(provs) + 2 * len(ours))]
    for g in dict.fromkeys((r["op"], r["shape"], r["mode"]) for r in rows):
        gr = [r for r in rows if (r["op"], r["shape"], r["mode"]) == g]
        c = gr[0]
        ms = {p: _val(gr, provider=p) for p in provs}
        line = f"| {g[0]} | {g[1]} [{c['dims']}, {c['dtype']}] | {g[2]} | " + " | ".join(_fmt_ms(ms[p]) for p in provs)
        for p in ours:
            line += f" | {_fmt_x(ms.get('hf', math.nan) / ms[p])} | {_fmt_x(ms.get('compile', math.nan) / ms[p])}"
        out.append(line + " |")
    r0 = rows[0]
    out.append("")
    out.append(f"Measured on {r0['device_name']}, {r0['threads']} thread(s) (clock: {r0.get('clock', 'wall')}), "
               f"torch {r0['torch']}, "
               f"rmkernels {r0['rmkernels']}, {r0['date']}. Median of interleaved samples; "
               "ratios are same-run ratios.")
    return "\n".join(out)


def regenerate(md_path, csv_path):
    """The text of a committed result table ``md_path`` drawn again from its CSV: the same title
    (its first line) and the same closing "Written by" paragraph (the command, date, machine and
    method of the run that wrote both files), the table and the targets from :func:`markdown`
    of the CSV's rows as the report judges them now. ``scripts/readme_figures.py`` keeps every
    committed table in step with its CSV this way."""
    with open(md_path) as f:
        old = f.read()
    title = old.split("\n", 1)[0][2:] if old.startswith("# ") else None
    cut = old.find("\n\nWritten by ")
    footer = old[cut:] if cut >= 0 else "\n"
    return markdown(read_csv(csv_path), title=title) + footer
