"""Every ``torch.ops.rmkernels.*`` op and its schema, pinned.

The op schemas are public (compile, export and dispatch modes call the ops directly): a
restructure of the Python op layer must not change one silently. Adding an op means adding
its schema to ``SCHEMAS`` here (and to ``rmkernels/ops/_schemas.py``).
"""
import torch

import rmkernels  # noqa: F401  (defines every op)

SCHEMAS = {
    "bradley_terry_loss": (
        "bradley_terry_loss(Tensor chosen, Tensor rejected, Tensor? margin, Tensor? weights, float margin_value, "
        "float weight_value, float label_smoothing, float center_coef, str reduction, str backend) -> Tensor"),
    "bradley_terry_loss_backward": (
        "bradley_terry_loss_backward(Tensor grad, Tensor chosen, Tensor rejected, Tensor? margin, "
        "Tensor? weights, float margin_value, float weight_value, float label_smoothing, float center_coef, "
        "str reduction, bool need_chosen, bool need_rejected, str backend) -> (Tensor, Tensor)"),
    "bt_loss_bwd_kernel": (
        "bt_loss_bwd_kernel(Tensor grad, Tensor chosen, Tensor rejected, Tensor? margin, Tensor? weights, "
        "float margin_value, float weight_value, float label_smoothing, float center_coef, int reduction, "
        "bool need_chosen, bool need_rejected) -> (Tensor, Tensor)"),
    "bt_loss_fwd_kernel": (
        "bt_loss_fwd_kernel(Tensor chosen, Tensor rejected, Tensor? margin, Tensor? weights, float margin_value, "
        "float weight_value, float label_smoothing, float center_coef, int reduction) -> Tensor"),
    "last_token_index": "last_token_index(Tensor mask, str backend) -> Tensor",
    "last_token_index_kernel": "last_token_index_kernel(Tensor mask) -> Tensor",
    "last_token_reward": (
        "last_token_reward(Tensor hidden, Tensor weight, Tensor? bias, Tensor index, str backend) -> Tensor"),
    "last_token_reward_backward": (
        "last_token_reward_backward(Tensor grad, Tensor hidden, Tensor weight, Tensor index, bool need_hidden, "
        "bool need_weight, bool need_bias, str backend) -> (Tensor, Tensor, Tensor)"),
    "last_token_reward_bwd_kernel": (
        "last_token_reward_bwd_kernel(Tensor grad, Tensor hidden, Tensor weight, Tensor index, bool need_hidden, "
        "bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)"),
    "last_token_reward_fwd_kernel": (
        "last_token_reward_fwd_kernel(Tensor hidden, Tensor weight, Tensor? bias, Tensor index) -> Tensor"),
    "masked_centered_sq": "masked_centered_sq(Tensor x, Tensor mask, Tensor totals, str backend) -> Tensor",
    "masked_centered_sq_kernel": "masked_centered_sq_kernel(Tensor x, Tensor mask, Tensor totals) -> Tensor",
    "masked_row_stats": "masked_row_stats(Tensor x, Tensor mask, str backend) -> Tensor",
    "masked_row_stats_kernel": "masked_row_stats_kernel(Tensor x, Tensor mask) -> Tensor",
    "masked_whiten": (
        "masked_whiten(Tensor x, Tensor mask, bool shift_mean, bool unbiased, float eps, str backend) -> Tensor"),
    "masked_whiten_apply": (
        "masked_whiten_apply(Tensor x, Tensor mask, Tensor totals, Tensor sq, bool shift_mean, bool unbiased, "
        "float eps, str backend) -> Tensor"),
    "masked_whiten_apply_kernel": (
        "masked_whiten_apply_kernel(Tensor x, Tensor mask, Tensor totals, Tensor sq, bool shift_mean, "
        "bool unbiased, float eps) -> Tensor"),
    "pairwise_reward_loss": (
        "pairwise_reward_loss(Tensor hidden, Tensor weight, Tensor? bias, Tensor index, Tensor? margin, "
        "Tensor? weights, float margin_value, float weight_value, float label_smoothing, float center_coef, "
        "str reduction, str backend) -> (Tensor, Tensor)"),
    "pairwise_reward_loss_backward": (
        "pairwise_reward_loss_backward(Tensor grad_loss, Tensor? grad_rewards, Tensor rewards, Tensor hidden, "
        "Tensor weight, Tensor index, Tensor? margin, Tensor? weights, float margin_value, float weight_value, "
        "float label_smoothing, float center_coef, str reduction, bool need_hidden, bool need_weight, "
        "bool need_bias, str backend) -> (Tensor, Tensor, Tensor)"),
    "ppo_advantages": (
        "ppo_advantages(Tensor logprobs, Tensor ref_logprobs, Tensor values, Tensor scores, Tensor mask, "
        "float kl_coef, float gamma, float lam, str kl_estimator, float? kl_clamp, float? score_clip, "
        "bool whiten, bool shift_mean, bool unbiased, float eps, str backend) -> (Tensor, Tensor, Tensor, Tensor)"),
    "ppo_gae": (
        "ppo_gae(Tensor logprobs, Tensor ref_logprobs, Tensor values, Tensor scores, Tensor mask, float kl_coef, "
        "float gamma, float lam, str kl_estimator, float? kl_clamp, float? score_clip, str backend) -> (Tensor, "
        "Tensor, Tensor, Tensor, Tensor)"),
    "ppo_gae_kernel": (
        "ppo_gae_kernel(Tensor logprobs, Tensor ref_logprobs, Tensor values, Tensor scores, Tensor mask, "
        "float kl_coef, float gamma, float lam, int estimator, float x_clamp, float kl_clamp, "
        "float score_clip) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"),
    "ranking_loss": "ranking_loss(Tensor rewards, Tensor? num_candidates, str reduction, str backend) -> Tensor",
    "ranking_loss_backward": (
        "ranking_loss_backward(Tensor grad, Tensor rewards, Tensor? num_candidates, str reduction, "
        "str backend) -> Tensor"),
    "ranking_loss_bwd_kernel": (
        "ranking_loss_bwd_kernel(Tensor grad_rows, Tensor rewards, Tensor? num_candidates) -> Tensor"),
    "ranking_loss_fwd_kernel": "ranking_loss_fwd_kernel(Tensor rewards, Tensor? num_candidates) -> Tensor",
    # added with the op registry: the building blocks (docs/ops.md) and the index ops that hold
    # the data checks of the pooling inputs
    "check_mask_index": "check_mask_index(Tensor index, SymInt n_tokens, str name) -> Tensor",
    "cu_seqlens_index": "cu_seqlens_index(Tensor cu_seqlens, SymInt n_tokens) -> Tensor",
    "lengths_index": "lengths_index(Tensor lengths, SymInt n_tokens) -> Tensor",
    "gae": "gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam, str backend) -> (Tensor, Tensor)",
    "gae_kernel": ("gae_kernel(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam, bool returns) "
                   "-> (Tensor, Tensor)"),
    "kl_estimate": (
        "kl_estimate(Tensor logprobs, Tensor ref_logprobs, Tensor? mask, str estimator, float? clamp, "
        "str backend) -> Tensor"),
    "kl_estimate_kernel": (
        "kl_estimate_kernel(Tensor logprobs, Tensor ref_logprobs, Tensor? mask, int estimator, float x_clamp, "
        "float kl_clamp) -> Tensor"),
    # critic-free group advantages (ops/group_adv.py)
    "group_advantages": (
        "group_advantages(Tensor scores, Tensor group_ids, Tensor mask, str estimator, float eps, bool unbiased, "
        "str single, float f_norm, float whiten_eps, str backend) -> (Tensor, Tensor)"),
    "group_advantages_kernel": (
        "group_advantages_kernel(Tensor scores, Tensor group_ids, Tensor mask, int estimator, float eps, "
        "bool unbiased, int single, float f_norm, float whiten_eps) -> (Tensor, Tensor)"),
    "reinforce_pp_returns": (
        "reinforce_pp_returns(Tensor token_rewards, Tensor mask, float gamma, str backend) -> Tensor"),
    "reinforce_advantages": (
        "reinforce_advantages(Tensor token_rewards, Tensor mask, Tensor? baselines, float gamma, bool unbiased, "
        "float eps, str backend) -> (Tensor, Tensor)"),
    "reinforce_kernel": (
        "reinforce_kernel(Tensor token_rewards, Tensor mask, Tensor? baselines, float gamma, bool unbiased, "
        "float eps) -> (Tensor, Tensor)"),
    # token log-probs / entropy from hidden states (ops/token_logprobs.py)
    "token_logprobs": (
        "token_logprobs(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, float temperature, "
        "int ignore_index, str backend) -> (Tensor, Tensor, Tensor)"),
    "token_logprobs_backward": (
        "token_logprobs_backward(Tensor grad_logprobs, Tensor? grad_entropy, Tensor hidden, Tensor weight, "
        "Tensor? bias, Tensor targets, Tensor lse, Tensor entropy, float temperature, int ignore_index, "
        "bool need_hidden, bool need_weight, bool need_bias, str backend) -> (Tensor, Tensor, Tensor)"),
    "token_logprobs_fwd_kernel": (
        "token_logprobs_fwd_kernel(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, float temperature, "
        "int ignore_index, int token_chunk, int vocab_chunk) -> (Tensor, Tensor, Tensor)"),
    "token_logprobs_bwd_kernel": (
        "token_logprobs_bwd_kernel(Tensor grad_logprobs, Tensor? grad_entropy, Tensor hidden, Tensor weight, "
        "Tensor? bias, Tensor targets, Tensor lse, Tensor entropy, float temperature, int ignore_index, "
        "int token_chunk, int vocab_chunk, bool need_hidden, bool need_weight, bool need_bias) "
        "-> (Tensor, Tensor, Tensor)"),
}


