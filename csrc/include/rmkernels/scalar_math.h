// Scalar math shared by the C++ CPU and the CUDA kernels: one definition of every formula
// that both compute (the KL estimators, the clamps, log-sigmoid / sigmoid and the
// Bradley-Terry pair loss and its derivative). Plain C++ (no torch): included by .cpp and .cu
// files alike. Under nvcc the functions are __host__ __device__; for the host compiler they
// are inline functions, always inlined (RMK_ALWAYS_INLINE), which the CPU loops (`#pragma omp
// simd`, csrc/cpu/*_loops.h) vectorise: only branch-free selects here.
//
// The exp / log1p primitives differ by where the code runs, nothing else: in device code the
// CUDA math library (expf / log1pf, fast-math intrinsics under --use_fast_math); on the host
// the vectorisable float32 versions of cpu_vec_math.h (libm for float64). `A` is the
// arithmetic type: float, or double for float64 inputs.
#pragma once
#include <cmath>
#include <cstdint>

#include "rmkernels/codes.h"
#include "rmkernels/cpu_vec_math.h"

#if defined(__CUDACC__)
#define RMK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RMK_HOST_DEVICE RMK_ALWAYS_INLINE  // cpu_vec_math.h
#endif

namespace rmkernels {

// The arithmetic (accumulation) type of an input type T: double for double, float for float and
// the 16-bit types (c10::BFloat16 / c10::Half on the CPU, __nv_bfloat16 / __half on the GPU).
// The one definition of the rule in C++: the CPU loops and the CUDA kernels use acc_t, the torch
// side its dtype form acc_scalar_type (op_checks.h), Python rmkernels._library.acc_dtype.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

namespace math {

// exp(x) for any x (0 far below, inf far above, NaN for NaN).
RMK_HOST_DEVICE float exp_any(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return vecmath::exp_any(x);
#endif
}
RMK_HOST_DEVICE double exp_any(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

// exp(x) for x <= 0 (or NaN).
RMK_HOST_DEVICE float exp_nonpos(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return vecmath::exp_nonpos(x);
#endif
}
RMK_HOST_DEVICE double exp_nonpos(double x) { return exp_any(x); }

// log1p(z) for z in [0, 1] (or NaN).
RMK_HOST_DEVICE float log1p_unit(float z) {
#if defined(__CUDA_ARCH__)
  return log1pf(z);
#else
  return vecmath::log1p_unit(z);
#endif
}
RMK_HOST_DEVICE double log1p_unit(double z) {
#if defined(__CUDA_ARCH__)
  return ::log1p(z);
#else
  return std::log1p(z);
#endif
}

template <typename A> RMK_HOST_DEVICE A abs_(A x) { return x < A(0) ? -x : x; }
template <typename A> RMK_HOST_DEVICE A min0(A x) { return x < A(0) ? x : A(0); }

// x clamped to [-c, c] when c > 0 (a clamp of 0 means none). NaN stays NaN: every comparison
// with NaN is false.
template <typename A> RMK_HOST_DEVICE A clamp_sym(A x, A c) {
  return c > A(0) ? (x < -c ? -c : (x > c ? c : x)) : x;
}

// The per-token KL estimator kEst (codes::KLEstimator) of x = logprobs - ref_logprobs, with x
// clamped to +-x_clamp first and the result to +-kl_clamp (0 = no clamp).
template <int64_t kEst, typename A> RMK_HOST_DEVICE A kl_estimate(A x, A x_clamp, A kl_clamp) {
  x = clamp_sym(x, x_clamp);
  A k;
  if constexpr (kEst == codes::kK1) {
    k = x;
  } else if constexpr (kEst == codes::kAbs) {
    k = abs_(x);
  } else if constexpr (kEst == codes::kK2) {
    k = A(0.5) * x * x;
  } else {
    static_assert(kEst == codes::kK3, "unknown KL estimator code");
    k = exp_any(-x) - A(1) + x;
  }
  return clamp_sym(k, kl_clamp);
}

// The same with the estimator chosen at run time (a code checked by the caller).
template <typename A> RMK_HOST_DEVICE A kl_estimate(int64_t est, A x, A x_clamp, A kl_clamp) {
  switch (est) {
    case codes::kK1: return kl_estimate<codes::kK1>(x, x_clamp, kl_clamp);
    case codes::kAbs: return kl_estimate<codes::kAbs>(x, x_clamp, kl_clamp);
    case codes::kK2: return kl_estimate<codes::kK2>(x, x_clamp, kl_clamp);
    default: return kl_estimate<codes::kK3>(x, x_clamp, kl_clamp);
  }
}

// log1p(exp(-|x|)) = softplus(-|x|): the shared term of logsigmoid(x) and logsigmoid(-x).
template <typename A> RMK_HOST_DEVICE A softplus_neg_abs(A x) { return log1p_unit(exp_nonpos(-abs_(x))); }

// logsigmoid(x) = min(x, 0) - log1p(exp(-|x|)): no overflow for any x (finite at |x| = 1e30).
template <typename A> RMK_HOST_DEVICE A log_sigmoid(A x) { return min0(x) - softplus_neg_abs(x); }

// (sigmoid(x), sigmoid(-x)) from one exp of a non-positive number (no overflow).
template <typename A> struct SigmoidPair {
  A pos, neg;
};
template <typename A> RMK_HOST_DEVICE SigmoidPair<A> sigmoid_pair(A x) {
  const A z = exp_nonpos(-abs_(x));
  const A inv = A(1) / (A(1) + z);
  const A zinv = z * inv;
  return {x >= A(0) ? inv : zinv, x >= A(0) ? zinv : inv};
}
template <typename A> RMK_HOST_DEVICE A sigmoid(A x) { return sigmoid_pair(x).pos; }

// The Bradley-Terry loss of one pair without its centering term, from d = c - r - m and the
// label smoothing e: -(1 - e) logsigmoid(d) - e logsigmoid(-d), one exp and one log1p for
// both terms. The e term is skipped when e = 0, so that d = +inf gives the formula's 0, not
// 0 * -inf = NaN (likewise 1 - e > 0 always: 0 <= e < 0.5).
template <typename A> RMK_HOST_DEVICE A bt_pair_loss(A d, A e) {
  const A sp = softplus_neg_abs(d);
  const A pos = -(A(1) - e) * (min0(d) - sp);
  const A neg = e * (min0(-d) - sp);
  return e != A(0) ? pos - neg : pos;
}

// d/dd of bt_pair_loss: -(1 - e) sigmoid(-d) + e sigmoid(d).
template <typename A> RMK_HOST_DEVICE A bt_pair_dloss(A d, A e) {
  const SigmoidPair<A> s = sigmoid_pair(d);
  return -(A(1) - e) * s.neg + e * s.pos;
}

// Whitening over the valid positions of a batch (masked_whiten, and reinforce_pp_baseline's
// advantages): from the count n of valid positions, the sum s of their values and their sum of
// squares sq centred on whiten_mean(n, s), a value x becomes (x - mean) * rstd, with mean and
// rstd rounded to the arithmetic type first (+ mean again without shift_mean); every value is 0
// when !ok (n <= 1: never NaN). The CPU and CUDA kernels of ppo and group_adv use these; the
// Python reference (ops/ppo.py) and the Triton kernels write the same arithmetic.
struct Whiten {
  bool ok;
  double mean, rstd;
};
RMK_HOST_DEVICE double whiten_mean(double n, double s) { return n > 0 ? s / n : 0.0; }
RMK_HOST_DEVICE Whiten whiten_of(double n, double s, double sq, bool unbiased, double eps) {
  const bool ok = n > 1;
  const double var = ok ? sq / (unbiased ? n - 1 : n) : 0.0;
  return Whiten{ok, whiten_mean(n, s), 1.0 / sqrt(var + eps)};
}

}  // namespace math
}  // namespace rmkernels
