// CUDA kernels of the PPO rewards / GAE / KL / whitening (torch-free; see ppo.cuh).
//
// GAE: one block per row (or per segment of a long row, below). The block finds the row's last valid position (a block max over
// the mask), then walks the row from the right in chunks of kGaeThreads * kGaeItems
// positions. Each thread owns kGaeItems consecutive positions. Both recurrences are affine
// maps of a carried state, composed from the right:
//
//   D(t) = V of the nearest valid position >= t:  (a, b) = (0, V_t) valid, (1, 0) masked
//   C(t) = A of the nearest valid position >= t:  (a, b) = (gamma*lam, delta_t) valid,
//                                                 (1, 0) masked
//
// so that V_next(t) = D(t + 1) and A_t = C(t) at valid t. A thread composes the maps of its
// items, a block-wide reverse exclusive scan (warp shuffles, then the warp totals) gives
// each thread the composition of everything to its right, applied to the carry of the
// chunk to the right; then the thread walks its items sequentially. The state passes from
// chunk to chunk in registers: the recurrence is a scan inside one kernel, never a loop of
// launches.
//
// Bytes moved: logprobs, ref_logprobs, values and the mask read once (plus one more read
// of the mask for the last valid position), four [B, T] outputs written once, 16 B of
// statistics per row. The whitening reads the advantages twice and writes them once.
//
// A batch of few very long rows (gae-xl: B = 32, T = 32768) would use only B SMs with one
// block per row: the binding then splits each row into segments (codes::num_gae_segments), one
// block each, in three launches (the modes codes::GaeSegmentMode: each segment's aggregate, the
// carries composed per row, each segment with its carries). gae_kernel (token rewards given)
// runs the same kernels with kTokenRewards: the rewards are read instead of computed from the
// KL and the score. Each thread's kGaeItems consecutive loads are not vectorised (they are
// served by L1 within a warp's 4 KiB span). Measured on no GPU yet.
#include "ppo.cuh"

#include "affine_scan.cuh"

#include <algorithm>
#include <type_traits>

#include "rmkernels/codes.h"
#include "rmkernels/scalar_math.h"

