"""Every kernel op checks every argument before it runs (issue 12 item 3).

``torch.ops.rmkernels.*`` is public: compile, export and dispatch modes call it, and so can
anyone. A bad direct call (sizes that disagree, a weight shorter than H, a margin shorter than B,
a gradient of the wrong shape, a wrong dtype or option code) must be a clear error naming the
argument, never an out-of-bounds read or write. Index *values* out of range are "no valid
token" (NaN rewards, no gradient), never an access.

The calls run in a subprocess, so that a crash (SIGSEGV) is a failure of the case that was
running, not a dead pytest. The C++ kernel ops (CPU; TORCH_CHECK_VALUE / TORCH_CHECK_TYPE), the
public ops routed to them and the Triton host functions (interpreter, in their own subprocess)
raise ValueError / TypeError, as the public functions do (docs/ops.md, "Errors").
"""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from utils import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> expression; `ops` is torch.ops.rmkernels, `r`/`f`/`i` make float32 / float64 / int64 tensors.
KERNEL_CASES = {
    # last-token pooling
    "fwd: index rows != B (the issue's repro)":
        "ops.last_token_reward_fwd_kernel(r(2, 5, 8), r(1, 8), None, full((200000,), 4))",
    "fwd: weight shorter than H": "ops.last_token_reward_fwd_kernel(r(2, 5, 8), r(1, 4), None, full((2,), 4))",
    "fwd: weight longer than H": "ops.last_token_reward_fwd_kernel(r(2, 5, 8), r(1, 800), None, full((2,), 4))",
    "fwd: bias of the wrong size": "ops.last_token_reward_fwd_kernel(r(2, 5, 8), r(1, 8), r(3), full((2,), 4))",
    "fwd: weight 1-D": "ops.last_token_reward_fwd_kernel(r(2, 5, 8), r(8), None, full((2,), 4))",
    "fwd: weight in another dtype": "ops.last_token_reward_fwd_kernel(r(2, 5, 8), f(1, 8), None, full((2,), 4))",
    "fwd: weight not contiguous": "ops.last_token_reward_fwd_kernel(r(2, 5, 8), r(8, 2).t(), None, full((2,), 4))",
    "fwd: index int32": "ops.last_token_reward_fwd_kernel(r(2, 5, 8), r(1, 8), None, full((2,), 4, torch.int32))",
    "fwd: index 2-D": "ops.last_token_reward_fwd_kernel(r(2, 5, 8), r(1, 8), None, full((2, 1), 4))",
    "fwd: hidden 4-D": "ops.last_token_reward_fwd_kernel(r(2, 5, 8, 1), r(1, 1), None, full((2,), 4))",
    "fwd: hidden integer": "ops.last_token_reward_fwd_kernel(i(2, 5, 8), r(1, 8), None, full((2,), 4))",
    "fwd: hidden without unit stride on H":
        "ops.last_token_reward_fwd_kernel(r(2, 5, 16)[:, :, ::2], r(1, 8), None, full((2,), 4))",
    "bwd: index rows != B":
        "ops.last_token_reward_bwd_kernel(r(200000, 1), r(2, 5, 8), r(1, 8), full((200000,), 4), True, True, True)",
    "bwd: grad of the wrong shape":
        "ops.last_token_reward_bwd_kernel(r(3, 1), r(2, 5, 8), r(1, 8), full((2,), 4), True, True, True)",
    "bwd: grad with too few columns":
        "ops.last_token_reward_bwd_kernel(r(2, 1), r(2, 5, 8), r(3, 8), full((2,), 4), True, True, True)",
    "bwd: grad in another dtype":
        "ops.last_token_reward_bwd_kernel(f(2, 1), r(2, 5, 8), r(1, 8), full((2,), 4), True, True, True)",
    "bwd: weight shorter than H":
        "ops.last_token_reward_bwd_kernel(r(2, 1), r(2, 5, 8), r(1, 4), full((2,), 4), True, True, True)",
    "index: 1-D mask": "ops.last_token_index_kernel(r(5))",
    # Bradley-Terry / ranking
    "bt fwd: rejected shorter": "ops.bt_loss_fwd_kernel(r(4), r(3), None, None, 0.0, 1.0, 0.0, 0.0, 1)",
    "bt fwd: margin shorter than B": "ops.bt_loss_fwd_kernel(r(400), r(400), r(2), None, 0.0, 1.0, 0.0, 0.0, 0)",
    "bt fwd: weights shorter than B": "ops.bt_loss_fwd_kernel(r(400), r(400), None, r(2), 0.0, 1.0, 0.0, 0.0, 1)",
    "bt fwd: margin in another dtype": "ops.bt_loss_fwd_kernel(r(4), r(4), f(4), None, 0.0, 1.0, 0.0, 0.0, 1)",
    "bt fwd: margin not contiguous": "ops.bt_loss_fwd_kernel(r(4), r(4), r(8)[::2], None, 0.0, 1.0, 0.0, 0.0, 1)",
    "bt fwd: reduction code 5": "ops.bt_loss_fwd_kernel(r(4), r(4), None, None, 0.0, 1.0, 0.0, 0.0, 5)",
    "bt fwd: reduction code -1": "ops.bt_loss_fwd_kernel(r(4), r(4), None, None, 0.0, 1.0, 0.0, 0.0, -1)",
    "bt fwd: chosen 2-D": "ops.bt_loss_fwd_kernel(r(4, 2), r(4, 2), None, None, 0.0, 1.0, 0.0, 0.0, 1)",
    "bt fwd: rejected in another dtype": "ops.bt_loss_fwd_kernel(r(4), f(4), None, None, 0.0, 1.0, 0.0, 0.0, 1)",
    "bt bwd: grad shorter than B (none)":
        "ops.bt_loss_bwd_kernel(r(3), r(400), r(400), None, None, 0.0, 1.0, 0.0, 0.0, 0, True, True)",
    "bt bwd: grad of two elements (mean)":
        "ops.bt_loss_bwd_kernel(r(2), r(4), r(4), None, None, 0.0, 1.0, 0.0, 0.0, 1, True, True)",
    "bt bwd: weights shorter than B":
        "ops.bt_loss_bwd_kernel(r(()), r(400), r(400), None, r(3), 0.0, 1.0, 0.0, 0.0, 1, True, True)",
    "bt bwd: grad in another dtype":
        "ops.bt_loss_bwd_kernel(f(()), r(4), r(4), None, None, 0.0, 1.0, 0.0, 0.0, 1, True, True)",
    "ranking fwd: rewards 1-D": "ops.ranking_loss_fwd_kernel(r(4), None)",
    "ranking fwd: num_candidates shorter than B": "ops.ranking_loss_fwd_kernel(r(400, 3), full((2,), 3))",
    "ranking fwd: num_candidates int32": "ops.ranking_loss_fwd_kernel(r(4, 3), full((4,), 3, torch.int32))",
    "ranking bwd: grad_rows shorter than B": "ops.ranking_loss_bwd_kernel(r(3), r(400, 3), None)",
    "ranking bwd: grad_rows in another dtype": "ops.ranking_loss_bwd_kernel(f(4), r(4, 3), None)",
    # PPO
    "ppo_gae: scores shorter than B":
        "ops.ppo_gae_kernel(r(400, 5), r(400, 5), r(400, 5), r(2), b(400, 5), 0.1, 1.0, 0.95, 0, 0.0, 0.0, 0.0)",
    "ppo_gae: scores in another dtype":
        "ops.ppo_gae_kernel(r(4, 5), r(4, 5), r(4, 5), f(4), b(4, 5), 0.1, 1.0, 0.95, 0, 0.0, 0.0, 0.0)",
    "ppo_gae: logprobs of another shape":
        "ops.ppo_gae_kernel(r(4, 3), r(4, 5), r(4, 5), r(4), b(4, 5), 0.1, 1.0, 0.95, 0, 0.0, 0.0, 0.0)",
    "ppo_gae: mask of another shape":
        "ops.ppo_gae_kernel(r(4, 5), r(4, 5), r(4, 5), r(4), b(4, 3), 0.1, 1.0, 0.95, 0, 0.0, 0.0, 0.0)",
    "ppo_gae: mask not bool":
        "ops.ppo_gae_kernel(r(4, 5), r(4, 5), r(4, 5), r(4), r(4, 5), 0.1, 1.0, 0.95, 0, 0.0, 0.0, 0.0)",
    "ppo_gae: estimator code 9":
        "ops.ppo_gae_kernel(r(4, 5), r(4, 5), r(4, 5), r(4), b(4, 5), 0.1, 1.0, 0.95, 9, 0.0, 0.0, 0.0)",
    "ppo_gae: values in another dtype":
        "ops.ppo_gae_kernel(r(4, 5), r(4, 5), f(4, 5), r(4), b(4, 5), 0.1, 1.0, 0.95, 0, 0.0, 0.0, 0.0)",
    "gae: rewards of another shape": "ops.gae_kernel(r(4, 3), r(4, 5), b(4, 5), 1.0, 0.95, True)",
    "gae: mask of another shape": "ops.gae_kernel(r(4, 5), r(4, 5), b(3, 5), 1.0, 0.95, True)",
    "gae: values 3-D": "ops.gae_kernel(r(4, 5, 1), r(4, 5, 1), b(4, 5, 1), 1.0, 0.95, False)",
    "kl_estimate: estimator code 4": "ops.kl_estimate_kernel(r(4, 5), r(4, 5), None, 4, 0.0, 0.0)",
    "kl_estimate: ref of another shape": "ops.kl_estimate_kernel(r(4, 5), r(5, 4), None, 0, 0.0, 0.0)",
    "kl_estimate: mask of another shape": "ops.kl_estimate_kernel(r(4, 5), r(4, 5), b(4, 4), 0, 0.0, 0.0)",
    "row_stats: mask of another shape": "ops.masked_row_stats_kernel(r(4, 5), b(4, 50))",
    "centered_sq: totals of 3": "ops.masked_centered_sq_kernel(r(4, 5), b(4, 5), f(3))",
    "centered_sq: totals float32": "ops.masked_centered_sq_kernel(r(4, 5), b(4, 5), r(2))",
    "whiten_apply: sq of 2": "ops.masked_whiten_apply_kernel(r(4, 5), b(4, 5), f(2), f(2), True, True, 1e-8)",
    # critic-free group advantages (op_checks.h: check_group_advantages_args; ids in [0, B))
    "group: ids shorter than B": "ops.group_advantages_kernel(r(400), full((2,), 0), b(400, 5)"
            ", 0, 1e-6, True, 0, 1.0, 1e-8)",
    "group: ids int32": "ops.group_advantages_kernel(r(4), full((4,), 0, torch.int32), b(4, 5)"
            ", 0, 1e-6, True, 0, 1.0, 1e-8)",
    "group: mask of 3 rows": "ops.group_advantages_kernel(r(4), full((4,), 0), b(3, 5), 0, 1e-6, True, 0, 1.0, 1e-8)",
    "group: mask not bool": "ops.group_advantages_kernel(r(4), full((4,), 0), r(4, 5), 0, 1e-6, True, 0, 1.0, 1e-8)",
    "group: scores 2-D": "ops.group_advantages_kernel(r(4, 5), full((4,), 0), b(4, 5), 0, 1e-6, True, 0, 1.0, 1e-8)",
    "group: estimator code 6": "ops.group_advantages_kernel(r(4), full((4,), 0), b(4, 5), 6, 1e-6, True, 0, 1.0, 1e-8)",
    "group: single code 2": "ops.group_advantages_kernel(r(4), full((4,), 0), b(4, 5), 0, 1e-6, True, 2, 1.0, 1e-8)",
    "group: id out of range": "ops.group_advantages_kernel(r(4), full((4,), 400000), b(4, 5)"
            ", 0, 1e-6, True, 0, 1.0, 1e-8)",
    "group: id negative": "ops.group_advantages_kernel(r(4), full((4,), -1), b(4, 5), 0, 1e-6, True, 0, 1.0, 1e-8)",
    "group: id equal to B": "ops.group_advantages_kernel(r(4), torch.tensor([0, 0, 1, 4]), b(4, 5), 0, 1e-6, True, 0, "
            "1.0, 1e-8)",  # the bound itself (ids lie in [0, B))
    # REINFORCE++ / ReMax (op_checks.h: check_reinforce_args)
    "reinforce: mask of 3 rows": "ops.reinforce_kernel(r(400, 5), b(3, 5), None, 1.0, True, 1e-8)",
    "reinforce: mask shorter than T": "ops.reinforce_kernel(r(4, 500), b(4, 5), None, 1.0, True, 1e-8)",
    "reinforce: mask not bool": "ops.reinforce_kernel(r(4, 5), r(4, 5), None, 1.0, True, 1e-8)",
    "reinforce: rewards 1-D": "ops.reinforce_kernel(r(20), b(4, 5), None, 1.0, True, 1e-8)",
    "reinforce: baselines shorter than B": "ops.reinforce_kernel(r(400, 5), b(400, 5), r(2), 1.0, True, 1e-8)",
    "reinforce: baselines float64 for float32 rewards": "ops.reinforce_kernel(r(4, 5), b(4, 5), f(4), 1.0, True, 1e-8)",
    "reinforce: baselines not contiguous": "ops.reinforce_kernel(r(4, 5), b(4, 5), r(8)[::2], 1.0, True, 1e-8)",
    "reinforce: gamma negative": "ops.reinforce_kernel(r(4, 5), b(4, 5), None, -1.0, True, 1e-8)",
    "reinforce: eps NaN": "ops.reinforce_kernel(r(4, 5), b(4, 5), None, 1.0, True, float('nan'))",
    # token log-probs (token_logprobs_chunks.h: check_args): float inputs only, messages naming the argument
    "logprobs fwd: hidden int64": "ops.token_logprobs_fwd_kernel(i(2, 3, 4), i(5, 4), None, full((2, 3), 1), 1.0, "
                                  "-100, 64, 64)",
    "logprobs fwd: hidden bool": "ops.token_logprobs_fwd_kernel(b(2, 3, 4), b(5, 4), None, full((2, 3), 1), 1.0, "
                                 "-100, 64, 64)",
    "logprobs fwd: hidden complex64": "ops.token_logprobs_fwd_kernel(c(2, 3, 4), c(5, 4), None, full((2, 3), 1), "
                                      "1.0, -100, 64, 64)",
    "logprobs bwd: hidden int64": "ops.token_logprobs_bwd_kernel(r(2, 3), None, i(2, 3, 4), i(5, 4), None, "
                                  "full((2, 3), 1), r(2, 3), r(2, 3), 1.0, -100, 64, 64, True, True, True)",
    "logprobs fwd: targets int32": "ops.token_logprobs_fwd_kernel(r(2, 3, 4), r(5, 4), None, "
                                   "full((2, 3), 1, torch.int32), 1.0, -100, 64, 64)",
    "logprobs fwd: targets longer than N": "ops.token_logprobs_fwd_kernel(r(2, 4), r(5, 4), None, full((20000,), 1), "
                                           "1.0, -100, 64, 64)",
    "logprobs fwd: bias float64": "ops.token_logprobs_fwd_kernel(r(2, 3, 4), r(5, 4), f(5), full((2, 3), 1), 1.0, "
                                  "-100, 64, 64)",
    "logprobs fwd: bias of the wrong size": "ops.token_logprobs_fwd_kernel(r(2, 3, 4), r(500, 4), r(2), "
                                            "full((2, 3), 1), 1.0, -100, 64, 64)",
    "logprobs fwd: weight shorter than H": "ops.token_logprobs_fwd_kernel(r(2, 3, 64), r(5, 4), None, "
                                           "full((2, 3), 1), 1.0, -100, 64, 64)",
    "logprobs fwd: temperature 1e-300": "ops.token_logprobs_fwd_kernel(r(2, 3, 4), r(5, 4), None, full((2, 3), 1), "
                                        "1e-300, -100, 64, 64)",
    "logprobs fwd: temperature 1e-39": "ops.token_logprobs_fwd_kernel(r(2, 3, 4), r(5, 4), None, full((2, 3), 1), "
                                       "1e-39, -100, 64, 64)",
    "logprobs bwd: lse float64": "ops.token_logprobs_bwd_kernel(r(2, 3), None, r(2, 3, 4), r(5, 4), None, "
                                 "full((2, 3), 1), f(2, 3), r(2, 3), 1.0, -100, 64, 64, True, True, True)",
    "logprobs bwd: entropy float16": "ops.token_logprobs_bwd_kernel(r(2, 3), None, r(2, 3, 4), r(5, 4), None, "
                                     "full((2, 3), 1), r(2, 3), r(2, 3).half(), 1.0, -100, 64, 64, True, True, True)",
    "logprobs bwd: lse shorter than N": "ops.token_logprobs_bwd_kernel(r(200), None, r(200, 4), r(5, 4), None, "
                                        "full((200,), 1), r(2), r(200), 1.0, -100, 64, 64, True, True, True)",
    # float options, the public functions' ranges (op_checks.h: check_discount, check_bt_options,
    # check_group_options, check_nonneg_option)
    "gae: gamma NaN": "ops.gae_kernel(r(4, 5), r(4, 5), b(4, 5), float('nan'), 0.95, True)",
    "gae: gamma negative": "ops.gae_kernel(r(4, 5), r(4, 5), b(4, 5), -1.0, 0.95, True)",
    "gae: gamma inf": "ops.gae_kernel(r(4, 5), r(4, 5), b(4, 5), float('inf'), 0.95, True)",
    "gae: lam negative": "ops.gae_kernel(r(4, 5), r(4, 5), b(4, 5), 1.0, -3.0, True)",
    "gae: lam above 1": "ops.gae_kernel(r(4, 5), r(4, 5), b(4, 5), 1.0, 1.5, False)",
    "ppo_gae: lam NaN":
        "ops.ppo_gae_kernel(r(4, 5), r(4, 5), r(4, 5), r(4), b(4, 5), 0.1, 1.0, float('nan'), 0, 0.0, 0.0, 0.0)",
    "ppo_gae: kl_coef inf":
        "ops.ppo_gae_kernel(r(4, 5), r(4, 5), r(4, 5), r(4), b(4, 5), float('inf'), 1.0, 0.95, 0, 0.0, 0.0, 0.0)",
    "ppo_gae: gamma negative":
        "ops.ppo_gae_kernel(r(4, 5), r(4, 5), r(4, 5), r(4), b(4, 5), 0.1, -1.0, 0.95, 0, 0.0, 0.0, 0.0)",
    "bt fwd: label_smoothing 0.7": "ops.bt_loss_fwd_kernel(r(4), r(4), None, None, 0.0, 1.0, 0.7, 0.0, 1)",
    "bt fwd: label_smoothing NaN": "ops.bt_loss_fwd_kernel(r(4), r(4), None, None, 0.0, 1.0, float('nan'), 0.0, 1)",
    "bt fwd: center_coef negative": "ops.bt_loss_fwd_kernel(r(4), r(4), None, None, 0.0, 1.0, 0.0, -1.0, 1)",
    "bt fwd: margin_value inf": "ops.bt_loss_fwd_kernel(r(4), r(4), None, None, float('inf'), 1.0, 0.0, 0.0, 1)",
    "bt fwd: weight_value NaN": "ops.bt_loss_fwd_kernel(r(4), r(4), None, None, 0.0, float('nan'), 0.0, 0.0, 1)",
    "bt bwd: label_smoothing 0.5":
        "ops.bt_loss_bwd_kernel(r(()), r(4), r(4), None, None, 0.0, 1.0, 0.5, 0.0, 1, True, True)",
    "bt bwd: center_coef NaN":
        "ops.bt_loss_bwd_kernel(r(()), r(4), r(4), None, None, 0.0, 1.0, 0.0, float('nan'), 1, True, True)",
    "group: eps NaN": "ops.group_advantages_kernel(r(4), full((4,), 0), b(4, 5), 0, float('nan'), True, 0, 1.0, 1e-8)",
    "group: eps negative": "ops.group_advantages_kernel(r(4), full((4,), 0), b(4, 5), 0, -1.0, True, 0, 1.0, 1e-8)",
    "group: f_norm 0": "ops.group_advantages_kernel(r(4), full((4,), 0), b(4, 5), 4, 1e-6, True, 0, 0.0, 1e-8)",
    "group: whiten_eps negative": "ops.group_advantages_kernel(r(4), full((4,), 0), b(4, 5), 5, 1e-6, True, 0, 1.0, "
                                  "-1.0)",
    "whiten_apply: eps negative": "ops.masked_whiten_apply_kernel(r(4, 5), b(4, 5), f(2), f(1), True, True, -1.0)",
    "whiten_apply: eps NaN": "ops.masked_whiten_apply_kernel(r(4, 5), b(4, 5), f(2), f(1), True, True, float('nan'))",
    # clamps: finite and >= 0, 0 = no clamp (the public functions refuse inf too)
    "kl_estimate: x_clamp inf": "ops.kl_estimate_kernel(r(4, 5), r(4, 5), None, 0, float('inf'), 0.0)",
    "kl_estimate: kl_clamp negative": "ops.kl_estimate_kernel(r(4, 5), r(4, 5), None, 0, 0.0, -1.0)",
    "ppo_gae: score_clip inf":
        "ops.ppo_gae_kernel(r(4, 5), r(4, 5), r(4, 5), r(4), b(4, 5), 0.1, 1.0, 0.95, 0, 0.0, 0.0, float('inf'))",
}

