"""rmk.patch_hf_reward_model: the patched HF *ForSequenceClassification model gives the
outputs and gradients of the unpatched one, with the head applied to B rows only."""
import contextlib
import copy
import subprocess
import sys

import pytest
import torch

import rmkernels as rmk
from rmkernels.integrations import hf
from rmkernels.ops import pooling
from tests.utils import assert_close

transformers = pytest.importorskip("transformers")

PAD = 0
VOCAB = 61


def _tiny(family, num_labels=1, pad_token_id=PAD):
    common = dict(vocab_size=VOCAB, num_labels=num_labels, pad_token_id=pad_token_id)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                                      eos_token_id=2, **common)
        return transformers.GPT2ForSequenceClassification(cfg).eval()  # eval: no dropout
    llama_like = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, **common)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForSequenceClassification),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForSequenceClassification),
           "mistral": (transformers.MistralConfig, transformers.MistralForSequenceClassification)}[family]
    return cls[1](cls[0](**llama_like)).eval()


FAMILIES = ["llama", "qwen2", "mistral", "gpt2"]


def _batch(B=5, T=11, left=False):
    """Ragged right- (or left-) padded ids with an all-pad row and a full row."""
    ids = torch.randint(1, VOCAB, (B, T))
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0], lengths[-1] = T, 0
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        if left:
            mask[b, T - n:] = 1
        else:
            mask[b, :n] = 1
    mask[-1, 0] = 1  # HF still attends somewhere in the all-pad row
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, PAD))
    ids[-1, 0] = PAD
    return ids, mask


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    if out.loss is not None:
        target = out.loss
    else:
        target = (out.logits.float() * torch.linspace(-1, 2, out.logits.numel()).view_as(out.logits)).sum()
    target.backward()
    return out, _grads(model)


def _compare(ref, got, ref_grads, got_grads, rtol=1e-5, atol=1e-6):
    assert got.logits.dtype == ref.logits.dtype
    assert_close(got.logits, ref.logits, rtol=rtol, atol=atol, name="logits")
    if ref.loss is not None:
        assert_close(got.loss, ref.loss, rtol=rtol, atol=atol, name="loss")
    assert set(got_grads) == set(ref_grads)
    for n in ref_grads:
        assert_close(got_grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, name=f"grad {n}")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("left,labels", [(False, "none"), (True, "regression"), (False, "classes")],
                         ids=["right-pad", "left-pad-regression", "right-pad-classes"])
def test_patched_equals_unpatched(family, left, labels):
    num_labels = 3 if labels == "classes" else 1
    ref_model = _tiny(family, num_labels=num_labels)
    model = copy.deepcopy(ref_model)
    rmk.patch_hf_reward_model(model)
    ids, mask = _batch(left=left)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if labels == "regression":
        inputs["labels"] = torch.randn(ids.shape[0])
    elif labels == "classes":
        inputs["labels"] = torch.randint(0, 3, (ids.shape[0],))
    ref, ref_grads = _run(ref_model, **inputs)
    got, got_grads = _run(model, **inputs)
    _compare(ref, got, ref_grads, got_grads)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_head_applied_to_B_rows_only(family, monkeypatch):
    model = _tiny(family)
    seen = []
    model.score.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    ids, mask = _batch(B=3, T=7)
    model(input_ids=ids, attention_mask=mask)
    assert seen == [(3, 7, 32)]  # HF: the head over all B*T tokens
    seen.clear()
    rmk.patch_hf_reward_model(model)
    calls = []
    orig = pooling._last_token_reward  # the op rmkernels::last_token_reward, or its eager fast path

    def spy(hidden, weight, bias, index, backend):
        calls.append((tuple(hidden.shape), tuple(index.shape)))
        return orig(hidden, weight, bias, index, backend)

    monkeypatch.setattr(pooling, "_last_token_reward", spy)
    out = model(input_ids=ids, attention_mask=mask)
    assert seen == []  # the nn.Linear never runs on the hidden states
    assert calls == [((3, 7, 32), (3,))]
    assert out.logits.shape == (3, 1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tuple_output_positional_args_and_embeds(family):
    ref_model = _tiny(family)
    model = rmk.patch_hf_reward_model(copy.deepcopy(ref_model))
    ids, mask = _batch(B=4, T=6)
    ref = ref_model(ids, return_dict=False)
    got = model(ids, return_dict=False)
    assert isinstance(got, tuple) and len(got) == len(ref)
    assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6, name="logits (tuple)")
    # inputs_embeds: HF cannot see the pads and takes the last position; so does the patch.
    emb = ref_model.get_input_embeddings()(ids).detach().requires_grad_(True)
    emb2 = emb.detach().clone().requires_grad_(True)
    ref = ref_model(inputs_embeds=emb, attention_mask=mask)
    got = model(inputs_embeds=emb2, attention_mask=mask)
    assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-6, name="logits (inputs_embeds)")
    ref.logits.sum().backward()
    got.logits.sum().backward()
    assert_close(emb2.grad, emb.grad, rtol=1e-4, atol=1e-6, name="grad inputs_embeds")


