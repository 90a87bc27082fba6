// Weight-only int8 GEMV/GEMM for small batches (decode steps): every weight byte is read once per
// block of up to 4 activation rows, widened int8 → int32 → fp32 in registers and multiplied in
// fp32 (no bf16 rounding of the activations). Tiles: 4 output rows × up to 4 activation rows,
// 16 accumulators; K is walked in vectors (16 lanes AVX-512, 8 lanes AVX2) with a masked or
// scalar tail. The instruction set is chosen at run time, so one build runs on any x86-64 CPU.

#include "int8_linear.h"
#include "int8_linear_tiles.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

namespace dglm {
namespace {

using tiles::finish;
using tiles::kBatch;
using tiles::kRows;
using tiles::PF;

// Portable path: also the reference the vector paths are tested against (same summation order
// is not guaranteed; fp32 sums).
void tile_scalar(const Int8LinearArgs& a, int64_t n0, int64_t nr, int64_t m0, int64_t mr) {
  for (int64_t i = 0; i < nr; ++i) {
    const int8_t* w = a.q + (n0 + i) * a.K;
    for (int64_t j = 0; j < mr; ++j) {
      const float* x = a.x + (m0 + j) * a.K;
      float s = 0.f;
      for (int64_t k = 0; k < a.K; ++k) s += static_cast<float>(w[k]) * x[k];
      finish(a, n0 + i, m0 + j, s);
    }
  }
}

#if DGLM_X86
template <int NR, int MR>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void tile_avx512_t(const Int8LinearArgs& a,
                                                                 int64_t n0, int64_t m0) {
  __m512 acc[NR][MR];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MR; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t K = a.K;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 w[NR];
    if ((k & 63) == 0)
      for (int i = 0; i < NR; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(a.q + (n0 + i + PF) * K + k), _MM_HINT_T0);
    for (int i = 0; i < NR; ++i)
      w[i] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.q + (n0 + i) * K + k))));
    for (int j = 0; j < MR; ++j) {
      const __m512 x = _mm512_loadu_ps(a.x + (m0 + j) * K + k);
      for (int i = 0; i < NR; ++i) acc[i][j] = _mm512_fmadd_ps(w[i], x, acc[i][j]);
    }
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 w[NR];
    for (int i = 0; i < NR; ++i)
      w[i] = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, a.q + (n0 + i) * K + k)));
    for (int j = 0; j < MR; ++j) {
      const __m512 x = _mm512_maskz_loadu_ps(mask, a.x + (m0 + j) * K + k);
      for (int i = 0; i < NR; ++i) acc[i][j] = _mm512_fmadd_ps(w[i], x, acc[i][j]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MR; ++j) finish(a, n0 + i, m0 + j, _mm512_reduce_add_ps(acc[i][j]));
}

// The same tile from weights already widened to fp32 (wbuf: NR rows of K floats): used when
// a block of output rows meets more than 4 activation rows, so each weight is widened once.
template <int NR, int MR>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void tile_avx512_f32_t(
    const Int8LinearArgs& a, const float* wbuf, int64_t n0, int64_t m0) {
  __m512 acc[NR][MR];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MR; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t K = a.K;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 w[NR];
    for (int i = 0; i < NR; ++i) w[i] = _mm512_loadu_ps(wbuf + i * K + k);
    for (int j = 0; j < MR; ++j) {
      const __m512 x = _mm512_loadu_ps(a.x + (m0 + j) * K + k);
      for (int i = 0; i < NR; ++i) acc[i][j] = _mm512_fmadd_ps(w[i], x, acc[i][j]);
    }
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 w[NR];
    for (int i = 0; i < NR; ++i) w[i] = _mm512_maskz_loadu_ps(mask, wbuf + i * K + k);
    for (int j = 0; j < MR; ++j) {
      const __m512 x = _mm512_maskz_loadu_ps(mask, a.x + (m0 + j) * K + k);
      for (int i = 0; i < NR; ++i) acc[i][j] = _mm512_fmadd_ps(w[i], x, acc[i][j]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MR; ++j) finish(a, n0 + i, m0 + j, _mm512_reduce_add_ps(acc[i][j]));
}

// Widens `count` int8 weights to fp32, prefetching `ahead` bytes further on (the next blocks'
// rows: without it the widening waits on memory once the weights no longer fit in cache).
__attribute__((target("avx512f,avx512bw,avx512vl"))) void widen_avx512(const int8_t* q,
                                                                      int64_t count, float* out,
                                                                      int64_t ahead) {
  int64_t k = 0;
  for (; k + 16 <= count; k += 16) {
    if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(q + k + ahead), _MM_HINT_T0);
    _mm512_storeu_ps(out + k, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                  _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k)))));
  }
  for (; k < count; ++k) out[k] = static_cast<float>(q[k]);
}

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int NR, int MR>
__attribute__((target("avx2,fma"))) void tile_avx2_t(const Int8LinearArgs& a, int64_t n0,
                                                       int64_t m0) {
  __m256 acc[NR][MR];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MR; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t K = a.K;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 w[NR];
    for (int i = 0; i < NR; ++i)
      w[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.q + (n0 + i) * K + k))));
    for (int j = 0; j < MR; ++j) {
      const __m256 x = _mm256_loadu_ps(a.x + (m0 + j) * K + k);
      for (int i = 0; i < NR; ++i) acc[i][j] = _mm256_fmadd_ps(w[i], x, acc[i][j]);
    }
  }
  float tail[NR][MR] = {};
  for (; k < K; ++k)
    for (int i = 0; i < NR; ++i)
      for (int j = 0; j < MR; ++j)
        tail[i][j] += static_cast<float>(a.q[(n0 + i) * K + k]) * a.x[(m0 + j) * K + k];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MR; ++j) finish(a, n0 + i, m0 + j, hsum256(acc[i][j]) + tail[i][j]);
}

