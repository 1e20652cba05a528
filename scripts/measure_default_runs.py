"""Run the README's default commands and record what they print and cost, in the committed
result file that the README's figures are generated from (scripts/readme_figures.py).

    python scripts/measure_default_runs.py --seeds 0 1 2            # -> docs/results/default-runs.json
    python scripts/measure_default_runs.py --seeds 0 --out /tmp/x.json
    python scripts/measure_default_runs.py --seeds 0 1 2 --nproc 1 2   # -> docs/results/default-runs-ddp.json

Each seed runs ``rmkernels-train ppo --seed S`` from scratch in its own output directory
(``runs/measure/seed-S``, removed first): the default reward model, the warm start and the RL
run, as a newcomer runs it. Recorded per run: the wall time start to end, the CPU time of the
process and its children (user + system: what the run costs without the other processes' load
on a shared machine), the machine's load average before and after, and the figures the run
printed (reward-model accuracy, task success before/after, the reward-model score). With
``--build`` it first times ``pip wheel --no-build-isolation --no-deps .`` (the extension
build of the README's first command) on a copy of the tracked files in a scratch directory; with ``--ci`` it times the
README's second command, ``bash .ci/run`` (the whole test suite: long; run it on a quiet
machine).

With ``--nproc 1 2`` each seed runs once per number of processes, one run after the other:
``torchrun --nproc_per_node N -m rmkernels_train ppo --seed S --batch-size 16/N --threads
cores/N`` (N > 1; the same 16 prompts a step, split over the processes) and the one-process run
with ``--threads cores``, into ``docs/results/default-runs-ddp.json`` (docs/rl.md's data-parallel
figures): does the data-parallel run learn as the one-process run does, and in what time.
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "docs", "results", "default-runs.json")
DEFAULT_DDP_OUT = os.path.join(ROOT, "docs", "results", "default-runs-ddp.json")


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


def timed(cmd, cwd=ROOT, env=None, log_path=None):
    """(return code, wall s, CPU s, output tail) of a subprocess. The CPU time (user + system)
    is that of the process and of the processes it waited for (``os.wait4``), so runs timed at
    the same time do not mix. ``log_path``: the whole output is also kept there (to follow a
    long run)."""
    import tempfile

    with (open(log_path, "w+") if log_path else tempfile.TemporaryFile("w+")) as log:
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.time() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read()[-4000:]
    return proc.returncode, wall, usage.ru_utime + usage.ru_stime, tail


def fresh_tree(dest):
    """A copy of the files git tracks (what a clone has: no build/ objects, no built extension),
    so that the build is timed from scratch; pip builds a local directory in place and would
    reuse the checkout's build/ objects."""
    shutil.rmtree(dest, ignore_errors=True)
    files = subprocess.run(["git", "-C", ROOT, "ls-files", "-z"], capture_output=True, text=True, check=True)
    for rel in filter(None, files.stdout.split("\0")):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))
    return dest


