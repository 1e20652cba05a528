"""csrc/cuda/token_logprobs.cu's element-wise launchers run on the CPU (AddressSanitizer),
driven tile by tile as the binding drives them (rmkernels/token_logprobs_chunks.h: vocabulary
chunks outer, token chunks inner; the GEMMs, ATen's in the binding, are torch matmuls here)
and checked against the reference kernel ops in float64: the forward's running statistics
(m + log s = lse, log s - u / s = entropy, zt - lse = the log-prob, m the row maximum) and the
backward's logit gradients through grad_hidden / grad_weight / grad_bias. tests/
test_token_logprobs.py's ragged shapes, dtypes (bf16/fp16 tiles are float32 GEMM outputs of
the rounded inputs, as the CUDA binding's native low-precision GEMMs give), bias or not, both
temperatures, ignored and out-of-range targets; the binding's chunk policy and a tiny one (many
ragged tiles, the online merge over up to 11 vocabulary chunks); rows of a full 8192-logit
vocabulary chunk and one past it; empty tiles; ThreadSanitizer runs of the block reductions."""
import pytest
import torch
from test_token_logprobs import _expected64, _inputs, _neg_inf_rows_case, _shapes
from utils import assert_close, tolerance

from rmkernels.ops import token_logprobs as tlp

from .emu import DTYPE_CODE, Program

pytestmark = pytest.mark.cuda_on_cpu

IGNORE = -100
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
POLICIES = {"binding": None, "small": (40, 96)}  # (token_chunk, vocab_chunk); None: tlp.chunk_sizes(.., "cuda")


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(N, V, policy):
    tc, vc = tlp.chunk_sizes(N, V, "cuda") if policy is None else policy
    return [(n0, min(tc, N - n0)) for n0 in range(0, N, tc)], [(v0, min(vc, V - v0)) for v0 in range(0, V, vc)]


def _flat(hidden, weight, bias, targets):
    """[N, H] hidden and [V, H] weight in the arithmetic dtype (the GEMM operands' values),
    bias in it, flat targets."""
    acc = _acc(hidden.dtype)
    H = hidden.shape[-1]
    b = bias.to(acc) if bias is not None else None
    return hidden.reshape(-1, H).to(acc), weight.to(acc), b, targets.reshape(-1)


def launch_stats(hidden, weight, bias, targets, temperature, policy, variant="asan"):
    """(m, s, u, zt) [N] from launch_lp_stats over every tile, in the binding's order."""
    x, w, b, t = _flat(hidden, weight, bias, targets)
    acc = x.dtype
    N, V = t.numel(), w.shape[0]
    tok, voc = _chunks(N, V, policy)
    prog = Program()
    state = [(prog.out((n,), acc), prog.out((n,), acc), prog.out((n,), acc), prog.out((n,), acc, fill=0))
             for _, n in tok]  # zt starts 0 (the binding's at::zeros), m / s / u NaN
    tgt = [prog.inp(t[n0:n0 + n]) for n0, n in tok]
    for v0, vl in voc:
        bias_c = prog.inp(b[v0:v0 + vl]) if b is not None else None
        for (n0, n), tg, (m, s, u, zt) in zip(tok, tgt, state):
            tile = x[n0:n0 + n] @ w[v0:v0 + vl].t()
            prog.call("rmk_lp_stats", DTYPE_CODE[acc], prog.inp(tile), n, vl, bias_c, 1.0 / temperature, tg, v0,
                      v0 == 0, m, s, u, zt)
    res = prog.run(variant)
    assert res.rcs == [0] * len(prog.calls), res.rcs
    return [torch.cat([res[st[k]] for st in state]) if state else torch.zeros(0, dtype=acc) for k in range(4)]


def _tol(dtype):
    # tests/test_token_logprobs.py's fp32 / fp64 tolerances; bf16 / fp16 run float32 tiles of
    # the rounded inputs, compared with float64 on the same rounded inputs.
    rtol, atol = tolerance(_acc(dtype))
    return rtol, atol * 10 if _acc(dtype) == torch.float32 else atol


