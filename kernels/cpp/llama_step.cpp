// The fused int8 decode step of a Llama-family decoder (see llama_step.h).
//
// Why: at batch 1 the matrices of SmolLM2-135M stream in ~22 ms per token through the int8
// kernel, and the ~25 small operators around them per layer (norms, RoPE, the cache write,
// attention over a few dozen slots, SiLU, residual adds) cost another ~9 ms when run one by one
// through PyTorch, each paying dispatch and allocation. Here they are plain loops between the
// matrix products, inside one OpenMP region: threads meet at a barrier between stages instead
// of being woken per operator.
//
// Arithmetic is fp32 throughout, in PyTorch's order where it is cheap to keep (RoPE as
// x·cos + rotate_half(x)·sin, RMSNorm as x·rsqrt(mean(x²) + ε)·w, softmax then the weighted sum
// of values); sums run in another order, so results match the operator-by-operator step to
// rounding, not bit for bit.

#include "llama_step.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "int8_linear.h"
#include "vec.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace dglm {
namespace {

// In place: x·cos + rotate_half(x)·sin_signed, rotate_half(x) = [x2, x1] (sin's first half is
// stored negated, as in LlamaDecoder.rope_sin).
DGLM_CLONES void rope(float* x, const float* c, const float* s, int64_t dh) {
  const int64_t half = dh / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * c[i] + b * s[i];
    x[i + half] = b * c[i + half] + a * s[i + half];
  }
}

void silu_mul(const float* gu, float* act, int64_t I, int64_t lo, int64_t hi) {
  for (int64_t idx = lo; idx < hi; ++idx) {
    const int64_t b = idx / I, i = idx % I;
    const float g = gu[b * 2 * I + i];
    act[idx] = g / (1.f + std::exp(-g)) * gu[b * 2 * I + I + i];
  }
}

// [lo, hi) of n items for thread tid of nthreads (contiguous, like a static schedule).
inline void split(int64_t n, int tid, int nthreads, int64_t* lo, int64_t* hi) {
  *lo = n * tid / nthreads;
  *hi = n * (tid + 1) / nthreads;
}

inline void barrier() {
#pragma omp barrier
}

// This thread's share of y (M, N) (+)= x (M, K) · Wᵀ, in blocks of the int8 kernel.
void matmul_part(const Int8Matrix& w, const float* x, float* y, int64_t M, int64_t K, int64_t N,
                 bool accumulate, int tid, int nthreads, float* wbuf, bool bf16) {
  Int8LinearArgs a;
  a.bf16 = bf16;
  a.x = x;
  a.q = w.q;
  a.scale = w.scale;
  a.bias = w.bias;
  a.y = y;
  a.M = M;
  a.K = K;
  a.N = N;
  a.accumulate = accumulate;
  int64_t lo, hi;
  split((N + kInt8LinearBlock - 1) / kInt8LinearBlock, tid, nthreads, &lo, &hi);
  if (lo < hi) int8_linear_blocks(a, lo, hi, wbuf);
}

// Attention of the G query heads sharing key/value head g of one row: q (G, Dh) roped, keys and
// values at slots [0, slot] of the cache (slot stride ss), out (G, Dh). p: G·(slot + 1) floats.
// With contiguous slots (ss = Dh, the runner's layout) scores and the weighted sum are two small
// matrix products over all G heads; otherwise slot by slot.
void attend_group(const float* q, const float* kc, const float* vc, int64_t ss, int64_t slot,
                  const uint8_t* mask, int64_t G, int64_t dh, float* out, float* p) {
  const float scale = 1.f / std::sqrt(static_cast<float>(dh));
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t n = slot + 1;
  if (ss == dh) {
    vec_gemm_nt(kc, q, nullptr, p, G, n, dh);  // (G, n) = q · Kᵀ
  } else {
    for (int64_t i = 0; i < G; ++i)
      for (int64_t j = 0; j < n; ++j) p[i * n + j] = vec_dot(q + i * dh, kc + j * ss, dh);
  }
  for (int64_t i = 0; i < G; ++i) {
    float* pi = p + i * n;
    float mx = ninf;
    for (int64_t j = 0; j < n; ++j) {
      pi[j] = (j < slot && !mask[j]) ? ninf : pi[j] * scale;
      mx = std::max(mx, pi[j]);
    }
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      pi[j] = pi[j] == ninf ? 0.f : std::exp(pi[j] - mx);
      sum += pi[j];
    }
    for (int64_t j = 0; j < n; ++j) pi[j] /= sum;
  }
  if (ss == dh) {
    vec_gemm_nn(vc, p, out, G, n, dh);  // (G, Dh) = P · V; masked slots (weight 0) skipped
    return;
  }
  for (int64_t i = 0; i < G; ++i) {
    float* o = out + i * dh;
    std::fill(o, o + dh, 0.f);
    for (int64_t j = 0; j < n; ++j)
      if (p[i * n + j] != 0.f) vec_axpy(o, p[i * n + j], vc + j * ss, dh);
  }
}

}  // namespace

