"""GPU readiness without a GPU: what can be proven on a CPU-only machine about the GPU paths.

1. Triton ahead-of-time compile. Every public function is driven with backend="triton" on CPU
   tensors while ``JITFunction.run`` is replaced by a recorder: the host wrappers run for real
   (shape logic, allocation, argument packing), and each launch they make is captured with
   the exact signature, constexprs and specialization attributes that Triton's own binder
   computes for a CUDA target (pointer dtypes, int32/int64 scalars, ints equal to 1,
   16-divisibility). A covering subset of the distinct launches is then compiled with
   ``triton.compile`` through cubin (the ptxas bundled in the triton wheel) for sm_90 and
   sm_80, plus each kernel once with every int argument as int64 (tensors past 2^31
   elements); RMKERNELS_AOT_ALL=1 compiles every distinct launch.
   No driver is touched, and this process must not have TRITON_INTERPRET=1. This catches the
   type errors the interpreter lets through (int32/int64 mixes, fp64 scalars, dtype
   constexprs, loops with runtime bounds) and the launch grids are checked against CUDA's
   limits (y, z <= 65535).
   Adding a kernel: give its op's public functions a few calls in ``_drive_<module>`` below;
   ``test_every_triton_kernel_is_launched`` fails until every @triton.jit function of
   ``rmkernels/triton/*.py`` is reached by a recorded launch.
2. The torch bindings of the CUDA kernels (csrc/cuda/*_binding.cpp, compiled only in a CUDA
   build) compile with the host compiler against this torch's headers and the CUDA toolkit's.
"""
import glob
import importlib
import itertools
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRITON_MODULES = sorted(os.path.splitext(os.path.basename(p))[0]
                        for p in glob.glob(os.path.join(ROOT, "rmkernels", "triton", "*.py"))
                        if not os.path.basename(p).startswith("_"))  # _common.py: helpers, no kernels
# CUDA's launch limits (compute capability >= 3.0).
MAX_GRID = (2**31 - 1, 65535, 65535)

# Under TRITON_INTERPRET=1 (set before import) @triton.jit makes interpreted functions that
# cannot be compiled: .ci/run runs this file in the main process, where it is not set.
needs_compiled_triton = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1",
                                           reason="the AOT compile needs the compiled (non-interpreted) Triton: "
                                       "run it in the main pytest process, without TRITON_INTERPRET=1")


# ---------------------------------------------------------------------------------------
# Recording the launches of the host wrappers
# ---------------------------------------------------------------------------------------
class Launch:
    def __init__(self, fn, signature, constexprs, attrs, kwargs, grid, floats=None):
        self.fn, self.signature, self.constexprs, self.attrs = fn, signature, constexprs, attrs
        self.floats = floats or {}  # the values of the float (not constexpr) arguments
        # The launch options given (num_warps...): parsed again by each target's backend,
        # since parsed options name the arch (sm90 options would make sm_80 code use sm_90
        # instructions).
        self.kwargs = {k: v for k, v in kwargs.items() if k not in signature}
        self.grid = grid

    @property
    def name(self):
        return f"{self.fn.module}.{self.fn.__name__}"

    def key(self):
        return (self.name, repr(self.signature), repr(sorted(self.constexprs.items())),
                repr(sorted(self.attrs.items())))

    def describe(self):
        sig = ", ".join(f"{k}: {v}" for k, v in self.signature.items() if v != "constexpr")
        cst = ", ".join(f"{self.fn.arg_names[p[0]]}={v}" for p, v in self.constexprs.items())
        return f"{self.name}({sig}; {cst}) grid={self.grid}"


