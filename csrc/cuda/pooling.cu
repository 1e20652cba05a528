// CUDA kernels of the last-token pooling (torch-free; see pooling.cuh for the contract).
//
// Bytes moved: the forward reads B*H hidden elements (one row per sequence, never B*T*H),
// K*H weights and B int64 indices, and writes B*K floats. The backward writes the B picked
// rows of grad_hidden (the zero fill is the caller's) and reads them once for grad_weight.
#include "pooling.cuh"

#include <algorithm>
#include <type_traits>

namespace rmkernels {
namespace cuda {
namespace {

template <typename I>
__global__ void last_token_index_kernel(const I* __restrict__ mask, int64_t T, int64_t s0, int64_t s1,
                                        int64_t* __restrict__ index) {
  __shared__ int64_t shared[kThreads / kWarp];
  const int64_t b = blockIdx.x;
  const I* row = mask + b * s0;
  int64_t best = -1;
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
    if (row[t * s1] != I(0)) best = t;  // t grows per thread, so the last hit is its max
  }
  best = block_max<int64_t>(best, shared, -1);
  if (threadIdx.x == 0) index[b] = best;
}

// One block per (b, k) pair, b-major (blocks of one row share its hidden row in L2), in a
// block-uniform grid-stride loop: a 1-D grid, so K is not bound by gridDim.y <= 65535 (a
// last-token LM head has K = vocabulary size).
template <typename T, typename A>
__global__ void reward_fwd_kernel(const T* __restrict__ hidden, const A* __restrict__ weight,
                                  const A* __restrict__ bias, const int64_t* __restrict__ index,
                                  A* __restrict__ rewards, int64_t B, int64_t Tlen, int64_t H, int64_t K,
                                  int64_t sB, int64_t sT) {
  __shared__ A shared[kThreads / kWarp];
  for (int64_t bk = blockIdx.x; bk < B * K; bk += gridDim.x) {
    const int64_t b = bk / K, k = bk % K;
    const int64_t t = index[b];
    if (t < 0 || t >= Tlen) {  // no valid token: NaN, and no read (uniform over the block)
      if (threadIdx.x == 0) rewards[bk] = quiet_nan<A>();
      continue;
    }
    const T* row = hidden + b * sB + t * sT;
    const A* w = weight + k * H;
    A acc = 0;
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) acc += to_acc<A>(row[h]) * w[h];
    acc = block_sum(acc, shared);  // starts with a barrier: shared is free to reuse
    if (threadIdx.x == 0) rewards[bk] = acc + (bias ? bias[k] : A(0));
  }
}

template <typename T, typename A>
__global__ void reward_bwd_hidden_kernel(const A* __restrict__ grad, const A* __restrict__ weight,
                                         const int64_t* __restrict__ index, T* __restrict__ grad_hidden,
                                         int64_t Tlen, int64_t H, int64_t K, int64_t gsB, int64_t gsT) {
  const int64_t b = blockIdx.x;
  const int64_t t = index[b];
  if (t < 0 || t >= Tlen) return;
  T* out = grad_hidden + b * gsB + t * gsT;
  for (int64_t h = blockIdx.y * (int64_t)blockDim.x + threadIdx.x; h < H; h += (int64_t)gridDim.y * blockDim.x) {
    A s = 0;
    for (int64_t k = 0; k < K; ++k) s += grad[b * K + k] * weight[k * H + h];
    out[h] = from_acc<T>(s);
  }
}

template <typename T, typename A>
__global__ void reward_bwd_params_kernel(const A* __restrict__ grad, const T* __restrict__ hidden,
                                         const int64_t* __restrict__ index, A* __restrict__ grad_weight,
                                         A* __restrict__ grad_bias, int64_t B, int64_t Tlen, int64_t H,
                                         int64_t K, int64_t sB, int64_t sT) {
  const int64_t h = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (grad_weight != nullptr && h < H) {
    for (int64_t k = 0; k < K; ++k) {
      A s = 0;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t t = index[b];
        if (t < 0 || t >= Tlen) continue;
        s += grad[b * K + k] * to_acc<A>(hidden[b * sB + t * sT + h]);
      }
      grad_weight[k * H + h] = s;
    }
  }
  if (grad_bias != nullptr && blockIdx.x == 0) {
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      A s = 0;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t t = index[b];
        if (t >= 0 && t < Tlen) s += grad[b * K + k];
      }
      grad_bias[k] = s;
    }
  }
}