void llama_int8_step(const LlamaModel& m, const LlamaStepArgs& a) {
  const LlamaShape& c = m.shape;
  const int64_t B = a.batch, H = c.hidden, I = c.intermediate, nh = c.heads, nkv = c.kv_heads;
  const int64_t dh = c.head_dim, G = nh / nkv, nqkv = (nh + 2 * nkv) * dh;
  if (B <= 0) return;
  for (int64_t b = 0; b < B; ++b)
    if (a.positions[b] < 0 || a.positions[b] >= c.max_context)
      throw std::out_of_range("llama_int8_step: position " + std::to_string(a.positions[b]) +
                              " of row " + std::to_string(b) + " is outside the RoPE table [0, " +
                              std::to_string(c.max_context) + ")");
  std::vector<float> h(a.x, a.x + B * H), xn(B * H), qkv(B * nqkv), att(B * nh * dh);
  std::vector<float> gu(B * 2 * I), act(B * I);
  const int64_t widest = std::max({H, I, nh * dh});
  const int64_t scratch = m.bf16 ? int8_linear_bf16_scratch(B, widest)
                         : B > 4  ? kInt8LinearBlock * widest
                                  : 0;  // see int8_linear_scratch
  const int threads = std::max(1, a.threads);
  const int64_t s1 = a.kv_stride[1], s2 = a.kv_stride[2], s3 = a.kv_stride[3];

#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int tid = 0, T = 1;
#ifdef _OPENMP
    tid = omp_get_thread_num();
    T = omp_get_num_threads();
#endif
    std::vector<float> wbuf(scratch), p(G * (a.slot + 1));
    int64_t rlo, rhi, glo, ghi, elo, ehi;
    split(B, tid, T, &rlo, &rhi);
    split(B * nkv, tid, T, &glo, &ghi);
    split(B * I, tid, T, &elo, &ehi);
    for (size_t l = 0; l < m.layers.size(); ++l) {
      const LlamaLayer& L = m.layers[l];
      float* kl = a.k + static_cast<int64_t>(l) * a.kv_stride[0];
      float* vl = a.v + static_cast<int64_t>(l) * a.kv_stride[0];
      for (int64_t b = rlo; b < rhi; ++b)
        vec_rms_norm(h.data() + b * H, L.attn_norm, xn.data() + b * H, H, c.eps);
      barrier();
      matmul_part(L.wqkv, xn.data(), qkv.data(), B, H, nqkv, false, tid, T, wbuf.data(), m.bf16);
      barrier();
      for (int64_t item = glo; item < ghi; ++item) {
        const int64_t b = item / nkv, g = item % nkv;
        float* row = qkv.data() + b * nqkv;
        const float* cs = m.rope_cos + a.positions[b] * dh;
        const float* sn = m.rope_sin + a.positions[b] * dh;
        for (int64_t i = 0; i < G; ++i) rope(row + (g * G + i) * dh, cs, sn, dh);
        float* kh = row + (nh + g) * dh;
        const float* vh = row + (nh + nkv + g) * dh;
        rope(kh, cs, sn, dh);
        float* kc = kl + b * s1 + g * s2;
        float* vc = vl + b * s1 + g * s2;
        std::copy(kh, kh + dh, kc + a.slot * s3);
        std::copy(vh, vh + dh, vc + a.slot * s3);
        attend_group(row + g * G * dh, kc, vc, s3, a.slot, a.key_mask + b * a.mask_stride, G, dh,
                     att.data() + b * nh * dh + g * G * dh, p.data());
      }
      barrier();
      matmul_part(L.wo, att.data(), h.data(), B, nh * dh, H, true, tid, T, wbuf.data(), m.bf16);
      barrier();
      for (int64_t b = rlo; b < rhi; ++b)
        vec_rms_norm(h.data() + b * H, L.mlp_norm, xn.data() + b * H, H, c.eps);
      barrier();
      matmul_part(L.w13, xn.data(), gu.data(), B, H, 2 * I, false, tid, T, wbuf.data(), m.bf16);
      barrier();
      silu_mul(gu.data(), act.data(), I, elo, ehi);
      barrier();
      matmul_part(L.w2, act.data(), h.data(), B, I, H, true, tid, T, wbuf.data(), m.bf16);
      barrier();
      if (a.residual) {  // this thread's rows, which its next norm reads: no barrier needed
        for (int64_t b = rlo; b < rhi; ++b) {
          const float* r = a.residual + b * a.residual_stride[0] +
                           static_cast<int64_t>(l) * a.residual_stride[1];
          float* hb = h.data() + b * H;
#pragma omp simd
          for (int64_t i = 0; i < H; ++i) hb[i] += r[i];
        }
      }
    }
    for (int64_t b = rlo; b < rhi; ++b)
      vec_rms_norm(h.data() + b * H, m.final_norm, a.out + b * H, H, c.eps);
  }
}

}  // namespace dglm
