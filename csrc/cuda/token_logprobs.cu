// CUDA element-wise passes of the token log-probs / entropy (token_logprobs.cuh).
#include <type_traits>

#include "token_logprobs.cuh"

namespace rmkernels {
namespace cuda {
namespace {

// One block per row of the tile (a row is up to vocab_chunk = 8192 logits: 32 per thread).
template <typename A>
__global__ void lp_stats_kernel(const A* __restrict__ tile, int64_t rows, int64_t cols, const A* __restrict__ bias,
                                A inv_temp, const int64_t* __restrict__ targets, int64_t v0, bool first, A* m, A* s,
                                A* u, A* zt) {
  __shared__ A shared[kThreads / kWarp];
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    const A* row = tile + i * cols;
    A mx = -INFINITY;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const A z = (row[j] + (bias ? bias[j] : A(0))) * inv_temp;
      mx = z > mx ? z : mx;
    }
    mx = block_max(mx, shared, A(-INFINITY));
    const A m_old = m[i];
    const A m_new = first ? mx : (m_old > mx ? m_old : mx);
    // -inf logits (banned / padded vocabulary entries) add nothing: e = 0, e * d read as 0 where
    // e == 0 (d = -inf, 0 * -inf = NaN; a NaN e keeps its NaN). No finite logit yet (m_new = -inf):
    // shifted by 0 (-inf - -inf = NaN), s and u stay 0 and the next finite chunk starts them.
    const A shift = m_new == A(-INFINITY) ? A(0) : m_new;
    A se = 0, su = 0;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const A d = (row[j] + (bias ? bias[j] : A(0))) * inv_temp - shift;
      const A e = exp(d);
      se += e;
      su += e == A(0) ? A(0) : e * d;
    }
    se = block_sum(se, shared);
    su = block_sum(su, shared);
    if (threadIdx.x == 0) {
      if (first || s[i] == A(0)) {  // nothing to rescale (s == 0: only -inf logits so far)
        s[i] = se;
        u[i] = su;
      } else {
        const A dm = m_old - m_new;
        const A a = exp(dm);
        u[i] = a * (u[i] + dm * s[i]) + su;
        s[i] = a * s[i] + se;
      }
      m[i] = m_new;
      const int64_t t = targets[i] - v0;
      if (t >= 0 && t < cols) zt[i] = (row[t] + (bias ? bias[t] : A(0))) * inv_temp;
    }
    __syncthreads();
  }
}

template <typename A>
__global__ void lp_grad_kernel(A* __restrict__ tile, int64_t rows, int64_t cols, const A* __restrict__ bias,
                               A inv_temp, const int64_t* __restrict__ targets, int64_t v0, int64_t vocab,
                               int64_t ignore_index, const A* __restrict__ lse, const A* __restrict__ entropy,
                               const A* __restrict__ gl, const A* __restrict__ ge) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    A* p_out = tile + i * cols + j;
    const int64_t t = targets[i];
    if (t == ignore_index || t < 0 || t >= vocab) {
      *p_out = A(0);
      continue;
    }
    const A g_lp = gl[i], g_ent = ge ? ge[i] : A(0);
    const A lp = (*p_out + (bias ? bias[j] : A(0))) * inv_temp - lse[i];
    const A p = exp(lp);
    const A l = p == A(0) ? A(0) : lp;  // a -inf logit adds 0 (0 * -inf = NaN); NaN stays NaN
    A dz = -(p * (g_lp + g_ent * (l + entropy[i])));
    if (t - v0 == j) dz += g_lp;
    *p_out = dz * inv_temp;
  }
}

constexpr unsigned int kMaxGridY = 65535;

}  // namespace

cudaError_t launch_lp_stats(DType acc, const void* tile, int64_t rows, int64_t cols, const void* bias,
                            double inv_temp, const int64_t* targets, int64_t v0, bool first, void* m, void* s,
                            void* u, void* zt, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  const unsigned int grid = static_cast<unsigned int>(rows < (1LL << 30) ? rows : (1LL << 30));
  return dispatch_dtype(acc, [&](auto* /*storage*/, auto* acc_tag) {
    using A = std::remove_pointer_t<decltype(acc_tag)>;
    RMK_LAUNCH(grid, kThreads, 0, stream, lp_stats_kernel<A>)(
        static_cast<const A*>(tile), rows, cols, static_cast<const A*>(bias), static_cast<A>(inv_temp), targets, v0,
        first, static_cast<A*>(m), static_cast<A*>(s), static_cast<A*>(u), static_cast<A*>(zt));
  });
}

cudaError_t launch_lp_grad_logits(DType acc, void* tile, int64_t rows, int64_t cols, const void* bias,
                                  double inv_temp, const int64_t* targets, int64_t v0, int64_t vocab,
                                  int64_t ignore_index, const void* lse, const void* entropy, const void* gl,
                                  const void* ge, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  const dim3 grid(ceil_div(cols, kThreads), static_cast<unsigned int>(rows < kMaxGridY ? rows : kMaxGridY));
  return dispatch_dtype(acc, [&](auto* /*storage*/, auto* acc_tag) {
    using A = std::remove_pointer_t<decltype(acc_tag)>;
    RMK_LAUNCH(grid, kThreads, 0, stream, lp_grad_kernel<A>)(
        static_cast<A*>(tile), rows, cols, static_cast<const A*>(bias), static_cast<A>(inv_temp), targets, v0, vocab,
        ignore_index, static_cast<const A*>(lse), static_cast<const A*>(entropy), static_cast<const A*>(gl),
        static_cast<const A*>(ge));
  });
}

}  // namespace cuda
}  // namespace rmkernels
