"""The CUDA-on-CPU layer itself: CUDA's warp and block semantics, cooperative launches (every
block resident, per-block shared memory, the grid sync), and that an out-of-bounds read, a
shared-memory race, a global write race, a divergent barrier, a cross-block race without a
grid sync and a grid sync not every block reaches are failures that name the kernel (each
planted in selftest.cu)."""
import pytest
import torch

from .emu import EmuFailure, Program

pytestmark = pytest.mark.cuda_on_cpu


def _failure(prog, variant, **kw):
    """The report of the EmuFailure that running ``prog`` must end in."""
    with pytest.raises(EmuFailure) as e:
        prog.run(variant, **kw)
    return str(e.value)


def test_warp_shuffles_and_ballot():
    n = 64
    prog = Program()
    out = prog.out((n, 6), torch.int64)
    prog.call("rmk_selftest_shuffles", out, n)
    res = prog.run()
    assert res.rcs == [0]
    o = res[out]
    for t in range(n):
        lane, base = t % 32, 1000 + t - t % 32  # the value of lane l of this warp: base + l
        want = [base + (lane ^ 1), base + (lane ^ 16), base + (lane + 3 if lane + 3 < 32 else lane),
                base + (lane - 5 if lane >= 5 else lane), base + 7, 0xAAAAAAAA]
        assert o[t].tolist() == want, (t, o[t].tolist(), want)


def test_activemask_is_the_converged_lanes():
    """__activemask: lanes that exited are not in it; lane 0 alone in a branch sees itself."""
    n = 64
    prog = Program()
    out = prog.out((n + 2,), torch.int64, fill=0)
    prog.call("rmk_selftest_activemask", out, n)
    res = prog.run()
    assert res.rcs == [0]
    o = res[out].tolist()
    for t in range(n):
        w = t - t % 32
        want = 0 if t % 3 == 0 else sum(1 << (u - w) for u in range(w, w + 32) if u % 3 != 0)
        assert o[t] == want, (t, hex(o[t]), hex(want))
    assert o[n:] == [1, 1], o[n:]


@pytest.mark.parametrize("threads", [256, 96, 1024])
def test_block_sum_over_blocks(threads):
    blocks = 5
    prog = Program()
    out = prog.out((blocks,), torch.float64)
    prog.call("rmk_selftest_block_sum", out, blocks, threads)
    res = prog.run()
    assert res.rcs == [0]
    want = [sum(range(b * threads, (b + 1) * threads)) for b in range(blocks)]
    assert res[out].tolist() == want


def test_invalid_launch_configuration_is_an_error_not_a_crash():
    prog = Program()
    out = prog.out((4,), torch.float64)
    prog.call("rmk_selftest_block_sum", out, 0, 256)     # empty grid
    prog.call("rmk_selftest_block_sum", out, 1, 2048)    # too many threads
    prog.call("rmk_selftest_block_sum", out, 1, 256)
    assert prog.run().rcs == [9, 9, 0]  # cudaErrorInvalidConfiguration


def test_out_of_bounds_read_fails_naming_the_kernel():
    n = 300
    prog = Program()
    x = prog.inp(torch.randn(n))
    y = prog.out((n,), torch.float32)
    prog.call("rmk_selftest_oob_read", x, y, n)
    msg = _failure(prog, "asan")
    assert "heap-buffer-overflow" in msg and "oob_read_kernel" in msg, msg


def test_barrier_orders_shared_memory():
    prog = Program()
    out = prog.out((2, 128), torch.float32)
    prog.call("rmk_selftest_neighbour", out, 2, 128, 1)
    res = prog.run("tsan")
    assert res.rcs == [0]
    assert res[out][1].tolist() == [float((t + 1) % 128) for t in range(128)]


def test_shared_memory_race_fails_naming_the_kernel():
    prog = Program()
    out = prog.out((128,), torch.float32)
    prog.call("rmk_selftest_neighbour", out, 1, 128, 0)
    msg = _failure(prog, "tsan")
    assert "data race" in msg and "neighbour_kernel" in msg, msg


def test_global_write_race_fails():
    prog = Program()
    out = prog.out((64,), torch.float32)
    prog.call("rmk_selftest_global_race", out, 64)
    msg = _failure(prog, "tsan")
    assert "data race" in msg and "global_race_kernel" in msg, msg


@pytest.mark.parametrize("variant", ["asan", "tsan"])
def test_divergent_barrier_fails_not_hangs(variant):
    prog = Program()
    out = prog.out((64,), torch.float32)
    prog.call("rmk_selftest_divergent_barrier", out, 64)
    msg = _failure(prog, variant, timeout=120)
    assert "divergent_barrier_kernel" in msg and "__syncthreads is not reached by every thread" in msg, msg
    assert "threads 0-31: waiting at __syncthreads" in msg and "threads 32-63: exited" in msg, msg


# ---- cooperative launches ------------------------------------------------------------------
# The emulated device: 2 multiprocessors of 2048 threads, at most 32 blocks each (runtime.cpp),
# so 256-thread blocks: 16 resident at once.
def _grid_sum(blocks, threads, mode, variant="asan", **kw):
    prog = Program()
    partial = prog.out((blocks,), torch.float64)
    out = prog.out((2 * blocks,), torch.float64)
    prog.call("rmk_selftest_grid_sum", partial, out, blocks, threads, mode)
    return prog, out


