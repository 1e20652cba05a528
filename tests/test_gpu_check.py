"""scripts/gpu_check.sh (the one GPU check, issue 13) runs to completion on a CPU-only
machine, says that its GPU stages were skipped, and writes its summary to OUT_DIR (packed into
ARCHIVE when one is given)."""
import os
import re
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_cpu_mode(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "gpu_check"
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(out), "packed/gc.tgz"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with tarfile.open(tmp_path / "packed" / "gc.tgz") as tar:  # ARCHIVE, relative to where it was called
        names = tar.getnames()
    assert {"gpu_check/summary.md", "gpu_check/env.txt", "gpu_check/ops-list.txt"} <= set(names), names
    summary = (out / "summary.md").read_text()
    for stage in ("build", "extension", "gpu cuda issue 14", "gpu cuda", "gpu triton issue 14", "gpu triton",
                  "memcheck", "racecheck", "graphs", "bench grpo", "profile grpo", "overhead", "bench", "suite"):
        assert f"| {stage} | skipped: no CUDA GPU" in summary, summary
    assert "| ops-list (cpu) | ok |" in summary, summary
    ops = (out / "ops-list.txt").read_text()
    for op in ("last_token_reward", "bradley_terry_loss", "pairwise_reward_loss", "ranking_loss", "ppo_advantages",
               "masked_whiten"):
        assert op in ops, ops
    env_txt = (out / "env.txt").read_text()
    assert "cuda available: False" in env_txt
    # the compilers and torch's libstdc++, for a build refused for a static libstdc++ (setup.py)
    assert re.search(r"^g\+\+: \S+ \(.*\); libstdc\+\+\.so: ", env_txt, re.M), env_txt
    loaded = r"^torch's libstdc\+\+: /\S+libstdc\+\+\.so\.6\S*, newest GLIBCXX_3\.4\.\d+$"
    assert re.search(loaded, env_txt, re.M), env_txt


def test_gpu_check_bench_runs_are_valid():
    """Each benchmarks/run.py call of the bench stages (BENCH_GRPO and BENCH_RUNS in the script)
    parses, names shapes of its own op and providers that exist: a typo there would only show
    on a lent GPU, and cost its minutes. (tests/test_bench_fake_cuda.py runs the runner itself
    on a stand-in GPU.)"""
    from benchmarks import run, shapes
    from rmkernels._backend import BACKENDS

    text = open(os.path.join(ROOT, "scripts", "gpu_check.sh")).read()
    block = re.search(r"BENCH_RUNS=\((.*?)\n\)", text, re.S)
    assert block, "BENCH_RUNS not found in scripts/gpu_check.sh"
    items = re.findall(r'"([^"|]+)\|([^"]*)"', block.group(1))
    assert len(items) >= 5, items
    names = [name for name, _ in items]  # each run's own output directory, OUT/bench-<name>
    assert len(set(names)) == len(names) and "grpo" not in names, names
    grpo = re.search(r'^BENCH_GRPO="([^"]*)"', text, re.M)
    assert grpo, "BENCH_GRPO not found in scripts/gpu_check.sh"
    items.append(("bench grpo", grpo.group(1)))
    rmk = {f"rmk-{b}" for b in BACKENDS}
    known = {"hf", "torch", "compile", "verl-vec"} | rmk | {f"{p}-op" for p in rmk}
    for name, args in items:
        a = run.build_parser().parse_args(args.split() + ["--device", "cuda", "--quick"])
        assert a.ops, name
        for shape in a.shapes or []:
            assert shapes.get(shape, "cuda").op in a.ops, f"{name}: shape {shape} is not an op of {a.ops}"
        assert set(a.providers or []) <= known, f"{name}: unknown providers {set(a.providers) - known}"


def test_gpu_check_overhead_stage_is_valid():
    """The overhead stage's bench_overhead.py command runs: the same arguments with the CPU's
    providers for the cuda ones (one function), so a typo shows here, not on a lent GPU."""
    text = open(os.path.join(ROOT, "scripts", "gpu_check.sh")).read()
    m = re.search(r"benchmarks/bench_overhead\.py ((?:\\\n|[^\n])*)", text)
    assert m, "the overhead stage is not in scripts/gpu_check.sh"
    args = m.group(1).replace("\\\n", " ").split()
    assert args[:2] == ["--device", "cuda"] and "--providers" in args, args
    providers = args[args.index("--providers") + 1:]
    assert providers == ["rmk-cuda", "kernels-cuda"], providers
    cpu_args = ["--device", "cpu"] + args[2:args.index("--providers")] + ["--providers", "rmk-cpu", "kernels-cpu",
                                                                        "--shapes", "gae"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_overhead.py"), *cpu_args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| overhead | gae [" in proc.stdout and "kernels-cpu" in proc.stdout, proc.stdout


def test_gpu_check_caps_fit_one_device_command():
    """The stage caps add up to less than the 600 s the device tool gives one command (the
    sanitizer's cap counts twice: memcheck and racecheck), so that a run which reaches every cap
    still writes its summary."""
    text = open(os.path.join(ROOT, "scripts", "gpu_check.sh")).read()
    caps = {k: int(v) for k, v in re.findall(r"^(CAP_\w+)=\$\{CAP_\w+:-(\d+)\}", text, re.M)}
    assert {"CAP_BUILD", "CAP_GPU_CUDA", "CAP_SANITIZER", "CAP_SUITE"} <= set(caps), caps
    assert sum(caps.values()) + caps["CAP_SANITIZER"] <= 580, caps


def test_gpu_check_test_files_are_those_with_gpu_tests():
    """The GPU test stages run GPU_TEST_FILES, not tests/: the list must name every file that
    holds a test pytest marks for the GPU (-m "cuda and not cuda_on_cpu"), or its tests would
    never run on a lent GPU, and only such files."""
    text = open(os.path.join(ROOT, "scripts", "gpu_check.sh")).read()
    block = re.search(r"^GPU_TEST_FILES=\((.*?)\)", text, re.S | re.M)
    assert block, "GPU_TEST_FILES not found in scripts/gpu_check.sh"
    listed = set(block.group(1).split())
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-m", "cuda and not cuda_on_cpu"], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line}
    assert collected, proc.stdout[-3000:]
    assert listed == collected, f"missing: {sorted(collected - listed)}; not GPU tests: {sorted(listed - collected)}"


def test_gpu_check_extension_stage_on_cpu():
    """gpu_check_ops.py extension (the gpu_check stage that runs before the GPU tests): here, its
    CPU half (the extension loaded, no libstdc++ of its own, huge_pages(), a check message with
    its numbers); on a GPU machine it also needs the CUDA kernels and checks the CUDA binding's
    message."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check_ops.py"), "extension"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for line in ("ok   libstdc++ of its own: none", "ok   huge_pages() = (",
                 "ok   cpu check message: rewards must be [B, T] = [3, 8], got [3, 9]"):
        assert line in proc.stdout, proc.stdout


def test_gpu_check_static_libstdcxx_hint_matches_setup_message():
    """gpu_check.sh tells a build refused for its own libstdc++ from any other failed build by a
    phrase of setup.py's refusal message (``OwnLibstdcxx``): the phrase it greps build.log for must
    be in that message, or a rewording there would silence the hint."""
    script = open(os.path.join(ROOT, "scripts", "gpu_check.sh")).read()
    (phrase,) = re.findall(r'grep -q "([^"]+)" "\$OUT/build\.log"', script)
    setup = open(os.path.join(ROOT, "setup.py")).read()
    m = re.search(r"raise OwnLibstdcxx\((.*?)\)\n", setup, re.S)
    assert m, "setup.py no longer raises OwnLibstdcxx"
    message = "".join(re.findall(r'f?"([^"]*)"', m.group(1)))
    assert phrase in message, (phrase, message)
