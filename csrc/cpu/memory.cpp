// The memory of the CPU kernels' outputs (declared in rmkernels/cpu_common.h).
//
// A kernel's [B, T] output is written once, whole, by the kernel (pooling's [B, T, H] gradient of
// the hidden states: zeroed, then written at one row a sequence). When it is large and not
// resident yet (glibc serves a block over its mmap threshold, 32 MiB at most, from a new
// mapping unless a free heap block is large enough, and hands out heap pages malloc_trim
// returned: a plain process usually meets such a block on every call),
// each 4 KiB page faults on its first store and the fault, not the write, is the cost: 32 MiB of
// float32 took ~16 ms to write in fresh pages and ~1 ms in recycled ones on the 2-core CPU
// machine (benchmarks/results/*-grpo.md). While the kernel writes such an output it is advised
// for transparent huge pages (madvise MADV_HUGEPAGE), so that its stores fault in 2 MiB pages
// instead: grpo-l's full call in fresh pages went from 1.23-1.34x to 0.50-0.58x the time of
// torch.empty(B, T).fill_(1) (scratch measurement, 2026-12-03). Once written, the advice is
// withdrawn (MADV_NOHUGEPAGE: in the system's `madvise` mode, what unadvised memory gets), so
// that nothing else the allocator later places there is affected. The pages only change size:
// the values, the allocator and the freeing are torch's.
//
// Only where the system's THP mode is `madvise` (/sys/kernel/mm/transparent_hugepage/enabled):
// in `always` every such block gets huge pages anyway, in `never` none can; not when torch
// advises its own allocations (THP_MEM_ALLOC_ENABLE); and not with RMKERNELS_HUGE_PAGES=0 (read
// once, by the first kernel call): the kernel may compact memory to find a huge page (the
// system's THP `defrag` setting), which on a fragmented host can stall a call instead of
// saving it time. Recycled (resident) memory is left alone. Measured alternative:
// MADV_POPULATE_WRITE (4 KiB pages faulted in by one call) saved nothing here (17.0-18.4 ms
// against 17.9-18.6 ms to write 32 MiB; huge pages 4.9 ms), the fault being the page's cost.
#include <Python.h>

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "rmkernels/cpu_common.h"

namespace rmkernels {

namespace {

// Whether the advice applies here (see the top of this file): the size of a transparent huge
// page, or 0 and why not. Decided once, by the first call.
struct HugePolicy {
  int64_t bytes = 0;
  std::string why;
};

const HugePolicy& huge_policy() {
  static const HugePolicy policy = [] {
    HugePolicy p;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const char* torch_thp = std::getenv("THP_MEM_ALLOC_ENABLE");
    const char* own = std::getenv("RMKERNELS_HUGE_PAGES");
    if (own != nullptr && std::string(own) == "0") {
      p.why = "RMKERNELS_HUGE_PAGES=0";
      return p;
    }
    if (torch_thp != nullptr && std::string(torch_thp) != "" && std::string(torch_thp) != "0") {
      p.why = "torch's THP_MEM_ALLOC_ENABLE is set: torch advises its allocations itself";
      return p;
    }
    // C stdio, not iostreams: nothing here depends on which libstdc++ the streams would come from
    std::string mode;
    if (std::FILE* mode_file = std::fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r")) {
      char buf[256];
      const size_t n = std::fread(buf, 1, sizeof(buf) - 1, mode_file);
      std::fclose(mode_file);
      mode.assign(buf, n);
    }
    while (!mode.empty() && (mode.back() == '\n' || mode.back() == ' ')) mode.pop_back();
    if (mode.find("[madvise]") == std::string::npos) {
      p.why = mode.empty() ? "the system has no transparent huge pages"
                           : "the system's THP mode is not madvise (" + mode + ")";
      return p;
    }
    long long size = 0;
    std::FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", "r");
    const bool read = f != nullptr && std::fscanf(f, "%lld", &size) == 1;
    if (f != nullptr) std::fclose(f);
    if (!read || size <= 0) {
      p.why = "the huge page size is unknown (no hpage_pmd_size)";
    } else {
      p.bytes = static_cast<int64_t>(size);
    }
#else
    p.why = "not Linux";
#endif
    return p;
  }();
  return policy;
}

int64_t huge_page_bytes() { return huge_policy().bytes; }

// The huge pages wholly inside [p, p + n) (its ends share pages with other memory): [lo, hi).
std::pair<uintptr_t, uintptr_t> huge_span(const void* p, int64_t n, int64_t huge) {
  const uintptr_t h = static_cast<uintptr_t>(huge), a = reinterpret_cast<uintptr_t>(p);
  return {(a + h - 1) / h * h, (a + static_cast<uintptr_t>(n)) / h * h};
}

}  // namespace

bool resident(const void* p, int64_t n) {
#if defined(__linux__)
  if (n <= 0) return true;
  // Pages inside the block, not its ends: those share pages with the allocator's headers (a
  // heap block's own and the next one's, an mmapped block's), written whatever the state of
  // the rest. A heap block that malloc_trim emptied is resident at its ends only.
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE)), a = reinterpret_cast<uintptr_t>(p);
  for (int64_t q = 1; q <= 3; ++q) {
    const uintptr_t at = (a + static_cast<uintptr_t>(n / 4 * q)) / page * page;
    unsigned char v = 0;
    if (mincore(reinterpret_cast<void*>(at), page, &v) != 0 || !(v & 1)) return false;
  }
  return true;
