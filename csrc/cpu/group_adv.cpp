// C++ CPU kernel of the critic-free group advantages (docs/ops.md section 5).
//
//   group_advantages_kernel(scores, group_ids, mask, estimator, eps, unbiased, single, f_norm,
//                           whiten_eps) -> (seq_advantages [B], advantages [B, T])
//
// (REINFORCE++'s return is gae_kernel with values 0 and lam 1: rmkernels/ops/group_adv.py.)
//
// group_advantages: scores arrive as a contiguous [B] tensor in the arithmetic dtype (float32,
// float64 for double input: the Python layer sums token rewards), group_ids as contiguous int64
// [B] with ids in [0, B) (checked here: one vectorised min/max), mask as bool [B, T] with any
// strides. One workspace: 3 float64 arrays (4 for opo) over the ids up to the largest (not B):
//   1. sequential passes over the scores gather each group's float64 statistics (count and sum;
//      opo's sums of len and len r; grpo: the centred squares from the mean, a second pass),
//      one run of equal neighbouring ids at a time: a run's sums stay in registers and are
//      loaded and stored once (verl lists a prompt's responses together), in the same order
//      of additions as the reference's index_add_;
//   2. once per group: the coefficients of the formula (group_adv::coef_of, with the std),
//      in place of the statistics;
//   3. rows in parallel (at::parallel_for), vectorised (group_adv_loops.h): seq[b] =
//      group_adv::apply(r[b], the coefficients of its group), then the [B, T] broadcast,
//      written with streaming stores when the output is larger than kStreamBytes and resident
//      (a fresh one is advised for huge pages: OutputPages, rmkernels/cpu_common.h).
//   reinforce_pp_baseline: between 2 and 3, the rows' values (r - mu) whitened over the valid
//      tokens of the batch from the row lengths (whiten_seq: no pass over [B, T] but the
//      mask's count), then broadcast as they are.
// Passes 1-2 touch 8-40 bytes per response (~0.15 ms at B = 65536 on one core); the [B, T]
// write is the cost.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "rmkernels/codes.h"
#include "rmkernels/cpu_common.h"
#include "rmkernels/cpu_simd.h"
#include "rmkernels/group_adv_math.h"
#include "rmkernels/op_checks.h"
#include "rmkernels/scalar_math.h"

#if RMK_SIMD_MULTIVERSION
#include <immintrin.h>  // the streaming stores (AVX, AVX-512), behind target attributes
#endif

namespace rmkernels {
namespace {

// What the loops need to evaluate the rows' values: the scores, the group ids, the coefficients
// a, c, d of each group id (group_adv::apply), k (gpg's alpha, else 1), and where seq goes.
template <typename acc>
struct GroupRows {
  const acc* r;
  const int64_t* ids;
  const double *a, *c, *d;
  double k;
  acc* seq;
};

#define RMK_LOOPS_HEADER "group_adv_loops.h"
#include "simd_variants.h"  // id_range, count_nonzero, seq_values, broadcast_span, count_rows

const uint8_t* mask_bytes(const at::Tensor& mask) { return reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()); }

// Outputs above this size are written with non-temporal (streaming) stores on CPUs with AVX
// or AVX-512, when their memory is resident (recycled by the allocator): they do not fit the
// caches anyway, and a streaming store of a whole line skips the read of the line a normal
// store does first. A fresh mmapped output (glibc's blocks over 32 MiB, and smaller ones
// until its threshold has grown) is written with plain stores: each first store faults a page
// in, the kernel zeroes it through the cache, and plain stores then hit it (streaming ones
// measured 1.43x write-once there, plain ones 1.08x; in the huge pages OutputPages advises
// such an output for, plain stores still measured faster: grpo-l's full call 10.1-10.8 ms
// against 11.1-12.8 ms streamed, 2026-12-03). Rows are built in an L1 tile of
// kTileBytes by the vectorised loop (group_adv_loops.h), then streamed out with 32 or 64-byte
// stores (16-byte SSE2 streaming measured slower than plain stores: the baseline variant
// writes in place).
constexpr int64_t kStreamBytes = int64_t(8) << 20;
constexpr int64_t kTileBytes = int64_t(8) << 10;

#if RMK_SIMD_MULTIVERSION
// dst[0, n) = src[0, n), n a multiple of the vector, dst aligned to it.
__attribute__((target("avx512f"))) void stream_v4(const char* src, char* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 64) _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), _mm512_loadu_si512(src + i));
}
__attribute__((target("avx"))) void stream_v3(const char* src, char* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 32) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
  }
}
#endif