def _recorder(launches):
    import triton.runtime.jit as jit
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 32))
    binders = {}

    def run(self, *args, grid, warmup, **kwargs):
        # What JITFunction.run does before it asks the driver for anything.
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        if self not in binders:
            binders[self] = jit.create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binders[self](*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
        if callable(grid):
            grid = grid(bound_args)
        grid = tuple(int(g) for g in grid)
        floats = {k: v for k, v in bound_args.items() if signature.get(k) == "fp32" and isinstance(v, float)}
        launches.append(Launch(self, signature, constexprs, attrs, kwargs, grid, floats))
        return None

    return run


def _drive_pooling(rmk):
    """Every launch configuration of rmkernels/triton/pooling.py."""
    B, T, H = 3, 37, 80
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for packed, has_bias, grads in itertools.product((False, True), (False, True),
                                                         ((True, True, True), (True, False, False),
                                                          (False, True, False), (False, False, True))):
            gh, gw, gb = grads
            if gb and not has_bias:
                continue
            h = torch.randn(7 * B if packed else B, *(() if packed else (T,)), H, dtype=dt, requires_grad=gh)
            w = torch.randn(2, H, dtype=dt, requires_grad=gw)
            bias = torch.randn(2, dtype=dt, requires_grad=gb) if has_bias else None
            if packed:
                r = rmk.last_token_reward(h, w, bias, cu_seqlens=torch.tensor([0, 5, 12, 21]), backend="triton")
            else:
                r = rmk.last_token_reward(h, w, bias, lengths=torch.tensor([T, 5, 1]), backend="triton")
            r.sum().backward()
    for mdt in (torch.bool, torch.int64, torch.int32, torch.uint8, torch.float32):
        mask = torch.ones(B, T, dtype=mdt)
        rmk.last_token_index(mask, backend="triton")
        rmk.last_token_reward(torch.randn(B, T, H), torch.randn(1, H), attention_mask=mask, backend="triton")
    # Strided hidden states (a view: stride_t = 2H), K > 65535 (a last-token LM head).
    big = torch.randn(B, T, 2 * H)[:, :, :H]
    rmk.last_token_reward(big, torch.randn(1, H), lengths=torch.tensor([T, 1, 2]), backend="triton")
    h = torch.randn(B, T, 16, requires_grad=True)
    w = torch.randn(70000, 16, requires_grad=True)
    rmk.last_token_reward(h, w, torch.randn(70000, requires_grad=True), lengths=torch.tensor([T, 1, 2]),
                          backend="triton").sum().backward()


def _drive_bt_loss(rmk):
    """Every launch configuration of rmkernels/triton/bt_loss.py."""
    B = 41
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for reduction, margin, weights, center, grads in itertools.product(
                ("none", "mean", "sum"), (None, 0.5, "tensor"), (None, "tensor"), (0.0, 0.01),
                ((True, True), (True, False), (False, True))):
            c = torch.randn(B, dtype=dt, requires_grad=grads[0])
            r = torch.randn(B, dtype=dt, requires_grad=grads[1])
            m = torch.rand(B, dtype=dt) if margin == "tensor" else margin
            w = torch.rand(B, dtype=dt) if weights == "tensor" else None
            loss = rmk.bradley_terry_loss(c, r, margin=m, weights=w, center_coef=center, label_smoothing=0.1,
                                          reduction=reduction, backend="triton")
            loss.sum().backward()
        # [B, 1] columns of a [B, 2] tensor: strided chosen / rejected.
        both = torch.randn(B, 2, dtype=dt, requires_grad=True)
        rmk.bradley_terry_loss(both[:, :1], both[:, 1:], backend="triton").backward()
        for nc in (None, torch.tensor([4, 2, 0, 1, 3])):
            x = torch.randn(5, 4, dtype=dt, requires_grad=True)
            rmk.ranking_loss(x, num_candidates=nc, backend="triton").backward()
        x = torch.randn(3, 40, dtype=dt, requires_grad=True)  # K > MAX_BLOCK_K: several tiles
        rmk.ranking_loss(x, backend="triton").backward()
        h = torch.randn(2 * B, 9, 48, dtype=dt, requires_grad=True)
        w = torch.randn(1, 48, dtype=dt, requires_grad=True)
        loss, _, _ = rmk.pairwise_reward_loss(h, w, lengths=torch.full((2 * B,), 9), backend="triton")
        loss.backward()


def _drive_ppo(rmk):
    """Every launch configuration of rmkernels/triton/ppo.py: each KL estimator, whitening
    options, the segmented long-row path (FORCE_SEGMENT_T, which on a GPU short batches of
    long rows take), 2-D and 3-D masked_whiten, REINFORCE++ and ReMax."""
    from rmkernels.triton import ppo as tppo

    B, T = 3, 40
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        lp, ref, v = (torch.randn(B, T, dtype=dt) for _ in range(3))
        scores, mask = torch.randn(B), torch.rand(B, T) > 0.3
        for est, (whiten, shift, unbiased), seg in itertools.product(
                ("k1", "abs", "k2", "k3"), ((True, True, True), (True, False, False), (False, True, True)),
                (None, 16)):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(tppo, "FORCE_SEGMENT_T", seg)
                rmk.ppo_advantages(lp, ref, v, scores, mask, kl_coef=0.05, gamma=0.99, lam=0.95, kl_estimator=est,
                                   kl_clamp=10.0, score_clip=5.0, whiten=whiten, shift_mean=shift,
                                   unbiased=unbiased, backend="triton")
        # Strided inputs (columns of a wider tensor), an int mask.
        wide = torch.randn(B, 2 * T, dtype=dt)
        rmk.ppo_advantages(wide[:, :T], wide[:, T:], v, scores, mask.long(), kl_coef=0.1, backend="triton")
        # REINFORCE++ (the row kernel, then the whitening kernels) and ReMax, strided rewards.
        for unbiased in (True, False):
            rmk.reinforce_pp_advantages(wide[:, :T], mask, gamma=0.99, unbiased=unbiased, backend="triton")
        rmk.remax_advantages(wide[:, :T], scores, mask, backend="triton")
        for shift, unbiased in itertools.product((True, False), (True, False)):
            rmk.masked_whiten(torch.randn(B, T, dtype=dt), mask, shift_mean=shift, unbiased=unbiased,
                              backend="triton")
        rmk.masked_whiten(torch.randn(2, 5, 7, dtype=dt), torch.ones(2, 5, 7), backend="triton")
        # The docs/ops.md section 4 kernels (their public functions come with the op registry): GAE over
        # token rewards, row and segmented, and every KL estimator with and without a mask.
        for seg, returns in itertools.product((None, 16), (True, False)):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(tppo, "FORCE_SEGMENT_T", seg)
                tppo.gae(lp, v, mask, 0.99, 0.95, returns)
        for est, m in itertools.product(range(4), (mask, None)):
            tppo.kl_estimate(lp, wide[:, :T], m, est, 20.0 if est == 3 else 0.0, 10.0)


def _drive_group_adv(rmk):
    """Every launch configuration of rmkernels/triton/group_adv.py: each estimator (grpo's
    centred-squares pass, opo's lengths, gpg's count, reinforce_pp_baseline's whitening), both
    single rules, biased/unbiased, scores [B] and token rewards [B, T], a strided mask; the
    kernel as one launch of many programs with its grid barriers (a GPU's), as one launch a
    phase, and at B = T = 1 (ints equal to 1 become constants when compiled); reinforce_pp_returns."""
    from rmkernels._codes import GROUP_ESTIMATORS
    from rmkernels.triton import group_adv as tga

    B, T = 11, 40
    ids = torch.arange(B) // 3
    mask = torch.rand(B, T) > 0.3
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for est, single, unbiased in itertools.product(
                ("grpo", "dr_grpo", "rloo", "opo", "gpg", "reinforce_pp_baseline"), ("zero", "self"), (True, False)):
            rmk.group_advantages(torch.randn(B, dtype=dt), ids, mask, estimator=est, single=single,
                                 unbiased=unbiased, backend="triton")
    for code, dt in itertools.product(GROUP_ESTIMATORS.values(), (torch.float32, torch.float64)):
        for b, t, programs, fused in ((300, 40, 132, True), (300, 40, 7, False), (1, 1, 1, True)):
            tga.group_advantages(torch.randn(b, dtype=dt), torch.arange(b) // 3, torch.ones(b, t, dtype=torch.bool),
                                 int(code), 1e-6, True, 0, 2.0, 1e-8, programs=programs, fused=fused)
        rmk.group_advantages(torch.randn(B, T, dtype=dt), ids, mask.t().contiguous().t(), backend="triton")
        wide = torch.randn(B, 2 * T, dtype=dt)
        rmk.reinforce_pp_returns(wide[:, :T], mask, gamma=0.99, backend="triton")
def _drive_token_logprobs(rmk):
    """Every launch configuration of rmkernels/triton/token_logprobs.py: each dtype, bias or
    not, entropy gradient or not, strided 3-D hidden, several vocabulary chunks."""
    from rmkernels.ops import token_logprobs as tlp

    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for has_bias, with_ent in itertools.product((False, True), (False, True)):
            h = torch.randn(3, 9, 2 * 40, dtype=dt)[:, :, :40].requires_grad_(True)
            w = torch.randn(300, 40, dtype=dt, requires_grad=True)
            b = torch.randn(300, dtype=dt, requires_grad=True) if has_bias else None
            t = torch.randint(0, 300, (3, 9))
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(tlp, "VOCAB_CHUNK", {"cpu": 128, "cuda": 128})
                lp, ent = rmk.token_logprobs(h, w, t, bias=b, temperature=0.7, return_entropy=True,
                                             backend="triton")
                (lp.sum() + ent.sum() if with_ent else lp.sum()).backward()


def _drive(module, rmk):
    driver = globals().get(f"_drive_{module}")
    assert driver is not None, (
        f"rmkernels/triton/{module}.py has no launch driver: add _drive_{module}(rmk) to "
        f"tests/test_gpu_readiness.py, calling the op's public functions with backend='triton' on every "
        f"dtype and option that selects a different kernel or constexpr")
    driver(rmk)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """{module: [Launch]} of every triton module, recorded with the data checks off (the
    recorder runs nothing, so the outputs hold garbage)."""
    pytest.importorskip("triton")
    import triton.runtime.jit as jit

    import rmkernels as rmk
    from rmkernels import _backend, _checks

    mp = pytest.MonkeyPatch()
    launches = {}
    try:
        real_why_not = _backend._why_not
        mp.setattr(_backend, "_why_not",
                   lambda name, dev: None if name == "triton" else real_why_not(name, dev))
        mp.setattr(_checks, "data_checks_enabled", lambda device: False)
        for module in TRITON_MODULES:
            launches[module] = []
            mp.setattr(jit.JITFunction, "run", _recorder(launches[module]))
            _drive(module, rmk)
    finally:
        mp.undo()
    return launches


def _jit_functions(module):
    import triton.runtime.jit as jit

    mod = importlib.import_module(f"rmkernels.triton.{module}")
    return {name: fn for name, fn in vars(mod).items() if isinstance(fn, jit.JITFunction)}


def _reached(launched, fns):
    """Names of the jit functions reached from the launched kernels (helpers they call)."""
    import triton.runtime.jit as jit

    seen, todo = set(), list(launched)
    while todo:
        fn = todo.pop()
        if fn.__name__ in seen:
            continue
        seen.add(fn.__name__)
        for name in fn.fn.__code__.co_names:
            callee = fn.fn.__globals__.get(name)
            if isinstance(callee, jit.JITFunction):
                todo.append(callee)
    return seen & set(fns)


def test_there_are_triton_modules():
    assert TRITON_MODULES, "no rmkernels/triton/*.py found"


@needs_compiled_triton
def test_every_triton_kernel_is_launched(recorded):
    for module in TRITON_MODULES:
        fns = _jit_functions(module)
        launched = {la.fn for ls in recorded.values() for la in ls}
        missing = set(fns) - _reached(launched, fns)
        assert not missing, (f"rmkernels/triton/{module}.py: @triton.jit functions {sorted(missing)} are never "
                             f"launched by _drive_{module} (and not called by a launched kernel): extend it")


@needs_compiled_triton
def test_launch_grids_fit_cuda_limits(recorded):
    bad = [la.describe() for ls in recorded.values() for la in ls
           if len(la.grid) > 3 or any(g > m for g, m in zip(la.grid, MAX_GRID)) or any(g < 1 for g in la.grid)]
    assert not bad, "launch grids outside CUDA's limits (x < 2^31, y, z <= 65535, each >= 1):\n" + "\n".join(bad)


@needs_compiled_triton
def test_float_arguments_of_float64_launches_are_exact(recorded):
    """Compiled Triton passes a Python float argument as float32 (the interpreter keeps the
    double, so no other CPU test sees it). In a launch on float64 tensors every float argument
    must be exactly a float32, as the (hi, lo) halves of _common.split_float are; else a float64
    option (gamma, a margin, eps) is rounded to float32 on a GPU. The Bradley-Terry kernels did
    that until 2026-11-30: their float64 tests failed on an H200."""
    bad, checked = [], 0
    for ls in recorded.values():
        for la in ls:
            if "*fp64" not in la.signature.values():
                continue
            checked += len(la.floats)
            bad += [f"{la.name}: {k} = {v!r}" for k, v in la.floats.items()
                    if math.isfinite(v) and float(np.float32(v)) != v]
    assert checked, "no float arguments recorded in float64 launches: the recorder lost them"
    assert not bad, "float arguments rounded to float32 in float64 launches:\n" + "\n".join(sorted(set(bad)))


class _Wide(Launch):
    """`launch` with every int32 argument passed as int64, as Triton does for values >= 2^31."""

    def __init__(self, launch):
        super().__init__(launch.fn, {k: ("i64" if v == "i32" else v) for k, v in launch.signature.items()},
                         launch.constexprs, launch.attrs, launch.kwargs, launch.grid)

    def describe(self):
        return super().describe() + " [every int argument as i64: tensors past 2^31 elements]"


def _features(launch, pairwise):
    """What a compile of `launch` exercises: each parameter's type, each constexpr's value, and
    with `pairwise` each constexpr flag value together with the class of the pointer dtypes
    (fp64 + a flag...); block sizes are not paired (they change layouts, not types)."""
    cst = {launch.fn.arg_names[p[0]]: repr(v) for p, v in launch.constexprs.items()}
    f = ({("sig", k, v) for k, v in launch.signature.items() if v != "constexpr"}
         | {("cst", k, v) for k, v in cst.items()})
    if pairwise:
        # The dtype class of the float pointers: fp64 (fp64 arithmetic meets fp32 scalars),
        # 16-bit (conversions on load/store; bf16 and fp16 each still appear in a single
        # feature), or fp32.
        ptrs = {v for v in launch.signature.values() if v in ("*fp64", "*bf16", "*fp16")}
        cls = "fp64" if "*fp64" in ptrs else "16-bit" if ptrs else "fp32"
        f |= {("class+cst", cls, k, v) for k, v in cst.items() if not k.startswith("BLOCK")}
    return f


def _covering(launches, pairwise):
    """A few launches per kernel such that every feature seen (see _features) is compiled."""
    by_kernel = {}
    for la in launches:
        by_kernel.setdefault(la.name, []).append(la)
    chosen = []
    for ls in by_kernel.values():
        need = set().union(*(_features(la, pairwise) for la in ls))
        while need:
            best = max(ls, key=lambda la: len(_features(la, pairwise) & need))
            chosen.append(best)
            need -= _features(best, pairwise)
    return chosen


def _unique(launches):
    out = {}
    for la in launches:
        out.setdefault(la.key(), la)
    return list(out.values())


# Runs in a child process: an LLVM error aborts the process (no exception), which must not
# take pytest down with it. Reads ([(module, kernel, signature, constexprs, attrs, kwargs,
# arch)], registers) pickled on stdin; prints one line per compile ("OK i"; with registers,
# "OK i <registers a thread> <bytes of spill stores>", from ptxas -v on the kernel's PTX).
_COMPILE_CHILD = r"""
import importlib, os, pickle, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource, make_backend
jobs, registers = pickle.load(sys.stdin.buffer)
for i, (module, name, signature, constexprs, attrs, kwargs, arch) in enumerate(jobs):
    print(f"START {i}", flush=True)
    try:
        fn = getattr(importlib.import_module(module), name)
        target = GPUTarget("cuda", arch, 32)
        options = make_backend(target).parse_options(dict(kwargs))
        k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        ptx = k.asm["ptx"]
        assert f".target sm_{arch}" in ptx, "PTX for the wrong target"
        assert k.asm.get("cubin"), "no cubin"
        extra = ""
        if registers:
            with tempfile.TemporaryDirectory() as d:
                src = os.path.join(d, "k.ptx")
                with open(src, "w") as f:
                    f.write(ptx)
                sm = re.search(r"[.]target (sm_[0-9a-z]+)", ptx).group(1)
                log = subprocess.run([get_ptxas(arch).path, "-arch=" + sm, "-v", src, "-o", os.path.join(d, "k.o")],
                                     capture_output=True, text=True, check=True)
            text = log.stdout + log.stderr
            extra = " %s %s" % (re.search(r"Used ([0-9]+) registers", text).group(1),
                                re.search(r"([0-9]+) bytes spill stores", text).group(1))
        print(f"OK {i}{extra}", flush=True)
    except Exception as e:
        msg = (type(e).__name__ + ": " + str(e)[:1500]).replace(chr(10), chr(10) + "      ")
        print(f"FAIL {i} {msg}", flush=True)
"""


def _aot_compile(plan, tmp_path, registers=False):
    """Compiles each (Launch, arch) of plan in a child process, with an empty cache and without
    TRITON_INTERPRET. Returns ({index: (registers, spill bytes)}, or {index: ()} without
    `registers`, for the compiles that succeeded; the failures, described)."""
    import pickle

    jobs = [(la.fn.module, la.fn.__name__, la.signature, la.constexprs, la.attrs, la.kwargs, arch) for la, arch in plan]
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "cache"))  # compile for real, not from a cache
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _COMPILE_CHILD], input=pickle.dumps((jobs, registers)),
                          capture_output=True, cwd=ROOT, env=env)
    lines = proc.stdout.decode(errors="replace").splitlines()
    done = {int(line.split()[1]) for line in lines if line.startswith(("OK ", "FAIL "))}
    ok = {int(line.split()[1]): tuple(int(v) for v in line.split()[2:]) for line in lines if line.startswith("OK ")}
    failures = [f"sm_{plan[int(line.split()[1])][1]}: {plan[int(line.split()[1])][0].describe()}\n    "
                + line.split(" ", 2)[2] for line in lines if line.startswith("FAIL ")]
    if len(done) < len(plan):
        started = [int(line.split()[1]) for line in lines if line.startswith("START ")]
        crashed = plan[started[-1]] if started and started[-1] not in done else None
        failures.append(f"the compiler process died (exit {proc.returncode})"
                        + (f" compiling sm_{crashed[1]}: {crashed[0].describe()}" if crashed else "")
                        + "\n    " + proc.stderr.decode(errors="replace")[-3000:])
    return ok, failures


