// Weight-only int8 linear layer for CPU decoding: y = x · (q · s)ᵀ + b, fp32 activations and sums.
#pragma once

#include <cstdint>

namespace dglm {

struct Int8LinearArgs {
  const float* x = nullptr;  // (M, K) row-major activations
  const int8_t* q = nullptr;  // (N, K) row-major int8 weights
  const float* scale = nullptr;  // (N,) per-output-row scale: w[n, k] = q[n, k] * scale[n]
  const float* bias = nullptr;  // (N,) or nullptr
  float* y = nullptr;  // (M, N) row-major output; must not overlap the inputs
  int64_t M = 0;
  int64_t K = 0;
  int64_t N = 0;
  int threads = 1;     // OpenMP threads over output rows (1 = the calling thread only)
  bool accumulate = false;  // y += the product instead of y = it (a residual connection)
  const char* isa = nullptr;  // force "avx512" / "avx2" / "scalar" (tests); nullptr = the best
  // More than 4 activation rows on AVX-512: 1 = each block of weights widened to fp32 once into
  // scratch and every tile of 4 rows reads it, 0 = widened in registers again for every tile,
  // -1 = whichever int8_linear_widening() found faster on this CPU. Same results either way.
  int widen = -1;
  // Activations rounded to bf16 and the products taken by AVX512-BF16 (int8_linear_bf16.cpp):
  // ~1.5x the multiply-add rate of the fp32 path where the batch makes the product compute-bound;
  // only on CPUs where int8_linear_bf16_supported() (the caller checks).
  bool bf16 = false;
};

bool int8_linear_bf16_supported();
int64_t int8_linear_bf16_scratch(int64_t M, int64_t K);
void int8_linear_bf16_blocks(const Int8LinearArgs& a, int64_t block_begin, int64_t block_end,
                             float* scratch);

// The AVX-512 path's choice for more than 4 activation rows, timed once on this CPU at first use:
// "buffer" or "registers" (see Int8LinearArgs::widen).
const char* int8_linear_widening();

// Which instruction set the kernel runs with on this CPU: "avx512", "avx2" or "scalar".
const char* int8_linear_isa();

// Whether this CPU can run the named instruction set's path ("avx512", "avx2", "scalar").
bool int8_linear_supports(const char* isa);

// Runs the product; the widest instruction set this CPU has is chosen at run time unless
// `a.isa` names one (which must be supported: see int8_linear_supports).
void int8_linear(const Int8LinearArgs& a);

// Output rows [4·block_begin, min(4·block_end, N)) of the product for every activation row, on
// the calling thread (no threading, `a.threads` ignored): the building block of fused kernels
// that split one product between their own threads. `wbuf` is scratch of at least
// int8_linear_scratch(a) floats (nullptr when that is 0).
constexpr int64_t kInt8LinearBlock = 4;  // output rows per block
int64_t int8_linear_scratch(const Int8LinearArgs& a);
void int8_linear_blocks(const Int8LinearArgs& a, int64_t block_begin, int64_t block_end,
                        float* wbuf);

}  // namespace dglm
