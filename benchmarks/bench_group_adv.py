"""Benchmark critic-free GRPO advantages (``rmk.group_ids`` + ``rmk.group_advantages``) against
verl's loop (``hf``: the default ``compute_grpo_outcome_advantage``), verl's vectorized GRPO
(``verl-vec``), plain torch and its torch.compile, on grpo-l / grpo-xl.

    python benchmarks/bench_group_adv.py [--shapes grpo-l grpo-xl] [--quick] [--threads 1]
    python benchmarks/bench_group_adv.py --results   # the committed results/<device>-grpo.{csv,md}

Every provider gets what verl passes: ``token_level_rewards`` [B, T] fp32 (the score at the
last valid token), a bool ``response_mask`` [B, T] and ``index``, a numpy object array of uid
strings (one uuid4-style string per prompt, repeated for its G consecutive responses; in the
``*-bb`` shapes the rows are then randomly permuted, the order verl's default ``balance_batch``
leaves them in), and the full call is timed, the uid -> group-id mapping included. Two more rows, ``write-once``
(allocating and writing the float32 [B, T] output once: BENCHMARKS.md's "<= 1.3x writing
[B, T] once") and ``read-inputs`` (reading the token rewards and the mask once), are timed
interleaved with the full call and with ``rmk-<backend>-op``, the op alone (group ids and
summed scores given); on the CPU once with the outputs in recycled memory and once in fresh
pages (``floor_rows``).
verl's loop is left out above 100k responses (it takes ~15 s a call at 1M) and on a GPU: verl
runs it on the driver's CPU tensors, and on GPU tensors its ~4 small launches per response
(seconds a call at grpo-l) would take the GPU check's whole stage.
"""
try:
    from benchmarks import _path  # noqa: F401
except ImportError:
    import _path  # noqa: F401

import uuid
from contextlib import nullcontext

import numpy as np
import torch

from benchmarks import baselines, common, report, shapes, timing

OPS = ("grpo",)
EPS = 1e-6
LOOP_MAX_B = 100_000