# A valid call of every kernel op (its arguments as expressions): each must run, and with None in
# place of any one of its required Tensor arguments must raise a TypeError naming it (None reaches
# the C++ checks as an undefined tensor; it gave "Unimplemented scalar type" or "got shape [0]").
# With every Tensor argument None (also Tensor? ones) the dispatcher has no device to pick: it
# raised its own NotImplementedError ("There were no tensor arguments to this function") before
# any check of ours; the kernel ops' CompositeExplicitAutograd fallback (_registry._no_kernel)
# names the first one instead.
VALID_KERNEL_CALLS = {
    "last_token_index_kernel": ["b(2, 5)"],
    "last_token_reward_fwd_kernel": ["r(2, 5, 8)", "r(1, 8)", "None", "full((2,), 4)"],
    "last_token_reward_bwd_kernel": ["r(2, 1)", "r(2, 5, 8)", "r(1, 8)", "full((2,), 4)", "True", "True", "True"],
    "bt_loss_fwd_kernel": ["r(4)", "r(4)", "None", "None", "0.0", "1.0", "0.0", "0.0", "1"],
    "bt_loss_bwd_kernel": ["r(())", "r(4)", "r(4)", "None", "None", "0.0", "1.0", "0.0", "0.0", "1", "True", "True"],
    "ranking_loss_fwd_kernel": ["r(4, 3)", "full((4,), 3)"],
    "ranking_loss_bwd_kernel": ["r(4)", "r(4, 3)", "full((4,), 3)"],
    "ppo_gae_kernel": ["r(4, 5)", "r(4, 5)", "r(4, 5)", "r(4)", "b(4, 5)", "0.1", "1.0", "0.95", "0", "0.0", "0.0",
                       "0.0"],
    "masked_row_stats_kernel": ["r(4, 5)", "b(4, 5)"],
    "masked_centered_sq_kernel": ["r(4, 5)", "b(4, 5)", "f(2)"],
    "masked_whiten_apply_kernel": ["r(4, 5)", "b(4, 5)", "f(2)", "f(1)", "True", "True", "1e-8"],
    "gae_kernel": ["r(4, 5)", "r(4, 5)", "b(4, 5)", "1.0", "0.95", "True"],
    "kl_estimate_kernel": ["r(4, 5)", "r(4, 5)", "None", "0", "0.0", "0.0"],
    "group_advantages_kernel": ["r(4)", "full((4,), 0)", "b(4, 5)", "0", "1e-6", "True", "0", "1.0", "1e-8"],
    "reinforce_kernel": ["r(4, 5)", "b(4, 5)", "None", "1.0", "True", "1e-8"],
    "token_logprobs_fwd_kernel": ["r(2, 3, 4)", "r(5, 4)", "None", "full((2, 3), 1)", "1.0", "-100", "64", "64"],
    "token_logprobs_bwd_kernel": ["r(2, 3)", "None", "r(2, 3, 4)", "r(5, 4)", "None", "full((2, 3), 1)", "r(2, 3)",
                                  "r(2, 3)", "1.0", "-100", "64", "64", "True", "True", "True"],
}