// The vector width of the streaming stores this process uses (0: none, plain stores).
int64_t stream_width() {
#if RMK_SIMD_MULTIVERSION
  return cpu_isa() == Isa::kV4 ? 64 : cpu_isa() == Isa::kV3 ? 32 : 0;
#else
  return 0;
#endif
}

// dst[0, n) = src[0, n) (bytes): streaming stores of `width` bytes where dst is aligned to
// them, plain copies at the unaligned ends. The caller fences (_mm_sfence) before the data
// is read elsewhere.
void stream_copy(const char* src, char* dst, int64_t n, int64_t width) {
  const int64_t head = std::min<int64_t>(n, (width - static_cast<int64_t>(reinterpret_cast<uintptr_t>(dst) % width)) % width);
  const int64_t body = (n - head) / width * width;
  std::memcpy(dst, src, head);
#if RMK_SIMD_MULTIVERSION
  (width == 64 ? stream_v4 : stream_v3)(src + head, dst + head, body);
#endif
  std::memcpy(dst + head + body, src + head + body, n - head - body);
}

// The [B, T] broadcast of rows [lo, hi) into adv (contiguous [B, T]): out[b, t] = mask[b, t] ?
// the row's value : 0, and seq[b]. stream: the streaming-store width (0: write in place).
template <typename acc>
void broadcast_rows(const GroupRows<acc>& v, const uint8_t* mask, int64_t sm0, int64_t sm1, int64_t T, int64_t lo,
                    int64_t hi, int64_t stream, bool seq_ready, acc* adv) {
  if (!seq_ready) RMK_SIMD(seq_values<acc>)(v, lo, hi);
  const auto span = sm1 == 1 ? RMK_SIMD(broadcast_span<true, acc>) : RMK_SIMD(broadcast_span<false, acc>);
  if (stream == 0) {
    span(v.seq, mask, sm0, sm1, T, lo * T, hi * T, adv + lo * T);
    return;
  }
  constexpr int64_t kTile = kTileBytes / sizeof(acc);
  alignas(64) acc tile[kTile];
  for (int64_t i = lo * T; i < hi * T; i += kTile) {
    const int64_t n = std::min(kTile, hi * T - i);
    span(v.seq, mask, sm0, sm1, T, i, i + n, tile);
    stream_copy(reinterpret_cast<const char*>(tile), reinterpret_cast<char*>(adv + i), n * int64_t(sizeof(acc)), stream);
  }
#if RMK_SIMD_MULTIVERSION
  _mm_sfence();  // the streamed lines are visible before parallel_for returns
#endif
}

// The float64 statistics of each group id, in one workspace: n (count), s (sum), x (grpo: the
// centred sum of squares; opo: the sum of lengths), y (opo: the sum of length x score); then
// the coefficients a, c, d of group_adv::apply replace n, s, x.
struct Stats {
  double *n, *s, *x, *y;
};

