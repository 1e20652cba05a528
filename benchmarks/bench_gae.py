"""Benchmark PPO reward shaping + GAE + whitening (``rmk.ppo_advantages``) against the hf
loop (OpenRLHF/verl), the vectorized torch scan and its torch.compile, on gae-s/l/xl.

    python benchmarks/bench_gae.py [--shapes gae-s gae-l gae-xl] [--quick]

One mode (``forward``: the op has no gradient); the figure that matters is the full-call time.
Options: kl_coef 0.05, gamma 1.0, lam 0.95, whiten (shift_mean, unbiased); the KL estimator
is the shape's (k1 or k3). Masks are right-padded response masks with lengths in [T/2, T].
"""
try:
    from benchmarks import _path  # noqa: F401
except ImportError:
    import _path  # noqa: F401

import torch

from benchmarks import baselines, common, shapes

OPS = ("gae",)
KL_COEF, GAMMA, LAM = 0.05, 1.0, 0.95


def make_inputs(shape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = shape.dims["B"], shape.dims["T"]
    dt = shape.torch_dtype
    logprobs = (-torch.rand(B, T, generator=g) * 2).to(device, dt)
    ref_logprobs = (logprobs.float().cpu() + 0.1 * torch.randn(B, T, generator=g)).to(device, dt)
    values = torch.randn(B, T, generator=g).to(device, dt)
    scores = torch.randn(B, generator=g).to(device)
    lengths = torch.randint(max(T // 2, 1), T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None] < lengths[:, None]).to(device)
    return (logprobs, ref_logprobs, values, scores, mask)


def bytes_moved(shape):
    """Each input read once (3 [B, T] fp32 + a bool mask + scores), each of the 4 outputs
    written once."""
    B, T = shape.dims["B"], shape.dims["T"]
    e = torch.tensor([], dtype=shape.torch_dtype).element_size()
    return {"forward": 3 * B * T * e + B * T * 1 + B * 4 + 4 * B * T * 4}


def providers(device, kl_estimator):
    def base(fn):
        return lambda lp, ref, v, s, m: fn(lp, ref, v, s, m, KL_COEF, GAMMA, LAM, kl_estimator)

    comp = baselines.compiled("gae")
    p = {"hf": base(baselines.gae_hf), "torch": base(baselines.gae_torch), "compile": base(comp)}
    reference = None
    if common.has_op("ppo_advantages"):
        import rmkernels as rmk

        def rmk_fn(be):
            def f(lp, ref, v, s, m):
                out = rmk.ppo_advantages(lp, ref, v, s, m, kl_coef=KL_COEF, gamma=GAMMA, lam=LAM,
                                         kl_estimator=kl_estimator, whiten=True, backend=be)
                return (out.advantages, out.returns, out.rewards, out.kl)
            return f
        for be in common.rmk_backends(device):
            p[f"rmk-{be}"] = rmk_fn(be)
        reference = rmk_fn("reference")
    return p, reference or p["hf"]


def run(op="gae", device="cpu", shapes=None, quick=False, tiny=False, only=None, log=common.log):
    rows = []
    for shape in shapes_mod.for_op(op, device, shapes, tiny):
        prov, ref = providers(device, shape.opts.get("kl_estimator", "k1"))
        prov = common.select(prov, only)
        inputs = make_inputs(shape, device)
        rows += common.bench_shape(op, shape, prov, inputs, grad_idx=(), reference=ref, device=device,
                                   bytes_per_mode=bytes_moved(shape), quick=quick, log=log)
    return rows


shapes_mod = shapes

if __name__ == "__main__":
    common.standalone_main(__import__(__name__))