@needs_compiled_triton
@pytest.mark.parametrize("module", TRITON_MODULES)
def test_triton_kernels_compile_for_sm80_and_sm90(module, recorded, tmp_path):
    """Through cubin (ptxas from the triton wheel), in a child process without
    TRITON_INTERPRET and with an empty cache: for sm_90 launches that cover every parameter
    type and every constexpr flag value with each class of pointer dtypes; for sm_80
    every parameter type and constexpr value. RMKERNELS_AOT_ALL=1 compiles every distinct
    launch for both (minutes)."""
    # The launches of this module's kernels, whichever driver made them (pairwise_reward_loss
    # launches the pooling kernels).
    launches = _unique([la for ls in recorded.values() for la in ls if la.fn.module == f"rmkernels.triton.{module}"])
    assert launches, f"no launches recorded for {module}"
    if os.environ.get("RMKERNELS_AOT_ALL", "0") == "1":
        plan = [(la, arch) for arch in (90, 80) for la in launches]
    else:
        plan = [(la, 90) for la in _covering(launches, True)] + [(la, 80) for la in _covering(launches, False)]
    # Huge tensors: an int argument >= 2^31 (a size, a stride, an offset) is passed as i64.
    # Every kernel once with all its int arguments i64 (the sm_90 covering launch with the
    # most of them), which catches loop-carried int32/int64 mismatches that only huge inputs
    # reach.
    for name in sorted({la.name for la in launches}):
        ls = [la for la in _covering(launches, True) if la.name == name]
        base = max(ls, key=lambda la: sum(v == "i32" for v in la.signature.values()))
        if any(v == "i32" for v in base.signature.values()):
            plan.append((_Wide(base), 90))
    t0 = time.time()
    _, failures = _aot_compile(plan, tmp_path)
    assert not failures, f"{len(failures)}/{len(plan)} Triton compiles failed:\n" + "\n".join(failures)
    print(f"{module}: {len(plan)} compiles of {len(launches)} distinct launches in {time.time() - t0:.1f} s")


