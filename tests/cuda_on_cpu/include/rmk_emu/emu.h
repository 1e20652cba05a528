// CUDA-on-CPU execution layer (tests only; never built by setup.py or shipped).
//
// Force-included (g++ -include rmk_emu/emu.h) before every csrc/cuda/*.cu file compiled for
// the tests. It gives the kernel sources what nvcc would: __global__/__device__/__shared__,
// threadIdx/blockIdx/blockDim/gridDim, __syncthreads, the __shfl_*_sync family and the
// device intrinsics the kernels use, and RMK_LAUNCH (csrc/include/rmkernels/cuda_common.cuh)
// runs a launch on the CPU: the blocks of the grid one after another, the threads of a block
// as fibers (runtime.cpp) that switch only at __syncthreads and warp operations. bf16/fp16
// come from the CUDA toolkit's own cuda_bf16.h/cuda_fp16.h host code paths.
#pragma once

// The toolkit headers first, compiled as host code (no __CUDACC__), with the C++ headers the
// kernel files use: later #includes of them are no-ops.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <string>
#include <type_traits>
#include <utility>

// ---- CUDA language keywords -------------------------------------------------------------
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __noinline__
#undef __shared__
#undef __constant__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
// One copy per kernel instantiation and OS thread: blocks of an ordinary launch run one at a
// time on the calling thread, so it is per-block memory (the runtime orders one block's
// accesses before the next block's, for ThreadSanitizer); each block of a cooperative launch
// runs on its own OS thread, with its own copy.
#define __shared__ static thread_local __attribute__((tls_model("initial-exec")))
#define __constant__ static
#define __launch_bounds__(...)

// The kernel sources use the device code paths of cuda_common.cuh (guarded by __CUDACC__).
// Everything that must see the host compiler's view of the toolkit is included above.
#ifndef __CUDACC__
#define __CUDACC__ 1
#define RMK_EMU_DEFINED_CUDACC 1
#endif

// ---- runtime API --------------------------------------------------------------------------
// cudaError_t, cudaStream_t and the API's declarations come from the toolkit's
// cuda_runtime_api.h (pulled in by cuda_fp16.h); runtime.cpp defines the few functions the
// launchers call (cudaGetLastError, cudaPeekAtLastError, cudaGetErrorString,
// cudaMemsetAsync). No CUDA runtime library is linked.

// Built-in variables: the running fiber's values (set by the runtime at every switch; per OS
// thread, for the blocks of a cooperative launch). Every per-thread variable of the layer
// (these, the runtime's, the kernels' __shared__ arrays) uses the initial-exec TLS model: a
// fixed offset from the thread pointer, not a __tls_get_addr call per access. The library's
// TLS segment then goes in glibc's static TLS space, which emu.py's worker enlarges.
#define RMK_EMU_TLS thread_local __attribute__((tls_model("initial-exec")))
extern RMK_EMU_TLS uint3 threadIdx;
extern RMK_EMU_TLS uint3 blockIdx;
extern RMK_EMU_TLS dim3 blockDim;
extern RMK_EMU_TLS dim3 gridDim;
constexpr int warpSize = 32;

namespace rmk_emu {
using Body = void (*)(void*);
// Runs `body(ctx)` as every thread of every block of the grid; returns the launch's error
// (an invalid configuration, as the CUDA runtime reports it). Aborts the process with a
// report naming the kernel on a divergent barrier or shuffle.
cudaError_t launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const char* kernel, Body body,
                   void* ctx);
// A cooperative launch (cudaLaunchKernelEx with cudaLaunchAttributeCooperative): every block
// resident at once, each on its own OS thread, so that grid_sync (cooperative_groups'
// this_grid().sync()) can hold them all. A grid larger than the emulated device holds (see
// cudaOccupancyMaxActiveBlocksPerMultiprocessor in runtime.cpp) is
// cudaErrorCooperativeLaunchTooLarge, as on the GPU.
cudaError_t launch_cooperative(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const char* kernel, Body body,
                               void* ctx);
void grid_sync(const char* file, int line);
void syncthreads(const char* file, int line);
// Warp exchange: every lane of `mask` publishes `value`; returns once all of them have; then
// warp_slot(l) reads lane l's value (until the lane's next warp operation).
void warp_publish(uint64_t value, unsigned mask, const char* what, const char* file, int line);
uint64_t warp_slot(int lane, unsigned mask, const char* what);
// __activemask: parks the lane until every thread of the block is parked or done, then
// returns the mask of the warp's lanes parked at the same call (those converged with it).
unsigned active_mask(const char* file, int line);
int lane_id();

template <typename T> inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type wider than 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T> inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

// "ns::kernel<float, float>" from the function pointer's template argument.
template <auto Kernel> const char* kernel_name() {
  static const std::string name = [](std::string s) {
    const size_t p = s.find("Kernel = ");
    if (p != std::string::npos) s = s.substr(p + 9, s.size() - p - 10);
    return s;
  }(__PRETTY_FUNCTION__);
  return name.c_str();
}

