"""Options, resume and checkpoint rules found by the third trainer audit: a checkpoint that
cannot be used for another reason than damage stops the run (never skipped, never deleted by
rotation); a changed option is named on --resume (paths compare as real paths); nonsense and
non-finite option values, and options the run would ignore, are refused with one line; no
checkpoint holds non-finite parameters; a failed checkpoint write (disk full) is one line;
PPO refuses models that would get a random head and prompts that do not fit the models."""
import argparse
import errno
import json
import os
import re
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from rmkernels_train import data as D  # noqa: E402
from rmkernels_train import rl  # noqa: E402
from rmkernels_train import trainer as T  # noqa: E402
from rmkernels_train.ppo import main as ppo_main  # noqa: E402
from rmkernels_train.reward import main as reward_main  # noqa: E402
from rmkernels_train.tokenizer import build_char_tokenizer  # noqa: E402
from rmkernels_train.utils import Dist, TrainingError  # noqa: E402

TINY = ["--hidden-size", "16", "--layers", "1", "--batch-size", "4", "--default-train-pairs", "100",
        "--threads", "1", "--no-progress", "--no-plot"]
RUN = [*TINY, "--max-steps", "4", "--save-every", "2", "--eval-every", "4", "--seed", "3"]
PPO = ["--advantage", "gae", "--policy-layers", "1", "--policy-hidden", "16", "--batch-size", "4",
       "--max-new-tokens", "4", "--steps", "2", "--threads", "1", "--no-progress", "--no-plot"]