def test_no_pad_token_id():
    ref_model = _tiny("llama", pad_token_id=None)
    model = rmk.patch_hf_reward_model(copy.deepcopy(ref_model))
    ids = torch.randint(1, VOCAB, (1, 8))
    assert_close(model(input_ids=ids).logits, ref_model(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    ids = torch.randint(1, VOCAB, (2, 8))
    with pytest.raises(ValueError) as ref_err:
        ref_model(input_ids=ids)
    with pytest.raises(ValueError) as got_err:
        model(input_ids=ids)
    assert str(got_err.value) == str(ref_err.value)


def test_bf16_logits_dtype():
    ref_model = _tiny("qwen2").to(torch.bfloat16)
    model = rmk.patch_hf_reward_model(copy.deepcopy(ref_model))
    ids, mask = _batch(B=4, T=9)
    ref, got = ref_model(input_ids=ids, attention_mask=mask), model(input_ids=ids, attention_mask=mask)
    assert got.logits.dtype == torch.bfloat16
    assert_close(got.logits.float(), ref.logits.float(), rtol=2e-2, atol=2e-2, name="bf16 logits")


def test_attention_mask_rule_with_pad_equal_eos():
    """pad == eos: HF's pad-id rule skips the trailing eos; last_token="attention_mask" keeps it."""
    EOS = 5
    model = _tiny("llama", pad_token_id=EOS)
    ids = torch.randint(6, VOCAB, (3, 8))
    lengths = [8, 5, 3]
    mask = torch.zeros(3, 8, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, n - 1:] = EOS  # each sequence ends with eos, then eos-padding
        mask[b, :n] = 1
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = torch.stack([hidden[b, n - 1] for b, n in enumerate(lengths)]) @ model.score.weight.t()
    before_eos = torch.stack([hidden[b, n - 2] for b, n in enumerate(lengths)]) @ model.score.weight.t()
    rmk.patch_hf_reward_model(model, last_token="attention_mask")
    assert_close(model(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-5, atol=1e-6)
    rmk.patch_hf_reward_model(model)  # back to the HF rule
    assert_close(model(input_ids=ids, attention_mask=mask).logits, before_eos, rtol=1e-5, atol=1e-6)


def test_a_patched_model_pickles_patched():
    """pickle, torch.save of the whole model and deepcopy give a patched model whose forward is
    bound to the copy (a bound method of a function the class lacks pickled, then failed to load:
    "no attribute '_patched_forward'")."""
    import io
    import pickle

    model = _tiny("llama")
    rmk.patch_hf_reward_model(model, last_token="attention_mask")
    ids = torch.randint(1, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    want = model(input_ids=ids, attention_mask=mask).logits
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copies = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model), torch.load(buf, weights_only=False)]
    for other in copies:
        assert hf.is_patched(other) and isinstance(other.forward, hf.PatchedForward)
        assert other.forward.__self__ is other and other._rmk_options["last_token"] == "attention_mask"
        assert_close(other(input_ids=ids, attention_mask=mask).logits, want, rtol=0, atol=0)
        rmk.unpatch_hf_reward_model(other)
        assert "forward" not in other.__dict__


def test_unpatch_and_errors():
    model = _tiny("llama")
    cls_forward = type(model).forward
    rmk.patch_hf_reward_model(model)
    rmk.patch_hf_reward_model(model)  # twice: still one level of patching
    assert isinstance(model.forward, hf.PatchedForward) and model.forward.__self__ is model
    rmk.unpatch_hf_reward_model(model)
    assert "forward" not in model.__dict__ and model.forward.__func__ is cls_forward
    rmk.unpatch_hf_reward_model(model)  # no-op
    with pytest.raises(ValueError, match="last_token"):
        rmk.patch_hf_reward_model(model, last_token="eos")
    causal = transformers.LlamaForCausalLM(model.config)
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        rmk.patch_hf_reward_model(causal)


def test_patch_and_accelerate_autocast_wrapper():
    """accelerate's Accelerator.prepare (mixed precision) sets an autocast wrapper as the
    instance's forward. Patched before it: the wrapper calls the patched forward (bf16 inside the
    backbone, logits as the unpatched prepared model's); unpatched after it: the wrapper stays and
    runs the class's forward (still bf16); patched again: active again. Patched after it: refused
    (the patch would bypass the wrapper and its autocast: float32 silently)."""
    accelerate = pytest.importorskip("accelerate", reason="accelerate comes with trl (requirements-test.txt)")
    from accelerate.state import AcceleratorState

    # accelerate's state is process-wide: a trainer of an earlier test in this pytest worker set
    # another mixed precision (Accelerator(mixed_precision=...) refuses to change it)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        _patch_and_accelerate(accelerate.Accelerator(mixed_precision="bf16", cpu=True))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def _patch_and_accelerate(acc):
    base = _tiny("llama")
    ids, mask = _batch(B=4, T=9)
    seen = []

    def run(model):
        seen.clear()
        handle = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        try:
            return model(input_ids=ids, attention_mask=mask).logits
        finally:
            handle.remove()
    want = run(acc.prepare(copy.deepcopy(base)))
    assert seen == [torch.bfloat16]
    model = acc.prepare(rmk.patch_hf_reward_model(copy.deepcopy(base)))
    wrapper = model.__dict__["forward"]
    assert not isinstance(wrapper, hf.PatchedForward)  # accelerate's, around ours
    with _counting_pooling() as calls:
        assert_close(run(model), want, rtol=0, atol=1e-2)
    assert seen == [torch.bfloat16] and calls == [1]
    rmk.unpatch_hf_reward_model(model)
    assert model.__dict__["forward"] is wrapper and not hf.is_patched(model)
    with _counting_pooling() as calls:
        assert_close(run(model), want, rtol=0, atol=0)  # the class's forward, under the same autocast
    assert seen == [torch.bfloat16] and calls == []
    rmk.patch_hf_reward_model(model)
    with _counting_pooling() as calls:
        run(model)
    assert seen == [torch.bfloat16] and calls == [1] and model.__dict__["forward"] is wrapper
    with pytest.raises(TypeError, match="already replaced on the instance .*Accelerator.prepare"):
        rmk.patch_hf_reward_model(acc.prepare(copy.deepcopy(base)))


@contextlib.contextmanager
def _counting_pooling():
    """The calls of the fused pooling op (``rmk.last_token_reward``) in the block: ``[1, ...]``."""
    calls = []
    original = hf.last_token_reward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    hf.last_token_reward = counted
    try:
        yield calls
    finally:
        hf.last_token_reward = original


def test_config_return_dict_false_keeps_the_backbone_outputs():
    """``config.return_dict=False`` (what ``torchscript=True`` also sets): the patched forward still
    reads the backbone's outputs by name, so hidden states and the cache are there as in HF's
    (BLOOM: its backbone returns a tuple under that config; the patch dropped them)."""
    cfg = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, pad_token_id=PAD)
    ref = transformers.BloomForSequenceClassification(cfg).eval()
    ref.config.return_dict = False
    model = rmk.patch_hf_reward_model(copy.deepcopy(ref))
    ids, mask = _batch(B=3, T=7)
    for return_dict in (True, False):
        a, b = (m(input_ids=ids, attention_mask=mask, output_hidden_states=True, return_dict=return_dict)
                for m in (ref, model))
        if return_dict:
            assert len(b.hidden_states) == len(a.hidden_states) == 3 and type(b.cache) is type(a.cache)
            a, b = a.to_tuple(), b.to_tuple()
        assert [type(x) for x in b] == [type(x) for x in a]
        assert_close(b[0], a[0], rtol=1e-5, atol=1e-6, name="logits")
        for x, y in zip(a[-1], b[-1]):
            assert_close(y, x, rtol=0, atol=0, name="hidden states")


def test_patched_model_saves_and_reloads(tmp_path):
    model = rmk.patch_hf_reward_model(_tiny("llama"))
    model.save_pretrained(tmp_path, safe_serialization=True)
    again = type(model).from_pretrained(tmp_path)
    assert "forward" not in again.__dict__  # the patch is not saved with the weights
    for (n, p), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n == n2 and torch.equal(p, p2), n
    ids, mask = _batch(B=3, T=6)
    assert_close(again(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits,
                 rtol=1e-5, atol=1e-6)


def test_import_rmkernels_needs_neither_transformers_nor_trl():
    code = ("import sys, rmkernels as rmk; rmk.patch_hf_reward_model; "
            "bad = [m for m in ('transformers', 'trl') if m in sys.modules]; assert not bad, bad")
    root = __file__.rsplit("/tests/", 1)[0]
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert run.returncode == 0, run.stderr[-2000:]


# ---------------------------------------------------------------------------------------
# Every decoder *ForSequenceClassification transformers ships (tiny random configs, offline)
# ---------------------------------------------------------------------------------------
# Small values for whichever of these settings a config has; the rest stay the defaults.
_SMALL = {"hidden_size": 16, "n_embd": 16, "d_model": 16, "word_embed_proj_dim": 16, "num_hidden_layers": 2,
          "n_layer": 2, "num_layers": 2, "n_layers": 2, "num_attention_heads": 2, "n_head": 2, "n_heads": 2,
          "num_key_value_heads": 2, "num_kv_heads": 2, "head_dim": 8, "intermediate_size": 32, "ffn_dim": 32,
          "n_inner": 32, "dff": 32, "ffn_hidden_size": 32, "moe_intermediate_size": 16,
          "shared_expert_intermediate_size": 16, "attention_hidden_size": 32, "vocab_size": 64,
          "max_position_embeddings": 64, "n_positions": 64, "n_ctx": 64, "max_seq_len": 64, "kv_lora_rank": 8,
          "q_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 4,
          "num_experts": 4, "num_local_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
          "index_head_dim": 8, "index_topk": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
          "linear_num_key_heads": 2, "linear_num_value_heads": 2, "mamba_d_state": 8, "mamba_dt_rank": 4,
          "chunk_size": 16, "kv_channels": 8, "adapter_rank": 4, "rotary_dim": 4, "attn_layer_offset": 1,
          "attn_layer_period": 2, "expert_layer_offset": 1, "expert_layer_period": 2, "image_size": 32,
          "patch_size": 8, "mm_tokens_per_image": 4, "sliding_window": 16, "pad_token_id": PAD, "bos_token_id": 1,
          "eos_token_id": 2}
_KEEP_DEFAULT = {"zamba2": ("head_dim", "attention_hidden_size", "kv_channels"), "mistral4": ("head_dim",)}


def _small_kwargs(cls, default, model_type):
    kw = {k: v for k, v in _SMALL.items() if (k in default.to_dict() or hasattr(default, k))
          and not isinstance(getattr(cls, k, None), property) and k not in _KEEP_DEFAULT.get(model_type, ())}
    layer_types = getattr(default, "layer_types", None)
    if layer_types and not isinstance(getattr(cls, "layer_types", None), property):
        kw["layer_types"] = list(dict.fromkeys(layer_types)) * 2  # every kind of layer (hybrids), twice
        kw["num_hidden_layers"] = len(kw["layer_types"])
        if getattr(default, "hybrid_layer_ids", None):
            kw["hybrid_layer_ids"] = [i for i, t in enumerate(kw["layer_types"]) if t == "hybrid"]
    if getattr(default, "attention_types", None):  # GPT-Neo
        kw["attention_types"] = [[["global", "local"], 1]]
    return kw


def _tiny_config(model_type):
    cls = type(transformers.AutoConfig.for_model(model_type))
    default = cls()
    kw = _small_kwargs(cls, default, model_type)
    for sub in ("text_config", "vision_config"):  # multimodal wrappers (Gemma3, Qwen3.5)
        sub_cfg = getattr(default, sub, None)
        if hasattr(sub_cfg, "to_dict"):
            kw[sub] = type(sub_cfg)(**_small_kwargs(type(sub_cfg), sub_cfg, model_type))
    cfg = cls(**kw)
    cfg.num_labels = 1
    if getattr(cfg, "rope_parameters", None) == {} and getattr(cfg, "layer_types", None):
        # cohere_compass_text's default config has none for its layer types (it does not build as shipped)
        cfg.rope_parameters = {t: {"rope_type": "default", "rope_theta": 10000.0} for t in set(cfg.layer_types)}
    return cfg


def _decoder_model_types():
    """Every model type whose *ForSequenceClassification patch_hf_reward_model must support: the
    GenericForSequenceClassification subclasses, GPT-2, and the own-class decoders (pooling
    the rightmost non-pad token)."""
    from transformers.modeling_layers import GenericForSequenceClassification
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as names,
    )

    from rmkernels.integrations.hf import _OWN_CLASS_HEADS

    out = []
    for model_type, cls_name in names.items():
        cls = getattr(transformers, cls_name, None)
        if cls is not None and (issubclass(cls, (GenericForSequenceClassification,
                                                 transformers.GPT2ForSequenceClassification))
                                or model_type in _OWN_CLASS_HEADS):
            out.append(model_type)
    return out


def test_every_decoder_class_is_covered():
    """The decoders of this transformers that are not supported: none. A class with the HF
    last-non-pad-token rule that is neither Generic nor listed would show up here."""
    import inspect

    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as names,
    )

    covered = set(_decoder_model_types())
    missed = []
    for model_type, cls_name in names.items():
        cls = getattr(transformers, cls_name, None)
        if cls is None or model_type in covered:
            continue
        src = inspect.getsource(cls.forward)
        # encoder-decoders (T5Gemma) pool decoder ids
        if "last_non_pad_token" in src and "decoder_input_ids" not in src:
            missed.append(model_type)
    assert not missed, f"decoder *ForSequenceClassification classes patch_hf_reward_model refuses: {missed}"
    if transformers.__version__.startswith("5.24."):
        assert len(covered) == 64


