"""Opt-in integrations with training frameworks.

- :mod:`rmkernels.integrations.hf`: ``patch_hf_reward_model`` / ``unpatch_hf_reward_model``
  for HF ``*ForSequenceClassification`` models (exported as ``rmk.patch_hf_reward_model``).
- :mod:`rmkernels.integrations.trl`: ``RMKRewardTrainer``, TRL's ``RewardTrainer`` with the
  fused Bradley-Terry loss (``import rmkernels.integrations.trl`` imports trl).
- :mod:`rmkernels.integrations.verl`: verl's ``compute_gae_advantage_return``, ``kl_penalty``
  and KL controllers on the fused PPO op.
- :mod:`rmkernels.integrations.openrlhf`: OpenRLHF's ``compute_approx_kl``,
  ``compute_reward``, ``get_advantages_and_returns`` and the advantage normalisation.
- :mod:`rmkernels.integrations.trl_ppo`: TRL PPO's reward/advantage block and
  ``masked_whiten``.

transformers and trl are imported lazily: ``import rmkernels`` needs neither; the verl,
OpenRLHF and TRL-PPO adapters import none of their frameworks.
"""