@needs_compiled_triton
def test_group_adv_kernel_fits_its_programs_per_multiprocessor(recorded, tmp_path):
    """The Triton group-advantage kernel's cooperative launch puts PROGRAMS_PER_SM programs on each
    multiprocessor, which must all be resident at once (the driver refuses the launch
    otherwise). Each of its one-launch (cooperative) launches asks for at most MAX_REGISTERS
    registers a thread, which fits that many programs in 64K registers (the cap is what makes
    them resident), and ptxas (from the triton wheel) compiles them within it without spilling
    (a spill would cost time, not correctness): every distinct one (each estimator, dtype and
    tile shape the launch driver makes) for sm_90, the covering ones for sm_80."""
    from rmkernels.triton import group_adv as tga

    assert tga.PROGRAMS_PER_SM * tga.NUM_WARPS * 32 * tga.MAX_REGISTERS <= 65536
    assert tga.MAX_REGISTERS % 8 == 0  # registers are allocated 8 a thread (256 a warp) at a time
    fused = _unique([la for la in recorded["group_adv"]
                     if la.fn.__name__ == "_group_adv_kernel" and la.kwargs.get("launch_cooperative_grid")])
    assert fused, "no cooperative launch of _group_adv_kernel recorded"
    wrong = [la.describe() for la in fused if la.kwargs.get("maxnreg") != tga.MAX_REGISTERS]
    assert not wrong, "cooperative launches without maxnreg=MAX_REGISTERS:\n" + "\n".join(wrong)
    plan = [(la, 90) for la in fused] + [(la, 80) for la in _covering(fused, False)]
    ok, failures = _aot_compile(plan, tmp_path, registers=True)
    assert not failures, "\n".join(failures)
    over = [f"sm_{arch}: {la.describe()}: {ok[i][0]} registers, {ok[i][1]} bytes spilled"
            for i, (la, arch) in enumerate(plan) if ok[i][0] > tga.MAX_REGISTERS or ok[i][1] > 0]
    assert not over, "\n".join(over)
    print(f"group_adv: {len(plan)} cooperative launches, registers a thread "
          f"{min(r for r, _ in ok.values())}-{max(r for r, _ in ok.values())} (cap {tga.MAX_REGISTERS})")


