"""Bad places, missing dependencies, long and degenerate data, and --help, for both
trainers (issue 12.6, issue 17's --help list): each stops or warns with a clear message,
before any data is read or model built where the issue says so."""
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from utils import subprocess_env  # noqa: E402

from rmkernels_train import trainer as T  # noqa: E402
from rmkernels_train.ppo import build_parser as ppo_parser  # noqa: E402
from rmkernels_train.ppo import load_prompts  # noqa: E402
from rmkernels_train.ppo import main as ppo_main  # noqa: E402
from rmkernels_train.reward import DEFAULT_MAX_LENGTH  # noqa: E402
from rmkernels_train.reward import build_parser as reward_parser  # noqa: E402
from rmkernels_train.reward import main as reward_main  # noqa: E402
from rmkernels_train.tokenizer import build_char_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--hidden-size", "32", "--layers", "2", "--batch-size", "8", "--threads", "1", "--no-progress", "--no-plot"]


def _run(main, capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.err + out.out


# ---------------------------------------------------------------------------------------
# --output-dir that cannot work: refused before data loading and model building
# ---------------------------------------------------------------------------------------
def _place(tmp_path, case):
    if case == "a file":
        (tmp_path / "f").write_text("x")
        return tmp_path / "f", "exists and is not a directory"
    if case == "under a file":
        (tmp_path / "f").write_text("x")
        return tmp_path / "f" / "sub" / "out", f"cannot be created, {tmp_path / 'f'} is a file"
    if case == "unwritable":  # even root cannot create a directory in /proc
        return "/proc/rmkernels-test-out", "cannot write in /proc"
    if case in ("metrics.jsonl is a directory", "final.json is a directory"):
        name = case.split()[0]
        (tmp_path / "o" / name).mkdir(parents=True)
        return tmp_path / "o", f"{name} is there and is not a regular file"
    if case == "a dangling symlink":  # os.makedirs(exist_ok=True) fails on it with "File exists"
        os.symlink(tmp_path / "nowhere", tmp_path / "link")
        return tmp_path / "link", "a symbolic link to nothing"
    if case == "a symlink loop":
        os.symlink(tmp_path / "loop2", tmp_path / "loop1")
        os.symlink(tmp_path / "loop1", tmp_path / "loop2")
        return tmp_path / "loop1", "a symbolic link to nothing"
    raise AssertionError(case)


PLACES = ["a file", "under a file", "unwritable", "metrics.jsonl is a directory", "final.json is a directory",
          "a dangling symlink", "a symlink loop"]


@pytest.mark.parametrize("case", PLACES)
def test_reward_refuses_a_bad_output_dir_before_reading_data(tmp_path, capsys, case):
    out, message = _place(tmp_path, case)
    # --data names a file that does not exist: had the data been read first, the error would say so
    rc, err = _run(reward_main, capsys, "--data", tmp_path / "missing.jsonl", "--output-dir", out, *TINY)
    assert rc == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.strip().startswith(f"rmkernels-train reward: error: --output-dir {out}: {message}"), err


@pytest.mark.parametrize("case", PLACES)
def test_ppo_refuses_a_bad_output_dir_before_loading_models(tmp_path, capsys, case):
    out, message = _place(tmp_path, case)
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    rc, err = _run(ppo_main, capsys, "--reward-model", not_a_model, "--output-dir", out, "--threads", "1")
    assert rc == 1 and "Traceback" not in err
    assert err.strip().startswith(f"rmkernels-train ppo: error: --output-dir {out}: {message}"), err


def test_checks_create_nothing(tmp_path):
    T.check_output_dir(str(tmp_path / "a" / "b"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("advantage", ["grpo", "gae"])
def test_ppo_refuses_a_dangling_output_dir_link_on_both_paths(tmp_path, capsys, advantage):
    """Both RL paths and reward create --output-dir through the one helper (audit: critic-free
    ppo gave a FileExistsError traceback); a link that goes dangling after the start-up check is
    one line too."""
    out, message = _place(tmp_path, "a dangling symlink")
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    rc, err = _run(ppo_main, capsys, "--advantage", advantage, "--reward-model", not_a_model, "--output-dir", out,
                   "--threads", "1", "--no-progress", "--no-plot")
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"--output-dir {out}: {message}" in err
    with pytest.raises(T.TrainingError, match=re.escape(f"--output-dir {out}: cannot create it (a symbolic link to "
                                                        f"nothing)")):
        T.make_output_dir(str(out))
    T.make_output_dir(str(tmp_path / "new" / "dir"))
    assert os.path.isdir(tmp_path / "new" / "dir")


# ---------------------------------------------------------------------------------------
# Optional dependencies (the [train] extra), checked at start
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("module,flag", [("matplotlib", "--no-plot"), ("tqdm", "--no-progress"),
                                         ("safetensors", None)])
@pytest.mark.parametrize("main,prog", [(reward_main, "reward"), (ppo_main, "ppo")])
def test_missing_optional_dependency_is_named_at_start(tmp_path, capsys, monkeypatch, module, flag, main, prog):
    real = T.importlib.util.find_spec
    monkeypatch.setattr(T.importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    rc, err = _run(main, capsys, "--output-dir", tmp_path / "o", "--threads", "1")
    assert rc == 1 and "Traceback" not in err
    line = err.strip()
    assert line.startswith(f"rmkernels-train {prog}: error: the Python package {module!r} is not installed: "
                           f"pip install 'rmkernels[train]'"), line
    assert (f"or run with {flag}" in line) if flag else "or run with" not in line
    assert not (tmp_path / "o").exists()  # nothing was started
    if flag:  # the flag that does without it works
        monkeypatch.setattr(T.importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
        args = (reward_parser() if prog == "reward" else ppo_parser()).parse_args([flag])
        T.check_optional_deps(args)


@pytest.mark.parametrize("module,flag", [("matplotlib", "--no-plot"), ("tqdm", "--no-progress")])
@pytest.mark.parametrize("main,prog", [(reward_main, "reward"), (ppo_main, "ppo")])
def test_broken_optional_dependency_is_named_at_start(tmp_path, capsys, monkeypatch, module, flag, main, prog):
    """An optional package that is installed but fails to import (find_spec finds it): the run
    stopped after training with plot_curves' traceback; now one line at the start."""
    real = T.importlib.import_module

    def broken(name, *a):
        if name == module:
            raise ImportError(f"broken {module} (test)")
        return real(name, *a)

    monkeypatch.setattr(T.importlib, "import_module", broken)
    rc, err = _run(main, capsys, "--output-dir", tmp_path / "o", "--threads", "1")
    assert rc == 1 and "Traceback" not in err
    assert err.strip() == (f"rmkernels-train {prog}: error: the Python package {module!r} is installed but cannot be "
                           f"imported (ImportError: broken {module} (test)): reinstall it, or run with {flag}"), err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------
# Long pairs (a safe --max-length by default) and pairs that cannot be ranked
# ---------------------------------------------------------------------------------------
def _prefs(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _save_tiny_hf(path, max_positions):
    import transformers

    tok = build_char_tokenizer("abcdefgh ")
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, num_labels=1,
                                   pad_token_id=tok.pad_token_id, max_position_embeddings=max_positions)
    transformers.LlamaForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)


@pytest.mark.parametrize("model_positions", [None, 64])
def test_long_pairs_are_dropped_by_default_and_counted(tmp_path, capsys, model_positions):
    """No --max-length: pairs longer than the default (1024, or the model's max positions
    when smaller) are dropped as TRL does, and the log says how many and why."""
    long_len = 3 * DEFAULT_MAX_LENGTH if model_positions is None else 100
    rows = [{"prompt": "ab ", "chosen": "cd" * (1 + i % 3), "rejected": "ef"} for i in range(30)]
    rows[4]["chosen"] = "a" * long_len
    rows[9]["rejected"] = "b" * long_len
    _prefs(tmp_path / "train.jsonl", rows)
    _prefs(tmp_path / "eval.jsonl", rows[:3])
    model, tiny = [], TINY
    if model_positions is not None:
        _save_tiny_hf(tmp_path / "m", model_positions)
        model, tiny = ["--model", tmp_path / "m"], TINY[4:]  # the built-in model's sizes are refused with --model
    rc, err = _run(reward_main, capsys, *model, "--data", tmp_path / "train.jsonl", "--eval-data",
                   tmp_path / "eval.jsonl", "--output-dir", tmp_path / "o", "--max-steps", 1, *tiny)
    assert rc == 0, err
    why = (f"the default --max-length {DEFAULT_MAX_LENGTH}" if model_positions is None else
           "the model's max_position_embeddings (64; set --max-length to change)")
    limit = DEFAULT_MAX_LENGTH if model_positions is None else 64
    assert f"train: dropped 2 of 30 pairs with a sequence longer than {limit} tokens ({why})" in err, err
    # an explicit --max-length wins
    rc, err = _run(reward_main, capsys, *model, "--data", tmp_path / "train.jsonl", "--eval-data",
                   tmp_path / "eval.jsonl", "--output-dir", tmp_path / "o2", "--max-steps", 1, "--max-length", 8,
                   *tiny)
    assert rc == 0, err
    assert "with a sequence longer than 8 tokens (--max-length 8)" in err


def test_identical_pairs_are_warned_with_the_count(tmp_path, capsys):
    rows = [{"prompt": "ab ", "chosen": "cd" * (1 + i % 3), "rejected": "ef"} for i in range(30)]
    for i in (1, 5, 7):
        rows[i]["rejected"] = rows[i]["chosen"]
    _prefs(tmp_path / "train.jsonl", rows)
    _prefs(tmp_path / "eval.jsonl", rows[:3])
    rc, err = _run(reward_main, capsys, "--data", tmp_path / "train.jsonl", "--eval-data", tmp_path / "eval.jsonl",
                   "--output-dir", tmp_path / "o", "--max-steps", 1, *TINY)
    assert rc == 0, err
    assert "warning: train: 3 of 30 pairs have chosen == rejected" in err
    assert "warning: eval: 1 of 3 pairs have chosen == rejected" in err


@pytest.mark.parametrize("text,message", [
    ('{"prompt": "\\ud800x"}\n', ":1: field 'prompt' is not valid Unicode text"),
    ("[" * 100_000 + "]" * 100_000 + "\n", ":1: not valid JSON here (nested too deeply to parse)"),
    ('{"prompt": 12}\n', ':1: each line needs a non-empty string field "prompt"'),
])
def test_ppo_bad_prompt_files(tmp_path, capsys, text, message):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(T.TrainingError, match="^" + re.escape(f"{path}{message}")):
        load_prompts(str(path))


def test_ppo_prompts_from_a_pipe(tmp_path, capsys):
    """--prompts takes what reward's --data takes: anything that exists and is not a directory,
    a pipe (`--prompts <(...)`) too (audit: "no such file"); the messages are unchanged."""
    _save_tiny_hf(tmp_path / "rm", 64)
    r, w = os.pipe()
    os.write(w, b'{"prompt": "abc "}\n{"prompt": "hg "}\n')
    os.close(w)
    try:
        rc, err = _run(ppo_main, capsys, "--advantage", "gae", "--reward-model", tmp_path / "rm", "--prompts",
                       f"/dev/fd/{r}", "--policy-layers", 1, "--policy-hidden", 16, "--batch-size", 2,
                       "--minibatches", 1, "--ppo-epochs", 1, "--steps", 1, "--max-new-tokens", 2,
                       "--output-dir", tmp_path / "o", "--threads", 1, "--no-progress", "--no-plot")
    finally:
        os.close(r)
    assert rc == 0, err
    rc, err = _run(ppo_main, capsys, "--prompts", tmp_path / "missing.jsonl", "--output-dir", tmp_path / "o2")
    assert rc == 1 and err.strip() == f"rmkernels-train ppo: error: --prompts {tmp_path / 'missing.jsonl'}: no such " \
        f"file", err


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_bad_prompts_stop_the_run_before_the_default_reward_model_is_trained(tmp_path, capsys, monkeypatch,
                                                                               advantage):
    """--prompts is read before anything else of the run: without --reward-model a file that is
    empty or not JSON lines stopped the run only after the default reward model was trained
    (~45 s here, minutes at its default size)."""
    from rmkernels_train import ppo

    def train(*a, **k):
        raise AssertionError("the reward model was trained before --prompts was read")

    monkeypatch.setattr(ppo, "train_default_reward_model", train)
    for text, message in (("", "no prompts"), ('{"prompt": "a"}\nnot json\n', ":2: not valid JSON")):
        (tmp_path / "p.jsonl").write_text(text)
        rc, err = _run(ppo_main, capsys, "--advantage", advantage, "--prompts", tmp_path / "p.jsonl",
                       "--output-dir", tmp_path / "o", "--no-progress")
        assert rc == 1 and message in err and "Traceback" not in err, err
        assert not (tmp_path / "o" / "reward_model").exists()


def _deny(monkeypatch, path):
    """Opening ``path`` raises PermissionError, as for a file without read or write permission
    (chmod cannot show it: the tests may run as root)."""
    import builtins

    real = builtins.open

    def fake(file, *a, **kw):
        if os.path.abspath(str(file)) == os.path.abspath(str(path)):
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", fake)


def test_unreadable_prompt_file_is_a_message(tmp_path, monkeypatch):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "sort 123: "}\n')
    _deny(monkeypatch, path)
    with pytest.raises(T.TrainingError, match=re.escape(f"--prompts {path}: cannot read it (Permission denied)")):
        load_prompts(str(path))


@pytest.mark.parametrize("resume", [None, 3])
def test_metrics_file_the_run_cannot_write_is_a_message(tmp_path, monkeypatch, resume):
    from rmkernels_train.utils import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n')
    _deny(monkeypatch, path)
    with pytest.raises(T.TrainingError, match=re.escape(f"cannot write {path} (Permission denied)")):
        MetricsWriter(str(path), resume_step=resume)


# ---------------------------------------------------------------------------------------
# --help
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("parser", [reward_parser, ppo_parser], ids=["reward", "ppo"])
def test_help_says_what_each_option_does_and_each_default_once(parser):
    p = parser()
    fmt = T.HelpFormatter(p.prog)
    for action in p._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help and len(action.help) > 8, f"{action.option_strings} has no help line"
        text = fmt._get_help_string(action)
        if action.nargs == 0:  # a flag: its help says what it does, no "(default: True)"
            assert "(default:" not in text, action.option_strings
        assert text.lower().count("(default:") <= 1, action.option_strings
        if "(default: %(default)s)" in text:
            assert "default" not in action.help.lower(), f"{action.option_strings}: default printed twice"
    out = p.format_help()
    for bad in ("(default: True)", "(default: False)", "(default: None)"):
        assert bad not in out
    assert "--no-progress         do not show a progress bar" in out
    assert "--no-plot             do not write curves.png" in out


@pytest.mark.parametrize("argv", [["rmkernels_train", "reward", "--help"], ["rmkernels_train", "ppo", "--help"],
                                  ["rmkernels.info", "--help"]])
def test_help_commands_answer(argv):
    env = subprocess_env()
    proc = subprocess.run([sys.executable, "-m", *argv], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ") and "--help" in proc.stdout


def test_version_and_a_closed_pipe():
    """`rmkernels-train --version` names the installed rmkernels; `rmkernels-train --help | head -1`
    (the reader gone before the help is written) ends with status 141 and no traceback (it was a
    BrokenPipeError traceback)."""
    import rmkernels

    env = subprocess_env()
    cmd = [sys.executable, "-m", "rmkernels_train"]
    proc = subprocess.run(cmd + ["--version"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == f"rmkernels-train (rmkernels {rmkernels.__version__})\n"
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run(cmd + ["--help"], env=env, stdout=w, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


@pytest.mark.parametrize("joined", [False, True])
def test_exit_process_flushes_and_keeps_the_status(joined):
    """The entry points end with utils.exit_process: a torchrun worker (WORLD_SIZE > 1) ends with
    os._exit after flushing stdout and stderr (no interpreter finalization, where gloo's threads
    could abort a finished run); any other process with sys.exit. Both keep the status and every
    printed byte (unterminated lines included)."""
    code = ("import sys\n"
            "from rmkernels_train import utils\n"
            "import atexit\n"
            "atexit.register(lambda: print('finalized', file=sys.stderr))\n"
            "print('out', end='')\n"
            "print('err', end='', file=sys.stderr)\n"
            "utils.exit_process(3)\n")
    env = subprocess_env(WORLD_SIZE="2" if joined else "1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 3 and res.stdout == "out"
    assert res.stderr == ("err" if joined else "errfinalized\n"), res.stderr


def test_missing_training_extras_are_named_not_a_traceback(monkeypatch, capsys):
    """`pip install rmkernels` without [train]: `rmkernels-train reward` names what is missing
    (the train extra's list from the installed metadata) instead of a ModuleNotFoundError."""
    import importlib.util
    from importlib import metadata

    from rmkernels_train import cli

    monkeypatch.setattr(metadata, "requires", lambda name: ['torch>=2.4', 'transformers>=4.56.2; extra == "train"',
                                                             'tokenizers; extra == "train"', 'pytest; extra == "test"'])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "tokenizers" else real(n, *a))
    assert cli.missing_train_extras() == ["tokenizers"]
    for cmd in ("reward", "ppo"):
        assert cli.main([cmd, "--output-dir", "x"]) == 2
        err = capsys.readouterr().err
        assert f"rmkernels-train {cmd}: needs the training extras, not installed: tokenizers" in err
        assert "rmkernels[train]" in err
        assert cli.main([cmd, "--help"]) == 0  # the options are listed all the same, then what a run needs
        out = capsys.readouterr()
        assert out.out.startswith(f"usage: rmkernels-train {cmd}") and "--output-dir" in out.out, out.out[:300]
        assert "needs the training extras, not installed: tokenizers" in out.err


def test_help_without_the_training_extras_in_a_process_that_has_none(tmp_path):
    """`rmkernels-train reward --help` where none of the train extra's modules can be imported
    (blocked here): the parsers import none of them."""
    code = ("import sys\n"
            "for m in ('transformers', 'tokenizers', 'safetensors', 'tqdm', 'matplotlib'):\n"
            "    sys.modules[m] = None\n"
            "from rmkernels_train import cli\n"
            "for cmd in ('reward', 'ppo'):\n"
            "    assert cli.main([cmd, '--help']) == 0\n")
    env = subprocess_env()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("usage: rmkernels-train") == 2, res.stdout[:500]
    assert res.stderr.count("needs the training extras, not installed: transformers, tokenizers") == 2, res.stderr


def test_train_extra_lists_every_third_party_module_the_trainers_import():
    """setup.py's train extra (what missing_train_extras checks) names every third-party
    package python/rmkernels_train imports (tokenizers was missing: it came in through
    transformers)."""
    import ast

    src = open(os.path.join(ROOT, "setup.py")).read()
    extra = ast.literal_eval(re.search(r'"train": (\[[^\]]*\])', src).group(1))
    names = {re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in extra}
    pkg = os.path.join(ROOT, "python", "rmkernels_train")
    imported = set()
    for f in os.listdir(pkg):
        if f.endswith(".py"):
            for node in ast.walk(ast.parse(open(os.path.join(pkg, f)).read())):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.split(".")[0])
    third_party = {m for m in imported - set(sys.stdlib_module_names)
                   if m not in ("torch", "numpy", "rmkernels", "rmkernels_train")}
    assert third_party <= names, f"imported by rmkernels_train, not in the train extra: {third_party - names}"


# ---------------------------------------------------------------------------------------
# A chat template that does not parse, in a model directory
# ---------------------------------------------------------------------------------------
def test_a_chat_template_that_does_not_parse_is_one_line_naming_the_file(tmp_path, capsys):
    """--model (reward) and --reward-model (ppo) whose chat_template.jinja does not compile:
    one line naming the file, not jinja2's TemplateSyntaxError traceback."""
    from rmkernels_train import model as M

    tok = build_char_tokenizer("0123456789 :")
    d = tmp_path / "m"
    M.build_tiny_reward_model(tok, hidden_size=16, num_hidden_layers=1, intermediate_size=32).save_pretrained(d)
    tok.save_pretrained(d)
    assert (d / "chat_template.jinja").is_file()
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content ")
    want = (f"{d / 'chat_template.jinja'}: the chat template does not parse (TemplateSyntaxError at line 1: "
            f"unexpected end of template")
    rc, err = _run(reward_main, capsys, "--model", d, "--max-steps", 1, "--batch-size", 4, "--default-train-pairs",
                   8, "--threads", 1, "--no-progress", "--no-plot", "--output-dir", tmp_path / "o")
    assert rc == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"rmkernels-train reward: error: {want}"), err
    rc, err = _run(ppo_main, capsys, "--reward-model", d, "--steps", 1, "--threads", 1, "--no-progress", "--no-plot",
                   "--output-dir", tmp_path / "p")
    assert rc == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"rmkernels-train ppo: error: {want}"), err


def test_a_directory_without_a_tokenizer_is_one_line_naming_it(tmp_path, capsys):
    """--model / --reward-model naming a directory with no tokenizer files: one line that says
    so (transformers' own message, cut at its first line, read "Couldn't instantiate the backend
    tokenizer from one of:" and then suggested installing sentencepiece), and for a training
    output directory the checkpoint to pass instead."""
    empty, run = tmp_path / "empty", tmp_path / "run"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    build_char_tokenizer("0123456789").save_pretrained(str(run / "checkpoint-7"))
    (run / "checkpoint-12").mkdir()
    want = "cannot load a tokenizer from {}: it has none of the tokenizer files (tokenizer.json, tokenizer_config.json"
    rc, err = _run(reward_main, capsys, "--model", empty, "--output-dir", tmp_path / "o", "--no-progress")
    assert rc == 1 and want.format(empty) in err and "Traceback" not in err, err
    rc, err = _run(ppo_main, capsys, "--reward-model", run, "--output-dir", tmp_path / "o2")
    assert rc == 1 and want.format(run) in err and "Traceback" not in err, err
    assert f"it looks like a training output directory; pass one of its checkpoints, such as " \
           f"{run / 'checkpoint-12'}" in err, err


@pytest.mark.parametrize("drop", ["model.layers.0.mlp.down_proj.weight", "score.weight"])
def test_model_missing_weights_besides_its_head_is_refused(tmp_path, capsys, drop):
    """--model whose weights file lacks a weight of the backbone: from_pretrained initialised it
    randomly and the run trained on (only transformers' load report said so); now one line
    naming it. The score head alone may be missing (a causal LM's checkpoint gets a new one)."""
    from safetensors.torch import load_file, save_file

    rows = [{"prompt": "ab ", "chosen": "cd" * (1 + i % 3), "rejected": "ef"} for i in range(12)]
    _prefs(tmp_path / "train.jsonl", rows)
    _save_tiny_hf(tmp_path / "m", 64)
    path = tmp_path / "m" / "model.safetensors"
    tensors = load_file(path)
    del tensors[drop]
    save_file(tensors, path, metadata={"format": "pt"})
    rc, err = _run(reward_main, capsys, "--model", tmp_path / "m", "--data", tmp_path / "train.jsonl",
                   "--output-dir", tmp_path / "o", "--max-steps", 1, *TINY[4:])
    if drop == "score.weight":
        assert rc == 0, err
    else:
        assert rc == 1 and "Traceback" not in err, err
        assert (f"--model {tmp_path / 'm'}: the checkpoint lacks 1 weight(s) of the model besides its score head, "
                f"which would be initialised randomly ({drop})") in err, err


def test_data_from_a_pipe_is_hashed_as_read(tmp_path, capsys):
    """--data from a FIFO (a pipe, /dev/stdin): its SHA-256 for --resume's data check was taken
    by reading it a second time, i.e. of nothing, and a resume fed other data went on. Now the
    bytes read are hashed: the recorded digest is the data's, and other data on resume is refused."""
    import contextlib
    import hashlib
    import threading

    rows = [{"prompt": "ab ", "chosen": "cd" * (1 + i % 3), "rejected": "ef"} for i in range(12)]
    _prefs(tmp_path / "a.jsonl", rows)
    _prefs(tmp_path / "b.jsonl", rows[::-1])

    fifo = tmp_path / "fifo"

    def run(src, *extra):
        os.mkfifo(fifo)

        def write():
            with contextlib.suppress(BrokenPipeError):
                fifo.write_bytes((tmp_path / src).read_bytes())

        feed = threading.Thread(target=write, daemon=True)
        feed.start()
        try:
            return _run(reward_main, capsys, "--data", fifo, "--output-dir", tmp_path / "o", "--max-steps", 4,
                        "--save-every", 1, *extra, *TINY)
        finally:
            if feed.is_alive():  # the run stopped before it read the FIFO: let the writer's open return
                os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
            feed.join(timeout=30)
            os.remove(fifo)

    rc, err = run("a.jsonl", "--stop-after", 2)
    assert rc == 0, err
    state = json.loads((tmp_path / "o" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["data_sha256"]["data"] == hashlib.sha256((tmp_path / "a.jsonl").read_bytes()).hexdigest()
    rc, err = run("b.jsonl", "--resume")
    assert rc == 1 and "the contents of --data" in err and "changed since the checkpoint's run" in err, err


def test_a_pipe_under_torchrun_is_refused(tmp_path, monkeypatch):
    """Under torchrun every rank reads --data / --prompts itself: from one pipe each rank got a
    part (they trained on different data and the run succeeded), and a <(...) path does not
    exist in torchrun's workers. A path that is not a regular file is one line there; a file
    opens as in one process."""
    import contextlib
    import threading

    from rmkernels_train.utils import TrainingError, open_data_text

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def write():  # a writer, so that a reader's open returns (were the FIFO read, the test fails, not hangs)
        with contextlib.suppress(OSError):
            fifo.write_text('{"prompt": "x"}\n')

    feed = threading.Thread(target=write, daemon=True)
    feed.start()
    (tmp_path / "a.jsonl").write_text('{"prompt": "x"}\n')
    monkeypatch.setenv("WORLD_SIZE", "2")
    try:
        for path in (str(fifo), "/dev/stdin", "/dev/fd/63"):
            with pytest.raises(TrainingError, match=rf"^{re.escape(path)} is not a regular file \(a pipe, "
                                                    rf"/dev/stdin or <\(\.\.\.\)\): under torchrun every rank"):
                open_data_text(path)
    finally:
        if feed.is_alive():  # not read: let the writer's open return
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        feed.join(timeout=30)
    with open_data_text(str(tmp_path / "a.jsonl")) as f:
        assert f.read() == '{"prompt": "x"}\n'
    with pytest.raises(OSError):  # a missing file keeps the loader's "cannot read data file" message
        open_data_text(str(tmp_path / "missing.jsonl"))


class _Ranks:
    """A torchrun job of two ranks as data_digests sees it: this rank's value, and the other
    rank's as ``other(value)`` makes it."""

    enabled, world_size = True, 2

    def __init__(self, other):
        self.other = other

    def gather_object(self, obj):
        return [obj, self.other(obj)]


def test_ranks_that_read_different_data_stop(tmp_path):
    """Each rank hashes the data it read; ranks that read other contents under the same path
    (a node with another copy) stop with one line naming the option, and a rank that could not
    read stops every rank with its message (none waits in a collective)."""
    from rmkernels_train.utils import TrainingError

    (tmp_path / "a.jsonl").write_text("{}\n")
    args = reward_parser().parse_args(["--data", str(tmp_path / "a.jsonl")])
    same = T.data_digests(args, dist=_Ranks(lambda view: view))
    assert same == T.data_digests(args)
    with pytest.raises(TrainingError, match=r"^the ranks read different contents for --data \(SHA-256 per rank: "
                                            r"\['[0-9a-f]{12}', '0{12}'\]\); every rank of a torchrun job"):
        T.data_digests(args, dist=_Ranks(lambda view: ({"data": "0" * 64}, None)))
    with pytest.raises(TrainingError, match=r"^rank 1: cannot read x"):
        T.data_digests(args, dist=_Ranks(lambda view: ({}, "cannot read x")))
