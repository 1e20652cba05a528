// Affine maps x -> a x + b of a carried state and their reverse scans over a warp: the
// recurrences of the GAE (ppo.cu) and REINFORCE / ReMax (reinforce.cu) kernels, walked from the
// right. Device-only helpers (torch-free).
#pragma once
#include "rmkernels/cuda_common.cuh"

namespace rmkernels {
namespace cuda {

template <typename A>
struct Affine {
  A a, b;  // x -> a * x + b
};

template <typename A>
__device__ __forceinline__ Affine<A> identity() {
  return {A(1), A(0)};
}

// a * x, except that x = 0 gives 0 * x whatever a is: a composed map's a is a product of
// discounts, which overflows to inf for gamma > 1 over long rows, and inf * 0 would be NaN where
// the sequential recurrence (a finite gamma times a state of 0, step by step) gives 0. For a
// finite a >= 0 it is a * x bit for bit, signed zeros included.
template <typename A>
__device__ __forceinline__ A scale(A a, A x) {
  return (x == A(0) ? A(0) : a) * x;
}

// l after r: x -> l(r(x)). r is the part to the right (applied first). Plain IEEE
// arithmetic, like the sequential recurrence (gamma * lam = 0 times a NaN A_next is NaN),
// but for the zero state of scale().
template <typename A>
__device__ __forceinline__ Affine<A> after(Affine<A> l, Affine<A> r) {
  return {l.a * r.a, scale(l.a, r.b) + l.b};
}

// The V_next scan selects a value rather than computing one: a valid position (a = 0)
// forgets everything to its right exactly, so an inf V there cannot turn into 0 * inf = NaN.
template <typename A>
__device__ __forceinline__ Affine<A> after_select(Affine<A> l, Affine<A> r) {
  return l.a == A(0) ? l : Affine<A>{l.a * r.a, l.a * r.b + l.b};
}

template <typename A>
__device__ __forceinline__ A apply(Affine<A> f, A x) {
  return scale(f.a, x) + f.b;
}

template <typename A>
__device__ __forceinline__ A apply_select(Affine<A> f, A x) {
  return f.a == A(0) ? f.b : f.a * x + f.b;
}

template <bool kSelect, typename A>
__device__ __forceinline__ Affine<A> compose(Affine<A> l, Affine<A> r) {
  return kSelect ? after_select(l, r) : after(l, r);
}

// Reverse scan of the lanes' maps over the warp (every lane must call it): returns the
// composition of the maps of lanes lane .. kWarp-1 (inclusive), and sets `excl` to that of lanes
// lane+1 .. kWarp-1 (the identity for the last lane).
template <bool kSelect, typename A>
__device__ __forceinline__ Affine<A> warp_rscan(Affine<A> mine, Affine<A>& excl) {
  const int lane = threadIdx.x % kWarp;
  Affine<A> inc = mine;
#pragma unroll
  for (int o = 1; o < kWarp; o <<= 1) {
    const A oa = __shfl_down_sync(0xffffffffu, inc.a, o);
    const A ob = __shfl_down_sync(0xffffffffu, inc.b, o);
    if (lane + o < kWarp) inc = compose<kSelect>(inc, Affine<A>{oa, ob});
  }
  const A ea = __shfl_down_sync(0xffffffffu, inc.a, 1);
  const A eb = __shfl_down_sync(0xffffffffu, inc.b, 1);
  excl = lane == kWarp - 1 ? identity<A>() : Affine<A>{ea, eb};
  return inc;
}

}  // namespace cuda
}  // namespace rmkernels
