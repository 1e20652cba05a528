"""``nn.Module`` forms of the ops."""
import torch
from torch import nn

from rmkernels import _checks
from rmkernels.ops.pooling import last_token_reward


class LastTokenRewardHead(nn.Module):
    """A value head applied only at each sequence's last valid token.

    Put it on any backbone's last hidden state::

        head = rmk.LastTokenRewardHead(model.config.hidden_size)
        rewards = head(outputs.hidden_states[-1], attention_mask=batch["attention_mask"])  # [B, 1]

    Its ``weight``/``bias`` are those of ``nn.Linear(hidden_size, num_labels)``, so an HF
    ``score`` head's state dict loads into it unchanged (``bias=False`` as in HF's
    ``*ForSequenceClassification``).
    """

    def __init__(self, hidden_size, num_labels=1, bias=False, *, backend=None, device=None, dtype=None):
        super().__init__()
        linear = nn.Linear(hidden_size, num_labels, bias=bias, device=device, dtype=dtype)
        self.weight = linear.weight
        self.bias = linear.bias
        self.hidden_size, self.num_labels, self.backend = hidden_size, num_labels, backend

    def _check_hidden(self, hidden_states):
        """The head's own size named (the function's message names ``weight``, which the caller
        of a module never passed)."""
        H = self.weight.shape[1]
        if isinstance(hidden_states, torch.Tensor) and hidden_states.dim() >= 1 and hidden_states.shape[-1] != H:
            raise ValueError(f"hidden_states' last dim is {hidden_states.shape[-1]}, this head's hidden_size is {H}")

    def forward(self, hidden_states, *, attention_mask=None, lengths=None, cu_seqlens=None):
        self._check_hidden(hidden_states)
        return last_token_reward(hidden_states, self.weight, self.bias, attention_mask=attention_mask,
                                 lengths=lengths, cu_seqlens=cu_seqlens, backend=self.backend)

    def extra_repr(self):
        return f"hidden_size={self.hidden_size}, num_labels={self.num_labels}, bias={self.bias is not None}"


# The loss modules (docs/ops.md, "Pairwise Bradley-Terry loss").
from rmkernels.ops.bt_loss import bradley_terry_loss, loss_options  # noqa: E402
from rmkernels.ops.pairwise import pairwise_reward_loss  # noqa: E402
from rmkernels.ops.ranking import ranking_loss  # noqa: E402


class BradleyTerryLoss(nn.Module):
    """Pairwise Bradley-Terry reward loss, with the options of TRL's ``RewardTrainer``::

        loss_fn = rmk.BradleyTerryLoss(center_rewards_coefficient=0.01)
        loss = loss_fn(rewards_chosen, rewards_rejected, margin=batch.get("margin"))

    ``center_rewards_coefficient`` is TRL's name of ``center_coef`` (None = 0);
    ``label_smoothing``, ``reduction`` and the per-call ``margin``/``weights`` are those of
    :func:`rmkernels.bradley_terry_loss`. A ``margin`` given at construction is the default
    of every call.
    """

    def __init__(self, *, margin=None, label_smoothing=0.0, center_rewards_coefficient=None, reduction="mean",
                 backend=None):
        super().__init__()
        # validate the options once, at construction
        loss_options(None, None, label_smoothing, center_rewards_coefficient, reduction, 0, None, torch.float32)
        if margin is not None and not _checks.is_real(margin):
            raise TypeError(f"margin must be a float at construction (pass a [B] tensor per call), "
                            f"got {type(margin).__name__}")
        self.margin, self.label_smoothing, self.reduction, self.backend = margin, label_smoothing, reduction, backend
        self.center_rewards_coefficient = center_rewards_coefficient

    def forward(self, rewards_chosen, rewards_rejected, margin=None, weights=None):
        return bradley_terry_loss(rewards_chosen, rewards_rejected, margin=self.margin if margin is None else margin,
                                  label_smoothing=self.label_smoothing,
                                  center_coef=self.center_rewards_coefficient or 0.0, weights=weights,
                                  reduction=self.reduction, backend=self.backend)

    def extra_repr(self):
        return (f"margin={self.margin}, label_smoothing={self.label_smoothing}, "
                f"center_rewards_coefficient={self.center_rewards_coefficient}, reduction={self.reduction!r}")


class PairwiseRewardLoss(LastTokenRewardHead):
    """A one-output value head and the Bradley-Terry loss in one op
    (:func:`rmkernels.pairwise_reward_loss`): feed it the backbone's last hidden state of a
    TRL-collated batch (B chosen rows, then B rejected rows)::

        head = rmk.PairwiseRewardLoss(model.config.hidden_size, center_rewards_coefficient=0.01)
        loss, r_chosen, r_rejected = head(hidden, attention_mask=mask, margin=batch.get("margin"))

    ``weight``/``bias`` are those of ``nn.Linear(hidden_size, 1)`` (``bias=False`` as HF's
    ``score`` head), so a trained ``score`` state dict loads into it unchanged.
    """

    def __init__(self, hidden_size, bias=False, *, label_smoothing=0.0, center_rewards_coefficient=None,
                 reduction="mean", backend=None, device=None, dtype=None):
        super().__init__(hidden_size, 1, bias, backend=backend, device=device, dtype=dtype)
        loss_options(None, None, label_smoothing, center_rewards_coefficient, reduction, 0, None, torch.float32)
        self.label_smoothing, self.reduction = label_smoothing, reduction
        self.center_rewards_coefficient = center_rewards_coefficient

    def forward(self, hidden_states, *, attention_mask=None, lengths=None, cu_seqlens=None, margin=None,
                weights=None):
        self._check_hidden(hidden_states)
        return pairwise_reward_loss(hidden_states, self.weight, self.bias, attention_mask=attention_mask,
                                    lengths=lengths, cu_seqlens=cu_seqlens, margin=margin,
                                    label_smoothing=self.label_smoothing,
                                    center_coef=self.center_rewards_coefficient or 0.0, weights=weights,
                                    reduction=self.reduction, backend=self.backend)


class RankingLoss(nn.Module):
    """InstructGPT's K-wise ranking loss (:func:`rmkernels.ranking_loss`) as a module:
    ``RankingLoss()(rewards[B, K], num_candidates=None)``, column 0 the best response."""

    def __init__(self, *, reduction="mean", backend=None):
        super().__init__()
        self.reduction, self.backend = reduction, backend

    def forward(self, rewards, num_candidates=None):
        return ranking_loss(rewards, num_candidates=num_candidates, reduction=self.reduction, backend=self.backend)

    def extra_repr(self):
        return f"reduction={self.reduction!r}"
