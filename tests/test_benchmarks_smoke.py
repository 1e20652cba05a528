"""The benchmark suite imports and its runner works end to end (tiny shapes, no
torch.compile, a few samples; well under 30 s). Asserts on the output's form, never on a
timing."""
import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_modules_import(monkeypatch):
    """Every module of benchmarks/ imports (the list is read from the directory: a new bench
    file is covered without editing this test)."""
    import glob
    import importlib

    monkeypatch.syspath_prepend(ROOT)
    names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "benchmarks", "*.py")))
    assert {"run", "report", "bench_group_adv", "bench_token_logprobs"} <= set(names), names
    for m in names:
        importlib.import_module(f"benchmarks.{m}")


def test_runner_quick_tiny(tmp_path):
    ops = ["bt", "gae", "grpo", "rpp", "remax"]
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--tiny", "--quick", "--ops", *ops,
           "--providers", "hf", "torch", "rmk-cpu", "--threads", "1", "--out", str(tmp_path), "--no-merge"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    csvs = list(tmp_path.glob("*.csv"))
    assert len(csvs) == 1 and csvs[0].with_suffix(".md").exists()
    with open(csvs[0]) as f:
        rows = list(csv.DictReader(f))
    assert {r["op"] for r in rows} == set(ops)
    checks = [r for r in rows if r["metric"] == "correct"]
    assert checks and all(r["median"] == "1" for r in checks), [r["note"] for r in checks]
    timed = {(r["op"], r["provider"], r["mode"]) for r in rows if r["metric"] == "call_ms"}
    for op in ops:
        assert (op, "hf", "forward") in timed and (op, "rmk-cpu", "forward") in timed
        if op != "remax":  # ReMax's verl formula is plain torch already: no separate torch row
            assert (op, "torch", "forward") in timed
    for r in rows:
        assert r["device"] and r["torch"] and r["rmkernels"] and r["date"] and r["dims"]
        # what produced the row: the command, the checkout's commit, the C++ loops' variant and huge pages
        assert r["command"] == "python benchmarks/run.py " + " ".join(cmd[2:]), r["command"]
        assert r["cpu_isa"] and r["huge_pages"], r
        assert bool(r["commit"]) == os.path.exists(os.path.join(ROOT, ".git")), r  # none outside a checkout
    assert all(int(r["samples"]) >= 3 for r in rows if r["metric"] == "call_ms"), "the sample count of each time"
    md = csvs[0].with_suffix(".md").read_text()
    assert "## Runs" in md and " (n=" in md and f"`{rows[0]['command']}` | {rows[0]['commit']} |" in md
    for state in ("recycled", "fresh pages"):  # bench_group_adv.floor_rows, both states of the output memory
        for prov in (f"write-once ({state})", f"read-inputs ({state})", f"rmk-cpu (vs floor, {state})"):
            assert ("grpo", prov, "forward") in timed


