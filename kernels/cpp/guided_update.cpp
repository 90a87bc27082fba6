// Fused guided step on CPU; the math is in the docstring of kernels/guided_update.py.
//
// Per row the work is two sweeps over D, the fewest the norms allow:
//   sweep 1 (reduce): v = v_u + w·(v_c − v_u);  x = α·z − σ·v  (stored in x0)
//                     ss = ‖x‖²,  p_k = W_k·x                     (double accumulators)
//   scalars:          s1 = √D / max(√ss, ε)  (1 without rescale),  n = max(s1·√ss, ε) = ‖x̂0‖
//                     q_k = s1·p_k / n = W_k·u,  ℓ_k = q_k + b_k,  r_k = s_k·(sigmoid(ℓ_k) − y_k)
//                     g_u·u = Σ_k r_k·q_k  (no sweep: g_u = Σ_k r_k·W_k)
//                     x̂0 − σ²·g = a·x + Σ_k β_k·W_k  with  a = s1·(1 + σ²·(g_u·u)/n²),
//                                                           β_k = −σ²·r_k / n
//                     ‖a·x + Σ β_k W_k‖² = a²·ss + 2a·Σ_k β_k·p_k + Σ_jk β_j·β_k·(W_j·W_k)
//                     s2 = √D / max(‖·‖, ε)  (1 without rescale or without probes)
//   sweep 2 (write):  x0 = s2·(a·x + Σ_k β_k·W_k);  z' = c0·x0 + cz·z + n·ξ
// The Gram matrix W_j·W_k is computed once per call; in double the expansion of the second norm
// loses nothing unless the probe step nearly cancels x (where the fp32 reference is noise anyway).
// K ≤ kMaxFusedK is unrolled at compile time; larger K takes a generic path that measures the
// second norm with an extra sweep.

#include "guided_update.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace dglm {
namespace {

constexpr double kEps = 1e-12;  // the reference's clamp_min on norms
constexpr int kMaxFusedK = 4;
// Rows are split across OpenMP threads only above this much work (B·D·(K+2) element-ops);
// below it a fork/join costs more than the row loop.
constexpr int64_t kParallelWork = int64_t{1} << 18;

enum Coef { kAlpha = 0, kSigma = 1, kX0 = 2, kZ = 3, kNoise = 4 };

// Σ_i a[i]·b[i] in double.
double dot(const float* __restrict a, const float* __restrict b, int64_t d) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += double(a[i]) * double(b[i]);
  return s;
}

// Sweep 1: x = α·z − σ·v written to x; returns ‖x‖² and p[k] = W_k·x for k < KT.
// Elementwise ops in fp32 in the reference's order, so x matches it bit for bit.
template <bool kCfg, int KT>
double reduce_sweep(const float* __restrict z, const float* __restrict vc,
                    const float* __restrict vu, float w, float alpha, float sigma,
                    const float* __restrict W, int64_t d, float* __restrict x, double* p) {
  static_assert(KT <= 4, "reduce_sweep unrolls at most 4 probes");
  const float* __restrict w0 = KT > 0 ? W : nullptr;
  const float* __restrict w1 = KT > 1 ? W + d : nullptr;
  const float* __restrict w2 = KT > 2 ? W + 2 * d : nullptr;
  const float* __restrict w3 = KT > 3 ? W + 3 * d : nullptr;
  double ss = 0.0, p0 = 0.0, p1 = 0.0, p2 = 0.0, p3 = 0.0;
#pragma omp simd reduction(+ : ss, p0, p1, p2, p3)
  for (int64_t i = 0; i < d; ++i) {
    const float v = kCfg ? vu[i] + w * (vc[i] - vu[i]) : vc[i];
    const float xi = alpha * z[i] - sigma * v;
    x[i] = xi;
    const double xd = xi;
    ss += xd * xd;
    if constexpr (KT > 0) p0 += double(w0[i]) * xd;
    if constexpr (KT > 1) p1 += double(w1[i]) * xd;
    if constexpr (KT > 2) p2 += double(w2[i]) * xd;
    if constexpr (KT > 3) p3 += double(w3[i]) * xd;
  }
  const double pk[4] = {p0, p1, p2, p3};
  for (int k = 0; k < KT; ++k) p[k] = pk[k];
  return ss;
}

