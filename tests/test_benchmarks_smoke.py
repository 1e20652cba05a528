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
    monkeypatch.syspath_prepend(ROOT)
    import importlib
    for m in ("run", "bench_pooling", "bench_bt_loss", "bench_gae", "bench_group_adv", "bench_e2e_reward", "report",
              "test_bench", "bench_rm_pack"):
        importlib.import_module(f"benchmarks.{m}")


def test_runner_quick_tiny(tmp_path):
    ops = ["bt", "gae", "grpo"]
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
