"""Run the README's default commands and record what they print and cost, in the committed
result file that the README's figures are generated from (scripts/readme_figures.py).

    python scripts/measure_default_runs.py --seeds 0 1 2            # -> docs/results/default-runs.json
    python scripts/measure_default_runs.py --seeds 0 --out /tmp/x.json

Each seed runs ``rmkernels-train ppo --seed S`` from scratch in its own output directory
(``runs/measure/seed-S``, removed first): the default reward model, the warm start and the RL
run, as a newcomer runs it. Recorded per run: the wall time start to end, the CPU time of the
process and its children (user + system: what the run costs without the other processes' load
on a shared machine), the machine's load average before and after, and the figures the run
printed (reward-model accuracy, task success before/after, the reward-model score). With
``--build`` it first times ``pip wheel --no-build-isolation --no-deps .`` (the extension
build of the README's first command) in a scratch directory.
"""
import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "docs", "results", "default-runs.json")


def machine():
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPU cores"


def load():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def timed(cmd, cwd=ROOT, env=None):
    """(return code, wall s, children CPU s, stderr+stdout tail) of a subprocess."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return res.returncode, wall, cpu, (res.stdout + res.stderr)[-4000:]


def measure_build(scratch):
    out = os.path.join(scratch, "wheel")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", out, ROOT]
    env = {**os.environ, "RMKERNELS_SKIP_CUDA_BUILD": "1"}
    rc, wall, cpu, tail = timed(cmd, env=env)
    if rc != 0:
        raise SystemExit(f"the build failed:\n{tail}")
    return {"command": "pip install --no-build-isolation .", "measured_as": "pip wheel --no-build-isolation "
            "--no-deps . (the same build, without installing)", "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def measure_seed(seed, scratch):
    out = os.path.join(scratch, f"seed-{seed}")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "rmkernels_train", "ppo", "--seed", str(seed), "--output-dir", out, "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "python"), ROOT,
                                                        os.environ.get("PYTHONPATH", "")])}
    load0 = load()
    rc, wall, cpu, tail = timed(cmd, env=env)
    if rc != 0:
        raise SystemExit(f"seed {seed}: rmkernels-train ppo failed (exit {rc}):\n{tail}")
    with open(os.path.join(out, "final.json")) as f:
        fin = json.load(f)
    with open(os.path.join(out, "reward_model", "final.json")) as f:
        rm = json.load(f)
    with open(os.path.join(out, "reward_model", "metrics.jsonl")) as f:
        rm_evals = {r["step"]: r["accuracy"] for r in map(json.loads, f) if r.get("split") == "eval"}
    b, a = fin["before"], fin["after"]
    return {"seed": seed, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load_before": load0, "load_after": load(),
            "time_s": fin["time_s"], "steps": fin["steps"],
            "task_success_before": b["task_success"], "task_success_after": a["task_success"],
            "task_success_sampled_before": b["task_success_sampled"],
            "task_success_sampled_after": a["task_success_sampled"],
            "score_before": round(b["score"], 3), "score_after": round(a["score"], 3),
            "kl_after": round(a["kl"], 3), "verdict": fin["verdict"],
            "reward_model": {"accuracy": rm["eval"]["accuracy"], "train_time_s": rm["train_time_s"],
                             "accuracy_by_step": {str(k): v for k, v in sorted(rm_evals.items())}}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--build", action="store_true", help="also time the extension build")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--scratch", default=os.path.join(ROOT, "runs", "measure"))
    a = ap.parse_args(argv)
    import torch

    result = {"generated_by": "python scripts/measure_default_runs.py " + " ".join(argv or sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine(), "torch": torch.__version__, "python": platform.python_version(),
              "command": "rmkernels-train ppo --seed S", "clock": "wall time start to end (time.time) and the "
              "CPU time (user + system) of the process and its children (getrusage)"}
    if a.build:
        result["build"] = measure_build(a.scratch)
        print(f"build: {result['build']['wall_s']} s wall", file=sys.stderr, flush=True)
    runs = []
    for s in a.seeds:
        r = measure_seed(s, a.scratch)
        print(f"seed {s}: task success {r['task_success_before']:.3f} -> {r['task_success_after']:.3f}, "
              f"{r['wall_s']} s wall, {r['cpu_s']} s CPU, load {r['load_before']}", file=sys.stderr, flush=True)
        runs.append(r)
    result["runs"] = runs
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {a.out}; now run: python scripts/readme_figures.py", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
