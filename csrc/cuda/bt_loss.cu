// CUDA kernels of the Bradley-Terry and K-wise ranking losses (torch-free; see bt_loss.cuh).
//
// Bytes moved: the Bradley-Terry forward reads the B chosen and B rejected rewards (+ B
// margins, B weights when given) and writes one float or B floats; the backward reads the
// same and writes 2B gradients. The ranking kernels read each row of [B, K] once per warp
// (the pair loop re-reads it from L1) and write B floats / B*K gradients.
#include "bt_loss.cuh"

#include <algorithm>
#include <type_traits>

#include "rmkernels/scalar_math.h"

namespace rmkernels {
namespace cuda {
namespace {

// The formulas (log-sigmoid, sigmoid, the pair loss and its derivative) are those of
// rmkernels/scalar_math.h, shared with the CPU kernels.
using math::log_sigmoid;
using math::sigmoid;

template <typename S, typename A> struct Pairs {
  const S* c;
  const S* r;
  int64_t sc, sr;
  const A* m;  // null: mv
  const A* w;  // null: wv
  A mv, wv, e, coef;
  int64_t B;
  __device__ __forceinline__ A margin(int64_t i) const { return m ? m[i] : mv; }
  __device__ __forceinline__ A weight(int64_t i) const { return w ? w[i] : wv; }
  __device__ __forceinline__ A chosen(int64_t i) const { return to_acc<A>(c[i * sc]); }
  __device__ __forceinline__ A rejected(int64_t i) const { return to_acc<A>(r[i * sr]); }
  // l_i = -(1 - e) logsigmoid(d) - e logsigmoid(-d) + coef (c + r)^2, d = c - r - m.
  __device__ __forceinline__ A loss(int64_t i) const {
    const A ci = chosen(i), ri = rejected(i);
    const A d = ci - ri - margin(i);
    A l = math::bt_pair_loss(d, e);
    if (coef != A(0)) l += coef * (ci + ri) * (ci + ri);  // never 0 * inf when the coefficient is 0
    return l;
  }
};

template <typename S, typename A> Pairs<S, A> typed(const BTPairs& p) {
  return {static_cast<const S*>(p.chosen), static_cast<const S*>(p.rejected), p.stride_chosen, p.stride_rejected,
          static_cast<const A*>(p.margin), static_cast<const A*>(p.weights), static_cast<A>(p.margin_value),
          static_cast<A>(p.weight_value), static_cast<A>(p.label_smoothing), static_cast<A>(p.center_coef), p.B};
}

// kReduceNone: a grid-stride loop writes w_i l_i. kReduceMean / kReduceSum: launched as one
// block, which walks B with a fixed thread-to-pair map and a fixed reduction tree
// (deterministic, no atomics), summing in float64 (a float32 sum of B / 256 pairs per thread
// would lose ~1e-4 relative at 2^22 pairs).
template <typename S, typename A>
__global__ void bt_fwd_kernel(Pairs<S, A> p, Reduction reduction, A* __restrict__ out) {
  __shared__ double shared[kThreads / kWarp];
  if (reduction == codes::kReduceNone) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < p.B; i += (int64_t)gridDim.x * blockDim.x)
      out[i] = p.weight(i) * p.loss(i);
    return;
  }
  double s = 0, ws = 0;
  for (int64_t i = threadIdx.x; i < p.B; i += blockDim.x) {
    const A w = p.weight(i);
    s += static_cast<double>(w * p.loss(i));
    ws += static_cast<double>(w);
  }
  s = block_sum(s, shared);
  ws = block_sum(ws, shared);
  if (threadIdx.x == 0) out[0] = static_cast<A>(reduction == codes::kReduceMean ? s / ws : s);  // B = 0 mean: NaN
}

template <typename S, typename A>
__global__ void bt_bwd_kernel(Pairs<S, A> p, Reduction reduction, const A* __restrict__ grad, S* __restrict__ gc,
                              S* __restrict__ gr) {
  __shared__ double shared[kThreads / kWarp];
  A scale = reduction == codes::kReduceNone ? A(1) : grad[0];
  if (reduction == codes::kReduceMean) {
    double ws;
    if (p.w != nullptr) {  // the launcher runs this case as one block: sum(w) once, in float64
      double s = 0;
      for (int64_t i = threadIdx.x; i < p.B; i += blockDim.x) s += static_cast<double>(p.w[i]);
      ws = block_sum(s, shared);
    } else {
      ws = static_cast<double>(p.B) * static_cast<double>(p.wv);
    }
    scale = static_cast<A>(static_cast<double>(scale) / ws);
  }
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < p.B; i += (int64_t)gridDim.x * blockDim.x) {
    const A ci = p.chosen(i), ri = p.rejected(i);
    const A d = ci - ri - p.margin(i);
    // dl/dd = -(1 - e) sigmoid(-d) + e sigmoid(d); the centering term adds 2 coef (c + r) to both.
    const A dl_dd = math::bt_pair_dloss(d, p.e);
    const A center = p.coef != A(0) ? A(2) * p.coef * (ci + ri) : A(0);
    const A g = (reduction == codes::kReduceNone ? grad[i] : scale) * p.weight(i);
    if (gc) gc[i] = from_acc<S>(g * (dl_dd + center));
    if (gr) gr[i] = from_acc<S>(g * (center - dl_dd));
  }
}

