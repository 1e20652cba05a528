"""Triton kernels of the token log-probs / entropy from hidden states (docs/ops.md section 6).

Forward: one program per BLOCK_N tokens walks the whole vocabulary in BLOCK_V steps; each
step's [BLOCK_N, BLOCK_V] logits come from ``tl.dot`` over H (fp32 accumulation, bf16/fp16
operands on tensor cores) and feed an online log-sum-exp with the entropy sums; nothing of
size V is stored. Bytes moved: N*H hidden elements once, V*H weights once per token block,
3*N floats out.

Backward: a Triton kernel recomputes one [token_chunk, vocab_chunk] tile of logits (same
``tl.dot``) and writes dz / temperature into it; the two products with it (grad_hidden +=
tile @ W_chunk, grad_W_chunk += tile^T @ hidden, the rows of tokens that take no part read as
0) are cuBLAS GEMMs through ``torch.mm``. The
chunk sizes are ``rmkernels.ops.token_logprobs.chunk_sizes`` (the policy every chunked backend
uses; the host passes them in).
"""
import torch
import triton
import triton.language as tl

from rmkernels.ops.token_logprobs import check_temperature, valid_targets
from rmkernels.triton._common import (
    FLOAT_DTYPES,
    acc_dtype,
    block_size,
    check_tensor,
    interpreting,
    scalar,
    split_float,
)

# Tokens per program of the forward and of the gradient tile: 64 rows x 64 vocabulary entries
# is 4096 fp32 accumulators (32 registers a thread at 4 warps); H is walked 64 at a time.
BLOCK_N = 64
BLOCK_V = 64
BLOCK_H = 64


def _block(n, cap):
    return block_size(n, cap, floor=16)  # tl.dot needs every block dimension >= 16


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, n_ok, v_ok, H, s_hn, s_wv, inv_temp,
                 ACC: tl.constexpr, HAS_BIAS: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr,
                 BH: tl.constexpr):
    """z = (h[offs_n] . W[offs_v]^T + b[offs_v]) * inv_temp as a [BN, BV] tile in ACC."""
    acc = tl.zeros([BN, BV], dtype=ACC)
    for h0 in range(0, H, BH):
        offs_h = h0 + tl.arange(0, BH)
        h_ok = offs_h < H
        x = tl.load(h_ptr + offs_n[:, None] * s_hn + offs_h[None, :], mask=n_ok[:, None] & h_ok[None, :], other=0.0)
        w = tl.load(w_ptr + offs_v[:, None] * s_wv + offs_h[None, :], mask=v_ok[:, None] & h_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee", out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=v_ok, other=0.0).to(ACC)[None, :]
    return acc * inv_temp


@triton.jit
def _lp_fwd_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr,  # hidden [N, H] (row stride s_hn), weight [V, H], bias [V], targets [N]
    lp_ptr, ent_ptr, lse_ptr,  # outputs [N] in the arithmetic dtype
    N, H, V, s_hn, s_wv, inv_temp, inv_temp_lo, ignore_index,  # sizes, strides (elements), options
    ACC: tl.constexpr, HAS_BIAS: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
):
    inv_temp = scalar(inv_temp, inv_temp_lo, ACC)
    offs_n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    tgt = tl.load(t_ptr + offs_n, mask=n_ok, other=ignore_index)
    m = tl.full([BN], float("-inf"), ACC)
    s = tl.zeros([BN], ACC)
    u = tl.zeros([BN], ACC)  # sum exp(z - m) (z - m)
    zt = tl.zeros([BN], ACC)
    for v0 in range(0, V, BV):
        offs_v = tl.zeros([], tl.int64) + v0 + tl.arange(0, BV)
        v_ok = offs_v < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, n_ok, v_ok, H, s_hn, s_wv, inv_temp,
                         ACC, HAS_BIAS, BN, BV, BH)
        m_new = tl.maximum(m, tl.max(tl.where(v_ok[None, :], z, float("-inf")), axis=1))
        # -inf logits (banned / padded entries) add nothing: e = 0, e * d read as 0 where e == 0
        # (d = -inf; a NaN e keeps its NaN); no finite logit yet (m_new = -inf): shifted by 0
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = tl.where(v_ok[None, :], z - shift[:, None], 0.0)  # columns past V count nothing
        # tl.exp / tl.log here, not _common's libdevice helpers (CONTRIBUTING's rule), on purpose:
        # this is the op's inner loop (one exp per logit, beside tensor-core GEMMs); every argument
        # is <= 0, and ex2.approx's relative error, a few ulp near 0, grows with |d| only where
        # exp(d) is negligible next to the row's sum (>= 1); log(s) has s in [1, V]
        e = tl.where(v_ok[None, :], tl.exp(d), 0.0)
        # the first step, and any while s = 0 (only -inf logits so far, m = -inf), rescale nothing
        dm = tl.where(s > 0, m - m_new, 0.0)
        a = tl.exp(dm)
        u = a * (u + dm * s) + tl.sum(tl.where(e == 0.0, 0.0, e * d), axis=1)
        s = a * s + tl.sum(e, axis=1)
        m = m_new
        zt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
    log_s = tl.log(s)
    lse = m + log_s
    ignored = tgt == ignore_index
    valid = (tgt >= 0) & (tgt < V) & (~ignored)
    # NaN kept (a row of only -inf logits: -inf - -inf, 0 / 0): on a GPU tl.minimum / tl.maximum
    # return the other operand of a NaN unless told (triton 3.6's interpreter keeps it; the tests'
    # interpreter drops it as a GPU does: tests/conftest.py)
    lp = tl.where(valid, tl.minimum(zt - lse, 0.0, propagate_nan=tl.PropagateNan.ALL),
                  tl.where(ignored, 0.0, float("nan")))
    ent = tl.where(ignored, 0.0, tl.maximum(log_s - u / s, 0.0, propagate_nan=tl.PropagateNan.ALL))
    tl.store(lp_ptr + offs_n, lp, mask=n_ok)
    tl.store(ent_ptr + offs_n, ent, mask=n_ok)
    tl.store(lse_ptr + offs_n, lse, mask=n_ok)


