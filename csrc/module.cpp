// rmkernels._C: the Python module that carries the compiled kernels.
//
// The op schemas are defined from Python (rmkernels/_library.py), so the ops exist even
// when this library is absent; the C++ files only register implementations with
// TORCH_LIBRARY_IMPL(rmkernels, CPU/CUDA, m). This file only makes the .so importable, says
// what it was built with and which CPU variant of the loop kernels it runs, and carries three
// plain Python functions (group_ids_from_objects, advise_huge_pages, huge_pages).
#include <Python.h>

#include "rmkernels/cpu_simd.h"

#ifndef RMKERNELS_CUDA_ARCHS
#define RMKERNELS_CUDA_ARCHS ""
#endif

// rmk.group_ids' fast path for numpy object arrays (csrc/cpu/group_adv_ids.cpp)
extern "C" PyObject* rmk_group_ids_from_objects(PyObject* self, PyObject* uids);
// the huge-page advice of the CPU kernels' outputs, for memory the caller holds (csrc/cpu/memory.cpp)
extern "C" PyObject* rmk_advise_huge_pages(PyObject* self, PyObject* args);
extern "C" PyObject* rmk_huge_pages(PyObject* self, PyObject* unused);

static PyMethodDef rmkernels_methods[] = {
    {"group_ids_from_objects", rmk_group_ids_from_objects, METH_O,
     "group_ids_from_objects(uids) -> bytearray of int64 first-seen ids of a 1-D numpy object array"},
    {"advise_huge_pages", rmk_advise_huge_pages, METH_VARARGS,
     "advise_huge_pages(address, nbytes, advise=True) -> bool: the CPU kernels' huge-page advice for an output they "
     "write whole (advise=False withdraws it)"},
    {"huge_pages", rmk_huge_pages, METH_NOARGS,
     "huge_pages() -> (bytes, why): the huge page size of the CPU kernels' fresh outputs, or (0, why not)"},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef rmkernels_module = {PyModuleDef_HEAD_INIT, "_C",
                                              "rmkernels compiled kernels", -1, rmkernels_methods};

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