// Rows per block of the ranking kernels: one warp per row (K is small: 2..16 in practice). Each
// pair term is computed in A; a row's sums of them accumulate in double (each lane's, then the
// warp's), as in the CPU and Triton kernels: float32 sums of K(K-1)/2 terms drift for large K.
constexpr int kRowsPerBlock = kThreads / kWarp;

__device__ __forceinline__ int64_t candidates(const int64_t* nc, int64_t b, int64_t K) {
  if (nc == nullptr) return K;
  const int64_t n = nc[b];
  return n < 0 ? 0 : (n > K ? K : n);
}

template <typename S, typename A>
__global__ void ranking_fwd_kernel(const S* __restrict__ x, const int64_t* __restrict__ nc, A* __restrict__ out,
                                   int64_t B, int64_t K, int64_t sB, int64_t sK) {
  const int64_t b = blockIdx.x * (int64_t)kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (b >= B) return;  // b is uniform over a warp: whole warps leave, warp_sum stays full
  const S* row = x + b * sB;
  const int64_t n = candidates(nc, b, K);
  double total = 0;
  for (int64_t i = lane; i < n; i += kWarp) {
    const A ri = to_acc<A>(row[i * sK]);
    for (int64_t j = i + 1; j < n; ++j) total -= log_sigmoid(ri - to_acc<A>(row[j * sK]));
  }
  total = warp_sum(total);
  if (lane == 0) out[b] = n >= 2 ? static_cast<A>(total / static_cast<double>(n * (n - 1) / 2)) : A(0);
}

template <typename S, typename A>
__global__ void ranking_bwd_kernel(const A* __restrict__ grad, const S* __restrict__ x,
                                   const int64_t* __restrict__ nc, S* __restrict__ out, int64_t B, int64_t K,
                                   int64_t sB, int64_t sK) {
  const int64_t b = blockIdx.x * (int64_t)kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (b >= B) return;
  const S* row = x + b * sB;
  const int64_t n = candidates(nc, b, K);
  const A scale = n >= 2 ? grad[b] / static_cast<A>(n * (n - 1) / 2) : A(0);
  for (int64_t i = lane; i < K; i += kWarp) {
    double g = 0;
    if (i < n) {
      const A ri = to_acc<A>(row[i * sK]);
      // j < i: d/dr_i -logsigmoid(r_j - r_i) = sigmoid(r_i - r_j); j > i: -sigmoid(r_j - r_i).
      for (int64_t j = 0; j < i; ++j) g += sigmoid(ri - to_acc<A>(row[j * sK]));
      for (int64_t j = i + 1; j < n; ++j) g -= sigmoid(to_acc<A>(row[j * sK]) - ri);
    }
    out[b * K + i] = from_acc<S>(scale * static_cast<A>(g));
  }
}

