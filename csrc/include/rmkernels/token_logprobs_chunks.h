// The chunk driver of the token log-probs / entropy kernels (docs/ops.md section 6), shared by the
// C++ CPU kernels (csrc/cpu/token_logprobs.cpp) and the CUDA binding
// (csrc/cuda/token_logprobs_binding.cpp). Torch side: the GEMMs are ATen's (MKL / cuBLAS) on
// [token_chunk, vocab_chunk] tiles of raw logits h . W^T; the element-wise work on each tile
// (bias, temperature, the online log-sum-exp and entropy sums, the logit gradients) is the
// backend's `Tiles` policy:
//
//   struct Tiles {
//     static constexpr bool kNativeLowpGemm;  // bf16/fp16 GEMMs with float32 output (CUDA);
//                                             // false: bf16/fp16 chunks are upcast (CPU)
//     template <typename acc> static void stats(const StatsArgs<acc>&);
//     template <typename acc> static void grad_logits(const GradArgs<acc>&);
//     // true when every row of the token chunk x ([len, H]) that takes no part (keep [len, 1]
//     // false) is finite, so that x can enter the grad_weight GEMM as it is; false when unknown
//     // (a GPU would need a host synchronisation to look)
//     static bool dropped_rows_finite(const at::Tensor& x, const at::Tensor& keep);
//   };
//
// Never an [N, V] buffer: the forward keeps per-token running statistics (max m, sum of
// exp(z - m) s, sum of exp(z - m) (z - m) u, the target's logit zt) across the vocabulary
// chunks; lse = m + log s, entropy = log s - u / s. The backward recomputes each tile's
// logits, turns them into dz / temperature in place and pushes them through two GEMMs.
// Vocabulary chunks are the outer loop, so each slice of the weight (and of its gradient) is
// read once per call; token chunks the inner one.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "rmkernels/op_checks.h"

