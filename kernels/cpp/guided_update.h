// CPU twin of `guided_update_ref` (kernels/guided_update.py): plain pointers, no Python, no GIL.
#pragma once

#include <cstdint>

namespace dglm {

// Row-major fp32 buffers; the outputs must not overlap any input or each other.
struct GuidedUpdateArgs {
  const float* z;             // (B, D) current latent z_t
  const float* v_cond;        // (B, D) conditional v prediction
  const float* v_uncond;      // (B, D) unconditional v prediction, nullptr = no CFG
  const float* cfg_scale;     // (B,) CFG weight w
  const float* probe_weight;  // (K, D) probe rows
  const float* probe_bias;    // (K,)
  const float* probe_target;  // (B, K) targets y
  const float* probe_scale;   // (B, K) guidance scales s
  const float* noise;         // (B, D) standard normal ξ
  const float* coefs;         // (B, 5) [alpha_t, sigma_t, coef_x0, coef_z, noise_std]
  float* z_next;              // (B, D) out
  float* x0;                  // (B, D) out
  int64_t B = 0;
  int64_t D = 0;
  int64_t K = 0;
  bool rescale = true;
};

// Runs the fused step for every row; threads over rows (OpenMP) only when the batch is large.
void guided_update(const GuidedUpdateArgs& a);

}  // namespace dglm
