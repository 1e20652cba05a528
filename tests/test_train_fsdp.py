"""`rmkernels-train reward --fsdp` on CPU (gloo, 2 ranks under torchrun, 2 micro-batches a
step): the losses and
gradient norms of every step and the final weights equal DDP's and a single process's; a run
stopped after 2 steps and resumed from its sharded checkpoint equals an uninterrupted one;
--fsdp --packing and DDP --packing too; --fsdp --bf16 (the mixed-precision policy, run on gloo here) stays close
and keeps float32 weights; the last checkpoint is an HF one that from_pretrained loads. NCCL
and flash-attention need GPUs and are not run here."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from rmkernels_train import fsdp as F
from rmkernels_train import model as M
from rmkernels_train.reward import main
from rmkernels_train.tokenizer import build_char_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--hidden-size", "32", "--layers", "2", "--default-train-pairs", "640", "--threads", "1", "--no-progress",
        "--no-plot", "--max-steps", "4", "--eval-every", "2", "--save-every", "2", "--seed", "5",
        "--eval-batch-size", "64", "--grad-accum", "2"]


def _records(path):
    with open(path) as f:
        return list(map(json.loads, f))


def _weights(ckpt):
    from safetensors.torch import load_file

    return load_file(os.path.join(ckpt, "model.safetensors"))


def _torchrun(tmp_path, out, *extra):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python"),
                                                         os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "rmkernels_train", "reward", "--output-dir", str(tmp_path / out), *TINY, "--batch-size", "16", *extra]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stderr


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
    _torchrun(tmp_path, "ddp")
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