namespace rmkernels {
namespace lp {

// One tile's element-wise pass of the forward. tile: [rows, cols] raw logits (row stride
// cols); bias: [cols] (the chunk's slice) or null; z = (tile + bias) * inv_temp. Updates
// m/s/u/zt of the tile's rows (first: the first vocabulary chunk, which initialises them).
// zt is written only for a target in [v0, v0 + cols).
template <typename acc>
struct StatsArgs {
  const acc* tile;
  int64_t rows, cols;
  const acc* bias;
  acc inv_temp;
  const int64_t* targets;
  int64_t v0;
  bool first;
  acc *m, *s, *u, *zt;
};

// One tile's element-wise pass of the backward, in place: tile holds raw logits on entry and
// dz / temperature on exit, with dz_v = gl (1[v = t] - p_v) - ge p_v (log p_v + entropy),
// log p_v = z_v - lse. Rows whose target is ignore_index or outside [0, V) get 0. ge may be
// null (no entropy gradient).
template <typename acc>
struct GradArgs {
  acc* tile;
  int64_t rows, cols;
  const acc* bias;
  acc inv_temp;
  const int64_t* targets;
  int64_t v0, vocab, ignore_index;
  const acc *lse, *entropy, *gl, *ge;
};

// Rows of tokens in chunks of at most `tc`: 2-D views [len, H] of hidden [B, T, H] (unit
// stride on H) starting at flat token n0 = b * T + t0. Batch rows that sit at a uniform
// stride are one [B * T, H] matrix; otherwise (e.g. hidden[:, :-1]) each row is chunked.
struct TokenChunk {
  at::Tensor x;
  int64_t n0, len;
};

inline std::vector<TokenChunk> token_chunks(const at::Tensor& h3, int64_t tc) {
  const int64_t B = h3.size(0), T = h3.size(1), H = h3.size(2);
  std::vector<TokenChunk> out;
  if (B * T == 0) return out;
  if (B == 1 || h3.stride(0) == T * h3.stride(1)) {
    const at::Tensor flat = h3.as_strided({B * T, H}, {h3.stride(1), h3.stride(2)}, h3.storage_offset());
    for (int64_t n0 = 0; n0 < B * T; n0 += tc) {
      const int64_t len = std::min(tc, B * T - n0);
      out.push_back({flat.narrow(0, n0, len), n0, len});
    }
    return out;
  }
  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor row = h3.select(0, b);
    for (int64_t t0 = 0; t0 < T; t0 += tc) {
      const int64_t len = std::min(tc, T - t0);
      out.push_back({row.narrow(0, t0, len), b * T + t0, len});
    }
  }
  return out;
}

inline at::ScalarType acc_scalar(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The tokens that take part ([N] bool): a target in [0, V) other than ignore_index. The others get
// no gradient, and their hidden rows take part in nothing (forward: log-prob 0 for ignore_index,
// NaN for a target out of range; entropy 0 for ignore_index).
inline at::Tensor valid_targets(const at::Tensor& t, int64_t V, int64_t ignore_index) {
  return t.ge(0).logical_and_(t.lt(V)).logical_and_(t.ne(ignore_index));
}

// hidden [N, H] as a [1, N, H] view; [B, T, H] as it is.
inline at::Tensor as_3d(const at::Tensor& hidden) { return hidden.dim() == 2 ? hidden.unsqueeze(0) : hidden; }

// The kernel ops' argument checks (op_checks.h's helpers: each message names the argument,
// what was expected and what was given): hidden [N, H] or [B, T, H] float with a unit stride on
// H, weight [V, H] (V >= 1) in hidden's dtype, bias [V] contiguous in the arithmetic dtype,
// targets int64 contiguous with hidden's leading shape, all on hidden's device; the temperature
// (check_temperature) and the chunk sizes. The Triton host functions run the same checks
// (rmkernels/triton/token_logprobs.py: _check_args).
inline void check_args(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& targets, double temperature, int64_t tc, int64_t vc) {
  check_defined(hidden, "hidden");
  TORCH_CHECK_VALUE(hidden.dim() == 2 || hidden.dim() == 3, "hidden must be [N, H] or [B, T, H], got shape ",
                    hidden.sizes());
  check_float_input(hidden, "hidden");
  const int64_t H = hidden.size(-1);
  TORCH_CHECK_VALUE(H <= 1 || hidden.stride(-1) == 1, "hidden needs a unit stride on H, got strides ",
                    hidden.strides());
  const auto dev = hidden.device();
  check_dim(weight, "weight", 2);
  TORCH_CHECK_VALUE(weight.size(1) == H && weight.size(0) >= 1, "weight must be [V, H] with V >= 1 and H = ", H,
                    " (hidden's last dim), got ", weight.sizes());
  check_same_dtype(weight, "weight", hidden, "hidden");
  check_device(weight, "weight", dev);
  const auto acc = acc_scalar(hidden.scalar_type());
  check_dense(bias, "bias", {weight.size(0)}, acc, dev);
  check_shape(targets, "targets", hidden.sizes().slice(0, hidden.dim() - 1));
  check_dtype(targets, "targets", at::kLong);
  check_device(targets, "targets", dev);
  check_contiguous(targets, "targets");
  check_temperature(temperature);
  TORCH_CHECK_VALUE(tc >= 1 && vc >= 1, "token_chunk and vocab_chunk must be >= 1, got ", tc, " and ", vc);
}

// The GEMM operands and products of one backend.
template <class Tiles>
struct Gemm {
  bool native;  // bf16/fp16 operands straight into the GEMM, float32 out
  at::ScalarType acc;

  Gemm(at::ScalarType dtype) : acc(acc_scalar(dtype)) { native = Tiles::kNativeLowpGemm && dtype != acc; }
  at::Tensor operand(const at::Tensor& t) const { return native ? t : t.to(acc); }
  // out = a @ b (out in acc)
  void mm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) const {
    if (native) at::mm_out(out, a, b, acc); else at::mm_out(out, a, b);
  }
  // out += a @ b with a in acc (rounded to the operands' dtype for a native GEMM)
  void addmm(at::Tensor out, const at::Tensor& a, const at::Tensor& b) const {
    if (native) at::addmm_out(out, out, a.to(b.scalar_type()), b, acc); else out.addmm_(a, b);
  }
};

template <class Tiles>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& hidden, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                                                       double temperature, int64_t ignore_index, int64_t tc,
                                                       int64_t vc) {
  check_args(hidden, weight, bias, targets, temperature, tc, vc);
  // A kernel op has no autograd: inputs that require grad are read as data (the ATen GEMMs'
  // out= forms would refuse them with grad mode on), as every other kernel op reads them.
  const at::NoGradGuard no_grad;
  const Gemm<Tiles> g(hidden.scalar_type());
  const auto opts = hidden.options().dtype(g.acc);
  const int64_t N = targets.numel(), V = weight.size(0);
  at::Tensor m = at::empty({N}, opts), s = at::empty({N}, opts), u = at::empty({N}, opts);
  at::Tensor zt = at::zeros({N}, opts);
  if (N > 0) {
    const at::Tensor x = g.operand(as_3d(hidden));
    const auto chunks = token_chunks(x, tc);
    at::Tensor buf = at::empty({std::min(tc, N) * std::min(vc, V)}, opts);
    for (int64_t v0 = 0; v0 < V; v0 += vc) {
      const int64_t vl = std::min(vc, V - v0);
      const at::Tensor wt = g.operand(weight.narrow(0, v0, vl)).t();
      for (const auto& c : chunks) {
        at::Tensor tile = buf.narrow(0, 0, c.len * vl).view({c.len, vl});
        g.mm(tile, c.x, wt);
        AT_DISPATCH_FLOATING_TYPES(g.acc, "token_logprobs_stats", [&] {
          const scalar_t* bp = bias.has_value() ? bias->data_ptr<scalar_t>() + v0 : nullptr;
          Tiles::template stats<scalar_t>({tile.data_ptr<scalar_t>(), c.len, vl, bp,
                                           static_cast<scalar_t>(1.0 / temperature),
                                           targets.data_ptr<int64_t>() + c.n0, v0, v0 == 0,
                                           m.data_ptr<scalar_t>() + c.n0, s.data_ptr<scalar_t>() + c.n0,
                                           u.data_ptr<scalar_t>() + c.n0, zt.data_ptr<scalar_t>() + c.n0});
        });
      }
    }
  }
  // Per token: [N] vectors, a few ATen ops (the same on every device).
  const at::Tensor t = targets.view({N});
  const at::Tensor ignored = t.eq(ignore_index);
  const at::Tensor valid = valid_targets(t, V, ignore_index);
  const at::Tensor log_s = s.log();
  const at::Tensor lse = m + log_s;
  const at::Tensor zero = at::zeros({}, opts);
  at::Tensor lp = at::where(valid, (zt - lse).clamp_max_(0),
                            at::where(ignored, zero, at::full({}, std::numeric_limits<double>::quiet_NaN(), opts)));
  at::Tensor ent = at::where(ignored, zero, (log_s - u / s).clamp_min_(0));
  return {lp.view(targets.sizes()), ent.view(targets.sizes()), lse.view(targets.sizes())};
}