def test_output_memory_states():
    """``timing.output_memory``: a 48 MiB output (over glibc's 32 MiB mmap ceiling) reuses
    touched pages in ``recycled`` (almost no page faults from the second call on) and is
    faulted in on every call in ``fresh pages``. In a subprocess: the states
    change the process's malloc settings."""
    code = (
        "import resource, torch\n"
        "from benchmarks import timing\n"
        "n = 48 * 2**20 // 4\n"
        "out = {}\n"
        "for state in timing.OUTPUT_MEMORY:\n"
        "    with timing.output_memory(state) as om:\n"
        "        assert om.ok, state\n"
        "        f = om.calls({'f': lambda: torch.empty(n).fill_(1.0)})['f']\n"
        "        setup, fn = f if isinstance(f, tuple) else (None, lambda _: f())\n"
        "        got = []\n"
        "        for _ in range(3):\n"
        "            arg = setup() if setup else None\n"
        "            f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt\n"
        "            fn(arg)\n"
        "            got.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0)\n"
        "        out[state] = got\n"
        "print(out['recycled'][-1], out['fresh pages'][-1], n * 4 // resource.getpagesize())\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    recycled, fresh, pages = (int(x) for x in res.stdout.split())
    assert recycled < pages // 100, (recycled, pages)
    assert fresh > pages // 4, (fresh, pages)  # one fault maps one page or a few, by the kernel's settings


def test_grpo_targets_per_state(monkeypatch):
    """report._grpo_targets judges each rmk row timed with the floors against the floors of its
    own state: the full call against the fastest write of [B, T] measured in that state (the
    huge-page one where it is faster, the other as information) and against that write +
    read-inputs; at one thread only (more: information)."""
    monkeypatch.syspath_prepend(ROOT)
    from benchmarks import report

    def row(provider, ms):
        return dict(op="grpo", shape="grpo-l", mode="forward", metric="call_ms", provider=provider, median=ms,
                    threads="1")
    rows = [row("hf", 1000.0), row("verl-vec", 60.0), row("rmk-cpu", 20.0), row("rmk-cpu-op", 10.0),
            row("write-once (recycled)", 2.0), row("read-inputs (recycled)", 2.0),
            row("write-once, huge pages (recycled)", 4.0),
            row("rmk-cpu (vs floor, recycled)", 5.0), row("rmk-cpu-op (vs floor, recycled)", 2.5),
            row("write-once (fresh pages)", 16.0), row("read-inputs (fresh pages)", 2.0),
            row("write-once, huge pages (fresh pages)", 8.0), row("rmk-cpu (vs floor, fresh pages)", 20.0)]
    lines = report._grpo_targets(rows)
    assert lines[:2] == ["| grpo-l full call >= 30x verl's loop | rmk-cpu | 50.0x | met |",
                         "| grpo-l full call >= 1.5x verl's vectorized GRPO | rmk-cpu | 3.00x | met |"]
    assert not [ln for ln in lines if "| rmk-cpu-op |" in ln]  # the op alone is not the call verl makes
    # the target's row gives the call's memory floor against the same write: (write + read) / write
    assert ("| grpo-l full call <= 1.3x writing [B, T] once (`write-once`, the fastest measured; the call's "
            "memory floor, inputs read once + that write: 2.00x), recycled | rmk-cpu (vs floor, recycled) "
            "| 2.50x | MISSED |") in lines
    assert ("| (information) grpo-l full call / `write-once, huge pages`, recycled | rmk-cpu (vs floor, recycled) "
            "| 1.25x | - |") in lines
    assert ("| grpo-l full call <= 1.3x writing [B, T] once (`write-once, huge pages`, the fastest measured; "
            "the call's memory floor, inputs read once + that write: 1.25x), fresh pages "
            "| rmk-cpu (vs floor, fresh pages) | 2.50x | MISSED |") in lines
    assert ("| (information) grpo-l full call / `write-once`, fresh pages | rmk-cpu (vs floor, fresh pages) "
            "| 1.25x | - |") in lines
    assert ("| (information) grpo-l the op alone (ids, summed scores given) <= 1.3x writing [B, T] once "
            "(`write-once`, the fastest measured), recycled | rmk-cpu-op (vs floor, recycled) | 1.25x | - |") in lines
    floor = [ln for ln in lines if "its memory floor" in ln]
    assert floor == ["| (information) grpo-l full call / its memory floor (token rewards and mask read once, [B, T] "
                     "written once), recycled | rmk-cpu (vs floor, recycled) | 1.25x | - |",
                     "| (information) grpo-l full call / its memory floor (token rewards and mask read once, [B, T] "
                     "written once), fresh pages | rmk-cpu (vs floor, fresh pages) | 2.00x | - |"]
    # grpo-l-bb (balance_batch order): the same figures, as information only (no target there)
    bb = [dict(r, shape="grpo-l-bb") for r in rows]
    bb_lines = report._grpo_targets(rows + bb)
    assert bb_lines[:len(lines)] == lines
    extra = bb_lines[len(lines):]
    assert len(extra) == len(lines) and all(ln.startswith("| (information) grpo-l-bb ") for ln in extra), extra
    assert "| (information) grpo-l-bb full call >= 30x verl's loop | rmk-cpu | 50.0x | - |" in extra
    assert all(not ln.endswith(("| met |", "| MISSED |")) for ln in extra)
    # two threads: the one-thread target is not judged
    two = report._grpo_targets([dict(r, threads="2") for r in rows])
    assert len(two) == len(lines) and all(not ln.endswith(("| met |", "| MISSED |")) for ln in two), two


def test_pool_targets_on_cpu_and_gpu(monkeypatch):
    """report._pool_targets: pool-l forward against hf, fwd+bwd against the fastest write of
    grad_hidden the run measured (on the CPU the huge-page floor; the other as information), in
    the run's own metric (call time on the CPU, device time on a GPU)."""
    monkeypatch.syspath_prepend(ROOT)
    from benchmarks import report

    def row(provider, mode, ms, metric="call_ms"):
        return dict(op="pooling", shape="pool-l", mode=mode, metric=metric, provider=provider, median=ms)
    rows = [row("hf", "forward", 16.0), row("rmk-cpu", "forward", 0.1), row("rmk-cpu", "full", 40.0),
            row("floor-write-grad", "full", 120.0), row("floor-write-grad, huge pages", "full", 32.0),
            row("hf", "forward", 1.0, "device_ms"), row("rmk-cuda", "forward", 0.05, "device_ms"),
            row("rmk-cuda", "full", 1.3, "device_ms"), row("floor-write-grad", "full", 1.0, "device_ms")]
    assert report._pool_targets(rows, "call_ms") == [
        "| pool-l forward >= 50x faster than hf | rmk-cpu | 160x | met |",
        "| pool-l fwd+bwd within 1.2x of writing grad_hidden once (`floor-write-grad, huge pages`, the fastest "
        "measured) | rmk-cpu | 1.25x | MISSED |",
        "| (information) pool-l fwd+bwd / `floor-write-grad` | rmk-cpu | 0.33x | - |"]
    assert report._pool_targets(rows, "device_ms") == [
        "| pool-l forward >= 50x faster than hf | rmk-cuda | 20.0x | MISSED |",
        "| pool-l fwd+bwd within 1.2x of writing grad_hidden once (`floor-write-grad`, the fastest measured) "
        "| rmk-cuda | 1.30x | MISSED |"]


def test_op_alone_rows_are_not_compared_with_full_calls(monkeypatch):
    """``rmk-<backend>-op`` (the op alone, ids and summed scores given) has no hf / compile row
    of its own: no "faster than compile" target and no speedup in the table; its bytes are the
    op's (``report.grpo_op_bytes``), not the full call's. ``report.summary`` of rows without
    hf or compile (the token log-probs run) works."""
    monkeypatch.syspath_prepend(ROOT)
    from benchmarks import report

    dims = "B=64,T=8,G=8"

    def row(provider, ms, metric="call_ms", nbytes=0):
        return dict(op="grpo", shape="grpo-l", dims=dims, dtype="fp32", mode="forward", metric=metric,
                    provider=provider, median=ms, p20=ms, p80=ms, bytes=nbytes, device="cpu", device_name="x",
                    threads="1", clock="wall", torch="t", rmkernels="r", date="d")
    rows = [row("compile", 4.0), row("hf", 8.0), row("rmk-cpu", 2.0), row("rmk-cpu-op", 1.0)]
    lines = report.targets(rows)
    assert [ln for ln in lines if "faster than compile" in ln] == [
        "| faster than compile: grpo grpo-l forward | rmk-cpu | 2.00x | met |"]
    table = report.markdown(rows)
    assert "| rmk-cpu | 2.00 | 2.00-2.00 | 4.00x | 2.00x |" in table
    assert "| rmk-cpu-op | 1.00 | 1.00-1.00 | - | - |" in table
    assert report.grpo_op_bytes(dims) == 64 * 8 + 64 * 12 + 64 * 8 * 4 + 64 * 4
    lp = [dict(r, op="logprobs", shape="lp-s", provider=p) for r, p in zip(rows, ("naive", "chunked", "rmk-cpu"))]
    assert "| logprobs | lp-s [B=64,T=8,G=8, fp32] | forward |" in report.summary(lp)


def test_lp_targets_peak_memory_and_time_against_naive(monkeypatch):
    """report._lp_targets (CPU): lp-s's full call, peak memory above the inputs <= 160 MiB and
    time <= the naive path's; other shapes and modes are not judged."""
    monkeypatch.syspath_prepend(ROOT)
    from benchmarks import report

    def row(provider, metric, value, mode="full", shape="lp-s"):
        return dict(op="logprobs", shape=shape, mode=mode, metric=metric, provider=provider, median=value)
    rows = [row("naive", "call_ms", 3000.0), row("naive", "peak_MiB", 1250.0), row("rmk-cpu", "call_ms", 3300.0),
            row("rmk-cpu", "peak_MiB", 82.5), row("rmk-cpu", "call_ms", 1.0, mode="forward"),
            row("rmk-cpu", "peak_MiB", 500.0, shape="lp-t")]
    assert report._lp_targets(rows) == [
        "| lp-s full call peak memory above inputs <= 160 MiB | rmk-cpu | 82.5 MiB | met |",
        "| lp-s full call time <= naive | rmk-cpu | 1.10x naive | MISSED |"]


def test_grpo_gpu_target_is_the_op_alone_against_its_memory_floor(monkeypatch):
    """report._grpo_gpu_targets: the device time of the op alone (``rmk-*-op``) over max(its
    bytes / the run's copy bandwidth, one empty launch); full-call rows are not judged there."""
    monkeypatch.syspath_prepend(ROOT)
    from benchmarks import report

    B, T = 65536, 128
    nbytes = B * T + 12 * B + 4 * B * T + 4 * B
    assert report.grpo_op_bytes(f"B={B},T={T},G=8") == nbytes

    def row(provider, ms, shape="grpo-l", dims=f"B={B},T={T},G=8"):
        return dict(op="grpo", shape=shape, dims=dims, mode="forward", metric="device_ms", provider=provider,
                    median=ms)
    floor_ms = nbytes / (4000.0 * 1e6)  # at 4000 GB/s
    rows = [row("rmk-cuda-op", 1.2 * floor_ms), row("rmk-triton-op", 1.3 * floor_ms), row("rmk-cuda", 1.0),
            row("rmk-cuda-op", 0.004, shape="grpo-xl", dims="B=64,T=1,G=8"),  # tiny: the launch floor rules
            row("rmk-cuda-op", 0.004, shape="grpo-xl-bb", dims="B=64,T=1,G=8,perm=1"),  # information only
            row("rmk-triton-op", 0.006, shape="grpo-l-t1", dims="B=64,T=1,G=8")]  # information only
    lines = report._grpo_gpu_targets(rows, 4000.0, 0.002)
    assert lines == ["| grpo-l op alone device time <= 1.25x memory floor | rmk-cuda-op | 1.20x | met |",
                     "| grpo-l op alone device time <= 1.25x memory floor | rmk-triton-op | 1.30x | MISSED |",
                     "| grpo-xl op alone device time <= 1.25x memory floor | rmk-cuda-op | 2.00x | MISSED |",
                     "| (information) grpo-xl-bb op alone device time <= 1.25x memory floor | rmk-cuda-op "
                     "| 2.00x | - |",
                     "| (information) grpo-l-t1 op alone device time <= 1.25x memory floor | rmk-triton-op "
                     "| 3.00x | - |"]


@pytest.mark.slow
def test_runner_rm_pack_tiny(tmp_path):
    """``--ops rm-pack`` (opt-in) runs bench_rm_pack's tiny configs through the runner: the
    result JSON has both sides of each ratio, and its summary the tables."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--tiny", "--quick", "--ops", "rm-pack",
           "--threads", "1", "--out", str(tmp_path)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (js,) = tmp_path.glob("rm-pack-*.json")
    doc = json.loads(js.read_text())
    assert doc["command"].startswith("python benchmarks/run.py") and doc["date"] and doc["machine"]
    got = {(r["shape"], r["provider"], r["metric"]) for r in doc["rows"]}
    for prov in ("padded", "packed"):
        assert ("pack-t", prov, "tokens_per_s") in got
    for prov in ("ddp", "fsdp"):
        for metric in ("model_state_MiB", "train_rss_above_start_MiB", "peak_rss_MiB", "first_forward_MiB",
                       "peak_live_tensors_MiB", "live_at_first_step_MiB", "held_at_first_step_MiB"):
            assert ("fsdp-t", prov, metric) in got
    for metric in ("model_state_ratio", "peak_live_tensors_ratio"):
        assert ("fsdp-t", "fsdp/ddp", metric) in got
    md = js.with_suffix(".md").read_text()
    assert "| tokens/s (`pack-t`) |" in md and "| model state: parameters + gradients + AdamW state (`fsdp-t`) |" in md
    assert "| peak live tensor memory per rank, the device-memory measure" in md and "(judged on this row)" in md


def test_a_provider_that_fails_its_check_is_never_timed(monkeypatch):
    """A wrong provider is reported by its check row and timed nowhere: not in the grpo floors'
    interleaved rows (``floor_rows``, which the grpo-l floor target judges), not in the
    end-to-end step."""
    monkeypatch.syspath_prepend(ROOT)
    import torch

    from benchmarks import bench_e2e_reward, bench_group_adv, report

    providers = bench_group_adv.providers

    def wrong_grpo(device, B):
        p, ref = providers(device, B)
        good = p["rmk-cpu"]
        p["rmk-cpu"] = lambda r, m, i: good(r, m, i) * 0.0 + 1.0
        return p, ref
    monkeypatch.setattr(bench_group_adv, "providers", wrong_grpo)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = bench_group_adv.run("grpo", tiny=True, quick=True, only=["hf", "rmk-cpu", "rmk-cpu-op"],
                                   log=lambda *a: None)
        checks = {r["provider"]: r["median"] for r in rows if r["mode"] == "check"}
        assert checks == {"hf": 1.0, "rmk-cpu": 0.0, "rmk-cpu-op": 1.0}, checks
        timed = {r["provider"] for r in rows if r["metric"] == "call_ms"}
        assert "rmk-cpu-op (vs floor, recycled)" in timed and "hf" in timed  # the others still are
        assert not [p for p in timed if p.split(" (")[0] == "rmk-cpu"], sorted(timed)
        assert not [ln for ln in report.targets([dict(r, shape="grpo-l") for r in rows]) if "| rmk-cpu " in ln]

        rmk_loss_fn = bench_e2e_reward.rmk_loss_fn

        def wrong_loss():
            f, how = rmk_loss_fn()
            return (lambda m, i, k: 2.0 * f(m, i, k)), how
        monkeypatch.setattr(bench_e2e_reward, "rmk_loss_fn", wrong_loss)
        rows = bench_e2e_reward.run(tiny=True, quick=True, log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    assert {r["provider"]: r["median"] for r in rows if r["mode"] == "check"} == {"hf": 1.0, "rmk": 0.0}
    assert {r["provider"] for r in rows if r["metric"] == "step_ms"} == {"hf"}
    assert "Providers that failed the correctness check" in report.markdown(rows)


def test_pooling_floors_are_timed_beside_the_providers(monkeypatch):
    """bench_pooling's floors (writing grad_hidden once, in 4 KiB and in huge pages) are timed in
    the same interleaved samples as the providers of the backward and full modes (the pool-l
    target is their ratio), not in a run of their own."""
    monkeypatch.syspath_prepend(ROOT)
    from benchmarks import bench_pooling, timing

    groups = []

    def fake(fns, counts=None, **kw):
        groups.append(sorted(fns))
        if counts is not None:
            counts.update({k: 3 for k in fns})
        return {k: (1.0, 1.0, 1.0) for k in fns}
    monkeypatch.setattr(timing, "measure_interleaved", fake)
    rows = bench_pooling.run(tiny=True, quick=True, only=["torch", "rmk-cpu", bench_pooling.FLOOR,
                                                          bench_pooling.FLOOR_HUGE], log=lambda *a: None)
    floors = sorted({bench_pooling.FLOOR, bench_pooling.FLOOR_HUGE})
    assert groups and all(g == ["rmk-cpu", "torch"] or g == sorted(["rmk-cpu", "torch", *floors]) for g in groups)
    assert sum(g == sorted(["rmk-cpu", "torch", *floors]) for g in groups) == 2 * len({r["shape"] for r in rows})
    floor_rows = [r for r in rows if r["provider"] in floors]
    assert {(r["provider"], r["mode"], r["metric"]) for r in floor_rows} == {
        (f, m, "call_ms") for f in floors for m in ("backward", "full")}
    assert all(r["bytes"] > 0 and r["note"] for r in floor_rows)


def test_overhead_bench_reaches_the_kernels_of_every_function(monkeypatch):
    """bench_overhead: each public function's call reaches at least one kernel op (recorded
    through ``_registry.Kernel``), forward and, where the op has a gradient, backward; the
    replay of those calls gives the kernels' outputs again; the runner's rows have both
    providers and the report's overhead lines. Nothing asserts on a timing."""
    monkeypatch.syspath_prepend(ROOT)
    import torch

    from benchmarks import bench_overhead, report

    cases = bench_overhead._cases("cpu")
    assert len(cases) == 13
    for name, (_, make) in cases.items():
        call, grad_inputs = make()
        _, _, k_fwd = bench_overhead._calls(call, grad_inputs, "forward")
        assert k_fwd >= 1, name
        if grad_inputs:
            _, _, k_full = bench_overhead._calls(call, grad_inputs, "full")
            assert k_full > k_fwd, name  # the backward's kernel ops too
    # the replay runs the recorded kernel calls: their outputs equal the call's
    call, grad_inputs = cases["gae"][1]()
    recorded = []
    with bench_overhead._recording(recorded) as run:
        want = call()
    with torch.no_grad():
        got = [run(k, be, *args) for k, be, args in recorded]
    assert torch.equal(got[-1][0], want[0]) and torch.equal(got[-1][1], want[1])
    rows = bench_overhead.run(shapes=["bradley_terry_loss", "gae"], quick=True, log=lambda msg: None)
    got = {(r["shape"], r["mode"], r["provider"]) for r in rows}
    assert got == {(s, m, p) for s, m in (("bradley_terry_loss", "forward"), ("bradley_terry_loss", "full"),
                                            ("gae", "forward")) for p in ("rmk-cpu", "kernels-cpu", "rmk-cpu-nochecks")}
    lines = report._overhead_targets(rows, judged=False)
    assert len(lines) == 6 and all(line.startswith("| (information: ") for line in lines)
    assert sum("with the data checks off (as on a GPU)" in line and "| rmk-cpu-nochecks |" in line
               for line in lines) == 3