#else
  (void)p;
  (void)n;
  return true;
#endif
}

bool advise_huge_pages(void* p, int64_t n, bool advise) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t huge = huge_page_bytes();
  if (huge <= 0 || n < huge || (advise && resident(p, n))) return false;
  const auto span = huge_span(p, n, huge);
  return span.second > span.first &&
         madvise(reinterpret_cast<void*>(span.first), span.second - span.first,
                 advise ? MADV_HUGEPAGE : MADV_NOHUGEPAGE) == 0;
#else
  (void)p;
  (void)n;
  (void)advise;
  return false;
#endif
}

at::Tensor OutputPages::empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return advised(at::empty(sizes, options));
}

at::Tensor OutputPages::empty_strided(at::IntArrayRef sizes, at::IntArrayRef strides,
                                      const at::TensorOptions& options) {
  return advised(at::empty_strided(sizes, strides, options));
}

at::Tensor OutputPages::advised(at::Tensor out) {
  const int64_t n = static_cast<int64_t>(out.nbytes());
  if (advise_huge_pages(out.data_ptr(), n, true)) advised_.emplace_back(out.data_ptr(), n);
  return out;
}

OutputPages::~OutputPages() {
  for (const auto& block : advised_) (void)advise_huge_pages(block.first, block.second, false);
}

}  // namespace rmkernels

// rmkernels._C.advise_huge_pages(address, nbytes, advise) -> bool: the rule of OutputPages for
// memory the caller holds (the benchmarks' floor of writing an output once into the same pages):
// advise=True gives the advice where it applies, advise=False withdraws it.
extern "C" PyObject* rmk_advise_huge_pages(PyObject* /*self*/, PyObject* args) {
  unsigned long long address = 0;
  long long nbytes = 0;
  int advise = 1;
  if (!PyArg_ParseTuple(args, "KL|p", &address, &nbytes, &advise)) return nullptr;
  if (nbytes < 0) {
    PyErr_SetString(PyExc_ValueError, "nbytes must be >= 0");
    return nullptr;
  }
  const bool done =
      rmkernels::advise_huge_pages(reinterpret_cast<void*>(static_cast<uintptr_t>(address)), nbytes, advise != 0);
  return PyBool_FromLong(done);
}

// rmkernels._C.huge_pages() -> (bytes, why): the huge page size the C++ CPU kernels' fresh
// outputs are written in, or (0, why not) (python -m rmkernels.info).
extern "C" PyObject* rmk_huge_pages(PyObject* /*self*/, PyObject* /*unused*/) {
  const auto& p = rmkernels::huge_policy();
  return Py_BuildValue("(Ls)", static_cast<long long>(p.bytes), p.why.c_str());
}
