// CUDA-on-CPU execution layer: the scheduler behind RMK_LAUNCH (see include/rmk_emu/emu.h).
//
// A launch runs the blocks of its grid one after another on the calling OS thread. The
// threads of a block are fibers (one stack each; a 20-instruction register switch on x86-64,
// ucontext elsewhere) that run until they reach a
// __syncthreads, a warp operation (__shfl_*_sync, __ballot_sync, __syncwarp) or the end of
// the kernel, then hand over to the next fiber. When every fiber of the block is parked, the
// scheduler releases what CUDA would release: a warp whose lanes (those of the mask) all wait
// at the same warp operation, or the block when every thread waits at the same __syncthreads.
// __activemask is a warp operation without a mask: it returns the lanes parked at the same
// call (not those that have exited or wait elsewhere, e.g. in the other side of a branch).
// If nothing can be released (a barrier not every thread reaches, a shuffle with an exited
// lane, threads at different barriers) the process stops with a report naming the kernel,
// the block and what each thread waits at, instead of hanging.
//
// Sanitizers: this file is compiled without instrumentation. Under AddressSanitizer
// (RMK_EMU_ASAN) every fiber switch is announced with __sanitizer_{start,finish}_switch_fiber.
// Under ThreadSanitizer (RMK_EMU_TSAN) every CUDA thread is a TSan fiber, the switches carry
// no synchronisation, and the only happens-before edges are CUDA's: __syncthreads (each
// arrival releases, each departure acquires the barrier of that phase), the end of one block
// before the next (its shared memory is reused), and the launch's start and end with the
// host. So a shared- or global-memory access of one thread that conflicts with another
// thread's access since the last barrier is reported as a data race.
#include <sys/mman.h>
#include <ucontext.h>

#if defined(__x86_64__) && !defined(RMK_EMU_UCONTEXT)
#define RMK_EMU_ASM_SWITCH 1
#endif
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "rmk_emu/emu.h"

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

#if defined(RMK_EMU_ASAN) || defined(RMK_EMU_TSAN)
extern "C" void __sanitizer_set_death_callback(void (*callback)(void));
#endif
#ifdef RMK_EMU_ASAN
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
#endif
#ifdef RMK_EMU_TSAN
extern "C" void* __tsan_get_current_fiber(void);
extern "C" void* __tsan_create_fiber(unsigned flags);
extern "C" void __tsan_switch_to_fiber(void* fiber, unsigned flags);
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
#endif