def test_overhead_bench_no_data_checks_provider_runs_without_them(monkeypatch):
    """bench_overhead's ``-nochecks`` provider: the call with the data checks off (what a GPU
    call runs). Inside it a call with an all-zero mask row gives NaN, as on a GPU; outside, the
    CPU's data check raises."""
    monkeypatch.syspath_prepend(ROOT)
    import torch

    import rmkernels as rmk
    from benchmarks import bench_overhead

    h, w = torch.randn(2, 3, 4), torch.randn(1, 4)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="no valid token"):
        rmk.last_token_reward(h, w, attention_mask=mask)
    out = bench_overhead._without_data_checks(lambda: rmk.last_token_reward(h, w, attention_mask=mask))()
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()
    with pytest.raises(ValueError, match="no valid token"):  # and on again after it
        rmk.last_token_reward(h, w, attention_mask=mask)


def test_overhead_targets_judge_the_call_on_a_gpu(monkeypatch):
    """report._overhead_targets: rmk - kernels per (function, mode), <= 15 us; judged for the
    call on a GPU machine, information for forward + backward and on the CPU; a function
    without its kernels row is not judged."""
    monkeypatch.syspath_prepend(ROOT)
    from benchmarks import report

    def row(shape, mode, provider, ms):
        return dict(op="overhead", shape=shape, mode=mode, metric="call_ms", provider=provider, median=ms)
    rows = [row("gae", "forward", "rmk-cuda", 0.020), row("gae", "forward", "kernels-cuda", 0.008),
            row("bt", "forward", "rmk-cuda", 0.030), row("bt", "forward", "kernels-cuda", 0.010),
            row("bt", "full", "rmk-cuda", 0.100), row("bt", "full", "kernels-cuda", 0.020),
            row("ranking", "forward", "rmk-cuda", 0.020), row("gae", "forward", "rmk-triton", 0.050),
            row("gae", "forward", "kernels-triton", 0.010)]
    lines = report._overhead_targets(rows, judged=True)
    assert [line.rsplit("|", 3)[-3:] for line in lines] == [
        [" 12.0 us ", " met ", ""], [" 20.0 us ", " MISSED ", ""], [" 80.0 us ", " - ", ""]]
    # a CPU call with the data checks off is information, judged or not
    cpu = [row("gae", "forward", "rmk-cpu-nochecks", 0.010), row("gae", "forward", "kernels-cpu", 0.008)]
    (line,) = report._overhead_targets(cpu, judged=True)
    assert line.startswith("| (information: the target is a GPU machine's) gae, the call with the data checks off")
    assert line.endswith("| rmk-cpu-nochecks | 2.0 us | - |")
    assert "gae, the call" in lines[0] and "(8.0 us)" in lines[0] and "(information: not the target's call)" in lines[2]
    assert all(line.endswith("| - |") for line in report._overhead_targets(rows, judged=False))
