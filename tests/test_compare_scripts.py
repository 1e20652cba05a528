"""scripts/compare_frameworks.py, compare_dropins.py, compare_trl_ppo.py, compare_patch_verl.py and
compare_patch_openrlhf.py (the drop-ins against the real verl / OpenRLHF / TRL functions) run in
a scratch environment, not here: CI checks that they load and answer --help without the
frameworks, that those that need verl or OpenRLHF stop with the install line where it is
missing, and that each committed result file's header names a commit of this repository."""
import os
import re
import subprocess
import sys

import pytest
from utils import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("compare_frameworks.py", "compare_dropins.py", "compare_patch_verl.py")
NEEDS_OPENRLHF = ("compare_patch_openrlhf.py",)
RESULTS = {"framework-comparison.txt": "compare_frameworks.py", "dropin-comparison.txt": "compare_dropins.py",
           "trl-ppo-comparison.txt": "compare_trl_ppo.py", "patch-verl-comparison.txt": "compare_patch_verl.py",
           "patch-openrlhf-comparison.txt": "compare_patch_openrlhf.py"}


def _run(*args, without=()):
    """``python *args``; ``without``: modules made unimportable first (a framework installed
    here is hidden, so that the path taken without it runs wherever the test does)."""
    env = subprocess_env()
    if without:
        code = (f"import runpy, sys\nfor m in {list(without)!r}:\n    sys.modules[m] = None\n"
                f"sys.argv = {list(args)!r}\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")
        args = ("-c", code)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


@pytest.mark.parametrize("script", SCRIPTS + NEEDS_OPENRLHF + ("compare_trl_ppo.py",))
def test_help_without_the_frameworks(script):
    proc = _run(os.path.join("scripts", script), "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout and "--" in proc.stdout


def test_compare_dropins_options():
    out = _run(os.path.join("scripts", "compare_dropins.py"), "--help").stdout
    for option in ("--cases", "--trl-ppo-file", "--quick"):
        assert option in out, option


@pytest.mark.parametrize("script", SCRIPTS)
def test_stops_with_the_install_line_without_verl(script):
    proc = _run(os.path.join("scripts", script), "--cases" if script == "compare_dropins.py" else "--batches", "1",
                without=("verl",))
    assert proc.returncode != 0
    assert "verl is not installed: pip install --no-deps verl==0.9.1" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("script", NEEDS_OPENRLHF)
def test_stops_with_the_install_line_without_openrlhf(script):
    proc = _run(os.path.join("scripts", script), "--batches", "1", without=("openrlhf",))
    assert proc.returncode != 0
    assert "openrlhf is not installed: pip install --no-deps" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def _git(*args):
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("name", RESULTS)
def test_result_header_names_a_commit(name):
    with open(os.path.join(ROOT, "benchmarks", "results", name)) as f:
        first, second = f.readline(), f.readline()
    assert first.startswith(f"# python scripts/{RESULTS[name]}"), first
    m = re.search(r"\b(?:commit|rmkernels at) ([0-9a-f]{7,40})\b", second)
    assert m, f"no 'commit <sha>' in the header of {name}: {second!r}"
    try:
        inside = _git("rev-parse", "--is-inside-work-tree")
    except FileNotFoundError:
        pytest.skip("git is not installed")
    if inside.returncode != 0 or inside.stdout.strip() != "true":
        pytest.skip("not a git checkout")
    if _git("rev-parse", "--is-shallow-repository").stdout.strip() == "true":
        pytest.skip("a shallow clone: older commits are not here")
    assert _git("cat-file", "-e", f"{m.group(1)}^{{commit}}").returncode == 0, \
        f"{name}'s header names commit {m.group(1)}, which is not in this repository"
