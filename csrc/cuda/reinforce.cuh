// Torch-free launcher of the REINFORCE-family advantages: REINFORCE++ (the masked discounted
// return, whitened over the valid tokens) and ReMax (the return minus a per-row baseline). See
// rmkernels/ops/group_adv.py and docs/ops.md section 5. Pointers are raw device pointers; sizes
// and strides are in elements; the launcher runs on `stream` and returns the launch's
// cudaError_t.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "ppo.cuh"
#include "rmkernels/cuda_common.cuh"

namespace rmkernels {
namespace cuda {

// rewards [B, T] (any float dtype, any strides) and mask bool [B, T] (any strides); outputs
// contiguous [B, T] in the arithmetic dtype (float32, float64 for float64 rewards).
// The return R_t = r_t + gamma * R_next over the valid positions from the right (R_next: the
// return of the next valid position, 0 after the last), carried unchanged over masked ones.
// * baselines null (REINFORCE++): returns = R at valid positions, 0 elsewhere; advantages =
//   the returns whitened over all valid positions of the batch (math::whiten_of with
//   `unbiased`, `eps`; shift_mean), 0 at masked positions and everywhere when there are <= 1
//   valid positions.
// * baselines [B] contiguous in the arithmetic dtype (ReMax): returns = R at every position
//   (the reverse cumulative sum of the masked rewards, verl's), advantages = returns -
//   baselines[b] at valid positions and returns elsewhere. `unbiased` and `eps` are unused.
// `workspace`: reinforce_workspace(B) float64, zeroed by the kernel itself. One cooperative
// launch (its grid what the current device holds at once), no host synchronisation;
// cudaErrorNotSupported on a device without cooperative launches.
inline int64_t reinforce_workspace(int64_t B) { return 3 * B + 3; }
cudaError_t launch_reinforce(DType dtype, Strided2D rewards, Strided2D mask, const void* baselines, int64_t B,
                             int64_t T, double gamma, bool unbiased, double eps, double* workspace, void* advantages,
                             void* returns, cudaStream_t stream);

}  // namespace cuda
}  // namespace rmkernels