def _none_cases():
    import torch

    from rmkernels.ops._schemas import KERNEL_OPS

    valid, cases, messages = {}, {}, {}
    for op, args in VALID_KERNEL_CALLS.items():
        valid[f"valid: {op}"] = f"ops.{op}({', '.join(args)})"
        schema = torch._C.parse_schema(f"x{KERNEL_OPS[op]}")
        assert len(schema.arguments) == len(args), op
        for k, a in enumerate(schema.arguments):
            if str(a.type) == "Tensor":
                name = f"{op}: {a.name} None"
                cases[name] = f"ops.{op}({', '.join(args[:k] + ['None'] + args[k + 1:])})"
                messages[name] = f"^{a.name} must be a tensor, got None$"
        tensors = [k for k, a in enumerate(schema.arguments) if "Tensor" in str(a.type)]
        name = f"{op}: every tensor None"
        cases[name] = f"ops.{op}({', '.join('None' if k in tensors else v for k, v in enumerate(args))})"
        first = next(a.name for a in schema.arguments if str(a.type) == "Tensor")
        messages[name] = f"^{first} must be a tensor, got None$"
    return valid, cases, messages


VALID_CASES, NONE_CASES, NONE_MESSAGES = _none_cases()
assert set(VALID_KERNEL_CALLS) == set(__import__(
    "rmkernels.ops._schemas", fromlist=["KERNEL_OPS"]).KERNEL_OPS), "a kernel op without a valid call above"