namespace rmkernels {
namespace cuda {
namespace {

// 256 threads x 4 consecutive items = 1024 positions per chunk: the per-thread sequential
// part stays short (4 steps), the scan over 8 warps is cheap, and a B = 4096 batch still
// gives 4096 blocks.
constexpr int kGaeThreads = 256;
constexpr int kGaeItems = 4;
constexpr int kGaeWarps = kGaeThreads / kWarp;

// Reverse exclusive scan of the threads' maps over the block (kSelect: the V_next scan):
// thread i gets the composition of the maps of threads i+1 .. blockDim-1 (identity for the
// last thread); `total` is the composition of all of them (the same in every thread).
// Every thread of the block must call it; `warp_tot` holds kGaeWarps maps in shared memory.
template <bool kSelect, typename A>
__device__ __forceinline__ Affine<A> block_rscan_exclusive(Affine<A> mine, Affine<A>* warp_tot, Affine<A>& total) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  Affine<A> excl;
  const Affine<A> inc = warp_rscan<kSelect>(mine, excl);  // over lanes lane .. 31 of this warp
  __syncthreads();  // warp_tot may still be read by the previous scan
  if (lane == 0) warp_tot[warp] = inc;
  __syncthreads();
  Affine<A> right = identity<A>();  // warps warp+1 .. end
  Affine<A> all = identity<A>();
#pragma unroll
  for (int w = kGaeWarps - 1; w >= 0; --w) {
    if (w > warp) right = compose<kSelect>(warp_tot[w], right);
    all = compose<kSelect>(warp_tot[w], all);
  }
  total = all;
  return compose<kSelect>(excl, right);
}

// x^n for n >= 0 by squaring (no powf: under --use_fast_math it is exp2(n * log2(x)), which
// gives 0^0 = NaN).
template <typename A>
__device__ __forceinline__ A ipow(A x, int64_t n) {
  A r = A(1);
  while (n > 0) {
    if (n & 1) r *= x;
    x *= x;
    n >>= 1;
  }
  return r;
}

using math::clamp_sym;

// What a segment does to the carried state (C, D) entering at its right end, C = A and
// D = V of the nearest valid position to the right:
//   C(t_lo) = alpha * C_in + gamma * e * D_in + c0 (+ e * score if it holds the row's last
//   valid position), D(t_lo) = v_first if it has a valid position, else D_in.
// alpha = (gamma lam)^k and e = (gamma lam)^(k - 1) for its k valid positions.

// kMode: a codes::GaeSegmentMode. kTokenRewards (gae_kernel): `lp` holds the token rewards,
// `rf`, `scores`, `rew`, `kl` and `stats` are unused (null).
template <int64_t kMode, bool kTokenRewards, typename S, typename A>
__global__ void __launch_bounds__(kGaeThreads)
    ppo_gae_kernel(const S* __restrict__ lp, int64_t lp0, int64_t lp1, const S* __restrict__ rf, int64_t rf0,
                   int64_t rf1, const S* __restrict__ val, int64_t v0, int64_t v1, const A* __restrict__ scores,
                   const bool* __restrict__ mask, int64_t m0, int64_t m1, int64_t T, int64_t seg_len,
                   PPOGaeParams p, A* __restrict__ adv, A* __restrict__ ret, A* __restrict__ rew,
                   A* __restrict__ kl, double* __restrict__ stats, A* __restrict__ agg,
                   int64_t* __restrict__ seg_last_out, const A* __restrict__ carry,
                   const int64_t* __restrict__ row_last) {
  __shared__ Affine<A> warp_tot[kGaeWarps];
  __shared__ int64_t s_max[kGaeWarps];
  __shared__ double s_sum[kGaeWarps];
  const int64_t b = blockIdx.x, seg = blockIdx.y, n_seg = gridDim.y;
  const int64_t t_lo = seg * seg_len;
  const int64_t t_hi = t_lo + seg_len < T ? t_lo + seg_len : T;  // this block covers [t_lo, t_hi)
  const bool* mrow = mask + b * m0;

  int64_t last = -1;  // the position that gets the score (none in an aggregate)
  int64_t seg_last = -1;
  A carry_v = 0, carry_a = 0;  // D and C just right of the current chunk
  if (kMode == codes::kSegmentFinal) {
    last = row_last[b];
    carry_a = carry[(b * n_seg + seg) * 2];
    carry_v = carry[(b * n_seg + seg) * 2 + 1];
  } else if (!(kTokenRewards && kMode == codes::kRow)) {  // token rewards: no score, no last position
    int64_t best = -1;
    for (int64_t t = t_lo + threadIdx.x; t < t_hi; t += blockDim.x) {
      if (mrow[t * m1]) best = t;  // t grows per thread, so the last hit is its max
    }
    seg_last = block_max<int64_t>(best, s_max, -1);
    if (kMode == codes::kRow) last = seg_last;
  }

  const A kl_coef = static_cast<A>(p.kl_coef), gamma = static_cast<A>(p.gamma);
  const A gl = static_cast<A>(p.gamma * p.lam);
  const A x_clamp = static_cast<A>(p.x_clamp), kl_clamp = static_cast<A>(p.kl_clamp);
  const A score = kTokenRewards ? A(0) : clamp_sym(scores[b], static_cast<A>(p.score_clip));
  const S* lrow = lp + b * lp0;
  const S* rrow = rf + b * rf0;
  const S* vrow = val + b * v0;
  A* o_adv = adv + b * T;
  A* o_ret = ret == nullptr ? nullptr : ret + b * T;  // gae_kernel without returns: null
  A* o_rew = rew + b * T;
  A* o_kl = kl + b * T;

  double cnt = 0, sum = 0;
  A v_first = 0;
  constexpr int64_t kChunk = static_cast<int64_t>(kGaeThreads) * kGaeItems;
  const int64_t n_chunks = (t_hi - t_lo + kChunk - 1) / kChunk;
  for (int64_t c = n_chunks - 1; c >= 0; --c) {
    const int64_t base = t_lo + c * kChunk + static_cast<int64_t>(threadIdx.x) * kGaeItems;
    bool m[kGaeItems];
    A v[kGaeItems], r[kGaeItems], k[kGaeItems];
#pragma unroll
    for (int j = 0; j < kGaeItems; ++j) {
      const int64_t t = base + j;
      m[j] = t < t_hi && mrow[t * m1];
      v[j] = r[j] = k[j] = A(0);
      if (m[j]) {
        if (kTokenRewards) {
          r[j] = to_acc<A>(lrow[t * lp1]);
        } else {
          const A x = to_acc<A>(lrow[t * lp1]) - to_acc<A>(rrow[t * rf1]);
          k[j] = math::kl_estimate(p.estimator, x, x_clamp, kl_clamp);
          A rr = -kl_coef * k[j];
          if (t == last) rr = rr + score;
          r[j] = rr;
        }
        v[j] = to_acc<A>(vrow[t * v1]);
      }
    }
    // V_next: scan of D.
    Affine<A> mv = identity<A>();
#pragma unroll
    for (int j = kGaeItems - 1; j >= 0; --j) {
      if (m[j]) mv = Affine<A>{A(0), v[j]};  // a valid position resets D: (0, V) after anything
    }
    Affine<A> tot;
    Affine<A> ev = block_rscan_exclusive<true>(mv, warp_tot, tot);
    A d = apply_select(ev, carry_v);  // D at base + kGaeItems
    carry_v = apply_select(tot, carry_v);
    A delta[kGaeItems];
#pragma unroll
    for (int j = kGaeItems - 1; j >= 0; --j) {
      delta[j] = r[j] + gamma * d - v[j];  // d = V_next(base + j)
      if (m[j]) d = v[j];
    }
    if (c == 0) v_first = d;  // thread 0: D(t_lo)
    // A: scan of C.
    Affine<A> ma = identity<A>();
#pragma unroll
    for (int j = kGaeItems - 1; j >= 0; --j) {
      if (m[j]) ma = after(Affine<A>{gl, delta[j]}, ma);
    }
    Affine<A> ea = block_rscan_exclusive<false>(ma, warp_tot, tot);
    A cA = apply(ea, carry_a);  // C at base + kGaeItems
    carry_a = apply(tot, carry_a);
#pragma unroll
    for (int j = kGaeItems - 1; j >= 0; --j) {
      const int64_t t = base + j;
      if (t >= t_hi) continue;
      A a_out = A(0), ret_out = A(0);
      if (m[j]) {
        cA = delta[j] + gl * cA;
        a_out = cA;
        ret_out = cA + v[j];
        cnt += 1.0;
        sum += static_cast<double>(cA);
      }
      if (kMode != codes::kSegmentAggregate) {
        o_adv[t] = a_out;
        if (o_ret != nullptr) o_ret[t] = ret_out;
        if (!kTokenRewards) {
          o_rew[t] = r[j];
          o_kl[t] = k[j];
        }
      }
    }
  }
  cnt = block_sum(cnt, s_sum);
  if (kMode == codes::kSegmentAggregate) {
    if (threadIdx.x == 0) {
      A* g = agg + (b * n_seg + seg) * 4;
      const int64_t kv = static_cast<int64_t>(cnt);
      g[0] = ipow(gl, kv);                                   // alpha
      g[1] = kv > 0 ? ipow(gl, kv - 1) : A(0);               // e
      g[2] = carry_a;                                        // c0 = C(t_lo) with zero carries
      g[3] = v_first;                                        // D(t_lo) with D_in = 0
      seg_last_out[b * n_seg + seg] = seg_last;
    }
    return;
  }
  if (kTokenRewards) return;  // gae_kernel: no whitening partials
  sum = block_sum(sum, s_sum);
  if (threadIdx.x == 0) {
    stats[(b * n_seg + seg) * 2] = cnt;
    stats[(b * n_seg + seg) * 2 + 1] = sum;
  }
}

// One thread per row: the row's last valid position, and from the right the carries (C, D)
// entering each segment, composed from the segments' aggregates. scores null: no score
// (gae_kernel's token rewards).
template <typename A>
__global__ void gae_carry_kernel(const A* __restrict__ agg, const int64_t* __restrict__ seg_last,
                                 const A* __restrict__ scores, int64_t B, int64_t n_seg, PPOGaeParams p,
                                 A* __restrict__ carry, int64_t* __restrict__ row_last) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= B) return;
  const A gamma = static_cast<A>(p.gamma);
  const A score = scores == nullptr ? A(0) : clamp_sym(scores[b], static_cast<A>(p.score_clip));
  int64_t last = -1;
  for (int64_t s = 0; s < n_seg; ++s) last = seg_last[b * n_seg + s] > last ? seg_last[b * n_seg + s] : last;
  row_last[b] = last;
  A c = 0, d = 0;
  for (int64_t s = n_seg - 1; s >= 0; --s) {
    carry[(b * n_seg + s) * 2] = c;
    carry[(b * n_seg + s) * 2 + 1] = d;
    const int64_t sl = seg_last[b * n_seg + s];
    if (sl < 0) continue;  // no valid position: the state passes through
    const A* g = agg + (b * n_seg + s) * 4;
    A c0 = g[2];
    if (sl == last) c0 = c0 + scale(g[1], score);
    c = scale(g[0], c) + scale(gamma * g[1], d) + c0;  // alpha and e may have overflowed (gamma > 1)
    d = g[3];
  }
}

