"""Checkpoints and resume of both trainers under attack and faults: a planted pickle never
runs; a damaged newest checkpoint is skipped (with the reason) for the newest intact one; no
intact one is a one-line error; bad checkpoint names and leftovers of killed writes are
handled; a finished run resumes without a second final evaluation; checkpoints follow the
umask; and a run killed (SIGKILL) at random moments, inside checkpoint writes too, then
resumed, ends with the parameters of an uninterrupted run."""
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from utils import subprocess_env  # noqa: E402

from rmkernels_train import trainer as T  # noqa: E402
from rmkernels_train.ppo import build_parser as ppo_parser  # noqa: E402
from rmkernels_train.ppo import main as ppo_main  # noqa: E402
from rmkernels_train.reward import main as reward_main  # noqa: E402

TINY = ["--hidden-size", "32", "--layers", "2", "--default-train-pairs", "640", "--batch-size", "16",
        "--threads", "1", "--no-progress", "--no-plot"]
# checkpoint-2 and checkpoint-4, an evaluation at each
REWARD_RUN = [*TINY, "--max-steps", "4", "--save-every", "2", "--eval-every", "2", "--save-total-limit", "3",
              "--seed", "3"]
PPO_FAST = ["--threads", "1", "--no-progress", "--no-plot", "--batch-size", "4", "--max-new-tokens", "4",
            "--ppo-epochs", "1", "--save-every", "1", "--save-total-limit", "3"]
# These tests are about PPO with GAE and a value model; once `rmkernels-train ppo` has an
# --advantage option (the critic-free default of issue 17), they ask for GAE explicitly.
if "--advantage" in ppo_parser()._option_string_actions:
    PPO_FAST += ["--advantage", "gae"]


class Payload:
    """Unpickling this calls os.mkdir(marker): if the marker directory appears, a load ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def plant(path, marker):
    """Replace a file with a pickle that would create ``marker``: in torch.save's format for
    ``.pt`` files, a plain pickle for the others."""
    if path.endswith(".pt"):
        torch.save({"state": Payload(marker)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(Payload(marker), f)
    relist(path)


def relist(path):
    """Rewrite the file list (``T.FILE_LIST``) of the checkpoint that holds ``path``, as one who
    planted or edited a file could: the list would otherwise find the new size first, and what
    is tested is the loaders' own refusal."""
    d = os.path.dirname(path)
    for _ in range(3):
        if os.path.exists(os.path.join(d, T.FILE_LIST)):
            if os.path.basename(path) != T.FILE_LIST:
                T.write_file_list(d)
            return
        d = os.path.dirname(d)


def _files(ckpt):
    return sorted(os.path.relpath(os.path.join(d, f), ckpt) for d, _, fs in os.walk(ckpt) for f in fs)


def _planted_copies(src, ckpt, tmp_path, read):
    """For each file of ``src/ckpt`` (``read``, the files a resume reads, among them): a copy
    of the run ``src`` in which that file is a pickle payload (:func:`plant`). Yields
    (file name, the copy, the marker the payload would create)."""
    files = _files(src / ckpt)
    assert set(read) <= set(files), files
    for name in files:
        run = tmp_path / name.replace("/", "_")
        shutil.copytree(src, run)
        marker = str(tmp_path / f"PWNED-{name.replace('/', '_')}")
        plant(str(run / ckpt / name), marker)
        yield name, run, marker


def _weights(ckpt, name="model.safetensors"):
    from safetensors.torch import load_file

    return load_file(os.path.join(ckpt, name))


def _reward(capsys, *argv):
    rc = reward_main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _ppo(capsys, *argv):
    rc = ppo_main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.err + out.out


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    """A finished tiny reward run with checkpoint-2 and checkpoint-4."""
    out = tmp_path_factory.mktemp("reward") / "run"
    assert reward_main([*REWARD_RUN, "--output-dir", str(out)]) == 0
    return out