// Adds each response's count and score (opo: length and length x score) into its group's
// slots, one run of equal neighbouring ids at a time: a run's sums stay in registers.
template <typename acc, bool kOpo>
void add_stats(const acc* r, const int64_t* ids, const double* len, int64_t B, Stats st) {
  for (int64_t b = 0; b < B;) {
    const int64_t g = ids[b];
    double n = st.n[g], s = st.s[g], ls = kOpo ? st.x[g] : 0, lrs = kOpo ? st.y[g] : 0;
    do {
      const double x = static_cast<double>(r[b]);
      n += 1;
      s += x;
      if (kOpo) {
        ls += len[b];
        lrs += len[b] * x;
      }
    } while (++b < B && ids[b] == g);
    st.n[g] = n;
    st.s[g] = s;
    if (kOpo) {
      st.x[g] = ls;
      st.y[g] = lrs;
    }
  }
}

// grpo: the centred squares from each group's mean into x, one run at a time.
template <typename acc>
void add_centred_squares(const acc* r, const int64_t* ids, int64_t B, Stats st) {
  for (int64_t b = 0; b < B;) {
    const int64_t g = ids[b];
    const double mu = st.s[g] / st.n[g];
    double sq = st.x[g];
    do {
      const double d = static_cast<double>(r[b]) - mu;
      sq += d * d;
    } while (++b < B && ids[b] == g);
    st.x[g] = sq;
  }
}

// reinforce_pp_baseline: seq[b] (r - mu, rounded to acc) whitened over the valid tokens of the
// batch, in place. Row b holds len[b] valid copies of seq[b], so the batch's count, sum and
// centred squares are per-row products (float64; seq[b] is a float of at most 53 bits and
// len[b] an integer: len[b] * seq[b] is exact): no pass over [B, T]. Rows without a valid token
// add nothing to the statistics (group_adv::row_copies: not 0 * NaN for a NaN score there) and
// get 0, as all rows when the batch has at most one valid token (math::whiten_of).
template <typename acc>
void whiten_seq(acc* seq, const double* len, int64_t B, bool unbiased, double eps) {
  double n = 0, s = 0, sq = 0;
  for (int64_t b = 0; b < B; ++b) {
    n += len[b];
    s += group_adv::row_copies(len[b], static_cast<double>(seq[b]));
  }
  const double mean = math::whiten_mean(n, s);
  for (int64_t b = 0; b < B; ++b) {
    const double d = static_cast<double>(seq[b]) - mean;
    sq += group_adv::row_copies(len[b], d * d);
  }
  const math::Whiten w = math::whiten_of(n, s, sq, unbiased, eps);
  const acc mean_a = static_cast<acc>(w.mean), rstd = static_cast<acc>(w.rstd);
  for (int64_t b = 0; b < B; ++b) seq[b] = w.ok && len[b] > 0 ? (seq[b] - mean_a) * rstd : acc(0);
}