template <typename S>
__global__ void row_stats_kernel(const S* __restrict__ x, int64_t x0, int64_t x1, const bool* __restrict__ mask,
                                 int64_t m0, int64_t m1, int64_t T, double* __restrict__ stats) {
  __shared__ double shared[kThreads / kWarp];
  const int64_t b = blockIdx.x;
  double cnt = 0, sum = 0;
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
    if (mask[b * m0 + t * m1]) {
      cnt += 1.0;
      sum += static_cast<double>(to_acc<acc_t<S>>(x[b * x0 + t * x1]));
    }
  }
  cnt = block_sum(cnt, shared);
  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) {
    stats[2 * b] = cnt;
    stats[2 * b + 1] = sum;
  }
}

__device__ __forceinline__ double mean_of(const double* totals) { return math::whiten_mean(totals[0], totals[1]); }

template <typename S>
__global__ void centered_sq_kernel(const S* __restrict__ x, int64_t x0, int64_t x1, const bool* __restrict__ mask,
                                   int64_t m0, int64_t m1, int64_t T, const double* __restrict__ totals,
                                   double* __restrict__ out) {
  __shared__ double shared[kThreads / kWarp];
  const int64_t b = blockIdx.x;
  const double mean = mean_of(totals);
  double s = 0;
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
    if (mask[b * m0 + t * m1]) {
      const double d = static_cast<double>(to_acc<acc_t<S>>(x[b * x0 + t * x1])) - mean;
      s += d * d;
    }
  }
  s = block_sum(s, shared);
  if (threadIdx.x == 0) out[b] = s;
}

