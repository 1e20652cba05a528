"""rmkernels.integrations.trl.RewardTrainer against trl.RewardTrainer itself on a tiny model:
the same loss, gradients and logged metrics for a batch; and a short train() runs."""
import copy
import math
import re

import pytest
import torch

import rmkernels as rmk
from tests.utils import assert_close

trl = pytest.importorskip("trl", reason="trl is in requirements-test.txt; install it to run these tests")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from rmkernels.integrations.trl import RewardTrainer  # noqa: E402
from rmkernels_train.tokenizer import build_char_tokenizer  # noqa: E402


def _tiny_model(tok):
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=tok.pad_token_id, num_labels=1)
    return transformers.LlamaForSequenceClassification(cfg)


def _dataset(n, with_margin, conversational=False):
    g = torch.Generator().manual_seed(n)
    rows = []
    for i in range(n):
        a = "".join(str(int(d)) for d in torch.randint(0, 10, (int(torch.randint(2, 9, (1,), generator=g)),),
                                                           generator=g))
        b = a[::-1] + str(i % 10)
        if conversational:
            row = {"prompt": [{"role": "user", "content": f"sort {a}"}],
                   "chosen": [{"role": "assistant", "content": "".join(sorted(a))}],
                   "rejected": [{"role": "assistant", "content": b}]}
        else:
            row = {"prompt": f"sort {a}: ", "chosen": "".join(sorted(a)), "rejected": b}
        if with_margin:
            row["margin"] = float(i % 3) * 0.5
        rows.append(row)
    return datasets.Dataset.from_list(rows)


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                max_steps=2, learning_rate=1e-3, report_to=[], logging_steps=1, save_strategy="no",
                use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0,
                bf16=False)  # RewardConfig's default is bf16 autocast; fp32 to compare at fp32 tolerances
    base.update(kw)
    return trl.RewardConfig(**base)


def _trainers(tmp_path, dataset, trainer_kw=None, peft_config=None, **config_kw):
    tok = build_char_tokenizer("0123456789 sort:assistantuser\n")
    model = _tiny_model(tok)
    peft = {} if peft_config is None else {"peft_config": peft_config}
    torch.manual_seed(0)  # the same adapter weights for both
    ref = trl.RewardTrainer(model=copy.deepcopy(model), args=_config(tmp_path / "trl", **config_kw),
                            train_dataset=dataset, processing_class=tok, **peft)
    torch.manual_seed(0)
    ours = RewardTrainer(model=copy.deepcopy(model), args=_config(tmp_path / "rmk", **config_kw),
                         train_dataset=dataset, processing_class=tok, **peft, **(trainer_kw or {}))
    return ref, ours


def _loss_and_grads(trainer, batch):
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("with_margin,coef,conversational", [(False, None, False), (True, 0.01, False),
                                                             (False, None, True)],
                         ids=["plain", "margin+center", "conversational"])
def test_same_loss_and_grads_as_trl(tmp_path, with_margin, coef, conversational):
    ref, ours = _trainers(tmp_path, _dataset(12, with_margin, conversational), center_rewards_coefficient=coef)
    batch = next(iter(ref.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and ("margin" in batch) == with_margin
    # ragged: some rows are padded, so the pick of the last token matters
    assert (batch["input_ids"] == ref.processing_class.pad_token_id).any()
    ref_loss, ref_grads = _loss_and_grads(ref, batch)
    loss, grads = _loss_and_grads(ours, batch)
    assert math.isfinite(float(ref_loss))
    assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, name="loss")
    assert set(grads) == set(ref_grads)
    for n in ref_grads:
        assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, name=f"grad {n}")
    for key in ("accuracy", "margin", "min_reward", "mean_reward", "max_reward", "num_tokens"):
        assert_close(torch.tensor(ours._metrics["train"][key]), torch.tensor(ref._metrics["train"][key]),
                     rtol=1e-5, atol=1e-6, name=f"logged {key}")


def test_label_smoothing_changes_the_loss(tmp_path):
    ref, ours = _trainers(tmp_path, _dataset(8, False), trainer_kw={"label_smoothing": 0.2})
    batch = next(iter(ref.get_train_dataloader()))
    ref_loss, _ = _loss_and_grads(ref, batch)
    loss, _ = _loss_and_grads(ours, batch)
    with torch.no_grad():
        r = ref.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    d = r[:4] - r[4:]
    expected = (-(0.8) * torch.nn.functional.logsigmoid(d) - 0.2 * torch.nn.functional.logsigmoid(-d)).mean()
    assert_close(loss, expected, rtol=1e-5, atol=1e-6, name="label-smoothed loss")
    # TRL has no smoothing: -(1-e)*ls(d) - e*ls(-d) - (-ls(d)) = e*d, so the two losses differ
    # by exactly 0.2 * mean(d) (a fixed threshold would depend on how far apart the random
    # model's rewards happen to be)
    assert_close(loss - ref_loss, 0.2 * d.mean(), rtol=1e-4, atol=1e-6, name="smoothed - TRL loss")
    assert d.abs().max() > 0  # the check above is not vacuous