def check_forward(hidden, weight, bias, targets, temperature, policy, what, variant="asan"):
    m, s, u, zt = launch_stats(hidden, weight, bias, targets, temperature, policy, variant)
    x, w, b, t = _flat(hidden, weight, bias, targets)
    # every row's entropy: a reference call in which no target is ignored (-100 is out of range)
    lp_e, ent_e, lse_e = tlp.fwd_kernel("reference", x.double(), w.double(), b.double() if b is not None else None, t,
                                       float(temperature), -12345, 0, 0)
    rtol, atol = _tol(hidden.dtype)
    z = (x @ w.t() + (b if b is not None else 0)) * (1.0 / temperature)
    assert_close(m, z.amax(-1) if t.numel() else m, rtol=rtol, atol=atol, name=f"row max m {what}")
    assert_close(m + s.log(), lse_e, rtol=rtol, atol=atol, name=f"lse {what}")
    assert_close(s.log() - u / s, ent_e, rtol=rtol, atol=atol, name=f"entropy {what}")
    valid = (t >= 0) & (t < w.shape[0])
    assert_close((zt - (m + s.log()))[valid], lp_e[valid], rtol=rtol, atol=atol, name=f"logprob {what}")
    assert torch.all(zt[~valid] == 0), f"zt written for a target outside the vocabulary {what}"


def launch_grads(hidden, weight, bias, targets, temperature, lse, entropy, g_lp, g_ent, policy, variant="asan"):
    """(grad_hidden [N, H], grad_weight, grad_bias) in float64 from the logit gradients that
    launch_lp_grad_logits writes into every tile."""
    x, w, b, t = _flat(hidden, weight, bias, targets)
    acc = x.dtype
    N, V = t.numel(), w.shape[0]
    tok, voc = _chunks(N, V, policy)
    prog = Program()
    per_tok = [[prog.inp(a[n0:n0 + n]) if a is not None else None for a in (t, lse, entropy, g_lp, g_ent)]
               for n0, n in tok]
    tiles = []
    for v0, vl in voc:
        bias_c = prog.inp(b[v0:v0 + vl]) if b is not None else None
        for (n0, n), (tg, ls, en, gl, ge) in zip(tok, per_tok):
            tile = prog.inp(x[n0:n0 + n] @ w[v0:v0 + vl].t(), output=True)  # in place
            prog.call("rmk_lp_grad_logits", DTYPE_CODE[acc], tile, n, vl, bias_c, 1.0 / temperature, tg, v0, V,
                      IGNORE, ls, en, gl, ge)
            tiles.append((n0, n, v0, vl, tile))
    res = prog.run(variant)
    assert res.rcs == [0] * len(prog.calls), res.rcs
    dz = torch.zeros((N, V), dtype=torch.float64)
    written = torch.zeros((N, V), dtype=torch.bool)
    for n0, n, v0, vl, tile in tiles:
        dz[n0:n0 + n, v0:v0 + vl] = res[tile].view(n, vl).double()
        written[n0:n0 + n, v0:v0 + vl] = True
    assert written.all(), "a logit gradient was not written (the tiles do not cover [N, V])"
    assert not torch.isnan(dz).any(), "a logit gradient is NaN"
    # the driver's grad_weight operand: the hidden rows of tokens that take no part read as 0
    # (token_logprobs_chunks.h: at::where, as 0 * NaN = NaN in the GEMM)
    keep = (t != IGNORE) & (t >= 0) & (t < V)
    return dz @ w.double(), dz.t() @ torch.where(keep[:, None], x, 0).double(), dz.sum(0)


def check_backward(hidden, weight, bias, targets, temperature, policy, what, with_entropy=True, variant="asan"):
    x, w, b, t = _flat(hidden, weight, bias, targets)
    acc = x.dtype
    x64, w64, b64 = x.double(), w.double(), b.double() if b is not None else None
    _, ent, lse = tlp.fwd_kernel("reference", x64, w64, b64, t, float(temperature), IGNORE, 0, 0)
    g_lp = torch.randn(t.shape, dtype=torch.float64)
    g_ent = torch.randn(t.shape, dtype=torch.float64) if with_entropy else None
    got = launch_grads(hidden, weight, bias, targets, temperature, lse.to(acc), ent.to(acc), g_lp.to(acc),
                       g_ent.to(acc) if with_entropy else None, policy, variant)
    exp = tlp.bwd_kernel("reference", g_lp, g_ent, x64, w64, b64, t, lse, ent, float(temperature), IGNORE, 0, 0,
                         True, True, b is not None)
    rtol, atol = _tol(hidden.dtype)
    for g, e, name in zip(got, exp, ("hidden", "weight", "bias")):
        if name == "bias" and b is None:
            continue
        assert_close(g, e, rtol=rtol, atol=atol * 5, name=f"grad_{name} {what}")


