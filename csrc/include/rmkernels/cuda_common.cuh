// Torch-free helpers shared by the CUDA kernels: dtype tags, conversions, block reductions.
// Only CUDA headers and torch-free rmkernels headers here, so every kernel file compiles with
// plain nvcc (no torch).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <utility>

// Every kernel launch is written RMK_LAUNCH(grid, block, smem, stream, kernel)(args...). With
// nvcc it is kernel<<<grid, block, smem, stream>>>(args...); the CUDA-on-CPU test layer
// (tests/cuda_on_cpu) defines it first, to run the same kernel on the CPU.
#ifndef RMK_LAUNCH
#define RMK_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif
// A cooperative launch is written RMK_LAUNCH_COOPERATIVE(grid, block, smem, stream, kernel)(args...)
// and returns the launch's cudaError_t; only such a kernel may call RMK_GRID_SYNC() (every
// thread of the grid, the same number of times), and its grid must fit on the device at once
// (cooperative_grid below). The CUDA-on-CPU layer defines both first.
#ifndef RMK_LAUNCH_COOPERATIVE
#define RMK_NVCC_COOPERATIVE 1
#ifdef __CUDACC__
#include <cooperative_groups.h>
#endif
#define RMK_LAUNCH_COOPERATIVE(grid, block, smem, stream, ...) \
  ::rmkernels::cuda::CooperativeLaunch<decltype(&__VA_ARGS__)>{&__VA_ARGS__, dim3(grid), dim3(block), smem, stream}
#define RMK_GRID_SYNC() ::cooperative_groups::this_grid().sync()
#endif
#include "rmkernels/scalar_math.h"

namespace rmkernels {
namespace cuda {

// dtype of a floating tensor as seen by the launchers. Arithmetic is float32 for
// fp32/bf16/fp16 and float64 for fp64.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// The arithmetic type of a storage type: rmkernels::acc_t (scalar_math.h).

// Device code only where nvcc compiles (the torch bindings are .cpp files built by the host
// compiler and include this header for DType).
#ifdef __CUDACC__
template <typename A> __device__ __forceinline__ A to_acc(float v) { return v; }
template <typename A> __device__ __forceinline__ A to_acc(double v) { return static_cast<A>(v); }
template <typename A> __device__ __forceinline__ A to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename A> __device__ __forceinline__ A to_acc(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half(v); }
template <typename T> __device__ __forceinline__ T from_acc(double v);
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

template <typename A> __device__ __forceinline__ A quiet_nan();
template <> __device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double quiet_nan<double>() { return __longlong_as_double(0x7ff8000000000000LL); }

#endif  // __CUDACC__

// Threads per block of the row kernels: 256 = 8 warps, enough loads in flight per SM with
// a few blocks resident; every kernel here is memory- or latency-bound.
constexpr int kThreads = 256;
constexpr int kWarp = 32;

#ifdef __CUDACC__
template <typename T> __device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <typename T> __device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    T other = __shfl_xor_sync(0xffffffffu, v, o);
    v = other > v ? other : v;
  }
  return v;
}

// Sum over the block; the result is valid in every thread. `shared` holds kThreads/kWarp T.
template <typename T> __device__ __forceinline__ T block_sum(T v, T* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // shared may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int nwarps = (blockDim.x + kWarp - 1) / kWarp;
  v = lane < nwarps ? shared[lane] : T(0);
  return warp_sum(v);
}

template <typename T> __device__ __forceinline__ T block_max(T v, T* shared, T lowest) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int nwarps = (blockDim.x + kWarp - 1) / kWarp;
  v = lane < nwarps ? shared[lane] : lowest;
  return warp_max(v);
}

// A store that may meet other threads' stores of the same value to the same address without a
// data race (PTX st.relaxed.gpu: a "strong" store in the memory model, compiled to a plain
// store, not an atomic read-modify-write). The host branch is what the CUDA-on-CPU layer runs
// (a relaxed C++ atomic store, which ThreadSanitizer sees as such); nvcc's host pass never runs it.
__device__ __forceinline__ void store_relaxed(double* p, double v) {
#ifdef __CUDA_ARCH__
  asm volatile("st.relaxed.gpu.f64 [%0], %1;" ::"l"(p), "d"(v) : "memory");
#else
  __atomic_store(p, &v, __ATOMIC_RELAXED);
#endif
}

// The (row, column) of the flattened index of a [rows, cols] array (cols >= 1) in a grid-stride
// loop that starts at `start` and advances by `stride`: one 64-bit division at the start, then
// a carry per step (advance()), not a division per element.
struct GridStride2D {
  int64_t row, col, step_row, step_col, cols;
  __device__ __forceinline__ GridStride2D(int64_t start, int64_t stride, int64_t n_cols)
      : row(start / n_cols), col(start % n_cols), step_row(stride / n_cols), step_col(stride % n_cols),
        cols(n_cols) {}
  __device__ __forceinline__ void advance() {
    row += step_row;
    col += step_col;
    if (col >= cols) {
      col -= cols;
      ++row;
    }
  }
};

// Calls f with a typed null pointer of the storage type of `dtype` and one of its
// accumulator type (float, double for kFloat64), then returns the launch's error.
template <typename F> cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(static_cast<float*>(nullptr), static_cast<float*>(nullptr)); break;
    case DType::kFloat64: f(static_cast<double*>(nullptr), static_cast<double*>(nullptr)); break;
    case DType::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr), static_cast<float*>(nullptr)); break;
    case DType::kFloat16: f(static_cast<__half*>(nullptr), static_cast<float*>(nullptr)); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

#endif  // __CUDACC__

inline unsigned int ceil_div(int64_t a, int64_t b) { return static_cast<unsigned int>((a + b - 1) / b); }

#if defined(__CUDACC__) && defined(RMK_NVCC_COOPERATIVE)
// nvcc's RMK_LAUNCH_COOPERATIVE: cudaLaunchKernelEx with the cooperative attribute (the
// runtime converts the arguments to the kernel's parameter types; valid in CUDA-graph capture).
template <typename K> struct CooperativeLaunch {
  K kernel;
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  template <typename... Args> cudaError_t operator()(Args&&... args) const {
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeCooperative;
    attr[0].val.cooperative = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
  }
};
#endif

// The grid of a cooperative launch of Kernel with Threads threads per block and no dynamic
// shared memory: the blocks the current device holds at once (multiprocessors x resident
// blocks per multiprocessor, queried once per device, kernel and block size), at most
// `wanted`, at least 1. Errors of the queries are returned (no cooperative support:
// cudaErrorNotSupported).
template <auto Kernel, int Threads> cudaError_t cooperative_grid(int64_t wanted, unsigned int* blocks) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> capacity[kMaxDevices];  // 0: not queried yet (every writer stores the same value)
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  int cap = dev >= 0 && dev < kMaxDevices ? capacity[dev].load(std::memory_order_relaxed) : 0;
  if (cap == 0) {
    int coop = 0, sms = 0, per_sm = 0;
    if ((err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev)) != cudaSuccess) return err;
    if (!coop) return cudaErrorNotSupported;
    if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess) return err;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, reinterpret_cast<const void*>(Kernel), Threads, 0);
    if (err != cudaSuccess) return err;
    cap = sms * per_sm;
    if (cap < 1) return cudaErrorInvalidConfiguration;
    if (dev >= 0 && dev < kMaxDevices) capacity[dev].store(cap, std::memory_order_relaxed);
  }
  *blocks = static_cast<unsigned int>(wanted < 1 ? 1 : (wanted < cap ? wanted : cap));
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace rmkernels
