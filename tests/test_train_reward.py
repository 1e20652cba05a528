"""End-to-end tests of `rmkernels-train reward` on CPU: the default run learns, the checkpoint
is a plain HF one, resume continues exactly, bad data and NaN losses stop with a message. The
2-process torchrun runs (DDP and FSDP, each resumed, against one process) are in
tests/test_train_fsdp.py."""
import json
import os
import re

import pytest
import torch

pytest.importorskip("transformers")

from rmkernels_train import data as D  # noqa: E402
from rmkernels_train.reward import main  # noqa: E402
from rmkernels_train.tokenizer import build_char_tokenizer  # noqa: E402

# A small model and data set for the tests that check mechanics rather than learning.
TINY = ["--hidden-size", "32", "--layers", "2", "--default-train-pairs", "640", "--batch-size", "16",
        "--threads", "1", "--no-progress", "--no-plot"]


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.err


def _records(path, split):
    with open(path) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def _weights(ckpt):
    from safetensors.torch import load_file

    return load_file(os.path.join(ckpt, "model.safetensors"))


# ---------------------------------------------------------------------------------------
# Data and tokenizer
# ---------------------------------------------------------------------------------------
def test_default_data_is_deterministic_correct_and_disjoint():
    train, held = D.default_datasets(n_train=2000, n_eval=300)
    train2, held2 = D.default_datasets(n_train=2000, n_eval=300)
    assert train == train2 and held == held2
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    kinds = set()
    for r in train + held:
        digits = r["prompt"][len("sort "):-2]
        assert r["prompt"] == f"sort {digits}: "
        assert r["chosen"] == "".join(sorted(digits))
        assert r["rejected"] != r["chosen"]
        kinds.add(r["kind"])
    assert kinds == set(D.REJECT_KINDS)
    assert D.default_datasets(n_train=50, n_eval=10, seed=7)[0] != train[:50]


def test_char_tokenizer_saves_and_loads(tmp_path):
    from transformers import AutoTokenizer

    tok = build_char_tokenizer(D.SORT_ALPHABET)
    assert tok.pad_token_id != tok.eos_token_id
    text = "sort 4180: 0148"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text) + 2 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert D._encode(tok, [text], True) == [ids]  # the fast path gives the same ids
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids and again.pad_token_id == tok.pad_token_id
    assert tok("sort é")["input_ids"][-2] == tok.unk_token_id


