// Torch-free launchers of the PPO rewards / GAE / KL / whitening kernels (docs/ops.md sections 3, 4).
// Pointers are raw device pointers; sizes and strides are in elements; every launcher runs
// on `stream`, never synchronises with the host (CUDA-graph capturable) and returns the
// launch's cudaError_t.
//
// Inputs [B, T] have any strides (s0 = row stride, s1 = position stride); the mask is bool.
// Outputs [B, T] are contiguous, in the arithmetic dtype: float32, or float64 when the
// input dtype is kFloat64 (`scores` is in that dtype too). Statistics are float64.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "rmkernels/cuda_common.cuh"

namespace rmkernels {
namespace cuda {

struct Strided2D {
  const void* ptr;
  int64_t s0, s1;
};

struct PPOGaeParams {
  double kl_coef, gamma, lam;
  int estimator;  // a codes::KLEstimator (rmkernels/_codes.py)
  double x_clamp, kl_clamp, score_clip;  // clamps to [-c, c]; 0 = none
};

// Long rows in a batch too small to fill the GPU (codes::num_gae_segments): split each row into n_seg segments of
// seg_len positions, one block each. Three launches: each segment's aggregate (what it does
// to the carried state, affine in the carries from its right), one thread per row composing
// them into each segment's carries, each segment with its carries. n_seg = 1: one launch,
// one block per row, and the scratch pointers may be null. Scratch (device, caller-owned):
//   agg [B, n_seg, 4] and carry [B, n_seg, 2] in the arithmetic dtype, seg_last [B, n_seg]
//   and last [B] int64.
struct PPOSegments {
  int64_t n_seg, seg_len;
  void* agg;
  int64_t* seg_last;
  void* carry;
  int64_t* last;
};

// kl, rewards (score at the row's last valid position), GAE advantages over the valid
// positions (a block-wide reverse scan of the recurrence, walking the row from the right
// in chunks), returns = A + V, and stats[b, seg] = (count, sum of A) of each row's
// segment ([B, n_seg, 2] float64; sum over seg for the whitening). Everything is 0 at
// masked positions and in rows with no valid token.
cudaError_t launch_ppo_gae(DType dtype, Strided2D logprobs, Strided2D ref_logprobs, Strided2D values,
                           const void* scores, Strided2D mask, int64_t B, int64_t T, PPOGaeParams p,
                           void* advantages, void* returns, void* rewards, void* kl, double* stats,
                           PPOSegments segments, cudaStream_t stream);

// gae_kernel: the GAE recurrence of launch_ppo_gae over given token rewards (any strides, the
// dtype of values), advantages and returns only (no score, no KL, no statistics); `returns`
// may be null: the advantages alone are written.
cudaError_t launch_gae(DType dtype, Strided2D rewards, Strided2D values, Strided2D mask, int64_t B, int64_t T,
                       double gamma, double lam, void* advantages, void* returns, PPOSegments segments,
                       cudaStream_t stream);

// kl[b, t] (contiguous [B, T], arithmetic dtype) = the KL estimate `estimator` of
// x = logprobs - ref_logprobs (x clamped to +-x_clamp, the result to +-kl_clamp; 0 = none),
// 0 where the mask (bool, strides mask_s0 / mask_s1; null: every position valid) is 0.
cudaError_t launch_kl_estimate(DType dtype, Strided2D logprobs, Strided2D ref_logprobs, const bool* mask,
                               int64_t mask_s0, int64_t mask_s1, int64_t B, int64_t T, int estimator, double x_clamp,
                               double kl_clamp, void* kl, cudaStream_t stream);

// stats[b] = (number of valid positions of row b, sum of x over them).
cudaError_t launch_masked_row_stats(DType dtype, Strided2D x, Strided2D mask, int64_t B, int64_t T, double* stats,
                                    cudaStream_t stream);

// out[b] = sum over the valid positions of row b of (x - mean)^2, mean = totals[1] /
// totals[0] (0 when totals[0] is 0). totals: device float64 [2].
cudaError_t launch_masked_centered_sq(DType dtype, Strided2D x, Strided2D mask, int64_t B, int64_t T,
                                      const double* totals, double* out, cudaStream_t stream);

// out = (x - mean) * rsqrt(var + eps) (+ mean if !shift_mean) at valid positions, 0
// elsewhere; var = sq[0] / (n - 1 if unbiased else n) with n = totals[0]; all zeros when
// n <= 1. The statistics are read on the device.
cudaError_t launch_masked_whiten_apply(DType dtype, Strided2D x, Strided2D mask, int64_t B, int64_t T,
                                       const double* totals, const double* sq, bool shift_mean, bool unbiased,
                                       double eps, void* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace rmkernels