def make_inputs(shape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T, G = shape.dims["B"], shape.dims["T"], shape.dims["G"]
    P = -(-B // G)
    labels = [str(uuid.UUID(int=int(x))) for x in torch.randint(0, 2**62, (P, 2), generator=g).prod(1).abs()]
    index = np.array([labels[i // G] for i in range(B)], dtype=object)
    lengths = torch.randint(max(T // 2, 1), T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).to(device)
    scores = (torch.rand(B, generator=g) < 0.5).float() + 0.1 * torch.randn(B, generator=g)
    tlr = torch.zeros(B, T)
    tlr[torch.arange(B), lengths - 1] = scores
    if shape.dims.get("perm"):  # verl's default balance_batch reorders the rows (the *-bb shapes)
        perm = torch.randperm(B, generator=g)
        tlr, mask, index = tlr[perm], mask[perm.to(mask.device)], index[perm.numpy()]
    return (tlr.to(device), mask, index)


def bytes_moved(shape):
    """The [B, T] token rewards read once (verl sums them), the bool mask read once, the
    float32 [B, T] advantages written once."""
    B, T = shape.dims["B"], shape.dims["T"]
    return {"forward": B * T * 4 + B * T + B * T * 4}


def providers(device, B):
    p = {"verl-vec": lambda r, m, i: baselines.grpo_verl_vectorized(r, m, i, EPS),
         "torch": lambda r, m, i: baselines.grpo_torch(r, m, i, EPS)}
    if B <= LOOP_MAX_B and device == "cpu":
        p = {"hf": lambda r, m, i: baselines.grpo_hf(r, m, i, EPS), **p}
    comp = baselines.compiled("grpo")
    p["compile"] = lambda r, m, i: comp(r, baselines.uid_ids(i).to(r.device), m, EPS)
    reference = None
    if common.has_op("group_advantages"):
        import rmkernels as rmk

        def rmk_fn(be):
            def f(r, m, i):
                ids = rmk.group_ids(i).to(r.device)
                return rmk.group_advantages(r, ids, m, estimator="grpo", eps=EPS, backend=be).advantages
            return f
        def op_only(be):
            cache = {}

            def f(r, m, i):  # the op alone: ids and summed scores computed once, outside the timing
                key = (id(r), id(i))
                if key not in cache:
                    cache[key] = (rmk.group_ids(i).to(r.device), r.sum(-1))
                ids, s = cache[key]
                return rmk.group_advantages(s, ids, m, estimator="grpo", eps=EPS, backend=be).advantages
            return f
        for be in common.rmk_backends(device):
            p[f"rmk-{be}"] = rmk_fn(be)
            p[f"rmk-{be}-op"] = op_only(be)
        reference = rmk_fn("reference")
    return p, reference or p["torch"]


def floor_rows(shape, device, prov, inputs, quick, log, passed=None):
    """The floors, timed interleaved with the ``rmk-*`` providers (full call and op alone) that
    passed the correctness check (``passed``: their names; None: every one), one sample of each
    in turn: ``write-once`` allocates the float32 [B, T] output and writes it
    once (``torch.empty(B, T).fill_(1.0)``, BENCHMARKS.md's "<= 1.3x writing [B, T] once");
    ``read-inputs`` reads what the full call must read, once (the [B, T] token rewards and the
    mask, each by a vectorised ``amax``); their sum is the full call's memory floor. On the CPU,
    ``write-once, huge pages`` writes the output once into memory given the advice the C++
    kernels give their fresh outputs while they write them (``_C.advise_huge_pages``,
    csrc/cpu/memory.cpp): the same
    pages as ``rmk-cpu``'s output, where ``write-once`` has 4 KiB ones in fresh pages. On the CPU
    everything is measured twice, with the outputs in recycled memory and in fresh pages
    (``timing.output_memory``): which one a call meets otherwise depends on the allocation
    history of the process, and the page faults of a fresh 32 MiB output cost ~10x its write."""
    B, T = shape.dims["B"], shape.dims["T"]
    r, m, _ = inputs
    write_once, read_inputs, write_huge = report.GRPO_FLOORS
    fns = {write_once: lambda: torch.empty(B, T, device=device).fill_(1.0),
           read_inputs: lambda: (r.amax(), m.view(torch.uint8).amax())}
    if device == "cpu" and common.has_op("group_advantages"):
        # the output as the C++ kernels make it (OutputPages), written once
        huge = common.cpu_kernel_pages_write(lambda: torch.empty(B, T), lambda out: out.fill_(1.0))
        if huge is not None:
            fns[write_huge] = huge
    fns.update({k: (lambda f=f: f(*inputs)) for k, f in prov.items()
                if k.startswith("rmk-") and (passed is None or k in passed)})
    env = common.env_fields(device)
    rows = []
    for state in timing.OUTPUT_MEMORY if device == "cpu" else (None,):
        with timing.output_memory(state, reserve_bytes=8 * B * T * 4 + 2**26) if state else nullcontext() as om:
            if state and not om.ok:
                log(f"  grpo     {shape.name:7s} floors in {state}: not measured (needs glibc's mallopt)")
                continue
            counts = {}
            res = timing.measure_interleaved(om.calls(fns) if state else fns, device=device, counts=counts,
                                             reps=3 if quick else 15, warmup=1 if quick else 3,
                                             max_time_s=1.0 if quick else 15.0)
        w = res[write_once][0]
        log(f"  grpo     {shape.name:7s} forward  ms/call, {state or device}: "
            + "  ".join(f"{k} {v[0]:.4g} ({v[0] / w:.2f}x write-once)" for k, v in res.items()))
        for k, (med, p20, p80) in res.items():
            rows.append(dict(op="grpo", shape=shape.name, dims=shape.dims_str(), dtype=shape.dtype,
                             provider=report.floor_provider(k, state), mode="forward", metric="call_ms", median=med,
                             p20=p20, p80=p80, unit="ms", bytes=B * T * 4, samples=counts[k],
                             note=f"timed interleaved with the floors ({state or device})", **env))
    return rows


def run(op="grpo", device="cpu", shapes=None, quick=False, tiny=False, only=None, log=common.log):
    rows = []
    for shape in shapes_mod.for_op(op, device, shapes, tiny):
        prov, ref = providers(device, shape.dims["B"])
        prov = common.select(prov, only)
        inputs = make_inputs(shape, device)
        op_bytes = {"forward": report.grpo_op_bytes(shape.dims_str())}  # the op alone moves less
        shape_rows = common.bench_shape(op, shape, prov, inputs, grad_idx=(), reference=ref, device=device,
                                        bytes_per_mode=bytes_moved(shape), quick=quick, log=log,
                                        provider_bytes={k: op_bytes for k in prov if report.op_alone(k)})
        rows += shape_rows
        rows += floor_rows(shape, device, prov, inputs, quick, log, passed=common.passed(shape_rows))
    return rows


shapes_mod = shapes

RESULTS_SHAPES = ("grpo-l", "grpo-xl", "grpo-l-bb", "grpo-xl-bb")


def write_results(argv=None):
    """``python benchmarks/bench_group_adv.py --results``: grpo-l and grpo-xl, as they are and in
    balance_batch order, on one CPU thread, every provider (verl's loop left out at grpo-xl),
    the full method (not --quick), written to the committed
    ``benchmarks/results/<device>-grpo.csv`` and ``.md`` (the report's tidy rows, table and
    targets), with the date, machine and command. A full ``benchmarks/run.py`` also measures
    grpo into the main ``<device>.csv``; this file holds the grpo figures until then."""
    return common.write_op_results(
        lambda device: run("grpo", device=device, shapes=list(RESULTS_SHAPES)), name="grpo", title="grpo",
        script="bench_group_adv.py", argv=argv,
        method="The cores may be shared with other jobs. `write-once`, `read-inputs` and the `(vs floor, ...)` rows "
               "are timed interleaved, one sample of each in turn, once with the outputs in recycled memory and once "
               "in fresh pages.")


if __name__ == "__main__":
    common.standalone_main(__import__(__name__))