def test_train_runs_like_trl(tmp_path):
    """Two optimizer steps through Trainer.train(): the same weights and logged losses as TRL (SGD: Adam
    would turn float-rounding differences in near-zero gradients into visible weight differences)."""
    ref, ours = _trainers(tmp_path, _dataset(8, True), max_steps=2, optim="sgd", learning_rate=0.1)
    ref.train()
    ours.train()
    ref_logs = [h["loss"] for h in ref.state.log_history if "loss" in h]
    logs = [h["loss"] for h in ours.state.log_history if "loss" in h]
    assert len(logs) == 2
    assert_close(torch.tensor(logs), torch.tensor(ref_logs), rtol=1e-4, atol=1e-6, name="logged loss")
    for (n, p), (_, q) in zip(ref.model.named_parameters(), ours.model.named_parameters()):
        assert_close(q, p, rtol=1e-4, atol=1e-6, name=f"weights {n} after 2 steps")


def test_unpatched_after_bf16_training(tmp_path):
    """After ``train()`` with bf16 (accelerate wraps the model's forward in autocast around the
    patched one), unpatching leaves a plain HF model that still runs under that autocast, as
    TRL's own trained model does; the trainer, asked for a loss again, says why it cannot."""
    ref, ours = _trainers(tmp_path, _dataset(8, False), max_steps=1, bf16=True)
    ref.train()
    ours.train()
    batch = next(iter(ref.get_train_dataloader()))
    rmk.unpatch_hf_reward_model(ours.model)
    seen = []
    for trainer in (ref, ours):
        layer = trainer.model.model.layers[0].mlp.down_proj
        handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        with torch.no_grad():
            trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        handle.remove()
    assert seen == [torch.bfloat16, torch.bfloat16]
    with pytest.raises(RuntimeError, match="no longer patched"):
        ours.compute_loss(ours.model, dict(batch))


def _readme_trl_snippet():
    import pathlib

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    m = re.search(r"<!-- trl-snippet -->\s*```python\n(.*?)```", readme, re.S)
    assert m, "README.md: the TRL snippet (after <!-- trl-snippet -->) is missing"
    return m.group(1)


def test_readme_trl_snippet_runs_on_cpu(tmp_path, monkeypatch):
    """The README's TRL example, executed as written on this CPU machine; only the checkpoint
    name (a tiny local Llama and tokenizer saved here: no network) and the output directory
    are replaced."""
    code = _readme_trl_snippet()
    name = re.search(r'model_name = "([^"]+)"', code).group(1)
    tok = build_char_tokenizer("0123456789 +=ThecapitalofFranceisPRm")
    model_dir = tmp_path / "tiny-rm"
    _tiny_model(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    code = code.replace(f'"{name}"', repr(str(model_dir)))
    code = code.replace('output_dir="rm"', f"output_dir={str(tmp_path / 'rm')!r}")
    code = code.replace("max_steps=10", "max_steps=2")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md (TRL snippet)", "exec"), scope)  # noqa: S102 (the project's own README)
    trainer = scope["trainer"]
    assert isinstance(trainer, RewardTrainer)
    assert trainer.state.global_step == 2
    assert trainer.args.bf16 == torch.cuda.is_available()
    losses = [h["train_loss"] for h in trainer.state.log_history if "train_loss" in h]
    assert len(losses) == 1 and math.isfinite(losses[0])


def test_same_loss_and_grads_as_trl_with_a_peft_adapter(tmp_path):
    """peft_config (a SEQ_CLS LoRA: PEFT wraps the trained copy of score in a
    ModulesToSaveWrapper): the same loss and gradients as TRL's RewardTrainer (refused before)."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    ref, ours = _trainers(tmp_path, _dataset(12, True), peft_config=cfg)
    batch = next(iter(ref.get_train_dataloader()))
    ref_loss, ref_grads = _loss_and_grads(ref, batch)
    loss, grads = _loss_and_grads(ours, batch)
    assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, name="loss")
    assert set(grads) == set(ref_grads) and any("modules_to_save" in n for n in grads)
    for n in ref_grads:
        assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, name=f"grad {n}")


def test_logged_accuracy_counts_a_tie_as_trl_does(tmp_path):
    """A pair whose chosen and rejected texts are the same scores a tie; the logged accuracy
    counts it as TRL does (random rewards never tie, so `>=` for TRL's `>` went unseen)."""
    rows = [{"prompt": "sort 321: ", "chosen": "123", "rejected": "123"},
            {"prompt": "sort 54: ", "chosen": "45", "rejected": "54"}] * 2
    ref, ours = _trainers(tmp_path, datasets.Dataset.from_list(rows))
    batch = next(iter(ref.get_train_dataloader()))
    _loss_and_grads(ref, batch)
    _loss_and_grads(ours, batch)
    assert ref._metrics["train"]["accuracy"] and ref._metrics["train"]["accuracy"][-1] <= 0.5
    assert_close(torch.tensor(ours._metrics["train"]["accuracy"]), torch.tensor(ref._metrics["train"]["accuracy"]),
                 rtol=0, atol=0, name="accuracy")
