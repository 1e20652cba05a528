"""Opt-in integrations with training frameworks.

- :mod:`rmkernels.integrations.hf`: ``patch_hf_reward_model`` / ``unpatch_hf_reward_model``
  for HF ``*ForSequenceClassification`` models (exported as ``rmk.patch_hf_reward_model``).
- :mod:`rmkernels.integrations.trl`: ``RMKRewardTrainer``, TRL's ``RewardTrainer`` with the
  fused Bradley-Terry loss (``import rmkernels.integrations.trl`` imports trl).

transformers and trl are imported lazily: ``import rmkernels`` needs neither.
"""