# ---------------------------------------------------------------------------------------
# The torch bindings of the CUDA kernels, compiled with the host compiler
# ---------------------------------------------------------------------------------------
CUDA_HOME = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
CUDA_INCLUDE = os.path.join(CUDA_HOME, "include")
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
BINDINGS = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*_binding.cpp")))
# module.cpp has a branch only the CUDA build compiles (RMKERNELS_WITH_CUDA).
CUDA_BUILD_CPP = BINDINGS + [os.path.join(ROOT, "csrc", "module.cpp")]
# Generated by torch's CMake only in CUDA builds, so a CPU-only wheel lacks it (c10/cuda/
# CUDAMacros.h includes it). Its content in the CUDA wheels is exactly this one define
# (shared-library exports); nothing the bindings use depends on it.
CUDA_CMAKE_MACROS = ("#pragma once\n"
                     "// Stub of the header torch's CMake generates in CUDA builds (absent from CPU-only wheels).\n"
                     "#define C10_CUDA_BUILD_SHARED_LIBS\n")


def test_there_are_cuda_bindings():
    assert BINDINGS, "no csrc/cuda/*_binding.cpp found"


def _binding_cmd(src, stub_dir):
    from torch.utils.cpp_extension import include_paths

    incs = [stub_dir, *include_paths(), CUDA_INCLUDE, os.path.join(ROOT, "csrc", "include"),
            os.path.join(ROOT, "csrc", "cuda"), sysconfig.get_paths()["include"]]
    # The flags and macros setup.py gives the .cpp files of the CUDA build (cxx: -O3 -fopenmp,
    # and the -std torch's BuildExtension adds; RMKERNELS_WITH_CUDA, RMKERNELS_CUDA_ARCHS), minus
    # code generation, plus warnings (reported for our files only: torch's own are not ours).
    return ([CXX, f"-std={torch_cxx_std()}", "-fopenmp", "-fsyntax-only", "-Wall", "-DTORCH_API_INCLUDE_EXTENSION_H",
             "-DTORCH_EXTENSION_NAME=_C", "-DRMKERNELS_WITH_CUDA=1", '-DRMKERNELS_CUDA_ARCHS="8.0;9.0"']
            + [f"-I{p}" for p in incs] + [src])


