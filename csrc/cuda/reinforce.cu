// CUDA kernel of the REINFORCE-family advantages (torch-free; see reinforce.cuh for the
// contract).
//
// One cooperative launch per call, a warp per row (or per piece of a row: below) in phases (A)
// and (1), and grid-stride loops:
//   (0) REINFORCE++ only: the three batch totals of the workspace are zeroed, grid sync;
//   (A) rows split into pieces only (a batch of few long rows, reinforce_plan): each warp walks
//       its pieces from the right composing the maps of the return (valid: R -> r + gamma R;
//       masked: R -> R) into the piece's aggregate, in the workspace. Grid sync;
//   (1) each warp walks its rows (pieces) from the right in chunks of kWarp * kItems positions,
//       each lane owning kItems consecutive ones, from the carry of the row's end (0) or of the
//       pieces to the right (their aggregates applied to 0, right to left). A lane composes the
//       maps of its items, a reverse warp scan (affine_scan.cuh's warp_rscan, shared with the
//       GAE kernel) gives every lane the composition of the lanes to its right, applied to the
//       carry of the chunk to the right, and the lane walks its items. ReMax writes both
//       outputs here and is done. REINFORCE++ writes the returns and keeps each piece's count,
//       mean and centred sum of squares (M2), chunk by chunk from the values in registers
//       (Chan et al.'s pairwise update), in the workspace; each warp adds its pieces' counts
//       and sums to the batch totals with one atomic each. Grid sync;
//   (2) REINFORCE++: the batch's centred squares from the pieces' statistics,
//       sum_p M2_p + n_p (mean_p - mean)^2 (a pass over the pieces, not over [B, T]), grid sync;
//   (3) REINFORCE++: one thread per [B, T] element writes (R - mean) * rstd under the mask
//       (math::whiten_of, the whitening formula of every C++/CUDA kernel), reading the returns
//       written in (1) at L2 (__ldcg).
// Bytes moved per element: the rewards and the mask read once and both outputs written once
// (ReMax); REINFORCE++ reads the returns and the mask once more in (3); split rows read the
// rewards and the mask once more in (A). Splitting trades that read for parallelism: a warp's
// walk of a row is a chain of dependent chunk steps, so B = 32 rows of T = 32768 would keep
// only 32 warps busy.
#include "reinforce.cuh"

#include "affine_scan.cuh"

#include <algorithm>
#include <limits>
#include <type_traits>

#include "rmkernels/scalar_math.h"

