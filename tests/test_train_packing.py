"""`rmkernels-train reward --packing`: the packed layout (cu_seqlens, position ids restarting
per sequence, no pad token), the packed forward equal to the padded one (loss, rewards and
every gradient) on the built-in Llama and on other HF architectures, attention that never
crosses a sequence boundary, and a packed training run whose losses equal the padded run's
step by step. flash-attention's varlen path (GPU) is not exercised here: no GPU, no
flash-attn on the CPU machine."""
import copy
import json
import random

import pytest
import torch

pytest.importorskip("transformers")

from rmkernels_train import data as D
from rmkernels_train import model as M
from rmkernels_train import packing as P
from rmkernels_train.reward import main
from rmkernels_train.tokenizer import build_char_tokenizer

TINY = ["--hidden-size", "32", "--layers", "2", "--default-train-pairs", "640", "--batch-size", "16",
        "--threads", "1", "--no-progress", "--no-plot"]


def _pairs(n, vocab, rng, lengths=(1, 97), margin=False):
    def seq():
        return [rng.randrange(4, vocab) for _ in range(rng.randint(*lengths))]

    return [{"chosen_ids": seq(), "rejected_ids": seq(), "margin": rng.uniform(-1, 1) if margin else None}
            for _ in range(n)]


def test_pack_layout():
    pairs = [{"chosen_ids": [5, 6, 7], "rejected_ids": [8], "margin": 0.5},
             {"chosen_ids": [9], "rejected_ids": [10, 11], "margin": -1.0}]
    b = P.pack(pairs)
    assert b["input_ids"].tolist() == [[5, 6, 7, 9, 8, 10, 11]]  # chosen rows first, then rejected
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 0, 0, 1]]
    assert b["cu_seqlens"].dtype == torch.int32 and b["cu_seqlens"].tolist() == [0, 3, 4, 5, 7]
    assert b["max_seqlen"] == 3 and b["tokens"] == 7
    assert b["margin"].tolist() == [0.5, -1.0]
    with pytest.raises(ValueError, match="at least one token"):
        P.pack([{"chosen_ids": [], "rejected_ids": [1], "margin": None}])


def _llama(tok):
    return M.build_tiny_reward_model(tok, hidden_size=32, num_hidden_layers=2, intermediate_size=64)


def _qwen2(tok):
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id,
                      max_position_embeddings=256)
    return Qwen2ForSequenceClassification(cfg)  # grouped-query attention, q/k/v biases


def _gpt2(tok):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256, num_labels=1,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: a deterministic forward
    return GPT2ForSequenceClassification(cfg)  # learned absolute positions


@pytest.mark.parametrize("build", [_llama, _qwen2, _gpt2], ids=["llama", "qwen2", "gpt2"])
def test_packed_forward_equals_padded(build):
    torch.manual_seed(0)
    tok = build_char_tokenizer(D.SORT_ALPHABET)
    padded = M.prepare_reward_model(build(tok), tok)
    packed = P.enable_packing(M.prepare_reward_model(copy.deepcopy(padded), tok))
    pairs = _pairs(5, len(tok), random.Random(1), margin=True)
    kw = {"label_smoothing": 0.1, "center_coef": 0.01}
    l1, c1, r1 = M.pairwise_forward(padded, D.collate(pairs, tok.pad_token_id), **kw)
    l2, c2, r2 = P.packed_forward(packed, P.pack(pairs), **kw)
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c2, c1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r2, r1, rtol=1e-5, atol=1e-5)
    l1.backward()
    l2.backward()
    for (name, a), b in zip(padded.named_parameters(), packed.parameters()):
        assert b.grad is not None, name
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_attention_stays_within_each_sequence():
    """Changing one sequence's tokens changes no other sequence's reward."""
    torch.manual_seed(0)
    tok = build_char_tokenizer(D.SORT_ALPHABET)
    model = P.enable_packing(M.prepare_reward_model(_llama(tok), tok))
    pairs = _pairs(3, len(tok), random.Random(2), lengths=(5, 30))
    with torch.no_grad():
        _, c1, r1 = P.packed_forward(model, P.pack(pairs))
        pairs[1]["chosen_ids"] = [4] * len(pairs[1]["chosen_ids"])
        _, c2, r2 = P.packed_forward(model, P.pack(pairs))
    assert not torch.equal(c1[1], c2[1])
    torch.testing.assert_close(c2[[0, 2]], c1[[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(r2, r1, rtol=0, atol=0)


def test_packed_attention_refuses_unpacked_calls():
    tok = build_char_tokenizer(D.SORT_ALPHABET)
    model = P.enable_packing(M.prepare_reward_model(_llama(tok), tok))
    assert model.config._attn_implementation == P.ATTN_IMPLEMENTATION
    with pytest.raises(RuntimeError, match="packed rows only"):
        M.pairwise_forward(model, D.collate(_pairs(2, len(tok), random.Random(0)), tok.pad_token_id))
    with pytest.raises(TypeError, match="packed forward takes"):
        model(input_ids=torch.ones(1, 2, dtype=torch.long), position_ids=torch.zeros(1, 2, dtype=torch.long),
              cu_seqlens=torch.tensor([0, 1, 2]), attention_mask=torch.ones(1, 2))


def _records(path):
    with open(path) as f:
        return list(map(json.loads, f))


def test_packing_run_equals_padded_run(tmp_path, capsys):
    """Same seed, same pairs (ragged lengths, gradient accumulation): every train and eval
    loss, accuracy and gradient norm of the packed run equals the padded run's."""
    steps = ["--max-steps", "3", "--eval-every", "3", "--grad-accum", "2", "--batch-size", "8", "--seed", "3",
             "--eval-batch-size", "64"]
    for name, extra in (("padded", []), ("packed", ["--packing"])):
        rc = main([*TINY, *steps, *extra, "--output-dir", str(tmp_path / name)])
        assert rc == 0, capsys.readouterr().err[-2000:]
    a, b = _records(tmp_path / "padded" / "metrics.jsonl"), _records(tmp_path / "packed" / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in a] == [(r["split"], r["step"]) for r in b]
    assert len([r for r in a if r["split"] == "train"]) == 3
    for ra, rb in zip(a, b):
        for key in ("loss", "margin", "grad_norm"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra, rb)
        assert rb["accuracy"] == pytest.approx(ra["accuracy"], abs=0.05)  # a near-tie may flip
    final = json.loads((tmp_path / "packed" / "final.json").read_text())
    assert final["packing"] is True
    from transformers import (
        AutoModelForSequenceClassification,  # the checkpoint is a plain HF one
    )

    AutoModelForSequenceClassification.from_pretrained(tmp_path / "packed" / "checkpoint-3")