@pytest.fixture
def run_copy(reward_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(reward_run, dst)
    return dst


# ---------------------------------------------------------------------------------------
# Code execution from a checkpoint (issue 12.1)
# ---------------------------------------------------------------------------------------
# The files a reward resume reads: each damaged one must make the checkpoint be skipped.
REWARD_READ = ("trainer_state.json", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "optimizer.pt", "scheduler.pt", "rng_state.pt")


def test_reward_resume_never_unpickles_code(reward_run, tmp_path, capsys):
    """A pickle payload planted into each file of the newest checkpoint in turn: the payload
    never runs; the checkpoint is skipped for the older intact one (or, for a file resume
    does not need, resume goes on from it). With no older checkpoint: a one-line error."""
    for name, run, marker in _planted_copies(reward_run, "checkpoint-4", tmp_path, REWARD_READ):
        rc, err = _reward(capsys, *REWARD_RUN, "--output-dir", run, "--resume")
        assert not os.path.exists(marker), f"loading {name} ran code"
        assert rc == 0, (name, err)
        if name in REWARD_READ:
            assert "--resume: skipping checkpoint-4: " in err, (name, err)
            assert f"resuming from {run / 'checkpoint-2'} (step 2)" in err, (name, err)
        # resumed from 2 (or finished at 4): the run ends at step 4 with a loadable checkpoint
        assert json.loads((run / "final.json").read_text())["step"] == 4
        _weights(run / "checkpoint-4")
    # The only checkpoint carries the payload: refused with one line, no traceback.
    run = tmp_path / "only"
    shutil.copytree(reward_run, run)
    shutil.rmtree(run / "checkpoint-2")
    marker = str(tmp_path / "PWNED-only")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pt"):
        plant(str(run / "checkpoint-4" / name), marker)
    rc, err = _reward(capsys, *REWARD_RUN, "--output-dir", run, "--resume")
    assert rc == 1 and not os.path.exists(marker)
    assert "Traceback" not in err and "--model" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("rmkernels-train reward: error: --resume: no intact checkpoint in"), err
    assert "optimizer.pt cannot be loaded safely" in last


# ---------------------------------------------------------------------------------------
# Damaged checkpoints (issue 12.5)
# ---------------------------------------------------------------------------------------
def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _garbage(path):
    with open(path, "wb") as f:
        f.write(b"\x00garbage\xff" * 10)


def _edit_weights(path, edit):
    """Rewrite the safetensors file ``path`` with ``edit(tensors)`` applied (a file that is
    complete and loads, with other weights)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _poison(name, value=float("nan")):
    def edit(t):
        t[name][0] = value
    return edit


def _nan_moment(path):
    state = torch.load(path, weights_only=True)
    next(iter(state["state"].values()))["exp_avg"].view(-1)[0] = float("nan")
    torch.save(state, path)


DAMAGE = {
    "missing weights": (lambda c: _edit_weights(c / "model.safetensors", lambda t: [
        t.pop("score.weight"), t.pop("model.layers.0.mlp.down_proj.weight")]),
        "model.safetensors does not fit the model (missing ['model.layers.0.mlp.down_proj.weight', 'score.weight']"),
    "unexpected weight": (lambda c: _edit_weights(c / "model.safetensors", lambda t: t.update(extra=torch.zeros(2))),
                          "model.safetensors does not fit the model (missing [], unexpected ['extra'])"),
    "wrongly-shaped weight": (lambda c: _edit_weights(c / "model.safetensors", lambda t: t.update(
        {"score.weight": torch.zeros(1, 33)})), "model.safetensors does not fit the model (score.weight has the wrong"),
    "nan weights": (lambda c: _edit_weights(c / "model.safetensors", _poison("score.weight")),
                    "model.safetensors holds non-finite values (score.weight has NaN or inf)"),
    "inf weights": (lambda c: _edit_weights(c / "model.safetensors", _poison("model.norm.weight", float("inf"))),
                    "model.safetensors holds non-finite values (model.norm.weight has NaN or inf)"),
    "truncated weights": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors is damaged"),
    "missing optimizer": (lambda c: os.remove(c / "optimizer.pt"), "optimizer.pt is missing"),
    "truncated optimizer": (lambda c: _truncate(c / "optimizer.pt"), "optimizer.pt cannot be loaded"),
    "garbage trainer state": (lambda c: _garbage(c / "trainer_state.json"), "trainer_state.json is not readable JSON"),
    "trainer state of another step": (
        lambda c: (c / "trainer_state.json").write_text(
            json.dumps({**json.loads((c / "trainer_state.json").read_text()), "step": 7})),
        "trainer_state.json says step 7"),
    "negative epoch": (
        lambda c: (c / "trainer_state.json").write_text(
            json.dumps({**json.loads((c / "trainer_state.json").read_text()), "epoch": -1})),
        "'epoch' is -1"),
    "garbage rng": (lambda c: _garbage(c / "rng_state.pt"), "rng_state.pt cannot be loaded"),
    "rng of the wrong kind": (lambda c: torch.save({"python": 5, "torch": torch.zeros(3)}, c / "rng_state.pt"),
                              "rng_state.pt is not a saved RNG state"),
    "optimizer of another model": (
        lambda c: torch.save(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))]).state_dict(), c / "optimizer.pt"),
        "optimizer.pt does not fit the model"),
    "scheduler garbage": (lambda c: torch.save({"a": 1}, c / "scheduler.pt"), "scheduler.pt is not"),
    # a NaN moment: every step after the resume diverged, and the run named this checkpoint the last good one
    "nan optimizer state": (lambda c: _nan_moment(c / "optimizer.pt"),
                            "optimizer.pt holds non-finite values (its 'exp_avg' state)"),
    "missing config": (lambda c: os.remove(c / "config.json"), "config.json is missing"),
    "tokenizer garbage": (lambda c: _garbage(c / "tokenizer.json"), "cannot load a tokenizer"),
    "chat template that does not parse": (
        lambda c: (c / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content "),
        "chat_template.jinja: the chat template does not parse (TemplateSyntaxError"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_reward_resume_skips_a_damaged_checkpoint(run_copy, capsys, case):
    damage, reason = DAMAGE[case]
    damage(run_copy / "checkpoint-4")
    relist(str(run_copy / "checkpoint-4" / "config.json"))  # the checks behind the file list
    rc, err = _reward(capsys, *REWARD_RUN, "--output-dir", run_copy, "--resume")
    assert rc == 0, err
    assert "Traceback" not in err
    assert "--resume: skipping checkpoint-4: " in err and reason in err, err
    assert f"resuming from {run_copy / 'checkpoint-2'} (step 2)" in err
    # the rewritten checkpoint-4 is intact again and equals the undamaged run's
    assert json.loads((run_copy / "checkpoint-4" / "trainer_state.json").read_text())["step"] == 4


def test_conversational_resume_skips_a_checkpoint_whose_chat_template_does_not_parse(tmp_path, capsys):
    """With conversational --data the newest checkpoint's template renders every pair: one
    that does not parse is damage (it was jinja2's TemplateSyntaxError traceback)."""
    data = tmp_path / "conv.jsonl"
    pair = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "x"}],
            "rejected": [{"role": "assistant", "content": "y"}]}
    data.write_text("".join(json.dumps(pair) + "\n" for _ in range(12)))
    out = tmp_path / "run"
    argv = ["--data", data, "--hidden-size", 16, "--layers", 1, "--batch-size", 2, "--threads", 1, "--no-progress",
            "--no-plot", "--save-every", 2, "--save-total-limit", 5, "--output-dir", out]
    rc, err = _reward(capsys, *argv, "--max-steps", 4)
    assert rc == 0, err
    keep = tmp_path / "keep"
    shutil.copytree(out, keep)
    (out / "checkpoint-4" / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content ")
    relist(str(out / "checkpoint-4" / "chat_template.jinja"))
    rc, err = _reward(capsys, *argv, "--max-steps", 5, "--resume")
    assert rc == 0 and "Traceback" not in err, err
    assert (f"--resume: skipping checkpoint-4: {out / 'checkpoint-4' / 'chat_template.jinja'}: the chat template "
            f"does not parse (TemplateSyntaxError") in err, err
    assert f"resuming from {out / 'checkpoint-2'} (step 2)" in err
    # the template deleted: transformers loads the tokenizer without one, and the run blamed the
    # data ("conversational data needs a tokenizer with a chat template"); the file list finds it
    os.remove(keep / "checkpoint-4" / "chat_template.jinja")
    argv[argv.index(out)] = keep
    rc, err = _reward(capsys, *argv, "--max-steps", 5, "--resume")
    assert rc == 0 and "Traceback" not in err, err
    assert ("--resume: skipping checkpoint-4: chat_template.jinja is missing (it was written with the checkpoint)"
            in err), err
    assert f"resuming from {keep / 'checkpoint-2'} (step 2)" in err


@pytest.mark.parametrize("edit", ["removed", "grown"])
def test_resume_skips_a_checkpoint_whose_files_differ_from_its_list(run_copy, capsys, edit):
    """Every checkpoint lists its files with their sizes (``T.FILE_LIST``, written last); a file
    removed or changed in size afterwards that the loaders take as optional or read without
    noticing (the chat template of a run on plain-text data; a tokenizer config with a byte more)
    makes it damaged, named (checked after the loaders, whose own reasons come first)."""
    files = json.loads((run_copy / "checkpoint-4" / T.FILE_LIST).read_text())
    assert {"model.safetensors", "optimizer.pt", "config.json", "chat_template.jinja"} <= set(files), files
    assert T.FILE_LIST not in files and "trainer_state.json" not in files
    if edit == "removed":
        os.remove(run_copy / "checkpoint-4" / "chat_template.jinja")
        reason = "chat_template.jinja is missing (it was written with the checkpoint)"
    else:
        path = run_copy / "checkpoint-4" / "tokenizer_config.json"
        size = files["tokenizer_config.json"]
        with open(path, "a") as f:
            f.write("\n")
        reason = f"tokenizer_config.json has {size + 1} bytes, written with {size}"
    rc, err = _reward(capsys, *REWARD_RUN, "--output-dir", run_copy, "--resume")
    assert rc == 0 and "Traceback" not in err, err
    assert f"--resume: skipping checkpoint-4: {reason}" in err, err
    assert f"resuming from {run_copy / 'checkpoint-2'} (step 2)" in err


@pytest.mark.parametrize("case", ["truncated weights", "garbage trainer state", "missing optimizer"])
def test_reward_resume_with_no_intact_checkpoint_is_one_line(run_copy, capsys, case):
    damage, reason = DAMAGE[case]
    for c in ("checkpoint-2", "checkpoint-4"):
        damage(run_copy / c)
        relist(str(run_copy / c / "config.json"))
    rc, err = _reward(capsys, *REWARD_RUN, "--output-dir", run_copy, "--resume")
    assert rc == 1 and "Traceback" not in err and "--model" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"rmkernels-train reward: error: --resume: no intact checkpoint in {run_copy}")
    assert f"checkpoint-4: {reason}" in last and f"checkpoint-2: {reason}" in last