// Dispatch tables over the tile's (rows, batch) sizes, 1..4 each.
using TileFn = void (*)(const Int8LinearArgs&, int64_t, int64_t);

#define DGLM_ROW(FN, R) {&FN<R, 1>, &FN<R, 2>, &FN<R, 3>, &FN<R, 4>}
constexpr TileFn kAvx512[kRows][kBatch] = {
    DGLM_ROW(tile_avx512_t, 1), DGLM_ROW(tile_avx512_t, 2), DGLM_ROW(tile_avx512_t, 3),
    DGLM_ROW(tile_avx512_t, 4)};
using TileF32Fn = void (*)(const Int8LinearArgs&, const float*, int64_t, int64_t);
constexpr TileF32Fn kAvx512F32[kRows][kBatch] = {
    DGLM_ROW(tile_avx512_f32_t, 1), DGLM_ROW(tile_avx512_f32_t, 2),
    DGLM_ROW(tile_avx512_f32_t, 3), DGLM_ROW(tile_avx512_f32_t, 4)};
constexpr TileFn kAvx2[kRows][kBatch] = {DGLM_ROW(tile_avx2_t, 1), DGLM_ROW(tile_avx2_t, 2),
                                         DGLM_ROW(tile_avx2_t, 3), DGLM_ROW(tile_avx2_t, 4)};
#undef DGLM_ROW

enum class Isa { kScalar, kAvx2, kAvx512 };

Isa detect() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
  return Isa::kScalar;
}
#else
enum class Isa { kScalar, kAvx2, kAvx512 };
Isa detect() { return Isa::kScalar; }
#endif

// -1: not a known name.
int parse(const char* name) {
  if (!std::strcmp(name, "avx512")) return static_cast<int>(Isa::kAvx512);
  if (!std::strcmp(name, "avx2")) return static_cast<int>(Isa::kAvx2);
  if (!std::strcmp(name, "scalar")) return static_cast<int>(Isa::kScalar);
  return -1;
}

Isa isa() {
  static const Isa chosen = detect();
  return chosen;
}

void run_tile(const Int8LinearArgs& a, Isa which, int64_t n0, int64_t nr, int64_t m0,
              int64_t mr) {
#if DGLM_X86
  if (which == Isa::kAvx512) return kAvx512[nr - 1][mr - 1](a, n0, m0);
  if (which == Isa::kAvx2) return kAvx2[nr - 1][mr - 1](a, n0, m0);
#endif
  tile_scalar(a, n0, nr, m0, mr);
}

}  // namespace

