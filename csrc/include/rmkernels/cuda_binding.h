// Helpers for the torch bindings of the CUDA kernels (compiled only in the CUDA build).
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "rmkernels/cuda_common.cuh"

namespace rmkernels {

inline cuda::DType cuda_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kFloat16;
    default: TORCH_CHECK_TYPE(false, "rmkernels CUDA kernels take fp32/fp64/bf16/fp16, got ", t.scalar_type());
  }
}

inline const void* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr() : nullptr;
}

}  // namespace rmkernels

// Launch errors become a RuntimeError that names the kernel.
#define RMK_CUDA_CHECK(expr)                                                            \
  do {                                                                                  \
    cudaError_t _err = (expr);                                                          \
    TORCH_CHECK(_err == cudaSuccess, "rmkernels CUDA launch failed in ", #expr, ": ", \
                cudaGetErrorString(_err));                                              \
  } while (0)
