"""The host overhead of a call: each public function at a tiny shape against the kernel ops it
reaches, called directly (BENCHMARKS.md: "any op, full call, C++ backends: <= 15 us CPU overhead
per call on a GPU machine").

    python benchmarks/bench_overhead.py [--device cuda] [--quick] [--shapes bradley_terry_loss gae]
    python benchmarks/bench_overhead.py --results   # the committed results/<device>-overhead.{csv,md}

At a tiny shape (a few rows: the kernels' own work is a few microseconds) each public function
``rmk.<name>`` is timed as a user calls it (``rmk-<backend>``: inputs that require a gradient
where the op has one, so the eager fast path's ``autograd.Function`` runs), and so are the
kernel ops that call reached, called directly with the very arguments it gave them
(``kernels-<backend>``: recorded in one untimed call through ``rmkernels._registry.Kernel``,
then replayed in order). The difference is the package's cost above its kernels: argument
checks, the routing, the autograd ``Function`` and the small torch ops between kernels (a sum,
a cast, an index). Modes: ``forward``, and ``full`` (forward + ``torch.autograd.grad`` of the
first output, for the ops with a gradient; the replay adds the backward's kernel ops, while the
function's row also pays torch's autograd engine, which any autograd op pays). On the CPU a
third provider, ``rmk-<backend>-nochecks``, times the same call with the data checks off: CPU
tensors always get them (rows with no valid token, group-id ranges, ...: small torch ops and a
read of their result), GPU tensors only with ``rmk.checks(True)``, so this row is the Python a
GPU machine's call runs, the CPU's stand-in for the target.

The clock is the calling thread's CPU time (one torch thread): on a GPU the kernels run
asynchronously and a sample synchronises the device only after its clock has stopped, so the
figure is the host's time per call, the CPU overhead of the target. The providers of a
function are sampled in turn (interleaved), medians over the samples. The report
(``report._overhead_targets``) judges the call (``forward``) on a GPU machine, the target's;
on the CPU, and for ``full``, its figures are information.
"""
try:
    from benchmarks import _path  # noqa: F401
except ImportError:
    import _path  # noqa: F401

import contextlib
import math
import time

import torch

from benchmarks import common, report, timing

OPS = ("overhead",)
NO_DATA_CHECKS = report.NO_DATA_CHECKS  # the provider suffix of a CPU call timed with the data checks off


