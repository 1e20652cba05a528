"""Every schema of every ``torch.ops.rmkernels`` op, in one place.

``rmkernels/_registry.py`` defines the ops from these tables (``tests/test_op_schemas.py``
pins them: a change here that changes a public schema fails there).

* ``KERNEL_OPS``: the compiled kernels, ``rmkernels::<name>``. Their CPU and CUDA
  implementations are registered by the extension ``_C`` (``csrc/cpu/*.cpp``,
  ``csrc/cuda/*_binding.cpp``); the reference and Triton implementations of the same
  computation take the same arguments.
* ``PUBLIC_OPS``: the public ops, ``rmkernels::<name>`` with a trailing ``str backend``
  argument appended by the registry (``"reference"``, ``"cpu"``, ``"cuda"`` or
  ``"triton"``), except those listed in ``NO_BACKEND`` (index bookkeeping that is the same
  PyTorch code on every backend).
"""

KERNEL_OPS = {
    # pooling (ops/pooling.py)
    "last_token_index_kernel": "(Tensor mask) -> Tensor",
    "last_token_reward_fwd_kernel": "(Tensor hidden, Tensor weight, Tensor? bias, Tensor index) -> Tensor",
    "last_token_reward_bwd_kernel": ("(Tensor grad, Tensor hidden, Tensor weight, Tensor index, bool need_hidden, "
                                     "bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)"),
    # Bradley-Terry (ops/bt_loss.py)
    "bt_loss_fwd_kernel": ("(Tensor chosen, Tensor rejected, Tensor? margin, Tensor? weights, float margin_value, "
                           "float weight_value, float label_smoothing, float center_coef, int reduction) -> Tensor"),
    "bt_loss_bwd_kernel": ("(Tensor grad, Tensor chosen, Tensor rejected, Tensor? margin, Tensor? weights, "
                           "float margin_value, float weight_value, float label_smoothing, float center_coef, "
                           "int reduction, bool need_chosen, bool need_rejected) -> (Tensor, Tensor)"),
    # ranking (ops/ranking.py)
    "ranking_loss_fwd_kernel": "(Tensor rewards, Tensor? num_candidates) -> Tensor",
    "ranking_loss_bwd_kernel": "(Tensor grad_rows, Tensor rewards, Tensor? num_candidates) -> Tensor",
    # PPO (ops/ppo.py)
    "ppo_gae_kernel": ("(Tensor logprobs, Tensor ref_logprobs, Tensor values, Tensor scores, Tensor mask, "
                       "float kl_coef, float gamma, float lam, int estimator, float x_clamp, float kl_clamp, "
                       "float score_clip) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"),
    "masked_row_stats_kernel": "(Tensor x, Tensor mask) -> Tensor",
    "masked_centered_sq_kernel": "(Tensor x, Tensor mask, Tensor totals) -> Tensor",
    "masked_whiten_apply_kernel": ("(Tensor x, Tensor mask, Tensor totals, Tensor sq, bool shift_mean, "
                                   "bool unbiased, float eps) -> Tensor"),
    # building blocks (ops/gae.py)
    "gae_kernel": ("(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam, bool returns) "
                   "-> (Tensor, Tensor)"),
    "kl_estimate_kernel": ("(Tensor logprobs, Tensor ref_logprobs, Tensor? mask, int estimator, float x_clamp, "
                           "float kl_clamp) -> Tensor"),
    # critic-free group advantages (ops/group_adv.py)
    "group_advantages_kernel": ("(Tensor scores, Tensor group_ids, Tensor mask, int estimator, float eps, "
                                "bool unbiased, int single, float f_norm, float whiten_eps) -> (Tensor, Tensor)"),
    "reinforce_kernel": ("(Tensor token_rewards, Tensor mask, Tensor? baselines, float gamma, bool unbiased, "
                         "float eps) -> (Tensor, Tensor)"),
    # token log-probs / entropy (ops/token_logprobs.py)
    "token_logprobs_fwd_kernel": ("(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, float temperature, "
                                  "int ignore_index, int token_chunk, int vocab_chunk) -> (Tensor, Tensor, Tensor)"),
    "token_logprobs_bwd_kernel": ("(Tensor grad_logprobs, Tensor? grad_entropy, Tensor hidden, Tensor weight, "
                                  "Tensor? bias, Tensor targets, Tensor lse, Tensor entropy, float temperature, "
                                  "int ignore_index, int token_chunk, int vocab_chunk, bool need_hidden, "
                                  "bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)"),
}