#ifdef RMK_EMU_ASM_SWITCH
// rmk_emu_switch(&save_sp, next_sp): saves the callee-saved registers and the FP control
// words on the current stack, stores the stack pointer in *save_sp, and resumes the stack
// next_sp (saved the same way, or a new fiber's initial frame; see run_block).
extern "C" void rmk_emu_switch(void** save_sp, void* next_sp);
asm(R"(
  .text
  .globl rmk_emu_switch
  .type rmk_emu_switch, @function
rmk_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size rmk_emu_switch, .-rmk_emu_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");
#endif

namespace rmk_emu {
cudaError_t g_last = cudaSuccess;
namespace {

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;

enum State { kRunnable, kWaitBlock, kWaitWarp, kDone };
const char* const kActiveMask = "__activemask";  // Fiber::what of a lane parked in __activemask

struct Fiber {
#ifdef RMK_EMU_ASM_SWITCH
  void* sp = nullptr;  // saved stack pointer (rmk_emu_switch)
#else
  ucontext_t ctx;
#endif
  char* stack = nullptr;
  State state = kDone;
  uint3 tid;
  int linear = 0;
  const char* file = nullptr;  // where it waits
  int line = 0;
  const char* what = nullptr;
  unsigned mask = 0;
  int read_buf = 0;  // the warp exchange buffer its last warp operation reads
  int parity = 0;    // the __syncthreads phase it waits at
  void* asan_fake = nullptr;
  void* tsan = nullptr;
};

Fiber* g_fibers = nullptr;
int g_nfibers = 0;  // created
int g_n = 0;        // threads of the running block
int g_current = -1;
#ifdef RMK_EMU_ASM_SWITCH
void* g_sched_sp = nullptr;
#else
ucontext_t g_sched;
#endif
const char* g_kernel = "";
Body g_body = nullptr;
void* g_ctx = nullptr;
uint64_t g_slots[kMaxThreads / 32][2][32];
int g_warp_buf[kMaxThreads / 32];
int g_epoch = 0;
bool g_in_launch = false;

#ifdef RMK_EMU_ASAN
const void* g_main_bottom = nullptr;
size_t g_main_size = 0;
void* g_main_fake = nullptr;
#endif
#ifdef RMK_EMU_TSAN
void* g_tsan_main = nullptr;
char g_sync_boundary[2];  // by block parity: what block k releases, block k + 1 acquires
char g_sync_barrier[2];
#endif

void tsan_acquire(void* p) {
#ifdef RMK_EMU_TSAN
  __tsan_acquire(p);
#else
  (void)p;
#endif
}
void tsan_release(void* p) {
#ifdef RMK_EMU_TSAN
  __tsan_release(p);
#else
  (void)p;
#endif
}
int g_block_parity = 0;
// Each fiber acquires the previous block's object when it starts and releases its block's
// object when it ends; one object for both would order a block's threads among themselves.
void* boundary_sync(int parity) {
#ifdef RMK_EMU_TSAN
  return &g_sync_boundary[parity & 1];
#else
  (void)parity;
  return nullptr;
#endif
}
void* barrier_sync(int parity) {
#ifdef RMK_EMU_TSAN
  return &g_sync_barrier[parity];
#else
  (void)parity;
  return nullptr;
#endif
}

std::string where_prefix() {
  char buf[512];
  std::snprintf(buf, sizeof buf, "rmk_emu: kernel %s, block (%u, %u, %u) of grid (%u, %u, %u), %u x %u x %u threads",
                g_kernel, blockIdx.x, blockIdx.y, blockIdx.z, gridDim.x, gridDim.y, gridDim.z, blockDim.x, blockDim.y,
                blockDim.z);
  return buf;
}

const char* state_name(State s) {
  switch (s) {
    case kRunnable: return "running";
    case kWaitBlock: return "waiting at __syncthreads";
    case kWaitWarp: return "waiting at";
    default: return "exited";
  }
}

// What every thread of the block is doing, as ranges of linear thread ids.
std::string describe_threads() {
  std::string out;
  int t = 0;
  while (t < g_n) {
    const Fiber& f = g_fibers[t];
    int u = t + 1;
    auto same = [&](const Fiber& g) {
      return g.state == f.state && (f.state == kDone || (g.line == f.line && g.what == f.what && g.file == f.file));
    };
    while (u < g_n && same(g_fibers[u])) ++u;
    char buf[512];
    if (f.state == kDone) {
      std::snprintf(buf, sizeof buf, "\n  threads %d-%d: exited", t, u - 1);
    } else if (f.state == kWaitWarp) {
      std::snprintf(buf, sizeof buf, "\n  threads %d-%d: waiting at %s(mask 0x%08x) %s:%d", t, u - 1, f.what, f.mask,
                    f.file, f.line);
    } else {
      std::snprintf(buf, sizeof buf, "\n  threads %d-%d: %s %s:%d", t, u - 1, state_name(f.state), f.file ? f.file : "?",
                    f.line);
    }
    out += buf;
    t = u;
  }
  return out;
}

[[noreturn]] void fail(const std::string& why) {
  std::fprintf(stderr, "%s: %s%s\n", where_prefix().c_str(), why.c_str(), describe_threads().c_str());
  std::fflush(stderr);
  std::fflush(stdout);
  _exit(87);  // a kernel that cannot finish: no hang, no partial results
}

#if defined(RMK_EMU_ASAN) || defined(RMK_EMU_TSAN)
void on_death() {
  if (!g_in_launch) return;
  std::fprintf(stderr, "%s: the sanitizer report above comes from this kernel (thread (%u, %u, %u))\n",
               where_prefix().c_str(), threadIdx.x, threadIdx.y, threadIdx.z);
}
#endif

void to_scheduler(bool finished) {
  Fiber& f = g_fibers[g_current];
#ifdef RMK_EMU_ASAN
  __sanitizer_start_switch_fiber(finished ? nullptr : &f.asan_fake, g_main_bottom, g_main_size);
#else
  (void)finished;
#endif
#ifdef RMK_EMU_TSAN
  __tsan_switch_to_fiber(g_tsan_main, 1 /* no synchronisation */);
#endif
#ifdef RMK_EMU_ASM_SWITCH
  rmk_emu_switch(&f.sp, g_sched_sp);
#else
  swapcontext(&f.ctx, &g_sched);
#endif
#ifdef RMK_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.asan_fake, nullptr, nullptr);
#endif
}

void fiber_entry() {
#ifdef RMK_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_main_bottom, &g_main_size);
#endif
  tsan_acquire(boundary_sync(g_block_parity ^ 1));
  g_body(g_ctx);
  tsan_release(boundary_sync(g_block_parity));
  g_fibers[g_current].state = kDone;
  to_scheduler(true);
  std::abort();  // never resumed
}

void resume(int t) {
  Fiber& f = g_fibers[t];
  g_current = t;
  threadIdx = f.tid;
#ifdef RMK_EMU_ASAN
  __sanitizer_start_switch_fiber(&g_main_fake, f.stack, kStackBytes);
#endif
#ifdef RMK_EMU_TSAN
  __tsan_switch_to_fiber(f.tsan, 1 /* no synchronisation */);
#endif
#ifdef RMK_EMU_ASM_SWITCH
  rmk_emu_switch(&g_sched_sp, f.sp);
#else
  swapcontext(&g_sched, &f.ctx);
#endif
#ifdef RMK_EMU_ASAN
  __sanitizer_finish_switch_fiber(g_main_fake, nullptr, nullptr);
#endif
  g_current = -1;
}

void ensure_fibers(int n) {
  if (g_fibers == nullptr) g_fibers = new Fiber[kMaxThreads];
#ifdef RMK_EMU_TSAN
  if (g_tsan_main == nullptr) g_tsan_main = __tsan_get_current_fiber();
#endif
  for (; g_nfibers < n; ++g_nfibers) {
    Fiber& f = g_fibers[g_nfibers];
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "rmk_emu: cannot map a fiber stack\n");
      std::abort();
    }
    f.stack = static_cast<char*>(p);
#ifdef RMK_EMU_TSAN
    f.tsan = __tsan_create_fiber(0);
#endif
  }
}

bool same_site(const Fiber& a, const Fiber& b) {
  return a.line == b.line && a.what == b.what && (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

// Releases every warp whose lanes of the mask all wait at the same warp operation.
bool release_warps() {
  bool progressed = false;
  const int nwarps = (g_n + 31) / 32;
  for (int w = 0; w < nwarps; ++w) {
    const int lo = 32 * w, hi = std::min(g_n, lo + 32);
    int first = -1;
    for (int t = lo; t < hi; ++t) {
      if (g_fibers[t].state == kWaitWarp) {
        first = t;
        break;
      }
    }
    if (first < 0) continue;
    const Fiber& f0 = g_fibers[first];
    if (f0.what == kActiveMask) {
      // __activemask: the lanes that wait at this same call once the whole block is parked
      // (the others have exited or wait elsewhere: a divergent branch). Each reads the mask
      // from its exchange slot.
      unsigned active = 0;
      for (int t = lo; t < hi; ++t) {
        const Fiber& f = g_fibers[t];
        if (f.state == kWaitWarp && same_site(f, f0)) active |= 1u << (t - lo);
      }
      for (int t = lo; t < hi; ++t) {
        Fiber& f = g_fibers[t];
        if (!((active >> (t - lo)) & 1u)) continue;
        g_slots[w][g_warp_buf[w]][t - lo] = active;
        f.state = kRunnable;
        f.read_buf = g_warp_buf[w];
      }
      g_warp_buf[w] ^= 1;
      progressed = true;
      continue;
    }
    bool ready = true;
    for (int t = lo; t < hi; ++t) {
      const Fiber& f = g_fibers[t];
      const bool in_mask = (f0.mask >> (t - lo)) & 1u;
      if (f.state == kWaitWarp && (!same_site(f, f0) || f.mask != f0.mask)) {
        fail("lanes of one warp wait at different warp operations (divergent warp; the GPU result is undefined)");
      }
      if (!in_mask) continue;
      if (f.state == kDone) fail(std::string(f0.what) + " with a mask that names a lane that has exited");
      if (f.state != kWaitWarp) ready = false;
    }
    if ((f0.mask >> (hi - lo)) != 0 && hi - lo < 32) {
      fail(std::string(f0.what) + " with a mask that names lanes beyond the block's threads");
    }
    if (!ready) continue;
    for (int t = lo; t < hi; ++t) {
      Fiber& f = g_fibers[t];
      if (f.state != kWaitWarp) continue;
      f.state = kRunnable;
      f.read_buf = g_warp_buf[w];
    }
    g_warp_buf[w] ^= 1;
    progressed = true;
  }
  return progressed;
}

bool release_block() {
  int waiting = 0, done = 0;
  for (int t = 0; t < g_n; ++t) {
    waiting += g_fibers[t].state == kWaitBlock;
    done += g_fibers[t].state == kDone;
  }
  if (waiting == 0) return false;
  if (waiting + done == g_n && done > 0) {
    fail("__syncthreads is not reached by every thread of the block (some exited): a divergent barrier");
  }
  if (waiting != g_n) return false;
  for (int t = 1; t < g_n; ++t) {
    if (!same_site(g_fibers[t], g_fibers[0])) {
      fail("threads of the block wait at different __syncthreads (a divergent barrier)");
    }
  }
  for (int t = 0; t < g_n; ++t) g_fibers[t].state = kRunnable;
  ++g_epoch;
  return true;
}

void run_block() {
  for (int t = 0; t < g_n; ++t) {
    Fiber& f = g_fibers[t];
#ifdef RMK_EMU_ASM_SWITCH
    // The frame rmk_emu_switch pops: FP control words, r15..r12, rbx, rbp, then it returns
    // into fiber_entry with the stack aligned as after a call.
    uint64_t* top = reinterpret_cast<uint64_t*>(f.stack + kStackBytes);
    top[-1] = 0;  // fiber_entry's return address: it never returns
    top[-2] = reinterpret_cast<uint64_t>(&fiber_entry);
    for (int r = 3; r <= 8; ++r) top[-r] = 0;  // rbp, rbx, r12..r15
    top[-9] = 0x1F80ull | (0x037Full << 32);      // MXCSR, x87 control word: the defaults
    f.sp = top - 9;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
    // swapcontext never reads uc_stack again; a zero size keeps ASan's swapcontext
    // interceptor from clearing the shadow (the redzones) of a parked fiber's stack.
    f.ctx.uc_stack.ss_size = 0;
#endif
    f.state = kRunnable;
    f.linear = t;
    f.tid = uint3{static_cast<unsigned>(t % blockDim.x), static_cast<unsigned>((t / blockDim.x) % blockDim.y),
                  static_cast<unsigned>(t / (blockDim.x * blockDim.y))};
    f.file = nullptr;
    f.line = 0;
    f.what = nullptr;
    f.asan_fake = nullptr;
  }
  for (int w = 0; w < (g_n + 31) / 32; ++w) g_warp_buf[w] = 0;
  g_epoch = 0;
  for (;;) {
    for (int t = 0; t < g_n; ++t) {
      if (g_fibers[t].state == kRunnable) resume(t);
    }
    bool all_done = true;
    for (int t = 0; t < g_n && all_done; ++t) all_done = g_fibers[t].state == kDone;
    if (all_done) return;
    if (release_warps()) continue;
    if (release_block()) continue;
    fail("deadlock: no barrier or warp operation can complete");
  }
}

}  // namespace

cudaError_t launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const char* kernel, Body body, void* ctx) {
  (void)stream;  // launches run in issue order: every stream is the same queue here
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (grid.x < 1 || grid.x > 0x7fffffffu || grid.y < 1 || grid.y > 65535 || grid.z < 1 || grid.z > 65535 ||
      block.x < 1 || block.x > 1024 || block.y < 1 || block.y > 1024 || block.z < 1 || block.z > 64 ||
      nthreads > 1024 || smem > 48 * 1024) {
    g_last = cudaErrorInvalidConfiguration;
    return g_last;
  }
  if (g_in_launch) {
    std::fprintf(stderr, "rmk_emu: a launch from inside kernel %s (dynamic parallelism is not modelled)\n", g_kernel);
    std::abort();
  }
#if defined(RMK_EMU_ASAN) || defined(RMK_EMU_TSAN)
  static bool hooked = false;
  if (!hooked) {
    __sanitizer_set_death_callback(on_death);
    hooked = true;
  }
#endif
  g_in_launch = true;
  ensure_fibers(static_cast<int>(nthreads));
  g_n = static_cast<int>(nthreads);
  g_kernel = kernel;
  g_body = body;
  g_ctx = ctx;
  gridDim = grid;
  blockDim = block;
  g_block_parity = 0;
  tsan_release(boundary_sync(1));  // the host's writes before the launch
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = uint3{x, y, z};
        run_block();
        g_block_parity ^= 1;
      }
  tsan_acquire(boundary_sync(g_block_parity ^ 1));  // the kernel's writes before the host reads them
  blockIdx = uint3{0, 0, 0};
  threadIdx = uint3{0, 0, 0};
  g_in_launch = false;
  return cudaSuccess;
}