template <class Tiles>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_lp, const std::optional<at::Tensor>& grad_ent, const at::Tensor& hidden,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse,
    const at::Tensor& entropy, double temperature, int64_t ignore_index, int64_t tc, int64_t vc, bool need_hidden,
    bool need_weight, bool need_bias) {
  check_args(hidden, weight, bias, targets, temperature, tc, vc);
  const at::NoGradGuard no_grad;  // as in forward
  const Gemm<Tiles> g(hidden.scalar_type());
  const auto opts = hidden.options().dtype(g.acc);
  const int64_t H = hidden.size(-1), N = targets.numel(), V = weight.size(0);
  // shaped like targets, contiguous, in the arithmetic dtype, on hidden's device
  check_dense(grad_lp, "grad_logprobs", targets.sizes(), g.acc, hidden.device());
  check_dense(grad_ent, "grad_entropy", targets.sizes(), g.acc, hidden.device());
  check_dense(lse, "lse", targets.sizes(), g.acc, hidden.device());
  check_dense(entropy, "entropy", targets.sizes(), g.acc, hidden.device());
  // grad_hidden accumulates over the vocabulary chunks in the arithmetic dtype.
  at::Tensor gx = need_hidden ? at::zeros(hidden.sizes(), opts) : at::empty({0}, hidden.options());
  at::Tensor gw = need_weight ? at::empty({V, H}, weight.options()) : at::empty({0}, weight.options());
  at::Tensor gb = need_bias ? at::zeros({V}, opts) : at::empty({0}, opts);
  const bool gw_direct = weight.scalar_type() == g.acc;  // else a [vc, H] accumulator per chunk
  if (need_weight && N == 0) gw.zero_();
  if (N > 0 && (need_hidden || need_weight || need_bias)) {
    const at::Tensor x = g.operand(as_3d(hidden));
    const auto chunks = token_chunks(x, tc);
    const at::Tensor gx2 = need_hidden ? gx.view({N, H}) : gx;
    at::Tensor buf = at::empty({std::min(tc, N) * std::min(vc, V)}, opts);
    at::Tensor gw_buf = need_weight && !gw_direct ? at::empty({std::min(vc, V), H}, opts) : at::Tensor();
    // The grad_weight GEMM's hidden operand. A token that takes no part has dz = 0 (grad_logits),
    // but its hidden row still enters tile^T @ x, where 0 * NaN = NaN: a NaN or inf there (the
    // hidden state of a padded position after a fully masked attention row) would reach a whole
    // column of grad_weight. So those rows are read as 0: the chunk goes through at::where into a
    // [tc, H] scratch, unless Tiles::dropped_rows_finite says they are all finite (the CPU looks
    // at them; on a GPU the chunk is always masked: one more read and write of the chunk per
    // vocabulary chunk, small next to the GEMMs; made once when there is one token chunk).
    at::Tensor keep, xw_buf;
    int64_t xw_for = -1;  // the token chunk xw_buf holds
    std::vector<int8_t> as_is(chunks.size(), -1);  // per token chunk: dropped_rows_finite, looked at once
    if (need_weight) keep = valid_targets(targets.view({N}), V, ignore_index).view({N, 1});
    auto weight_operand = [&](int64_t ci, const TokenChunk& c) -> at::Tensor {
      const at::Tensor k = keep.narrow(0, c.n0, c.len);
      if (as_is[ci] < 0) as_is[ci] = Tiles::dropped_rows_finite(c.x, k) ? 1 : 0;
      if (as_is[ci]) return c.x;
      if (!xw_buf.defined()) xw_buf = at::empty({std::min(tc, N) * H}, c.x.options());
      at::Tensor xw = xw_buf.narrow(0, 0, c.len * H).view({c.len, H});
      if (xw_for != ci) {
        at::where_out(xw, k, c.x, at::zeros({}, c.x.options()));
        xw_for = ci;
      }
      return xw;
    };
    for (int64_t v0 = 0; v0 < V; v0 += vc) {
      const int64_t vl = std::min(vc, V - v0);
      const at::Tensor w = g.operand(weight.narrow(0, v0, vl));
      at::Tensor gwc;
      if (need_weight) {
        gwc = gw_direct ? gw.narrow(0, v0, vl) : gw_buf.narrow(0, 0, vl);
        gwc.zero_();
      }
      for (int64_t ci = 0; ci < static_cast<int64_t>(chunks.size()); ++ci) {
        const TokenChunk& c = chunks[ci];
        at::Tensor tile = buf.narrow(0, 0, c.len * vl).view({c.len, vl});
        g.mm(tile, c.x, w.t());
        AT_DISPATCH_FLOATING_TYPES(g.acc, "token_logprobs_grad_logits", [&] {
          const scalar_t* bp = bias.has_value() ? bias->data_ptr<scalar_t>() + v0 : nullptr;
          const scalar_t* ge = grad_ent.has_value() ? grad_ent->data_ptr<scalar_t>() + c.n0 : nullptr;
          Tiles::template grad_logits<scalar_t>({tile.data_ptr<scalar_t>(), c.len, vl, bp,
                                                 static_cast<scalar_t>(1.0 / temperature),
                                                 targets.data_ptr<int64_t>() + c.n0, v0, V, ignore_index,
                                                 lse.data_ptr<scalar_t>() + c.n0, entropy.data_ptr<scalar_t>() + c.n0,
                                                 grad_lp.data_ptr<scalar_t>() + c.n0, ge});
        });
        if (need_hidden) g.addmm(gx2.narrow(0, c.n0, c.len), tile, w);
        if (need_weight) g.addmm(gwc, tile.t(), weight_operand(ci, c));
        if (need_bias) gb.narrow(0, v0, vl).add_(tile.sum(0));
      }
      if (need_weight && !gw_direct) gw.narrow(0, v0, vl).copy_(gwc);
    }
  }
  if (need_hidden && hidden.scalar_type() != g.acc) gx = gx.to(hidden.scalar_type());
  return {gx, gw, gb};
}

}  // namespace lp
}  // namespace rmkernels