def test_resume_skips_metrics_lines_of_the_wrong_shape(run_copy, capsys):
    """Well-formed JSON lines of the wrong types in metrics.jsonl (a null or text step, a split
    that is not a string, an eval row without its numbers) are dropped like a line cut short:
    the resume neither crashes nor takes them for the checkpoint's evaluation."""
    before = (run_copy / "metrics.jsonl").read_text()
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": null}\n{"step": "1", "split": "eval"}\n{"step": true}\n{"step": 2, "split": 7}\n'
                '{"split": "train"}\n{"step": 4, "split": "eval"}\n{"step": 4, "split": "eval", "loss": "x", '
                '"accuracy": 1, "margin": 0, "pairs": 3}\n')
    rc, err = _reward(capsys, *REWARD_RUN, "--output-dir", run_copy, "--resume")
    assert rc == 0 and "Traceback" not in err, err
    assert "eval step" not in err  # the checkpoint's evaluation is the intact row: not made again
    assert (run_copy / "metrics.jsonl").read_text() == before
    final = json.loads((run_copy / "final.json").read_text())
    assert final["eval"]["loss"] == [json.loads(x) for x in before.splitlines()][-1]["loss"]
    # an eval row of the checkpoint's step without its numbers only: that evaluation is made again
    rows = [json.loads(x) for x in before.splitlines()]
    last = rows[-1]
    assert last["split"] == "eval" and last["step"] == 4
    (run_copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]) +
                                            json.dumps({"step": 4, "split": "eval"}) + "\n")
    rc, err = _reward(capsys, *REWARD_RUN, "--output-dir", run_copy, "--resume")
    assert rc == 0 and "Traceback" not in err, err
    assert "eval step 4" in err