KERNEL_CASES.update(NONE_CASES)

# What the message of each case must say (the argument named, and what was given where the case
# is about a dtype); every case has one (test_bad_call_raises).
KERNEL_MESSAGES = {
    "logprobs fwd: hidden int64": "hidden must be float32, float64, bfloat16 or float16, got int64",
    "logprobs fwd: hidden bool": "hidden must be float32, float64, bfloat16 or float16, got bool",
    "logprobs fwd: hidden complex64": "hidden must be float32, float64, bfloat16 or float16, got complex64",
    "logprobs bwd: hidden int64": "hidden must be float32, float64, bfloat16 or float16, got int64",
    "logprobs fwd: targets int32": "targets must be int64, got int32",
    "logprobs fwd: targets longer than N": r"targets must have shape \[2\], got \[20000\]",
    "logprobs fwd: bias float64": "bias must be float32, got float64",
    "logprobs fwd: bias of the wrong size": r"bias must have shape \[500\], got \[2\]",
    "logprobs fwd: weight shorter than H": r"weight must be \[V, H\] with V >= 1 and H = 64",
    "logprobs fwd: temperature 1e-300": "temperature must be finite and > 0 with 1 / temperature finite in float32",
    "logprobs fwd: temperature 1e-39": "temperature must be .*got 1e-39",
    "logprobs bwd: lse float64": "lse must be float32, got float64",
    "logprobs bwd: entropy float16": "entropy must be float32, got float16",
    "logprobs bwd: lse shorter than N": r"lse must have shape \[200\], got \[2\]",
    "gae: gamma NaN": "gamma must be finite and >= 0, got nan",
    "gae: gamma negative": "gamma must be finite and >= 0, got -1",
    "gae: gamma inf": "gamma must be finite and >= 0, got inf",
    "gae: lam negative": r"lam must be in \[0, 1\], got -3",
    "gae: lam above 1": r"lam must be in \[0, 1\], got 1.5",
    "ppo_gae: lam NaN": r"lam must be in \[0, 1\], got nan",
    "ppo_gae: kl_coef inf": "kl_coef must be finite, got inf",
    "ppo_gae: gamma negative": "gamma must be finite and >= 0",
    "bt fwd: label_smoothing 0.7": r"label_smoothing must be in \[0, 0.5\), got 0.7",
    "bt fwd: label_smoothing NaN": r"label_smoothing must be in \[0, 0.5\), got nan",
    "bt fwd: center_coef negative": "center_coef must be finite and >= 0, got -1",
    "bt fwd: margin_value inf": "margin_value must be finite, got inf",
    "bt fwd: weight_value NaN": "weight_value must be finite, got nan",
    "bt bwd: label_smoothing 0.5": r"label_smoothing must be in \[0, 0.5\), got 0.5",
    "bt bwd: center_coef NaN": "center_coef must be finite and >= 0, got nan",
    "group: eps NaN": "eps must be finite and >= 0, got nan",
    "group: eps negative": "eps must be finite and >= 0, got -1",
    "group: f_norm 0": "f_norm must be finite and > 0, got 0",
    "group: whiten_eps negative": "whiten_eps must be finite and >= 0, got -1",
    "whiten_apply: eps negative": "eps must be finite and >= 0, got -1",
    "whiten_apply: eps NaN": "eps must be finite and >= 0, got nan",
    "kl_estimate: x_clamp inf": r"x_clamp must be finite and >= 0 \(0 = no clamp\), got inf",
    "kl_estimate: kl_clamp negative": r"kl_clamp must be finite and >= 0 \(0 = no clamp\), got -1",
    "ppo_gae: score_clip inf": r"score_clip must be finite and >= 0 \(0 = no clamp\), got inf",
    # the argument named, for every other case (what each says, reviewed when listed: 2026-12-03)
    "fwd: index rows != B (the issue's repro)": r"^index must have B = hidden_states\.size\(0\) = 2 rows",
    'fwd: weight shorter than H': r"^weight must have shape \[1, 8\]",
    'fwd: weight longer than H': r"^weight must have shape \[1, 8\]",
    'fwd: bias of the wrong size': r"^bias must have shape \[1\]",
    'fwd: weight 1-D': r"^weight must have 2 dimensions",
    'fwd: weight in another dtype': r"^weight must be float32",
    'fwd: weight not contiguous': r"^weight must be contiguous \(the Python layer makes it so\)",
    'fwd: index int32': r"^index must be int64",
    'fwd: index 2-D': r"^index must have 1 dimensions",
    'fwd: hidden 4-D': r"^hidden_states must be \[B, T, H\] or packed \[N, H\]",
    'fwd: hidden integer': r"^hidden_states must be float32, float64, bfloat16 or float16",
    'fwd: hidden without unit stride on H': r"^hidden_states needs a unit stride on H",
    'bwd: index rows != B': r"^index must have B = hidden_states\.size\(0\) = 2 rows",
    'bwd: grad of the wrong shape': r"^grad must have shape \[2, 1\]",
    'bwd: grad with too few columns': r"^grad must have shape \[2, 3\]",
    'bwd: grad in another dtype': r"^grad must be float32",
    'bwd: weight shorter than H': r"^weight must have shape \[1, 8\]",
    'index: 1-D mask': r"^attention_mask must have 2 dimensions",
    'bt fwd: rejected shorter': r"^rejected must have shape \[4\]",
    'bt fwd: margin shorter than B': r"^margin must have shape \[400\]",
    'bt fwd: weights shorter than B': r"^weights must have shape \[400\]",
    'bt fwd: margin in another dtype': r"^margin must be float32",
    'bt fwd: margin not contiguous': r"^margin must be contiguous \(the Python layer makes it so\)",
    'bt fwd: reduction code 5': r"^reduction code must be in \[0, 2\]",
    'bt fwd: reduction code -1': r"^reduction code must be in \[0, 2\]",
    'bt fwd: chosen 2-D': r"^chosen must have 1 dimensions",
    'bt fwd: rejected in another dtype': r"^rejected must have the dtype of chosen \(float32\)",
    'bt bwd: grad shorter than B (none)': r"^grad must have shape \[400\]",
    'bt bwd: grad of two elements (mean)': r"^grad of a reduced loss must have one element",
    'bt bwd: weights shorter than B': r"^weights must have shape \[400\]",
    'bt bwd: grad in another dtype': r"^grad must be float32",
    'ranking fwd: rewards 1-D': r"^rewards must have 2 dimensions",
    'ranking fwd: num_candidates shorter than B': r"^num_candidates must have shape \[400\]",
    'ranking fwd: num_candidates int32': r"^num_candidates must be int64",
    'ranking bwd: grad_rows shorter than B': r"^grad_rows must have shape \[400\]",
    'ranking bwd: grad_rows in another dtype': r"^grad_rows must be float32",
    'ppo_gae: scores shorter than B': r"^scores must have shape \[400\]",
    'ppo_gae: scores in another dtype': r"^scores must be float32",
    'ppo_gae: logprobs of another shape': r"^logprobs must be \[B, T\] = \[4, 5\]",
    'ppo_gae: mask of another shape': r"^mask must be \[B, T\] = \[4, 5\]",
    'ppo_gae: mask not bool': r"^mask must be bool",
    'ppo_gae: estimator code 9': r"^estimator code must be in \[0, 3\]",
    'ppo_gae: values in another dtype': r"^logprobs must have the dtype of values \(float64\)",
    'gae: rewards of another shape': r"^rewards must be \[B, T\] = \[4, 5\]",
    'gae: mask of another shape': r"^mask must be \[B, T\] = \[4, 5\]",
    'gae: values 3-D': r"^values must have 2 dimensions",
    'kl_estimate: estimator code 4': r"^estimator code must be in \[0, 3\]",
    'kl_estimate: ref of another shape': r"^ref_logprobs must be \[B, T\] = \[4, 5\]",
    'kl_estimate: mask of another shape': r"^mask must be \[B, T\] = \[4, 5\]",
    'row_stats: mask of another shape': r"^mask must be \[B, T\] = \[4, 5\]",
    'centered_sq: totals of 3': r"^totals must have shape \[2\]",
    'centered_sq: totals float32': r"^totals must be float64",
    'whiten_apply: sq of 2': r"^sq must have shape \[1\]",
    'group: ids shorter than B': r"^group_ids must have B = scores\.size\(0\) = 400 rows",
    'group: ids int32': r"^group_ids must be int64",
    'group: mask of 3 rows': r"^mask must be \[B, T\] with B = scores\.size\(0\) = 4",
    'group: mask not bool': r"^mask must be bool",
    'group: scores 2-D': r"^scores must have 1 dimensions",
    'group: estimator code 6': r"^estimator code must be in \[0, 5\]",
    'group: single code 2': r"^single code must be in \[0, 1\]",
    'group: id out of range': r"^group_ids must lie in \[0, B\) = \[0, 4\)",
    'group: id negative': r"^group_ids must lie in \[0, B\) = \[0, 4\)",
    'group: id equal to B': r"^group_ids must lie in \[0, B\) = \[0, 4\)",
    'reinforce: mask of 3 rows': r"^mask must be \[B, T\] = \[400, 5\]",
    'reinforce: mask shorter than T': r"^mask must be \[B, T\] = \[4, 500\]",
    'reinforce: mask not bool': r"^mask must be bool",
    'reinforce: rewards 1-D': r"^token_rewards must have 2 dimensions",
    'reinforce: baselines shorter than B': r"^baselines must have shape \[400\]",
    'reinforce: baselines float64 for float32 rewards': r"^baselines must be float32",
    'reinforce: baselines not contiguous': r"^baselines must be contiguous \(the Python layer makes it so\)",
    'reinforce: gamma negative': r"^gamma must be finite and >= 0",
    'reinforce: eps NaN': r"^eps must be finite and >= 0",
    "last_token_reward, cpu (the issue's repro)": r"^index must have shape \[B\] = \[2\] \(from hidden\)",
    'last_token_reward, cpu: weight shorter than H': r"^weight must be \[K, H\] with H = 8 \(hidden_states' last dim\)",
    'last_token_reward_backward, cpu: index rows != B': r"^index must have shape \[B\] = \[2\] \(from hidden\)",
    'bradley_terry_loss, cpu: margin shorter than B': r"^margin must have shape \[B\] = \[400\]",
    'bradley_terry_loss, cpu: weights shorter than B': r"^weights must have shape \[B\] = \[400\]",
    'reinforce_advantages, cpu: baselines shorter than B':
        r"^baselines must have shape \[B\] = \[400\] \(from token_rewards\)",
}