def _run(main, capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.err + out.out


def _one_line_error(rc, err, prog="reward"):
    assert rc == 1, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"rmkernels-train {prog}: error: "), err
    return last


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny reward run: checkpoint-2 and checkpoint-4."""
    out = tmp_path_factory.mktemp("opts") / "run"
    assert reward_main([*RUN, "--output-dir", str(out)]) == 0
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished, dst)
    return dst


def _steps(out):
    return [s for s, _ in T.list_checkpoints(str(out))[0]]


# ---------------------------------------------------------------------------------------
# 1. A checkpoint of the other --fsdp kind: the run stops naming --fsdp; nothing is deleted
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fsdp_in_checkpoint", [True])
def test_resume_with_fsdp_changed_stops_and_deletes_nothing(run_copy, capsys, fsdp_in_checkpoint):
    p = run_copy / "checkpoint-4" / "trainer_state.json"
    state = json.loads(p.read_text())
    state["args"]["fsdp"] = fsdp_in_checkpoint
    p.write_text(json.dumps(state))
    rc, err = _run(reward_main, capsys, *RUN[:-6], "--max-steps", 8, "--save-every", 1, "--seed", 3,
                   "--save-total-limit", 1, "--stop-after", 1, "--output-dir", run_copy, "--resume")
    last = _one_line_error(rc, err)
    assert "--fsdp was True in the checkpoint's run and is False now" in last, last
    assert "skipping" not in err
    assert _steps(run_copy) == [2, 4]


def test_rotation_never_deletes_a_newer_checkpoint_not_found_damaged(tmp_path):
    out = tmp_path / "o"
    for s in (2, 6):
        (out / f"checkpoint-{s}").mkdir(parents=True)
    T.remove_stale_checkpoint_dirs(str(out), lambda m: None)  # a new run: nothing found damaged

    def write(tmp):
        (open(os.path.join(tmp, "x"), "w")).close()

    T.save_checkpoint(str(out), 4, write, keep=1)
    assert _steps(out) == [4, 6]  # checkpoint-6 was never found damaged: it stays


# ---------------------------------------------------------------------------------------
# 2. Changed options on --resume are named; a path spelled differently is the same path
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("option, value, message", [
    ("--lr", "0.01", "--lr was 0.001 in the checkpoint's run and is 0.01 now"),
    ("--weight-decay", "0.1", "--weight-decay was 0.0 in the checkpoint's run and is 0.1 now"),
    ("--hidden-size", "32", "--hidden-size was 16 in the checkpoint's run and is 32 now"),
    ("--layers", "2", "--layers was 1 in the checkpoint's run and is 2 now"),
    ("--label-smoothing", "0.1", "--label-smoothing was 0.0 in the checkpoint's run and is 0.1 now"),
    ("--center-coef", "0.01", "--center-coef was 0.0 in the checkpoint's run and is 0.01 now"),
    ("--warmup-steps", "3", "--warmup-steps was 30 in the checkpoint's run and is 3 now"),
    ("--max-grad-norm", "0.5", "--max-grad-norm was 1.0 in the checkpoint's run and is 0.5 now"),
])
def test_reward_resume_names_a_changed_option(run_copy, capsys, option, value, message):
    argv = list(RUN)
    if option in argv:
        i = argv.index(option)
        argv[i + 1] = value
    else:
        argv += [option, value]
    rc, err = _run(reward_main, capsys, *argv, "--max-steps", 6, "--output-dir", run_copy, "--resume")
    assert message in _one_line_error(rc, err), err
    assert _steps(run_copy) == [2, 4]


def _prefs(path, n=40):
    rows = [{"prompt": "ab ", "chosen": "cd" * (1 + i % 3), "rejected": "ef", "margin": 1.0} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_reward_resume_data_paths_compare_as_real_paths(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    _prefs(tmp_path / "data" / "good.jsonl")
    common = [*TINY[:4], "--batch-size", 4, "--threads", 1, "--no-progress", "--no-plot", "--save-every", 1,
              "--max-steps", 3, "--output-dir", "o"]
    rc, err = _run(reward_main, capsys, *common, "--data", "./data/good.jsonl", "--stop-after", 1)
    assert rc == 0, err
    for spelling in ("data/good.jsonl", str(tmp_path / "data" / "good.jsonl")):
        rc, err = _run(reward_main, capsys, *common, "--data", spelling, "--resume", "--stop-after", 1)
        assert rc == 0, err
    rc, err = _run(reward_main, capsys, *common, "--data", "data/good.jsonl", "--resume", "--eval-fraction", 0.2)
    assert "--eval-fraction was 0.05 in the checkpoint's run and is 0.2 now" in _one_line_error(rc, err)


def test_reward_resume_refuses_data_files_whose_contents_changed(tmp_path, capsys):
    """The same --data / --eval-data path with other contents would give the resumed steps other
    pairs, silently: the checkpoint records each file's SHA-256 and --resume names the one that
    changed; the file restored, it resumes. A checkpoint without the record still resumes."""
    data, held = tmp_path / "d.jsonl", tmp_path / "e.jsonl"
    _prefs(data)
    _prefs(held, 8)
    common = [*TINY[:4], "--batch-size", 4, "--threads", 1, "--no-progress", "--no-plot", "--save-every", 1,
              "--max-steps", 4, "--output-dir", tmp_path / "o", "--data", data, "--eval-data", held]
    rc, err = _run(reward_main, capsys, *common, "--stop-after", 1)
    assert rc == 0, err
    state = json.loads((tmp_path / "o" / "checkpoint-1" / "trainer_state.json").read_text())
    assert set(state["data_sha256"]) == {"data", "eval_data"}, state
    original = held.read_text()
    held.write_text(original.replace('"ef"', '"eg"', 1))  # one rejected response edited, same size
    rc, err = _run(reward_main, capsys, *common, "--resume")
    assert (f"--resume: the contents of --eval-data {held} changed since the checkpoint's run"
            in _one_line_error(rc, err)), err
    assert _steps(tmp_path / "o") == [1]
    held.write_text(original)
    _prefs(data, 41)
    rc, err = _run(reward_main, capsys, *common, "--resume")
    assert f"the contents of --data {data} changed" in _one_line_error(rc, err), err
    data.rename(tmp_path / "gone.jsonl")  # a file that is not there: the loader's own message
    rc, err = _run(reward_main, capsys, *common, "--resume")
    assert f"cannot read data file {data}: No such file or directory" in _one_line_error(rc, err), err
    (tmp_path / "gone.jsonl").rename(data)
    p = tmp_path / "o" / "checkpoint-1" / "trainer_state.json"
    p.write_text(json.dumps({k: v for k, v in state.items() if k != "data_sha256"}))  # an older checkpoint
    rc, err = _run(reward_main, capsys, *common, "--resume", "--stop-after", 1)
    assert rc == 0, err
    # checkpoint-2 records the file its run read (41 pairs): the same file resumes, the older one not
    rc, err = _run(reward_main, capsys, *common, "--resume", "--stop-after", 1)
    assert rc == 0, err
    _prefs(data)
    rc, err = _run(reward_main, capsys, *common, "--resume")
    assert f"the contents of --data {data} changed" in _one_line_error(rc, err), err


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_rl_resume_refuses_a_prompts_file_whose_contents_changed(tmp_path, capsys, advantage):
    rm = _save(tmp_path / "rm", "rm")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"sort: {i}3{i}"}) + "\n" for i in range(8)))
    if advantage == "gae":
        argv = [*PPO, "--save-every", 1]
    else:
        argv = ["--advantage", "grpo", *CRITIC_FREE, "--steps", 2, "--save-every", 1]
    argv += ["--reward-model", rm, "--prompts", prompts, "--output-dir", tmp_path / "o"]
    rc, err = _run(ppo_main, capsys, *argv, "--stop-after", 1)
    assert rc == 0, err
    prompts.write_text(prompts.read_text().replace("sort: 030", "sort: 031"))
    rc, err = _run(ppo_main, capsys, *argv, "--resume")
    assert f"--resume: the contents of --prompts {prompts} changed" in _one_line_error(rc, err, "ppo"), err
    prompts.write_text(prompts.read_text().replace("sort: 031", "sort: 030"))
    rc, err = _run(ppo_main, capsys, *argv, "--resume")
    assert rc == 0, err


def test_ppo_resume_fixes_the_reward_model_compared_as_real_paths(tmp_path):
    fixed = rl.resume_fixed("gae")
    saved = {k: None for k in fixed}
    (tmp_path / "rm").mkdir()
    saved["reward_model"] = str(tmp_path / "rm")
    now = argparse.Namespace(**{**saved, "reward_model": str(tmp_path / "other")})
    with pytest.raises(TrainingError, match="--reward-model was"):
        T.check_resume_args({**saved, "world_size": 1}, now, fixed, 1)
    now = argparse.Namespace(**{**saved, "reward_model": str(tmp_path / "." / "rm") + "/"})
    T.check_resume_args({**saved, "world_size": 1}, now, fixed, 1)  # the same directory


# ---------------------------------------------------------------------------------------
# 3-6, 10. Bad values and ignored options: one line, before any work
# ---------------------------------------------------------------------------------------
REWARD_BAD = [
    (["--max-grad-norm", "-1"], "--max-grad-norm must be a finite number >= 0, got -1.0"),
    (["--max-grad-norm", "inf"], "--max-grad-norm must be a finite number >= 0, got inf"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
    (["--center-coef", "nan"], "--center-coef must be a finite number >= 0"),
    (["--center-coef", "inf"], "--center-coef must be a finite number >= 0"),
    (["--hidden-size", "0"], "--hidden-size must be a positive multiple of 8"),
    (["--hidden-size", "15"], "--hidden-size must be a positive multiple of 8"),
    (["--hidden-size", "-4"], "--hidden-size must be a positive multiple of 8"),
    (["--epochs", "inf"], "--epochs must be a finite number > 0"),
    (["--seed", "99999999999999999999"], "--seed must be in [0, 4294967295]"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295]"),
    (["--output-dir", ""], "--output-dir is empty"),
    (["--threads", "100000"], "--threads must be <= "),
    (["--layers", "0"], "--layers must be >= 1"),
    (["--layers", "-1"], "--layers must be >= 1"),
    (["--warmup-steps", "-5"], "--warmup-steps must be >= 0"),
    (["--default-train-pairs", "0"], "--default-train-pairs must be >= 1"),
    (["--eval-fraction", "0.1"], "--eval-fraction would be ignored"),
    (["--margin-column", "m"], "--margin-column would be ignored"),
]


@pytest.mark.parametrize("argv, message", REWARD_BAD, ids=[" ".join(a) for a, _ in REWARD_BAD])
def test_reward_refuses_bad_values(tmp_path, capsys, argv, message):
    out = ["--output-dir", tmp_path / "o"] if "--output-dir" not in argv else []
    rc, err = _run(reward_main, capsys, *TINY, "--max-steps", 1, *out, *argv)
    assert message in _one_line_error(rc, err), err
    assert not (tmp_path / "o").exists()


def test_reward_refuses_options_it_would_ignore(tmp_path, capsys):
    _prefs(tmp_path / "p.jsonl")
    os.makedirs(tmp_path / "m")
    cases = [
        (["--data", tmp_path / "p.jsonl", "--default-train-pairs", 10], "--default-train-pairs would be ignored"),
        (["--data", tmp_path / "p.jsonl", "--eval-data", tmp_path / "p.jsonl", "--eval-fraction", 0.1],
         "--eval-fraction would be ignored: --eval-data gives the held-out pairs"),
        (["--model", tmp_path / "m", "--hidden-size", 16], "--hidden-size would be ignored: --model gives the model"),
        (["--model", tmp_path / "m", "--layers", 1], "--layers would be ignored: --model gives the model"),
    ]
    for argv, message in cases:
        rc, err = _run(reward_main, capsys, *argv, "--output-dir", tmp_path / "o", "--no-progress", "--no-plot")
        assert message in _one_line_error(rc, err), (argv, err)


PPO_BAD = [
    (["--gamma", "inf"], "--gamma must be a finite number >= 0"),
    (["--score-clip", "inf"], "--score-clip must be a finite number > 0"),
    (["--missing-eos-penalty", "nan"], "--missing-eos-penalty must be a finite number"),
    (["--missing-eos-penalty", "inf"], "--missing-eos-penalty must be a finite number"),
    (["--seed", "99999999999999999999"], "--seed must be in"),
    (["--output-dir", ""], "--output-dir is empty"),
    (["--kl-target", "2"], "--kl-target would be ignored: these options configure --adaptive-kl, which is off"),
    (["--kl-horizon", "2"], "--kl-horizon would be ignored"),
    (["--no-whiten", "--no-shift-mean"], "--no-shift-mean would be ignored: --no-whiten turns whitening off"),
    (["--no-whiten", "--biased-whiten"], "--biased-whiten would be ignored"),
]


@pytest.mark.parametrize("argv, message", PPO_BAD, ids=[" ".join(a) for a, _ in PPO_BAD])
def test_ppo_refuses_bad_values(tmp_path, capsys, argv, message):
    out = ["--output-dir", tmp_path / "o"] if "--output-dir" not in argv else []
    rc, err = _run(ppo_main, capsys, *PPO, *out, *argv)
    assert message in _one_line_error(rc, err, "ppo"), err
    assert not (tmp_path / "o").exists()


def test_ppo_refuses_policy_size_with_policy_and_a_prompt_directory(tmp_path, capsys):
    os.makedirs(tmp_path / "p")
    rc, err = _run(ppo_main, capsys, *PPO, "--policy", tmp_path / "p", "--output-dir", tmp_path / "o")
    assert "--policy-layers, --policy-hidden would be ignored: --policy gives the policy" in \
        _one_line_error(rc, err, "ppo")
    rc, err = _run(ppo_main, capsys, *PPO, "--prompts", tmp_path / "p", "--output-dir", tmp_path / "o")
    assert f"--prompts {tmp_path / 'p'}: is a directory" in _one_line_error(rc, err, "ppo")


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
@pytest.mark.parametrize("config,weights,message", [
    ("{not json", True, "cannot read its config.json: "),
    ('{"model_type": "llama"}', False, "no weights in it (none of model.safetensors, "),
    ('{"model_type": "clip"}', True, "transformers has no causal LM for its model_type 'clip'"),
])
def test_ppo_refuses_a_policy_directory_before_training_anything(tmp_path, capsys, advantage, config, weights,
                                                                  message):
    """A --policy that cannot load stops the run with the argument checks, before the default
    reward model is trained (minutes; the policy used to be loaded only after it)."""
    pol = tmp_path / "policy"
    os.makedirs(pol)
    (pol / "config.json").write_text(config)
    if weights:
        (pol / "model.safetensors").write_bytes(b"")
    argv = ["--advantage", advantage, *PPO[6:]]  # without --policy-layers / --policy-hidden
    rc, err = _run(ppo_main, capsys, *argv, "--policy", pol, "--output-dir", tmp_path / "o")
    assert f"--policy {pol}: {message}" in _one_line_error(rc, err, "ppo"), err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------
# 4. Non-finite parameters are never saved (nor called a good checkpoint)
# ---------------------------------------------------------------------------------------
def test_nonfinite_parameters_are_never_saved(tmp_path, capsys):
    m = torch.nn.Linear(2, 2)
    with torch.no_grad():
        m.weight[0, 0] = float("nan")
    with pytest.raises(TrainingError, match=r"parameters are not finite after step 3 \(model.weight\); not saved; "
                                            r"the last checkpoint \(finite parameters\) is X"):
        T.check_finite_before_saving(None, 3, "X", ("model", m))
    # an lr that overflows the forward after one step: no checkpoint of those weights
    rc, err = _run(reward_main, capsys, *TINY, "--max-steps", 3, "--save-every", 1, "--eval-every", 1, "--lr", 1e30,
                   "--warmup-steps", 0, "--output-dir", tmp_path / "o")
    _one_line_error(rc, err)
    assert _steps(tmp_path / "o") == [], err
    for lr in ("1e38",):  # AdamW's step size overflows float32: one line, not a traceback
        rc, err = _run(reward_main, capsys, *TINY, "--max-steps", 2, "--lr", lr, "--warmup-steps", 0,
                       "--output-dir", tmp_path / "o2")
        assert "overflows" in _one_line_error(rc, err), err


# ---------------------------------------------------------------------------------------
# 7. Disk full while writing a checkpoint: one line naming the path; older ones survive
# ---------------------------------------------------------------------------------------
class SafetensorError(Exception):
    """safetensors' error type (recognised by name: the Rust extension's class)."""


# The last three: what a disk full looked like from the writers on a 60-170 KiB tmpfs
# (2026-12-03), each a traceback then (not recognised as a write error).
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs "
                                                "0: PytorchStreamWriter failed writing file data/0: file write "
                                                "failed"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 10432 "
                                                "vs 10320"),
                                   RuntimeError("basic_ios::clear: iostream error"),
                                   SafetensorError("Error while serializing: I/O error: No space left on device "
                                                   "(os error 28)")])
def test_a_failed_checkpoint_write_is_one_line(tmp_path, error):
    out = tmp_path / "o"
    (out / "checkpoint-2").mkdir(parents=True)

    def write(tmp):
        raise error

    with pytest.raises(TrainingError, match=f"cannot write {out / 'checkpoint-4'}"):
        T.save_checkpoint(str(out), 4, write, keep=1)
    assert sorted(os.listdir(out)) == ["checkpoint-2"]


def test_any_error_on_a_full_disk_is_a_write_error(tmp_path, monkeypatch):
    """A writer's error in words of its own, while the filesystem has under 1 MiB left: a write
    error too; with space left, the same error is not one (a bug is not called a full disk)."""
    out = tmp_path / "o"
    (out / "checkpoint-2").mkdir(parents=True)

    def write(tmp):
        raise ValueError("some writer's own words")

    with pytest.raises(ValueError, match="some writer's own words"):
        T.save_checkpoint(str(out), 4, write, keep=1)
    real = os.statvfs

    class Full:
        def __init__(self, st):
            self.f_bavail, self.f_frsize = 3, st.f_frsize

    monkeypatch.setattr(T.os, "statvfs", lambda p: Full(real(p)))
    with pytest.raises(TrainingError, match=rf"cannot write {out / 'checkpoint-4'} \(some writer's own words\)"):
        T.save_checkpoint(str(out), 4, write, keep=1)
    assert sorted(os.listdir(out)) == ["checkpoint-2"]


class _TwoRanks:
    """A torchrun rank (``rank`` of 2) in one process: it records its collectives and gets
    the other rank's part from ``tmp`` (rank 0's temporary directory, seen by rank 1) and
    ``peer_line`` (the other rank's error line, or None)."""
    enabled, world_size = True, 2

    def __init__(self, rank, tmp=None, peer_line=None):
        self.rank, self.tmp, self.peer_line, self.calls = rank, tmp, peer_line, []

    @property
    def is_main(self):
        return self.rank == 0

    def broadcast_object(self, obj):
        self.calls.append("broadcast")
        return obj if self.is_main else self.tmp

    def gather_object(self, obj):
        self.calls.append(("gather", obj))
        return [obj, self.peer_line] if self.is_main else [self.peer_line, obj]

    def sum(self, values):  # share_outcome's count of failed ranks (the peer failed when it has a line)
        self.calls.append(("sum", values))
        return [v + (self.peer_line is not None) for v in values]

    any = Dist.any  # the real rule, on the recorded sum


@pytest.mark.parametrize("shards", [False, True], ids=["ddp", "fsdp"])
def test_every_rank_takes_the_same_collectives_whether_the_checkpoint_is_written_or_not(tmp_path, shards):
    """save_checkpoint_on_main: rank 0's write fails (inside the directory, or before it exists:
    the output directory became a file) or succeeds, and rank 1 takes the same collectives in
    the same order (so none waits for one its peer never reaches); every rank raises one line."""
    out, blocked = tmp_path / "o", tmp_path / "f" / "o"
    (tmp_path / "f").write_text("")
    final, line = out / "checkpoint-4", f"cannot write {out / 'checkpoint-4'} (No space left on device)"
    seen = []
    every_rank = seen.append if shards else None

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    want = ["broadcast"] if shards else []
    for where, write in ((out, full), (blocked, lambda tmp: None)):
        rank0 = _TwoRanks(0)
        with pytest.raises(TrainingError, match="cannot write") as e:
            T.save_checkpoint_on_main(rank0, str(where), 4, write, 1, every_rank=every_rank)
        assert rank0.calls == [*want, ("sum", [1.0]), ("gather", str(e.value))]
    assert not final.exists() and os.listdir(out) == []
    rank0 = _TwoRanks(0)
    assert T.save_checkpoint_on_main(rank0, str(out), 4, lambda tmp: None, 1, every_rank=every_rank) == str(final)
    assert rank0.calls == [*want, ("sum", [0.0])] and final.is_dir()  # nobody failed: no lines exchanged
    for tmp in ("/x/.tmp-checkpoint-4-y", None):  # rank 0 made its temporary directory, or failed before
        rank1 = _TwoRanks(1, tmp=tmp, peer_line=f"{line}; ...")
        with pytest.raises(TrainingError, match="^" + re.escape(f"rank 0: {line}")):
            T.save_checkpoint_on_main(rank1, str(out), 4, None, 1, every_rank=every_rank)
        assert rank1.calls == [*want, ("sum", [0.0]), ("gather", None)]
    rank1 = _TwoRanks(1, tmp="/x/.tmp-checkpoint-4-y")
    assert T.save_checkpoint_on_main(rank1, str(out), 4, None, 1, every_rank=every_rank) == str(final)
    assert rank1.calls == [*want, ("sum", [0.0])]
    if shards:  # rank 0's own temporary directory (written, then failed; written), then rank 0's as rank 1 sees it
        assert [os.path.basename(p)[:18] for p in seen] == [".tmp-checkpoint-4-"] * 4, seen
        assert seen[2:] == ["/x/.tmp-checkpoint-4-y"] * 2
    else:
        assert seen == []


def test_a_failed_write_of_rank_0_is_kept_for_the_next_check_and_stops_every_rank():
    """MainWrites (rank 0's files besides checkpoints): under torchrun rank 0's failed write is
    kept, not raised (rank 0 goes on to the collectives the other ranks are in), its later writes
    are skipped, and the next check raises on every rank: rank 0 its line, rank 1 "rank 0: ...".
    A check told (by a sum all-reduced with another collective) that no rank failed takes no
    collective. A single process raises at once."""
    line = "cannot write /o/metrics.jsonl (No space left on device)"
    done = []

    def full(*args):
        raise TrainingError(line)

    rank0 = _TwoRanks(0)
    writes = T.MainWrites(rank0)
    assert writes(full) is None and writes.failed == 1.0
    assert writes(done.append, 1) is None and done == [] and rank0.calls == []
    with pytest.raises(TrainingError, match="^" + re.escape(line) + "$"):
        writes.check(failed=1.0)
    assert rank0.calls == [("sum", [1.0]), ("gather", line)]
    rank1 = _TwoRanks(1, peer_line=line)
    writes = T.MainWrites(rank1)
    assert writes(full) is None and writes.failed == 0.0  # not rank 0: nothing written, nothing failed
    writes.check(failed=0.0)
    assert rank1.calls == []
    with pytest.raises(TrainingError, match="^" + re.escape(f"rank 0: {line}") + "$"):
        writes.check()
    assert rank1.calls == [("sum", [0.0]), ("gather", None)]
    rank0 = _TwoRanks(0)
    assert T.MainWrites(rank0).now(lambda x: x + 1, 4) == 5 and rank0.calls == [("sum", [0.0])]
    single = T.MainWrites(Dist())
    with pytest.raises(TrainingError, match="^" + re.escape(line) + "$"):
        single(full)
    single.check()
    assert single.now(done.append, 2) is None and done == [2]


# ---------------------------------------------------------------------------------------
# 8, 11. PPO: no random heads; prompts and responses must fit the models
# ---------------------------------------------------------------------------------------
def _save(path, kind, positions=64, vocab=None):
    import transformers

    tok = build_char_tokenizer("0123456789 sortabcdefghijklmnopqrstuvwxyz:")
    cfg = transformers.LlamaConfig(vocab_size=vocab or len(tok), hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                   bos_token_id=tok.bos_token_id, max_position_embeddings=positions,
                                   tie_word_embeddings=False)
    cls = transformers.LlamaForCausalLM if kind == "lm" else transformers.LlamaForSequenceClassification
    torch.manual_seed(0)
    cls(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_ppo_refuses_models_that_would_get_a_random_head(tmp_path, capsys):
    lm, rm = _save(tmp_path / "lm", "lm"), _save(tmp_path / "rm", "rm")
    rc, err = _run(ppo_main, capsys, *PPO, "--reward-model", lm, "--output-dir", tmp_path / "o")
    assert f"--reward-model {lm}: not a trained reward model" in _one_line_error(rc, err, "ppo")
    argv = PPO[:2] + PPO[6:]  # without --policy-layers / --policy-hidden
    rc, err = _run(ppo_main, capsys, *argv, "--reward-model", rm, "--policy", rm, "--output-dir", tmp_path / "o2")
    assert f"--policy {rm}: not a causal-LM checkpoint" in _one_line_error(rc, err, "ppo")


def test_ppo_prompts_must_fit_the_models(tmp_path, capsys):
    rm = _save(tmp_path / "rm", "rm", positions=32)
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "sort: 123"}) + "\n" +
                                      json.dumps({"prompt": "1" * 40}) + "\n")
    rc, err = _run(ppo_main, capsys, *PPO, "--reward-model", rm, "--prompts", tmp_path / "p.jsonl",
                   "--output-dir", tmp_path / "o")
    assert f"{tmp_path / 'p.jsonl'}:2: the prompt has 41 tokens; with --max-new-tokens 4 that is more than the " \
           f"models' 32 positions" in _one_line_error(rc, err, "ppo")
    (tmp_path / "huge.jsonl").write_text(json.dumps({"prompt": "1" * 2_000_000}) + "\n")
    rc, err = _run(ppo_main, capsys, *PPO, "--reward-model", rm, "--prompts", tmp_path / "huge.jsonl",
                   "--output-dir", tmp_path / "o")
    assert f"{tmp_path / 'huge.jsonl'}:1: the prompt has 2000000 characters" in _one_line_error(rc, err, "ppo")
    rc, err = _run(ppo_main, capsys, *PPO[:-8], "--max-new-tokens", 100000, *PPO[-6:], "--reward-model", rm,
                   "--output-dir", tmp_path / "o")
    assert "--max-new-tokens 100000: the models take at most 32 positions" in _one_line_error(rc, err, "ppo")
    # the critic-free path: the same rule
    critic_free = ["--warm-start-steps", 0, "--policy-layers", 1, "--policy-hidden", 16, "--batch-size", 2,
                   "--num-generations", 2, "--max-new-tokens", 4, "--eval-prompts", 4, "--threads", 1,
                   "--no-progress", "--no-plot"]
    rc, err = _run(ppo_main, capsys, *critic_free, "--reward-model", rm, "--prompts", tmp_path / "p.jsonl",
                   "--output-dir", tmp_path / "cf")
    assert f"{tmp_path / 'p.jsonl'}:2: the prompt has 41 tokens" in _one_line_error(rc, err, "ppo")


