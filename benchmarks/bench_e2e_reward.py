"""End-to-end reward-model training step (forward + backward + AdamW) on a Llama-style
model: the HF/TRL path vs the rmkernels path, time per step and peak memory.

    python benchmarks/bench_e2e_reward.py [--quick]

hf:  ``LlamaForSequenceClassification`` (the score head on every token, the last non-pad
     token gathered) + TRL's ``-logsigmoid(c - r).mean()`` loss.
rmk: the same weights: ``LlamaForSequenceClassification.model`` (the decoder) ->
     ``rmk.pairwise_reward_loss`` with the same ``score`` head (or, while that op is not in
     the package, ``rmk.last_token_reward`` + the loss of ``rmk.bradley_terry_loss`` / eager).
Both models start from the same weights and their first losses are checked to match.

Configs: on the CPU a small Llama (4 layers, H=256, T=128, 4 pairs); on a GPU one of about
0.5B parameters (Qwen2.5-0.5B's dimensions in a LlamaConfig: 24 layers, H=896, 14 heads,
2 KV heads, FFN 4864, vocab 151936) at T = 2048 in bf16, 2 pairs.
"""
try:
    from benchmarks import _path  # noqa: F401
except ImportError:
    import _path  # noqa: F401

import copy

import torch

from benchmarks import baselines, common, timing

OPS = ("e2e",)

CONFIGS = {
    "llama-cpu": dict(cfg=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=8192, max_position_embeddings=512),
                      pairs=4, T=128, dtype="fp32"),
    "llama-0.5b": dict(cfg=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                max_position_embeddings=4096),
                       pairs=2, T=2048, dtype="bf16"),
    "llama-tiny": dict(cfg=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=1, vocab_size=128, max_position_embeddings=64),
                       pairs=2, T=16, dtype="fp32"),
}
PAD = 0


def build(name, device, seed=0):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    c = CONFIGS[name]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[c["dtype"]]
    cfg = LlamaConfig(num_labels=1, pad_token_id=PAD, **c["cfg"])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(cfg).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    B, T = 2 * c["pairs"], c["T"]
    ids = torch.randint(1, cfg.vocab_size, (B, T), generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None] < lengths[:, None]
    ids = ids.masked_fill(~mask, PAD)
    n_params = sum(p.numel() for p in model.parameters())
    dims = (f"L={cfg.num_hidden_layers},H={cfg.hidden_size},FFN={cfg.intermediate_size},V={cfg.vocab_size},"
            f"params={n_params / 1e6:.1f}M,B={B},T={T}")
    return model, ids.to(device), mask.long().to(device), dims, c["dtype"]


def loss_hf(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits  # [2B, 1], pooled by HF
    chosen, rejected = torch.chunk(logits.squeeze(-1).float(), 2)
    return baselines.bt_hf(chosen, rejected, None, 0.0)


def rmk_loss_fn():
    import rmkernels as rmk
    if common.has_op("pairwise_reward_loss"):
        def f(model, ids, mask):
            h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            loss, _, _ = rmk.pairwise_reward_loss(h, model.score.weight, None, attention_mask=mask)
            return loss
        return f, "rmk.pairwise_reward_loss"
    bt = rmk.bradley_terry_loss if common.has_op("bradley_terry_loss") else None

    def f(model, ids, mask):
        h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        r = rmk.last_token_reward(h, model.score.weight, None, attention_mask=mask)[:, 0]
        c, rj = torch.chunk(r, 2)
        return bt(c, rj) if bt is not None else baselines.bt_torch(c, rj, None, 0.0)
    return f, "rmk.last_token_reward + " + ("rmk.bradley_terry_loss" if bt else "eager BT loss")


def run(op="e2e", device="cpu", shapes=None, quick=False, tiny=False, only=None, log=common.log):
    name = "llama-tiny" if tiny else ("llama-0.5b" if device == "cuda" else "llama-cpu")
    if shapes and not any(s.startswith("llama") for s in shapes):
        return []
    if shapes:
        name = next(s for s in shapes if s.startswith("llama"))
    base_model, ids, mask, dims, dtype = build(name, device)
    rmk_fn, how = rmk_loss_fn()
    paths = {"hf": loss_hf, "rmk": rmk_fn}
    if only:
        paths = {k: v for k, v in paths.items() if k in only}
    models = {k: copy.deepcopy(base_model) for k in paths}
    del base_model
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in models.items()}

    # correctness: same weights -> same first loss
    losses = {k: float(fn(models[k], ids, mask).detach()) for k, fn in paths.items()}
    tol = 1e-3 if dtype == "fp32" else 2e-2  # hf rounds the head's output to bf16, rmk keeps fp32
    ok = {k: abs(v - losses.get("hf", v)) <= tol * max(1.0, abs(v)) for k, v in losses.items()}
    if not all(ok.values()):
        log(f"  !! e2e {name}: first losses differ: {losses}; not timed: {[k for k in ok if not ok[k]]}")

    def step(k):
        def f():
            opts[k].zero_grad(set_to_none=True)
            loss = paths[k](models[k], ids, mask)
            loss.backward()
            opts[k].step()
        return f

    calls = {k: step(k) for k in paths if ok[k]}  # a path whose first loss differs from hf's is not timed
    env = common.env_fields(device)
    base = dict(op="e2e", shape=name, dims=dims, dtype=dtype, mode="step", bytes=0,
                note=f"rmk path: {how}", **env)
    rows = [dict(base, provider=k, mode="check", metric="correct", median=float(ok[k]), p20=float("nan"),
                 p80=float("nan"), unit="bool",
                 note=f"first loss {losses[k]:.6f}" + ("" if ok[k] else f", hf's {losses['hf']:.6f}"))
            for k in paths]
    if not calls:
        return rows
    counts = {}
    res = timing.measure_interleaved(calls, device=device, reps=3 if quick else 10, warmup=1 if quick else 2,
                                     counts=counts,
                                     min_sample_s=0.0, max_time_s=10.0 if quick else 90.0)
    for k, (med, p20, p80) in res.items():
        rows.append(dict(base, provider=k, metric="step_ms", median=med, p20=p20, p80=p80, unit="ms",
                         samples=counts[k]))
    for k, call in calls.items():
        mib = timing.peak_memory_mib(call, device)
        rows.append(dict(base, provider=k, metric="peak_MiB", median=mib, p20=mib, p80=mib, unit="MiB"))
    log(f"  e2e      {name} step ms: " + "  ".join(f"{k} {v[0]:.4g}" for k, v in res.items()))
    return rows


if __name__ == "__main__":
    common.standalone_main(__import__(__name__))