def _case(lead, H, V, dtype, bias, layout="contig", bad_targets=False):
    hidden, weight, b, targets = _inputs(lead, H, V, dtype, "cpu", bias, layout)
    if b is not None:
        b = b.to(_acc(dtype))
    if bad_targets and targets.numel() > 2:  # out of [0, V): NaN log-prob, no gradient, no zt
        flat = targets.view(-1)
        flat[0], flat[-1] = V, -3
    return hidden, weight, b, targets


CASES = [(d, p) for d in DTYPES for p in POLICIES if p == "binding" or d in (torch.float32, torch.float64)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype,policy", CASES, ids=lambda x: str(x))
def test_forward_and_backward(dtype, bias, policy):
    """The tiny policy (11 vocabulary chunks of the 1025 vocabulary: 11x the blocks) runs the
    two arithmetic dtypes; bf16 / fp16 differ from float32 only in the GEMM inputs."""
    for i, (lead, H, V) in enumerate(_shapes()):
        temperature = (1.0, 0.7)[i % 2]
        layout = ("contig", "strided")[i % 2]
        hidden, weight, b, targets = _case(lead, H, V, dtype, bias, layout, bad_targets=i == 0)
        what = f"{dtype} {lead}x{H}x{V} bias={bias} T={temperature} {policy}"
        check_forward(hidden, weight, b, targets, temperature, POLICIES[policy], what)
        check_backward(hidden, weight, b, targets, temperature, POLICIES[policy], what, with_entropy=i != 2)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_non_finite_hidden_of_ignored_tokens(policy):
    """NaN / inf hidden states at ignored targets (a padded position's): lp_grad_logits writes an
    exact 0 row there (it reads neither the NaN logits nor the NaN lse of the row) and the
    gradients match the reference's, finite (the hidden row read as 0 in grad_weight's product)."""
    for dtype in (torch.float32, torch.float64):
        hidden, weight, b, targets = _case((5, 7), 16, 300, dtype, True)
        flat_t, flat_h = targets.view(-1), hidden.view(-1, 16)
        flat_t[[3, 17, 30]] = IGNORE
        flat_h[3, 2], flat_h[17], flat_h[30, 0] = float("nan"), float("inf"), -float("inf")
        check_backward(hidden, weight, b, targets, 0.7, POLICIES[policy], f"{dtype} non-finite ignored {policy}")


@pytest.mark.parametrize("V", [8192, 8193])
def test_full_vocabulary_chunk_rows(V):
    """Rows of the binding's whole vocabulary chunk (32 logits per thread) and one logit past
    it (a second chunk of one column merged online)."""
    hidden, weight, b, targets = _case((3,), 8, V, torch.float32, True)
    check_forward(hidden, weight, b, targets, 0.7, None, f"V={V}")
    check_backward(hidden, weight, b, targets, 0.7, None, f"V={V}")


def test_gradient_rows_beyond_the_grid_y_limit():
    """lp_grad_logits' grid has min(rows, 65535) rows of blocks: a tile of 65535 + 37 rows
    (the binding's token chunk for a 3-logit vocabulary) runs its grid-stride loop over rows."""
    hidden, weight, b, targets = _case((65535 + 37,), 4, 3, torch.float32, True)
    check_backward(hidden, weight, b, targets, 0.7, None, "rows > 65535")


def test_empty_tiles():
    for rows, cols in ((0, 5), (5, 0), (0, 0)):
        prog = Program()
        m = prog.out((rows,), torch.float32)
        tile = prog.inp(torch.zeros(rows, cols), output=True)
        tg = prog.inp(torch.zeros(rows, dtype=torch.int64))
        prog.call("rmk_lp_stats", DTYPE_CODE[torch.float32], tile, rows, cols, None, 1.0, tg, 0, 1, m, m, m, m)
        prog.call("rmk_lp_grad_logits", DTYPE_CODE[torch.float32], tile, rows, cols, None, 1.0, tg, 0, cols, IGNORE,
                  m, m, m, None)
        assert prog.run().rcs == [0, 0]


@pytest.mark.parametrize("policy", list(POLICIES))
def test_race_free_under_thread_sanitizer(policy):
    """The block reductions of the statistics (shared memory reused by three reductions per
    row and across the rows of a block) and the in-place gradient, under ThreadSanitizer."""
    hidden, weight, b, targets = _case((5, 7), 16, 300, torch.float32, True)
    check_forward(hidden, weight, b, targets, 0.7, POLICIES[policy], "tsan", variant="tsan")
    check_backward(hidden, weight, b, targets, 0.7, POLICIES[policy], "tsan", variant="tsan")


@pytest.mark.parametrize("policy", list(POLICIES))
def test_neg_inf_logits(policy):
    """-inf logits through the bias (tests/test_token_logprobs.py's case: the 'small' policy's
    vocabulary chunks [0, 96) and [192, 288) all -inf, the first among them, and scattered
    entries; two valid targets at -inf entries), and a row whose logits are all -inf (hidden [+inf,
    0, ...] against a weight whose first column is < 0), temperature 0.7. The running statistics
    against the float64 formula of _expected64: m the row max (-inf for the all -inf row), s and u
    finite (0 and 0 for that row, not NaN), lse, entropy = -sum_{p > 0} p log p, the log-prob (-inf
    at the -inf targets); the logit gradients, from lse / entropy / upstream gradients of the
    formula, through grad_hidden / grad_weight / grad_bias with the all -inf row ignored. Before,
    s and u were NaN after a chunk whose max was -inf, u NaN for any -inf logit, and the
    gradients NaN."""
    for dtype in (torch.float32, torch.float64):
        hidden, weight, b, targets = _neg_inf_rows_case("cpu", dtype, (3, 37), 24, 300)
        targets.view(-1)[0] = IGNORE  # the all -inf rows take no part in the backward
        b = b.to(_acc(dtype))
        what = f"{dtype} -inf logits {policy}"
        x, w, bb, t = _flat(hidden, weight, b, targets)
        m, s, u, zt = launch_stats(hidden, weight, b, targets, 0.7, POLICIES[policy])
        g_lp, g_ent = torch.randn(t.shape, dtype=torch.float64), torch.randn(t.shape, dtype=torch.float64)
        # every row's entropy: no target ignored (-12345 is none of them; ignored ones read as 0)
        keep = t != IGNORE
        e = _expected64(x, w, bb, torch.where(keep, t, 0), 0.7, g_lp, g_ent, ignore_index=-12345)
        rtol, atol = _tol(dtype)
        z = (x.double() @ w.double().t() + bb.double()) / 0.7
        assert_close(m, z.amax(-1), rtol=rtol, atol=atol, name=f"row max m {what}")
        assert m[0] == -float("inf") and m[2] == -float("inf"), what
        assert s[0] == 0 and u[0] == 0 and s[2] == 0 and u[2] == 0, f"{what}: s {s[:3]}, u {u[:3]}"
        assert torch.isfinite(s).all() and torch.isfinite(u).all(), what
        assert_close(m + s.log(), e[2], rtol=rtol, atol=atol, name=f"lse {what}")
        live = torch.ones_like(t, dtype=torch.bool)
        live[[0, 2]] = False
        assert_close((s.log() - u / s)[live], e[1][live], rtol=rtol, atol=atol, name=f"entropy {what}")
        lp = zt - (m + s.log())
        assert_close(lp[live & keep], e[0][live & keep], rtol=rtol, atol=atol, name=f"logprob {what}")
        assert lp[1] == -float("inf") and lp[-2] == -float("inf"), what
        # backward: lse / entropy of the formula (0 at the ignored rows: never read)
        lse = torch.where(keep, e[2], 0.0).to(_acc(dtype))
        ent = torch.where(keep, e[1], 0.0).to(_acc(dtype))
        exp = _expected64(x, w, bb, t, 0.7, g_lp, g_ent, ignore_index=IGNORE)[3:]
        got = launch_grads(hidden, weight, b, targets, 0.7, lse, ent, g_lp.to(_acc(dtype)), g_ent.to(_acc(dtype)),
                           POLICIES[policy])
        for g, ex, name in zip(got, exp, ("hidden", "weight", "bias")):
            assert torch.isfinite(g).all(), f"grad_{name} {what}: {torch.isnan(g).sum()} NaN"
            assert_close(g, ex, rtol=rtol, atol=atol * 5, name=f"grad_{name} {what}")