template <auto Kernel> struct Launch {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  template <typename... Args> void operator()(Args&&... args) const {
    auto call = [&]() { Kernel(args...); };
    using Call = decltype(call);
    launch(grid, block, smem, stream, kernel_name<Kernel>(), [](void* c) { (*static_cast<Call*>(c))(); }, &call);
  }
};
template <auto Kernel> struct CooperativeLaunch {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  template <typename... Args> cudaError_t operator()(Args&&... args) const {
    auto call = [&]() { Kernel(args...); };
    using Call = decltype(call);
    return launch_cooperative(grid, block, smem, stream, kernel_name<Kernel>(),
                              [](void* c) { (*static_cast<Call*>(c))(); }, &call);
  }
};
}  // namespace rmk_emu

// The launch hooks of csrc/include/rmkernels/cuda_common.cuh, CPU versions.
#define RMK_LAUNCH(grid, block, smem, stream, ...) \
  ::rmk_emu::Launch<&__VA_ARGS__>{dim3(grid), dim3(block), static_cast<size_t>(smem), stream}
#define RMK_LAUNCH_COOPERATIVE(grid, block, smem, stream, ...) \
  ::rmk_emu::CooperativeLaunch<&__VA_ARGS__>{dim3(grid), dim3(block), static_cast<size_t>(smem), stream}
#define RMK_GRID_SYNC() ::rmk_emu::grid_sync(__FILE__, __LINE__)

// ---- barriers, warp operations ------------------------------------------------------------
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  rmk_emu::syncthreads(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  rmk_emu::warp_publish(0, mask, "__syncwarp", file, line);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = warpSize, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  rmk_emu::warp_publish(rmk_emu::to_bits(v), mask, "__shfl_sync", file, line);
  const int lane = rmk_emu::lane_id();
  const int base = lane & ~(width - 1);
  return rmk_emu::from_bits<T>(rmk_emu::warp_slot(base + (src & (width - 1)), mask, "__shfl_sync"));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
  rmk_emu::warp_publish(rmk_emu::to_bits(v), mask, "__shfl_xor_sync", file, line);
  const int lane = rmk_emu::lane_id();
  int src = lane ^ lane_mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;  // outside the segment: own value
  return rmk_emu::from_bits<T>(rmk_emu::warp_slot(src, mask, "__shfl_xor_sync"));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  rmk_emu::warp_publish(rmk_emu::to_bits(v), mask, "__shfl_down_sync", file, line);
  const int lane = rmk_emu::lane_id();
  const int seg_lane = lane & (width - 1);
  const int src = seg_lane + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane;
  return rmk_emu::from_bits<T>(rmk_emu::warp_slot(src, mask, "__shfl_down_sync"));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  rmk_emu::warp_publish(rmk_emu::to_bits(v), mask, "__shfl_up_sync", file, line);
  const int lane = rmk_emu::lane_id();
  const int seg_lane = lane & (width - 1);
  const int src = seg_lane >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
  return rmk_emu::from_bits<T>(rmk_emu::warp_slot(src, mask, "__shfl_up_sync"));
}
inline unsigned __activemask(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return rmk_emu::active_mask(file, line);
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  rmk_emu::warp_publish(pred != 0, mask, "__ballot_sync", file, line);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l) & 1u) r |= static_cast<unsigned>(rmk_emu::warp_slot(l, mask, "__ballot_sync") != 0) << l;
  return r;
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return __ballot_sync(mask, pred, file, line) != 0;
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return __ballot_sync(mask, pred, file, line) == mask;
}

// ---- atomics (real atomics, so ThreadSanitizer sees them as such) ----------------------------
template <typename T> inline T atomicAdd(T* p, T v) {
  if constexpr (std::is_integral<T>::value) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
  } else {
    T old, nv;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    do {
      nv = old + v;
    } while (!__atomic_compare_exchange(p, &old, &nv, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return old;
  }
}
template <typename T> inline T atomicMax(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T> inline T atomicMin(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old > v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}

// ---- device intrinsics ----------------------------------------------------------------------
// Computed exactly (libm); the GPU's approximate intrinsics (__expf, __logf, rsqrtf...) have
// a few ulp of error that this layer does not model.
inline float __int_as_float(int x) { return rmk_emu::from_bits<float>(static_cast<uint32_t>(x)); }
inline int __float_as_int(float x) { return static_cast<int>(static_cast<uint32_t>(rmk_emu::to_bits(x))); }
inline unsigned __float_as_uint(float x) { return static_cast<uint32_t>(rmk_emu::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return rmk_emu::from_bits<float>(x); }
inline double __longlong_as_double(long long x) { return rmk_emu::from_bits<double>(static_cast<uint64_t>(x)); }
inline long long __double_as_longlong(double x) { return static_cast<long long>(rmk_emu::to_bits(x)); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __exp2f(float x) { return exp2f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
