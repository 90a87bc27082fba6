// Shared by the int8 linear kernel's two modes (int8_linear.cpp: fp32 activations,
// int8_linear_bf16.cpp: bf16 activations): the tile geometry, the prefetch distance and the
// epilogue that scales, biases and stores (or accumulates) one output.
#pragma once

#include <cstdint>

#include "int8_linear.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DGLM_X86 1
#else
#define DGLM_X86 0
#endif

namespace dglm {
namespace tiles {

constexpr int kRows = static_cast<int>(kInt8LinearBlock);  // output rows per tile
constexpr int kBatch = 4;  // activation rows per tile
constexpr int PF = 8;      // weight rows prefetched ahead

inline void finish(const Int8LinearArgs& a, int64_t n, int64_t m, float sum) {
  float v = sum * a.scale[n];
  if (a.bias) v += a.bias[n];
  float& y = a.y[m * a.N + n];
  y = a.accumulate ? y + v : v;
}

}  // namespace tiles
}  // namespace dglm
