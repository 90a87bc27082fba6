// RE-Control's edit on CPU: `steps` gradient-ascent steps of a ReLU MLP value network's
// J(h) = Σ_k [c_k ≠ 0] log σ(c_k · V_k(h)), the gradient taken analytically (forward with the
// ReLU masks kept, backward through the transposed weights), every row's step at once.
#pragma once

#include <cstdint>
#include <vector>

namespace dglm {

struct DenseLayer {
  const float* w = nullptr;  // (out, in) row-major
  const float* b = nullptr;  // (out,)
  int64_t in = 0;
  int64_t out = 0;
};

struct ValueAscentArgs {
  std::vector<DenseLayer> layers;  // hidden layers (Linear + ReLU), then the output layer
  float* h = nullptr;              // (R, H) states, edited in place; H = layers[0].in
  const float* coef = nullptr;     // (R, K) ±1 on the targeted outputs, 0 elsewhere
  const int64_t* steps = nullptr;  // (R,) steps row r takes (at most max_steps)
  const float* step_size = nullptr;  // (R,) α
  int64_t rows = 0;
  int64_t max_steps = 0;
};

void value_ascent(const ValueAscentArgs& a);

}  // namespace dglm
