// Small fp32 vector loops shared by the fused CPU kernels, each compiled for AVX-512, AVX2 and
// baseline x86-64 (the loader picks one). fp32 arithmetic; sums in vector lanes, then reduced.
#pragma once

#include <cstdint>

// Marks a function to be compiled for AVX-512, AVX2 and baseline x86-64, the loader picking one
// (GCC on x86-64; elsewhere a plain function).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DGLM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DGLM_CLONES
#endif

namespace dglm {

float vec_dot(const float* a, const float* b, int64_t n);               // Σ a·b
void vec_axpy(float* y, float alpha, const float* x, int64_t n);        // y += α·x
// Y (rows, out) = X (rows, in) · Wᵀ + b, W (out, in); X and Y rows `in` / `out` apart; b may be
// nullptr. Four weight rows at a time meet every row of X while they sit in L1.
void vec_gemm_nt(const float* w, const float* x, const float* b, float* y, int64_t rows,
                 int64_t out, int64_t in);
// Y (rows, in) = G (rows, out) · W, W (out, in): each weight row is read once for every row.
void vec_gemm_nn(const float* w, const float* g, float* y, int64_t rows, int64_t out, int64_t in);
// y = x · rsqrt(mean(x²) + ε) · w
void vec_rms_norm(const float* x, const float* w, float* y, int64_t n, float eps);

}  // namespace dglm
