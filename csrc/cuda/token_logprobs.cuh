// Torch-free launchers of the element-wise passes of the token log-probs / entropy (SPEC
// section 6). The GEMMs are cuBLAS's, called by the binding (token_logprobs_binding.cpp) through
// the chunk driver rmkernels/token_logprobs_chunks.h, whose StatsArgs / GradArgs these mirror.
// Pointers are raw device pointers of the arithmetic dtype `acc` (kFloat32, or kFloat64 for
// float64 inputs), targets int64; every launcher runs on `stream` and returns the launch's
// cudaError_t.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "rmkernels/cuda_common.cuh"

namespace rmkernels {
namespace cuda {

// tile [rows, cols] raw logits (row stride cols), bias [cols] or null; z = (tile + bias) *
// inv_temp. Merges each row's max, sum exp(z - m) and sum exp(z - m) (z - m) into m / s / u
// (first: initialise them) and writes zt[i] = z[targets[i] - v0] when that is in [0, cols).
// -inf logits add nothing to s and u; a row with no finite logit yet keeps m = -inf, s = u = 0.
cudaError_t launch_lp_stats(DType acc, const void* tile, int64_t rows, int64_t cols, const void* bias,
                            double inv_temp, const int64_t* targets, int64_t v0, bool first, void* m, void* s,
                            void* u, void* zt, cudaStream_t stream);

// In place: tile (raw logits) -> dz / temperature, dz_v = gl (1[v = t] - p_v) - ge p_v (log p_v +
// entropy), log p_v = z_v - lse; 0 on rows whose target is ignore_index or outside [0, vocab).
// p_v log p_v is 0 where p_v = 0 (a -inf logit).
// ge may be null.
cudaError_t launch_lp_grad_logits(DType acc, void* tile, int64_t rows, int64_t cols, const void* bias,
                                  double inv_temp, const int64_t* targets, int64_t v0, int64_t vocab,
                                  int64_t ignore_index, const void* lse, const void* entropy, const void* gl,
                                  const void* ge, cudaStream_t stream);

}  // namespace cuda
}  // namespace rmkernels
