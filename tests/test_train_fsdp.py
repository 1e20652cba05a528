"""`rmkernels-train reward --fsdp` on CPU (gloo, 2 ranks under torchrun, 2 micro-batches a
step): the losses and
gradient norms of every step and the final weights equal DDP's and a single process's; a run
stopped after 2 steps and resumed from its sharded checkpoint equals an uninterrupted one;
--fsdp --packing and DDP --packing too; --fsdp --bf16 (the mixed-precision policy, run on gloo here) stays close
and keeps float32 weights; the last checkpoint is an HF one that from_pretrained loads; --fsdp --model
(a causal-LM checkpoint: new score head) equals a single process; a disk full on rank 1 alone while
it writes its shards, or on rank 0 alone while it writes its files (--fsdp and DDP), stops every rank
with one line (no traceback, no hang, no checkpoint left under the failed one's name) and --resume
goes on from the last intact checkpoint; so does a disk full while rank 0 alone writes a line of
metrics.jsonl, final.json or curves.png.

In one process, over a 1-rank gloo group: the sharded build never registers a real (non-meta)
parameter of the whole model (the built-in model, --packing, --model), its values, buffers
and the torch RNG state after it equal the eager build's exactly, and a forward and backward
raises no FSDP2 "returned a view tensor" warning with no warning filter installed.
NCCL and flash-attention need GPUs and are not run here."""
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from utils import assert_one_line_each, run_two_ranks, subprocess_env

from rmkernels_train import data as D
from rmkernels_train import fsdp as F
from rmkernels_train import model as M
from rmkernels_train.reward import main
from rmkernels_train.tokenizer import build_char_tokenizer
from rmkernels_train.utils import Dist, TrainingError

TINY = ["--hidden-size", "32", "--layers", "2", "--default-train-pairs", "640", "--threads", "1", "--no-progress",
        "--no-plot", "--max-steps", "4", "--eval-every", "2", "--save-every", "2", "--seed", "5",
        "--eval-batch-size", "64", "--grad-accum", "2"]


def _records(path):
    with open(path) as f:
        return list(map(json.loads, f))


def _weights(ckpt):
    from safetensors.torch import load_file

    return load_file(os.path.join(ckpt, "model.safetensors"))


def _tiny(extra):
    """TINY, without the built-in model's size options when --model gives the model (refused)."""
    return TINY[4:] if "--model" in extra else TINY


def _torchrun(tmp_path, out, *extra):
    env = subprocess_env(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "rmkernels_train", "reward", "--output-dir", str(tmp_path / out), *_tiny(extra), "--batch-size", "16",
           *extra]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stderr


def _two_ranks(tmp_path, out, env_extra, *extra, timeout=300):
    """The 2 ranks of `rmkernels-train reward` started directly (:func:`utils.run_two_ranks`):
    ``[(returncode, stderr)]`` by rank; a hang fails the test."""
    return run_two_ranks(["reward", "--output-dir", tmp_path / out, *_tiny(extra), "--batch-size", "16", *extra],
                         tmp_path, env_extra, timeout)


def _disk_full(ckpt):
    """The one line of a checkpoint write that found the disk full."""
    return (f"cannot write {ckpt} (No space left on device); the checkpoints already written are intact (free "
            f"some space and resume with --resume)")


def test_fsdp_needs_torchrun(tmp_path, capsys):
    rc = main([*TINY, "--fsdp", "--output-dir", str(tmp_path / "o")])
    assert rc == 1 and "--fsdp shards the model over the ranks of a torchrun job" in capsys.readouterr().err


def test_decoder_layers_are_the_no_split_modules():
    tok = build_char_tokenizer("abc")
    model = M.build_tiny_reward_model(tok, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                      intermediate_size=32)
    layers = F.decoder_layers(model)
    assert [type(m).__name__ for m in layers] == ["LlamaDecoderLayer"] * 3
    model._no_split_modules = ["NoSuchBlock"]
    with pytest.raises(Exception, match="cannot find the decoder layers"):
        F.decoder_layers(model)


