// CUDA kernel of the critic-free group advantages (torch-free; see group_adv.cuh for the
// contract).
//
// One cooperative launch per call: the grid is as large as the device holds at once
// (cooperative_grid), every loop is grid-stride, and the phases are separated by grid syncs:
//   (0) the workspace's slots that the launch reads are zeroed (so no memset before the
//       launch): the scalars, and the statistics of the groups that rows name when the ids come
//       in runs, else all [B, 5] (codes::kGroupZeroSample);
//   (1) one thread per response: a warp sums the count and scores of each run of equal ids
//       among its lanes, and the run's first lane adds them into the group's float64 slots
//       with atomics (opo: a warp per response, which also adds its length and length x score;
//       reinforce_pp_baseline: a warp per response, which stores its row's length), and
//       gpg counts nonzero scores (one atomic per warp);
//   (2) grpo only: the centred squares from the group means (summed over runs as in (1));
//       reinforce_pp_baseline only: the whitening statistics of the valid tokens from the
//       rows' values and lengths (two passes over B, a grid sync after each);
//   (3) the broadcast: (3a) one thread per row evaluates the formula of
//       rmkernels/group_adv_math.h (shared with the CPU kernel) for its row (whitened for
//       reinforce_pp_baseline, math::whiten_of) into seq; a grid sync; (3b) the [B, T] output,
//       its row's value from seq under the mask: 16 bytes per item (4 float32 / 2 float64, the
//       mask bytes as one word, four items in flight per thread) when the rows allow it, one
//       element per item otherwise.
// No launch waits on the host. Bytes moved: 16-24 B per response in (1)-(2), the mask once
// (twice for opo and reinforce_pp_baseline) and the [B, T] output once in (3). The workspace is
// written in the launch, so it is read with __ldcg (at L2, never through a multiprocessor's L1
// that may hold a line from before a grid sync) and never through a const __restrict__
// (read-only cache) pointer.
//
// (REINFORCE++'s return is gae_kernel with values 0 and lam 1: rmkernels/ops/group_adv.py.)
#include "group_adv.cuh"

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "rmkernels/codes.h"
#include "rmkernels/group_adv_math.h"
#include "rmkernels/scalar_math.h"