int lane_id() {
  if (g_current < 0) {
    std::fprintf(stderr, "rmk_emu: a warp operation outside a kernel\n");
    std::abort();
  }
  return g_fibers[g_current].linear % 32;
}

void syncthreads(const char* file, int line) {
  Fiber& f = g_fibers[g_current];
  f.state = kWaitBlock;
  f.file = file;
  f.line = line;
  f.what = "__syncthreads";
  f.parity = g_epoch & 1;
  tsan_release(barrier_sync(f.parity));
  to_scheduler(false);
  tsan_acquire(barrier_sync(f.parity));
}

void warp_publish(uint64_t value, unsigned mask, const char* what, const char* file, int line) {
  Fiber& f = g_fibers[g_current];
  const int w = f.linear / 32, lane = f.linear % 32;
  f.file = file;
  f.line = line;
  f.what = what;
  f.mask = mask;
  if (!((mask >> lane) & 1u)) fail(std::string(what) + " called by a lane that its mask does not name");
  g_slots[w][g_warp_buf[w]][lane] = value;
  f.state = kWaitWarp;
  to_scheduler(false);
}

unsigned active_mask(const char* file, int line) {
  Fiber& f = g_fibers[g_current];
  f.file = file;
  f.line = line;
  f.what = kActiveMask;
  f.mask = 0;
  f.state = kWaitWarp;
  to_scheduler(false);
  return static_cast<unsigned>(g_slots[f.linear / 32][f.read_buf][f.linear % 32]);
}

uint64_t warp_slot(int lane, unsigned mask, const char* what) {
  const Fiber& f = g_fibers[g_current];
  if (lane < 0 || lane >= 32 || !((mask >> lane) & 1u)) {
    fail(std::string(what) + " reads a lane that its mask does not name (undefined on the GPU)");
  }
  return g_slots[f.linear / 32][f.read_buf][lane];
}

}  // namespace rmk_emu

extern "C" cudaError_t cudaGetLastError(void) {
  const cudaError_t e = rmk_emu::g_last;
  rmk_emu::g_last = cudaSuccess;
  return e;
}

extern "C" cudaError_t cudaPeekAtLastError(void) { return rmk_emu::g_last; }

// Streams run in issue order (see launch): the memset is done when the next launch starts.
// Instrumented under AddressSanitizer: a count past the buffer is reported.
extern "C" cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t stream) {
  (void)stream;
  if (count != 0 && ptr == nullptr) return cudaErrorInvalidValue;
  std::memset(ptr, value, count);
  return cudaSuccess;
}

extern "C" const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unknown error (CUDA-on-CPU layer)";
  }
}
