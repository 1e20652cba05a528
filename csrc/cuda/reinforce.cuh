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
// One cooperative launch (its grid what the current device holds at once), no host
// synchronisation; cudaErrorNotSupported on a device without cooperative launches.
//
// A row is walked by one warp, or, when the batch has too few rows for the grid's warps, split
// into `segments` pieces of seg_len positions (a multiple of the warp's 128-position chunk), one
// warp each: every piece first composes what it does to the carried return (its aggregate map),
// a grid sync, then each piece walks again from the carry the pieces to its right hand it
// (REINFORCE++ statistics are kept per piece). The policy (reinforce_plan): rows of at least
// 2 * segment_t positions are split into pieces of at least segment_t positions, as far as the
// grid's warps go around (B * segments <= warps); the binding passes kReinforceSegmentT, tests a
// smaller one.
constexpr int64_t kReinforceSegmentT = 1024;

struct ReinforcePlan {
  unsigned int blocks;       // of the cooperative grid
  int64_t segments, seg_len;  // pieces per row (1: a warp per row) and their length
};

// The plan of a [B, T] call on the current device (remax: baselines are given).
cudaError_t reinforce_plan(DType dtype, bool remax, int64_t B, int64_t T, int64_t segment_t, ReinforcePlan* plan);

// float64 elements of the call's workspace (caller-owned, zeroed by the kernel where it sums):
// REINFORCE++ the batch's 3 totals and (count, mean, M2) per piece; split rows 2 more per piece
// (its aggregate map); 0 for ReMax on unsplit rows (workspace may be null then).
inline int64_t reinforce_workspace(int64_t B, const ReinforcePlan& plan, bool remax) {
  const int64_t pieces = B * plan.segments;
  return (remax ? 0 : 3 + 3 * pieces) + (plan.segments > 1 ? 2 * pieces : 0);
}

cudaError_t launch_reinforce(DType dtype, Strided2D rewards, Strided2D mask, const void* baselines, int64_t B,
                             int64_t T, double gamma, bool unbiased, double eps, const ReinforcePlan& plan,
                             double* workspace, void* advantages, void* returns, cudaStream_t stream);

}  // namespace cuda
}  // namespace rmkernels
