// Torch-free launcher of the critic-free group advantages (SPEC section 5; REINFORCE++'s
// return is gae_kernel's, see rmkernels/ops/group_adv.py). Pointers are raw device pointers; sizes and strides are in elements; every
// launcher runs on `stream` and returns the launch's cudaError_t.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "rmkernels/cuda_common.cuh"

namespace rmkernels {
namespace cuda {

// seq[b] and adv[b, t] = mask[b, t] ? seq[b] : 0 (adv contiguous [B, T]) of the estimator
// (codes::GroupEstimator) over the groups of group_ids (int64 [B], ids in [0, B); an id out of
// range gives a NaN row); reinforce_pp_baseline whitened over the valid tokens (whiten_eps,
// unbiased: math::whiten_of; a NaN row with a valid token then spreads to every row with a valid
// token; rows without one add nothing to the statistics, whatever their value, and are 0). scores, seq and adv are float32, or float64 when `dtype` is
// kFloat64 (only those two). mask is bool [B, T] with strides (ms0, ms1). `stats` is a float64
// workspace of group_advantages_workspace(B) elements, of any contents (the kernel zeroes the
// slots it reads). One cooperative launch (its grid what the current device holds at once), no host
// synchronisation; cudaErrorNotSupported on a device without cooperative launches.
inline int64_t group_advantages_workspace(int64_t B) { return B * 6 + 4; }
cudaError_t launch_group_advantages(DType dtype, const void* scores, const int64_t* group_ids, const bool* mask,
                                    int64_t B, int64_t T, int64_t ms0, int64_t ms1, int64_t estimator, double eps,
                                    bool unbiased, int64_t single, double f_norm, double whiten_eps, double* stats,
                                    void* seq, void* adv, cudaStream_t stream);

}  // namespace cuda
}  // namespace rmkernels