def _namespace_ops():
    ns = torch.ops.rmkernels
    return {n: getattr(ns, n) for n in dir(ns)
            if not n.startswith("_") and isinstance(getattr(ns, n), torch._ops.OpOverloadPacket)}


def test_every_op_is_pinned():
    """No op appears or disappears without this table saying so."""
    ops = _namespace_ops()
    assert sorted(ops) == sorted(SCHEMAS), (
        f"new ops (add their schema here): {sorted(set(ops) - set(SCHEMAS))}; "
        f"missing ops: {sorted(set(SCHEMAS) - set(ops))}")


def test_schemas_unchanged():
    ops = _namespace_ops()
    for name, schema in SCHEMAS.items():
        assert name in ops, f"rmkernels::{name} is not defined"
        packet = ops[name]
        assert packet.overloads() == ["default"], f"rmkernels::{name} has overloads {packet.overloads()}"
        assert str(packet.default._schema) == f"rmkernels::{schema}", name


def test_every_schema_is_declared_once():
    """ops/_schemas.py holds every schema, and each has exactly one declaration in the registry
    (a Kernel for KERNEL_OPS, an Op for PUBLIC_OPS): no stale or missing entry."""
    from rmkernels import _registry
    from rmkernels.ops import _schemas

    assert sorted(_registry.KERNELS) == sorted(_schemas.KERNEL_OPS)
    assert sorted(_registry.OPS) == sorted(_schemas.PUBLIC_OPS)
    assert sorted(set(_schemas.KERNEL_OPS) | set(_schemas.PUBLIC_OPS)) == sorted(SCHEMAS)


