"""Live tensor memory on the CPU (rmkernels_train.memory; ``rmkernels-train reward
--profile-memory``): known tensors move the reported figures by exactly their size, frees on
other threads are counted, and the trainer's figures match the state it holds."""
import json
import subprocess
import sys
import threading

import pytest
import torch

pytest.importorskip("transformers")

from utils import subprocess_env  # noqa: E402

from rmkernels_train import memory as MEM  # noqa: E402
from rmkernels_train import reward as R  # noqa: E402

MIB = 2**20


def test_cpu_peak_bytes_is_a_known_allocation():
    n = 3 * MIB + 4096  # bytes; not a round number of MiB

    def fn():
        a = torch.empty(n // 4)
        b = torch.empty(n // 8)  # live together with a
        del b
        return a

    assert MEM.cpu_peak_bytes(fn) == n + n // 2


def test_live_profile_absolute_base_steps_and_frees_on_other_threads():
    prof = MEM.LiveTensorProfile().enable()
    box = [torch.empty(2 * MIB)]  # 8 MiB live before the profiler starts: part of the absolute figures
    prof.begin()
    with prof.step(1):
        y = torch.empty(MIB)  # 4 MiB, freed inside the step
        del y
    with prof.step(2):
        t = threading.Thread(target=box.clear)  # the 8 MiB freed on another thread
        t.start()
        t.join()
    with prof.step(3):
        w = torch.empty(MIB // 4)  # 1 MiB
        del w
    out = prof.stop()
    assert prof.stop() is out and not prof.active
    assert out["steps"] == 3
    start, peak = out["at_step_start_MiB"], out["step_peak_MiB"]
    assert start[0] >= 8  # the tensor allocated before begin() is counted
    assert peak[0] - start[0] == pytest.approx(4, abs=0.01)
    assert start[0] - start[2] == pytest.approx(8, abs=0.01)  # the other thread's free is seen
    assert peak[2] - start[2] == pytest.approx(1, abs=0.01)
    assert out["peak_MiB"] == max(peak)


def test_figures_from_events():
    # (time_ns, nbytes, total_allocated): 10 live before; step 1 [100, 200]; step 2 [300, 400]
    events = [(50, 2, 10), (120, 5, 15), (150, -5, 10), (250, 3, 13), (310, 4, 17), (320, -4, 13)]
    out = MEM.LiveTensorProfile.figures([(e[0], e[1] * MIB, e[2] * MIB) for e in events], [(100, 200), (300, 400)])
    assert out["at_step_start_MiB"] == [10, 13] and out["step_peak_MiB"] == [15, 17]
    assert out["peak_MiB"] == 17 and out["events"] == 4 and out["steps"] == 2


def _args(out, *extra):
    return [str(a) for a in ["--hidden-size", "32", "--layers", "2", "--default-train-pairs", "64",
                             "--batch-size", "4", "--threads", "1", "--no-progress", "--no-plot",
                             "--output-dir", out, "--eval-every", "1000", *extra]]


def _memory(out):
    """The first rank's memory figures of a finished run in ``out``."""
    return json.loads((out / "final.json").read_text())["memory_per_rank"][0]


def _train(tmp_path, capsys, *extra):
    out = tmp_path / "out"
    rc = R.main(_args(out, *extra))
    err = capsys.readouterr().err
    assert rc == 0, err
    return _memory(out)


def test_trainer_reports_live_tensor_peak_moving_by_a_known_tensor(tmp_path):
    """Step 3 holds an extra 64 MiB tensor for its whole length: its peak is step 2's plus 64
    MiB (the tiny model's activations differ by well under 1 MiB between batches); the live
    bytes at the first step are the parameters and buffers, at the second also AdamW's state."""
    extra_mib = 64
    # In a process of its own: the allocator's accounting, once on, counts every later allocation
    # of the process, so a tensor an earlier test of a pytest worker left alive (a library's cache
    # filled after another test turned the accounting on) would count as live here (seen in CI:
    # 0.13 MiB at the first step against 0.08 of parameters and buffers).
    code = ("import sys, torch\n"
            "from rmkernels_train import reward as R\n"
            "train_step = R.RewardTrainer.train_step\n"
            "def with_extra(self, group):\n"
            f"    held = torch.empty({extra_mib * MIB // 4}) if self.step == 2 else None\n"
            "    rec = train_step(self, group)\n"
            "    del held\n"
            "    return rec\n"
            "R.RewardTrainer.train_step = with_extra\n"
            "sys.exit(R.main(sys.argv[1:]))\n")
    out = tmp_path / "out"
    env = subprocess_env()
    proc = subprocess.run([sys.executable, "-c", code, *_args(out, "--max-steps", 4, "--profile-memory", 3)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mem = _memory(out)
    live = mem["live_tensors"]
    assert live["steps"] == 3 and mem["peak_live_tensors_MiB"] == live["peak_MiB"]
    start, peak = live["at_step_start_MiB"], live["step_peak_MiB"]
    held = live["held_at_first_step_MiB"]
    assert held["grads"] == 0 and held["optimizer_state"] == 0 and held["ddp_buckets"] == 0
    assert start[0] == pytest.approx(held["params"] + held["buffers"], abs=0.02)
    assert start[1] == pytest.approx(mem["params_MiB"] + mem["optimizer_state_MiB"] + held["buffers"], abs=0.02)
    assert start[2] == pytest.approx(start[1], abs=0.02)  # nothing leaks between steps
    assert peak[2] - peak[1] == pytest.approx(extra_mib, abs=1.0)
    assert live["peak_MiB"] == pytest.approx(peak[2], abs=0.01)


def test_profile_memory_off_costs_nothing_and_is_checked(tmp_path, capsys):
    mem = _train(tmp_path, capsys, "--max-steps", 1)
    assert "live_tensors" not in mem and "peak_live_tensors_MiB" not in mem
    rc = R.main(["--profile-memory", "0", "--output-dir", str(tmp_path / "bad"), "--no-progress"])
    assert rc != 0 and "--profile-memory must be >= 1, got 0" in capsys.readouterr().err