// Cap of the grid-stride launches: 8 blocks per SM on a 132-SM H100 covers B in one wave
// up to ~270k pairs; beyond that each thread takes several pairs.
constexpr int64_t kMaxBlocks = 1056;

unsigned int stride_grid(int64_t n) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, (n + kThreads - 1) / kThreads)));
}

}  // namespace

cudaError_t launch_bt_loss_fwd(DType dtype, const BTPairs& pairs, Reduction reduction, void* loss,
                               cudaStream_t stream) {
  if (reduction == codes::kReduceNone && pairs.B == 0) return cudaSuccess;
  const unsigned int grid = reduction == codes::kReduceNone ? stride_grid(pairs.B) : 1u;
  return dispatch_dtype(dtype, [&](auto* tp, auto* ap) {
    using S = std::remove_pointer_t<decltype(tp)>;
    using A = std::remove_pointer_t<decltype(ap)>;
    RMK_LAUNCH(grid, kThreads, 0, stream, bt_fwd_kernel<S, A>)(typed<S, A>(pairs), reduction, static_cast<A*>(loss));
  });
}

cudaError_t launch_bt_loss_bwd(DType dtype, const BTPairs& pairs, Reduction reduction, const void* grad,
                               void* grad_chosen, void* grad_rejected, cudaStream_t stream) {
  if (pairs.B == 0 || (grad_chosen == nullptr && grad_rejected == nullptr)) return cudaSuccess;
  const bool single = reduction == codes::kReduceMean && pairs.weights != nullptr;
  const unsigned int grid = single ? 1u : stride_grid(pairs.B);
  return dispatch_dtype(dtype, [&](auto* tp, auto* ap) {
    using S = std::remove_pointer_t<decltype(tp)>;
    using A = std::remove_pointer_t<decltype(ap)>;
    RMK_LAUNCH(grid, kThreads, 0, stream, bt_bwd_kernel<S, A>)(typed<S, A>(pairs), reduction, static_cast<const A*>(grad),
                                                       static_cast<S*>(grad_chosen), static_cast<S*>(grad_rejected));
  });
}

cudaError_t launch_ranking_loss_fwd(DType dtype, const void* rewards, const int64_t* num_candidates, int64_t B,
                                    int64_t K, int64_t sB, int64_t sK, void* row_loss, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  const unsigned int grid = ceil_div(B, kRowsPerBlock);
  return dispatch_dtype(dtype, [&](auto* tp, auto* ap) {
    using S = std::remove_pointer_t<decltype(tp)>;
    using A = std::remove_pointer_t<decltype(ap)>;
    RMK_LAUNCH(grid, kThreads, 0, stream, ranking_fwd_kernel<S, A>)(static_cast<const S*>(rewards), num_candidates,
                                                            static_cast<A*>(row_loss), B, K, sB, sK);
  });
}

cudaError_t launch_ranking_loss_bwd(DType dtype, const void* grad_rows, const void* rewards,
                                    const int64_t* num_candidates, int64_t B, int64_t K, int64_t sB, int64_t sK,
                                    void* grad_rewards, cudaStream_t stream) {
  if (B == 0 || K == 0) return cudaSuccess;
  const unsigned int grid = ceil_div(B, kRowsPerBlock);
  return dispatch_dtype(dtype, [&](auto* tp, auto* ap) {
    using S = std::remove_pointer_t<decltype(tp)>;
    using A = std::remove_pointer_t<decltype(ap)>;
    RMK_LAUNCH(grid, kThreads, 0, stream, ranking_bwd_kernel<S, A>)(static_cast<const A*>(grad_rows),
                                                            static_cast<const S*>(rewards), num_candidates,
                                                            static_cast<S*>(grad_rewards), B, K, sB, sK);
  });
}

}  // namespace cuda
}  // namespace rmkernels
