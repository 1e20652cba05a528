// Compiles the loop-kernel header named by RMK_LOOPS_HEADER once per variant of cpu_simd.h:
// into simd_base, and (GCC on x86-64) into simd_v3 / simd_v4 under `#pragma GCC target`.
// Include it inside namespace rmkernels, after everything the loops use (no include guard:
// each kernel file includes it once, for its own loops header).
namespace simd_base {
#include RMK_LOOPS_HEADER
}  // namespace simd_base
#if RMK_SIMD_MULTIVERSION
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace simd_v3 {
#include RMK_LOOPS_HEADER
}  // namespace simd_v3
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace simd_v4 {
#include RMK_LOOPS_HEADER
}  // namespace simd_v4
#pragma GCC pop_options
#endif
#undef RMK_LOOPS_HEADER