# Public ops routed to the C++ kernels: the same checks hold behind them.
PUBLIC_CASES = {
    "last_token_reward, cpu (the issue's repro)":
        'ops.last_token_reward(r(2, 5, 8), r(1, 8), None, full((200000,), 4), "cpu")',
    "last_token_reward, cpu: weight shorter than H":
        'ops.last_token_reward(r(2, 5, 8), r(1, 4), None, full((2,), 4), "cpu")',
    "last_token_reward_backward, cpu: index rows != B":
        'ops.last_token_reward_backward(r(200000, 1), r(2, 5, 8), r(1, 8), full((200000,), 4), True, True, True, '
        '"cpu")',
    "bradley_terry_loss, cpu: margin shorter than B":
        'ops.bradley_terry_loss(r(400), r(400), r(2), None, 0.0, 1.0, 0.0, 0.0, "mean", "cpu")',
    "bradley_terry_loss, cpu: weights shorter than B":
        'ops.bradley_terry_loss(r(400), r(400), None, r(2), 0.0, 1.0, 0.0, 0.0, "none", "cpu")',
    "reinforce_advantages, cpu: baselines shorter than B":
        'ops.reinforce_advantages(r(400, 5), b(400, 5), r(2), 1.0, True, 1e-8, "cpu")',
}

# Index values out of range: no access, and NaN rewards / no gradient for those rows (the module
# docstring; rmkernels/ops/pooling.py: the data checks - a row with no valid token, a length out of
# range, a malformed cu_seqlens - are the index ops', which make the index; a kernel takes an index
# value out of range as no valid token). One outcome per case and backend: the call returns, and each
# output shows which rows had no valid token (INDEX_VALUE_OUTCOMES). The C++ CPU kernel ops here, the
# Triton host functions in TRITON_INDEX_VALUE_CASES.
INDEX_VALUE_CASES = {
    "fwd: index past T and negative": "ops.last_token_reward_fwd_kernel(r(2, 5, 8), r(1, 8), None, i64([5, -3]))",
    "fwd: packed index past N": "ops.last_token_reward_fwd_kernel(r(6, 8), r(1, 8), None, i64([2, 6, 10**12]))",
    "bwd: index past T": "ops.last_token_reward_bwd_kernel(r(2, 1), r(2, 5, 8), r(1, 8), i64([5, 10**15]), "
                         "True, True, True)",
    "bwd: packed index past N": "ops.last_token_reward_bwd_kernel(r(3, 1), r(6, 8), r(1, 8), i64([-2, 6, 1]), "
                                "True, True, True)",
}

# Per output of each case, ("nan", rows): which rows (dim 0) are all NaN - the rewards of the rows
# with no valid token, and no other -, or ("zero", rows): which rows are all zero - the gradients:
# grad_hidden is zero but at the picked token of a valid row, and a row with no valid token adds
# nothing to grad_weight / grad_bias ([K, H] / [K], K = 1: one row each).
INDEX_VALUE_OUTCOMES = {
    "fwd: index past T and negative": [("nan", [True, True])],
    "fwd: packed index past N": [("nan", [False, True, True])],
    "bwd: index past T": [("zero", [True, True]), ("zero", [True]), ("zero", [True])],
    "bwd: packed index past N": [("zero", [True, False, True, True, True, True]), ("zero", [False]),
                                 ("zero", [False])],
    # group ids out of [0, B): Triton only. The Triton host does not check id values (that would be a
    # host synchronisation: rmkernels/triton/group_adv.py, _check_args) and gives those rows NaN
    # (docs/ops.md section 5); the C++ CPU kernel op checks them and raises (op_checks.h:
    # check_group_advantages_args; KERNEL_CASES "group: id out of range" / "id negative" / "id equal
    # to B", with their messages). Outputs: (sequence advantages [B], token advantages [B, T]).
    "group: id out of range": [("nan", [True] * 4), ("nan", [True] * 4)],
    "group: id negative": [("nan", [True] * 4), ("nan", [True] * 4)],
    "group: id equal to B": [("nan", [False, False, False, True]), ("nan", [False, False, False, True])],
}

