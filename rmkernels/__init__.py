"""rmkernels: fused, exact kernels for RLHF reward models and PPO.

    import rmkernels as rmk
    rewards = rmk.last_token_reward(hidden, head.weight, head.bias, attention_mask=mask)

Every public function takes ``backend=None`` (``"reference"``, ``"cpu"``, ``"cuda"``,
``"triton"`` or auto) and is backed by a ``torch.ops.rmkernels.*`` op.
"""
from rmkernels import _ext  # noqa: F401  (loads the compiled kernels, warns once if absent)
from rmkernels._backend import BACKENDS, available_backends, backend_report, use_backend
from rmkernels._checks import checks
from rmkernels._version import __version__
from rmkernels.causal_lm import causal_lm_logprobs
from rmkernels.integrations.hf import patch_hf_reward_model, unpatch_hf_reward_model
from rmkernels.kl_control import AdaptiveKLController, FixedKLController
from rmkernels.modules import BradleyTerryLoss, LastTokenRewardHead, PairwiseRewardLoss, RankingLoss
from rmkernels.ops.bt_loss import bradley_terry_loss
from rmkernels.ops.gae import gae, kl_estimate
from rmkernels.ops.group_adv import (
    GroupAdvantages,
    ReinforceAdvantages,
    group_advantages,
    group_ids,
    reinforce_pp_advantages,
    reinforce_pp_returns,
    remax_advantages,
)
from rmkernels.ops.pairwise import pairwise_reward_loss
from rmkernels.ops.pooling import last_token_index, last_token_reward
from rmkernels.ops.ppo import PPOAdvantages, masked_whiten, ppo_advantages
from rmkernels.ops.ranking import ranking_loss
from rmkernels.ops.token_logprobs import token_logprobs

__all__ = [
    "__version__",
    "BACKENDS",
    "available_backends",
    "backend_report",
    "use_backend",
    "checks",
    "last_token_index",
    "last_token_reward",
    "LastTokenRewardHead",
    "bradley_terry_loss",
    "pairwise_reward_loss",
    "ranking_loss",
    "BradleyTerryLoss",
    "PairwiseRewardLoss",
    "RankingLoss",
    "PPOAdvantages",
    "ppo_advantages",
    "masked_whiten",
    "gae",
    "kl_estimate",
    "GroupAdvantages",
    "group_advantages",
    "group_ids",
    "reinforce_pp_returns",
    "reinforce_pp_advantages",
    "remax_advantages",
    "ReinforceAdvantages",
    "token_logprobs",
    "causal_lm_logprobs",
    "AdaptiveKLController",
    "FixedKLController",
    "patch_hf_reward_model",
    "unpatch_hf_reward_model",
]