def measure_build(scratch):
    out = os.path.join(scratch, "wheel")
    shutil.rmtree(out, ignore_errors=True)
    src = fresh_tree(os.path.join(scratch, "src"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", out, src]
    env = {**os.environ, "RMKERNELS_SKIP_CUDA_BUILD": "1"}
    rc, wall, cpu, tail = timed(cmd, env=env)
    if rc != 0:
        raise SystemExit(f"the build failed:\n{tail}")
    shutil.rmtree(src, ignore_errors=True)
    return {"command": "pip install --no-build-isolation .", "measured_as": "pip wheel --no-build-isolation "
            "--no-deps . in a copy of the tracked files (the same build from scratch, without installing)",
            "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def measure_ci(log_path=None):
    rc, wall, cpu, tail = timed(["bash", os.path.join(ROOT, ".ci", "run")], log_path=log_path)
    if rc != 0:
        raise SystemExit(f"bash .ci/run failed (exit {rc}):\n{tail}")
    return {"command": "bash .ci/run", "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def nproc_options(nproc):
    """(launcher, options) of a run on ``nproc`` processes: the critic-free default batch split
    over them, the cores shared out (None: the plain default run)."""
    if nproc is None:
        return [], []
    sys.path.insert(0, os.path.join(ROOT, "python"))
    from rmkernels_train.rl import CRITIC_FREE_DEFAULTS

    batch = CRITIC_FREE_DEFAULTS["batch_size"]
    if batch % nproc:
        raise SystemExit(f"--nproc {nproc} must divide the default batch of {batch} prompts")
    opts = ["--batch-size", str(batch // nproc), "--threads", str(max(1, (os.cpu_count() or 1) // nproc))]
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    return launch, opts


def measure_seed(seed, scratch, extra=(), nproc=None):
    out = os.path.join(scratch, f"seed-{seed}" + (f"-nproc-{nproc}" if nproc else ""))
    shutil.rmtree(out, ignore_errors=True)
    launch, opts = nproc_options(nproc)
    cmd = [sys.executable, *launch, "-m", "rmkernels_train", "ppo", "--seed", str(seed), "--output-dir", out,
           "--no-progress", *opts, *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "python"), ROOT,
                                                        os.environ.get("PYTHONPATH", "")])}
    load0 = load()
    rc, wall, cpu, tail = timed(cmd, env=env)
    if rc != 0:
        raise SystemExit(f"seed {seed}: rmkernels-train ppo failed (exit {rc}):\n{tail}")
    with open(os.path.join(out, "final.json")) as f:
        fin = json.load(f)
    rm_dir = os.path.dirname(fin["reward_model"])  # <rm output dir>/checkpoint-<step>
    with open(os.path.join(rm_dir, "final.json")) as f:
        rm = json.load(f)
    with open(os.path.join(rm_dir, "metrics.jsonl")) as f:
        rm_evals = {r["step"]: r["accuracy"] for r in map(json.loads, f) if r.get("split") == "eval"}
    b, a = fin["before"], fin["after"]
    return {"seed": seed, **({"nproc": nproc, "options": opts} if nproc else {}), "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1), "load_before": load0, "load_after": load(),
            "time_s": fin["time_s"], "steps": fin["steps"],
            "task_success_before": b["task_success"], "task_success_after": a["task_success"],
            "task_success_sampled_before": b["task_success_sampled"],
            "task_success_sampled_after": a["task_success_sampled"],
            "score_before": round(b["score"], 3), "score_after": round(a["score"], 3),
            "kl_after": round(a["kl"], 3), "verdict": fin["verdict"],
            "reward_model": {"accuracy": rm["eval"]["accuracy"], "train_time_s": rm["train_time_s"],
                             "accuracy_by_step": {str(k): v for k, v in sorted(rm_evals.items())}}}


def _header(argv, extra):
    """What a result file says of how, when and where it was measured."""
    import torch

    return {"generated_by": "python scripts/measure_default_runs.py " + shlex.join(argv or sys.argv[1:]),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(), "torch": torch.__version__, "python": platform.python_version(),
            "command": " ".join(["rmkernels-train ppo --seed S", *extra]),
            "clock": "wall time start to end (time.time) and the "
            "CPU time (user + system) of the process and of the processes it waited for (os.wait4)"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                    help="seeds of the default run (none: keep the runs already in --out)")
    ap.add_argument("--build", action="store_true", help="also time the extension build")
    ap.add_argument("--ci", action="store_true", help="also time `bash .ci/run` (the whole test suite)")
    ap.add_argument("--ci-log", default=None, metavar="FILE", help="with --ci: keep its output in FILE")
    ap.add_argument("--ci-where", default="run in place", metavar="TEXT",
                    help="with --ci: where it ran, as the README says it (e.g. 'a fresh clone')")
    ap.add_argument("--nproc", type=int, nargs="+", default=None, metavar="N",
                    help="run each seed on each of these numbers of processes (torchrun), one run after the other, "
                         f"into {os.path.relpath(DEFAULT_DDP_OUT, ROOT)} unless --out")
    ap.add_argument("--out", default=None, help=f"default {os.path.relpath(DEFAULT_OUT, ROOT)}")
    ap.add_argument("--scratch", default=os.path.join(ROOT, "runs", "measure"))
    ap.add_argument("--parallel", action="store_true",
                    help="run the seeds at the same time, one process each (on a machine with a core per seed)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="more options of rmkernels-train ppo (recorded in the command; for trying the script)")
    a = ap.parse_args(argv)
    if a.nproc:
        if a.build or a.ci or a.parallel or not a.seeds:
            ap.error("--nproc measures only the seeds' runs, one after the other (no --build, --ci, --parallel)")
        return measure_nproc(a, argv)
    a.out = a.out or DEFAULT_OUT
    result = _header(argv, a.extra)
    command = result["generated_by"]
    old = {}
    if os.path.isfile(a.out):  # parts this invocation does not measure are kept
        with open(a.out) as f:
            old = json.load(f)
    if a.build:
        load0 = load()
        result["build"] = {**measure_build(a.scratch), "generated_by": command, "date": result["date"],
                           "load_before": load0, "load_after": load()}
        print(f"build: {result['build']['wall_s']} s wall", file=sys.stderr, flush=True)
    if a.ci:
        result["ci"] = {**measure_ci(a.ci_log), "where": a.ci_where, "generated_by": command, "date": result["date"]}
        print(f"bash .ci/run: {result['ci']['wall_s']} s wall", file=sys.stderr, flush=True)
    for key in ("build", "ci"):
        if key not in result and key in old:
            result[key] = old[key]
    if not a.seeds:
        for key in ("runs", "generated_by", "date", "command"):
            result[key] = old[key]
    if not a.seeds:
        runs = result["runs"]
    elif a.parallel:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(a.seeds)) as ex:
            runs = list(ex.map(lambda s: measure_seed(s, a.scratch, a.extra), a.seeds))
    else:
        runs = [measure_seed(s, a.scratch, a.extra) for s in a.seeds]
    for r in runs if a.seeds else []:
        print(f"seed {r['seed']}: task success {r['task_success_before']:.3f} -> {r['task_success_after']:.3f}, "
              f"{r['wall_s']} s wall, {r['cpu_s']} s CPU, load {r['load_before']}", file=sys.stderr, flush=True)
    result["runs"] = runs
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {a.out}; now run: python scripts/readme_figures.py", file=sys.stderr)
    return 0


def measure_nproc(a, argv):
    out = a.out or DEFAULT_DDP_OUT
    runs = []
    for seed in a.seeds:
        for n in a.nproc:
            r = measure_seed(seed, a.scratch, a.extra, nproc=n)
            runs.append(r)
            print(f"seed {seed}, {n} process(es): task success {r['task_success_before']:.3f} -> "
                  f"{r['task_success_after']:.3f}, RL {r['time_s']['rl']} s, {r['wall_s']} s wall", file=sys.stderr,
                  flush=True)
    result = {**_header(argv, a.extra), "runs": runs}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {out}; now run: python scripts/readme_figures.py", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