TRITON_CASES = {
    "fwd: index rows != B": "tp.last_token_reward_fwd(r(2, 5, 8), r(1, 8), None, full((200000,), 4))",
    "fwd: weight shorter than H": "tp.last_token_reward_fwd(r(2, 5, 8), r(1, 4), None, full((2,), 4))",
    "fwd: bias of the wrong size": "tp.last_token_reward_fwd(r(2, 5, 8), r(1, 8), r(3), full((2,), 4))",
    "bwd: grad of the wrong shape": "tp.last_token_reward_bwd(r(3, 1), r(2, 5, 8), r(1, 8), full((2,), 4), True, "
                                    "True, True)",
    "bwd: index rows != B": "tp.last_token_reward_bwd(r(200000, 1), r(2, 5, 8), r(1, 8), full((200000,), 4), True, "
                            "True, True)",
    "index: 1-D mask": "tp.last_token_index(r(5))",
    "bt fwd: margin shorter than B": "tb.bt_loss_fwd(r(400), r(400), r(2), None, 0.0, 1.0, 0.0, 0.0, 0)",
    "bt fwd: weights shorter than B": "tb.bt_loss_fwd(r(400), r(400), None, r(2), 0.0, 1.0, 0.0, 0.0, 1)",
    "bt fwd: reduction code 5": "tb.bt_loss_fwd(r(4), r(4), None, None, 0.0, 1.0, 0.0, 0.0, 5)",
    "bt bwd: grad shorter than B": "tb.bt_loss_bwd(r(3), r(400), r(400), None, None, 0.0, 1.0, 0.0, 0.0, 0, True, "
                                   "True)",
    "ranking fwd: num_candidates shorter than B": "tb.ranking_loss_fwd(r(400, 3), full((2,), 3))",
    "ranking bwd: grad_rows shorter than B": "tb.ranking_loss_bwd(r(3), r(400, 3), None)",
    "ppo_gae: scores shorter than B":
        "tq.ppo_gae(r(400, 5), r(400, 5), r(400, 5), r(2), b(400, 5), 0.1, 1.0, 0.95, 0, 0.0, 0.0, 0.0)",
    "ppo_gae: estimator code 9":
        "tq.ppo_gae(r(4, 5), r(4, 5), r(4, 5), r(4), b(4, 5), 0.1, 1.0, 0.95, 9, 0.0, 0.0, 0.0)",
    "gae: rewards of another shape": "tq.gae(r(4, 3), r(4, 5), b(4, 5), 1.0, 0.95, True)",
    "kl_estimate: estimator code 4": "tq.kl_estimate(r(4, 5), r(4, 5), None, 4, 0.0, 0.0)",
    "centered_sq: totals of 3": "tq.masked_centered_sq(r(4, 5), b(4, 5), f(3))",
    "whiten_apply: sq of 2": "tq.masked_whiten_apply(r(4, 5), b(4, 5), f(2), f(2), True, True, 1e-8)",
    "reinforce: mask of 3 rows": "tq.reinforce(r(400, 5), b(3, 5), None, 1.0, True, 1e-8)",
    "reinforce: baselines shorter than B": "tq.reinforce(r(400, 5), b(400, 5), r(2), 1.0, True, 1e-8)",
    "reinforce: gamma negative": "tq.reinforce(r(4, 5), b(4, 5), None, -1.0, True, 1e-8)",
    # token log-probs (rmkernels/triton/token_logprobs.py: _check_args, the C++ check_args' checks)
    "logprobs fwd: targets longer than N": "tt.token_logprobs_fwd(r(2, 4), r(5, 4), None, full((20000,), 1), 1.0, "
                                           "-100, 64, 64)",
    "logprobs fwd: weight shorter than H": "tt.token_logprobs_fwd(r(2, 3, 64), r(5, 4), None, full((2, 3), 1), 1.0, "
                                           "-100, 64, 64)",
    "logprobs fwd: bias of the wrong size": "tt.token_logprobs_fwd(r(2, 3, 4), r(500, 4), r(2), full((2, 3), 1), "
                                            "1.0, -100, 64, 64)",
    "logprobs fwd: bias float64": "tt.token_logprobs_fwd(r(2, 3, 4), r(5, 4), f(5), full((2, 3), 1), 1.0, -100, 64, "
                                  "64)",
    "logprobs fwd: hidden int64": "tt.token_logprobs_fwd(i(2, 3, 4), i(5, 4), None, full((2, 3), 1), 1.0, -100, 64, "
                                  "64)",
    "logprobs fwd: targets int32": "tt.token_logprobs_fwd(r(2, 3, 4), r(5, 4), None, full((2, 3), 1, torch.int32), "
                                   "1.0, -100, 64, 64)",
    "logprobs fwd: weight without unit stride on H": "tt.token_logprobs_fwd(r(2, 3, 4), r(4, 5).t(), None, "
                                                     "full((2, 3), 1), 1.0, -100, 64, 64)",
    "logprobs fwd: temperature 0": "tt.token_logprobs_fwd(r(2, 3, 4), r(5, 4), None, full((2, 3), 1), 0.0, -100, 64, "
                                   "64)",
    "logprobs fwd: temperature 1e-300": "tt.token_logprobs_fwd(r(2, 3, 4), r(5, 4), None, full((2, 3), 1), 1e-300, "
                                        "-100, 64, 64)",
    "logprobs bwd: lse shorter than N": "tt.token_logprobs_bwd(r(200), None, r(200, 4), r(5, 4), None, "
                                        "full((200,), 1), r(2), r(200), 1.0, -100, 64, 64, True, True, True)",
    "logprobs bwd: lse float64": "tt.token_logprobs_bwd(r(2, 3), None, r(2, 3, 4), r(5, 4), None, full((2, 3), 1), "
                                 "f(2, 3), r(2, 3), 1.0, -100, 64, 64, True, True, True)",
    "logprobs bwd: token_chunk 0": "tt.token_logprobs_bwd(r(2), None, r(2, 4), r(5, 4), None, full((2,), 1), r(2), "
                                   "r(2), 1.0, -100, 0, 64, True, True, True)",
    # group advantages (rmkernels/triton/group_adv.py: _check_args)
    "group: scores shorter than B": "tg.group_advantages(r(2), full((400,), 0), b(400, 5), 0, 1e-6, True, 0, 1.0, "
                                    "1e-8, programs=1)",
    "group: ids shorter than B": "tg.group_advantages(r(400), full((2,), 0), b(400, 5), 0, 1e-6, True, 0, 1.0, 1e-8, "
                                 "programs=1)",
    "group: estimator code 99": "tg.group_advantages(r(4), full((4,), 0), b(4, 5), 99, 1e-6, True, 0, 1.0, 1e-8, "
                                "programs=1)",
    "group: single code 7": "tg.group_advantages(r(4), full((4,), 0), b(4, 5), 0, 1e-6, True, 7, 1.0, 1e-8, "
                            "programs=1)",
    "group: mask 1-D": "tg.group_advantages(r(4), full((4,), 0), b(4), 0, 1e-6, True, 0, 1.0, 1e-8, programs=1)",
    "group: eps NaN": "tg.group_advantages(r(4), full((4,), 0), b(4, 5), 0, float('nan'), True, 0, 1.0, 1e-8, "
                      "programs=1)",
    "group: f_norm 0": "tg.group_advantages(r(4), full((4,), 0), b(4, 5), 4, 1e-6, True, 0, 0.0, 1e-8, programs=1)",
    "group: whiten_eps negative": "tg.group_advantages(r(4), full((4,), 0), b(4, 5), 5, 1e-6, True, 0, 1.0, -1.0, "
                                  "programs=1)",
    # float options (the public functions' rules: ops/gae.py check_discount, ...)
    "gae: gamma NaN": "tq.gae(r(4, 5), r(4, 5), b(4, 5), float('nan'), 0.95, True)",
    "gae: lam negative": "tq.gae(r(4, 5), r(4, 5), b(4, 5), 1.0, -3.0, True)",
    "ppo_gae: gamma NaN":
        "tq.ppo_gae(r(4, 5), r(4, 5), r(4, 5), r(4), b(4, 5), 0.1, float('nan'), 0.95, 0, 0.0, 0.0, 0.0)",
    "ppo_gae: kl_coef inf":
        "tq.ppo_gae(r(4, 5), r(4, 5), r(4, 5), r(4), b(4, 5), float('inf'), 1.0, 0.95, 0, 0.0, 0.0, 0.0)",
    "whiten_apply: eps negative": "tq.masked_whiten_apply(r(4, 5), b(4, 5), f(2), f(1), True, True, -1.0)",
    "bt fwd: label_smoothing NaN": "tb.bt_loss_fwd(r(4), r(4), None, None, 0.0, 1.0, float('nan'), 0.0, 1)",
    "bt bwd: center_coef negative": "tb.bt_loss_bwd(r(()), r(4), r(4), None, None, 0.0, 1.0, 0.0, -1.0, 1, True, "
                                    "True)",
    "kl_estimate: x_clamp inf": "tq.kl_estimate(r(4, 5), r(4, 5), None, 0, float('inf'), 0.0)",
    "ppo_gae: score_clip inf":
        "tq.ppo_gae(r(4, 5), r(4, 5), r(4, 5), r(4), b(4, 5), 0.1, 1.0, 0.95, 0, 0.0, 0.0, float('inf'))",
    "bt fwd: margin_value inf": "tb.bt_loss_fwd(r(4), r(4), None, None, float('inf'), 1.0, 0.0, 0.0, 1)",
    "bt fwd: weight_value NaN": "tb.bt_loss_fwd(r(4), r(4), None, None, 0.0, float('nan'), 0.0, 0.0, 1)",
}

