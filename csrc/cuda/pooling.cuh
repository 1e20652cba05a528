// Torch-free launchers of the last-token pooling kernels (docs/ops.md section 1).
// Pointers are raw device pointers; sizes and strides are in elements; every launcher
// runs on `stream` and returns the launch's cudaError_t.
//
// hidden is addressed as hidden + b * sB + t * sT + h (unit stride on H). A packed [N, H]
// batch is passed with sB = 0 and T = N, index holding global rows.
// weight / bias / rewards / grad / grad_weight / grad_bias are float32 (float64 when the
// hidden dtype is kFloat64); grad_hidden has the hidden dtype.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "rmkernels/cuda_common.cuh"

namespace rmkernels {
namespace cuda {

// index[b] = rightmost t with mask[b, t] != 0, or -1. mask elements are integers (or bool)
// of mask_elem_bytes in {1, 2, 4, 8}.
cudaError_t launch_last_token_index(const void* mask, int mask_elem_bytes, int64_t B, int64_t T,
                                    int64_t s0, int64_t s1, int64_t* index, cudaStream_t stream);

// rewards[b, k] = sum_h hidden[b, index[b], h] * weight[k, h] + bias[k]; NaN where
// index[b] is outside [0, T). bias may be null.
cudaError_t launch_last_token_reward_fwd(DType dtype, const void* hidden, const void* weight,
                                         const void* bias, const int64_t* index, void* rewards,
                                         int64_t B, int64_t T, int64_t H, int64_t K, int64_t sB,
                                         int64_t sT, cudaStream_t stream);

// grad_hidden[b, index[b], :] = sum_k grad[b, k] * weight[k, :] for valid rows. The rest of
// grad_hidden must already be zero (the caller allocates it zeroed).
cudaError_t launch_last_token_reward_bwd_hidden(DType dtype, const void* grad, const void* weight,
                                                const int64_t* index, void* grad_hidden, int64_t B,
                                                int64_t T, int64_t H, int64_t K, int64_t gsB,
                                                int64_t gsT, cudaStream_t stream);

// grad_weight[k, h] = sum_b grad[b, k] * hidden[b, index[b], h] and grad_bias[k] =
// sum_b grad[b, k], over valid rows, in a fixed order (deterministic). Either output may be
// null.
cudaError_t launch_last_token_reward_bwd_params(DType dtype, const void* grad, const void* hidden,
                                                const int64_t* index, void* grad_weight,
                                                void* grad_bias, int64_t B, int64_t T, int64_t H,
                                                int64_t K, int64_t sB, int64_t sT,
                                                cudaStream_t stream);

}  // namespace cuda
}  // namespace rmkernels
