"""rmk.causal_lm_logprobs on a tiny random LlamaForCausalLM against log_softmax(model(...).logits),
and the verl-compatible linear_cross_entropy."""
import pytest
import torch
from utils import assert_close

import rmkernels as rmk
from rmkernels.integrations.verl_linear_ce import linear_cross_entropy

transformers = pytest.importorskip("transformers")


def _model(bias=False, tie=False):
    cfg = transformers.LlamaConfig(vocab_size=211, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    return model


def _batch(B=3, T=13, V=211, left=True):
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    lengths = torch.tensor([T, T - 4, T - 7])[:B]
    for b, n in enumerate(lengths.tolist()):
        if left:
            mask[b, :T - n] = 0
        else:
            mask[b, n:] = 0
    return ids, mask


def _expected(model, ids, mask, temperature, R):
    logits = model(input_ids=ids, attention_mask=mask).logits.double() / temperature
    T = ids.shape[1]
    logp = torch.log_softmax(logits[:, T - R - 1:T - 1], -1)
    lp = logp.gather(-1, ids[:, T - R:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    keep = mask[:, T - R:] != 0
    return torch.where(keep, lp, 0.0), torch.where(keep, ent, 0.0)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("tie", [False, True])
def test_matches_model_logits(backend, tie):
    model = _model(tie=tie)
    ids, mask = _batch(left=True)
    for R, temperature in ((None, 1.0), (5, 0.7)):
        lp, ent = rmk.causal_lm_logprobs(model, ids, mask, response_length=R, temperature=temperature,
                                         return_entropy=True, backend=backend)
        exp_lp, exp_ent = _expected(model, ids, mask, temperature, ids.shape[1] - 1 if R is None else R)
        assert lp.shape == exp_lp.shape
        assert_close(lp, exp_lp, rtol=1e-4, atol=1e-4, name="causal_lm logprobs")
        assert_close(ent, exp_ent, rtol=1e-4, atol=1e-4, name="causal_lm entropy")


def _scaled_model(model_type):
    """A tiny random *ForCausalLM of a model type whose forward rescales the hidden states or the
    logits, or keeps part of the vocabulary (rmkernels.causal_lm.HEAD_RULES), with that scaling
    away from 1."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    base = dict(vocab_size=211, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2)
    extra = {"cohere": dict(logit_scale=0.25), "granite": dict(logits_scaling=4.0),
             "granitemoe": dict(logits_scaling=3.0, num_local_experts=2, num_experts_per_tok=1),
             "hyperclovax": dict(logits_scaling=0.5),
             "minicpm3": dict(dim_model_base=8, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                              qk_rope_head_dim=8, v_head_dim=8),  # hidden states / (32 / 8)
             "falcon_h1": dict(lm_head_multiplier=3.0, head_dim=16, mamba_d_ssm=32, mamba_n_heads=2, mamba_d_head=16,
                               mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=4)}
    torch.manual_seed(0)
    if model_type == "inkling":  # hidden states / logits_mup_width_multiplier, logits[..., :unpadded_vocab_size]
        from transformers.models.inkling import configuration_inkling, modeling_inkling

        cfg = configuration_inkling.InklingTextConfig(**base, unpadded_vocab_size=190, logits_mup_width_multiplier=2.5)
        return modeling_inkling.InklingForCausalLM(cfg).eval()
    cfg = CONFIG_MAPPING[model_type](**base, **extra[model_type])
    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])(cfg).eval()


@pytest.mark.parametrize("model_type", ["cohere", "granite", "granitemoe", "hyperclovax", "minicpm3", "falcon_h1",
                                        "inkling"])
def test_models_that_rescale_their_logits(model_type):
    """Granite divides its logits by logits_scaling and HyperCLOVA X multiplies them by it,
    MiniCPM3 divides its hidden states, FalconH1 multiplies by lm_head_multiplier, Cohere by
    logit_scale, Inkling divides its hidden states and keeps the first unpadded_vocab_size
    logits: each against log_softmax of the model's own logits."""
    model = _scaled_model(model_type)
    ids, mask = _batch(left=True, V=190)
    with torch.no_grad():
        for R, temperature in ((None, 1.0), (5, 0.7)):
            lp, ent = rmk.causal_lm_logprobs(model, ids, mask, response_length=R, temperature=temperature,
                                             return_entropy=True, backend="cpu")
            exp_lp, exp_ent = _expected(model, ids, mask, temperature, ids.shape[1] - 1 if R is None else R)
            assert_close(lp, exp_lp, rtol=1e-4, atol=1e-4, name=f"{model_type} logprobs")
            assert_close(ent, exp_ent, rtol=1e-4, atol=1e-4, name=f"{model_type} entropy")


def test_models_it_cannot_follow_are_refused():
    cfg = transformers.Gemma2Config(vocab_size=211, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=2, head_dim=16)
    ids, mask = _batch()
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        rmk.causal_lm_logprobs(transformers.Gemma2ForCausalLM(cfg), ids, mask)
    xcfg = transformers.xLSTMConfig(vocab_size=211, hidden_size=32, embedding_dim=32, num_hidden_layers=1,
                                    num_blocks=1, num_heads=2, chunk_size=4, mode="inference")
    with pytest.raises(NotImplementedError, match="output_logit_soft_cap=30"):  # xLSTM's default cap
        rmk.causal_lm_logprobs(transformers.xLSTMForCausalLM(xcfg), ids, mask)
    model = _model()
    model.config.logits_scaling = 2.0  # a scaling attribute on a model type without a rule: not guessed
    with pytest.raises(NotImplementedError, match="logits_scaling=2.0.*no rule"):
        rmk.causal_lm_logprobs(model, ids, mask)
    model.config.logits_scaling = 1.0  # no effect whatever it would mean
    rmk.causal_lm_logprobs(model, ids, mask)


def test_gradients_reach_the_model():
    model = _model()
    ids, mask = _batch(left=False)
    lp, ent = rmk.causal_lm_logprobs(model, ids, mask, return_entropy=True, backend="cpu")
    (lp.sum() + 0.1 * ent.sum()).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    exp_lp, exp_ent = _expected(model, ids, mask, 1.0, ids.shape[1] - 1)
    (exp_lp.sum() + 0.1 * exp_ent.sum()).backward()
    for n, p in model.named_parameters():
        assert_close(ours[n], p.grad, rtol=1e-3, atol=1e-5, name=f"grad {n}")


def test_bad_arguments():
    model = _model()
    ids, mask = _batch()
    with pytest.raises(ValueError, match="response_length"):
        rmk.causal_lm_logprobs(model, ids, mask, response_length=ids.shape[1])
    with pytest.raises(ValueError, match="attention_mask"):
        rmk.causal_lm_logprobs(model, ids, mask[:, 1:])
    # each named before the model runs (they were errors from inside the embedding, an
    # AttributeError, or a ValueError for a list)
    for bad, err, match in ((ids.float(), TypeError, r"input_ids must have dtype in \(int32, int64\), got float32"),
                            (ids.tolist(), TypeError, "input_ids must be a torch.Tensor, got list"),
                            (ids[0], ValueError, r"input_ids must be 2-D, got shape")):
        with pytest.raises(err, match=match):
            rmk.causal_lm_logprobs(model, bad, None)
    with pytest.raises(TypeError, match="attention_mask must be a torch.Tensor, got list"):
        rmk.causal_lm_logprobs(model, ids, mask.tolist())
    with pytest.raises(TypeError, match=r"model must be an HF \*ForCausalLM \(with get_output_embeddings\(\)\), "
                                        "got Linear"):
        rmk.causal_lm_logprobs(torch.nn.Linear(2, 2), ids, mask)
    with pytest.raises(TypeError, match="response_length must be an int, got 2.5"):
        rmk.causal_lm_logprobs(model, ids, mask, response_length=2.5)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_verl_linear_cross_entropy(reduction):
    """verl's contract: (-cross_entropy, entropy) of softmax(hidden @ weight.T / temperature)."""
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(77, 16, requires_grad=True)
    labels = torch.randint(0, 77, (2, 9))
    lp, ent = linear_cross_entropy(hidden, weight, labels, 0.8, reduction)

    def formula(h, w):
        logits = (h.reshape(-1, 16) @ w.t()) / 0.8
        exp_lp = -torch.nn.functional.cross_entropy(logits, labels.reshape(-1), reduction=reduction)
        p = logits.softmax(-1)
        return exp_lp, torch.logsumexp(logits, -1) - (p * logits).sum(-1)

    exp_lp, exp_ent = formula(hidden, weight)
    assert_close(lp, exp_lp, rtol=1e-5, atol=1e-5, name="logprobs")
    assert_close(ent, exp_ent, rtol=1e-5, atol=1e-5, name="entropy")
    g = torch.autograd.grad(lp.sum() + ent.sum(), [hidden, weight])
    # Gradients against the float64 formula: the entropy's gradient cancels, and torch's own
    # float32 version of the formula was off by up to 1.4e-5 of the largest gradient (600 seeds;
    # the kernel 3.5e-6), so an element-wise comparison with it failed now and then (seed
    # 216401232: 1 of 288 elements).
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    e_lp, e_ent = formula(h64, w64)
    for a, e in zip(g, torch.autograd.grad(e_lp.sum() + e_ent.sum(), [h64, w64])):
        assert_close(a, e, rtol=0, atol=1e-5 * e.abs().max().item(), name="grad")
    with pytest.raises(NotImplementedError):
        linear_cross_entropy(hidden, weight, labels, 1.0, "none", dist_process_group=object())
    # verl lowercases the reduction
    up = linear_cross_entropy(hidden, weight, labels, 0.8, reduction.upper())
    assert torch.equal(up[0], lp) and torch.equal(up[1], ent)
    for bad in ("avg", None, 1):
        with pytest.raises(ValueError, match="reduction must be one of"):
            linear_cross_entropy(hidden, weight, labels, 0.8, bad)


def test_every_logit_soft_cap_of_transformers_is_known():
    """Every config attribute of a transformers causal LM named like an output-logit soft cap is in
    ``causal_lm.LOGIT_SOFTCAPS`` (refused): a new name would otherwise pass unseen, its model's
    log-probs silently wrong (xLSTM's ``output_logit_soft_cap`` did). The caps that act inside the
    model (attention scores, MoE routers) are not the head's."""
    import re

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from rmkernels import causal_lm

    names = set()
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        try:
            keys = CONFIG_MAPPING[model_type]().to_dict()
        except Exception:  # a config that needs arguments: its class attributes are all we can read
            keys = vars(CONFIG_MAPPING[model_type])
        inside = r"(attn|attention|moe|router|gate|mlp)"  # caps inside the model, not on its output logits
        names |= {k for k in keys if re.search(r"soft_?cap", k) and not re.match(inside, k)}
    assert {"final_logit_softcapping", "output_logit_soft_cap"} <= names, names  # the scan sees them
    assert names <= set(causal_lm.LOGIT_SOFTCAPS), names - set(causal_lm.LOGIT_SOFTCAPS)