PUBLIC_OPS = {
    # pooling (ops/pooling.py)
    "last_token_index": "(Tensor mask) -> Tensor",
    "lengths_index": "(Tensor lengths, SymInt n_tokens) -> Tensor",
    "cu_seqlens_index": "(Tensor cu_seqlens, SymInt n_tokens) -> Tensor",
    "check_mask_index": "(Tensor index, SymInt n_tokens, str name) -> Tensor",
    "last_token_reward": "(Tensor hidden, Tensor weight, Tensor? bias, Tensor index) -> Tensor",
    "last_token_reward_backward": ("(Tensor grad, Tensor hidden, Tensor weight, Tensor index, bool need_hidden, "
                                   "bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)"),
    # Bradley-Terry (ops/bt_loss.py)
    "bradley_terry_loss": ("(Tensor chosen, Tensor rejected, Tensor? margin, Tensor? weights, float margin_value, "
                           "float weight_value, float label_smoothing, float center_coef, str reduction) -> Tensor"),
    "bradley_terry_loss_backward": ("(Tensor grad, Tensor chosen, Tensor rejected, Tensor? margin, Tensor? weights, "
                                    "float margin_value, float weight_value, float label_smoothing, "
                                    "float center_coef, str reduction, bool need_chosen, bool need_rejected) "
                                    "-> (Tensor, Tensor)"),
    # pairwise reward-model head (ops/pairwise.py)
    "pairwise_reward_loss": ("(Tensor hidden, Tensor weight, Tensor? bias, Tensor index, Tensor? margin, "
                             "Tensor? weights, float margin_value, float weight_value, float label_smoothing, "
                             "float center_coef, str reduction) -> (Tensor, Tensor)"),
    "pairwise_reward_loss_backward": ("(Tensor grad_loss, Tensor? grad_rewards, Tensor rewards, Tensor hidden, "
                                      "Tensor weight, Tensor index, Tensor? margin, Tensor? weights, "
                                      "float margin_value, float weight_value, float label_smoothing, "
                                      "float center_coef, str reduction, bool need_hidden, bool need_weight, "
                                      "bool need_bias) -> (Tensor, Tensor, Tensor)"),
    # ranking (ops/ranking.py)
    "ranking_loss": "(Tensor rewards, Tensor? num_candidates, str reduction) -> Tensor",
    "ranking_loss_backward": "(Tensor grad, Tensor rewards, Tensor? num_candidates, str reduction) -> Tensor",
    # PPO (ops/ppo.py)
    "ppo_gae": ("(Tensor logprobs, Tensor ref_logprobs, Tensor values, Tensor scores, Tensor mask, float kl_coef, "
                "float gamma, float lam, str kl_estimator, float? kl_clamp, float? score_clip) "
                "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"),
    "masked_row_stats": "(Tensor x, Tensor mask) -> Tensor",
    "masked_centered_sq": "(Tensor x, Tensor mask, Tensor totals) -> Tensor",
    "masked_whiten_apply": ("(Tensor x, Tensor mask, Tensor totals, Tensor sq, bool shift_mean, bool unbiased, "
                            "float eps) -> Tensor"),
    "ppo_advantages": ("(Tensor logprobs, Tensor ref_logprobs, Tensor values, Tensor scores, Tensor mask, "
                       "float kl_coef, float gamma, float lam, str kl_estimator, float? kl_clamp, "
                       "float? score_clip, bool whiten, bool shift_mean, bool unbiased, float eps) "
                       "-> (Tensor, Tensor, Tensor, Tensor)"),
    "masked_whiten": "(Tensor x, Tensor mask, bool shift_mean, bool unbiased, float eps) -> Tensor",
    # building blocks (ops/gae.py)
    "gae": "(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)",
    "kl_estimate": ("(Tensor logprobs, Tensor ref_logprobs, Tensor? mask, str estimator, float? clamp) "
                    "-> Tensor"),
    # critic-free group advantages (ops/group_adv.py)
    "group_advantages": ("(Tensor scores, Tensor group_ids, Tensor mask, str estimator, float eps, bool unbiased, "
                         "str single, float f_norm, float whiten_eps) -> (Tensor, Tensor)"),
    "reinforce_pp_returns": "(Tensor token_rewards, Tensor mask, float gamma) -> Tensor",
    "reinforce_advantages": ("(Tensor token_rewards, Tensor mask, Tensor? baselines, float gamma, bool unbiased, "
                             "float eps) -> (Tensor, Tensor)"),
    # token log-probs / entropy (ops/token_logprobs.py)
    "token_logprobs": ("(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, float temperature, "
                       "int ignore_index) -> (Tensor, Tensor, Tensor)"),
    "token_logprobs_backward": ("(Tensor grad_logprobs, Tensor? grad_entropy, Tensor hidden, Tensor weight, "
                                "Tensor? bias, Tensor targets, Tensor lse, Tensor entropy, float temperature, "
                                "int ignore_index, bool need_hidden, bool need_weight, bool need_bias) "
                                "-> (Tensor, Tensor, Tensor)"),
}

# Public ops without a backend argument.
NO_BACKEND = ("lengths_index", "cu_seqlens_index", "check_mask_index")