template <typename S, typename A>
__global__ void whiten_apply_kernel(const S* __restrict__ x, int64_t x0, int64_t x1, const bool* __restrict__ mask,
                                    int64_t m0, int64_t m1, int64_t T, const double* __restrict__ totals,
                                    const double* __restrict__ sq, bool shift_mean, bool unbiased, double eps,
                                    A* __restrict__ out) {
  const int64_t b = blockIdx.x;
  const math::Whiten w = math::whiten_of(totals[0], totals[1], sq[0], unbiased, eps);  // !w.ok: all zeros
  const A rstd = static_cast<A>(w.rstd);
  const A mean = static_cast<A>(w.mean);
  for (int64_t t = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < T;
       t += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    A y = A(0);
    if (w.ok && mask[b * m0 + t * m1]) {
      y = (to_acc<A>(x[b * x0 + t * x1]) - mean) * rstd;
      if (!shift_mean) y = y + mean;
    }
    out[b * T + t] = y;
  }
}

// Blocks per row of the element-wise apply: a 32768-long row in 8 blocks of 256 threads
// (16 elements each); short rows use fewer.
constexpr int64_t kApplyBlocksPerRow = 8;

}  // namespace

namespace {

bool segments_ok(const PPOSegments& segments) {
  const int64_t n_seg = segments.n_seg;
  return n_seg >= 1 && n_seg <= 65535 &&
         (n_seg == 1 || (segments.seg_len >= 1 && segments.agg != nullptr && segments.seg_last != nullptr &&
                         segments.carry != nullptr && segments.last != nullptr));
}

// The GAE launches of ppo_gae (kTokenRewards false) and gae (true): one kernel per row, or the
// three launches of the segmented scan.
template <bool kTokenRewards>
cudaError_t launch_gae_scan(DType dtype, Strided2D lp, Strided2D rf, Strided2D values, const void* scores,
                            Strided2D mask, int64_t B, int64_t T, const PPOGaeParams& p, void* advantages,
                            void* returns, void* rewards, void* kl, double* stats, const PPOSegments& segments,
                            cudaStream_t stream) {
  const int64_t n_seg = segments.n_seg;
  const int64_t seg_len = n_seg > 1 ? segments.seg_len : (T > 0 ? T : 1);
  const dim3 grid(static_cast<unsigned int>(B), static_cast<unsigned int>(n_seg));
  return dispatch_dtype(dtype, [&](auto* sp, auto* ap) {
    using S = std::remove_pointer_t<decltype(sp)>;
    using A = std::remove_pointer_t<decltype(ap)>;
    auto launch = [&](auto mode) {
      RMK_LAUNCH(grid, kGaeThreads, 0, stream, ppo_gae_kernel<decltype(mode)::value, kTokenRewards, S, A>)(
          static_cast<const S*>(lp.ptr), lp.s0, lp.s1, static_cast<const S*>(rf.ptr), rf.s0, rf.s1,
          static_cast<const S*>(values.ptr), values.s0, values.s1, static_cast<const A*>(scores),
          static_cast<const bool*>(mask.ptr), mask.s0, mask.s1, T, seg_len, p, static_cast<A*>(advantages),
          static_cast<A*>(returns), static_cast<A*>(rewards), static_cast<A*>(kl), stats,
          static_cast<A*>(segments.agg), segments.seg_last, static_cast<const A*>(segments.carry), segments.last);
    };
    if (n_seg == 1) {
      launch(std::integral_constant<int64_t, codes::kRow>{});
      return;
    }
    launch(std::integral_constant<int64_t, codes::kSegmentAggregate>{});
    constexpr int kCarryThreads = 128;
    RMK_LAUNCH(ceil_div(B, kCarryThreads), kCarryThreads, 0, stream, gae_carry_kernel<A>)(
        static_cast<const A*>(segments.agg), segments.seg_last, static_cast<const A*>(scores), B, n_seg, p,
        static_cast<A*>(segments.carry), segments.last);
    launch(std::integral_constant<int64_t, codes::kSegmentFinal>{});
  });
}

// Elements per thread of the grid-stride KL kernel's grid cap (a [B, T] batch of any size runs
// in at most kKlMaxBlocks blocks).
constexpr int64_t kKlMaxBlocks = 65536;

template <int64_t kEst, typename S, typename A>
__global__ void kl_estimate_kernel(const S* __restrict__ lp, int64_t lp0, int64_t lp1, const S* __restrict__ rf,
                                   int64_t rf0, int64_t rf1, const bool* __restrict__ mask, int64_t m0, int64_t m1,
                                   int64_t B, int64_t T, A x_clamp, A kl_clamp, A* __restrict__ out) {
  const int64_t n = B * T;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / T, t = i - b * T;
    A k = A(0);
    if (mask == nullptr || mask[b * m0 + t * m1]) {
      k = math::kl_estimate<kEst>(to_acc<A>(lp[b * lp0 + t * lp1]) - to_acc<A>(rf[b * rf0 + t * rf1]), x_clamp,
                                  kl_clamp);
    }
    out[i] = k;
  }
}

}  // namespace

