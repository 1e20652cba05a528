// Option codes shared by the C++ CPU and CUDA kernels. The mirror of rmkernels/_codes.py,
// where every code is defined and documented; tests/test_codes.py fails when the two drift.
// Plain C++ (no torch, no CUDA): included by .cpp and .cu files alike.
#pragma once
#include <cstdint>

namespace rmkernels {
namespace codes {

enum Reduction : int64_t { kReduceNone = 0, kReduceMean = 1, kReduceSum = 2 };

enum KLEstimator : int64_t { kK1 = 0, kAbs = 1, kK2 = 2, kK3 = 3 };

enum GaeSegmentMode : int64_t { kRow = 0, kSegmentAggregate = 1, kSegmentFinal = 2 };

enum GroupEstimator : int64_t {
  kGrpo = 0,
  kDrGrpo = 1,
  kRloo = 2,
  kOpo = 3,
  kGpg = 4,
  kReinforcePPBaseline = 5,
};

enum GroupSingle : int64_t { kSingleZero = 0, kSingleSelf = 1 };

// Segment policy of the GPU GAE kernels (rmkernels/_codes.py: SEGMENT_T,
// SEGMENT_MIN_ROWS_PER_SM, num_gae_segments): rows of at least 2 * kSegmentT positions are split
// into segments of kSegmentT when the batch has fewer than kSegmentMinRowsPerSm rows per SM.
constexpr int64_t kSegmentT = 4096;
constexpr int64_t kSegmentMinRowsPerSm = 2;

// Workspace zeroing of the GPU group-advantage kernels (rmkernels/_codes.py: GROUP_ZERO_SAMPLE,
// GROUP_ZERO_MAX_HEADS). Every warp / program reads the first kGroupZeroSample ids: when they
// hold at most kGroupZeroMaxHeads runs of equal ids (runs of 4 or longer on average: a prompt's
// responses side by side), each run of the batch zeroes its own group's statistics; otherwise
// (ids in another order, as verl's balance_batch leaves them, where that would be a scattered
// store per row) the whole [B, 5] workspace is zeroed, coalesced. Either is correct whatever
// the rest of the ids hold: the sample only picks the cheaper.
constexpr int64_t kGroupZeroSample = 32;
constexpr int64_t kGroupZeroMaxHeads = 8;

// Programs (blocks) per row of the GAE kernels for a [B, T] batch on a GPU with `sms` SMs.
constexpr int64_t num_gae_segments(int64_t B, int64_t T, int64_t sms, int64_t segment_t = kSegmentT) {
  return (T < 2 * segment_t || B >= kSegmentMinRowsPerSm * sms) ? 1 : (T + segment_t - 1) / segment_t;
}

}  // namespace codes
}  // namespace rmkernels