template <typename acc>
void group_impl(const acc* r, const int64_t* ids, const uint8_t* mask, int64_t sm0, int64_t sm1, int64_t B,
                int64_t T, int64_t est, double eps, bool unbiased, int64_t single, double f_norm, double whiten_eps,
                acc* seq, acc* adv) {
  const bool grpo = est == codes::kGrpo, opo = est == codes::kOpo, rppb = est == codes::kReinforcePPBaseline;
  int64_t lo = 0, hi = 0;
  RMK_SIMD(id_range)(ids, B, &lo, &hi);
  if (lo < 0 || hi >= B) {
    const int64_t b = std::find_if(ids, ids + B, [B](int64_t g) { return g < 0 || g >= B; }) - ids;
    TORCH_CHECK_VALUE(false, "group_ids must lie in [0, B) = [0, ", B, "), got ", ids[b], " at row ", b);
  }
  // One workspace: the statistics of the ids [0, hi] (n, s, x, y: 3 arrays, 4 for opo), then
  // the row lengths (opo, reinforce_pp_baseline).
  const int64_t G = hi + 1, arrays = opo ? 4 : 3;
  const bool lengths = opo || rppb;
  std::unique_ptr<double[]> ws(new double[arrays * G + (lengths ? B : 0)]);
  std::fill(ws.get(), ws.get() + arrays * G, 0.0);
  const Stats st{ws.get(), ws.get() + G, ws.get() + 2 * G, opo ? ws.get() + 3 * G : nullptr};
  double* len = lengths ? ws.get() + arrays * G : nullptr;
  if (lengths) {
    at::parallel_for(0, B, grain_of(T), [&](int64_t b0, int64_t b1) {
      if (sm1 == 1) {
        RMK_SIMD(count_rows<true>)(mask, sm0, sm1, T, b0, b1, len);
      } else {
        RMK_SIMD(count_rows<false>)(mask, sm0, sm1, T, b0, b1, len);
      }
    });
  }
  if (opo) {
    add_stats<acc, true>(r, ids, len, B, st);
  } else {
    add_stats<acc, false>(r, ids, nullptr, B, st);
  }
  if (grpo) add_centred_squares(r, ids, B, st);
  for (int64_t g = 0; g < G; ++g) {  // once per group (ids no row carries keep n = 0: skipped)
    if (!(st.n[g] > 0)) continue;
    const group_adv::GroupStats gs{st.n[g], st.s[g], grpo ? st.x[g] : 0, opo ? st.x[g] : 0, opo ? st.y[g] : 0};
    const double sigma = grpo ? group_adv::sigma_of(gs, unbiased) : 1.0;
    const group_adv::GroupCoef c = group_adv::coef_of(gs, sigma, est, eps, single, f_norm);
    st.n[g] = c.a;
    st.s[g] = c.c;
    st.x[g] = c.d;
  }
  const int64_t nonzero = est == codes::kGpg ? RMK_SIMD(count_nonzero<acc>)(r, B) : 0;
  const double k = est == codes::kGpg ? static_cast<double>(B) / static_cast<double>(std::max<int64_t>(nonzero, 1)) : 1.0;
  const GroupRows<acc> rows{r, ids, st.n, st.s, st.x, k, seq};
  if (T == 0 || rppb) {
    RMK_SIMD(seq_values<acc>)(rows, 0, B);
    if (rppb) whiten_seq(seq, len, B, unbiased, whiten_eps);
    if (T == 0) return;
  }
  const int64_t bytes = B * T * int64_t(sizeof(acc));
  const int64_t stream = bytes > kStreamBytes && resident(adv, bytes) ? stream_width() : 0;
  at::parallel_for(0, B, grain_of(T), [&](int64_t b0, int64_t b1) {
    broadcast_rows(rows, mask, sm0, sm1, T, b0, b1, stream, rppb, adv);
  });
}

std::tuple<at::Tensor, at::Tensor> group_advantages_cpu(const at::Tensor& scores, const at::Tensor& group_ids,
                                                        const at::Tensor& mask, int64_t estimator, double eps,
                                                        bool unbiased, int64_t single, double f_norm,
                                                        double whiten_eps) {
  check_group_advantages_args(scores, group_ids, mask, estimator, single, eps, f_norm, whiten_eps);
  const int64_t B = scores.size(0), T = mask.size(1);
  const auto s = scores.contiguous();
  const auto ids = group_ids.contiguous();
  OutputPages pages;  // the [B, T] output in huge pages while it is written (cpu_common.h)
  auto seq = at::empty({B}, s.options());
  auto adv = pages.empty({B, T}, s.options());
  if (B == 0) return {seq, adv};
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "group_advantages_cpu", [&] {
    group_impl<scalar_t>(s.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), mask_bytes(mask), mask.stride(0),
                         mask.stride(1), B, T, estimator, eps, unbiased, single, f_norm, whiten_eps,
                         seq.data_ptr<scalar_t>(), adv.data_ptr<scalar_t>());
  });
  return {seq, adv};
}

}  // namespace

TORCH_LIBRARY_IMPL(rmkernels, CPU, m) {
  m.impl("group_advantages_kernel", &group_advantages_cpu);
}

}  // namespace rmkernels
