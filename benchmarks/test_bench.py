"""Quick side-by-side comparisons with pytest-benchmark, on the small named shapes:

    pytest benchmarks/ --benchmark-only                     # all
    pytest benchmarks/ --benchmark-only -k gae

On a shared CPU machine (see NOTES.md) pin one thread and time the thread's CPU time:

    RMKERNELS_BENCH_THREADS=1 pytest benchmarks/ --benchmark-only --benchmark-timer=time.thread_time

Each test checks once that the provider's output matches the reference, then times the
full call (forward + backward for the differentiable ops). Nothing asserts on a timing.
"""
import pytest
import torch

from benchmarks import bench_bt_loss, bench_gae, bench_pooling, common, shapes

DEVICE = common.pick_device()
SMALL = {"pooling": "pool-s", "bt": "bt-s", "gae": "gae-s"}


def _cases():
    out = []
    for op, shape in SMALL.items():
        for p in ("hf", "torch", "compile", "rmk-cpu", "rmk-cuda", "rmk-triton"):
            out.append(pytest.param(op, shape, p, id=f"{shape}-{p}"))
    return out


def _setup(op, shape_name, provider):
    shape = shapes.get(shape_name, DEVICE)
    if op == "pooling":
        provs, ref = bench_pooling.providers(DEVICE)
        inputs, grad_idx = bench_pooling.make_inputs(shape, DEVICE), (0, 1)
    elif op == "bt":
        provs, ref = bench_bt_loss.providers("bt", DEVICE)
        inputs, grad_idx = bench_bt_loss.make_inputs(shape, DEVICE), (0, 1)
    else:
        provs, ref = bench_gae.providers(DEVICE, shape.opts["kl_estimator"])
        inputs, grad_idx = bench_gae.make_inputs(shape, DEVICE), ()
    if provider not in provs:
        pytest.skip(f"{provider} is not available here (rmkernels backends on {DEVICE}: "
                    f"{common.rmk_backends(DEVICE)}, op in the package: {ref is not None})")
    return provs[provider], ref or provs["hf"], inputs, grad_idx, shape


@pytest.mark.parametrize("op,shape_name,provider", _cases())
def test_full_call(benchmark, op, shape_name, provider):
    fn, ref, inputs, grad_idx, shape = _setup(op, shape_name, provider)
    atol, rtol = common.tolerances(shape.torch_dtype, op)
    if grad_idx:
        err = common.mismatch(common.grads_of(fn, inputs, grad_idx), common.grads_of(ref, inputs, grad_idx), atol, rtol)
        grad_inputs = [inputs[i] for i in grad_idx]

        def call():
            return common._fwd_bwd(fn, inputs, grad_inputs)
    else:
        with torch.no_grad():
            err = common.mismatch(fn(*inputs), ref(*inputs), atol, rtol)

        def call():
            return common._no_grad(fn, inputs)
    assert err is None, f"{provider} differs from the reference: {err}"
    benchmark.group = f"{shape_name} full call"
    benchmark.extra_info.update(shape=shape.dims_str(), dtype=shape.dtype, device=DEVICE)
    if DEVICE == "cuda":
        def synced():
            call()
            torch.cuda.synchronize()
        benchmark(synced)
    else:
        benchmark(call)
