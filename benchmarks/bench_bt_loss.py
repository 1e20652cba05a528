"""Benchmark the Bradley-Terry loss (``rmk.bradley_terry_loss``, shapes bt-*) and the fused
pairwise head + loss (``rmk.pairwise_reward_loss``, shapes pair-*) against hf (TRL) / torch /
compile, forward, backward and full.

    python benchmarks/bench_bt_loss.py [--shapes bt-s bt-l pair-l] [--quick]

The loss options benchmarked are TRL's full formula: a per-pair margin and
``center_rewards_coefficient = 0.01``.
"""
try:
    from benchmarks import _path  # noqa: F401
except ImportError:
    import _path  # noqa: F401

import torch

from benchmarks import baselines, common, shapes

OPS = ("bt", "pair")
CENTER_COEF = 0.01


def make_inputs(shape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = shape.dims
    B = d["B"]
    margin = torch.rand(B, generator=g).to(device)
    if shape.op == "bt":
        chosen = (torch.randn(B, generator=g) + 0.5).to(device, shape.torch_dtype).requires_grad_()
        rejected = torch.randn(B, generator=g).to(device, shape.torch_dtype).requires_grad_()
        return (chosen, rejected, margin, CENTER_COEF)
    from dataclasses import replace

    from benchmarks.bench_pooling import make_inputs as pool_inputs
    hidden, weight, bias, mask = pool_inputs(replace(shape, dims=dict(d, B=2 * B)), device, seed)
    return (hidden, weight, bias, mask, margin, CENTER_COEF)


def bytes_moved(shape):
    d = shape.dims
    B = d["B"]
    if shape.op == "bt":
        e = torch.tensor([], dtype=shape.torch_dtype).element_size()
        fwd = 2 * B * e + B * 4 + 4          # chosen, rejected, margin in; loss out
        bwd = 2 * B * e + B * 4 + 4 + 2 * B * e  # the same in (+ grad), two gradients out
        return {"forward": fwd, "backward": bwd, "full": fwd + bwd}
    from dataclasses import replace

    from benchmarks.bench_pooling import bytes_moved as pool_bytes
    b = pool_bytes(replace(shape, dims=dict(d, B=2 * B)))
    return {k: v + 3 * B * 4 for k, v in b.items()}


def providers(op, device):
    import rmkernels as rmk
    p = {"hf": baselines.HF_FNS[op], "torch": baselines.TORCH_FNS[op], "compile": baselines.compiled(op)}
    reference = None
    if op == "bt" and common.has_op("bradley_terry_loss"):
        def rmk_fn(be):
            return lambda c, r, m, coef: rmk.bradley_terry_loss(c, r, margin=m, center_coef=coef, backend=be)
    elif op == "pair" and common.has_op("pairwise_reward_loss"):
        def rmk_fn(be):
            return lambda h, w, b, mask, m, coef: rmk.pairwise_reward_loss(
                h, w, b, attention_mask=mask, margin=m, center_coef=coef, backend=be)
    else:
        rmk_fn = None
    if rmk_fn is not None:
        for be in common.rmk_backends(device):
            p[f"rmk-{be}"] = rmk_fn(be)
        reference = rmk_fn("reference")
    return p, reference


def run(op, device="cpu", shapes=None, quick=False, tiny=False, only=None, log=common.log):
    rows = []
    for shape in shapes_mod.for_op(op, device, shapes, tiny):
        prov, ref = providers(op, device)
        prov = common.select(prov, only)
        inputs = make_inputs(shape, device)
        grad_idx = (0, 1)
        rows += common.bench_shape(op, shape, prov, inputs, grad_idx=grad_idx, reference=ref or baselines.HF_FNS[op],
                                   device=device, bytes_per_mode=bytes_moved(shape), quick=quick, log=log)
    return rows


shapes_mod = shapes

if __name__ == "__main__":
    common.standalone_main(__import__(__name__))
