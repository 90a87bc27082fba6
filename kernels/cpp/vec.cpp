#include "vec.h"

#include <cmath>

namespace dglm {

// 64 partial sums (four 16-lane vectors with AVX-512): four independent FMA chains instead of
// one, which a single-accumulator reduction would wait on.
DGLM_CLONES float vec_dot(const float* a, const float* b, int64_t n) {
  constexpr int64_t W = 64;
  float acc[W] = {};
  int64_t i = 0;
  for (; i + W <= n; i += W) {
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = i; j < n; ++j) s += a[j] * b[j];
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < W; ++j) s += acc[j];
  return s;
}

DGLM_CLONES void vec_axpy(float* y, float alpha, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// Four outputs at a time: four independent accumulator chains over the shared row of X.
DGLM_CLONES void vec_gemm_nt(const float* w, const float* x, const float* b, float* y,
                             int64_t rows, int64_t out, int64_t in) {
  constexpr int64_t V = 16;
  int64_t o = 0;
  for (; o + 4 <= out; o += 4) {
    const float* w0 = w + o * in;
    const float *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * in;
      float a0[V] = {}, a1[V] = {}, a2[V] = {}, a3[V] = {};
      int64_t i = 0;
      for (; i + V <= in; i += V) {
#pragma omp simd
        for (int64_t j = 0; j < V; ++j) {
          const float xv = xr[i + j];
          a0[j] += w0[i + j] * xv;
          a1[j] += w1[i + j] * xv;
          a2[j] += w2[i + j] * xv;
          a3[j] += w3[i + j] * xv;
        }
      }
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
      for (; i < in; ++i) {
        s0 += w0[i] * xr[i];
        s1 += w1[i] * xr[i];
        s2 += w2[i] * xr[i];
        s3 += w3[i] * xr[i];
      }
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t j = 0; j < V; ++j) {
        s0 += a0[j];
        s1 += a1[j];
        s2 += a2[j];
        s3 += a3[j];
      }
      float* yr = y + r * out + o;
      yr[0] = s0 + (b ? b[o] : 0.f);
      yr[1] = s1 + (b ? b[o + 1] : 0.f);
      yr[2] = s2 + (b ? b[o + 2] : 0.f);
      yr[3] = s3 + (b ? b[o + 3] : 0.f);
    }
  }
  for (; o < out; ++o)
    for (int64_t r = 0; r < rows; ++r) {
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < in; ++i) s += w[o * in + i] * x[r * in + i];
      y[r * out + o] = s + (b ? b[o] : 0.f);
    }
}

DGLM_CLONES void vec_gemm_nn(const float* w, const float* g, float* y, int64_t rows,
                             int64_t out, int64_t in) {
  for (int64_t i = 0; i < rows * in; ++i) y[i] = 0.f;
  for (int64_t o = 0; o < out; ++o) {
    const float* wo = w + o * in;
    for (int64_t r = 0; r < rows; ++r) {
      const float go = g[r * out + o];
      if (go == 0.f) continue;
      float* yr = y + r * in;
#pragma omp simd
      for (int64_t i = 0; i < in; ++i) yr[i] += go * wo[i];
    }
  }
}

DGLM_CLONES void vec_rms_norm(const float* x, const float* w, float* y, int64_t n, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * r * w[i];
}

}  // namespace dglm