def test_read_metrics_keeps_only_records_of_the_right_shape(tmp_path):
    from rmkernels_train.utils import read_metrics

    path = tmp_path / "metrics.jsonl"
    good = [{"step": 0, "split": "eval", "score": 1.5}, {"step": 3, "split": "train", "loss": "x"}, {"step": 2}]
    wrong_type = ['{"step": null}', '{"step": "1", "split": "eval"}', '{"step": -1}', '{"step": 1.0}',
                  '{"step": false}', '{"step": 1, "split": ["eval"]}', '{"split": "train"}', '[1, 2]', '"text"',
                  '{"step": 4, "sp']
    # rows of the right types without what the reader requires (a number "score" in an eval row)
    incomplete = [{"step": 1, "split": "eval"}, {"step": 1, "split": "eval", "score": "high"},
                  {"step": 1, "split": "eval", "score": True}]
    lines = [json.dumps(good[0]), *wrong_type[:5], *map(json.dumps, incomplete), json.dumps(good[1]),
             *wrong_type[5:], "", json.dumps(good[2])]
    path.write_text("\n".join(lines) + "\n")
    assert read_metrics(str(path), {"eval": ("score",)}) == good
    assert read_metrics(str(path)) == [good[0], *incomplete, *good[1:]]


# ---------------------------------------------------------------------------------------
# One run at a time in an output directory
# ---------------------------------------------------------------------------------------
LOCK = ".rmkernels-train.lock"


