"""The named shapes of BENCHMARKS.md, so results can be compared over time.

Each shape has its GPU form (the one in BENCHMARKS.md) and, where the GPU form is too big
for a development CPU, a scaled-down CPU form. The scaling is never silent: every CSV row
records the dims and dtype that actually ran, and ``SCALED_ON_CPU`` lists what was changed.

The ``*-t`` shapes are tiny smoke-test shapes (not in BENCHMARKS.md): they exist so that
``tests/`` and ``--quick`` can run the whole machinery in seconds.
"""
from dataclasses import dataclass, field, replace
from typing import Dict, Optional

import torch


@dataclass(frozen=True)
class Shape:
    name: str
    op: str              # "pooling", "bt", "pair", "gae", "grpo", "rpp", "remax"
    dims: Dict[str, int] = field(default_factory=dict)
    dtype: str = "fp32"  # element type of the big inputs (hidden states / log-probs)
    opts: Dict[str, object] = field(default_factory=dict)  # op options (kl estimator, ...)
    note: str = ""

    def dims_str(self):
        return ",".join(f"{k}={v}" for k, v in self.dims.items())

    @property
    def torch_dtype(self):
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                "fp64": torch.float64}[self.dtype]


# BENCHMARKS.md, GPU form.
GPU_SHAPES = {
    "pool-s": Shape("pool-s", "pooling", dict(B=8, T=512, H=1024, K=1), "bf16"),
    "pool-l": Shape("pool-l", "pooling", dict(B=16, T=4096, H=4096, K=1), "bf16"),
    "bt-s": Shape("bt-s", "bt", dict(B=64), "fp32"),
    "bt-l": Shape("bt-l", "bt", dict(B=65536), "fp32"),
    "pair-l": Shape("pair-l", "pair", dict(B=8, T=2048, H=4096, K=1), "bf16",
                    note="B pairs: hidden is [2B, T, H]"),
    "gae-s": Shape("gae-s", "gae", dict(B=64, T=1024), "fp32", dict(kl_estimator="k1")),
    "gae-l": Shape("gae-l", "gae", dict(B=256, T=4096), "fp32", dict(kl_estimator="k3")),
    "gae-xl": Shape("gae-xl", "gae", dict(B=32, T=32768), "fp32", dict(kl_estimator="k1")),
    "grpo-l": Shape("grpo-l", "grpo", dict(B=65536, T=128, G=8), "fp32", note="8192 groups of 8, uid strings"),
    "grpo-xl": Shape("grpo-xl", "grpo", dict(B=1048576, T=1, G=8), "fp32", note="per-sequence, uid strings"),
    # ... and the same batches in the order verl's default balance_batch leaves them (not in
    # BENCHMARKS.md): rows randomly permuted, so a prompt's responses are seldom side by side
    "grpo-l-bb": Shape("grpo-l-bb", "grpo", dict(B=65536, T=128, G=8, perm=1), "fp32",
                       note="grpo-l, rows randomly permuted (verl's balance_batch order)"),
    "grpo-xl-bb": Shape("grpo-xl-bb", "grpo", dict(B=1048576, T=1, G=8, perm=1), "fp32",
                        note="grpo-xl, rows randomly permuted (verl's balance_batch order)"),
    # ... and grpo-l's rows with T = 1 (not in BENCHMARKS.md; the GPU check, information): the
    # statistics phases and grid syncs of grpo-l's batch without its [B, T] write
    "grpo-l-t1": Shape("grpo-l-t1", "grpo", dict(B=65536, T=1, G=8), "fp32",
                       note="grpo-l's batch with T = 1: the op's fixed cost at B = 65536"),
    # REINFORCE++ and ReMax (issue 14; not in BENCHMARKS.md): grpo-l's batch
    "rpp-l": Shape("rpp-l", "rpp", dict(B=65536, T=128), "fp32", note="REINFORCE++, gamma 1"),
    "remax-l": Shape("remax-l", "remax", dict(B=65536, T=128), "fp32", note="ReMax"),
    # ... and gae-xl's few long rows (on a GPU the CUDA kernel splits them into pieces)
    "rpp-xl": Shape("rpp-xl", "rpp", dict(B=32, T=32768), "fp32", note="REINFORCE++, gamma 1, few long rows"),
    "remax-xl": Shape("remax-xl", "remax", dict(B=32, T=32768), "fp32", note="ReMax, few long rows"),
}

# On the CPU: fp32 everywhere (BENCHMARKS.md: pool-s is fp32 on the CPU), and the two giant
# hidden-state shapes scaled down along T (a 1 GiB fp32 hidden tensor, its 1 GiB gradient and
# the hf baseline's 1 GiB full-sequence head gradient do not fit a shared 2-core box's
# timing budget). The scaled shapes keep B and H, so the per-row work is the same.
SCALED_ON_CPU = {
    "pool-l": dict(dims=dict(B=16, T=1024, H=4096, K=1),
                   note="CPU: T 4096 -> 1024, bf16 -> fp32"),
    "pair-l": dict(dims=dict(B=8, T=512, H=4096, K=1),
                   note="B pairs: hidden is [2B, T, H]; CPU: T 2048 -> 512, bf16 -> fp32"),
}

TINY_SHAPES = {
    "pool-t": Shape("pool-t", "pooling", dict(B=3, T=17, H=32, K=1), "fp32", note="smoke test"),
    "bt-t": Shape("bt-t", "bt", dict(B=7), "fp32", note="smoke test"),
    "pair-t": Shape("pair-t", "pair", dict(B=3, T=17, H=32, K=1), "fp32", note="smoke test"),
    "gae-t": Shape("gae-t", "gae", dict(B=3, T=37), "fp32", dict(kl_estimator="k1"), note="smoke test"),
    "grpo-t": Shape("grpo-t", "grpo", dict(B=37, T=9, G=4), "fp32", note="smoke test"),
    "rpp-t": Shape("rpp-t", "rpp", dict(B=37, T=9), "fp32", note="smoke test"),
    "remax-t": Shape("remax-t", "remax", dict(B=37, T=9), "fp32", note="smoke test"),
}

NAMED = tuple(GPU_SHAPES)   # the BENCHMARKS.md order
OPS = ("pooling", "bt", "pair", "gae", "grpo", "rpp", "remax")


def get(name: str, device: str) -> Shape:
    """The shape that runs on `device` ("cpu" or "cuda") under `name`."""
    if name in TINY_SHAPES:
        return TINY_SHAPES[name]
    if name not in GPU_SHAPES:
        raise KeyError(f"unknown shape {name!r}; named: {', '.join(NAMED + tuple(TINY_SHAPES))}")
    s = GPU_SHAPES[name]
    if device == "cuda":
        return s
    s = replace(s, dtype="fp32", note="CPU: bf16 -> fp32" if s.dtype != "fp32" else "")
    if name in SCALED_ON_CPU:
        s = replace(s, **SCALED_ON_CPU[name])
    return s


def for_op(op: str, device: str, names: Optional[list] = None, tiny: bool = False):
    pool = names or (list(TINY_SHAPES) if tiny else list(NAMED))
    out = []
    for n in pool:
        s = get(n, device)
        if s.op == op:
            out.append(s)
    return out