@pytest.mark.slow
def test_fsdp_equals_ddp_and_one_process_and_resumes(tmp_path, capsys):
    """DDP and FSDP each stopped after 2 steps and resumed (every rank picks the same
    checkpoint), against one process that takes both ranks' pairs in each batch."""
    _torchrun(tmp_path, "ddp", "--stop-after", "2")
    err = _torchrun(tmp_path, "ddp", "--resume")
    assert "resuming from" in err and "checkpoint-2 (step 2)" in err, err[-3000:]
    digests = json.loads((tmp_path / "ddp" / "final.json").read_text())["param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # the ranks end with the same parameters
    _torchrun(tmp_path, "fsdp", "--fsdp", "--stop-after", "2")
    ck2 = tmp_path / "fsdp" / "checkpoint-2"
    assert (ck2 / F.DCP_DIR / ".metadata").is_file() and not (ck2 / "optimizer.pt").exists()
    assert (ck2 / "model.safetensors").is_file()  # the last checkpoint of an invocation: gathered HF weights
    err = _torchrun(tmp_path, "fsdp", "--fsdp", "--resume")
    assert "resuming from" in err and "checkpoint-2 (step 2, sharded)" in err, err[-3000:]
    _torchrun(tmp_path, "fsdp_packed", "--fsdp", "--packing")
    _torchrun(tmp_path, "ddp_packed", "--packing")
    _torchrun(tmp_path, "fsdp_bf16", "--fsdp", "--packing", "--bf16")  # the mixed-precision policy
    rc = main([*TINY, "--batch-size", "32", "--output-dir", str(tmp_path / "one")])  # both ranks' pairs
    assert rc == 0, capsys.readouterr().err[-3000:]

    ref = _records(tmp_path / "ddp" / "metrics.jsonl")
    assert len([r for r in ref if r["split"] == "train"]) == 4
    for other in ("fsdp", "fsdp_packed", "ddp_packed", "one"):
        recs = _records(tmp_path / other / "metrics.jsonl")
        assert [(r["split"], r["step"]) for r in recs] == [(r["split"], r["step"]) for r in ref], other
        for ra, rb in zip(ref, recs):
            for key in ("loss", "margin", "grad_norm", "lr"):
                if key in ra:
                    assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (other, key, ra, rb)
            assert rb["accuracy"] == pytest.approx(ra["accuracy"], abs=0.05)  # a near-tie may flip
    for ra, rb in zip(ref, _records(tmp_path / "fsdp_bf16" / "metrics.jsonl")):  # bf16 compute: close
        assert (ra["split"], ra["step"]) == (rb["split"], rb["step"])
        assert rb["loss"] == pytest.approx(ra["loss"], rel=2e-3), (ra, rb)
    assert all(v.dtype == torch.float32 for v in _weights(tmp_path / "fsdp_bf16" / "checkpoint-4").values())
    w_ddp = _weights(tmp_path / "ddp" / "checkpoint-4")
    for other in ("fsdp", "fsdp_packed", "ddp_packed", "one"):
        w = _weights(tmp_path / other / "checkpoint-4")
        assert w.keys() == w_ddp.keys()
        for k in w:
            torch.testing.assert_close(w[k], w_ddp[k], rtol=1e-3, atol=1e-5, msg=f"{other}: {k}")
    final = json.loads((tmp_path / "fsdp" / "final.json").read_text())
    assert final["fsdp"] is True and final["step"] == 4 and final["world_size"] == 2
    from transformers import AutoModelForSequenceClassification

    from rmkernels_train.utils import param_digest

    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "fsdp" / "checkpoint-4")
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    assert final["param_digests"] == [param_digest(hf)]  # the digest is of the gathered weights