@pytest.mark.parametrize("model_type", _decoder_model_types())
def test_every_decoder_model_type(model_type):
    """Logits and every parameter's gradient of the patched model equal the unpatched one's,
    with ragged right padding (and an all-pad row), and no deprecation warning from the
    patched forward."""
    import logging
    import warnings

    cfg = _tiny_config(model_type)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 400_000, f"{model_type}: the tiny config still has {n_params} parameters"
    ids, mask = _batch(B=3, T=7)
    ids = ids.clamp(max=cfg.get_text_config().vocab_size - 1)
    expected, exp_grads = _run(model, input_ids=ids, attention_mask=mask)
    rmk.patch_hf_reward_model(model, backend="cpu")
    logging.Logger.warning_once.cache_clear()  # transformers warns once per process
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    tf_logger = logging.getLogger("transformers")
    tf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got, got_grads = _run(model, input_ids=ids, attention_mask=mask)
    finally:
        tf_logger.removeHandler(handler)
    deprecations = [r.getMessage() for r in records if "deprecat" in r.getMessage()]
    deprecations += [str(w.message) for w in caught if "deprecat" in str(w.message).lower()]
    assert not deprecations, f"{model_type}: {deprecations}"
    assert type(got) is type(expected)
    assert [k for k, v in got.items() if v is not None] == [k for k, v in expected.items() if v is not None]
    assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5, name=f"{model_type} logits")
    assert set(got_grads) == set(exp_grads)
    for name, g in exp_grads.items():
        assert_close(got_grads[name], g, rtol=1e-4, atol=1e-5, name=f"{model_type} grad {name}")