def _documented_signatures():
    """``{name: [parameter text]}`` of every ``rmk.<name>(...)`` call written at the start of a
    line in docs/ops.md's python blocks (the contract's signatures)."""
    import os
    import re

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "ops.md")) as f:
        text = f.read()
    found = {}
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        for m in re.finditer(r"(?m)^\s*rmk\.(\w+)\(", block):
            i, depth = m.end(), 1
            while depth:
                depth += {"(": 1, ")": -1}.get(block[i], 0)
                i += 1
            found.setdefault(m.group(1), []).append(block[m.end():i - 1])
    return found


def _parameters(params):
    """[(name, kind)] and {name: default} of a Python parameter list (ast; defaults are literals)."""
    import ast

    a = ast.parse(f"def f({params}): pass").body[0].args
    pos = a.posonlyargs + a.args
    names = ([(x.arg, "positional") for x in pos] + ([("*" + a.vararg.arg, "*")] if a.vararg else [])
             + [(x.arg, "keyword") for x in a.kwonlyargs] + ([("**" + a.kwarg.arg, "**")] if a.kwarg else []))
    defaults = {x.arg: ast.literal_eval(d) for x, d in zip(pos[len(pos) - len(a.defaults):], a.defaults)}
    defaults.update({x.arg: ast.literal_eval(d) for x, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None})
    return names, defaults


def test_public_signatures_are_those_of_docs_ops_md():
    """Every public function's parameters, their kinds and their defaults are those written in
    docs/ops.md (a default changed in the code alone, say ppo_advantages' lam, was caught by no
    test: every test passed it explicitly)."""
    import inspect

    import rmkernels as rmk

    kinds = {inspect.Parameter.POSITIONAL_ONLY: "positional", inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
             inspect.Parameter.KEYWORD_ONLY: "keyword", inspect.Parameter.VAR_POSITIONAL: "*",
             inspect.Parameter.VAR_KEYWORD: "**"}
    documented = _documented_signatures()
    assert {"last_token_reward", "bradley_terry_loss", "pairwise_reward_loss", "ranking_loss", "ppo_advantages",
            "masked_whiten", "gae", "kl_estimate", "group_advantages", "reinforce_pp_returns",
            "reinforce_pp_advantages", "remax_advantages", "token_logprobs"} <= set(documented)
    for name, texts in documented.items():
        sig = inspect.signature(getattr(rmk, name))
        names = [(("*" if kinds[p.kind] == "*" else "**" if kinds[p.kind] == "**" else "") + p.name, kinds[p.kind])
                 for p in sig.parameters.values()]
        defaults = {p.name: p.default for p in sig.parameters.values() if p.default is not p.empty}
        for text in texts:
            assert _parameters(text) == (names, defaults), f"rmk.{name}: docs/ops.md says ({text}), the code {sig}"