def _cases(device):
    """{public function name: (dims, make)}; ``make()`` -> (call, grad_inputs): ``call()``
    runs the function once on fresh-enough tiny inputs made once (``grad_inputs``: the inputs
    its gradient flows to, empty for an op without one)."""
    import rmkernels as rmk

    g = torch.Generator().manual_seed(0)

    def rn(*size, grad=False):
        return torch.randn(*size, generator=g).to(device).requires_grad_(grad)

    B, T, H, V, K = 4, 16, 32, 64, 4
    lengths = torch.tensor([16, 9, 12, 5])
    mask = (torch.arange(T)[None] < lengths[:, None]).to(device)
    mask2 = mask.repeat(2, 1)

    def pooling():
        h, w, b = rn(B, T, H, grad=True), rn(1, H, grad=True), rn(1, grad=True)
        return (lambda: rmk.last_token_reward(h, w, b, attention_mask=mask)), (h, w, b)

    def index():
        return (lambda: rmk.last_token_index(mask)), ()

    def bt():
        c, r = rn(64, grad=True), rn(64, grad=True)
        return (lambda: rmk.bradley_terry_loss(c, r)), (c, r)

    def pair():
        h, w, b = rn(2 * B, T, H, grad=True), rn(1, H, grad=True), rn(1, grad=True)
        return (lambda: rmk.pairwise_reward_loss(h, w, b, attention_mask=mask2)), (h, w, b)

    def ranking():
        r = rn(8, K, grad=True)
        return (lambda: rmk.ranking_loss(r)), (r,)

    def ppo():
        lp, ref, v, s = rn(B, T), rn(B, T), rn(B, T), rn(B)
        return (lambda: rmk.ppo_advantages(lp, ref, v, s, mask, kl_coef=0.05)), ()

    def whiten():
        x = rn(B, T)
        return (lambda: rmk.masked_whiten(x, mask)), ()

    def gae():
        r, v = rn(B, T), rn(B, T)
        return (lambda: rmk.gae(r, v, mask)), ()

    def kl():
        lp, ref = rn(B, T), rn(B, T)
        return (lambda: rmk.kl_estimate(lp, ref, mask, estimator="k3")), ()

    def group():
        s, ids = rn(8), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1], device=device)
        m = mask.repeat(2, 1)
        return (lambda: rmk.group_advantages(s, ids, m, estimator="grpo")), ()

    def rpp():
        r = rn(B, T)
        return (lambda: rmk.reinforce_pp_advantages(r, mask)), ()

    def remax():
        r, b = rn(B, T), rn(B)
        return (lambda: rmk.remax_advantages(r, b, mask)), ()

    def logprobs():
        h, w, t = rn(16, H, grad=True), rn(V, H, grad=True), torch.randint(0, V, (16,), generator=g).to(device)
        return (lambda: rmk.token_logprobs(h, w, t)), (h, w)

    return {
        "last_token_reward": (f"B={B},T={T},H={H},K=1", pooling),
        "last_token_index": (f"B={B},T={T}", index),
        "bradley_terry_loss": ("B=64 pairs", bt),
        "pairwise_reward_loss": (f"B={B} pairs,T={T},H={H}", pair),
        "ranking_loss": (f"B=8,K={K}", ranking),
        "ppo_advantages": (f"B={B},T={T},k1,whiten", ppo),
        "masked_whiten": (f"B={B},T={T}", whiten),
        "gae": (f"B={B},T={T}", gae),
        "kl_estimate": (f"B={B},T={T},k3", kl),
        "group_advantages": ("B=8,T=16,G=4,grpo", group),
        "reinforce_pp_advantages": (f"B={B},T={T}", rpp),
        "remax_advantages": (f"B={B},T={T}", remax),
        "token_logprobs": (f"N=16,H={H},V={V}", logprobs),
    }


@contextlib.contextmanager
def _recording(calls):
    """Every kernel call (``rmkernels._registry.Kernel``: the one way a public op reaches a
    kernel on any backend) appended to ``calls`` as (kernel, backend, args) while inside."""
    from rmkernels import _registry

    run = _registry.Kernel.__call__

    def record(self, backend, *args):
        calls.append((self, backend, args))
        return run(self, backend, *args)

    _registry.Kernel.__call__ = record
    try:
        yield run
    finally:
        _registry.Kernel.__call__ = run


def _first(out):
    return out if isinstance(out, torch.Tensor) else common.primary(out)


def _calls(call, grad_inputs, mode):
    """(the function's call, the replay of its kernel ops, how many kernel calls) in ``mode``."""
    recorded = []
    with _recording(recorded) as run:
        out = _first(call())
        ones = torch.ones_like(out)
        if mode == "full":
            torch.autograd.grad(out, grad_inputs, ones, allow_unused=True)
    del out

    def replay():
        with torch.no_grad():
            for kernel, backend, args in recorded:
                run(kernel, backend, *args)

    if mode == "forward":
        return call, replay, len(recorded)

    def full():
        torch.autograd.grad(_first(call()), grad_inputs, ones, allow_unused=True)
    return full, replay, len(recorded)


def _without_data_checks(fn):
    """``fn`` with the data checks off (``_checks.shape_checks_only``), as a call on GPU tensors
    runs by default: on the CPU, where they always run (a device-to-host read each on a GPU), the
    Python a GPU machine's call runs. The switch itself (a list append and pop) is timed too."""
    from rmkernels import _checks

    def run():
        with _checks.shape_checks_only():
            return fn()
    return run


