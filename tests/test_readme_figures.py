"""The README's measured figures are generated from committed result files and cannot go
stale: scripts/readme_figures.py --check fails when a generated block and its result file
disagree. benchmarks/run.py: a partial run never writes the committed results."""
import importlib.util
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, rel):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def figures():
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    return _load("readme_figures", os.path.join("scripts", "readme_figures.py"))


def test_readme_and_docs_match_the_result_files(figures, capsys):
    rc = figures.main(["--check"])
    out = capsys.readouterr()
    assert rc == 0, f"generated figures are stale (run python scripts/readme_figures.py):\n{out.out[-3000:]}"


def test_every_block_in_the_readme_has_a_generator(figures):
    names = set()
    for rel in figures.FILES:
        with open(os.path.join(ROOT, rel)) as f:
            names |= {m.group("name") for m in figures.BLOCK_RE.finditer(f.read())}
    assert {"benchmarks", "benchmark-targets", "default-runs", "default-runs-ddp", "reward-accuracy",
            "readme-cost"} <= names
    assert names <= set(figures.GENERATORS), names - set(figures.GENERATORS)


def test_check_fails_when_a_figure_is_edited_by_hand(figures, tmp_path, capsys):
    """A copy of the repository's README and result files: editing a number inside a block,
    or changing the result file, makes --check fail; regenerating fixes it."""
    for rel in (*figures.FILES, figures.RUNS_JSON, figures.DDP_JSON, figures.BENCH_CSV, figures.BENCH_MD,
                figures.LOGPROBS_CSV, figures.LOGPROBS_CSV[:-4] + ".md", figures.OVERHEAD_CSV,
                figures.OVERHEAD_CSV[:-4] + ".md", figures.RM_PACK_JSON):
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(ROOT, rel), tmp_path / rel)
    shutil.copytree(os.path.join(ROOT, "benchmarks"), tmp_path / "benchmarks", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("results", "__pycache__"))
    root = str(tmp_path)
    assert figures.main(["--check", "--root", root]) == 0
    readme = tmp_path / "README.md"
    text = readme.read_text()
    start = text.index("<!-- default-runs:start -->")
    i = start + text[start:].index(" -> ")  # the first "before -> after" of the table
    readme.write_text(text[:i - 1] + ("9" if text[i - 1] != "9" else "8") + text[i:])
    assert figures.main(["--check", "--root", root]) == 1
    assert "stale figures in README.md" in capsys.readouterr().err
    assert figures.main(["--root", root]) == 0
    assert figures.main(["--check", "--root", root]) == 0
    # the result file changes: the README no longer agrees
    runs = tmp_path / figures.RUNS_JSON
    runs.write_text(runs.read_text().replace('"date": "', '"date": "X', 1))
    assert figures.main(["--check", "--root", root]) == 1


# ---------------------------------------------------------------------------------------
# benchmarks/run.py: where a run writes
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench_run():
    # this repository's benchmarks package: an earlier test in this process (--check on a copy of
    # the repository) may have imported the copy's, which stays in sys.modules
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        if not (getattr(sys.modules[name], "__file__", None) or "").startswith(os.path.join(ROOT, "benchmarks")):
            del sys.modules[name]
    sys.path.insert(0, ROOT)
    try:
        from benchmarks import run
    finally:
        sys.path.remove(ROOT)
    assert run.__file__.startswith(os.path.join(ROOT, "benchmarks")), run.__file__
    return run