cudaError_t launch_ppo_gae(DType dtype, Strided2D logprobs, Strided2D ref_logprobs, Strided2D values,
                           const void* scores, Strided2D mask, int64_t B, int64_t T, PPOGaeParams p,
                           void* advantages, void* returns, void* rewards, void* kl, double* stats,
                           PPOSegments segments, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (p.estimator < codes::kK1 || p.estimator > codes::kK3 || !segments_ok(segments)) return cudaErrorInvalidValue;
  return launch_gae_scan<false>(dtype, logprobs, ref_logprobs, values, scores, mask, B, T, p, advantages, returns,
                                rewards, kl, stats, segments, stream);
}

cudaError_t launch_gae(DType dtype, Strided2D rewards, Strided2D values, Strided2D mask, int64_t B, int64_t T,
                       double gamma, double lam, void* advantages, void* returns, PPOSegments segments,
                       cudaStream_t stream) {
  if (B == 0 || T == 0) return cudaSuccess;
  if (!segments_ok(segments)) return cudaErrorInvalidValue;
  const PPOGaeParams p{0.0, gamma, lam, codes::kK1, 0.0, 0.0, 0.0};
  // The unused pointers (ref_logprobs, rewards and kl outputs) alias live buffers: never read
  // nor written under kTokenRewards; scores and stats are null.
  return launch_gae_scan<true>(dtype, rewards, rewards, values, nullptr, mask, B, T, p, advantages, returns,
                               advantages, advantages, nullptr, segments, stream);
}