TRITON_INDEX_VALUE_CASES = {
    "fwd: index past T and negative": "tp.last_token_reward_fwd(r(2, 5, 8), r(1, 8), None, i64([5, -3]))",
    "fwd: packed index past N": "tp.last_token_reward_fwd(r(6, 8), r(1, 8), None, i64([2, 6, 10**12]))",
    "bwd: index past T": "tp.last_token_reward_bwd(r(2, 1), r(2, 5, 8), r(1, 8), i64([5, 10**15]), True, True, True)",
    "bwd: packed index past N": "tp.last_token_reward_bwd(r(3, 1), r(6, 8), r(1, 8), i64([-2, 6, 1]), True, True, "
                                "True)",
    "group: id out of range": "tg.group_advantages(r(4), full((4,), 400000), ones(4, 5), 0, 1e-6, True, 0, 1.0, "
                              "1e-8, programs=1)",
    "group: id negative": "tg.group_advantages(r(4), full((4,), -1), ones(4, 5), 0, 1e-6, True, 0, 1.0, 1e-8, "
                          "programs=1)",
    "group: id equal to B": "tg.group_advantages(r(4), i64([0, 0, 1, 4]), ones(4, 5), 0, 1e-6, True, 0, 1.0, 1e-8, "
                            "programs=1)",
}
assert set(INDEX_VALUE_CASES) | set(TRITON_INDEX_VALUE_CASES) == set(INDEX_VALUE_OUTCOMES)
assert not set(TRITON_INDEX_VALUE_CASES) & set(TRITON_CASES)
# the C++ side of the group-id cases: a raise, with its message (test_bad_call_raises)
assert all(n in KERNEL_CASES and n in KERNEL_MESSAGES for n in TRITON_INDEX_VALUE_CASES if n.startswith("group"))

# What the message of each Triton case must say (the argument named, and what was given); every
# case has one (test_triton_host_functions_raise).
TRITON_MESSAGES = {
    "fwd: index rows != B": r"^index must have B = hidden_states\.size\(0\) = 2 rows, got 200000",
    "fwd: weight shorter than H": r"^weight must be \[K, H\] with H = 8 \(hidden_states' last dim\), got shape "
                                  r"\[1, 4\]",
    "fwd: bias of the wrong size": r"^bias must have shape \[1\], got \[3\]",
    "bwd: grad of the wrong shape": r"^grad must have shape \[2, 1\], got \[3, 1\]",
    "bwd: index rows != B": r"^index must have B = hidden_states\.size\(0\) = 2 rows, got 200000",
    "index: 1-D mask": r"^attention_mask must have 2 dimensions, got shape \[5\]",
    "bt fwd: margin shorter than B": r"^margin must have shape \[400\], got \[2\]",
    "bt fwd: weights shorter than B": r"^weights must have shape \[400\], got \[2\]",
    "bt fwd: reduction code 5": r"^reduction must be a Reduction code \[0, 1, 2\], got 5",
    "bt bwd: grad shorter than B": r"^grad must have shape \[400\], got \[3\]",
    "ranking fwd: num_candidates shorter than B": r"^num_candidates must have shape \[400\], got \[2\]",
    "ranking bwd: grad_rows shorter than B": r"^grad_rows must have shape \[400\], got \[3\]",
    "ppo_gae: scores shorter than B": r"^scores must have shape \[400\], got \[2\]",
    "ppo_gae: estimator code 9": r"^estimator must be a KLEstimator code \[0, 1, 2, 3\], got 9",
    "gae: rewards of another shape": r"^rewards must have shape \[4, 5\], got \[4, 3\]",
    "kl_estimate: estimator code 4": r"^estimator must be a KLEstimator code \[0, 1, 2, 3\], got 4",
    "centered_sq: totals of 3": r"^totals must have shape \[2\], got \[3\]",
    "whiten_apply: sq of 2": r"^sq must have shape \[1\], got \[2\]",
    "reinforce: mask of 3 rows": r"^mask must have shape \[400, 5\], got \[3, 5\]",
    "reinforce: baselines shorter than B": r"^baselines must have shape \[400\], got \[2\]",
    "reinforce: gamma negative": r"^gamma must be in \[0\.0, inf\), got -1\.0",
    "logprobs fwd: targets longer than N": r"^targets must have shape \[2\], got \[20000\]",
    "logprobs fwd: weight shorter than H": r"^weight must be \[V, H\] with V >= 1 and H = 64",
    "logprobs fwd: bias of the wrong size": r"^bias must have shape \[500\], got \[2\]",
    "logprobs fwd: bias float64": "^bias must be torch.float32, got torch.float64",
    "logprobs fwd: hidden int64": "^hidden must be one of .*, got torch.int64",
    "logprobs fwd: targets int32": "^targets must be torch.int64, got torch.int32",
    "logprobs fwd: weight without unit stride on H": "^weight needs a unit stride on H",
    "logprobs fwd: temperature 0": "^temperature must be in",
    "logprobs fwd: temperature 1e-300": "^temperature must be >= .*got 1e-300",
    "logprobs bwd: lse shorter than N": r"^lse must have shape \[200\], got \[2\]",
    "logprobs bwd: lse float64": "^lse must be torch.float32, got torch.float64",
    "logprobs bwd: token_chunk 0": "^token_chunk must be an int >= 1, got 0",
    "group: scores shorter than B": r"^group_ids must have B = scores\.size\(0\) = 2 rows, got 400",
    "group: ids shorter than B": r"^group_ids must have B = scores\.size\(0\) = 400 rows, got 2",
    "group: estimator code 99": "^estimator must be a GroupEstimator code .*got 99",
    "group: single code 7": "^single must be a GroupSingle code .*got 7",
    "group: mask 1-D": r"^mask must have 2 dimensions, got shape \[4\]",
    "group: eps NaN": "^eps must be in .*got nan",
    "group: f_norm 0": "^f_norm must be in .*got 0.0",
    "group: whiten_eps negative": "^whiten_eps must be in .*got -1.0",
    "gae: gamma NaN": "^gamma must be in .*got nan",
    "gae: lam negative": "^lam must be in .*got -3.0",
    "ppo_gae: gamma NaN": "^gamma must be in .*got nan",
    "ppo_gae: kl_coef inf": "^kl_coef must be in .*got inf",
    "whiten_apply: eps negative": "^eps must be in .*got -1.0",
    "bt fwd: label_smoothing NaN": "^label_smoothing must be in .*got nan",
    "bt bwd: center_coef negative": "^center_coef must be in .*got -1.0",
    "kl_estimate: x_clamp inf": "^x_clamp must be in .*got inf",
    "ppo_gae: score_clip inf": "^score_clip must be in .*got inf",
    "bt fwd: margin_value inf": "^margin_value must be in .*got inf",
    "bt fwd: weight_value NaN": "^weight_value must be in .*got nan",
}
assert set(TRITON_MESSAGES) == set(TRITON_CASES), "a Triton case without its message, or a message without its case"

