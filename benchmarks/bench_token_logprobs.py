"""Benchmark token log-probs + entropy from hidden states (``rmk.token_logprobs``) against the
naive path (full logits + log_softmax), ``torch.compile`` of it and chunked plain PyTorch,
forward, backward and full, time and peak memory side by side.

    python benchmarks/bench_token_logprobs.py [--shapes lp-s lp-l lp-t] [--quick] [--threads 1]
    python benchmarks/bench_token_logprobs.py --results   # the committed results/<device>-logprobs.{csv,md}

Every provider returns ``logprobs + entropy`` per token, so the backward carries the upstream
gradients of both outputs (what the PPO loss + entropy bonus does). The shapes (BENCHMARKS.md)
are defined here: lp-s (CPU, fp32), lp-l (GPU, bf16), lp-t (smoke test).
"""
try:
    from benchmarks import _path  # noqa: F401
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import _path  # noqa: F401

import torch
import torch.utils.checkpoint

from benchmarks import common
from benchmarks.shapes import Shape

OPS = ("logprobs",)
SHAPES = {
    "lp-s": Shape("lp-s", "logprobs", dict(N=2048, H=512, V=32000), "fp32"),
    "lp-l": Shape("lp-l", "logprobs", dict(N=8192, H=4096, V=151936), "bf16"),
    "lp-t": Shape("lp-t", "logprobs", dict(N=97, H=59, V=1025), "fp32", note="smoke test"),
}
DEFAULT = {"cpu": ("lp-s",), "cuda": ("lp-l",)}
CHUNK_TOKENS = 256  # tokens per chunk of the chunked plain-PyTorch baseline


def make_inputs(shape, device, seed=0):
    """hidden [N, H] and weight [V, H] (requiring grad, in the shape's dtype), int64 targets."""
    d = shape.dims
    N, H, V = d["N"], d["H"], d["V"]
    g = torch.Generator().manual_seed(seed)
    dt = shape.torch_dtype
    hidden = torch.randn(N, H, generator=g).to(device, dt).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(device, dt).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    return (hidden, weight, targets)


def naive(hidden, weight, targets):
    """What training code does today: full fp32 logits, log_softmax, gather, entropy."""
    logits = (hidden @ weight.t()).float()
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(-1, targets[:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp + ent


def chunked(hidden, weight, targets):
    """Plain PyTorch, CHUNK_TOKENS tokens at a time under activation checkpointing (the logits
    of a chunk are recomputed in the backward)."""
    outs = [torch.utils.checkpoint.checkpoint(naive, hidden[i:i + CHUNK_TOKENS], weight,
                                              targets[i:i + CHUNK_TOKENS], use_reentrant=False)
            for i in range(0, hidden.shape[0], CHUNK_TOKENS)]
    return torch.cat(outs)


def bytes_moved(shape):
    """The fewest bytes: forward reads hidden and weight once; backward reads them again and
    writes both gradients."""
    d = shape.dims
    e = torch.tensor([], dtype=shape.torch_dtype).element_size()
    io = (d["N"] + d["V"]) * d["H"] * e
    return {"forward": io + d["N"] * 16, "backward": 2 * io, "full": 3 * io}


def providers(device):
    import rmkernels as rmk

    def rmk_fn(be):
        def f(h, w, t):
            lp, ent = rmk.token_logprobs(h, w, t, return_entropy=True, backend=be)
            return lp + ent
        return f

    p = {"naive": naive, "compile": torch.compile(naive), "chunked-torch": chunked}
    for be in common.rmk_backends(device):
        p[f"rmk-{be}"] = rmk_fn(be)
    return p, rmk_fn("reference")


def run(op="logprobs", device="cpu", shapes=None, quick=False, tiny=False, only=None, log=common.log):
    names = shapes or (["lp-t"] if tiny else list(DEFAULT[device]))
    rows = []
    for name in names:
        shape = SHAPES[name]
        prov, ref = providers(device)
        prov = common.select(prov, only)
        inputs = make_inputs(shape, device)
        rows += common.bench_shape(op, shape, prov, inputs, grad_idx=(0, 1), reference=ref, device=device,
                                   bytes_per_mode=bytes_moved(shape), quick=quick, log=log)
        del inputs
    return rows


def write_results(argv=None):
    """``python benchmarks/bench_token_logprobs.py --results``: lp-s on one CPU thread, every
    provider, the full method (not --quick), written to the committed
    ``benchmarks/results/<device>-logprobs.csv`` and ``.md`` with the date, machine and command
    (BENCHMARKS.md's lp-s targets: peak memory and time against the naive path)."""
    def measure(device):
        return run(device=device, shapes=["lp-s"])

    return common.write_op_results(
        measure, name="logprobs", title="token log-probs + entropy", script="bench_token_logprobs.py", argv=argv,
        method="Peak memory: torch's allocation events above the inputs in one untimed call.")


if __name__ == "__main__":
    common.standalone_main(__import__(__name__))