namespace rmkernels {
namespace cuda {
namespace {

constexpr int kStats = 5;  // n, s, sq, ls, lrs per group
// The workspace (group_adv.cuh: group_advantages_workspace(B) float64): the groups' stats
// [0, 5B), gpg's nonzero count at 5B, reinforce_pp_baseline's whitening count, sum and centred
// squares at 5B + 1..3, its row lengths from 5B + 4.
constexpr int64_t kNonzero = 0, kWhiten = 1, kRowLen = 4;  // offsets after the groups' stats

// Runs of equal keys in consecutive lanes (verl's layout puts a prompt's G responses side by
// side): v becomes, in each lane, the sum of v over its lane and the rest of its run, so the
// run's first lane holds the run's sum; returns whether this lane starts a run, and sets len to
// the run's length from this lane. Every lane of the warp must call it. One atomic per run then
// stands for G of them on one address.
__device__ __forceinline__ bool warp_run_sum(int64_t key, int lane, double& v, int& len) {
  const int64_t prev = __shfl_up_sync(0xffffffffu, key, 1);
  const bool head = lane == 0 || prev != key;
  const unsigned heads = __ballot_sync(0xffffffffu, head);
  const unsigned later = lane == kWarp - 1 ? 0u : heads & (~0u << (lane + 1));  // runs after this lane
  const int end = later != 0 ? __ffs(static_cast<int>(later)) - 1 : kWarp;                        // the next run's first lane
#pragma unroll
  for (int o = 1; o < kWarp; o <<= 1) {
    const double y = __shfl_down_sync(0xffffffffu, v, o);
    if (lane + o < end) v += y;  // lane + o in the same run: its sum so far covers the next lanes
  }
  len = end - lane;
  return head;
}

// Phase (3b)'s vector: one 16-byte store of 4 float32 or 2 float64 outputs, their mask bytes
// (bool: 0 or 1) read as one 4- or 2-byte word, byte j (little-endian) for element j.
template <typename A> struct Vec16;
template <> struct Vec16<float> {
  using V = float4;
  using Bits = uint32_t;
  static constexpr int kN = 4;
  static __device__ __forceinline__ V select(Bits m, float v) {
    return V{(m & 0xffu) ? v : 0.f, (m & 0xff00u) ? v : 0.f, (m & 0xff0000u) ? v : 0.f, (m & 0xff000000u) ? v : 0.f};
  }
};
template <> struct Vec16<double> {
  using V = double2;
  using Bits = uint16_t;
  static constexpr int kN = 2;
  static __device__ __forceinline__ V select(Bits m, double v) {
    return V{(m & 0xffu) ? v : 0.0, (m & 0xff00u) ? v : 0.0};
  }
};

// Whether (3b) can use Vec16 (host): rows of whole vectors (T a multiple of kN), the mask's rows
// contiguous and each starting on a kN-byte boundary, the output on a 16-byte one.
template <typename A> bool vec16_ok(const bool* mask, int64_t T, int64_t ms0, int64_t ms1, const A* adv) {
  constexpr int n = Vec16<A>::kN;
  return T > 0 && T % n == 0 && ms1 == 1 && ms0 % n == 0 &&
         reinterpret_cast<uintptr_t>(mask) % n == 0 && reinterpret_cast<uintptr_t>(adv) % 16 == 0;
}

// The value of row b from its group's statistics (NaN for an id outside [0, B)), rounded to A.
template <typename A>
__device__ __forceinline__ A row_value(const A* __restrict__ r, const int64_t* __restrict__ ids, const double* stats,
                                       int64_t b, int64_t B, int64_t est, double eps, bool unbiased, int64_t single,
                                       double f_norm, double alpha) {
  const int64_t g = ids[b];
  if (g < 0 || g >= B) return quiet_nan<A>();
  const double* st = stats + g * kStats;
  const group_adv::GroupStats gs{__ldcg(st), __ldcg(st + 1), __ldcg(st + 2), __ldcg(st + 3), __ldcg(st + 4)};
  const double sigma = est == codes::kGrpo ? group_adv::sigma_of(gs, unbiased) : 1.0;
  return static_cast<A>(group_adv::value(static_cast<double>(r[b]), gs, sigma, est, eps, single, f_norm, alpha));
}

// kLen (opo, reinforce_pp_baseline): phase (1) is a warp per response, which counts its row's
// valid tokens.
template <typename A, bool kLen>
__global__ void __launch_bounds__(kThreads)
    group_advantages_kernel(const A* __restrict__ r, const int64_t* __restrict__ ids, const bool* __restrict__ mask,
                            int64_t B, int64_t T, int64_t ms0, int64_t ms1, int64_t est, double eps, bool unbiased,
                            int64_t single, double f_norm, double whiten_eps, bool vec, double* stats, A* seq,
                            A* __restrict__ adv) {
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;  // a multiple of kWarp
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % kWarp;
  const bool rppb = est == codes::kReinforcePPBaseline;  // uniform over the grid, as est
  double* extra = stats + B * kStats;
  double* row_len = extra + kRowLen;

  // (0) the workspace: the scalars after the statistics, and the groups' statistics, by the rule
  // of codes::kGroupZeroSample (the same sample of ids, so the same choice, in every warp):
  //   - the first ids in runs (verl's layout): only the statistics of the groups that rows name,
  //     each run of equal ids among a warp's lanes storing its group's once. At 1M rows in
  //     groups of 8, 8 MB of ids read and 5 MB of zeros stored rather than 40 MB. A group in
  //     several runs has its zeros stored by each of them, at once: relaxed stores
  //     (store_relaxed), not a data race. A slot no row names is never read;
  //   - otherwise all [B, 5] slots (ids may be anything in [0, B)), coalesced.
  for (int64_t i = tid; i < kRowLen; i += nthreads) extra[i] = 0.0;
  {
    static_assert(codes::kGroupZeroSample == kWarp, "the sample is one warp's lanes");
    const int64_t s = lane < B ? ids[lane] : -1;
    const int64_t s_prev = __shfl_up_sync(0xffffffffu, s, 1);
    const unsigned sample_heads = __ballot_sync(0xffffffffu, lane < B && (lane == 0 || s_prev != s));
    if (__popc(sample_heads) <= codes::kGroupZeroMaxHeads) {
      for (int64_t base = tid - lane; base < B; base += nthreads) {  // uniform over the warp
        const int64_t b = base + lane;
        const int64_t g = b < B ? ids[b] : -1;
        const int64_t prev = __shfl_up_sync(0xffffffffu, g, 1);
        if ((lane == 0 || prev != g) && g >= 0 && g < B) {
#pragma unroll
          for (int k = 0; k < kStats; ++k) store_relaxed(stats + g * kStats + k, 0.0);
        }
      }
    } else {
      for (int64_t i = tid; i < B * kStats; i += nthreads) stats[i] = 0.0;
    }
  }
  RMK_GRID_SYNC();

  // (1) counts and sums per group
  if (kLen) {
    for (int64_t b = tid / kWarp; b < B; b += nthreads / kWarp) {  // uniform over the warp
      double len = 0;
      for (int64_t t = lane; t < T; t += kWarp) len += mask[b * ms0 + t * ms1] ? 1.0 : 0.0;
      len = warp_sum(len);
      const int64_t g = ids[b];
      if (lane == 0) {
        if (rppb) row_len[b] = len;
        if (g >= 0 && g < B) {
          const double x = static_cast<double>(r[b]);
          double* st = stats + g * kStats;
          atomicAdd(st, 1.0);
          atomicAdd(st + 1, x);
          if (!rppb) {  // opo
            atomicAdd(st + 3, len);
            atomicAdd(st + 4, len * x);
          }
        }
      }
    }
  } else {
    // The warp's base is uniform, so every lane runs the same trips and the ballot names all 32.
    for (int64_t base = tid - lane; base < B; base += nthreads) {
      const int64_t b = base + lane;
      const bool valid = b < B;
      const double x = valid ? static_cast<double>(r[b]) : 0.0;
      if (est == codes::kGpg) {
        const unsigned nz = __ballot_sync(0xffffffffu, valid && x != 0);  // NaN counts, as torch.count_nonzero
        if (lane == 0 && nz != 0) atomicAdd(extra + kNonzero, static_cast<double>(__popc(nz)));
      }
      const int64_t g = valid ? ids[b] : -1;
      double sum = x;
      int run = 1;
      // A run's lanes are all valid or all past B (g = -1), so the count is the run's length.
      if (warp_run_sum(g, lane, sum, run) && g >= 0 && g < B) {
        double* st = stats + g * kStats;
        atomicAdd(st, static_cast<double>(run));
        atomicAdd(st + 1, sum);
      }
    }
  }
  RMK_GRID_SYNC();

  // (2) grpo: centred squares from the complete means
  if (est == codes::kGrpo) {
    for (int64_t base = tid - lane; base < B; base += nthreads) {  // uniform over the warp
      const int64_t b = base + lane;
      const int64_t g = b < B ? ids[b] : -1;
      const bool ok = g >= 0 && g < B;
      double sq = 0.0;
      if (ok) {
        const double* st = stats + g * kStats;
        const double d = static_cast<double>(r[b]) - __ldcg(st + 1) / __ldcg(st);
        sq = d * d;
      }
      int run = 1;
      if (warp_run_sum(ok ? g : -1, lane, sq, run) && ok) atomicAdd(stats + g * kStats + 2, sq);
    }
    RMK_GRID_SYNC();  // est is uniform over the grid: every thread takes this sync or none does
  }
  const double alpha = static_cast<double>(B) / fmax(__ldcg(extra + kNonzero), 1.0);

  // (2w) reinforce_pp_baseline: the whitening statistics of the valid tokens. Row b holds
  // row_len[b] copies of its value (r - mu, rounded to A), so the batch's count, sum and centred
  // squares are per-row products (group_adv::row_copies, as the CPU kernel's whiten_seq: a row
  // without a valid token adds exactly 0, even with a NaN value), summed over each warp before
  // one atomic: two passes over B, no pass over [B, T].
  if (rppb) {
    double cnt = 0, sum = 0;
    for (int64_t base = tid - lane; base < B; base += nthreads) {  // uniform over the warp
      const int64_t b = base + lane;
      if (b < B) {
        const double l = __ldcg(row_len + b);
        cnt += l;
        sum += group_adv::row_copies(
            l, static_cast<double>(row_value(r, ids, stats, b, B, est, eps, unbiased, single, f_norm, alpha)));
      }
    }
    cnt = warp_sum(cnt);
    sum = warp_sum(sum);
    if (lane == 0) {
      atomicAdd(extra + kWhiten, cnt);
      atomicAdd(extra + kWhiten + 1, sum);
    }
    RMK_GRID_SYNC();
    const double mean = math::whiten_mean(__ldcg(extra + kWhiten), __ldcg(extra + kWhiten + 1));
    double sq = 0;
    for (int64_t b = tid; b < B; b += nthreads) {
      const double d =
          static_cast<double>(row_value(r, ids, stats, b, B, est, eps, unbiased, single, f_norm, alpha)) - mean;
      sq += group_adv::row_copies(__ldcg(row_len + b), d * d);
    }
    sq = warp_sum(sq);
    if (lane == 0) atomicAdd(extra + kWhiten + 2, sq);
    RMK_GRID_SYNC();
  }
  math::Whiten w{false, 0.0, 1.0};
  if (rppb) w = math::whiten_of(__ldcg(extra + kWhiten), __ldcg(extra + kWhiten + 1), __ldcg(extra + kWhiten + 2),
                                unbiased, whiten_eps);
  const A mean_a = static_cast<A>(w.mean), rstd = static_cast<A>(w.rstd);

  // (3a) one thread per row: the row's value (its group's statistics and the float64 formula of
  // rmkernels/group_adv_math.h, shared with the CPU kernel; reinforce_pp_baseline's whitening
  // after it), rounded to A, into seq.
  for (int64_t b = tid; b < B; b += nthreads) {
    A v = row_value(r, ids, stats, b, B, est, eps, unbiased, single, f_norm, alpha);
    if (rppb) v = w.ok && __ldcg(row_len + b) > 0 ? (v - mean_a) * rstd : A(0);
    seq[b] = v;
  }
  if (T == 0) return;  // T is uniform over the grid: no thread waits at the sync below
  RMK_GRID_SYNC();

  // (3b) the [B, T] output: each row's value from seq (written in this launch: __ldcg; the lanes
  // of a warp share a few rows, so a few L2 reads a warp), written under the mask. The formula
  // ran once per row in (3a), not once per element. The (b, t) of a thread's item advances by
  // the grid's stride with a carry (GridStride2D): one 64-bit division per thread, not one per
  // item.
  if (vec) {
    // Items of 16 bytes (Vec16: a 4- or 2-byte mask word in, one vector store out), kU of them
    // loaded before any is stored, so that a thread has kU mask loads in flight rather than
    // one: at grpo-l (132 SMs x 5 blocks of 256 threads) a thread has ~12 items.
    using W = Vec16<A>;
    constexpr int kU = 4;
    const int64_t nv = T / W::kN, mrow = ms0 / W::kN, items = B * nv;
    const auto* mb = reinterpret_cast<const typename W::Bits*>(mask);
    auto* out = reinterpret_cast<typename W::V*>(adv);
    GridStride2D p(tid, nthreads, nv);
    for (int64_t i = tid; i < items; i += kU * nthreads) {
      typename W::Bits m[kU];
      A v[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u, p.advance()) {
        if (i + u * nthreads < items) {
          m[u] = mb[p.row * mrow + p.col];
          v[u] = __ldcg(seq + p.row);
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        if (i + u * nthreads < items) out[i + u * nthreads] = W::select(m[u], v[u]);
      }
    }
  } else {  // one element per item (strided or unaligned masks, T not a multiple of kN)
    GridStride2D p(tid, nthreads, T);
    for (int64_t i = tid; i < B * T; i += nthreads, p.advance()) {
      const int64_t b = p.row, t = p.col;
      adv[i] = mask[b * ms0 + t * ms1] ? __ldcg(seq + b) : A(0);
    }
  }
}

template <typename A, bool kLen>
cudaError_t launch(const A* r, const int64_t* ids, const bool* mask, int64_t B, int64_t T, int64_t ms0, int64_t ms1,
                   int64_t est, double eps, bool unbiased, int64_t single, double f_norm, double whiten_eps,
                   double* stats, A* seq, A* adv, cudaStream_t stream) {
  // As many blocks as the largest phase has work for, up to what the device holds at once.
  const int64_t work = std::max<int64_t>({B * kStats + kRowLen, kLen ? B * kWarp : B, B * (T > 0 ? T : 1)});
  unsigned int blocks = 0;
  cudaError_t err = cooperative_grid<group_advantages_kernel<A, kLen>, kThreads>(ceil_div(work, kThreads), &blocks);
  if (err != cudaSuccess) return err;
  const bool vec = vec16_ok(mask, T, ms0, ms1, adv);
  return RMK_LAUNCH_COOPERATIVE(blocks, kThreads, 0, stream, group_advantages_kernel<A, kLen>)(
      r, ids, mask, B, T, ms0, ms1, est, eps, unbiased, single, f_norm, whiten_eps, vec, stats, seq, adv);
}

}  // namespace

cudaError_t launch_group_advantages(DType dtype, const void* scores, const int64_t* group_ids, const bool* mask,
                                    int64_t B, int64_t T, int64_t ms0, int64_t ms1, int64_t estimator, double eps,
                                    bool unbiased, int64_t single, double f_norm, double whiten_eps, double* stats,
                                    void* seq, void* adv, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (dtype != DType::kFloat32 && dtype != DType::kFloat64) return cudaErrorInvalidValue;
  auto run = [&](auto* a) {
    using A = std::remove_pointer_t<decltype(a)>;
    const A* r = static_cast<const A*>(scores);
    auto go = [&](auto len) {
      return launch<A, decltype(len)::value>(r, group_ids, mask, B, T, ms0, ms1, estimator, eps, unbiased, single,
                                             f_norm, whiten_eps, stats, static_cast<A*>(seq), static_cast<A*>(adv),
                                             stream);
    };
    const bool lengths = estimator == codes::kOpo || estimator == codes::kReinforcePPBaseline;
    return lengths ? go(std::true_type{}) : go(std::false_type{});
  };
  const cudaError_t err = dtype == DType::kFloat64 ? run(static_cast<double*>(nullptr)) : run(static_cast<float*>(nullptr));
  const cudaError_t last = cudaGetLastError();  // consumed either way: a failed launch's error is not the next call's
  return err != cudaSuccess ? err : last;
}

}  // namespace cuda
}  // namespace rmkernels
