// Torch-free launchers of the Bradley-Terry and K-wise ranking loss kernels (docs/ops.md section 2).
// Pointers are raw device pointers; sizes and strides are in elements; every launcher runs
// on `stream` and returns the launch's cudaError_t.
//
// Storage dtypes: chosen / rejected / rewards / grad_chosen / grad_rejected / grad_rewards
// have `dtype`; margin / weights / loss / grad / row losses are its arithmetic type (float32,
// float64 for kFloat64). num_candidates is int64.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "rmkernels/codes.h"
#include "rmkernels/cuda_common.cuh"

namespace rmkernels {
namespace cuda {

// Reduction codes: codes::Reduction (rmkernels/_codes.py).
using codes::Reduction;

// The B pairs of a Bradley-Terry loss and its options. margin / weights may be null: then
// margin_value / weight_value hold for every pair.
struct BTPairs {
  const void* chosen;
  const void* rejected;
  int64_t stride_chosen, stride_rejected;
  const void* margin;
  const void* weights;
  double margin_value, weight_value, label_smoothing, center_coef;
  int64_t B;
};

// loss = w_i * l_i per pair ([B], kReduceNone) or its sum / weighted mean (one float, from a single
// block walking B in a fixed order: deterministic). One launch.
cudaError_t launch_bt_loss_fwd(DType dtype, const BTPairs& pairs, Reduction reduction, void* loss,
                               cudaStream_t stream);

// grad_chosen / grad_rejected (either may be null) from `grad` ([B] for kReduceNone, else one
// float). One launch; a weighted kReduceMean runs in a single block, which sums the weights first.
cudaError_t launch_bt_loss_bwd(DType dtype, const BTPairs& pairs, Reduction reduction, const void* grad,
                               void* grad_chosen, void* grad_rejected, cudaStream_t stream);

// row_loss[b] = mean over i < j < n_b of -logsigmoid(r[b, i] - r[b, j]), 0 when n_b < 2, with
// n_b = clamp(num_candidates[b], 0, K) (K when num_candidates is null). One warp per row.
cudaError_t launch_ranking_loss_fwd(DType dtype, const void* rewards, const int64_t* num_candidates, int64_t B,
                                    int64_t K, int64_t sB, int64_t sK, void* row_loss, cudaStream_t stream);

// grad_rewards [B, K] (contiguous) from grad_rows [B]; zero at columns >= n_b.
cudaError_t launch_ranking_loss_bwd(DType dtype, const void* grad_rows, const void* rewards,
                                    const int64_t* num_candidates, int64_t B, int64_t K, int64_t sB, int64_t sK,
                                    void* grad_rewards, cudaStream_t stream);

}  // namespace cuda
}  // namespace rmkernels