@pytest.mark.parametrize("variant", ["asan", "tsan"])
@pytest.mark.parametrize("blocks,threads", [(16, 256), (3, 96), (1, 1024)])
def test_cooperative_launch_meets_at_the_grid_sync(variant, blocks, threads):
    """Every block sums in its own __shared__ array, and after the grid sync reads every
    block's sum: all blocks resident at once, per-block shared memory, the sync ordering
    the blocks' global writes (ThreadSanitizer finds no race)."""
    prog, out = _grid_sum(blocks, threads, 0)
    res = prog.run(variant)
    assert res.rcs == [0]
    own = [float(sum(range(b * threads, (b + 1) * threads))) for b in range(blocks)]
    assert res[out].tolist() == [sum(own)] * blocks + own


def test_cooperative_grid_is_what_the_device_holds():
    """cooperative_grid: min(wanted, multiprocessors x resident blocks), at least 1; a larger
    cooperative grid is cudaErrorCooperativeLaunchTooLarge (720), not a hang."""
    prog = Program()
    got = [prog.out((1,), torch.int64) for _ in range(4)]
    for g, (threads, wanted) in zip(got, [(256, 1000), (256, 5), (1024, 1000), (256, 0)]):
        prog.call("rmk_selftest_cooperative_grid", g, threads, wanted)
    partial, out = prog.out((17,), torch.float64), prog.out((34,), torch.float64)
    prog.call("rmk_selftest_grid_sum", partial, out, 17, 256, 0)
    res = prog.run()
    assert res.rcs == [0, 0, 0, 0, 720]
    assert [res[g].item() for g in got] == [16, 5, 4, 1]


def test_cross_block_race_without_the_grid_sync_fails():
    prog, _ = _grid_sum(4, 64, 1)
    msg = _failure(prog, "tsan")
    assert "data race" in msg and "grid_sum_kernel" in msg, msg


@pytest.mark.parametrize("variant", ["asan", "tsan"])
def test_grid_sync_not_reached_by_every_block_fails_not_hangs(variant):
    prog, _ = _grid_sum(4, 64, 2)
    msg = _failure(prog, variant, timeout=120)
    assert "grid_sum_kernel" in msg and "not reached by every block" in msg, msg


def test_grid_sync_outside_a_cooperative_launch_fails():
    prog = Program()
    out = prog.out((32,), torch.float32)
    prog.call("rmk_selftest_plain_grid_sync", out, 32)
    msg = _failure(prog, "asan", timeout=120)
    assert "plain_grid_sync_kernel" in msg and "not launched cooperatively" in msg, msg


# ---- every kernel file is covered ----------------------------------------------------------
def _cuda_files():
    import glob
    import os

    from . import build

    return build, sorted(glob.glob(os.path.join(build.CSRC, "cuda", "*.cu")))


def test_every_launch_goes_through_the_hook():
    """A `kernel<<<...>>>` written directly would not run on the CPU: RMK_LAUNCH only."""
    _, files = _cuda_files()
    bad = []
    for path in files:
        for i, line in enumerate(open(path), 1):
            if "<<<" in line:
                bad.append(f"{path}:{i}: {line.strip()}")
    assert not bad, "launch with RMK_LAUNCH(grid, block, smem, stream, kernel)(args...):\n" + "\n".join(bad)


def test_every_launcher_has_a_shim_and_a_test():
    """Each launch_* declared in csrc/cuda/<file>.cuh is forwarded by shims/<file>.cpp, and its
    shim rmk_* is called by a test of this directory (CONTRIBUTING.md: adding a .cu file)."""
    import glob
    import os
    import re

    build, files = _cuda_files()
    tests = "".join(open(p).read() for p in glob.glob(os.path.join(build.HERE, "test_*.py")))
    missing = []
    for cu in files:
        stem = os.path.splitext(os.path.basename(cu))[0]
        header = os.path.join(os.path.dirname(cu), stem + ".cuh")
        shim = os.path.join(build.HERE, "shims", stem + ".cpp")
        if not os.path.exists(shim):
            missing.append(f"{stem}: no tests/cuda_on_cpu/shims/{stem}.cpp")
            continue
        shim_text = open(shim).read()
        launchers = []
        if os.path.exists(header):
            launchers = re.findall(r"cudaError_t\s+(launch_\w+)\s*\(", open(header).read())
        assert launchers or not os.path.exists(header), f"no launch_* found in {header}"
        for name in launchers:
            if name + "(" not in shim_text:
                missing.append(f"{stem}: {name} is not called in shims/{stem}.cpp")
        for shim_fn in re.findall(r"int64_t\s+(rmk_\w+)\s*\(", shim_text):
            if f'"{shim_fn}"' not in tests:
                missing.append(f"{stem}: {shim_fn} is called by no test in tests/cuda_on_cpu")
    assert not missing, "\n".join(missing)