def torch_cxx_std():
    """The C++ standard torch's BuildExtension gives a build whose flags name none (setup.py's):
    read from this torch's cpp_extension, which appends C++20 since torch's headers need it and
    C++17 before."""
    import inspect

    from torch.utils import cpp_extension

    return "c++20" if "c++20" in inspect.getsource(cpp_extension) else "c++17"


def _our_diagnostics(stderr):
    csrc = os.path.join(ROOT, "csrc")
    return [line for line in stderr.splitlines()
            if (": error" in line or ": fatal error" in line) or (line.startswith(csrc) and ": warning" in line)]


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler (g++/c++) found")
@pytest.mark.skipif(not os.path.exists(os.path.join(CUDA_INCLUDE, "cuda_runtime_api.h")),
                    reason=f"CUDA toolkit headers not found in {CUDA_INCLUDE} (set CUDA_HOME): the bindings "
                           "include them")
def test_cuda_bindings_compile_with_host_compiler(tmp_path):
    """csrc/cuda/*_binding.cpp (and module.cpp's CUDA branch), which only a CUDA build
    compiles, parse and type-check with
    g++ against this torch's headers + the CUDA toolkit's: every at::/c10::cuda:: call, the
    launcher signatures of the .cuh files, the op registrations. All files in one
    translation unit first (torch's headers are parsed once); if that fails, each file alone,
    so that a name shared by two files' anonymous namespaces is not mistaken for an error."""
    stub = tmp_path / "stub"
    (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
    (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(CUDA_CMAKE_MACROS)
    together = tmp_path / "all_bindings.cpp"
    together.write_text("".join(f'#include "{p}"\n' for p in CUDA_BUILD_CPP))
    proc = subprocess.run(_binding_cmd(str(together), str(stub)), capture_output=True, text=True)
    if proc.returncode == 0 and not _our_diagnostics(proc.stderr):
        return
    failures = []
    for src in CUDA_BUILD_CPP:
        proc = subprocess.run(_binding_cmd(src, str(stub)), capture_output=True, text=True)
        diags = _our_diagnostics(proc.stderr)
        if proc.returncode != 0 or diags:
            failures.append(f"{os.path.basename(src)} (exit {proc.returncode}):\n" + "\n".join(diags[:30])
                            + ("" if diags else proc.stderr[-3000:]))
    assert not failures, "CUDA bindings do not compile with the host compiler:\n" + "\n\n".join(failures)