@triton.jit
def _lp_grad_tile_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr,  # inputs ([N] vectors at token n0)
    out_ptr,  # [rows, cols] tile of dz / temperature (row stride cols)
    rows, cols, v0, H, V, s_hn, s_wv, inv_temp, inv_temp_lo, ignore_index,  # 1 / temperature: split_float
    ACC: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GE: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
):
    inv_temp = scalar(inv_temp, inv_temp_lo, ACC)
    offs_n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    offs_c = tl.program_id(1).to(tl.int64) * BV + tl.arange(0, BV)
    offs_v = v0 + offs_c
    n_ok = offs_n < rows
    c_ok = offs_c < cols
    z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, n_ok, c_ok, H, s_hn, s_wv, inv_temp,
                     ACC, HAS_BIAS, BN, BV, BH)
    tgt = tl.load(t_ptr + offs_n, mask=n_ok, other=ignore_index)
    valid = (tgt != ignore_index) & (tgt >= 0) & (tgt < V)
    lse = tl.load(lse_ptr + offs_n, mask=n_ok, other=0.0)
    ent = tl.load(ent_ptr + offs_n, mask=n_ok, other=0.0)
    gl = tl.where(valid, tl.load(gl_ptr + offs_n, mask=n_ok, other=0.0), 0.0)
    if HAS_GE:
        ge = tl.where(valid, tl.load(ge_ptr + offs_n, mask=n_ok, other=0.0), 0.0)
    else:
        ge = tl.zeros([BN], ACC)
    logp = z - lse[:, None]
    p = tl.exp(logp)
    logp = tl.where(p == 0.0, 0.0, logp)  # a -inf logit adds 0 (0 * -inf = NaN); a NaN p stays NaN
    dz = p * (gl[:, None] + ge[:, None] * (logp + ent[:, None]))
    dz = tl.where(offs_v[None, :] == tgt[:, None], gl[:, None], 0.0) - dz
    dz = tl.where(valid[:, None], dz, 0.0) * inv_temp
    tl.store(out_ptr + offs_n[:, None] * cols + offs_c[None, :], dz, mask=n_ok[:, None] & c_ok[None, :])


