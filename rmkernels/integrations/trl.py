"""TRL's ``RewardTrainer`` with the fused Bradley-Terry op.

    from rmkernels.integrations.trl import RewardTrainer   # instead of: from trl import RewardTrainer

    trainer = RewardTrainer(model=model, args=RewardConfig(...), train_dataset=ds, processing_class=tok)
    trainer.train()

It is ``trl.RewardTrainer`` with one change: ``compute_loss`` runs the backbone and then
``rmk.pairwise_reward_loss`` (``score`` head at the last token of the ``2B`` sequences and
the Bradley-Terry loss, forward and backward in one op) instead of the head on all ``2B*T``
tokens followed by ``-logsigmoid(chosen - rejected - margin).mean()``. Data handling,
collator, metrics and logging are TRL's.

Same numbers as TRL with float32 weights and no autocast: the token each sequence is pooled at is the one TRL's
model picks (HF's rule: the rightmost token that is not ``pad_token_id``), the optional
``margin`` column and ``center_rewards_coefficient`` enter the loss as in TRL, and the logged
``accuracy``, ``margin``, ``min/mean/max_reward`` are computed from the same rewards. With
bf16 / fp16 weights the rewards and the loss stay float32, where TRL rounds the rewards to the
weights' dtype and computes its loss from those: the loss, its gradients and the metrics then
differ by that rounding (a tiny bf16 Llama: loss 0.70670 here, 0.70703 in TRL). The same holds
for float32 weights under bf16 / fp16 autocast, which is what ``RewardConfig``'s default
``bf16=True`` does: HF's head then rounds the hidden state and the head weight to bf16 before
its product; the fused op computes it in float32 and keeps the rewards float32. Extra: the
``label_smoothing=`` argument (0 = TRL's loss).

The model is patched with :func:`rmkernels.integrations.hf.patch_hf_reward_model` (any
decoder ``*ForSequenceClassification`` of transformers: Llama, Qwen2, Pythia, OPT, GPT-2, ...). The
patch goes through ``model(...)``, so accelerate/DDP wrappers keep working.
"""
try:
    import trl
except ImportError as e:  # the module is TRL's trainer with the fused head: nothing here works without it
    raise ImportError(f"rmkernels.integrations.trl needs TRL ({e}): pip install trl (tested with trl 1.16.0; "
                      f"rmkernels' other integrations do not need it)") from None

from rmkernels.integrations.hf import is_patched, patch_hf_reward_model


def _hf_model(model):
    """The ``*ForSequenceClassification`` inside PEFT / accelerate wrappers."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


class RewardTrainer(trl.RewardTrainer):
    """``trl.RewardTrainer`` whose loss is ``rmk.pairwise_reward_loss`` (see the module
    docstring). Takes TRL's arguments, plus ``label_smoothing`` (default 0) and ``backend``
    (the rmkernels backend, default: the fastest available)."""

    def __init__(self, *args, label_smoothing=0.0, backend=None, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        try:
            patch_hf_reward_model(_hf_model(self.model), last_token="pad_id", backend=backend)
        except TypeError as e:
            raise TypeError(f"rmkernels RewardTrainer: {e}") from None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        if not is_patched(_hf_model(model)):
            raise RuntimeError("rmkernels RewardTrainer: its model is no longer patched (rmk.unpatch_hf_reward_model "
                               "while the trainer holds it): its loss is the patched forward's; patch it again "
                               "(rmk.patch_hf_reward_model) to go on with this trainer")
        inputs = dict(inputs)
        margin = inputs.pop("margin", None)
        coef = self.args.center_rewards_coefficient
        outputs = model(**inputs, use_cache=False,
                        pairwise_loss={"margin": margin, "center_coef": float(coef or 0.0),
                                       "label_smoothing": self.label_smoothing})
        loss = outputs.loss
        self._record_metrics(mode, inputs, outputs.logits.detach())
        return (loss, outputs) if return_outputs else loss

    def _record_metrics(self, mode, inputs, rewards):
        """The statistics trl.RewardTrainer logs (same keys), from the fused op's rewards."""
        acc = self.accelerator
        if mode == "train":
            tokens = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // getattr(self, "_tp_size", 1)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        everyone = acc.gather(rewards)
        chosen, rejected = rewards.squeeze(-1).chunk(2)
        stats = self._metrics[mode]
        stats["min_reward"].append(everyone.min().item())
        stats["mean_reward"].append(everyone.mean().item())
        stats["max_reward"].append(everyone.max().item())
        stats["accuracy"].append(acc.gather_for_metrics((chosen > rejected).float().mean()).mean().item())
        stats["margin"].append(acc.gather_for_metrics((chosen - rejected).mean()).mean().item())


RMKRewardTrainer = RewardTrainer

__all__ = ["RewardTrainer", "RMKRewardTrainer"]