// Sweep 2: x ← A·x + Σ_k Bk[k]·W_k;  zn = c0·x + cz·z + cn·ξ.
template <int KT>
void write_sweep(const float* __restrict z, const float* __restrict noise,
                 const float* __restrict W, int64_t d, float A, const float* Bk, float c0,
                 float cz, float cn, float* __restrict x, float* __restrict zn) {
  static_assert(KT <= 4, "write_sweep unrolls at most 4 probes");
  const float* __restrict w0 = KT > 0 ? W : nullptr;
  const float* __restrict w1 = KT > 1 ? W + d : nullptr;
  const float* __restrict w2 = KT > 2 ? W + 2 * d : nullptr;
  const float* __restrict w3 = KT > 3 ? W + 3 * d : nullptr;
  const float b0 = KT > 0 ? Bk[0] : 0.0f, b1 = KT > 1 ? Bk[1] : 0.0f;
  const float b2 = KT > 2 ? Bk[2] : 0.0f, b3 = KT > 3 ? Bk[3] : 0.0f;
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) {
    float xi = A * x[i];
    if constexpr (KT > 0) xi += b0 * w0[i];
    if constexpr (KT > 1) xi += b1 * w1[i];
    if constexpr (KT > 2) xi += b2 * w2[i];
    if constexpr (KT > 3) xi += b3 * w3[i];
    x[i] = xi;
    zn[i] = c0 * xi + cz * z[i] + cn * noise[i];
  }
}

// Generic-K middle sweeps: x ← a·x + Σ_k β_k·W_k; returns the new ‖x‖².
double combine_sweep(const float* __restrict W, int64_t d, int64_t K, float a,
                     const float* beta, float* __restrict x) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) x[i] *= a;
  for (int64_t k = 0; k < K; ++k) {
    const float* __restrict wk = W + k * d;
    const float bk = beta[k];
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) x[i] += bk * wk[i];
  }
  return dot(x, x, d);
}

struct ProbeStep {
  double a;  // coefficient on x
  double n;  // ‖x̂0‖ after the first rescale
};

// Probe logits and the coefficients of x̂0 − σ²·g = a·x + Σ_k beta[k]·W_k.
ProbeStep probe_step(const GuidedUpdateArgs& g, int64_t b, double ss, double s1, const double* p,
                     double* beta) {
  const int64_t K = g.K;
  const double sigma = g.coefs[b * 5 + kSigma];
  const double sig2 = sigma * sigma;
  const double n = std::max(s1 * std::sqrt(ss), kEps);
  double gu_dot_u = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const double q = s1 * p[k] / n;  // W_k·u
    const double logit = q + double(g.probe_bias[k]);
    const double r = double(g.probe_scale[b * K + k]) *
                     (1.0 / (1.0 + std::exp(-logit)) - double(g.probe_target[b * K + k]));
    gu_dot_u += r * q;
    beta[k] = -sig2 * r / n;
  }
  return {s1 * (1.0 + sig2 * gu_dot_u / (n * n)), n};
}

double rescale_factor(double d, double norm2) {
  return std::sqrt(d) / std::max(std::sqrt(std::max(norm2, 0.0)), kEps);
}