def _sample(fn, n, device, now):
    """Host seconds per call over ``n`` calls; the device is synchronised after the clock stops."""
    t0 = now()
    for _ in range(n):
        fn()
    dt = now() - t0
    if device == "cuda":
        torch.cuda.synchronize()
    return dt / n


def _measure(fns, device, reps, min_sample_s=5e-3):
    """{name: (median, p20, p80) ms per call} of ``fns``, sampled in turn."""
    now = timing.clock(device)[0] if device == "cpu" else time.thread_time
    for f in fns.values():
        for _ in range(20):
            f()
    if device == "cuda":
        torch.cuda.synchronize()
    ns = {k: max(1, min(2000, math.ceil(min_sample_s / max(_sample(f, 20, device, now), 1e-7))))
          for k, f in fns.items()}
    samples = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            samples[k].append(_sample(f, ns[k], device, now) * 1e3)
    return {k: timing.quantiles(v) for k, v in samples.items()}


def run(op="overhead", device="cpu", shapes=None, quick=False, tiny=False, only=None, log=common.log):
    """Tidy rows (op ``overhead``, the function's name as the shape; metric ``call_ms``) of
    every public function (``shapes``: only these), for every built backend."""
    import rmkernels as rmk

    del op, tiny  # one op; its shapes are always tiny
    cases = _cases(device)
    unknown = sorted(set(shapes or ()) - set(cases))
    if unknown:
        raise SystemExit(f"bench_overhead: unknown function(s) {unknown}; known: {sorted(cases)}")
    env = common.env_fields(device)
    rows = []
    reps = 3 if quick else 41  # (the two cores drift over seconds: more samples, steadier medians)
    for name, (dims, make) in cases.items():
        if shapes and name not in shapes:
            continue
        for be in common.rmk_backends(device):
            if only and not {f"rmk-{be}", f"kernels-{be}"} & set(only):
                continue  # (a Triton call would compile its kernels first)
            with rmk.use_backend(be):
                call, grad_inputs = make()
                for mode in ("forward", "full") if grad_inputs else ("forward",):
                    fn, replay, k = _calls(call, grad_inputs, mode)
                    fns = {f"rmk-{be}": fn, f"kernels-{be}": replay}
                    if device == "cpu":  # (a GPU call runs without them already)
                        fns[f"rmk-{be}{NO_DATA_CHECKS}"] = _without_data_checks(fn)
                    fns = common.select(fns, only)
                    res = _measure(fns, device, reps)
                    base = dict(op="overhead", shape=name, dims=dims, dtype="fp32", mode=mode, metric="call_ms",
                                unit="ms", bytes=0, samples=reps, **env)
                    for p, (med, p20, p80) in res.items():
                        note = (f"{k} kernel call(s)" if p.startswith("kernels-") else
                                "the public function, data checks off" if p.endswith(NO_DATA_CHECKS) else
                                "the public function")
                        rows.append(dict(base, provider=p, median=med, p20=p20, p80=p80, note=note))
                    line = "  ".join(f"{p} {v[0] * 1e3:.1f} us" for p, v in res.items())
                    log(f"  overhead {name:24s} {mode:8s} {line}")
    return rows


def write_results(argv=None):
    """``python benchmarks/bench_overhead.py --results``: every function on one CPU thread, the
    full method, written to the committed ``benchmarks/results/<device>-overhead.csv`` and ``.md``."""
    return common.write_op_results(
        lambda device: run(device=device), name="overhead", title="host overhead per call", script="bench_overhead.py",
        argv=argv,
        method=("Thread CPU time per call at tiny shapes; `kernels-*` = the kernel ops a call reached, called "
                "directly with the arguments it gave them; the overhead is the difference (the report's targets)."))


if __name__ == "__main__":
    common.standalone_main(__import__(__name__))
