// CUDA kernel of the REINFORCE-family advantages (torch-free; see reinforce.cuh for the
// contract).
//
// One cooperative launch per call, a warp per row in phase (1) and grid-stride loops:
//   (0) REINFORCE++ only: the three batch totals of the workspace are zeroed, grid sync;
//   (1) each warp walks its rows from the right in chunks of kWarp * kItems positions, each lane
//       owning kItems consecutive ones. The return is an affine map of the carried state
//       (valid: R -> r + gamma R; masked: R -> R), so a lane composes the maps of its items, a
//       reverse warp scan (affine_scan.cuh's warp_rscan, shared with the GAE kernel) gives every
//       lane the composition of the lanes to its right, applied to the carry of the chunk to
//       the right, and the lane walks its items. ReMax
//       writes both outputs here and is done. REINFORCE++ writes the returns and keeps each
//       row's count, mean and centred sum of squares (M2), chunk by chunk from the values in
//       registers (Chan et al.'s pairwise update), in the workspace; each warp adds its rows'
//       counts and sums to the batch totals with one atomic each. Grid sync;
//   (2) REINFORCE++: the batch's centred squares from the rows' statistics,
//       sum_b M2_b + n_b (mean_b - mean)^2 (a pass over B, not over [B, T]), grid sync;
//   (3) REINFORCE++: one thread per [B, T] element writes (R - mean) * rstd under the mask
//       (math::whiten_of, the whitening formula of every C++/CUDA kernel), reading the returns
//       written in (1) at L2 (__ldcg).
// Bytes moved per element: the rewards and the mask read once and both outputs written once
// (ReMax); REINFORCE++ reads the returns and the mask once more in (3). A row is one warp's work:
// a batch of few very long rows (B = 32, T = 32768) keeps only B warps busy in (1).
#include "reinforce.cuh"

#include "affine_scan.cuh"

#include <algorithm>
#include <type_traits>

#include "rmkernels/scalar_math.h"

