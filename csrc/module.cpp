// rmkernels._C: the Python module that carries the compiled kernels.
//
// The op schemas are defined from Python (rmkernels/_library.py), so the ops exist even
// when this library is absent; the C++ files only register implementations with
// TORCH_LIBRARY_IMPL(rmkernels, CPU/CUDA, m). This file only makes the .so importable and
// says what it was built with and which CPU variant of the loop kernels it runs.
#include <Python.h>

#include "rmkernels/cpu_simd.h"

#ifndef RMKERNELS_CUDA_ARCHS
#define RMKERNELS_CUDA_ARCHS ""
#endif

static struct PyModuleDef rmkernels_module = {PyModuleDef_HEAD_INIT, "_C",
                                              "rmkernels compiled kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&rmkernels_module);
  if (m == nullptr) return nullptr;
#ifdef RMKERNELS_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  PyModule_AddStringConstant(m, "CUDA_ARCHS", RMKERNELS_CUDA_ARCHS);
  // the variant of the CPU loop kernels this process uses (RMKERNELS_CPU_ISA caps it)
  PyModule_AddStringConstant(m, "CPU_ISA", rmkernels::cpu_isa_name());
  return m;
}