@pytest.mark.slow
def test_fsdp_disk_full_on_one_rank_is_one_line_and_resumes(tmp_path):
    """A disk full (ENOSPC) while rank 1 alone writes its shards of the step-4 checkpoint:
    every rank stops with status 1 and one line naming the checkpoint (no traceback, no hang),
    no checkpoint-4 is left (nor a temporary directory), and --resume goes on from the intact
    checkpoint-2 to the end."""
    fault = {"RMKERNELS_TRAIN_FAULT": "shard-write:2:ENOSPC", "RMKERNELS_TRAIN_FAULT_RANK": "1"}
    ranks = _two_ranks(tmp_path, "fsdp", fault, "--fsdp")
    out = tmp_path / "fsdp"
    assert_one_line_each(ranks, "rmkernels-train reward", [_disk_full(out / "checkpoint-4")] * 2)
    assert sorted(os.listdir(out)) == ["checkpoint-2", "metrics.jsonl"], sorted(os.listdir(out))
    err = _torchrun(tmp_path, "fsdp", "--fsdp", "--resume")
    assert "skipping" not in err and "checkpoint-2 (step 2, sharded)" in err, err[-3000:]
    final = json.loads((out / "final.json").read_text())
    assert final["done"] and final["step"] == 4 and final["fsdp"] is True
    assert (out / "checkpoint-4" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_disk_full_on_rank_0_alone_is_one_line_and_resumes(tmp_path, fsdp):
    """A disk full (ENOSPC) while rank 0 alone writes its files of the step-4 checkpoint (DDP:
    the whole checkpoint; --fsdp: the files besides the shards, which every rank wrote): rank 0
    stops with the one line naming the checkpoint, and rank 1 (which was waiting for rank 0 to
    finish the checkpoint: gloo closed the connection under it, with a traceback) stops with the
    same line prefixed "rank 0: "; no hang, no checkpoint-4 left (nor a temporary directory), and
    --resume goes on from the intact checkpoint-2 to the end."""
    fault = {"RMKERNELS_TRAIN_FAULT": "checkpoint-write:2:ENOSPC", "RMKERNELS_TRAIN_FAULT_RANK": "0"}
    extra = ["--fsdp"] if fsdp else []
    ranks = _two_ranks(tmp_path, "o", fault, *extra)
    out = tmp_path / "o"
    line = _disk_full(out / "checkpoint-4")
    assert_one_line_each(ranks, "rmkernels-train reward", [line, f"rank 0: {line}"])
    assert sorted(os.listdir(out)) == ["checkpoint-2", "metrics.jsonl"], sorted(os.listdir(out))
    err = _torchrun(tmp_path, "o", *extra, "--resume")
    assert "skipping" not in err and "resuming from" in err and "checkpoint-2 (step 2" in err, err[-3000:]
    final = json.loads((out / "final.json").read_text())
    assert final["done"] and final["step"] == 4
    assert (out / "checkpoint-4" / "model.safetensors").is_file()


# (fault, the file it names, files left): a disk full while rank 0 alone appends a line of
# metrics.jsonl (the step-1 line: every rank stops at step 2's all-reduce, before its optimizer
# step; the step-2 line: at the check before checkpoint-2), or writes final.json or curves.png
# at the end (the last checkpoint is written by then)
RANK0_WRITES = [("metrics-write:2:ENOSPC", "metrics.jsonl", ["metrics.jsonl"]),
                ("metrics-write:3:ENOSPC", "metrics.jsonl", ["metrics.jsonl"]),
                ("final-write:1:ENOSPC", "final.json", ["checkpoint-2", "checkpoint-4", "metrics.jsonl"]),
                ("plot-write:1:ENOSPC", "curves.png", ["checkpoint-2", "checkpoint-4", "final.json",
                                                       "metrics.jsonl"])]


@pytest.mark.slow
@pytest.mark.parametrize("fault,name,left", RANK0_WRITES, ids=[f[0].split(":")[0] + f[0].split(":")[1]
                                                                for f in RANK0_WRITES])
def test_a_failed_write_of_rank_0_alone_stops_every_rank_with_one_line(tmp_path, fault, name, left):
    """A disk full while rank 0 alone writes a file besides the checkpoints (metrics.jsonl each
    step, final.json and curves.png at the end): rank 0 stops with the one line naming it, and
    rank 1 with the same line prefixed "rank 0: " (before: rank 0 stopped alone, with a traceback
    for final.json and curves.png, and rank 1 died in its next collective with gloo's
    "Connection closed by peer" traceback); no hang, and no checkpoint written after the failed
    line of metrics.jsonl."""
    out = tmp_path / "o"
    tiny = [a for a in TINY if a != "--no-plot" or name != "curves.png"]
    ranks = run_two_ranks(["reward", "--output-dir", out, *tiny, "--batch-size", "16"], tmp_path,
                          {"RMKERNELS_TRAIN_FAULT": fault, "RMKERNELS_TRAIN_FAULT_RANK": "0"})
    line = f"cannot write {out / name} (No space left on device)"
    assert_one_line_each(ranks, "rmkernels-train reward", [line, f"rank 0: {line}"])
    assert sorted(os.listdir(out)) == left, sorted(os.listdir(out))


def _save_causal_lm(path):
    """A tiny Llama causal LM over the built-in data's tokenizer, saved in bf16 (--model loads
    it as float32 master weights; its score head is new)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_char_tokenizer(D.SORT_ALPHABET)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(11)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.slow
def test_fsdp_from_a_causal_lm_checkpoint_equals_one_process(tmp_path, capsys):
    model_dir = _save_causal_lm(tmp_path / "lm")
    _torchrun(tmp_path, "fsdp", "--fsdp", "--model", model_dir, "--lr", "1e-3")
    rc = main([*_tiny(["--model"]), "--batch-size", "32", "--model", model_dir, "--lr", "1e-3",
               "--output-dir", str(tmp_path / "one")])
    assert rc == 0, capsys.readouterr().err[-3000:]
    ref, recs = (_records(tmp_path / d / "metrics.jsonl") for d in ("one", "fsdp"))
    assert [(r["split"], r["step"]) for r in recs] == [(r["split"], r["step"]) for r in ref]
    for ra, rb in zip(ref, recs):
        for key in ("loss", "margin", "grad_norm"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (key, ra, rb)
    w1, w2 = (_weights(tmp_path / d / "checkpoint-4") for d in ("one", "fsdp"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-5, msg=k)


# ---------------------------------------------------------------------------------------
# The sharded build in one process (a 1-rank gloo group: each shard is the whole tensor, so
# the values can be compared with the eager build's directly)
# ---------------------------------------------------------------------------------------
class _OneRank(Dist):
    enabled = True  # --fsdp's own check wants torchrun's N >= 2 ranks; the code path is the same


@pytest.fixture
def one_rank(tmp_path):
    import torch.distributed as td

    assert not td.is_initialized()
    td.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield _OneRank(0, 1, 0, torch.device("cpu"))
    finally:
        td.destroy_process_group()


def _trainer(argv, dist):
    from rmkernels_train import reward as R
    from rmkernels_train import trainer as T

    args = R.build_parser().parse_args([*TINY, "--lr", "1e-3", *argv])
    tr = R.RewardTrainer(args, dist, T.Log(R.PROG, dist))
    tr.setup()
    return tr


def _full(tensors):
    from torch.distributed.tensor import DTensor

    return {n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone() for n, t in tensors}


@pytest.mark.parametrize("case", ["built-in", "packing", "model"])
def test_sharded_build_never_holds_the_model_and_equals_the_eager_build(tmp_path, one_rank, case):
    from torch.distributed.tensor import DTensor

    extra = {"built-in": [], "packing": ["--packing"], "model": ["--model", str(tmp_path / "lm")]}[case]
    if case == "model":
        _save_causal_lm(tmp_path / "lm")
    real = []  # every real (not meta, not sharded) parameter registered while the --fsdp trainer is set up

    def spy(module, name, param):
        if param is not None and not param.is_meta and not isinstance(param, DTensor):
            real.append((name, tuple(param.shape)))

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(spy)
    try:
        sharded = _trainer(["--fsdp", "--output-dir", str(tmp_path / "fsdp"), *extra], one_rank)
    finally:
        handle.remove()
    rng_sharded = torch.get_rng_state()
    assert real == [], f"the --fsdp build made real parameters of the whole model: {real[:5]}"
    assert all(isinstance(p, DTensor) for p in sharded.model.parameters())

    eager = _trainer(["--output-dir", str(tmp_path / "eager"), *extra], Dist(0, 1, 0, torch.device("cpu")))
    assert torch.equal(rng_sharded, torch.get_rng_state())  # the same RNG draws, in the same order
    got, want = _full(sharded.model.named_parameters()), _full(eager.model.named_parameters())
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    got, want = _full(sharded.model.named_buffers()), _full(eager.model.named_buffers())
    assert got.keys() == want.keys() and got  # RoPE's inv_freq: the constructed values, not to_empty's
    for k in want:
        assert torch.equal(got[k], want[k]), k

    # a forward and backward: no FSDP2 view warning, and none filtered process-wide
    from rmkernels_train.reward import forward_pairs

    assert not [f for f in warnings.filters if f[1] is not None and "FSDP2" in f[1].pattern]
    pairs = sharded.train_pairs[:4]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, _, _ = forward_pairs(sharded.ddp_model, pairs, sharded.args, sharded.tokenizer.pad_token_id,
                                   one_rank.device)
        loss.backward()
    assert not [w for w in caught if "view tensor" in str(w.message)], [str(w.message) for w in caught]
    ref, _, _ = forward_pairs(eager.ddp_model, pairs, eager.args, eager.tokenizer.pad_token_id, one_rank.device)
    assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-6)


def test_checkpoint_index_refuses_missing_backbone_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir = _save_causal_lm(tmp_path / "lm")
    w = load_file(os.path.join(model_dir, "model.safetensors"))
    del w["model.layers.0.mlp.up_proj.weight"]
    save_file(w, os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
    model, _ = F.build_on_meta(lambda: M.reward_model_from_config(model_dir))
    with pytest.raises(Exception, match=r"lacks 1 backbone weights \(\['model.layers.0.mlp.up_proj.weight'\]\)"):
        F.checkpoint_index(model_dir, model)
    os.remove(os.path.join(model_dir, "model.safetensors"))
    with pytest.raises(Exception, match="reads safetensors checkpoints"):
        F.checkpoint_index(model_dir, model)


class _Planted:
    """Unpickling it would write ``hit`` (what a planted checkpoint file could do)."""

    def __init__(self, hit):
        self.hit = hit

    def __reduce__(self):
        return (open, (self.hit, "w"))


def _sharded(tmp_path):
    """A plain model + AdamW (one step taken) saved by F.save_sharded in one process, and a
    fresh model + optimizer of the same shapes to load it into."""
    def build(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        return model, opt

    model, opt = build(0)
    path = str(tmp_path / F.DCP_DIR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... a single process"
        F.save_sharded(path, model, opt)
    return path, model, opt, build(1)


def test_sharded_checkpoint_round_trip_reads_nothing_unsafe(tmp_path):
    path, model, opt, (fresh, fresh_opt) = _sharded(tmp_path)
    assert F.read_sharded_metadata(path).state_dict_metadata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F.load_sharded(path, fresh, fresh_opt)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fresh_opt.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


def test_planted_sharded_metadata_is_refused_and_never_run(tmp_path):
    import pickle

    path, _, _, (fresh, fresh_opt) = _sharded(tmp_path)
    hit = tmp_path / "hit"
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(_Planted(str(hit)), f)
    with pytest.raises(F.UnsafeCheckpointError, match=r"names \S*open, which is not part"):
        F.read_sharded_metadata(path)
    with pytest.raises(TrainingError, match="refused, never run"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F.load_sharded(path, fresh, fresh_opt)
    assert not hit.exists()
    with open(os.path.join(path, ".metadata"), "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(ValueError, match="not a checkpoint's metadata"):
        F.read_sharded_metadata(path)


def test_planted_non_tensor_item_is_never_run(tmp_path):
    """torch's load planner reads the non-tensor items (the optimizer's param_groups) with
    torch.load(weights_only=False); load_sharded's does not."""
    import io
    import pickle

    path, _, _, (fresh, fresh_opt) = _sharded(tmp_path)
    md = F.read_sharded_metadata(path)
    key = next(k for k, v in md.state_dict_metadata.items() if type(v).__name__ == "BytesStorageMetadata")
    info = next(v for k, v in md.storage_data.items() if k.fqn == key)
    hit = tmp_path / "hit"
    buf = io.BytesIO()
    torch.save(_Planted(str(hit)), buf, pickle_protocol=2)
    blob = buf.getvalue()
    data = os.path.join(path, info.relative_path)
    with open(data, "rb") as f:
        raw = f.read()
    # the planted item goes at the end of the data file, and the metadata points there
    with open(data, "wb") as f:
        f.write(raw + blob)
    info.offset, info.length = len(raw), len(blob)
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(TrainingError, match="cannot read the sharded state"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F.load_sharded(path, fresh, fresh_opt)
    assert not hit.exists()
    # the test's plant works: torch's own reader and planner run it
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(F._state(fresh, fresh_opt), checkpoint_id=path)
    assert hit.exists()


def test_fsdp_on_a_torch_without_fsdp2_is_a_message(monkeypatch):
    """The package needs torch >= 2.4, --fsdp FSDP2's public fully_shard (torch >= 2.6): an
    older torch is named before anything is built, not an ImportError traceback."""
    import torch.distributed.fsdp as fsdp_mod

    F.check_torch()
    monkeypatch.delattr(fsdp_mod, "fully_shard")
    with pytest.raises(TrainingError, match=r"--fsdp needs torch >= 2.6 .* torch \S+ is installed"):
        F.check_torch()


def test_sharded_resume_passes_over_non_finite_weights(tmp_path, one_rank, monkeypatch, capsys):
    """A sharded checkpoint whose weights hold NaN (written here past the check that keeps
    every real checkpoint finite) is passed over as a non-sharded resume passes over a damaged
    one: its shards are read only into the sharded model, so the set-up starts again from the
    next older checkpoint, with the reason logged; with no older one the resume stops with one
    message naming the checkpoint and the parameter."""
    from rmkernels_train import trainer as T

    out = ["--fsdp", "--output-dir", str(tmp_path / "o")]
    tr = _trainer(out, one_rank)
    tr.checkpoint()  # checkpoint-0, finite
    good = _full(tr.model.named_parameters())
    tr.step = 2
    p = dict(tr.model.named_parameters())["score.weight"]
    with torch.no_grad():
        p.to_local().view(-1)[0] = float("nan")
    monkeypatch.setattr(T, "check_finite_before_saving", lambda *a, **k: None)
    tr.checkpoint()  # checkpoint-2, NaN in score.weight
    monkeypatch.undo()
    why = "sharded holds non-finite values (score.weight has NaN or inf)"
    os.rename(tmp_path / "o" / "checkpoint-0", tmp_path / "aside")
    with pytest.raises(TrainingError, match=rf"--resume: no intact checkpoint in \S+ \(checkpoint-2: "
                                            rf"{re.escape(why)}\)"):
        _trainer([*out, "--resume"], one_rank)
    os.rename(tmp_path / "aside", tmp_path / "o" / "checkpoint-0")
    capsys.readouterr()
    back = _trainer([*out, "--resume"], one_rank)
    err = capsys.readouterr().err
    assert f"--resume: skipping checkpoint-2: {why}" in err, err[-3000:]
    assert err.count(back.what) == 1, err[-3000:]  # the data's description once, not again for checkpoint-0
    assert back.step == 0 and back.last_ckpt.endswith("checkpoint-0"), (back.step, back.last_ckpt)
    resumed = _full(back.model.named_parameters())
    assert resumed.keys() == good.keys() and all(torch.equal(resumed[n], good[n]) for n in good)
    back.step = 1
    back.checkpoint()  # the run's next checkpoint: rotation deletes the damaged one past it
    left = sorted(os.listdir(tmp_path / "o"))
    assert left == ["checkpoint-0", "checkpoint-1", "metrics.jsonl"], left


def test_sharded_resume_passes_over_unreadable_shards(tmp_path, one_rank, capsys):
    """The shard files are in the checkpoint's file list: one deleted (or cut short) after the
    checkpoint was written is found before anything is loaded, and the resume goes on from the
    older checkpoint, named; a shard damaged under the list's size (the list rewritten) fails
    its read into the sharded model, and that checkpoint is passed over as well (it stopped the
    run, though an older intact checkpoint was there)."""
    from rmkernels_train import trainer as T

    out = ["--fsdp", "--output-dir", str(tmp_path / "o")]
    tr = _trainer(out, one_rank)
    tr.checkpoint()
    good = _full(tr.model.named_parameters())
    tr.step = 2
    tr.checkpoint()
    listed = json.loads((tmp_path / "o" / "checkpoint-2" / T.FILE_LIST).read_text())
    shards = sorted(k for k in listed if k.startswith(F.DCP_DIR + "/") and k.endswith(".distcp"))
    assert shards and f"{F.DCP_DIR}/.metadata" in listed, listed
    import shutil

    shutil.copytree(tmp_path / "o", tmp_path / "pristine")
    for damage in ("deleted", "cut short, relisted"):
        shutil.rmtree(tmp_path / "o")
        shutil.copytree(tmp_path / "pristine", tmp_path / "o")
        shard = tmp_path / "o" / "checkpoint-2" / shards[0]
        if damage == "deleted":
            shard.unlink()
            why = f"{shards[0]} is missing (it was written with the checkpoint)"
        else:
            with open(shard, "r+b") as f:
                f.truncate(100)
            listed[shards[0]] = 100
            (tmp_path / "o" / "checkpoint-2" / T.FILE_LIST).write_text(json.dumps(listed))
            why = f"{F.DCP_DIR} cannot be read ("
        capsys.readouterr()
        back = _trainer([*out, "--resume"], one_rank)
        err = capsys.readouterr().err
        assert f"--resume: skipping checkpoint-2: {why}" in err, (damage, err[-3000:])
        assert back.step == 0 and back.last_ckpt.endswith("checkpoint-0"), (damage, back.step, back.last_ckpt)
        resumed = _full(back.model.named_parameters())
        assert all(torch.equal(resumed[n], good[n]) for n in good), damage


def test_sharded_resume_at_the_last_step_writes_the_hf_weights(tmp_path, one_rank, capsys):
    """An --fsdp run resumed at its last step (--max-steps lowered to a checkpoint written
    mid-run, or a finished run resumed) trains nothing: it wrote no checkpoint, so the last one
    lacked model.safetensors (a PPO run could not load it) and final.json's digest was null.
    That checkpoint is written again with the gathered weights, and the digest is theirs."""
    from rmkernels_train import reward as R
    from rmkernels_train import trainer as T
    from rmkernels_train.utils import param_digest

    out = ["--fsdp", "--output-dir", str(tmp_path / "o")]
    tr = _trainer(out, one_rank)
    tr.step = 2
    tr.checkpoint()  # mid-run (4 steps): no HF weights
    ckpt = tmp_path / "o" / "checkpoint-2"
    assert not (ckpt / "model.safetensors").exists()
    for attempt in ("lowered --max-steps", "finished run resumed"):
        args = R.build_parser().parse_args([*TINY, "--lr", "1e-3", *out, "--resume", "--max-steps", "2"])
        R.RewardTrainer(args, one_rank, T.Log(R.PROG, one_rank)).run()
        final = json.loads((tmp_path / "o" / "final.json").read_text())
        assert final["done"] and final["checkpoint"].endswith("checkpoint-2"), (attempt, final)
        weights = _weights(ckpt)
        model = M.load_reward_model(str(ckpt))
        assert final["param_digests"] == [param_digest(model)], (attempt, final["param_digests"])
        assert set(weights) == {n for n, _ in model.named_parameters()}, attempt
        T.check_file_list(str(ckpt))