namespace rmkernels {
namespace cuda {
namespace {

constexpr int kItems = 4;  // consecutive positions per lane
constexpr int64_t kChunk = static_cast<int64_t>(kWarp) * kItems;
constexpr int64_t kTotals = 3;  // workspace: the batch's count, sum, centred squares; then (n, mean, M2) per piece

// One lane's kItems positions of chunk `t0` (its first position) of a row: the mask, the rewards
// (0 where masked) and the composition of their maps, the rightmost applied first.
template <typename S, typename A>
__device__ __forceinline__ Affine<A> load_items(const S* rr, int64_t r1, const bool* mr, int64_t m1, int64_t t0,
                                                int64_t end, A gamma, bool (&m)[kItems], A (&x)[kItems]) {
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int64_t t = t0 + j;
    m[j] = t < end && mr[t * m1];
    x[j] = m[j] ? to_acc<A>(rr[t * r1]) : A(0);
  }
  Affine<A> f = identity<A>();
#pragma unroll
  for (int j = kItems - 1; j >= 0; --j) {
    if (m[j]) f = after(Affine<A>{gamma, x[j]}, f);
  }
  return f;
}

// Piece p of the rows (n_seg per row, seg_len positions each, the last one cut at T): its row,
// its index in the row, its positions [lo, hi) and the first position of its last chunk (where the
// walk from the right starts; below lo when the piece is empty).
struct Piece {
  int64_t b, s, lo, hi, last_chunk;
  __device__ __forceinline__ Piece(int64_t p, int64_t n_seg, int64_t seg_len, int64_t T)
      : b(p / n_seg), s(p % n_seg), lo(s * seg_len), hi(lo + seg_len < T ? lo + seg_len : T),
        last_chunk(lo + ((hi - lo + kChunk - 1) / kChunk - 1) * kChunk) {}
};

template <typename S, typename A, bool kRemax>
__global__ void __launch_bounds__(kThreads)
    reinforce_kernel(const S* __restrict__ rew, int64_t r0, int64_t r1, const bool* __restrict__ mask, int64_t m0,
                     int64_t m1, const A* __restrict__ baselines, int64_t B, int64_t T, int64_t n_seg,
                     int64_t seg_len, double gamma_d, bool unbiased, double eps, double* ws, A* adv, A* ret) {
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;  // a multiple of kWarp
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % kWarp;
  const A gamma = static_cast<A>(gamma_d);
  const int64_t pieces = B * n_seg;
  double* stats = ws + kTotals;                                   // (n, mean, M2) per piece
  double* agg = kRemax ? ws : ws + kTotals + 3 * pieces;          // (a, b) per piece (n_seg > 1)

  // (0)
  if (!kRemax) {
    if (tid < kTotals) ws[tid] = 0.0;
    RMK_GRID_SYNC();
  }

  // (A) each piece's aggregate (the piece index is uniform over the warp: shuffles name all lanes)
  if (n_seg > 1) {
    for (int64_t p = tid / kWarp; p < pieces; p += nthreads / kWarp) {
      const Piece pc(p, n_seg, seg_len, T);
      Affine<A> g = identity<A>();  // the piece's chunks to the right of the current one
      for (int64_t c0 = pc.last_chunk; c0 >= pc.lo; c0 -= kChunk) {
        bool m[kItems];
        A x[kItems];
        const Affine<A> f = load_items(rew + pc.b * r0, r1, mask + pc.b * m0, m1, c0 + int64_t(lane) * kItems, pc.hi,
                                       gamma, m, x);
        Affine<A> right;
        const Affine<A> inc = warp_rscan<false>(f, right);
        const Affine<A> chunk{__shfl_sync(0xffffffffu, inc.a, 0), __shfl_sync(0xffffffffu, inc.b, 0)};
        g = after(chunk, g);
      }
      if (lane == 0) {
        agg[2 * p] = static_cast<double>(g.a);
        agg[2 * p + 1] = static_cast<double>(g.b);
      }
    }
    RMK_GRID_SYNC();
  }

  // (1) a warp per piece
  double w_cnt = 0, w_sum = 0;  // this warp's pieces, the same in every lane
  for (int64_t p = tid / kWarp; p < pieces; p += nthreads / kWarp) {
    const Piece pc(p, n_seg, seg_len, T);
    const int64_t b = pc.b, s = pc.s, hi = pc.hi;
    const S* rr = rew + b * r0;
    const bool* mr = mask + b * m0;
    A* o_ret = ret + b * T;
    A* o_adv = adv + b * T;
    const A base = kRemax ? baselines[b] : A(0);
    A carry = A(0);  // R just right of the current chunk: first the pieces to the right, applied to 0
    for (int64_t k = n_seg - 1; k > s; --k) {
      carry = apply(Affine<A>{static_cast<A>(__ldcg(agg + 2 * (b * n_seg + k))),
                              static_cast<A>(__ldcg(agg + 2 * (b * n_seg + k) + 1))}, carry);
    }
    double n = 0, mean = 0, m2 = 0, sum = 0;  // the piece's statistics so far (REINFORCE++)
    for (int64_t c0 = pc.last_chunk; c0 >= pc.lo; c0 -= kChunk) {
      const int64_t t0 = c0 + static_cast<int64_t>(lane) * kItems;
      bool m[kItems];
      A x[kItems];
      const Affine<A> f = load_items(rr, r1, mr, m1, t0, hi, gamma, m, x);
      Affine<A> right;  // the lanes to the right of this one
      warp_rscan<false>(f, right);
      A R = apply(right, carry);  // R at t0 + kItems
      A rv[kItems];
#pragma unroll
      for (int j = kItems - 1; j >= 0; --j) {
        const int64_t t = t0 + j;
        if (m[j]) R = x[j] + gamma * R;
        rv[j] = R;
        if (t < hi) {
          if (kRemax) {
            o_ret[t] = R;
            o_adv[t] = m[j] ? R - base : R;
          } else {
            o_ret[t] = m[j] ? R : A(0);
          }
        }
      }
      carry = __shfl_sync(0xffffffffu, R, 0);  // lane 0's R: at the chunk's first position
      if (!kRemax) {
        double cc = 0, cs = 0;
#pragma unroll
        for (int j = 0; j < kItems; ++j) {
          cc += m[j] ? 1.0 : 0.0;
          cs += m[j] ? static_cast<double>(rv[j]) : 0.0;
        }
        cc = warp_sum(cc);
        cs = warp_sum(cs);
        if (cc > 0) {  // uniform over the warp
          const double cm = cs / cc;
          double q = 0;
#pragma unroll
          for (int j = 0; j < kItems; ++j) {
            const double d = static_cast<double>(rv[j]) - cm;
            q += m[j] ? d * d : 0.0;
          }
          q = warp_sum(q);
          const double d = cm - mean, nn = n + cc;
          mean += d * (cc / nn);
          m2 += q + d * d * (n * cc / nn);
          n = nn;
          sum += cs;
        }
      }
    }
    if (!kRemax) {
      if (lane == 0) {
        stats[3 * p] = n;
        stats[3 * p + 1] = mean;
        stats[3 * p + 2] = m2;
      }
      w_cnt += n;
      w_sum += sum;
    }
  }
  if (kRemax) return;
  if (lane == 0 && w_cnt > 0) {
    atomicAdd(ws, w_cnt);
    atomicAdd(ws + 1, w_sum);
  }
  RMK_GRID_SYNC();

  // (2) the centred squares about the batch mean, from each piece's (n, mean, M2)
  const double mean = math::whiten_mean(__ldcg(ws), __ldcg(ws + 1));
  double sq = 0;
  for (int64_t p = tid; p < pieces; p += nthreads) {
    const double np = __ldcg(stats + 3 * p);
    if (np > 0) {
      const double d = __ldcg(stats + 3 * p + 1) - mean;
      sq += __ldcg(stats + 3 * p + 2) + np * (d * d);
    }
  }
  sq = warp_sum(sq);
  if (lane == 0 && sq != 0) atomicAdd(ws + 2, sq);
  RMK_GRID_SYNC();

  // (3) the whitened returns under the mask; (b, t) advance by the grid's stride with a carry
  const math::Whiten w = math::whiten_of(__ldcg(ws), __ldcg(ws + 1), __ldcg(ws + 2), unbiased, eps);
  const A mean_a = static_cast<A>(w.mean), rstd = static_cast<A>(w.rstd);
  if (T == 0) return;
  GridStride2D q(tid, nthreads, T);
  for (int64_t i = tid; i < B * T; i += nthreads, q.advance()) {
    adv[i] = w.ok && mask[q.row * m0 + q.col * m1] ? (__ldcg(ret + i) - mean_a) * rstd : A(0);
  }
}

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename S, typename A, bool kRemax>
cudaError_t plan_of(int64_t B, int64_t T, int64_t segment_t, ReinforcePlan* plan) {
  unsigned int cap = 0;  // the device's capacity for this kernel, in blocks
  cudaError_t err =
      cooperative_grid<reinforce_kernel<S, A, kRemax>, kThreads>(std::numeric_limits<int64_t>::max(), &cap);
  if (err != cudaSuccess) return err;
  const int64_t warps = static_cast<int64_t>(cap) * (kThreads / kWarp);
  int64_t n_seg = 1;
  if (segment_t > 0 && T >= 2 * segment_t && B > 0) {
    n_seg = std::max<int64_t>(1, std::min<int64_t>(div_up(T, segment_t), warps / B));
  }
  const int64_t seg_len = div_up(div_up(T, n_seg), kChunk) * kChunk;
  plan->segments = n_seg > 1 ? div_up(T, seg_len) : 1;
  plan->seg_len = plan->segments > 1 ? seg_len : T;
  // As many blocks as the largest phase has work for (a warp per piece, a thread per element),
  // at most the capacity.
  const int64_t work = std::max<int64_t>({B * plan->segments * kWarp, B * T, kTotals});
  plan->blocks = static_cast<unsigned int>(std::min<int64_t>(div_up(work, kThreads), cap));
  return cudaSuccess;
}

template <typename S, typename A, bool kRemax>
cudaError_t launch(Strided2D rewards, Strided2D mask, const A* baselines, int64_t B, int64_t T, double gamma,
                   bool unbiased, double eps, const ReinforcePlan& plan, double* ws, A* adv, A* ret,
                   cudaStream_t stream) {
  if (plan.blocks < 1 || plan.segments < 1 || (plan.segments > 1 && plan.seg_len % kChunk != 0)) {
    return cudaErrorInvalidValue;
  }
  return RMK_LAUNCH_COOPERATIVE(plan.blocks, kThreads, 0, stream, reinforce_kernel<S, A, kRemax>)(
      static_cast<const S*>(rewards.ptr), rewards.s0, rewards.s1, static_cast<const bool*>(mask.ptr), mask.s0,
      mask.s1, baselines, B, T, plan.segments, plan.seg_len, gamma, unbiased, eps, ws, adv, ret);
}

}  // namespace

cudaError_t reinforce_plan(DType dtype, bool remax, int64_t B, int64_t T, int64_t segment_t, ReinforcePlan* plan) {
  *plan = ReinforcePlan{1, 1, T};
  if (B == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  const cudaError_t derr = dispatch_dtype(dtype, [&](auto* sp, auto* ap) {
    using S = std::remove_pointer_t<decltype(sp)>;
    using A = std::remove_pointer_t<decltype(ap)>;
    err = remax ? plan_of<S, A, true>(B, T, segment_t, plan) : plan_of<S, A, false>(B, T, segment_t, plan);
  });
  return err != cudaSuccess ? err : derr;
}

cudaError_t launch_reinforce(DType dtype, Strided2D rewards, Strided2D mask, const void* baselines, int64_t B,
                             int64_t T, double gamma, bool unbiased, double eps, const ReinforcePlan& plan,
                             double* workspace, void* advantages, void* returns, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  const cudaError_t derr = dispatch_dtype(dtype, [&](auto* sp, auto* ap) {
    using S = std::remove_pointer_t<decltype(sp)>;
    using A = std::remove_pointer_t<decltype(ap)>;
    A* adv = static_cast<A*>(advantages);
    A* ret = static_cast<A*>(returns);
    err = baselines != nullptr
              ? launch<S, A, true>(rewards, mask, static_cast<const A*>(baselines), B, T, gamma, unbiased, eps, plan,
                                   workspace, adv, ret, stream)
              : launch<S, A, false>(rewards, mask, nullptr, B, T, gamma, unbiased, eps, plan, workspace, adv, ret,
                                    stream);
  });
  return err != cudaSuccess ? err : derr;
}

}  // namespace cuda
}  // namespace rmkernels