def test_a_second_run_in_the_same_output_dir_stops_with_one_line(run_copy, capsys):
    """A run holding the output directory (its lock file flock'ed): a second run there stops
    at start with one line, and writes nothing; the first run's checkpoints stay."""
    import fcntl

    before = {p: (run_copy / p).read_bytes() for p in ("metrics.jsonl", "checkpoint-4/model.safetensors")}
    fd = os.open(run_copy / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        for resume in ((), ("--resume",)):
            rc, err = _reward(capsys, *REWARD_RUN[:-2], "--max-steps", 6, "--seed", 3, "--output-dir", run_copy,
                              *resume)
            assert rc == 1 and "Traceback" not in err, err
            assert err.strip() == (f"rmkernels-train reward: error: --output-dir {run_copy}: another run is using it "
                                   f"(it holds {run_copy / LOCK}); wait for that run to end, or choose another "
                                   f"--output-dir"), err
        rc, err = _ppo(capsys, "--output-dir", run_copy, "--steps", 1, *PPO_FAST)
        assert rc == 1 and "another run is using it" in err and len(err.strip().splitlines()) == 1, err
    finally:
        os.close(fd)
    assert {p: (run_copy / p).read_bytes() for p in before} == before
    assert [s for s, _ in T.list_checkpoints(str(run_copy))[0]] == [2, 4]


def test_the_lock_file_of_a_killed_run_does_not_block(run_copy, tmp_path, capsys):
    """A run killed (SIGKILL) while it held the lock leaves the file: the kernel released the
    lock, so the next run goes on (and removes the file at its end)."""
    holder = ("import fcntl, os, signal, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
              "fcntl.flock(fd, fcntl.LOCK_EX); os.kill(os.getpid(), signal.SIGKILL)")
    r = subprocess.run([sys.executable, "-c", holder, str(run_copy / LOCK)])
    assert r.returncode == -signal.SIGKILL and (run_copy / LOCK).exists()
    rc, err = _reward(capsys, *REWARD_RUN[:-2], "--max-steps", 6, "--seed", 3, "--output-dir", run_copy, "--resume")
    assert rc == 0 and "another run" not in err, err
    assert not (run_copy / LOCK).exists()
    # a new directory, refused at start (here: bad data): the lock leaves no directory behind
    rc, err = _reward(capsys, *TINY, "--max-steps", 1, "--data", tmp_path / "none.jsonl", "--output-dir",
                      tmp_path / "new")
    assert rc == 1 and not (tmp_path / "new").exists(), err


def test_rotation_never_keeps_a_damaged_newer_checkpoint_instead_of_the_new_one(run_copy, capsys):
    """--save-total-limit 1 after resuming from checkpoint-2 past a damaged checkpoint-4: the
    new checkpoint-3 is kept, the abandoned checkpoint-4 goes."""
    _truncate(run_copy / "checkpoint-4" / "model.safetensors")
    relist(str(run_copy / "checkpoint-4" / "model.safetensors"))
    rc, err = _reward(capsys, *REWARD_RUN[:-4], "--save-total-limit", 1, "--save-every", 1, "--seed", 3,
                      "--stop-after", 1, "--output-dir", run_copy, "--resume")
    assert rc == 0, err
    assert [s for s, _ in T.list_checkpoints(str(run_copy))[0]] == [3]
    _weights(run_copy / "checkpoint-3")


def test_bad_checkpoint_names_and_leftovers(run_copy, capsys):
    """checkpoint-abc / checkpoint--3 / checkpoint-007 are refused with a message (never
    read); .tmp-checkpoint-* and .old-checkpoint-* leftovers are removed at start."""
    for name in ("checkpoint-abc", "checkpoint--3", "checkpoint-007"):
        shutil.copytree(run_copy / "checkpoint-4", run_copy / name)
    (run_copy / "checkpoint-9.json").write_text("{}")
    (run_copy / ".tmp-checkpoint-6-abcd").mkdir()
    (run_copy / ".tmp-checkpoint-6-abcd" / "model.safetensors").write_bytes(b"x" * 1000)
    (run_copy / ".old-checkpoint-4-efgh").mkdir()
    good, refused = T.list_checkpoints(str(run_copy))
    assert [s for s, _ in good] == [2, 4]
    assert sorted(n for n, _ in refused) == ["checkpoint--3", "checkpoint-007", "checkpoint-9.json", "checkpoint-abc"]
    rc, err = _reward(capsys, *REWARD_RUN[:-2], "--max-steps", 6, "--seed", 3, "--output-dir", run_copy,
                      "--resume")
    assert rc == 0, err
    for name in ("checkpoint-abc", "checkpoint--3", "checkpoint-007"):
        assert f"--resume: skipping {name}: the step after 'checkpoint-' is not a non-negative integer" in err
    assert "removed .tmp-checkpoint-6-abcd" in err and "removed .old-checkpoint-4-efgh" in err
    assert not [n for n in os.listdir(run_copy) if n.startswith(".")]
    assert f"resuming from {run_copy / 'checkpoint-4'} (step 4)" in err


def test_a_checkpoint_moved_aside_by_a_killed_rewrite_is_put_back(tmp_path):
    """atomic_dir replaces an existing checkpoint in two renames (the old one aside into
    .old-<name>-*/d, the new one in): a kill between them left neither under the name, and the
    next start removed both. The old one is put back, then the leftovers removed."""
    out = tmp_path / "o"
    (out / ".old-checkpoint-4-ab12cd34" / "d").mkdir(parents=True)
    (out / ".old-checkpoint-4-ab12cd34" / "d" / "model.safetensors").write_text("old")
    (out / ".tmp-checkpoint-4-ef56gh78").mkdir()
    (out / ".old-policy-x9y8z7w6" / "d").mkdir(parents=True)
    (out / "policy").mkdir()  # replaced already: the moved-aside one is a leftover
    (out / ".old-checkpoint-6-qq11rr22").mkdir()  # moved nothing yet
    said = []
    T.remove_stale_checkpoint_dirs(str(out), said.append)
    assert sorted(os.listdir(out)) == ["checkpoint-4", "policy"]
    assert (out / "checkpoint-4" / "model.safetensors").read_text() == "old"
    assert said[0] == "restored checkpoint-4 (an interrupted rewrite had moved it aside)", said
    assert len(said) == 5, said  # then the four leftovers, each named


def test_resuming_a_finished_run_adds_no_second_evaluation(run_copy, capsys):
    before = (run_copy / "metrics.jsonl").read_text()
    rc, err = _reward(capsys, *REWARD_RUN, "--output-dir", run_copy, "--resume")
    assert rc == 0, err
    assert (run_copy / "metrics.jsonl").read_text() == before
    final = json.loads((run_copy / "final.json").read_text())
    assert final["done"] and final["step"] == 4
    assert final["eval"]["accuracy"] == [json.loads(x) for x in before.splitlines()][-1]["accuracy"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_checkpoints_follow_the_umask(tmp_path, capsys, umask):
    old = os.umask(umask)
    try:
        rc, err = _reward(capsys, *TINY, "--max-steps", 1, "--output-dir", tmp_path / "o")
    finally:
        os.umask(old)
    assert rc == 0, err
    ckpt = tmp_path / "o" / "checkpoint-1"
    assert os.stat(ckpt).st_mode & 0o777 == 0o777 & ~umask
    for name in _files(ckpt):
        assert os.stat(ckpt / name).st_mode & 0o777 == 0o666 & ~umask, name


# ---------------------------------------------------------------------------------------
# The PPO trainer
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    """A tiny reward model and a 2-step PPO run on it with checkpoint-1 and checkpoint-2."""
    base = tmp_path_factory.mktemp("ppo")
    assert reward_main([*TINY, "--max-steps", "3", "--output-dir", str(base / "rm")]) == 0
    rm = str(base / "rm" / "checkpoint-3")
    assert ppo_main(["--reward-model", rm, "--output-dir", str(base / "run"), "--steps", "2", *PPO_FAST]) == 0
    return rm, base / "run"


PPO_READ = ("trainer_state.json", "optimizer.pt", "value_model.safetensors", "policy/model.safetensors",
            "ref_policy/model.safetensors")


def test_ppo_resume_never_unpickles_code(ppo_run, tmp_path, capsys):
    rm, src = ppo_run
    for name, run, marker in _planted_copies(src, "checkpoint-2", tmp_path, PPO_READ):
        rc, err = _ppo(capsys, "--reward-model", rm, "--output-dir", run, "--steps", 2, *PPO_FAST, "--resume")
        assert not os.path.exists(marker), f"loading {name} ran code"
        assert rc == 0 and "Traceback" not in err, (name, err)
        if name in PPO_READ:
            assert "skipping checkpoint-2: " in err and f"resuming from {run / 'checkpoint-1'} (step 1)" in err, err


@pytest.mark.parametrize("case", ["truncated policy", "garbage trainer state", "truncated value model", "nan policy",
                                  "inf reference", "nan value model"])
def test_ppo_resume_skips_a_damaged_checkpoint(ppo_run, tmp_path, capsys, case):
    rm, src = ppo_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    file, reason = {"truncated policy": ("policy/model.safetensors", "policy/model.safetensors is damaged"),
                    "garbage trainer state": ("trainer_state.json", "trainer_state.json is not readable JSON"),
                    "truncated value model": ("value_model.safetensors", "value_model.safetensors is damaged"),
                    "nan policy": ("policy/model.safetensors", "policy/model.safetensors holds non-finite values"),
                    "inf reference": ("ref_policy/model.safetensors",
                                      "ref_policy/model.safetensors holds non-finite values"),
                    "nan value model": ("value_model.safetensors", "value_model.safetensors holds non-finite "
                                                                   "values (value_head.weight")}[case]
    damage = {"garbage trainer state": _garbage, "nan policy": lambda p: _edit_weights(p, _poison("lm_head.weight")),
              "inf reference": lambda p: _edit_weights(p, _poison("lm_head.weight", float("-inf"))),
              "nan value model": lambda p: _edit_weights(p, _poison("value_head.weight"))}.get(case, _truncate)
    damage(run / "checkpoint-2" / file)
    relist(str(run / "checkpoint-2" / file))
    rc, err = _ppo(capsys, "--reward-model", rm, "--output-dir", run, "--steps", 3, *PPO_FAST, "--resume")
    assert rc == 0 and "Traceback" not in err, err
    assert f"--resume: skipping checkpoint-2: {reason}" in err, err
    assert f"resuming from {run / 'checkpoint-1'} (step 1)" in err
    # none intact: one line
    damage(run / "checkpoint-1" / file)
    relist(str(run / "checkpoint-1" / file))
    for c in ("checkpoint-2", "checkpoint-3"):
        shutil.rmtree(run / c, ignore_errors=True)
    rc, err = _ppo(capsys, "--reward-model", rm, "--output-dir", run, "--steps", 3, *PPO_FAST, "--resume")
    assert rc == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("rmkernels-train ppo: error: --resume: no intact checkpoint"), err


# ---------------------------------------------------------------------------------------
# Killed at random moments (issue 12.5)
# ---------------------------------------------------------------------------------------
KILL_RUN = [*TINY, "--max-steps", "6", "--save-every", "2", "--eval-every", "6", "--seed", "11"]


def _launch(out, env_extra, resume):
    env = subprocess_env(OMP_NUM_THREADS="1", **env_extra)
    cmd = [sys.executable, "-m", "rmkernels_train", "reward", *KILL_RUN, "--output-dir", str(out)]
    return subprocess.Popen(cmd + (["--resume"] if resume else []), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_killed_at_random_moments_then_resumed_equals_an_uninterrupted_run(tmp_path, capsys):
    """SIGKILL inside a checkpoint write (after the model files), between a complete
    checkpoint and its rename, and right after an optimizer step or at a random time; after
    each kill the run is resumed (or restarted when no checkpoint is left). The final
    parameters and the metrics equal those of an uninterrupted run of the same seed."""
    rc, err = _reward(capsys, *KILL_RUN, "--output-dir", tmp_path / "straight")
    assert rc == 0, err
    rng = random.Random(torch.initial_seed())  # the test's seed (printed on failure)
    faults = [f"checkpoint-write:{rng.randint(1, 2)}", f"dir-rename:{rng.randint(1, 2)}",
              rng.choice([f"step:{rng.randint(1, 3)}", "timer"])]
    rng.shuffle(faults)
    out = tmp_path / "killed"
    log = []
    for fault in faults + [None]:
        resume = bool(T.list_checkpoints(str(out))[0])
        env = {"RMKERNELS_TRAIN_FAULT": fault} if fault not in (None, "timer") else {}
        proc = _launch(out, env, resume)
        if fault == "timer":
            delay = rng.uniform(2.0, 12.0)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
        log.append((fault, resume, proc.returncode, stderr[-600:]))
        assert proc.returncode in (0, -signal.SIGKILL), log
        assert "Traceback" not in stderr, log
        if fault is None:
            assert proc.returncode == 0, log
    assert sum(rc == -signal.SIGKILL for _, _, rc, _ in log) >= 2, log  # the hooks did kill
    final = json.loads((out / "final.json").read_text())
    assert final["done"] and final["step"] == 6, log
    a, b = _weights(tmp_path / "straight" / "checkpoint-6"), _weights(out / "checkpoint-6")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, log)

    def train_curve(d):
        recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in recs if r["split"] == "train"]

    assert train_curve(out) == train_curve(tmp_path / "straight"), log
    assert not [n for n in os.listdir(out) if n.startswith(".")], log



def test_ppo_default_reward_model_dir_never_unpickles_code(ppo_run, tmp_path, capsys):
    """Without --reward-model the PPO run reads <output-dir>/reward_model/final.json and the
    checkpoint it names: a payload planted there (or a pickled pytorch_model.bin beside a
    missing model.safetensors) never runs; the run stops with one line."""
    rm, _ = ppo_run
    for name in ("final.json", "checkpoint-3/config.json", "checkpoint-3/model.safetensors",
                 "checkpoint-3/tokenizer.json", "checkpoint-3/pytorch_model.bin"):
        out = tmp_path / name.replace("/", "_")
        shutil.copytree(os.path.dirname(rm), out / "reward_model")
        (out / "reward_model" / "final.json").write_text(json.dumps({"checkpoint": str(out / "reward_model" /
                                                                                       "checkpoint-3")}))
        marker = str(tmp_path / f"PWNED-{name.replace('/', '_')}")
        if name.endswith(".bin"):
            os.remove(out / "reward_model" / "checkpoint-3" / "model.safetensors")
            torch.save({"score.weight": Payload(marker)}, out / "reward_model" / name)
        else:
            plant(str(out / "reward_model" / name), marker)
        rc, err = _ppo(capsys, "--output-dir", out, "--steps", 1, *PPO_FAST)
        assert not os.path.exists(marker), f"loading reward_model/{name} ran code"
        assert rc == 1 and "Traceback" not in err, (name, err)
        last = err.strip().splitlines()[-1]
        assert last.startswith("rmkernels-train ppo: error: "), (name, err)
        assert "reward_model" in last and "--model" not in last and "--reward-model " not in last, last