def test_inputs_embeds_warning_goes_through_transformers_logging():
    """HF's "will not detect padding tokens in `inputs_embeds`" warning comes from transformers'
    logging (its verbosity controls it, once per class); the patched forward's too (it used a
    logger of its own, which `transformers.logging.set_verbosity_error()` did not silence)."""
    import logging

    from transformers.utils import logging as hf_logging

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    root = hf_logging.get_logger()  # the library's root logger ("transformers")
    handler, level = Keep(), hf_logging.get_verbosity()
    logging.Logger.warning_once.cache_clear()  # what earlier tests warned once is said again
    root.addHandler(handler)
    try:
        embeds = torch.randn(2, 5, 32)
        hf_logging.set_verbosity_error()
        rmk.patch_hf_reward_model(_tiny("mistral"))(inputs_embeds=embeds)
        assert not [m for m in records if "inputs_embeds" in m]
        hf_logging.set_verbosity_warning()
        model = rmk.patch_hf_reward_model(_tiny("qwen2"))
        model(inputs_embeds=embeds)
        model(inputs_embeds=embeds)
        assert [m for m in records if "inputs_embeds" in m] == [
            "Qwen2ForSequenceClassification will not detect padding tokens in `inputs_embeds`. Results may be "
            "unexpected if using padding tokens in conjunction with `inputs_embeds.`"]
    finally:
        root.removeHandler(handler)
        hf_logging.set_verbosity(level)


