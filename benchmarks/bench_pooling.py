"""Benchmark last-token value-head pooling (``rmk.last_token_reward``) against hf / torch /
compile, forward, backward and full, on the named pooling shapes.

    python benchmarks/bench_pooling.py [--shapes pool-s pool-l] [--quick]
"""
try:
    from benchmarks import _path  # noqa: F401
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import _path  # noqa: F401

import torch

from benchmarks import baselines, common, report, shapes

OPS = ("pooling",)


def make_inputs(shape, device, seed=0):
    """hidden [B, T, H] and head weight [K, H] (requires grad, in the shape's dtype: HF keeps
    the score head in the model dtype), no bias (Llama's score head has none), an int64
    right-padded attention mask with lengths in [T/2, T] (row 0 full)."""
    d = shape.dims
    B, T, H, K = d["B"], d["T"], d["H"], d["K"]
    g = torch.Generator().manual_seed(seed)
    dt = shape.torch_dtype
    hidden = torch.randn(B, T, H, generator=g).to(device, dt).requires_grad_()
    weight = (torch.randn(K, H, generator=g) / H ** 0.5).to(device, dt).requires_grad_()
    lengths = torch.randint(max(T // 2, 1), T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None] < lengths[:, None]).long().to(device)
    return (hidden, weight, None, mask)


def bytes_moved(shape):
    """The fewest bytes each mode must move: forward reads the B picked rows (not B*T*H),
    the mask and the head, writes B*K rewards; backward writes grad_hidden once (B*T*H, zero
    but at the picked rows), reads the picked rows again and writes grad_weight."""
    d = shape.dims
    B, T, H, K = d["B"], d["T"], d["H"], d["K"]
    e = torch.tensor([], dtype=shape.torch_dtype).element_size()
    fwd = B * H * e + B * T * 8 + K * H * e + B * K * 4
    bwd = B * T * H * e + B * H * e + 2 * K * H * e + B * K * 4
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}


def providers(device):
    import rmkernels as rmk

    def rmk_fn(be):
        return lambda h, w, b, m: rmk.last_token_reward(h, w, b, attention_mask=m, backend=be)

    p = {"hf": baselines.pooling_hf, "torch": baselines.pooling_torch, "compile": baselines.compiled("pooling")}
    for be in common.rmk_backends(device):
        p[f"rmk-{be}"] = rmk_fn(be)
    reference = rmk_fn("reference")
    return p, reference


def run(op="pooling", device="cpu", shapes=None, quick=False, tiny=False, only=None, log=common.log):
    rows = []
    for shape in shapes_mod.for_op(op, device, shapes, tiny):
        prov, ref = providers(device)  # fresh compile per shape
        prov = common.select(prov, only)
        inputs = make_inputs(shape, device)
        floors = write_floors(inputs[0], device)
        if only:
            floors = {k: v for k, v in floors.items() if k in only}
        rows += common.bench_shape(op, shape, prov, inputs, grad_idx=(0, 1), reference=ref, device=device,
                                   bytes_per_mode=bytes_moved(shape), floors=floors, quick=quick, log=log)
        del inputs
    return rows


shapes_mod = shapes
FLOOR, FLOOR_HUGE = report.POOL_FLOORS  # the names report._pool_targets judges


def write_floors(hidden, device):
    """The floors of the backward and full modes (``common.bench_shape``'s ``floors``: timed in
    the same interleaved samples as the providers of each mode): ``floor-write-grad``, the time
    to allocate and write grad_hidden once (``torch.zeros_like(hidden)``), what every backward
    must at least do (BENCHMARKS.md: pool-l fwd+bwd within 1.2x of it); on the CPU also
    ``floor-write-grad, huge pages``, the same in memory given the advice the C++ kernel gives
    its fresh gradient while it zeroes and writes it (``_C.advise_huge_pages``,
    csrc/cpu/memory.cpp): a gradient over glibc's mmap threshold (pool-l's 256 MiB) is a fresh
    mapping on every call, and its 4 KiB page faults, not the zeroing, are most of
    ``floor-write-grad``."""
    nbytes = hidden.numel() * hidden.element_size()
    modes = ("backward", "full")
    floors = {FLOOR: (lambda: torch.zeros_like(hidden), modes, nbytes,
                      "torch.zeros_like(hidden): allocate + write grad_hidden once")}
    if device == "cpu" and common.has_op("last_token_reward"):
        # grad_hidden as the C++ kernel makes it (OutputPages), zeroed once
        huge = common.cpu_kernel_pages_write(lambda: torch.empty_like(hidden), lambda g: g.zero_())
        if huge is not None:
            floors[FLOOR_HUGE] = (huge, modes, nbytes, "torch.empty_like(hidden) advised for huge pages as the C++ "
                                  "kernel's gradient, zeroed once")
    return floors

if __name__ == "__main__":
    common.standalone_main(__import__(__name__))