# ---------------------------------------------------------------------------------------
# 12. Smaller: a resume past --max-steps says so; huge lines are dropped before tokenizing
# ---------------------------------------------------------------------------------------
def test_resume_past_max_steps_says_so(run_copy, capsys):
    rc, err = _run(reward_main, capsys, *RUN, "--max-steps", 3, "--output-dir", run_copy, "--resume")
    assert rc == 0, err
    assert "nothing to train: the checkpoint is at step 4, past the 3 steps this run asks for" in err
    assert "4/3" not in err


def test_a_huge_line_is_dropped_without_tokenizing_it(monkeypatch):
    tok = build_char_tokenizer("abc ")
    seen = []
    real = D._encode

    def spy(tokenizer, texts, add_special_tokens):
        seen.extend(len(t) for t in texts)
        return real(tokenizer, texts, add_special_tokens)

    monkeypatch.setattr(D, "_encode", spy)
    recs = [{"prompt": "a ", "chosen": "b", "rejected": "c", "margin": None},
            {"prompt": "a ", "chosen": "b" * 1_000_000, "rejected": "c", "margin": None}]
    pairs, dropped = D.tokenize_pairs(recs, tok, 16)
    assert len(pairs) == 1 and dropped == 1
    assert max(seen) < 100


# ---------------------------------------------------------------------------------------
# 9. pad == eos (a tokenizer without a pad token) and eos appended: the saved model, loaded
# with AutoModelForSequenceClassification and run by HF's forward, scores as the trainer did
# ---------------------------------------------------------------------------------------
def test_saved_reward_model_scores_like_the_trainer_when_pad_is_eos(tmp_path, capsys):
    import transformers

    lm = _save(tmp_path / "lm", "lm", positions=64)
    cfg = json.loads((lm / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (lm / "tokenizer_config.json").write_text(json.dumps(cfg))
    c = json.loads((lm / "config.json").read_text())
    c["pad_token_id"] = None
    (lm / "config.json").write_text(json.dumps(c))
    rc, err = _run(reward_main, capsys, "--model", lm, "--lr", 3e-3, "--batch-size", 8, "--max-steps", 6,
                   "--eval-every", 6, "--default-train-pairs", 200, "--eval-batch-size", 50, "--threads", 1,
                   "--no-progress", "--no-plot", "--output-dir", tmp_path / "o")
    assert rc == 0, err
    ev = json.loads((tmp_path / "o" / "final.json").read_text())["eval"]
    ck = tmp_path / "o" / "checkpoint-6"
    tok = transformers.AutoTokenizer.from_pretrained(ck)
    assert tok.pad_token_id == tok.eos_token_id  # the case of the defect
    model = transformers.AutoModelForSequenceClassification.from_pretrained(ck).eval()
    _, held = D.default_datasets(n_train=200)
    with torch.no_grad():
        def score(texts):  # HF's own forward, HF's own padding of the tokenizer's output (eos appended)
            enc = tok(texts, return_tensors="pt", padding=True)
            return model(**enc).logits.squeeze(-1)

        ch = score([p["prompt"] + p["chosen"] for p in held])
        rj = score([p["prompt"] + p["rejected"] for p in held])
    assert int((ch > rj).sum()) == round(ev["accuracy"] * len(held))
    assert (ch - rj).mean().item() == pytest.approx(ev["margin"], rel=1e-4, abs=1e-6)


def test_a_checkpoint_of_the_previous_version_still_resumes(run_copy, capsys):
    """The previous version recorded the defaults of options its run did not use
    (--eval-fraction and --margin-column without --data): they are not compared."""
    p = run_copy / "checkpoint-4" / "trainer_state.json"
    state = json.loads(p.read_text())
    state["args"].update(eval_fraction=0.05, margin_column="margin")
    p.write_text(json.dumps(state))
    rc, err = _run(reward_main, capsys, *RUN, "--max-steps", 5, "--output-dir", run_copy, "--resume")
    assert rc == 0, err
    assert f"resuming from {run_copy / 'checkpoint-4'} (step 4)" in err


def test_ppo_resume_with_another_reward_model_names_it(tmp_path, capsys):
    """Another --reward-model (here with another vocabulary: every checkpoint used to be
    reported as damaged, 'wrong shape') stops the resume naming --reward-model; the same
    directory spelled another way resumes."""
    import transformers

    rm = _save(tmp_path / "rm", "rm")
    other = tmp_path / "other"
    tok = build_char_tokenizer("0123456789 sort:")
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                                   pad_token_id=tok.pad_token_id, max_position_embeddings=64)
    transformers.LlamaForSequenceClassification(cfg).save_pretrained(other)
    tok.save_pretrained(other)
    common = [*PPO[:-8], "--max-new-tokens", 4, "--ppo-epochs", 1, "--minibatches", 1, *PPO[-6:],
              "--output-dir", tmp_path / "o"]
    rc, err = _run(ppo_main, capsys, *common, "--reward-model", rm, "--stop-after", 1)
    assert rc == 0, err
    rc, err = _run(ppo_main, capsys, *common, "--reward-model", other, "--resume")
    last = _one_line_error(rc, err, "ppo")
    assert f"--reward-model was {str(rm)!r} in the checkpoint's run and is {str(other)!r} now" in last, last
    assert "skipping" not in err and _steps(tmp_path / "o") == [1]
    rc, err = _run(ppo_main, capsys, *common, "--reward-model", f"{tmp_path}/./rm/", "--resume")
    assert rc == 0, err


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_rl_resume_refuses_a_reward_model_that_changed(tmp_path, capsys, monkeypatch, advantage):
    """--reward-model as a reward run's output directory stands for the checkpoint its
    final.json names: after that run went on, the same option named another model, and the
    resumed steps were scored by it, silently. The checkpoint records the SHA-256 of the reward
    model's config and weights; --resume names a changed one (also one retrained in place). A
    resume hashes the reward model once (a 7B model is ~14 GB to read), not again for each
    checkpoint it checks."""
    from safetensors.torch import load_file, save_file

    from rmkernels_train import trainer as T

    run = tmp_path / "rm_run"
    shutil.copytree(_save(tmp_path / "rm", "rm"), run / "checkpoint-1")
    (run / "final.json").write_text(json.dumps({"checkpoint": "checkpoint-1"}))
    if advantage == "gae":
        argv = [*PPO, "--save-every", 1]
    else:
        argv = ["--advantage", "grpo", *CRITIC_FREE, "--steps", 2, "--save-every", 1]
    argv += ["--reward-model", run, "--output-dir", tmp_path / "o"]
    rc, err = _run(ppo_main, capsys, *argv, "--stop-after", 1)
    assert rc == 0, err
    shutil.copytree(run / "checkpoint-1", run / "checkpoint-2")  # the reward run went on
    weights = load_file(run / "checkpoint-2" / "model.safetensors")
    weights["score.weight"] = weights["score.weight"] + 0.01
    save_file(weights, run / "checkpoint-2" / "model.safetensors", metadata={"format": "pt"})
    (run / "final.json").write_text(json.dumps({"checkpoint": "checkpoint-2"}))
    rc, err = _run(ppo_main, capsys, *argv, "--resume")
    assert (f"--resume: the reward model in {run / 'checkpoint-2'} is not the one the checkpoint's run used"
            in _one_line_error(rc, err, "ppo")), err
    assert _steps(tmp_path / "o") == [1]
    (run / "final.json").write_text(json.dumps({"checkpoint": "checkpoint-1"}))
    original = (run / "checkpoint-1" / "tokenizer_config.json").read_text()
    cfg = json.loads(original)
    cfg["model_max_length"] = 12345  # the tokenizer is part of the reward model (PPO encodes with it)
    (run / "checkpoint-1" / "tokenizer_config.json").write_text(json.dumps(cfg))
    rc, err = _run(ppo_main, capsys, *argv, "--resume")
    assert "is not the one the checkpoint's run used" in _one_line_error(rc, err, "ppo"), err
    (run / "checkpoint-1" / "tokenizer_config.json").write_text(original)
    shutil.copy(run / "checkpoint-2" / "model.safetensors", run / "checkpoint-1" / "exported.safetensors")
    hashed = []
    monkeypatch.setattr(T, "model_dir_sha256", lambda path, f=T.model_dir_sha256: hashed.append(path) or f(path))
    rc, err = _run(ppo_main, capsys, *argv, "--resume")  # a file beside the model that loading does not read
    assert rc == 0, err
    assert hashed == [str(run / "checkpoint-1")], hashed


# ---------------------------------------------------------------------------------------
# Fifth audit: --kl-horizon, vocabularies, float32 options, a diverged policy
# ---------------------------------------------------------------------------------------
CRITIC_FREE = ["--warm-start-steps", 0, "--policy-layers", 1, "--policy-hidden", 16, "--batch-size", 2,
               "--num-generations", 2, "--max-new-tokens", 4, "--eval-prompts", 4, "--threads", 1, "--no-progress",
               "--no-plot"]


def test_adaptive_kl_horizon_that_would_make_the_coefficient_negative_is_refused(tmp_path, capsys):
    """The Ziegler factor 1 + clip(err, -0.2, 0.2) x n / horizon reaches 0 when horizon <= 0.2 n
    (n: the responses of a step, over every process): refused at start-up, not a run whose
    checkpoints --resume then calls damaged (kl_coef < 0)."""
    from rmkernels_train.ppo import check_kl_horizon

    rm = _save(tmp_path / "rm", "rm")
    for h in ("0.8", "0.5"):  # --batch-size 4: the factor can reach 1 - 0.2 x 4 / 0.8 = 0
        rc, err = _run(ppo_main, capsys, *PPO, "--reward-model", rm, "--adaptive-kl", "--kl-horizon", h,
                       "--output-dir", tmp_path / "o")
        assert f"--kl-horizon {h} must be > 0.2 x the 4 responses of each step (--batch-size 4) = 0.8" in \
            _one_line_error(rc, err, "ppo"), err
        assert not (tmp_path / "o").exists()
    a = argparse.Namespace(adaptive_kl=True, batch_size=4, kl_horizon=1.6)
    check_kl_horizon(a, 1)
    with pytest.raises(TrainingError, match=re.escape("(--batch-size 4 x 2 processes) = 1.6")):
        check_kl_horizon(a, 2)  # under torchrun n counts every process's rollouts
    check_kl_horizon(argparse.Namespace(adaptive_kl=None, batch_size=4, kl_horizon=None), 8)  # off: no rule
    # just above the bound: the coefficient stays >= 0 and the run resumes from its checkpoints
    out = tmp_path / "ok"
    argv = [*PPO, "--reward-model", rm, "--adaptive-kl", "--kl-target", "100", "--kl-horizon", "0.81",
            "--save-every", "1", "--output-dir", out]
    assert _run(ppo_main, capsys, *argv)[0] == 0
    coefs = [json.loads((out / f"checkpoint-{s}" / "trainer_state.json").read_text())["kl_coef"] for s in (1, 2)]
    assert all(c >= 0 for c in coefs) and coefs[1] < 0.05, coefs
    argv[argv.index("--steps") + 1] = "3"
    rc, err = _run(ppo_main, capsys, *argv, "--resume")
    assert rc == 0 and "resuming from " + str(out / "checkpoint-2") in err and "skipping" not in err, err


def test_a_vocabulary_that_does_not_fit_the_tokenizer_is_one_line(tmp_path, capsys):
    """Models whose embedding does not cover the tokenizer: one line naming the option and both
    sizes (audit: IndexError); a policy padded past the tokenizer is cut to it (it sampled ids the
    tokenizer does not have: IndexError)."""
    small, rm = _save(tmp_path / "small", "rm", vocab=8), _save(tmp_path / "rm", "rm")
    big = _save(tmp_path / "big", "lm", vocab=64)
    n = 42  # the tokenizer of _save
    _prefs(tmp_path / "p.jsonl")
    rc, err = _run(reward_main, capsys, "--model", small, "--data", tmp_path / "p.jsonl", "--max-steps", 1,
                   "--batch-size", 2, "--threads", 1, "--no-progress", "--no-plot", "--output-dir", tmp_path / "r")
    assert f"--model {small}: its vocabulary (8 token embeddings) is smaller than the tokenizer's ({n} tokens)" in \
        _one_line_error(rc, err), err
    no_size = PPO[:2] + PPO[6:]  # without --policy-layers / --policy-hidden
    for argv in (PPO, CRITIC_FREE):
        rc, err = _run(ppo_main, capsys, *argv, "--reward-model", small, "--output-dir", tmp_path / "o")
        assert f"--reward-model {small}: its vocabulary (8 token embeddings) is smaller than the tokenizer's " \
               f"({n} tokens)" in _one_line_error(rc, err, "ppo"), err
    # a policy padded past the tokenizer (as Qwen2.5's 151,936 rows for 151,665 tokens) keeps the
    # tokenizer's rows: it trains, and never samples an id the tokenizer cannot decode
    for i, argv in enumerate((no_size, CRITIC_FREE[:2] + CRITIC_FREE[6:] + ["--steps", 2])):
        out = tmp_path / f"padded{i}"
        rc, err = _run(ppo_main, capsys, *argv, "--reward-model", rm, "--policy", big, "--output-dir", out)
        assert rc == 0, err
        assert f"--policy {big}: its vocabulary (64 token embeddings) is padded past the tokenizer's ({n} tokens); " \
               f"the policy keeps the first {n}" in err, err
        from safetensors.torch import load_file

        ckpt = sorted(out.glob("checkpoint-*"))[-1]
        shapes = {k: v.shape[0] for f in ckpt.rglob("*.safetensors") for k, v in load_file(f).items()
                  if k.endswith(("embed_tokens.weight", "wte.weight", "lm_head.weight"))}
        assert shapes and set(shapes.values()) == {n}, shapes


PPO_FLOAT32 = [
    (["--clip-range", "1e39"], "--clip-range 1e+39: too large, at most 3.403e+38"),
    (["--clip-range-high", "1e39"], "--clip-range-high 1e+39: too large, at most 3.403e+38"),
    (["--temperature", "1e39"], "--temperature 1e+39: too large, at most 8.507e+37"),
    (["--temperature", "1e38"], "--temperature 1e+38: too large"),
    (["--lr", "1e38"], "--lr 1e+38: too large, at most 3.403e+37"),
    (["--kl-coef", "1e39"], "--kl-coef 1e+39: too large"),
    (["--entropy-coef", "1e39"], "--entropy-coef 1e+39: too large"),
    (["--missing-eos-penalty=-1e39"], "--missing-eos-penalty -1e+39: too large"),
]


# (--missing-eos-penalty is an option of --advantage gae alone: not run with grpo)
PPO_FLOAT32_CASES = [pytest.param(adv, argv, message, id=f"{adv}-{' '.join(argv)}")
                     for adv in ("gae", "grpo") for argv, message in PPO_FLOAT32
                     if not (adv == "grpo" and argv[0].startswith("--missing-eos-penalty"))]


@pytest.mark.parametrize("advantage, argv, message", PPO_FLOAT32_CASES)
def test_ppo_float_options_must_fit_float32(tmp_path, capsys, advantage, argv, message):
    """A float option applied to float32 tensors beyond float32's range is refused at start-up
    (audit: "value cannot be converted to type float without overflow", multinomial tracebacks)."""
    rm = _save(tmp_path / "rm", "rm")
    base = PPO if advantage == "gae" else CRITIC_FREE
    rc, err = _run(ppo_main, capsys, *base, "--reward-model", rm, "--output-dir", tmp_path / "o", *argv)
    assert message in _one_line_error(rc, err, "ppo"), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_a_diverged_policy_stops_with_one_line(tmp_path, capsys, advantage):
    """--lr far too large: the policy's logits overflow at the next sampling (finite parameters),
    or its parameters go NaN: one line naming the step, the last checkpoint and --lr, not
    torch.multinomial's "probability tensor contains inf/nan" traceback."""
    rm = _save(tmp_path / "rm", "rm")
    if advantage == "gae":
        argv = [*PPO, "--minibatches", 1, "--ppo-epochs", 1, "--lr", "1e30"]  # one update: no NaN loss first
    else:
        # (the entropy term: a gradient even when every response of a group scores the same)
        argv = [*CRITIC_FREE, "--steps", 3, "--lr", "1e12", "--kl-coef", "0", "--entropy-coef", "1"]
    rc, err = _run(ppo_main, capsys, *argv, "--reward-model", rm, "--output-dir", tmp_path / "o")
    line = _one_line_error(rc, err, "ppo")
    assert re.search(r"after \d+ step\(s\) the policy's next-token logits are not finite \(NaN or \+inf\): "
                     r"training diverged; no checkpoint had been written yet\. Try a lower --lr\.", line), line
    # parameters that went NaN: stopped after that update, naming the last good checkpoint
    m = torch.nn.Linear(2, 2)
    with torch.no_grad():
        m.bias[1] = float("inf")
    with pytest.raises(TrainingError, match=re.escape("the parameters are not finite after the update of step 4 "
                                                      "(policy.bias): training diverged; the last good checkpoint "
                                                      "is X (resume with --resume). Try a lower --lr.")):
        T.check_finite_after_update(None, 4, "X", ("policy", m))


def test_the_finiteness_check_exchanges_names_only_when_a_rank_found_one():
    """nonfinite_parameter_on_any_rank (after every RL update, before every checkpoint): under
    torchrun one all-reduced count, and the parameter names gathered only when it is not 0;
    the first non-finite parameter of the modules in order, on every rank."""
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    rank0 = _TwoRanks(0)
    assert T.nonfinite_parameter_on_any_rank(rank0, ("policy", a), ("value", b)) is None
    assert rank0.calls == [("sum", [0.0])]
    rank0 = _TwoRanks(0, peer_line="value.weight")  # only the other rank's shard went NaN
    assert T.nonfinite_parameter_on_any_rank(rank0, ("policy", a), ("value", b)) == "value.weight"
    assert rank0.calls == [("sum", [0.0]), ("gather", None)]
    with torch.no_grad():
        b.bias[0], a.bias[1], a.weight[1, 0] = float("nan"), float("-inf"), float("inf")
    assert T.nonfinite_parameter(("policy", a), ("value", b)) == "policy.weight"
    assert T.nonfinite_parameter(("value", b), ("policy", a)) == "value.bias"
    rank1 = _TwoRanks(1, peer_line="policy.bias")
    assert T.nonfinite_parameter_on_any_rank(rank1, ("value", b)) == "policy.bias"  # rank 0's comes first
    assert rank1.calls == [("sum", [1.0]), ("gather", "value.bias")]
    assert T.nonfinite_parameter(("empty", torch.nn.ReLU())) is None


GLOO_PEER_GONE = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                  "[127.0.0.1]:41113: Connection reset by peer. This is typically caused by a remote worker hanging "
                  "or bugs in the application. Check the logs of the remote worker before reporting an error.")