cudaError_t launch_kl_estimate(DType dtype, Strided2D logprobs, Strided2D ref_logprobs, const bool* mask,
                               int64_t mask_s0, int64_t mask_s1, int64_t B, int64_t T, int estimator, double x_clamp,
                               double kl_clamp, void* kl, cudaStream_t stream) {
  if (B == 0 || T == 0) return cudaSuccess;
  if (estimator < codes::kK1 || estimator > codes::kK3) return cudaErrorInvalidValue;
  const unsigned int blocks = static_cast<unsigned int>(std::min<int64_t>(kKlMaxBlocks, ceil_div(B * T, kThreads)));
  return dispatch_dtype(dtype, [&](auto* sp, auto* ap) {
    using S = std::remove_pointer_t<decltype(sp)>;
    using A = std::remove_pointer_t<decltype(ap)>;
    auto launch = [&](auto est) {
      RMK_LAUNCH(blocks, kThreads, 0, stream, kl_estimate_kernel<decltype(est)::value, S, A>)(
          static_cast<const S*>(logprobs.ptr), logprobs.s0, logprobs.s1, static_cast<const S*>(ref_logprobs.ptr),
          ref_logprobs.s0, ref_logprobs.s1, mask, mask_s0, mask_s1, B, T, static_cast<A>(x_clamp),
          static_cast<A>(kl_clamp), static_cast<A*>(kl));
    };
    switch (estimator) {
      case codes::kK1: launch(std::integral_constant<int64_t, codes::kK1>{}); break;
      case codes::kAbs: launch(std::integral_constant<int64_t, codes::kAbs>{}); break;
      case codes::kK2: launch(std::integral_constant<int64_t, codes::kK2>{}); break;
      default: launch(std::integral_constant<int64_t, codes::kK3>{}); break;
    }
  });
}

cudaError_t launch_masked_row_stats(DType dtype, Strided2D x, Strided2D mask, int64_t B, int64_t T, double* stats,
                                    cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned int>(B));
  return dispatch_dtype(dtype, [&](auto* sp, auto*) {
    using S = std::remove_pointer_t<decltype(sp)>;
    RMK_LAUNCH(grid, kThreads, 0, stream, row_stats_kernel<S>)(static_cast<const S*>(x.ptr), x.s0, x.s1,
                                                       static_cast<const bool*>(mask.ptr), mask.s0, mask.s1, T,
                                                       stats);
  });
}

cudaError_t launch_masked_centered_sq(DType dtype, Strided2D x, Strided2D mask, int64_t B, int64_t T,
                                      const double* totals, double* out, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned int>(B));
  return dispatch_dtype(dtype, [&](auto* sp, auto*) {
    using S = std::remove_pointer_t<decltype(sp)>;
    RMK_LAUNCH(grid, kThreads, 0, stream, centered_sq_kernel<S>)(static_cast<const S*>(x.ptr), x.s0, x.s1,
                                                         static_cast<const bool*>(mask.ptr), mask.s0, mask.s1, T,
                                                         totals, out);
  });
}

cudaError_t launch_masked_whiten_apply(DType dtype, Strided2D x, Strided2D mask, int64_t B, int64_t T,
                                       const double* totals, const double* sq, bool shift_mean, bool unbiased,
                                       double eps, void* out, cudaStream_t stream) {
  if (B == 0 || T == 0) return cudaSuccess;
  const unsigned int gy = static_cast<unsigned int>(std::min<int64_t>(kApplyBlocksPerRow, ceil_div(T, kThreads)));
  const dim3 grid(static_cast<unsigned int>(B), gy);
  return dispatch_dtype(dtype, [&](auto* sp, auto* ap) {
    using S = std::remove_pointer_t<decltype(sp)>;
    using A = std::remove_pointer_t<decltype(ap)>;
    RMK_LAUNCH(grid, kThreads, 0, stream, whiten_apply_kernel<S, A>)(static_cast<const S*>(x.ptr), x.s0, x.s1,
                                                             static_cast<const bool*>(mask.ptr), mask.s0, mask.s1, T,
                                                             totals, sq, shift_mean, unbiased, eps,
                                                             static_cast<A*>(out));
  });
}

}  // namespace cuda
}  // namespace rmkernels
