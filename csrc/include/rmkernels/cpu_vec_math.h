// Branch-free float32 exp / log1p for the C++ CPU kernels' element loops.
//
// glibc's expf / log1pf are scalar calls: a loop that calls them runs one element at a time
// (~10-30 ns per element for the Bradley-Terry loss). These are straight-line float
// arithmetic (selects, one float -> int conversion, one shift), so GCC and Clang vectorise a
// `#pragma omp simd` loop that uses them, at the vector width the function is compiled for
// (simd_variants.h and cpu_simd.h: AVX-512 / AVX2 / baseline). float64 keeps the libm
// functions (the fp64 path exists for gradcheck, where the last ulp matters more than speed).
//
// Accuracy (float32, measured against the fp64 functions over 2e7 points each): exp_nonpos /
// exp_any within 1 ulp of exp on [-87, 88] (2.4 ulp above 88); log1p_unit within 3 ulp of
// log1p on [0, 1], relative precision kept for tiny arguments. All propagate NaN.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

// Forced inline (also scalar_math.h's host functions): a call left out of line in a
// `#pragma omp simd` loop runs the loop one element at a time. GCC 12 at -O3 left exp_core out of
// line in lp_stats_row (token_logprobs_loops.h, two such loops in one function: the token
// log-probs forward at lp-s with H = 8 took 479 ms, 78 ms inlined) and kl_estimate<k3> in one
// float16 kl_row. tests/test_build.py checks that no float one is left out of line in _C.
#if defined(__GNUC__) || defined(__clang__)
#define RMK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define RMK_ALWAYS_INLINE inline
#endif

namespace rmkernels {
namespace vecmath {

RMK_ALWAYS_INLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

// exp(x) for x in [-87, 88] (or NaN): x = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite: ln2
// split into an exact high part and a low part), exp(r) by the Cephes expf polynomial, 2^n
// (n in [-126, 127]) built in the exponent bits.
RMK_ALWAYS_INLINE float exp_core(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kRound = 12582912.0f;  // 1.5 * 2^23: x + kRound - kRound rounds x to an integer
  const float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const float n = (x * kLog2e + kRound) - kRound;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  return y * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
}

// exp(x) for x <= 0 (or NaN). Below -87 (where expf goes subnormal) it returns 0.
RMK_ALWAYS_INLINE float exp_nonpos(float x) {
  return x < -87.0f ? 0.0f : exp_core(x < -87.0f ? -87.0f : x);  // NaN compares false: NaN
}

// x clamped at -87, below which exp_nonpos(x) is 0: exp_nonpos(x) * exp_nonpos_arg(x) is
// exp_nonpos(x) * x, but 0 at x = -inf (0 * -inf would be NaN), and NaN for NaN (a -inf logit's
// p log p, csrc/cpu/token_logprobs_loops.h). A compare and a blend in a vectorised loop.
RMK_ALWAYS_INLINE float exp_nonpos_arg(float x) { return x < -87.0f ? -87.0f : x; }

// e = exp_nonpos(x) and xe = x * e, 0 where e is 0 (at x = -inf: not 0 * -inf = NaN), NaN for
// NaN. One compare for both (AVX-512: zero-masked products); in a vectorised loop a little
// cheaper than exp_nonpos(x) * exp_nonpos_arg(x) (scratch, in L2: ~2% with AVX-512, ~10% baseline).
RMK_ALWAYS_INLINE void exp_nonpos_xexp(float x, float& e, float& xe) {
  const bool under = x < -87.0f;  // NaN compares false: NaN
  const float y = exp_core(under ? -87.0f : x);
  e = under ? 0.0f : y;
  xe = under ? 0.0f : y * x;
}

// exp(x) for any x: 0 below -87, exp(x / 2)^2 above 88 (inf past FLT_MAX), NaN for NaN.
RMK_ALWAYS_INLINE float exp_any(float x) {
  const float h = exp_core(0.5f * (x > 89.0f ? 89.0f : x));
  const float y = x > 88.0f ? h * h : exp_core(x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x));
  return x < -87.0f ? 0.0f : y;
}

// log1p(z) for z in [0, 1] (or NaN): 2 atanh(s) with s = z / (2 + z) in [0, 1/3], by its
// odd series to s^15 (the next term is below 2^-26 relative), so tiny z keep full precision.
RMK_ALWAYS_INLINE float log1p_unit(float z) {
  const float s = z / (2.0f + z);
  const float s2 = s * s;
  float p = 1.0f / 15.0f;
  p = p * s2 + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

inline double exp_nonpos(double x) { return std::exp(x); }
inline double exp_nonpos_arg(double x) { return x < -746.0 ? -746.0 : x; }  // std::exp is 0 below -746
inline void exp_nonpos_xexp(double x, double& e, double& xe) {
  e = std::exp(x);
  xe = e == 0.0 ? 0.0 : e * x;
}
inline double exp_any(double x) { return std::exp(x); }
inline double log1p_unit(double z) { return std::log1p(z); }

}  // namespace vecmath
}  // namespace rmkernels