const char* int8_linear_isa() {
#if DGLM_X86
  switch (isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
#else
  return "scalar";
#endif
}

bool int8_linear_supports(const char* name) {
  const int want = parse(name);
  return want >= 0 && want <= static_cast<int>(isa());
}

namespace {

void blocks(const Int8LinearArgs& a, Isa which, int64_t b0, int64_t b1, float* wbuf);

// Times both ways of serving 8 activation rows on a 256 × 1024 matrix (in cache, best of 5):
// widening in registers per tile pays the conversion once per 4 rows, the buffer pays stores
// and loads; which wins depends on the core (measured both ways on different x86 servers).
bool time_buffer_faster() {
#if DGLM_X86
  if (isa() != Isa::kAvx512) return false;
  constexpr int64_t N = 256, K = 1024, M = 8;
  std::vector<int8_t> q(N * K);
  std::vector<float> x(M * K), y(M * N), scale(N, 1.f / 64), wbuf(kRows * K);
  for (int64_t i = 0; i < N * K; ++i) q[i] = static_cast<int8_t>((i * 37) % 255 - 127);
  for (int64_t i = 0; i < M * K; ++i) x[i] = static_cast<float>((i * 13) % 17) - 8.f;
  Int8LinearArgs a;
  a.x = x.data();
  a.q = q.data();
  a.scale = scale.data();
  a.bias = nullptr;
  a.y = y.data();
  a.M = M;
  a.K = K;
  a.N = N;
  double best[2] = {1e30, 1e30};
  for (int rep = 0; rep < 5; ++rep)
    for (int w = 0; w < 2; ++w) {
      a.widen = w;
      const auto t0 = std::chrono::steady_clock::now();
      blocks(a, Isa::kAvx512, 0, N / kRows, wbuf.data());
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best[w] = std::min(best[w], dt);
    }
  return best[1] < best[0];
#else
  return false;
#endif
}

bool buffer_is_faster() {
  static const bool faster = time_buffer_faster();
  return faster;
}

Isa chosen_isa(const Int8LinearArgs& a) {
  return a.isa ? static_cast<Isa>(std::max(0, parse(a.isa))) : isa();
}

// With more than one tile of activation rows (AVX-512), each block's weights are widened once
// into fp32 scratch (4 × K floats, L1/L2-resident) and every tile reads that.
bool widens(const Int8LinearArgs& a, Isa which) {
  if (!DGLM_X86 || which != Isa::kAvx512 || a.M <= kBatch) return false;
  return a.widen < 0 ? buffer_is_faster() : a.widen > 0;
}

void blocks(const Int8LinearArgs& a, Isa which, int64_t b0, int64_t b1, float* wbuf) {
  // Each block of 4 output rows walks every activation row in tiles of 4: the block's weights
  // (4 × K bytes) stay in L1 while the activations are reused from L1/L2.
  const bool widen = widens(a, which);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * kRows;
    const int64_t nr = std::min<int64_t>(kRows, a.N - n0);
#if DGLM_X86
    if (widen) {
      widen_avx512(a.q + n0 * a.K, nr * a.K, wbuf, PF * a.K);
      for (int64_t m0 = 0; m0 < a.M; m0 += kBatch)
        kAvx512F32[nr - 1][std::min<int64_t>(kBatch, a.M - m0) - 1](a, wbuf, n0, m0);
      continue;
    }
#endif
    for (int64_t m0 = 0; m0 < a.M; m0 += kBatch)
      run_tile(a, which, n0, nr, m0, std::min<int64_t>(kBatch, a.M - m0));
  }
}

}  // namespace

const char* int8_linear_widening() { return buffer_is_faster() ? "buffer" : "registers"; }

int64_t int8_linear_scratch(const Int8LinearArgs& a) {
  if (a.bf16) return int8_linear_bf16_scratch(a.M, a.K);
  return widens(a, chosen_isa(a)) ? kRows * a.K : 0;
}

void int8_linear_blocks(const Int8LinearArgs& a, int64_t block_begin, int64_t block_end,
                        float* wbuf) {
  if (a.bf16) return int8_linear_bf16_blocks(a, block_begin, block_end, wbuf);
  blocks(a, chosen_isa(a), block_begin, block_end, wbuf);
}

void int8_linear(const Int8LinearArgs& a) {
  const Isa which = chosen_isa(a);
  const int64_t nblocks = (a.N + kRows - 1) / kRows;
  const int threads = std::max(1, a.threads);
  const int64_t scratch = int8_linear_scratch(a);
#pragma omp parallel num_threads(threads) if (threads > 1 && nblocks > 8)
  {
    std::vector<float> wbuf(scratch);
    if (a.bf16) {  // one contiguous share per thread: the activations are converted once each
      int tid = 0, T = 1;
#ifdef _OPENMP
      tid = omp_get_thread_num();
      T = omp_get_num_threads();
#endif
      const int64_t lo = nblocks * tid / T, hi = nblocks * (tid + 1) / T;
      if (lo < hi) int8_linear_bf16_blocks(a, lo, hi, wbuf.data());
    } else {
#pragma omp for schedule(static)
      for (int64_t b = 0; b < nblocks; ++b) blocks(a, which, b, b + 1, wbuf.data());
    }
  }
}

}  // namespace dglm
