// Loop kernels of the group advantages (group_adv.cpp), compiled once per variant of cpu_simd.h
// (simd_variants.h): no include guard, no includes. Masks arrive as bytes, tested with `!= 0`.

// The smallest and the largest id (the range check of group_ids).
inline void id_range(const int64_t* ids, int64_t B, int64_t* lo, int64_t* hi) {
  int64_t mn = ids[0], mx = ids[0];
#pragma omp simd reduction(min : mn) reduction(max : mx)
  for (int64_t b = 0; b < B; ++b) {
    mn = ids[b] < mn ? ids[b] : mn;
    mx = ids[b] > mx ? ids[b] : mx;
  }
  *lo = mn;
  *hi = mx;
}

// Number of nonzero scores (gpg; NaN counts, as torch.count_nonzero).
template <typename acc>
int64_t count_nonzero(const acc* r, int64_t B) {
  int64_t c = 0;
#pragma omp simd reduction(+ : c)
  for (int64_t b = 0; b < B; ++b) {
    c += r[b] != acc(0) ? 1 : 0;
  }
  return c;
}

// seq[b] = the value of response b from its group's coefficients (group_adv::apply), rounded
// once to acc, b in [lo, hi) (vectorised: gathers of the coefficients).
template <typename acc>
void seq_values(const GroupRows<acc>& v, int64_t lo, int64_t hi) {
  acc* __restrict__ seq = v.seq;
#pragma omp simd
  for (int64_t b = lo; b < hi; ++b) {
    const int64_t g = v.ids[b];
    seq[b] = static_cast<acc>(group_adv::apply(static_cast<double>(v.r[b]), v.a[g], v.c[g], v.d[g], v.k));
  }
}

// The flat elements [i0, i1) of the [B, T] output: out[i - i0] = seq[b] of row b = i / T where
// mask[b, t] is set, else 0. kUnit: mask position stride 1. A span may start and end inside a
// row (the streaming tiles of group_adv.cpp).
template <bool kUnit, typename acc>
void broadcast_span(const acc* seq, const uint8_t* mask, int64_t sm0, int64_t sm1, int64_t T, int64_t i0, int64_t i1,
                    acc* __restrict__ out) {
  if (kUnit) sm1 = 1;
  if (T == 1) {  // one column ([B] scores): a flat loop over the rows
#pragma omp simd
    for (int64_t b = i0; b < i1; ++b) {
      out[b - i0] = mask[b * sm0] != 0 ? seq[b] : acc(0);
    }
    return;
  }
  int64_t b = i0 / T, t0 = i0 - b * T;
  for (int64_t i = i0; i < i1; ++b, t0 = 0) {
    const int64_t n = (T - t0 < i1 - i) ? T - t0 : i1 - i;
    const uint8_t* mr = mask + b * sm0 + t0 * sm1;
    const acc x = seq[b];
    acc* o = out + (i - i0);
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) {
      o[t] = mr[t * sm1] != 0 ? x : acc(0);
    }
    i += n;
  }
}

// Number of set mask bytes of rows [lo, hi) (opo's lengths), as doubles.
template <bool kUnit>
void count_rows(const uint8_t* mask, int64_t sm0, int64_t sm1, int64_t T, int64_t lo, int64_t hi, double* len) {
  if (kUnit) sm1 = 1;
  for (int64_t b = lo; b < hi; ++b) {
    const uint8_t* mr = mask + b * sm0;
    int64_t c = 0;
#pragma omp simd reduction(+ : c)
    for (int64_t t = 0; t < T; ++t) {
      c += mr[t * sm1] != 0 ? 1 : 0;
    }
    len[b] = static_cast<double>(c);
  }
}
