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

#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "rmk_emu/emu.h"

// Per OS thread: a cooperative launch runs each block on its own OS thread (see
// launch_cooperative); every other launch runs on the calling thread.
RMK_EMU_TLS uint3 threadIdx;
RMK_EMU_TLS uint3 blockIdx;
RMK_EMU_TLS dim3 blockDim;
RMK_EMU_TLS dim3 gridDim;

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
// What the host has issued (rmk_emu_counts): launches, cooperative launches, memsets.
int64_t g_issued[3] = {0, 0, 0};
namespace {

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;

enum State { kRunnable, kWaitBlock, kWaitWarp, kWaitGrid, kDone };
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

RMK_EMU_TLS Fiber* g_fibers = nullptr;
RMK_EMU_TLS int g_nfibers = 0;  // created
RMK_EMU_TLS int g_n = 0;        // threads of the running block
RMK_EMU_TLS int g_current = -1;
#ifdef RMK_EMU_ASM_SWITCH
RMK_EMU_TLS void* g_sched_sp = nullptr;
#else
RMK_EMU_TLS ucontext_t g_sched;
#endif
RMK_EMU_TLS const char* g_kernel = "";
RMK_EMU_TLS Body g_body = nullptr;
RMK_EMU_TLS void* g_ctx = nullptr;
RMK_EMU_TLS uint64_t g_slots[kMaxThreads / 32][2][32];
RMK_EMU_TLS int g_warp_buf[kMaxThreads / 32];
RMK_EMU_TLS int g_epoch = 0;
RMK_EMU_TLS bool g_in_launch = false;

#ifdef RMK_EMU_ASAN
RMK_EMU_TLS const void* g_main_bottom = nullptr;
RMK_EMU_TLS size_t g_main_size = 0;
RMK_EMU_TLS void* g_main_fake = nullptr;
#endif
#ifdef RMK_EMU_TSAN
RMK_EMU_TLS void* g_tsan_main = nullptr;
RMK_EMU_TLS char g_sync_boundary[2];  // by block parity: what block k releases, block k + 1 acquires
RMK_EMU_TLS char g_sync_barrier[2];
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
RMK_EMU_TLS int g_block_parity = 0;

// The grid barrier of a cooperative launch: every block (one OS thread each) arrives when all
// its threads wait at the same grid sync; the last arrival releases them all. A block that
// exits while others wait (or arrives after one exited) is a grid sync that not every thread
// of the grid reaches: reported, not a hang.
struct GridBarrier {
  std::mutex m;
  std::condition_variable cv;
  uint64_t blocks = 0, arrived = 0, finished = 0, generation = 0;
  char tsan_sync[2];  // by grid-sync parity: what every thread releases before it, acquires after
};
RMK_EMU_TLS GridBarrier* g_grid = nullptr;  // null outside a cooperative launch
RMK_EMU_TLS int g_grid_syncs = 0;           // grid syncs this block has passed
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
    case kWaitGrid: return "waiting at the grid sync";
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

// When every thread of the block waits at the same grid sync: this block arrives at the grid
// barrier (the OS thread blocks until every block of the grid has), then they all run on.
bool release_grid() {
  int waiting = 0, done = 0;
  for (int t = 0; t < g_n; ++t) {
    waiting += g_fibers[t].state == kWaitGrid;
    done += g_fibers[t].state == kDone;
  }
  if (waiting == 0) return false;
  if (waiting + done == g_n && done > 0) {
    fail("the grid sync is not reached by every thread of the block (some exited): a divergent grid barrier");
  }
  if (waiting != g_n) return false;
  for (int t = 1; t < g_n; ++t) {
    if (!same_site(g_fibers[t], g_fibers[0])) fail("threads of the block wait at different grid syncs");
  }
  {
    std::unique_lock<std::mutex> lock(g_grid->m);
    if (g_grid->finished > 0) fail("the grid sync is not reached by every block (a block of the grid has exited)");
    const uint64_t gen = g_grid->generation;
    if (++g_grid->arrived == g_grid->blocks) {
      g_grid->arrived = 0;
      ++g_grid->generation;
      g_grid->cv.notify_all();
    } else {
      while (gen == g_grid->generation) {
        if (g_grid->finished > 0) fail("the grid sync is not reached by every block (a block of the grid has exited)");
        g_grid->cv.wait(lock);
      }
    }
  }
  ++g_grid_syncs;
  for (int t = 0; t < g_n; ++t) g_fibers[t].state = kRunnable;
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
    if (release_grid()) continue;
    fail("deadlock: no barrier or warp operation can complete");
  }
}

// Fiber sets of the blocks of cooperative launches (one OS thread each), kept for the next
// cooperative launch: a fiber stack is mapped once and reused, as the calling thread's are.
struct FiberSet {
  Fiber* fibers;
  int n;
};
std::mutex g_pool_mutex;
std::vector<FiberSet> g_pool;

void borrow_fibers() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (g_pool.empty()) {
    g_fibers = nullptr;
    g_nfibers = 0;
  } else {
    g_fibers = g_pool.back().fibers;
    g_nfibers = g_pool.back().n;
    g_pool.pop_back();
  }
}

void return_fibers() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (g_fibers != nullptr) g_pool.push_back(FiberSet{g_fibers, g_nfibers});
  g_fibers = nullptr;
  g_nfibers = 0;
}