// One row, K = KT fixed at compile time. gram: (KT, KT) W_j·W_k, only read when rescaling.
template <bool kCfg, int KT>
void row_fused(const GuidedUpdateArgs& g, const double* gram, int64_t b) {
  const int64_t d = g.D;
  const float* c = g.coefs + b * 5;
  const float* z = g.z + b * d;
  float* x = g.x0 + b * d;
  double p[KT > 0 ? KT : 1];
  const double ss =
      reduce_sweep<kCfg, KT>(z, g.v_cond + b * d, kCfg ? g.v_uncond + b * d : nullptr,
                             kCfg ? g.cfg_scale[b] : 1.0f, c[kAlpha], c[kSigma],
                             g.probe_weight, d, x, p);
  const double s1 = g.rescale ? rescale_factor(double(d), ss) : 1.0;
  double A = s1;
  float Bk[KT > 0 ? KT : 1];
  if constexpr (KT > 0) {
    double beta[KT];
    const ProbeStep ps = probe_step(g, b, ss, s1, p, beta);
    double s2 = 1.0;
    if (g.rescale) {
      double norm2 = ps.a * ps.a * ss;
      for (int j = 0; j < KT; ++j) {
        norm2 += 2.0 * ps.a * beta[j] * p[j];
        for (int k = 0; k < KT; ++k) norm2 += beta[j] * beta[k] * gram[j * KT + k];
      }
      s2 = rescale_factor(double(d), norm2);
    }
    A = s2 * ps.a;
    for (int k = 0; k < KT; ++k) Bk[k] = float(s2 * beta[k]);
  }
  write_sweep<KT>(z, g.noise + b * d, g.probe_weight, d, float(A), Bk, c[kX0], c[kZ],
                  c[kNoise], x, g.z_next + b * d);
}

// One row, any K: a third sweep measures the second norm directly.
template <bool kCfg>
void row_generic(const GuidedUpdateArgs& g, const double* /*gram*/, int64_t b) {
  const int64_t d = g.D, K = g.K;
  const float* c = g.coefs + b * 5;
  const float* z = g.z + b * d;
  float* x = g.x0 + b * d;
  const double ss =
      reduce_sweep<kCfg, 0>(z, g.v_cond + b * d, kCfg ? g.v_uncond + b * d : nullptr,
                            kCfg ? g.cfg_scale[b] : 1.0f, c[kAlpha], c[kSigma], nullptr, d, x,
                            nullptr);
  std::vector<double> p(K), beta(K);
  std::vector<float> betaf(K);
  for (int64_t k = 0; k < K; ++k) p[k] = dot(g.probe_weight + k * d, x, d);
  const double s1 = g.rescale ? rescale_factor(double(d), ss) : 1.0;
  const ProbeStep ps = probe_step(g, b, ss, s1, p.data(), beta.data());
  for (int64_t k = 0; k < K; ++k) betaf[k] = float(beta[k]);
  const double norm2 = combine_sweep(g.probe_weight, d, K, float(ps.a), betaf.data(), x);
  const double s2 = g.rescale ? rescale_factor(double(d), norm2) : 1.0;
  write_sweep<0>(z, g.noise + b * d, nullptr, d, float(s2), nullptr, c[kX0], c[kZ], c[kNoise], x,
                 g.z_next + b * d);
}

using RowFn = void (*)(const GuidedUpdateArgs&, const double*, int64_t);

template <bool kCfg>
RowFn pick_row(int64_t K) {
  switch (K) {
    case 0: return row_fused<kCfg, 0>;
    case 1: return row_fused<kCfg, 1>;
    case 2: return row_fused<kCfg, 2>;
    case 3: return row_fused<kCfg, 3>;
    case 4: return row_fused<kCfg, 4>;
    default: return row_generic<kCfg>;
  }
}

}  // namespace

void guided_update(const GuidedUpdateArgs& g) {
  static_assert(kMaxFusedK == 4, "pick_row unrolls K = 0..4");
  if (g.B == 0) return;
  const RowFn row = g.v_uncond ? pick_row<true>(g.K) : pick_row<false>(g.K);

  // (K, K) W_j·W_k for the second norm of the fused path.
  std::array<double, kMaxFusedK * kMaxFusedK> gram{};
  if (g.rescale && g.K > 0 && g.K <= kMaxFusedK) {
    for (int64_t j = 0; j < g.K; ++j)
      for (int64_t k = 0; k <= j; ++k)
        gram[j * g.K + k] = gram[k * g.K + j] =
            dot(g.probe_weight + j * g.D, g.probe_weight + k * g.D, g.D);
  }
  const double* gp = gram.data();

#ifdef _OPENMP
  if (g.B > 1 && g.B * g.D * (g.K + 2) >= kParallelWork && omp_get_max_threads() > 1) {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < g.B; ++b) row(g, gp, b);
    return;
  }
#endif
  for (int64_t b = 0; b < g.B; ++b) row(g, gp, b);
}

}  // namespace dglm