// Blocks along H in the grad_hidden kernel: enough to cover H = 8192 with 256 threads in one
// pass while keeping B * this many blocks small for the usual B.
constexpr unsigned int kHiddenBlocksY = 4;

// Cap of the forward grid: beyond 2^20 (b, k) pairs (hundreds of waves on any GPU) blocks
// loop; the 1-D grid limit is 2^31 - 1.
constexpr int64_t kMaxFwdBlocks = int64_t(1) << 20;

}  // namespace

cudaError_t launch_last_token_index(const void* mask, int mask_elem_bytes, int64_t B, int64_t T,
                                    int64_t s0, int64_t s1, int64_t* index, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned int>(B));
  switch (mask_elem_bytes) {
    case 1: RMK_LAUNCH(grid, kThreads, 0, stream, last_token_index_kernel<uint8_t>)(static_cast<const uint8_t*>(mask), T, s0, s1, index); break;
    case 2: RMK_LAUNCH(grid, kThreads, 0, stream, last_token_index_kernel<uint16_t>)(static_cast<const uint16_t*>(mask), T, s0, s1, index); break;
    case 4: RMK_LAUNCH(grid, kThreads, 0, stream, last_token_index_kernel<uint32_t>)(static_cast<const uint32_t*>(mask), T, s0, s1, index); break;
    case 8: RMK_LAUNCH(grid, kThreads, 0, stream, last_token_index_kernel<uint64_t>)(static_cast<const uint64_t*>(mask), T, s0, s1, index); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_last_token_reward_fwd(DType dtype, const void* hidden, const void* weight, const void* bias,
                                         const int64_t* index, void* rewards, int64_t B, int64_t T, int64_t H,
                                         int64_t K, int64_t sB, int64_t sT, cudaStream_t stream) {
  if (B == 0 || K == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned int>(std::min<int64_t>(B * K, kMaxFwdBlocks)));
  return dispatch_dtype(dtype, [&](auto* tp, auto* ap) {
    using S = std::remove_pointer_t<decltype(tp)>;
    using A = std::remove_pointer_t<decltype(ap)>;
    RMK_LAUNCH(grid, kThreads, 0, stream, reward_fwd_kernel<S, A>)(
        static_cast<const S*>(hidden), static_cast<const A*>(weight), static_cast<const A*>(bias), index,
        static_cast<A*>(rewards), B, T, H, K, sB, sT);
  });
}

cudaError_t launch_last_token_reward_bwd_hidden(DType dtype, const void* grad, const void* weight,
                                                const int64_t* index, void* grad_hidden, int64_t B, int64_t T,
                                                int64_t H, int64_t K, int64_t gsB, int64_t gsT, cudaStream_t stream) {
  if (B == 0 || H == 0) return cudaSuccess;
  const unsigned int gy = std::min<unsigned int>(kHiddenBlocksY, ceil_div(H, kThreads));
  const dim3 grid(static_cast<unsigned int>(B), gy);
  return dispatch_dtype(dtype, [&](auto* tp, auto* ap) {
    using S = std::remove_pointer_t<decltype(tp)>;
    using A = std::remove_pointer_t<decltype(ap)>;
    RMK_LAUNCH(grid, kThreads, 0, stream, reward_bwd_hidden_kernel<S, A>)(
        static_cast<const A*>(grad), static_cast<const A*>(weight), index, static_cast<S*>(grad_hidden), T, H, K,
        gsB, gsT);
  });
}

cudaError_t launch_last_token_reward_bwd_params(DType dtype, const void* grad, const void* hidden,
                                                const int64_t* index, void* grad_weight, void* grad_bias, int64_t B,
                                                int64_t T, int64_t H, int64_t K, int64_t sB, int64_t sT,
                                                cudaStream_t stream) {
  if (grad_weight == nullptr && grad_bias == nullptr) return cudaSuccess;
  const dim3 grid(std::max(1u, ceil_div(H, kThreads)));
  return dispatch_dtype(dtype, [&](auto* tp, auto* ap) {
    using S = std::remove_pointer_t<decltype(tp)>;
    using A = std::remove_pointer_t<decltype(ap)>;
    RMK_LAUNCH(grid, kThreads, 0, stream, reward_bwd_params_kernel<S, A>)(
        static_cast<const A*>(grad), static_cast<const S*>(hidden), index, static_cast<A*>(grad_weight),
        static_cast<A*>(grad_bias), B, T, H, K, sB, sT);
  });
}

}  // namespace cuda
}  // namespace rmkernels
