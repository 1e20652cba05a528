"""Opt-in integrations with training frameworks (each imports its framework lazily, if at all).

- :mod:`rmkernels.integrations.verl`: verl's ``compute_gae_advantage_return`` and
  ``kl_penalty`` on the fused PPO op.
- :mod:`rmkernels.integrations.openrlhf`: OpenRLHF's ``compute_approx_kl``,
  ``compute_reward``, ``get_advantages_and_returns`` and the advantage normalisation.
- :mod:`rmkernels.integrations.trl_ppo`: TRL PPO's reward/advantage block and
  ``masked_whiten``.
"""
