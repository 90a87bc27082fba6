// See value_edit.h. Same arithmetic as methods.re_control.value_ascent (the PyTorch reference):
// z = W x + b, x' = max(z, 0) per hidden layer; v = W x + b; g = c · σ(−c·v); g ← Wᵀ g, masked by
// z > 0 on the way down; h ← h + α g. Each row takes its own number of steps; the rows step
// together so that each weight row, once in L1, serves all of them.

#include "value_edit.h"

#include <algorithm>
#include <cmath>

#include "vec.h"

namespace dglm {

void value_ascent(const ValueAscentArgs& a) {
  const int64_t L = static_cast<int64_t>(a.layers.size());
  if (L < 1 || a.rows <= 0) return;
  const int64_t H = a.layers[0].in, K = a.layers[L - 1].out;
  // the rows that move: a target and a step size (the others stay bit-identical)
  std::vector<int64_t> live;
  int64_t n = 0;  // steps the longest of them takes
  for (int64_t r = 0; r < a.rows; ++r) {
    bool any = false;
    for (int64_t k = 0; k < K; ++k) any |= a.coef[r * K + k] != 0.f;
    const int64_t steps = std::min(a.steps[r], a.max_steps);
    if (any && a.step_size[r] != 0.f && steps > 0) {
      live.push_back(r);
      n = std::max(n, steps);
    }
  }
  const int64_t R = static_cast<int64_t>(live.size());
  if (!R) return;
  int64_t widest = H;
  for (const DenseLayer& l : a.layers) widest = std::max({widest, l.in, l.out});
  // the live rows gathered (R, H); every layer's pre-activations (the ReLU masks), activations
  // and gradients, (R, width) each, the rows `width` apart
  std::vector<float> h(R * H), act(R * widest), act2(R * widest), g(R * widest), g2(R * widest);
  std::vector<std::vector<float>> z(L, std::vector<float>(R * widest));
  for (int64_t i = 0; i < R; ++i) std::copy_n(a.h + live[i] * H, H, h.data() + i * H);
  for (int64_t step = 0; step < n; ++step) {
    // every live row steps together; a row past its own count is computed but not moved
    const float* x = h.data();
    for (int64_t l = 0; l < L; ++l) {
      const DenseLayer& d = a.layers[l];
      vec_gemm_nt(d.w, x, d.b, z[l].data(), R, d.out, d.in);
      if (l < L - 1) {  // the next layer reads max(z, 0)
        float* next = l % 2 ? act2.data() : act.data();
        for (int64_t j = 0; j < R * d.out; ++j) next[j] = std::max(z[l][j], 0.f);
        x = next;
      }
    }
    // d/dv log σ(c v) = c σ(−c v), then down through the transposed weights and the ReLUs
    for (int64_t i = 0; i < R; ++i)
      for (int64_t k = 0; k < K; ++k) {
        const float c = a.coef[live[i] * K + k];
        g[i * K + k] = c / (1.f + std::exp(c * z[L - 1][i * K + k]));
      }
    for (int64_t l = L - 1; l >= 0; --l) {
      const DenseLayer& d = a.layers[l];
      vec_gemm_nn(d.w, g.data(), g2.data(), R, d.out, d.in);
      if (l > 0)  // through the ReLU of the layer below (whose rows are d.in wide)
        for (int64_t j = 0; j < R * d.in; ++j) g[j] = z[l - 1][j] > 0.f ? g2[j] : 0.f;
    }
    for (int64_t i = 0; i < R; ++i)
      if (step < std::min(a.steps[live[i]], a.max_steps))
        vec_axpy(h.data() + i * H, a.step_size[live[i]], g2.data() + i * H, H);
  }
  for (int64_t i = 0; i < R; ++i) std::copy_n(h.data() + i * H, H, a.h + live[i] * H);
}

}  // namespace dglm