_RUNNER = textwrap.dedent("""
    import json, sys, torch
    import rmkernels
    ops = torch.ops.rmkernels
    r = lambda *s: torch.randn(*s)
    f = lambda *s: torch.randn(*s, dtype=torch.float64)
    i = lambda *s: torch.randint(0, 5, s)
    b = lambda *s: torch.rand(*s) > 0.3
    c = lambda *s: torch.randn(*s, dtype=torch.complex64)
    i64 = lambda v: torch.tensor(v, dtype=torch.int64)
    full = lambda shape, v, dtype=torch.int64: torch.full(shape, v, dtype=dtype)
    ones = lambda *s: torch.ones(*s, dtype=torch.bool)
    if {triton}:
        from rmkernels.triton import bt_loss as tb, group_adv as tg, pooling as tp, ppo as tq, token_logprobs as tt
    for name, expr in json.loads(sys.stdin.read()):
        print("START " + json.dumps(name), flush=True)
        try:
            out = eval(expr)
        except Exception as e:
            print("RAISED " + json.dumps([type(e).__name__, str(e).splitlines()[0] if str(e) else ""]), flush=True)
        else:
            outs = out if isinstance(out, tuple) else (out,)
            rows = lambda m: (m.flatten(1).all(1) if m.dim() > 1 else m).tolist() if m.dim() else bool(m)
            print("RETURNED " + json.dumps([[rows(t.isnan()), rows(t == 0)] for t in outs]), flush=True)
""")


def _run(cases, triton=False):
    """{name: ("RAISED", [type, message]) | ("RETURNED", info) | ("CRASHED", detail)} for every case;
    info: [nan rows, zero rows] of each output (which rows, dim 0, are all NaN / all zero)."""
    env = subprocess_env(TRITON_INTERPRET="1" if triton else None)
    proc = subprocess.run([sys.executable, "-c", _RUNNER.format(triton=triton)], input=json.dumps(list(cases.items())),
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    results, current = {}, None
    for line in proc.stdout.splitlines():
        kind, _, payload = line.partition(" ")
        if kind == "START":
            current = json.loads(payload)
        elif kind in ("RAISED", "RETURNED"):
            results[current] = (kind, json.loads(payload))
            current = None
    if current is not None or proc.returncode != 0:
        results[current] = ("CRASHED", f"exit code {proc.returncode}; stderr: {proc.stderr[-2000:]}")
    return results


@pytest.fixture(scope="module")
def cpu_results():
    return _run({**KERNEL_CASES, **PUBLIC_CASES, **INDEX_VALUE_CASES, **VALID_CASES})


@pytest.mark.parametrize("name", list(KERNEL_CASES) + list(PUBLIC_CASES))
def test_bad_call_raises(cpu_results, name):
    assert name in cpu_results, f"{name}: never ran (a previous case crashed the process?) {cpu_results.get(None)}"
    kind, info = cpu_results[name]
    assert kind != "CRASHED", f"{name}: the process crashed: {info}"
    assert kind == "RAISED", f"{name}: the bad call returned instead of raising"
    assert info[0] in ("ValueError", "TypeError"), f"{name}: {info}"
    want = KERNEL_MESSAGES.get(name) or NONE_MESSAGES.get(name)
    assert want, f"{name}: no expected message in KERNEL_MESSAGES"
    assert re.search(want, info[1]), f"{name}: the message does not say {want!r}: {info}"


@pytest.mark.parametrize("name", list(VALID_CASES))
def test_valid_kernel_calls_run(cpu_results, name):
    """The calls the None cases start from are valid: each None case changes one argument only."""
    assert cpu_results.get(name, ("never ran",))[0] == "RETURNED", f"{name}: {cpu_results.get(name)}"


def _assert_no_valid_token(results, name):
    """The case returned, and each output shows INDEX_VALUE_OUTCOMES[name]'s rows."""
    assert name in results, f"{name}: never ran {results.get(None)}"
    kind, info = results[name]
    assert kind != "CRASHED", f"{name}: the process crashed: {info}"
    assert kind == "RETURNED", f"{name}: an index value out of range must be no valid token, not an error: {info}"
    want = INDEX_VALUE_OUTCOMES[name]
    assert len(info) == len(want), f"{name}: {len(info)} outputs, expected {len(want)}"
    for k, ((nan_rows, zero_rows), (what, rows)) in enumerate(zip(info, want)):
        got = nan_rows if what == "nan" else zero_rows
        assert got == rows, f"{name}: output {k}: rows all {what} {got}, expected {rows}"


@pytest.mark.parametrize("name", list(INDEX_VALUE_CASES))
def test_index_values_out_of_range_are_no_valid_token(cpu_results, name):
    _assert_no_valid_token(cpu_results, name)


@pytest.mark.triton
@pytest.mark.parametrize("name", list(TRITON_INDEX_VALUE_CASES))
def test_triton_index_values_out_of_range_are_no_valid_token(triton_results, name):
    _assert_no_valid_token(triton_results, name)


def test_bwd_ignores_out_of_range_indices():
    """In process (the subprocess above shows it cannot crash): rows with an index out of range
    get no gradient and add nothing to grad_weight / grad_bias."""
    import torch

    import rmkernels  # noqa: F401  (registers torch.ops.rmkernels: the test must pass on its own)

    hidden, w = torch.randn(3, 5, 8), torch.randn(2, 8)
    grad = torch.randn(3, 2)
    idx = torch.tensor([5, 2, -1])
    g_h, g_w, g_b = torch.ops.rmkernels.last_token_reward_bwd_kernel(grad, hidden, w, idx, True, True, True)
    assert g_h[0].abs().sum() == 0 and g_h[2].abs().sum() == 0
    torch.testing.assert_close(g_h[1, 2], grad[1] @ w)
    torch.testing.assert_close(g_w, grad[1:2].t() @ hidden[1, 2:3])
    torch.testing.assert_close(g_b, grad[1])


@pytest.mark.triton
@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_triton_host_functions_raise(name, triton_results):
    assert name in triton_results, f"{name}: never ran {triton_results.get(None)}"
    kind, info = triton_results[name]
    assert kind != "CRASHED", f"{name}: the process crashed: {info}"
    assert kind == "RAISED", f"{name}: the bad call returned instead of raising"
    assert info[0] in ("ValueError", "TypeError"), f"{name}: {info}"
    want = TRITON_MESSAGES[name]
    assert re.search(want, info[1]), f"{name}: the message does not say {want!r}: {info}"


@pytest.fixture(scope="module")
def triton_results():
    pytest.importorskip("triton")
    return _run({**TRITON_CASES, **TRITON_INDEX_VALUE_CASES}, triton=True)


def test_token_logprobs_kernels_take_inputs_that_require_grad():
    """Like every other kernel op, the token log-probs kernels read inputs that require grad as
    data (they have no autograd; before, ATen's mm out= refused them with an error naming no
    argument)."""
    import torch

    import rmkernels  # noqa: F401  (defines the ops)

    ops = torch.ops.rmkernels
    hidden, weight, bias = torch.randn(2, 3, 4), torch.randn(5, 4), torch.randn(5)
    targets = torch.tensor([[1, 4, -100], [0, 2, 3]])
    args = (targets, 1.3, -100, 2, 3)
    want = ops.token_logprobs_fwd_kernel(hidden, weight, bias, *args)
    got = ops.token_logprobs_fwd_kernel(hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), *args)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    lp, ent, lse = want
    g_lp, g_ent = torch.randn(2, 3), torch.randn(2, 3)
    bwd = (hidden, weight, bias, targets, lse, ent, 1.3, -100, 2, 3, True, True, True)
    got = ops.token_logprobs_bwd_kernel(g_lp.requires_grad_(), g_ent, *bwd)
    want = ops.token_logprobs_bwd_kernel(g_lp.detach(), g_ent, *(t.detach() if isinstance(t, torch.Tensor) else t
                                                                 for t in bwd))
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_kernel_op_without_a_kernel_for_the_device_says_so():
    """Without ``_C`` (here: its import blocked) no CPU kernel is registered: a direct kernel-op
    call on CPU tensors reaches the fallback, which says why (it was the dispatcher's
    NotImplementedError listing dispatch keys)."""
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["rmkernels._C"] = None
        warnings.simplefilter("ignore")
        import torch, rmkernels
        assert not rmkernels._ext.CPP_AVAILABLE
        r = torch.randn(2, 3)
        try:
            torch.ops.rmkernels.gae_kernel(r, r, r > 0, 1.0, 0.95, True)
        except RuntimeError as e:
            print("RAISED", e)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"^RAISED rmkernels::gae_kernel has no kernel for tensors on cpu \(the compiled extension is "
                     r"not loaded: .+\); the public ops run on the reference or Triton backends there",
                     proc.stdout), proc.stdout
