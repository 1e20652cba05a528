"""The model-level integrations on the stand-in GPU of tests/fake_cuda.py (rmkernels'
reference backend in place of its kernels): an HF reward model patched by
``rmk.patch_hf_reward_model``, ``rmk.causal_lm_logprobs`` of an HF causal LM, the ``rmk``
modules and the KL controllers, on a model and inputs moved to the GPU. Outputs and
gradients must be on the GPU and equal the same calls on the CPU."""
import copy

import fake_cuda
import pytest
import torch
from test_integrations_hf import FAMILIES, _batch, _tiny
from utils import assert_close

import rmkernels as rmk

transformers = pytest.importorskip("transformers")


def _on_gpu(fn, model, *args):
    """fn(model, *args) on the CPU, then on copies moved to the stand-in GPU: (cpu outputs and
    parameter gradients, gpu ones moved back, the gpu tensors' devices)."""
    def run(m, a):
        m.zero_grad(set_to_none=True)
        outs = fn(m, *a)
        outs = outs if isinstance(outs, tuple) else (outs,)
        loss = sum((o.float() * torch.linspace(-1, 2, o.numel(), device=o.device).view_as(o)).sum()
                   for o in outs if o.is_floating_point())
        loss.backward()
        return list(outs) + [p.grad for p in m.parameters() if p.grad is not None]

    want = run(model, args)
    with fake_cuda.gpu():
        got = run(copy.deepcopy(model).to("cuda"), [a.to("cuda") if isinstance(a, torch.Tensor) else a for a in args])
        devices = {t.device.type for t in got}
        got = [t.cpu() for t in got]
    return want, got, devices


def _check(want, got, devices, what):
    assert devices == {"cuda"}, f"{what}: outputs/gradients on {devices}"
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, rtol=1e-5, atol=1e-6, name=f"{what} {i}")


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_hf_reward_model(family):
    model = _tiny(family)
    rmk.patch_hf_reward_model(model, backend="reference")
    ids, mask = _batch(left=family == "llama")
    _check(*_on_gpu(lambda m, i, a: m(input_ids=i, attention_mask=a).logits, model, ids, mask), f"patched {family}")


def test_causal_lm_logprobs():
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids, mask = _batch(left=True)
    _check(*_on_gpu(lambda m, i, a: rmk.causal_lm_logprobs(m, i, a, response_length=6, temperature=0.7,
                                                           return_entropy=True, backend="reference"),
                    model, ids, mask), "causal_lm_logprobs")


def test_modules():
    H = 16
    head = rmk.PairwiseRewardLoss(H, center_rewards_coefficient=0.01, backend="reference")
    hidden = torch.randn(6, 9, H)
    mask = torch.arange(9)[None] < torch.tensor([9, 3, 5, 1, 7, 9])[:, None]
    _check(*_on_gpu(lambda m, h, a: m(h, attention_mask=a), head, hidden, mask), "PairwiseRewardLoss")


def test_kl_controller_takes_a_gpu_kl():
    with fake_cuda.gpu():
        ctl = rmk.AdaptiveKLController(0.1, target=6.0, horizon=10_000)
        value = ctl.update(torch.tensor(8.0, device="cuda"), 256)
    assert isinstance(value, float) and value > 0.1


def test_trl_reward_trainer_compute_loss(tmp_path):
    """rmkernels.integrations.trl.RewardTrainer.compute_loss on a GPU model and batch (what
    Trainer.train passes it on a GPU): the loss, the gradients and the logged metrics of the
    CPU call."""
    pytest.importorskip("trl")
    from test_integrations_trl import _dataset, _trainers

    ref, ours = _trainers(tmp_path, _dataset(12, True, False), center_rewards_coefficient=0.01)
    batch = next(iter(ref.get_train_dataloader()))
    keys = ("accuracy", "margin", "min_reward", "mean_reward", "max_reward")

    def call(m, b):
        loss = ours.compute_loss(m, b)
        return (loss, *(torch.tensor(ours._metrics["train"][k][-1], device=loss.device) for k in keys))

    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    names = list(tensors)
    _check(*_on_gpu(lambda m, *vals: call(m, dict(batch, **dict(zip(names, vals)))), ours.model,
                    *tensors.values()), "trl RewardTrainer.compute_loss")
