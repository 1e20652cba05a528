"""The benchmark suite imports and its runner works end to end (tiny shapes, no
torch.compile, a few samples; well under 30 s). Asserts on the output's form, never on a
timing."""
import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_modules_import(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    import importlib
    for m in ("run", "bench_pooling", "bench_bt_loss", "bench_gae", "bench_e2e_reward", "report", "test_bench"):
        importlib.import_module(f"benchmarks.{m}")


def test_runner_quick_tiny(tmp_path):
    ops = ["bt", "gae"]
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
        assert (op, "hf", "forward") in timed and (op, "torch", "forward") in timed
    for r in rows:
        assert r["device"] and r["torch"] and r["rmkernels"] and r["date"] and r["dims"]