@pytest.mark.parametrize("fmt", ["standard", "implicit", "conversational"])
def test_jsonl_formats(tmp_path, fmt):
    rows = []
    for i in range(6):
        if fmt == "standard":
            rows.append({"prompt": f"q{i} ", "chosen": "good", "rejected": "bad", "margin": i / 2})
        elif fmt == "implicit":
            rows.append({"chosen": f"q{i} good", "rejected": f"q{i} bad"})
        else:
            rows.append({"prompt": [{"role": "user", "content": f"q{i}"}],
                         "chosen": [{"role": "assistant", "content": "good"}],
                         "rejected": [{"role": "assistant", "content": "bad"}]})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    recs = D.load_jsonl(str(path))
    assert len(recs) == 6 and recs[0]["where"].endswith("d.jsonl:1")
    tok = build_char_tokenizer([D.render(r, f, build_char_tokenizer("")) for r in recs for f in ("chosen", "rejected")])
    pairs, dropped = D.tokenize_pairs(recs, tok)
    assert dropped == 0
    text = tok.decode(pairs[1]["chosen_ids"], skip_special_tokens=True)
    assert text == {"standard": "q1 good", "implicit": "q1 good", "conversational": "user: q1\nassistant: good\n"}[fmt]
    assert (pairs[2]["margin"] == 1.0) if fmt == "standard" else pairs[2]["margin"] is None
    batch = D.collate(pairs[:3], tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 6
    assert torch.equal(batch["attention_mask"].sum(1), torch.tensor([len(p["chosen_ids"]) for p in pairs[:3]] +
                                                                     [len(p["rejected_ids"]) for p in pairs[:3]]))
    _, dropped = D.tokenize_pairs(recs, tok, max_length=5)
    assert dropped == 6


BAD_FILES = {
    "missing field": ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "a", "chosen": "b"}\n',
                      ":3: missing field 'rejected'"),
    "wrong type": ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b", "rejected": 3}\n',
                   ":2: field 'rejected' must be a string"),
    "bad json": ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"\n',
                 ":2: not valid JSON"),
    "bad message": ('{"chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user"}]}\n',
                    ":1: field 'rejected': message 0 must be an object"),
    "bad margin": ('{"chosen": "x", "rejected": "y", "margin": 1}\n{"chosen": "x", "rejected": "y", "margin": "big"}\n',
                   ":2: field 'margin' must be a finite number"),
    "margin on some lines": ('{"chosen": "x", "rejected": "y", "margin": 1}\n{"chosen": "x", "rejected": "y"}\n',
                             ":2: missing field 'margin'"),
    "not an object": ('[1, 2]\n', ":1: expected a JSON object"),
    "empty chosen": ('{"chosen": "", "rejected": "y"}\n', ":1: field 'chosen' is an empty string"),
    "empty file": ("\n\n", ": no preference pairs"),
    # issue 12.6: the field that is wrong is the one named
    "chosen not text": ('{"prompt": "a", "chosen": 5, "rejected": "c"}\n',
                        ":1: field 'chosen' must be a string or a list of messages, got int 5"),
    "chosen null": ('{"prompt": "a", "chosen": null, "rejected": "c"}\n',
                    ":1: field 'chosen' must be a string or a list of messages, got NoneType null"),
    "rejected not a message list": ('{"chosen": [{"role": "user", "content": "x"}], "rejected": "y"}\n',
                                    ":1: field 'rejected' must be a non-empty list of messages like 'chosen' is"),
    "prompt not text": ('{"prompt": 3, "chosen": "b", "rejected": "c"}\n',
                        ":1: field 'prompt' must be a string like 'chosen' is"),
    # FILE:LINE, no traceback, for what Python's json cannot hold
    "lone surrogate": ('{"chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "\\ud800", "rejected": "c"}\n',
                       ":2: field 'chosen' is not valid Unicode text (a lone surrogate '\\ud800' at character 0)"),
    "lone surrogate in a message": ('{"chosen": [{"role": "user", "content": "x\\udfff"}], '
                                    '"rejected": [{"role": "user", "content": "y"}]}\n',
                                    ":1: field 'chosen[0].content' is not valid Unicode text"),
    "deep nesting": ('{"chosen": "b", "rejected": "c"}\n' + "[" * 100_000 + "]" * 100_000 + "\n",
                     ":2: not valid JSON here (nested too deeply to parse)"),
    "400-digit margin": ('{"chosen": "b", "rejected": "c", "margin": ' + "9" * 400 + '}\n',
                         ":1: field 'margin' must be a finite number within float32's range (|margin| <= "
                         "3.403e+38), got int 999"),
    "margin past float32": ('{"chosen": "b", "rejected": "c", "margin": -1e39}\n',
                            ":1: field 'margin' must be a finite number within float32's range"),
    "5000-digit margin": ('{"chosen": "b", "rejected": "c", "margin": ' + "9" * 5000 + '}\n',
                          ":1: not valid JSON here (Exceeds the limit"),
    "infinite margin": ('{"chosen": "b", "rejected": "c", "margin": 1e999}\n',
                        ":1: field 'margin' must be a finite number"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_jsonl_stops_with_file_line_field(tmp_path, capsys, case):
    text, expected = BAD_FILES[case]
    path = tmp_path / "prefs.jsonl"
    path.write_text(text)
    rc, err = _run(capsys, "--data", path, "--output-dir", tmp_path / "out", *TINY[:4], *TINY[6:])
    assert rc == 1
    assert "Traceback" not in err
    assert f"rmkernels-train reward: error: {path}{expected}" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_bad_options_and_missing_paths(tmp_path, capsys):
    rc, err = _run(capsys, "--data", tmp_path / "nope.jsonl", "--output-dir", tmp_path / "o")
    assert rc == 1 and f"cannot read data file {tmp_path / 'nope.jsonl'}" in err
    rc, err = _run(capsys, "--model", tmp_path / "no-model", "--output-dir", tmp_path / "o")
    assert rc == 1 and "not a directory" in err
    rc, err = _run(capsys, "--label-smoothing", "0.5", "--output-dir", tmp_path / "o")
    assert rc == 1 and "--label-smoothing must be in [0, 0.5)" in err
    rc, err = _run(capsys, "--resume", "--output-dir", tmp_path / "o")
    assert rc == 1 and "no checkpoint-<step>" in err


# ---------------------------------------------------------------------------------------
# End-to-end runs
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_run_learns_and_checkpoint_loads_in_hf(tmp_path, capsys):
    """A short run of the default (built-in data, default model): held-out accuracy rises
    clearly above chance; the checkpoint is a plain HF one that gives the same accuracy."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "run"
    rc, err = _run(capsys, "--output-dir", out, "--max-steps", 120, "--eval-every", 40, "--save-every", 60,
                   "--default-train-pairs", 3840, "--threads", 1)
    assert rc == 0, err
    evals = _records(out / "metrics.jsonl", "eval")
    train = _records(out / "metrics.jsonl", "train")
    assert [r["step"] for r in train] == list(range(1, 121))
    assert [r["step"] for r in evals] == [0, 40, 80, 120]
    assert abs(evals[0]["accuracy"] - 0.5) < 0.1  # the untrained model is at chance
    for r in train + evals:
        assert {"loss", "accuracy", "margin"} <= set(r)
    final = json.loads((out / "final.json").read_text())
    acc = final["eval"]["accuracy"]
    assert final["eval"]["pairs"] == 500 and acc == evals[-1]["accuracy"]
    assert acc >= 0.7 and acc > evals[0]["accuracy"] + 0.15, f"held-out accuracy {acc} after 120 steps"
    assert evals[-1]["loss"] < 0.65 < train[0]["loss"]  # ln 2 = 0.693 at the start
    assert f"held-out pairwise accuracy {acc:.4f}" in err
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(out)) == ["checkpoint-120", "checkpoint-60", "curves.png", "final.json", "metrics.jsonl"]

    # The checkpoint, loaded by plain transformers (no rmkernels patch), scores the held-out
    # pairs with the accuracy the run reported.
    ckpt = out / "checkpoint-120"
    model = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    _, held = D.default_datasets()
    pairs, _ = D.tokenize_pairs(held, tok)
    batch = D.collate(pairs, tok.pad_token_id)
    with torch.no_grad():
        r = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    hf_acc = (r[:500] > r[500:]).float().mean().item()
    assert abs(hf_acc - acc) <= 2 / 500, (hf_acc, acc)


def test_resume_continues_exactly(tmp_path, capsys):
    """Stopping after 4 steps and resuming ends with the weights and metrics of an
    uninterrupted 8-step run."""
    common = [*TINY, "--max-steps", 8, "--save-every", 4, "--eval-every", 4, "--seed", 3]
    full, parts = tmp_path / "full", tmp_path / "parts"
    rc, err = _run(capsys, "--output-dir", full, *common)
    assert rc == 0, err
    rc, err = _run(capsys, "--output-dir", parts, *common, "--stop-after", 4)
    assert rc == 0, err
    assert sorted(os.listdir(parts)) == ["checkpoint-4", "final.json", "metrics.jsonl"]
    assert "--resume goes on" in err
    rc, err = _run(capsys, "--output-dir", parts, *common)
    assert rc == 1 and "pass --resume" in err
    rc, err = _run(capsys, "--output-dir", parts, *common[:-2], "--seed", 4, "--resume")
    assert rc == 1 and "seed was 3" in err
    rc, err = _run(capsys, "--output-dir", parts, *common, "--resume")
    assert rc == 0, err
    assert "resuming from" in err and "checkpoint-4 (step 4)" in err
    a, b = _weights(full / "checkpoint-8"), _weights(parts / "checkpoint-8")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = [(r["step"], r["loss"]) for r in _records(full / "metrics.jsonl", "train")]
    mb = [(r["step"], r["loss"]) for r in _records(parts / "metrics.jsonl", "train")]
    assert ma == mb and len(ma) == 8


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    """An exploding lr: the run stops at the first step whose loss or gradient is not finite,
    before the optimizer step, and the checkpoint before it stays good."""
    out = tmp_path / "nan"
    rc, err = _run(capsys, "--output-dir", out, *TINY, "--max-steps", 20, "--save-every", 1, "--lr", 1e6,
                   "--warmup-steps", 0, "--max-grad-norm", 0)
    assert rc == 1
    line = err.strip().splitlines()[-1]
    m = re.search(r"(loss|gradient norm \(loss \S+\)) is (nan|inf) at step (\d+)", line)
    assert "Traceback" not in err and m, err
    bad_step = int(m.group(3))
    assert bad_step >= 2, "the first steps should still be finite (else the test checks nothing)"
    last_good = out / f"checkpoint-{bad_step - 1}"
    assert f"the last good checkpoint is {last_good}" in line
    assert not (out / f"checkpoint-{bad_step}").exists()
    assert json.loads((last_good / "trainer_state.json").read_text())["step"] == bad_step - 1
    assert all(torch.isfinite(w).all() for w in _weights(last_good).values())
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]  # no half-written checkpoint


def _save_tiny_hf(path, causal, nan_head=False):
    import transformers

    tok = build_char_tokenizer("abcdefgh ")
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, num_labels=1,
                                   pad_token_id=tok.pad_token_id)
    cls = transformers.LlamaForCausalLM if causal else transformers.LlamaForSequenceClassification
    model = cls(cfg)
    if nan_head:
        with torch.no_grad():
            model.score.weight[0, 0] = float("nan")
    model.save_pretrained(path)
    tok.save_pretrained(path)


def _write_prefs(path, n):
    rows = [{"prompt": "ab ", "chosen": "cd" * (1 + i % 3), "rejected": "ef" * (1 + i % 2), "margin": 0.5}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_nan_loss_from_the_first_step(tmp_path, capsys):
    _save_tiny_hf(tmp_path / "m", causal=False, nan_head=True)
    _write_prefs(tmp_path / "p.jsonl", 40)
    rc, err = _run(capsys, "--model", tmp_path / "m", "--data", tmp_path / "p.jsonl", "--output-dir",
                   tmp_path / "o", *TINY[6:], "--max-steps", 3)
    assert rc == 1 and "Traceback" not in err
    assert "loss is nan at step 1 (epoch 0); stopped before the optimizer step; no checkpoint had been written" in err


def test_model_dir_causal_lm_and_jsonl(tmp_path, capsys):
    """--model with a causal-LM checkpoint gets a new score head; --data/--eval-data JSONL with
    margins, label smoothing, centering and gradient accumulation; the result loads as a
    sequence-classification model."""
    from transformers import AutoModelForSequenceClassification

    _save_tiny_hf(tmp_path / "m", causal=True)
    _write_prefs(tmp_path / "train.jsonl", 48)
    _write_prefs(tmp_path / "eval.jsonl", 10)
    rc, err = _run(capsys, "--model", tmp_path / "m", "--data", tmp_path / "train.jsonl", "--eval-data",
                   tmp_path / "eval.jsonl", "--output-dir", tmp_path / "o", "--batch-size", 4, "--grad-accum", 2,
                   "--max-steps", 3, "--label-smoothing", 0.1, "--center-coef", 0.01, "--max-length", 64,
                   "--threads", 1, "--no-progress", "--no-plot")
    assert rc == 0, err
    final = json.loads((tmp_path / "o" / "final.json").read_text())
    assert final["step"] == 3 and final["eval"]["pairs"] == 10
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "o" / "checkpoint-3")
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1


# ---------------------------------------------------------------------------------------
# The logged numbers are the formulas (from a mutation run: each of these could change unseen)
# ---------------------------------------------------------------------------------------
def test_grad_accum_steps_on_the_mean_of_its_micro_batches(tmp_path, capsys):
    """--grad-accum 2 --batch-size 8 takes the step of --batch-size 16's 16 pairs: the same loss,
    gradient norm and weights after the step (the loss of each micro-batch divided by their
    number; without it the gradient doubled, which AdamW's first step hides in the weights but
    not in the logged norm)."""
    runs = {}
    for name, accum in (("one", ["--batch-size", "16"]), ("two", ["--batch-size", "8", "--grad-accum", "2"])):
        argv = [*TINY[:TINY.index("--batch-size")], *TINY[TINY.index("--batch-size") + 2:], *accum,
                "--max-steps", 1, "--eval-every", 1000, "--seed", 5, "--output-dir", tmp_path / name]
        rc, err = _run(capsys, *argv)
        assert rc == 0, err
        runs[name] = _records(tmp_path / name / "metrics.jsonl", "train")[0]
    for key in ("loss", "grad_norm", "accuracy", "margin"):
        assert runs["two"][key] == pytest.approx(runs["one"][key], rel=1e-5, abs=1e-7), key


def _fixed_rewards(monkeypatch):
    """forward_pairs (training and evaluation) with the model's loss but rewards of a fixed
    pattern, chosen vs rejected 1 vs 1 (a tie), 0 vs 1, 2 vs 0, ...; returns the accuracy
    and margin of n such pairs by their formulas (a tie is not correct; the margin is signed)."""
    from rmkernels_train import reward as R

    real = R.forward_pairs

    def fixed(model, pairs, *args, **kwargs):
        loss, c, _ = real(model, pairs, *args, **kwargs)
        pattern = torch.tensor([[1.0, 1.0], [0.0, 1.0], [2.0, 0.0]])[torch.arange(len(pairs)) % 3]
        return loss, pattern[:, 0].to(c), pattern[:, 1].to(c)

    monkeypatch.setattr(R, "forward_pairs", fixed)

    def expected(n):
        pattern = torch.tensor([[1.0, 1.0], [0.0, 1.0], [2.0, 0.0]])[torch.arange(n) % 3]
        return float((pattern[:, 0] > pattern[:, 1]).float().mean()), float((pattern[:, 0] - pattern[:, 1]).mean())

    return expected


def test_logged_accuracy_and_margin_are_their_formulas(tmp_path, capsys, monkeypatch):
    """Train and held-out accuracy count a tie as wrong (chosen > rejected); the margin is the
    mean of chosen - rejected, signed. No test compared them with a hand computation (random
    rewards never tie, and `abs` changed only the printed margin)."""
    expected = _fixed_rewards(monkeypatch)
    rc, err = _run(capsys, *TINY, "--max-steps", 1, "--eval-every", 1, "--eval-batch-size", 7,
                   "--output-dir", tmp_path / "o")
    assert rc == 0, err
    train = _records(tmp_path / "o" / "metrics.jsonl", "train")[0]
    held_out = _records(tmp_path / "o" / "metrics.jsonl", "eval")[-1]
    acc, margin = expected(16)
    assert (train["accuracy"], train["margin"]) == (pytest.approx(acc), pytest.approx(margin))
    n = held_out["pairs"]  # batches of 7: the pattern restarts in each, so sum batch by batch
    sizes = [7] * (n // 7) + ([n % 7] if n % 7 else [])
    acc = sum(expected(s)[0] * s for s in sizes) / n
    margin = sum(expected(s)[1] * s for s in sizes) / n
    assert (held_out["accuracy"], held_out["margin"]) == (pytest.approx(acc), pytest.approx(margin))


@pytest.mark.parametrize("packing", [False, True])
def test_the_loss_options_reach_the_fused_loss(monkeypatch, packing):
    """forward_pairs passes --label-smoothing and --center-coef to the fused loss, padded and
    packed (a run with label smoothing only had to complete: dropping it went unseen)."""
    import types

    from rmkernels_train import model as M
    from rmkernels_train import packing as P
    from rmkernels_train import reward as R

    seen = {}
    target = (P, "packed_forward") if packing else (M, "pairwise_forward")
    monkeypatch.setattr(*target, lambda model, batch, **kw: seen.update(kw))
    if packing:
        monkeypatch.setattr(P, "pack", lambda pairs: pairs)
    else:
        monkeypatch.setattr(D, "collate", lambda pairs, pad_id: pairs)
    args = types.SimpleNamespace(label_smoothing=0.15, center_coef=0.02, packing=packing)
    R.forward_pairs(None, [], args, 0, "cpu")
    assert seen == {"label_smoothing": 0.15, "center_coef": 0.02, "device": "cpu"}
