// The int8 linear kernel's bf16-activation mode (Int8LinearArgs::bf16): each activation row is
// rounded to bf16 once per call, the int8 weights are converted to bf16 (exactly: |q| ≤ 127 fits
// bf16's 8-bit significand) and the products are taken by AVX512-BF16's vdpbf16ps, 32
// multiply-adds per instruction against fp32 FMA's 16, with fp32 sums. Every row's sum runs in
// the same order whatever the number of rows, so a row's result is the same alone or batched.
// Layout: K is walked in chunks of 32 (the weights and activations converted the same way, so
// vdpbf16ps pairs the same k); a tail chunk is zero-padded on both sides.

#include <algorithm>

#include "int8_linear.h"
#include "int8_linear_tiles.h"

namespace dglm {
namespace {

using tiles::finish;
using tiles::kBatch;
using tiles::kRows;
using tiles::PF;

inline int64_t padded(int64_t K) { return (K + 31) / 32 * 32; }

#if DGLM_X86
#define DGLM_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

DGLM_BF16 inline __m512bh w32(const int8_t* p, int64_t left) {
  __m128i lo8, hi8;
  if (left >= 32) {
    lo8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    hi8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16));
  } else {  // tail: zeros past the row's end
    const int64_t l = std::min<int64_t>(left, 16), h = std::max<int64_t>(left - 16, 0);
    lo8 = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << l) - 1u), p);
    hi8 = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << h) - 1u), p + 16);
  }
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo8));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi8));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

// x (M, K) fp32 → xb (M, Kp) bf16 bits, zero-padded.
DGLM_BF16 void convert_x(const float* x, int64_t M, int64_t K, uint16_t* xb) {
  const int64_t Kp = padded(K);
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * K;
    uint16_t* o = xb + m * Kp;
    for (int64_t k = 0; k < Kp; k += 32) {
      const int64_t l = std::clamp<int64_t>(K - k, 0, 16), h = std::clamp<int64_t>(K - k - 16, 0, 16);
      const __m512 lo = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << l) - 1u), r + k);
      const __m512 hi = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << h) - 1u), r + k + 16);
      _mm512_storeu_si512(o + k, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  }
}

// nr weight rows from n0 → wb (nr, Kp) bf16 bits, prefetching the next blocks.
DGLM_BF16 void convert_w(const Int8LinearArgs& a, int64_t n0, int64_t nr, uint16_t* wb) {
  const int64_t K = a.K, Kp = padded(K);
  for (int64_t i = 0; i < nr; ++i) {
    const int8_t* q = a.q + (n0 + i) * K;
    for (int64_t k = 0; k < Kp; k += 32) {
      if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(q + k + PF * K), _MM_HINT_T0);
      _mm512_storeu_si512(wb + i * Kp + k, (__m512i)w32(q + k, K - k));
    }
  }
}

// Weights converted in registers (few activation rows).
template <int NR, int MR>
DGLM_BF16 void tile_reg(const Int8LinearArgs& a, const uint16_t* xb, int64_t n0, int64_t m0) {
  const int64_t K = a.K, Kp = padded(K);
  __m512 acc[NR][MR];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < Kp; k += 32) {
    if ((k & 63) == 0)
      for (int i = 0; i < NR; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(a.q + (n0 + i + PF) * K + k), _MM_HINT_T0);
    __m512bh w[NR];
    for (int i = 0; i < NR; ++i) w[i] = w32(a.q + (n0 + i) * K + k, K - k);
    for (int j = 0; j < MR; ++j) {
      const __m512bh x = (__m512bh)_mm512_loadu_si512(xb + (m0 + j) * Kp + k);
      for (int i = 0; i < NR; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], w[i], x);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MR; ++j) finish(a, n0 + i, m0 + j, _mm512_reduce_add_ps(acc[i][j]));
}

// Weights already converted into wb (NR rows of Kp).
template <int NR, int MR>
DGLM_BF16 void tile_buf(const Int8LinearArgs& a, const uint16_t* wb, const uint16_t* xb, int64_t n0,
                        int64_t m0) {
  const int64_t Kp = padded(a.K);
  __m512 acc[NR][MR];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < Kp; k += 32) {
    __m512bh w[NR];
    for (int i = 0; i < NR; ++i) w[i] = (__m512bh)_mm512_loadu_si512(wb + i * Kp + k);
    for (int j = 0; j < MR; ++j) {
      const __m512bh x = (__m512bh)_mm512_loadu_si512(xb + (m0 + j) * Kp + k);
      for (int i = 0; i < NR; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], w[i], x);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MR; ++j) finish(a, n0 + i, m0 + j, _mm512_reduce_add_ps(acc[i][j]));
}

using RegFn = void (*)(const Int8LinearArgs&, const uint16_t*, int64_t, int64_t);
using BufFn = void (*)(const Int8LinearArgs&, const uint16_t*, const uint16_t*, int64_t, int64_t);
#define DGLM_ROW(FN, R) {&FN<R, 1>, &FN<R, 2>, &FN<R, 3>, &FN<R, 4>}
constexpr RegFn kReg[kRows][kBatch] = {DGLM_ROW(tile_reg, 1), DGLM_ROW(tile_reg, 2),
                                       DGLM_ROW(tile_reg, 3), DGLM_ROW(tile_reg, 4)};
constexpr BufFn kBuf[kRows][kBatch] = {DGLM_ROW(tile_buf, 1), DGLM_ROW(tile_buf, 2),
                                       DGLM_ROW(tile_buf, 3), DGLM_ROW(tile_buf, 4)};
#undef DGLM_ROW
#endif

}  // namespace

bool int8_linear_bf16_supported() {
#if DGLM_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// Scratch in floats: the converted activations (M × Kp bf16) and one block of weights.
int64_t int8_linear_bf16_scratch(int64_t M, int64_t K) {
  return (M * padded(K) + kRows * padded(K)) / 2 + 32;
}

// Output-row blocks [b0, b1) in bf16 mode, on the calling thread; `scratch` as sized above.
void int8_linear_bf16_blocks(const Int8LinearArgs& a, int64_t b0, int64_t b1, float* scratch) {
#if DGLM_X86
  uint16_t* xb = reinterpret_cast<uint16_t*>(scratch);
  uint16_t* wb = xb + a.M * padded(a.K);
  convert_x(a.x, a.M, a.K, xb);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * kRows;
    const int64_t nr = std::min<int64_t>(kRows, a.N - n0);
    if (a.M > kBatch) {  // convert the block once for every tile of 4 rows (measured faster)
      convert_w(a, n0, nr, wb);
      for (int64_t m0 = 0; m0 < a.M; m0 += kBatch)
        kBuf[nr - 1][std::min<int64_t>(kBatch, a.M - m0) - 1](a, wb, xb, n0, m0);
    } else {
      kReg[nr - 1][a.M - 1](a, xb, n0, 0);
    }
  }
#else
  (void)a, (void)b0, (void)b1, (void)scratch;
#endif
}

}  // namespace dglm