def _acc_tl(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _mm(a, b, acc):
    """a @ b in the arithmetic dtype: bf16/fp16 operands go to cuBLAS as they are, with float32
    output (tensor cores); CPU tensors (the interpreter) have no such GEMM and are upcast."""
    if a.dtype == acc:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=acc)
    return a.to(acc) @ b.to(acc)


def _flat(hidden):
    """hidden [B, T, H] as [N, H] with a row stride (a copy only for rows at uneven strides)."""
    return hidden.reshape(-1, hidden.shape[-1])


def _check_args(hidden, weight, bias, targets, temperature, token_chunk, vocab_chunk):
    """The kernel ops' checks (csrc/include/rmkernels/token_logprobs_chunks.h: check_args), as
    ValueError / TypeError naming the argument, before anything is allocated or launched."""
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [N, H] or [B, T, H], got shape {list(hidden.shape)}")
    H = hidden.shape[-1]
    if H > 1 and hidden.stride(-1) != 1:
        raise ValueError(f"hidden needs a unit stride on H, got strides {list(hidden.stride())}")
    dev = hidden.device
    check_tensor("weight", weight, dims=2, dtype=hidden.dtype, device=dev)
    if weight.shape[1] != H or weight.shape[0] < 1:
        raise ValueError(f"weight must be [V, H] with V >= 1 and H = {H} (hidden's last dim), got "
                         f"{list(weight.shape)}")
    if H > 1 and weight.stride(1) != 1:
        raise ValueError(f"weight needs a unit stride on H, got strides {list(weight.stride())}")
    acc = acc_dtype(hidden.dtype)
    if bias is not None:
        check_tensor("bias", bias, shape=weight.shape[:1], dtype=acc, device=dev, contiguous=True)
    check_tensor("targets", targets, shape=hidden.shape[:-1], dtype=torch.int64, device=dev, contiguous=True)
    check_temperature(temperature)
    for name, c in (("token_chunk", token_chunk), ("vocab_chunk", vocab_chunk)):
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"{name} must be an int >= 1, got {c!r}")
    return acc


def _kernel_operands(hidden, weight):
    """The hidden states and the weight as the kernels' ``tl.dot`` reads them. Triton 3.6's
    interpreter (``TRITON_INTERPRET=1``) computes ``tl.dot`` of bfloat16 tiles wrong (log-probs
    off by ~1e10 on a CPU tensor, where fp16 and fp32 are right): under it, bfloat16 operands go
    to the kernels as float32. The values are the same (bf16 is exact in float32), and so are the
    products and their float32 ("ieee") accumulation; compiled kernels take them as they are."""
    if hidden.dtype == torch.bfloat16 and interpreting():
        return hidden.float(), weight.float()
    return hidden, weight


def token_logprobs_fwd(hidden, weight, bias, targets, temperature, ignore_index, token_chunk, vocab_chunk):
    """(logprobs, entropy, lse) shaped like targets; same contract as the
    ``token_logprobs_fwd_kernel`` op (one fused pass: the chunk sizes are checked, not used)."""
    acc = _check_args(hidden, weight, bias, targets, temperature, token_chunk, vocab_chunk)
    H = hidden.shape[-1]
    N, V = targets.numel(), weight.shape[0]
    outs = [torch.empty(targets.shape, dtype=acc, device=hidden.device) for _ in range(3)]
    if N == 0:
        return tuple(outs)
    hk, wk = _kernel_operands(hidden, weight)
    h = _flat(hk)
    t = targets.reshape(N)
    bn = _block(N, BLOCK_N)
    grid = (triton.cdiv(N, bn),)
    _lp_fwd_kernel[grid](
        h, wk, bias if bias is not None else wk, t, outs[0], outs[1], outs[2],
        N, H, V, h.stride(0), wk.stride(0), *split_float(1.0 / temperature), ignore_index,
        ACC=_acc_tl(hidden.dtype), HAS_BIAS=bias is not None, BN=bn, BV=_block(V, BLOCK_V), BH=_block(H, BLOCK_H))
    return tuple(outs)