def _args(bench_run, **kw):
    import argparse

    a = argparse.Namespace(ops=list(bench_run.ALL_OPS), shapes=None, providers=None, quick=False, tiny=False,
                           out=None, no_merge=False)
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def test_only_a_full_run_writes_the_committed_results(bench_run, tmp_path):
    out, committed = bench_run.resolve_out(_args(bench_run))
    assert committed and out == bench_run.COMMITTED_DIR
    for kw in ({"quick": True}, {"tiny": True}, {"ops": ["gae"]}, {"shapes": ["gae-s"]}, {"providers": ["hf"]}):
        out, committed = bench_run.resolve_out(_args(bench_run, **kw))
        assert not committed and out == bench_run.SCRATCH_DIR, kw
        for target in (bench_run.COMMITTED_DIR, os.path.join(bench_run.COMMITTED_DIR, "2threads")):
            with pytest.raises(SystemExit, match="never writes the committed results"):
                bench_run.resolve_out(_args(bench_run, out=target, **kw))
        out, committed = bench_run.resolve_out(_args(bench_run, out=str(tmp_path), **kw))
        assert out == str(tmp_path) and not committed
    assert bench_run.SCRATCH_DIR.startswith(os.path.join(ROOT, "runs"))  # runs/ is ignored by git


def test_rm_pack_is_opt_in_and_writes_the_committed_results_only_when_complete(bench_run, tmp_path):
    """bench_rm_pack (minutes of training runs) is never part of the default ops; its own
    complete run writes benchmarks/results/rm-pack-*, a partial one the scratch directory."""
    assert "rm-pack" in bench_run.OPT_IN_OPS and "rm-pack" not in bench_run.ALL_OPS
    out, committed = bench_run.resolve_out(_args(bench_run, ops=["rm-pack"]), bench_run.OPT_IN_OPS)
    assert committed and out == bench_run.COMMITTED_DIR
    out, committed = bench_run.resolve_out(_args(bench_run, ops=["rm-pack"]))  # the main ops': partial
    assert not committed
    for kw in ({"quick": True}, {"tiny": True}, {"shapes": ["fsdp"]}, {"providers": ["ddp"]}):
        out, committed = bench_run.resolve_out(_args(bench_run, ops=["rm-pack"], **kw), bench_run.OPT_IN_OPS)
        assert not committed and out == bench_run.SCRATCH_DIR, kw
        with pytest.raises(SystemExit, match="never writes the committed results"):
            bench_run.resolve_out(_args(bench_run, ops=["rm-pack"], out=bench_run.COMMITTED_DIR, **kw),
                                  bench_run.OPT_IN_OPS)


def test_committed_result_tables_are_their_csv(figures, tmp_path, capsys):
    """Every committed benchmarks/results/**/*.md beside a CSV is that CSV's report (the table
    and the targets, under the run's own title and "Written by" paragraph): a number edited by
    hand in the table, or a changed CSV, makes --check fail."""
    tables = figures.result_tables(ROOT)
    assert ("benchmarks/results/cpu-amd-epyc-2c.md", "benchmarks/results/cpu-amd-epyc-2c.csv") in tables
    assert len(tables) >= 8, tables
    shutil.copytree(os.path.join(ROOT, "benchmarks"), tmp_path / "benchmarks", ignore=shutil.ignore_patterns(
        "__pycache__"))
    for rel in figures.FILES:
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(ROOT, rel), tmp_path / rel)
    shutil.copytree(os.path.join(ROOT, "docs", "results"), tmp_path / "docs" / "results", dirs_exist_ok=True)
    root = str(tmp_path)
    assert figures.main(["--check", "--root", root]) == 0
    md = tmp_path / "benchmarks" / "results" / "cpu-amd-epyc-2c-grpo.md"
    text = md.read_text()
    i = text.index("| met |")
    md.write_text(text[:i] + "| MISSED |" + text[i + len("| met |"):])
    assert figures.main(["--check", "--root", root]) == 1
    assert "cpu-amd-epyc-2c-grpo.md" in capsys.readouterr().err
    assert figures.main(["--root", root]) == 0 and md.read_text() == text  # regenerated: the CSV's figures
    csv = tmp_path / "benchmarks" / "results" / "cpu-amd-epyc-2c-grpo.csv"
    csv.write_text(csv.read_text().replace(",call_ms,", ",call_ms,1", 1))  # a time changes
    assert figures.main(["--check", "--root", root]) == 1
