// CUDA kernels of the critic-free group advantages (torch-free; see
// group_adv.cuh for the contract).
//
// group_advantages: (1) one thread per response adds 1 and its score (opo: a warp per response,
// which also adds its length and length x score) into its group's float64 slots with atomics, and
// counts nonzero scores (gpg, one atomic per warp); (2) grpo only: the centred squares from the
// group means; (3) the broadcast: one thread per [B, T] element evaluates the formula of
// rmkernels/group_adv_math.h (shared with the CPU kernel) for its row and writes it under the
// mask. Three launches (two without grpo) plus the workspace memset: the statistics must be
// complete before any value is written, and no launch waits on the host. Bytes moved: 16-24 B per response in (1)-(2),
// the mask once (twice for opo) and the [B, T] output once in (3).
//
// (REINFORCE++'s return is gae_kernel with values 0 and lam 1: rmkernels/ops/group_adv.py.)
#include "group_adv.cuh"

#include <algorithm>
#include <type_traits>

#include "rmkernels/codes.h"
#include "rmkernels/group_adv_math.h"

namespace rmkernels {
namespace cuda {
namespace {

constexpr int kStats = 5;  // n, s, sq, ls, lrs per group; stats[B * kStats] = gpg's nonzero count

// kLen (opo): one warp per response, which counts its row's valid tokens; otherwise one thread
// per response. gpg's nonzero count is summed over the warp before its one atomic.
template <typename A, bool kLen>
__global__ void group_stats_kernel(const A* __restrict__ r, const int64_t* __restrict__ ids,
                                   const bool* __restrict__ mask, int64_t B, int64_t T, int64_t ms0, int64_t ms1,
                                   int64_t est, double* __restrict__ stats) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % kWarp;
  int64_t b;
  double len = 0;
  if (kLen) {
    b = tid / kWarp;  // uniform over the warp
    if (b >= B) return;
    for (int64_t t = lane; t < T; t += kWarp) len += mask[b * ms0 + t * ms1] ? 1.0 : 0.0;
    len = warp_sum(len);
    if (lane != 0) return;
  } else {
    b = tid;
    if (b >= B) return;
  }
  const int64_t g = ids[b];
  const double x = static_cast<double>(r[b]);
  if (est == codes::kGpg) {
    const unsigned active = __activemask();
    const unsigned nz = __ballot_sync(active, x != 0);  // NaN counts, as torch.count_nonzero
    if (lane == __ffs(active) - 1 && nz != 0) atomicAdd(stats + B * kStats, static_cast<double>(__popc(nz)));
  }
  if (g < 0 || g >= B) return;
  double* st = stats + g * kStats;
  atomicAdd(st, 1.0);
  atomicAdd(st + 1, x);
  if (kLen) {
    atomicAdd(st + 3, len);
    atomicAdd(st + 4, len * x);
  }
}

template <typename A>
__global__ void group_sq_kernel(const A* __restrict__ r, const int64_t* __restrict__ ids, int64_t B,
                                double* __restrict__ stats) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int64_t g = ids[b];
  if (g < 0 || g >= B) return;
  double* st = stats + g * kStats;
  const double d = static_cast<double>(r[b]) - st[1] / st[0];
  atomicAdd(st + 2, d * d);
}

// One thread per output element of the flattened [B, max(T, 1)]: the element's row value (the
// stats of its group are a few cached loads; the formula is a handful of float64 operations),
// written under the mask; the thread of t = 0 also writes seq[b].
template <typename A>
__global__ void group_write_kernel(const A* __restrict__ r, const int64_t* __restrict__ ids,
                                   const bool* __restrict__ mask, int64_t B, int64_t T, int64_t ms0, int64_t ms1,
                                   int64_t est, double eps, bool unbiased, int64_t single, double f_norm,
                                   const double* __restrict__ stats, A* __restrict__ seq, A* __restrict__ adv) {
  const int64_t Tn = T > 0 ? T : 1;
  const int64_t n = B * Tn;
  const double alpha = static_cast<double>(B) / fmax(stats[B * kStats], 1.0);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / Tn, t = i - b * Tn;
    const int64_t g = ids[b];
    A v;
    if (g >= 0 && g < B) {
      const double* st = stats + g * kStats;
      const group_adv::GroupStats gs{st[0], st[1], st[2], st[3], st[4]};
      const double sigma = est == codes::kGrpo ? group_adv::sigma_of(gs, unbiased) : 1.0;
      v = static_cast<A>(group_adv::value(static_cast<double>(r[b]), gs, sigma, est, eps, single, f_norm, alpha));
    } else {
      v = quiet_nan<A>();
    }
    if (t == 0) seq[b] = v;
    if (T > 0) adv[i] = mask[b * ms0 + t * ms1] ? v : A(0);
  }
}

}  // namespace

cudaError_t launch_group_advantages(DType dtype, const void* scores, const int64_t* group_ids, const bool* mask,
                                    int64_t B, int64_t T, int64_t ms0, int64_t ms1, int64_t estimator, double eps,
                                    bool unbiased, int64_t single, double f_norm, double* stats, void* seq, void* adv,
                                    cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (dtype != DType::kFloat32 && dtype != DType::kFloat64) return cudaErrorInvalidValue;
  cudaError_t err = cudaMemsetAsync(stats, 0, sizeof(double) * (B * kStats + 1), stream);
  if (err != cudaSuccess) return err;
  auto run = [&](auto* a) {
    using A = std::remove_pointer_t<decltype(a)>;
    const A* r = static_cast<const A*>(scores);
    if (estimator == codes::kOpo) {
      RMK_LAUNCH(ceil_div(B * kWarp, kThreads), kThreads, 0, stream, group_stats_kernel<A, true>)(
          r, group_ids, mask, B, T, ms0, ms1, estimator, stats);
    } else {
      RMK_LAUNCH(ceil_div(B, kThreads), kThreads, 0, stream, group_stats_kernel<A, false>)(
          r, group_ids, mask, B, T, ms0, ms1, estimator, stats);
    }
    if (estimator == codes::kGrpo) {
      RMK_LAUNCH(ceil_div(B, kThreads), kThreads, 0, stream, group_sq_kernel<A>)(r, group_ids, B, stats);
    }
    const int64_t n = B * (T > 0 ? T : 1);
    const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 20);  // grid-stride
    RMK_LAUNCH(static_cast<unsigned int>(blocks), kThreads, 0, stream, group_write_kernel<A>)(
        r, group_ids, mask, B, T, ms0, ms1, estimator, eps, unbiased, single, f_norm, stats, static_cast<A*>(seq),
        static_cast<A*>(adv));
  };
  if (dtype == DType::kFloat64) {
    run(static_cast<double*>(nullptr));
  } else {
    run(static_cast<float*>(nullptr));
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace rmkernels
