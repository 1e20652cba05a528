"""Training loops of rmkernels (reward model, PPO)."""
