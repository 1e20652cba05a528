"""GPU parts of scripts/gpu_check.sh that are Python: one small call of every public op.

    python scripts/gpu_check_ops.py extension            # the built extension loads (with CUDA on a
                                                         # GPU machine), has no libstdc++ of its own,
                                                         # and its streams work (a check message keeps
                                                         # its numbers, huge_pages() reads sysfs)
    python scripts/gpu_check_ops.py list                 # the ops and backends it covers (each
                                                         # call checked once on CPU, reference)
    python scripts/gpu_check_ops.py sanitize             # small forward + backward of each op on
                                                         # each CUDA backend (run under compute-sanitizer)
    python scripts/gpu_check_ops.py graphs OUT.json      # CUDA-graph capture + replay of each op,
                                                         # compared with eager; a table on stdout
    python scripts/gpu_check_ops.py profile              # the group-advantage kernels (issue 14)
                                                         # at grpo-l and grpo-xl, twice each, for
                                                         # a profiler around it (ncu in gpu_check.sh)

Ops that are not in this checkout yet (added by other branches) are listed as absent, not
failed. Exit status: 0 when every present op passed, 1 otherwise.
"""
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import rmkernels as rmk  # noqa: E402

BACKENDS = ("cuda", "triton")


def _cases(dev):
    """name -> (function of a backend returning a tuple of tensors, inputs needing grad)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dev, dtype)

    B, T, H, K = 4, 37, 96, 2
    hidden = rnd(B, T, H, dtype=torch.bfloat16).requires_grad_(True)
    w, b = rnd(K, H).requires_grad_(True), rnd(K).requires_grad_(True)
    mask = (torch.arange(T)[None] < torch.tensor([37, 5, 20, 1])[:, None]).to(dev)
    pair_h = rnd(2 * B, T, H).requires_grad_(True)
    w1, b1 = rnd(1, H).requires_grad_(True), rnd(1).requires_grad_(True)  # one reward per sequence
    pair_mask = torch.cat([mask, mask.flip(1)])
    c, r = rnd(64).requires_grad_(True), rnd(64).requires_grad_(True)
    rank = rnd(9, 5).requires_grad_(True)
    lp = -torch.rand(B, T, generator=g).to(dev)
    ref = lp + 0.3 * rnd(B, T)
    vals = rnd(B, T)
    scores = rnd(B)
    gids = torch.tensor([1, 0, 1, 2]).to(dev)  # two responses to prompt 1, one each to 0 and 2
    long_vals = rnd(3, 2300)
    long_mask = (torch.arange(2300)[None] < torch.tensor([2300, 1500, 2100])[:, None]).to(dev)
    cases = {
        "last_token_index": (lambda be: (rmk.last_token_index(mask),), []),
        "last_token_reward": (lambda be: (rmk.last_token_reward(hidden, w, b, attention_mask=mask, backend=be),),
                              [hidden, w, b]),
        "bradley_terry_loss": (lambda be: (rmk.bradley_terry_loss(c, r, margin=0.1, label_smoothing=0.1,
                                                                  center_coef=0.01, backend=be),), [c, r]),
        "pairwise_reward_loss": (lambda be: rmk.pairwise_reward_loss(pair_h, w1, b1, attention_mask=pair_mask,
                                                                     backend=be), [pair_h, w1, b1]),
        "ranking_loss": (lambda be: (rmk.ranking_loss(rank, backend=be),), [rank]),
        "ppo_advantages": (lambda be: tuple(rmk.ppo_advantages(lp, ref, vals, scores, mask, kl_coef=0.05,
                                                               kl_estimator="k3", backend=be)), []),
        "masked_whiten": (lambda be: (rmk.masked_whiten(vals, mask, backend=be),), []),
        # the critic-free advantages (SPEC 5): the CUDA kernel is one cooperative launch
        "group_advantages": (lambda be: tuple(t for est in ("grpo", "rloo", "opo", "gpg", "reinforce_pp_baseline")
                                              for t in rmk.group_advantages(scores, gids, mask, estimator=est,
                                                                            backend=be)), []),
        "reinforce_pp_returns": (lambda be: (rmk.reinforce_pp_returns(vals, mask, gamma=0.99, backend=be),), []),
        # REINFORCE++ / ReMax in one op: the CUDA kernel is one cooperative launch
        "reinforce_pp_advantages": (lambda be: tuple(rmk.reinforce_pp_advantages(vals, mask, gamma=0.99,
                                                                                 backend=be)), []),
        "remax_advantages": (lambda be: tuple(rmk.remax_advantages(vals, scores, mask, backend=be)), []),
        # ... with rows long enough (>= 2 x 1024) for the CUDA kernel to split them into pieces
        "reinforce_pp_advantages (split rows)": (lambda be: tuple(rmk.reinforce_pp_advantages(
            long_vals, long_mask, gamma=0.99, backend=be)), []),
        "remax_advantages (split rows)": (lambda be: tuple(rmk.remax_advantages(long_vals, scores[:3], long_mask,
                                                                                backend=be)), []),
    }
    # Ops other branches add: covered here once they exist.
    if hasattr(rmk, "gae"):
        cases["gae"] = (lambda be: tuple(rmk.gae(vals, vals, mask, gamma=0.99, lam=0.95, backend=be)), [])  # SPEC 4
    if hasattr(rmk, "kl_estimate"):
        cases["kl_estimate"] = (lambda be: (rmk.kl_estimate(lp, ref, mask=mask, estimator="k3", backend=be),), [])
    return cases


def _run(fn, be, needs_grad):
    outs = fn(be)
    floats = [o for o in outs if o.is_floating_point()]
    grads = ()
    if needs_grad:
        loss = sum(o.float().nan_to_num().sum() for o in floats if o.requires_grad)
        grads = torch.autograd.grad(loss, needs_grad, allow_unused=True)
    return tuple(o.detach() for o in outs) + tuple(gr for gr in grads if gr is not None)


def cmd_extension():
    """rmkernels._C as the GPU stages need it, before any of them: loaded (with its CUDA kernels
    where a GPU is), taking libstdc++ from torch's shared library, and its iostreams working.
    On the H200 of 2026-12-04 a static libstdc++ in the extension crashed every check message that
    formats a number and rmkernels._C.huge_pages(): the failures came one test and one benchmark
    at a time; here they are one stage."""
    from rmkernels import _ext
    from rmkernels._libstdcxx import own_copy

    if not _ext.CPP_AVAILABLE:
        print(f"FAIL the extension did not load: {_ext.LOAD_ERROR}")
        return 1
    gpu = torch.cuda.is_available()
    if gpu and not _ext.CUDA_BUILT:
        print("FAIL the extension loaded without its CUDA kernels on a GPU machine")
        return 1
    own = own_copy(_ext._C.__file__)
    print(f"{'FAIL' if own else 'ok  '} libstdc++ of its own: {own or 'none'} ({_ext._C.__file__})")
    print(f"ok   huge_pages() = {_ext._C.huge_pages()}", flush=True)
    failed = bool(own)
    for dev in ("cpu", "cuda") if gpu else ("cpu",):
        x, m = torch.randn(3, 8, device=dev), torch.ones(3, 8, dtype=torch.bool, device=dev)
        try:
            torch.ops.rmkernels.gae_kernel(torch.randn(3, 9, device=dev), x, m, 1.0, 0.95, True)
            msg = "no error raised"
        except ValueError as err:
            msg = str(err)
        ok = "rewards must be [B, T] = [3, 8], got [3, 9]" in msg
        failed |= not ok
        first = msg.splitlines()[0] if msg else "(empty)"
        print(f"{'ok  ' if ok else 'FAIL'} {dev} check message: {first}", flush=True)
    return 1 if failed else 0


def cmd_list():
    """The ops the GPU stages cover, each called once on CPU tensors with the reference
    backend, so that a broken call is found before the GPU window."""
    failed = 0
    cases = _cases("cpu")
    for name, (fn, needs) in cases.items():
        try:
            _run(fn, "reference", needs)
            print(f"{name}: backends {', '.join(BACKENDS)} (the call runs on cpu/reference)")
        except Exception as e:  # noqa: BLE001
            failed += 1
            print(f"FAIL {name}: the call fails on cpu/reference: {type(e).__name__}: {e}")
    for absent in ("gae", "kl_estimate"):
        if absent not in cases:
            print(f"{absent}: absent from this checkout")
    return 1 if failed else 0


def _attempt(label, call):
    """Runs call() and waits for the device: prints "ok label" and returns 0, or prints the
    failure and returns 1 (every op and backend is reported, none stops the run)."""
    try:
        call()
        torch.cuda.synchronize()
        print(f"ok {label}", flush=True)
        return 0
    except Exception as e:  # noqa: BLE001 - report every op
        print(f"FAIL {label}: {type(e).__name__}: {e}", flush=True)
        return 1


def cmd_sanitize():
    dev = torch.device("cuda")
    failed = 0
    for name, (fn, needs) in _cases(dev).items():
        for be in BACKENDS:
            failed += _attempt(f"{name} {be}", lambda fn=fn, be=be, needs=needs: _run(fn, be, needs))
    return 1 if failed else 0


def cmd_graphs(out_json):
    dev = torch.device("cuda")
    rows, failed = [], 0
    for name, (fn, needs) in _cases(dev).items():
        for be in BACKENDS:
            row = {"op": name, "backend": be}
            t0 = time.time()
            try:
                eager = _run(fn, be, needs)
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(2):
                        _run(fn, be, needs)
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static = _run(fn, be, needs)
                graph.replay()
                torch.cuda.synchronize()
                same = all(torch.equal(a.nan_to_num(), b.nan_to_num()) or
                           torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-6, equal_nan=True)
                           for a, b in zip(static, eager))
                row["status"] = "ok" if same else "MISMATCH (replay differs from eager)"
                failed += not same
            except Exception as e:  # noqa: BLE001
                failed += 1
                row["status"] = f"FAIL {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                row["traceback"] = traceback.format_exc()[-3000:]
            row["seconds"] = round(time.time() - t0, 2)
            rows.append(row)
            print(f"| {name} | {be} | {row['status']} |", flush=True)
    with open(out_json, "w") as f:
        json.dump(rows, f, indent=1)
    return 1 if failed else 0


# grpo-l and grpo-xl of benchmarks/shapes.py, as (B, T, G): what the GPU target is judged at.
PROFILE_SHAPES = ((65536, 128, 8), (1048576, 1, 8))


def cmd_profile(estimators=("grpo",)):
    """Each estimator's group advantages on each backend at PROFILE_SHAPES, two calls each (the
    first compiles Triton's), in verl's layout: the G responses of a prompt side by side, random
    lengths. The kernels are what a profiler wrapped around this process measures."""
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    failed = 0
    for B, T, G in PROFILE_SHAPES:
        ids = (torch.arange(B) // G).to(dev)
        lengths = torch.randint(max(T // 2, 1), T + 1, (B,), generator=g)
        mask = (torch.arange(T)[None] < lengths[:, None]).to(dev)
        scores = ((torch.rand(B, generator=g) < 0.5).float() + 0.1 * torch.randn(B, generator=g)).to(dev)
        for est in estimators:
            for be in BACKENDS:
                failed += _attempt(f"{est} {be} B={B} T={T}", lambda s=scores, i=ids, m=mask, e=est, b=be: [
                    rmk.group_advantages(s, i, m, estimator=e, backend=b) for _ in range(2)])
    return 1 if failed else 0


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "list"
    if cmd == "extension":
        sys.exit(cmd_extension())
    if cmd == "list":
        sys.exit(cmd_list())
    if cmd == "sanitize":
        sys.exit(cmd_sanitize())
    if cmd == "graphs":
        sys.exit(cmd_graphs(sys.argv[2]))
    if cmd == "profile":
        sys.exit(cmd_profile())
    sys.exit(f"unknown command {cmd!r}: extension, list, sanitize, graphs OUT.json or profile")
