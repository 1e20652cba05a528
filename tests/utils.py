"""Test helpers shared by every op's tests."""
import os

import torch

import rmkernels as rmk

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()


def kernel_backends(device):
    """The non-reference backends that the tests compare with the reference on `device`:
    each is either run, or skipped with the reason it cannot run here."""
    return ["cpu", "triton"] if device == "cpu" else ["cuda", "triton"]


def skip_unless_available(backend, device):
    """pytest.skip with the reason when `backend` cannot run on `device` here."""
    import pytest

    if device == "cuda" and not HAS_CUDA:
        pytest.skip(f"{backend} on CUDA tensors needs a GPU (none here)")
    why = rmk.backend_report(device)[backend]
    if why is None:
        return
    if backend == "triton" and device == "cpu":
        pytest.skip("triton on CPU tensors runs only under TRITON_INTERPRET=1 (no GPU here); "
                    ".ci/run runs the triton tests in their own process with it set")
    if backend == "cpu" and not rmk._ext.CPP_AVAILABLE:
        pytest.fail(f"the C++ extension is not built: {why}")  # never a silent skip
    pytest.skip(f"{backend} backend needs a GPU: {why}")


def backend_params(include_reference=False):
    """(backend, device) pairs for pytest.mark.parametrize, with readable ids."""
    import pytest

    pairs = []
    for dev in ["cpu", "cuda"]:
        for be in (["reference"] if include_reference else []) + kernel_backends(dev):
            marks = []
            if be == "triton":
                marks.append(pytest.mark.triton)
            if dev == "cuda":
                marks.append(pytest.mark.cuda)
            pairs.append(pytest.param(be, dev, id=f"{be}-{dev}", marks=marks))
    return pairs


def tolerance(dtype):
    """(rtol, atol) for fp32 arithmetic against the fp64 reference, per input dtype."""
    return {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5),
            torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}[dtype]


def assert_close(actual, expected, *, rtol, atol, name="output", equal_nan=True):
    """allclose that says, on failure, how many elements differ, where, and the NaN/inf
    mismatches."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    msgs = []
    if equal_nan and not torch.equal(nan_a, nan_e):
        bad = torch.nonzero(nan_a != nan_e)
        msgs.append(f"NaN mismatch at {bad.shape[0]} positions, first {bad[:5].tolist()}")
    inf_mismatch = torch.isinf(a) != torch.isinf(e)
    if inf_mismatch.any():
        msgs.append(f"inf mismatch at {int(inf_mismatch.sum())} positions, "
                    f"first {torch.nonzero(inf_mismatch)[:5].tolist()}")
    both = ~(nan_a | nan_e)
    diff = (a - e).abs()
    tol = atol + rtol * e.abs()
    bad = both & ~((diff <= tol) | (a == e))  # equal infinities are equal
    if bad.any():
        where = torch.nonzero(bad)
        first = tuple(where[0].tolist())
        msgs.append(
            f"{int(bad.sum())}/{a.numel()} elements differ beyond rtol={rtol}, atol={atol}; max abs diff "
            f"{diff[both].max().item():.3e}; first at {first}: actual {a[first].item():.6g}, "
            f"expected {e[first].item():.6g}")
    assert not msgs, f"{name}: " + "; ".join(msgs)


def assert_close_vs_lowp(actual, expected64, lowp_torch, *, name="output", factor=2.0, floor=1e-6):
    """flash-attention's rule: the kernel's error against the fp64 reference may be at most
    `factor` times the error of plain PyTorch at the same low precision (plus a small floor)."""
    err = (actual.double() - expected64.double()).abs().nan_to_num(0).max().item()
    base = (lowp_torch.double() - expected64.double()).abs().nan_to_num(0).max().item()
    assert err <= factor * base + floor, (
        f"{name}: max error {err:.3e} vs fp64 reference exceeds {factor}x plain PyTorch's {base:.3e} (+{floor})")


def poison_(t):
    """Fill with NaN (floats) or a sentinel so that unwritten elements show."""
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    return t.fill_(-12345)