def test_peft_seq_cls_adapter_head():
    """A PEFT SEQ_CLS LoRA model (TRL's RewardTrainer with peft_config) wraps ``score`` in a
    ModulesToSaveWrapper (a trained copy of the head): the patch applies the copy PEFT's forward
    applies (the active adapter's; the original head with the adapters disabled), with the same
    logits and gradients as the unpatched PEFT model. It was refused ("must be an nn.Linear")."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    models = []
    for _ in range(2):
        torch.manual_seed(1)
        m = peft.get_peft_model(_tiny("llama"), peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj"]))
        with torch.no_grad():  # the trained copy differs from the original head
            m.get_base_model().score.modules_to_save["default"].weight.add_(1.0)
        models.append(m)
    ref, model = models
    rmk.patch_hf_reward_model(model.get_base_model())
    ids, mask = _batch(B=4, T=7)
    for disabled in (False, True):
        with (model.disable_adapter() if disabled else contextlib.nullcontext()), \
                (ref.disable_adapter() if disabled else contextlib.nullcontext()):
            r, g = ref(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits
            assert_close(g, r, rtol=1e-5, atol=1e-6, name=f"logits (adapters disabled: {disabled})")
    ref(input_ids=ids, attention_mask=mask).logits.sum().backward()
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
        if p.requires_grad:
            assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, name=f"grad {n}")


@pytest.mark.parametrize("pairwise", [False, True])
def test_compiled_patched_model_compiles_no_more_graphs_than_hf(pairwise):
    """Under torch.compile a patched model keeps the sequence length and the batch size dynamic
    as HF's model does: padded batches of new sizes compile no more graphs than the unpatched
    model (the pooling ops guarded T, the pairwise loss the batch size: a graph per size, then
    eager past dynamo's recompile limit). Values equal eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = _tiny("llama")
    sizes = [(4, 9), (4, 12), (6, 12), (6, 7), (8, 10)]

    def frames(m, patched):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("eager")
        compiled = torch.compile(m, backend=counter)
        for B, T in sizes:
            torch.manual_seed(B * 100 + T)
            ids, mask = _batch(B, T)
            mask[-1] = 1  # no all-pad row: the pairwise loss needs a token in every row
            ids[-1] = torch.randint(1, VOCAB, (T,))
            kw = {"pairwise_loss": {}} if pairwise and patched else {}
            with torch.no_grad():
                got, want = compiled(input_ids=ids, attention_mask=mask, **kw), m(input_ids=ids, attention_mask=mask,
                                                                                   **kw)
            assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)
            if kw:
                assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
        return counter.frame_count

    hf = frames(model, False)
    patched = copy.deepcopy(model)
    rmk.patch_hf_reward_model(patched)
    assert frames(patched, True) <= hf, f"the patched model compiled more graphs than HF's ({hf})"


def test_compiled_patched_forward_warns_nothing_of_its_own():
    """The patched forward reads the model's signature and its backbone's keyword names from
    the patch (computed once), not from functools caches, which dynamo traces through with a
    UserWarning per call site (four of them, each compile)."""
    import warnings

    model = rmk.patch_hf_reward_model(_tiny("llama"))
    ids, mask = _batch(B=3, T=7)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        got = compiled(input_ids=ids, attention_mask=mask).logits
    assert_close(got, model(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-6)
    ours = [str(w.message) for w in caught if "lru_cache" in str(w.message) and "hf.py" in str(w.message)]
    assert not ours, ours
