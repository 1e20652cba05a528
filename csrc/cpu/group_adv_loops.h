// Loop kernels of the group advantages (group_adv.cpp), compiled once per variant of cpu_simd.h
// (simd_variants.h): no include guard, no includes. Masks arrive as bytes, tested with `!= 0`.

// out[t] = v where the mask is set, else 0: the [B, T] broadcast of one row. kUnit: mask
// position stride 1.
template <bool kUnit, typename acc>
void broadcast_row(const uint8_t* mr, int64_t sm, int64_t T, acc v, acc* __restrict__ out) {
  if (kUnit) sm = 1;
#pragma omp simd
  for (int64_t t = 0; t < T; ++t) {
    out[t] = mr[t * sm] != 0 ? v : acc(0);
  }
}

// Number of set mask bytes of one row (opo's length).
template <bool kUnit>
int64_t count_row(const uint8_t* mr, int64_t sm, int64_t T) {
  if (kUnit) sm = 1;
  int64_t c = 0;
#pragma omp simd reduction(+ : c)
  for (int64_t t = 0; t < T; ++t) {
    c += mr[t * sm] != 0 ? 1 : 0;
  }
  return c;
}