// The emulated device: 2 multiprocessors, each holding 2048 threads in at most 32 blocks
// (test_layer.py's cooperative tests expect these numbers). Only the cooperative launch's size
// limit and the occupancy query see it.
int device_sms() { return 2; }
int blocks_per_sm(uint64_t threads) {
  return static_cast<int>(std::max<uint64_t>(1, std::min<uint64_t>(32, 2048 / std::max<uint64_t>(threads, 1))));
}

bool valid_config(dim3 grid, dim3 block, size_t smem) {
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  return !(grid.x < 1 || grid.x > 0x7fffffffu || grid.y < 1 || grid.y > 65535 || grid.z < 1 || grid.z > 65535 ||
           block.x < 1 || block.x > 1024 || block.y < 1 || block.y > 1024 || block.z < 1 || block.z > 64 ||
           nthreads > 1024 || smem > 48 * 1024);
}

void enter_launch() {
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
}

}  // namespace

cudaError_t launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const char* kernel, Body body, void* ctx) {
  (void)stream;  // launches run in issue order: every stream is the same queue here
  if (!valid_config(grid, block, smem)) {
    g_last = cudaErrorInvalidConfiguration;
    return g_last;
  }
  enter_launch();
  ++g_issued[0];
  const int nthreads = static_cast<int>(uint64_t(block.x) * block.y * block.z);
  g_in_launch = true;
  ensure_fibers(nthreads);
  g_n = nthreads;
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

// A cooperative launch: every block of the grid is resident at once, as the CUDA runtime
// guarantees (a grid larger than the device holds is cudaErrorCooperativeLaunchTooLarge). Each
// block runs on its own OS thread with its own fibers and its own copy of the kernel's
// __shared__ variables (thread_local: see emu.h), so the blocks meet at the grid sync. The
// host's writes before the launch and the blocks' writes before its end are ordered by the
// threads' creation and join; a grid sync orders everything before it in every block before
// everything after it (the barrier's mutex for the OS threads; for ThreadSanitizer's fibers, a
// release before and an acquire after on the sync object of its parity).
cudaError_t launch_cooperative(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const char* kernel, Body body,
                               void* ctx) {
  (void)stream;
  if (!valid_config(grid, block, smem)) {
    g_last = cudaErrorInvalidConfiguration;
    return g_last;
  }
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  if (nblocks > uint64_t(device_sms()) * blocks_per_sm(nthreads)) {
    g_last = cudaErrorCooperativeLaunchTooLarge;
    return g_last;
  }
  enter_launch();
  ++g_issued[1];
  GridBarrier bar;
  bar.blocks = nblocks;
  std::vector<std::thread> threads;
  threads.reserve(nblocks);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        threads.emplace_back([&, x, y, z] {
          g_in_launch = true;
          borrow_fibers();
          ensure_fibers(static_cast<int>(nthreads));
          g_n = static_cast<int>(nthreads);
          g_kernel = kernel;
          g_body = body;
          g_ctx = ctx;
          gridDim = grid;
          blockDim = block;
          blockIdx = uint3{x, y, z};
          g_grid = &bar;
          g_grid_syncs = 0;
          g_block_parity = 0;
          tsan_release(boundary_sync(1));  // this thread's view of the host's writes, to its fibers
          run_block();
          tsan_acquire(boundary_sync(0));  // its fibers' writes, to the join
          {
            std::lock_guard<std::mutex> lock(bar.m);
            if (bar.arrived > 0) {
              fail("the grid sync is not reached by every block (this block exits while others wait at it)");
            }
            ++bar.finished;
            bar.cv.notify_all();
          }
          g_grid = nullptr;
          return_fibers();
          g_in_launch = false;
        });
      }
  for (auto& t : threads) t.join();
  return cudaSuccess;
}

void grid_sync(const char* file, int line) {
  if (g_grid == nullptr) {
    fail(std::string("a grid sync at ") + file + ":" + std::to_string(line) +
         " in a kernel not launched cooperatively (RMK_LAUNCH_COOPERATIVE)");
  }
  Fiber& f = g_fibers[g_current];
  f.state = kWaitGrid;
  f.file = file;
  f.line = line;
  f.what = "grid sync";
  void* sync = &g_grid->tsan_sync[g_grid_syncs & 1];
  tsan_release(sync);
  to_scheduler(false);
  tsan_acquire(sync);
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
  ++rmk_emu::g_issued[2];
  std::memset(ptr, value, count);
  return cudaSuccess;
}

extern "C" const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorCooperativeLaunchTooLarge: return "too many blocks in cooperative launch";
    default: return "unknown error (CUDA-on-CPU layer)";
  }
}

// The emulated device (see device_sms): device 0 only.
extern "C" cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

extern "C" cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = rmk_emu::device_sms(); return cudaSuccess;
    case cudaDevAttrCooperativeLaunch: *value = 1; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, const void* func, int block_size,
                                                                     size_t smem) {
  if (func == nullptr || block_size < 1 || block_size > 1024 || smem > 48 * 1024) return cudaErrorInvalidValue;
  *num_blocks = rmk_emu::blocks_per_sm(static_cast<uint64_t>(block_size));
  return cudaSuccess;
}

// For the tests (called like a shim): out[0..2] = the kernel launches, cooperative launches
// and memsets issued so far by this process.
extern "C" int64_t rmk_emu_counts(int64_t* out) {
  for (int i = 0; i < 3; ++i) out[i] = rmk_emu::g_issued[i];
  return 0;
}