namespace rmkernels {
namespace cuda {
namespace {

constexpr int kItems = 4;  // consecutive positions per lane
constexpr int64_t kChunk = static_cast<int64_t>(kWarp) * kItems;
constexpr int64_t kTotals = 3;  // workspace: the batch's count, sum, centred squares; then (n, mean, M2) per row

template <typename S, typename A, bool kRemax>
__global__ void __launch_bounds__(kThreads)
    reinforce_kernel(const S* __restrict__ rew, int64_t r0, int64_t r1, const bool* __restrict__ mask, int64_t m0,
                     int64_t m1, const A* __restrict__ baselines, int64_t B, int64_t T, double gamma_d,
                     bool unbiased, double eps, double* ws, A* adv, A* ret) {
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;  // a multiple of kWarp
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % kWarp;
  const A gamma = static_cast<A>(gamma_d);
  double* rows = ws + kTotals;

  // (0)
  if (!kRemax) {
    if (tid < kTotals) ws[tid] = 0.0;
    RMK_GRID_SYNC();
  }

  // (1) a warp per row (b is uniform over the warp, so every shuffle names all 32 lanes)
  double w_cnt = 0, w_sum = 0;  // this warp's rows, the same in every lane
  const int64_t n_chunks = (T + kChunk - 1) / kChunk;
  for (int64_t b = tid / kWarp; b < B; b += nthreads / kWarp) {
    const S* rr = rew + b * r0;
    const bool* mr = mask + b * m0;
    A* o_ret = ret + b * T;
    A* o_adv = adv + b * T;
    const A base = kRemax ? baselines[b] : A(0);
    A carry = A(0);               // R just right of the current chunk
    double n = 0, mean = 0, m2 = 0, sum = 0;  // the row's statistics so far (REINFORCE++)
    for (int64_t c = n_chunks - 1; c >= 0; --c) {
      const int64_t t0 = c * kChunk + static_cast<int64_t>(lane) * kItems;
      bool m[kItems];
      A x[kItems];
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int64_t t = t0 + j;
        m[j] = t < T && mr[t * m1];
        x[j] = m[j] ? to_acc<A>(rr[t * r1]) : A(0);
      }
      Affine<A> f = identity<A>();  // this lane's items (valid: R -> gamma R + r), the rightmost first
#pragma unroll
      for (int j = kItems - 1; j >= 0; --j) {
        if (m[j]) f = after(Affine<A>{gamma, x[j]}, f);
      }
      Affine<A> right;  // the lanes to the right of this one
      warp_rscan<false>(f, right);
      A R = apply(right, carry);  // R at t0 + kItems
      A rv[kItems];
#pragma unroll
      for (int j = kItems - 1; j >= 0; --j) {
        const int64_t t = t0 + j;
        if (m[j]) R = x[j] + gamma * R;
        rv[j] = R;
        if (t < T) {
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
        rows[3 * b] = n;
        rows[3 * b + 1] = mean;
        rows[3 * b + 2] = m2;
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

  // (2) the centred squares about the batch mean, from each row's (n, mean, M2)
  const double mean = math::whiten_mean(__ldcg(ws), __ldcg(ws + 1));
  double sq = 0;
  for (int64_t b = tid; b < B; b += nthreads) {
    const double nb = __ldcg(rows + 3 * b);
    if (nb > 0) {
      const double d = __ldcg(rows + 3 * b + 1) - mean;
      sq += __ldcg(rows + 3 * b + 2) + nb * (d * d);
    }
  }
  sq = warp_sum(sq);
  if (lane == 0 && sq != 0) atomicAdd(ws + 2, sq);
  RMK_GRID_SYNC();

  // (3) the whitened returns under the mask; (b, t) advance by the grid's stride with a carry
  const math::Whiten w = math::whiten_of(__ldcg(ws), __ldcg(ws + 1), __ldcg(ws + 2), unbiased, eps);
  const A mean_a = static_cast<A>(w.mean), rstd = static_cast<A>(w.rstd);
  if (T == 0) return;
  GridStride2D p(tid, nthreads, T);
  for (int64_t i = tid; i < B * T; i += nthreads, p.advance()) {
    adv[i] = w.ok && mask[p.row * m0 + p.col * m1] ? (__ldcg(ret + i) - mean_a) * rstd : A(0);
  }
}

template <typename S, typename A, bool kRemax>
cudaError_t launch(Strided2D rewards, Strided2D mask, const A* baselines, int64_t B, int64_t T, double gamma,
                   bool unbiased, double eps, double* ws, A* adv, A* ret, cudaStream_t stream) {
  // As many blocks as the largest phase has work for (a warp per row, a thread per element),
  // up to what the device holds at once.
  const int64_t work = std::max<int64_t>({B * kWarp, B * T, kTotals});
  unsigned int blocks = 0;
  cudaError_t err = cooperative_grid<reinforce_kernel<S, A, kRemax>, kThreads>(ceil_div(work, kThreads), &blocks);
  if (err != cudaSuccess) return err;
  return RMK_LAUNCH_COOPERATIVE(blocks, kThreads, 0, stream, reinforce_kernel<S, A, kRemax>)(
      static_cast<const S*>(rewards.ptr), rewards.s0, rewards.s1, static_cast<const bool*>(mask.ptr), mask.s0,
      mask.s1, baselines, B, T, gamma, unbiased, eps, ws, adv, ret);
}

}  // namespace

cudaError_t launch_reinforce(DType dtype, Strided2D rewards, Strided2D mask, const void* baselines, int64_t B,
                             int64_t T, double gamma, bool unbiased, double eps, double* workspace, void* advantages,
                             void* returns, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  const cudaError_t derr = dispatch_dtype(dtype, [&](auto* sp, auto* ap) {
    using S = std::remove_pointer_t<decltype(sp)>;
    using A = std::remove_pointer_t<decltype(ap)>;
    A* adv = static_cast<A*>(advantages);
    A* ret = static_cast<A*>(returns);
    err = baselines != nullptr
              ? launch<S, A, true>(rewards, mask, static_cast<const A*>(baselines), B, T, gamma, unbiased, eps,
                                   workspace, adv, ret, stream)
              : launch<S, A, false>(rewards, mask, nullptr, B, T, gamma, unbiased, eps, workspace, adv, ret, stream);
  });
  return err != cudaSuccess ? err : derr;
}

}  // namespace cuda
}  // namespace rmkernels
