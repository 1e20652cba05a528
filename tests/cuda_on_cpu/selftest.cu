// Kernels that test the CUDA-on-CPU layer itself (tests/cuda_on_cpu/test_layer.py): warp
// operations and a cooperative launch with known answers, and one planted defect each (an
// out-of-bounds read, a shared-memory race, a divergent barrier, a missing or divergent grid
// sync) that the layer must report. Not a kernel of the
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

// Cooperative: each block sums its threads' values in its own __shared__ array and publishes
// the sum; after the grid sync every block reads all the sums (wrong without per-block
// shared memory or without the sync). out[b] = sum over blocks of their sums, out[nb + b] =
// block b's own sum. mode 1 (planted): no grid sync, so the reads race with other blocks'
// writes. mode 2 (planted): block 0 skips the grid sync and exits.
__global__ void grid_sum_kernel(double* partial, double* out, int64_t mode) {
  __shared__ double shared[1024 / rmkernels::cuda::kWarp];
  const unsigned nb = gridDim.x;
  const double v = static_cast<double>(blockIdx.x * blockDim.x + threadIdx.x);
  const double s = rmkernels::cuda::block_sum(v, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
  if (mode == 2 && blockIdx.x == 0) return;
  if (mode != 1) RMK_GRID_SYNC();
  if (threadIdx.x == 0) {
    double tot = 0;
    for (unsigned b = 0; b < nb; ++b) tot += partial[b];
    out[blockIdx.x] = tot;
    out[nb + blockIdx.x] = s;
  }
}

// Planted: a grid sync in a kernel launched without RMK_LAUNCH_COOPERATIVE.
__global__ void plain_grid_sync_kernel(float* out) {
  RMK_GRID_SYNC();
  out[threadIdx.x] = 1.0f;
}

}  // namespace

extern "C" {
int64_t rmk_selftest_grid_sum(double* partial, double* out, int64_t blocks, int64_t threads, int64_t mode) {
  return RMK_LAUNCH_COOPERATIVE(static_cast<unsigned>(blocks), static_cast<unsigned>(threads), 0, nullptr,
                                grid_sum_kernel)(partial, out, mode);
}
// The grid rmkernels::cuda::cooperative_grid gives grid_sum_kernel for `wanted` blocks of
// `threads` (256 or 1024) threads.
int64_t rmk_selftest_cooperative_grid(int64_t* blocks, int64_t threads, int64_t wanted) {
  using rmkernels::cuda::cooperative_grid;
  unsigned int b = 0;
  const cudaError_t err = threads == 1024 ? cooperative_grid<grid_sum_kernel, 1024>(wanted, &b)
                                          : cooperative_grid<grid_sum_kernel, 256>(wanted, &b);
  *blocks = b;
  return err;
}
int64_t rmk_selftest_plain_grid_sync(float* out, int64_t threads) {
  RMK_LAUNCH(1, static_cast<unsigned>(threads), 0, nullptr, plain_grid_sync_kernel)(out);
  return cudaGetLastError();
}
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