def token_logprobs_bwd(grad_lp, grad_ent, hidden, weight, bias, targets, lse, entropy, temperature, ignore_index,
                       token_chunk, vocab_chunk, need_hidden, need_weight, need_bias):
    """(grad_hidden, grad_weight, grad_bias); same contract as the ``token_logprobs_bwd_kernel``
    op: [token_chunk, vocab_chunk] tiles of dz from the Triton kernel, GEMMs by torch.mm."""
    acc = _check_args(hidden, weight, bias, targets, temperature, token_chunk, vocab_chunk)
    for name, t in (("grad_logprobs", grad_lp), ("lse", lse), ("entropy", entropy), ("grad_entropy", grad_ent)):
        if t is not None or name != "grad_entropy":
            check_tensor(name, t, shape=targets.shape, dtype=acc, device=hidden.device, contiguous=True)
    H = hidden.shape[-1]
    N, V = targets.numel(), weight.shape[0]
    dev = hidden.device
    g_h = torch.zeros(N, H, dtype=acc, device=dev) if need_hidden else hidden.new_empty(0)
    g_w = torch.zeros(V, H, dtype=weight.dtype, device=dev) if need_weight else weight.new_empty(0)
    g_b = torch.zeros(V, dtype=acc, device=dev) if need_bias else weight.new_empty(0, dtype=acc)
    if N > 0 and (need_hidden or need_weight or need_bias):
        h = _flat(hidden)
        hk, wk = _kernel_operands(h, weight)
        t, lse1, ent1, gl = targets.reshape(N), lse.reshape(N), entropy.reshape(N), grad_lp.reshape(N)
        ge = grad_ent.reshape(N) if grad_ent is not None else None
        lowp = hidden.dtype != acc  # bf16/fp16: the GEMMs take the tile rounded to that dtype
        tc, vc = token_chunk, vocab_chunk
        buf = torch.empty(min(tc, N) * min(vc, V), dtype=acc, device=dev)
        # grad_weight's hidden operand: the rows of tokens that take no part read as 0. Their dz
        # is 0, but 0 * NaN = NaN in the GEMM: a NaN or inf hidden state there (a padded
        # position's) would reach a whole column of grad_weight. One torch.where per chunk and
        # vocabulary chunk (no host sync to skip it), small next to the GEMMs; once for one chunk.
        keep = valid_targets(t, V, ignore_index)[:, None] if need_weight else None
        xw, xw_for = None, None
        for v0 in range(0, V, vc):
            vl = min(vc, V - v0)
            w = weight[v0:v0 + vl]
            g_wc = torch.zeros(vl, H, dtype=acc, device=dev) if need_weight else None
            for n0 in range(0, N, tc):
                rows = min(tc, N - n0)
                tile = buf[:rows * vl].view(rows, vl)
                bn, bv = _block(rows, BLOCK_N), _block(vl, BLOCK_V)
                grid = (triton.cdiv(rows, bn), triton.cdiv(vl, bv))
                _lp_grad_tile_kernel[grid](
                    hk[n0:], wk, bias if bias is not None else wk, t[n0:], lse1[n0:], ent1[n0:], gl[n0:],
                    ge[n0:] if ge is not None else gl, tile,
                    rows, vl, v0, H, V, hk.stride(0), wk.stride(0), *split_float(1.0 / temperature), ignore_index,
                    ACC=_acc_tl(hidden.dtype), HAS_BIAS=bias is not None, HAS_GE=ge is not None,
                    BN=bn, BV=bv, BH=_block(H, BLOCK_H))
                op = tile.to(hidden.dtype) if lowp else tile
                if need_hidden:
                    g_h[n0:n0 + rows] += _mm(op, w, acc)
                if need_weight:
                    if xw_for != n0:
                        xw, xw_for = torch.where(keep[n0:n0 + rows], h[n0:n0 + rows], 0.0), n0
                    g_wc += _mm(op.t(), xw, acc)
                if need_bias:
                    g_b[v0:v0 + vl] += tile.sum(0)
            if need_weight:
                g_w[v0:v0 + vl] = g_wc.to(weight.dtype)
    if need_hidden:
        g_h = g_h.view(hidden.shape).to(hidden.dtype)
    return g_h, g_w, g_b