@pytest.mark.parametrize("error,lost", [
    (RuntimeError(GLOO_PEER_GONE), "Read error [127.0.0.1]:41113: Connection reset by peer"),
    (torch.distributed.DistNetworkError("the store's connection failed. more"), "the store's connection failed"),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), None),  # a bug: its traceback stays
])
def test_a_rank_whose_peer_died_says_so_in_one_line(tmp_path, capsys, monkeypatch, error, lost):
    """kill -9 of one rank: the surviving rank's next collective raises gloo's RuntimeError
    (seen in an audit of 2026-12-03: a traceback). Under torchrun that is one line naming what
    happened and what to do; any other exception keeps its traceback; in one process nothing
    changes."""
    from rmkernels_train import reward as R

    assert T.lost_peer(error) == lost
    monkeypatch.setattr(T, "setup_distributed", lambda device=None: Dist(1, 2, 0, torch.device("cpu")))

    def run(args, dist, log):
        raise error

    argv = [*TINY, "--output-dir", str(tmp_path / "o")]
    if lost is None:
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            T.cli_main(R.PROG, R.build_parser(), R.check_args, run, argv, built_in=lambda a: True)
        return
    rc = T.cli_main(R.PROG, R.build_parser(), R.check_args, run, argv, built_in=lambda a: True)
    err = capsys.readouterr().err
    assert rc == 1 and err == (f"{R.PROG}: error (rank 1): a collective failed: another rank of the torchrun job "
                               f"ended or lost its connection ({lost}); the checkpoints written are intact: find why "
                               f"that rank stopped (its own log), then resume with --resume\n"), err
    monkeypatch.setattr(T, "setup_distributed", lambda device=None: Dist(0, 1, 0, torch.device("cpu")))
    with pytest.raises(type(error)):  # one process: no peer to lose, the error is the run's own
        T.cli_main(R.PROG, R.build_parser(), R.check_args, run, argv, built_in=lambda a: True)
