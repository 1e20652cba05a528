// Kernels that test the CUDA-on-CPU layer itself (tests/cuda_on_cpu/test_layer.py): warp
// operations with known answers, and one planted defect each (an out-of-bounds read, a
// shared-memory race, a divergent barrier) that the layer must report. Not a kernel of the
// package; compiled only into the test libraries.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "rmkernels/cuda_common.cuh"

namespace {

// out[t * 6 + i] for thread t: xor 1, xor 16, down 3, up 5, idx 7, ballot(odd lanes).
__global__ void shuffles_kernel(int64_t* out) {
  const int t = threadIdx.x;
  const int64_t v = 1000 + t;
  int64_t* o = out + t * 6;
  o[0] = __shfl_xor_sync(0xffffffffu, v, 1);
  o[1] = __shfl_xor_sync(0xffffffffu, v, 16);
  o[2] = __shfl_down_sync(0xffffffffu, v, 3);
  o[3] = __shfl_up_sync(0xffffffffu, v, 5);
  o[4] = __shfl_sync(0xffffffffu, v, 7);
  o[5] = __ballot_sync(0xffffffffu, t & 1);
}

// __activemask after lanes exited: threads t % 3 != 0 write it to out[t]; then, after a
// shuffle of the whole warp, only lane 0 stays and writes it to out[n + warp].
__global__ void activemask_kernel(int64_t* out) {
  const int t = threadIdx.x, lane = t % 32;
  const int v = __shfl_xor_sync(0xffffffffu, t, 1);
  if (lane == 0) {
    out[blockDim.x + t / 32] = __activemask() + 0 * v;
  }
  if (t % 3 == 0) return;
  out[t] = __activemask();
}

// out[b] = block sum of (b * blockDim + t) through cuda_common.cuh's block_sum.
__global__ void block_sum_kernel(double* out) {
  __shared__ double shared[1024 / rmkernels::cuda::kWarp];  // block_sum needs one slot per warp
  const double v = static_cast<double>(blockIdx.x * blockDim.x + threadIdx.x);
  const double s = rmkernels::cuda::block_sum(v, shared);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

// Planted: reads x[n] (one past the end).
__global__ void oob_read_kernel(const float* x, float* y, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) y[i] = x[i + 1];
}

// Each thread writes its slot, then reads its neighbour's: with the barrier it is correct;
// without it the read races with the neighbour's write.
__global__ void neighbour_kernel(float* out, int64_t with_barrier) {
  __shared__ float s[256];
  const int t = threadIdx.x;
  s[t] = static_cast<float>(t);
  if (with_barrier) __syncthreads();
  out[blockIdx.x * blockDim.x + t] = s[(t + 1) % blockDim.x];
}

// Planted: only half of the block reaches the barrier.
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < blockDim.x / 2) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// Planted: pairs of threads of one block write the same element.
__global__ void global_race_kernel(float* out) { out[threadIdx.x / 2] = static_cast<float>(threadIdx.x); }

}  // namespace

extern "C" {
int64_t rmk_selftest_shuffles(int64_t* out, int64_t threads) {
  RMK_LAUNCH(1, static_cast<unsigned>(threads), 0, nullptr, shuffles_kernel)(out);
  return cudaGetLastError();
}
int64_t rmk_selftest_activemask(int64_t* out, int64_t threads) {
  RMK_LAUNCH(1, static_cast<unsigned>(threads), 0, nullptr, activemask_kernel)(out);
  return cudaGetLastError();
}
int64_t rmk_selftest_block_sum(double* out, int64_t blocks, int64_t threads) {
  RMK_LAUNCH(static_cast<unsigned>(blocks), static_cast<unsigned>(threads), 0, nullptr, block_sum_kernel)(out);
  return cudaGetLastError();
}
int64_t rmk_selftest_oob_read(const float* x, float* y, int64_t n) {
  RMK_LAUNCH(rmkernels::cuda::ceil_div(n, 128), 128, 0, nullptr, oob_read_kernel)(x, y, n);
  return cudaGetLastError();
}
int64_t rmk_selftest_neighbour(float* out, int64_t blocks, int64_t threads, int64_t with_barrier) {
  RMK_LAUNCH(static_cast<unsigned>(blocks), static_cast<unsigned>(threads), 0, nullptr, neighbour_kernel)(
      out, with_barrier);
  return cudaGetLastError();
}
int64_t rmk_selftest_divergent_barrier(float* out, int64_t threads) {
  RMK_LAUNCH(1, static_cast<unsigned>(threads), 0, nullptr, divergent_barrier_kernel)(out);
  return cudaGetLastError();
}
int64_t rmk_selftest_global_race(float* out, int64_t threads) {
  RMK_LAUNCH(1, static_cast<unsigned>(threads), 0, nullptr, global_race_kernel)(out);
  return cudaGetLastError();
}
}
