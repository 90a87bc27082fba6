// One decode step of a Llama-family decoder with weight-only int8 matrices, in one call:
// RMSNorm, fused q/k/v projection, RoPE, the K/V write, grouped-query attention over the cache,
// output projection, RMSNorm, SwiGLU MLP, for every layer, then the final norm. The LM head is
// left to the caller (a hidden-state hook may edit its input). The matrices go through the
// int8_linear kernel's blocks, split between the step's own threads inside one parallel region.
#pragma once

#include <cstdint>
#include <vector>

namespace dglm {

struct Int8Matrix {
  const int8_t* q = nullptr;      // (N, K) row-major
  const float* scale = nullptr;   // (N,)
  const float* bias = nullptr;    // (N,) or nullptr
};

struct LlamaLayer {
  const float* attn_norm = nullptr;  // (H,) RMSNorm gains
  const float* mlp_norm = nullptr;   // (H,)
  Int8Matrix wqkv;  // ((nh + 2·nkv)·Dh, H): q heads, then k heads, then v heads
  Int8Matrix wo;    // (H, nh·Dh)
  Int8Matrix w13;   // (2·I, H): gate rows, then up rows
  Int8Matrix w2;    // (H, I)
};

struct LlamaShape {
  int64_t hidden = 0;        // H
  int64_t intermediate = 0;  // I
  int64_t heads = 0;         // nh
  int64_t kv_heads = 0;      // nkv (nh % nkv == 0)
  int64_t head_dim = 0;      // Dh (even)
  int64_t max_context = 0;   // rows of the RoPE tables
  float eps = 1e-6f;         // RMSNorm ε
};

struct LlamaModel {
  LlamaShape shape;
  std::vector<LlamaLayer> layers;
  const float* final_norm = nullptr;  // (H,)
  const float* rope_cos = nullptr;    // (max_context, Dh): cos(p·f)
  const float* rope_sin = nullptr;    // (max_context, Dh): sin(p·f), first half negated
  bool bf16 = false;  // the matrices in the int8 kernel's bf16-activation mode (Int8LinearArgs)
};

struct LlamaStepArgs {
  const float* x = nullptr;            // (B, H) embeddings of the fed tokens
  float* out = nullptr;                // (B, H) final-norm hidden states (may alias nothing)
  const int64_t* positions = nullptr;  // (B,) RoPE positions of the fed tokens
  float* k = nullptr;                  // key cache, element (l, b, g, j, d) at
  float* v = nullptr;                  //   l·kv_stride[0] + b·[1] + g·[2] + j·[3] + d
  int64_t kv_stride[4] = {0, 0, 0, 0};
  int64_t slot = 0;                    // cache slot the fed token is written to (every row)
  const uint8_t* key_mask = nullptr;   // (B, > slot) bool, row stride mask_stride; 0 = pad
  int64_t mask_stride = 0;
  int64_t batch = 0;                   // B
  int threads = 1;                     // OpenMP threads for the whole step
  // optional (nullptr: none): added to the residual stream after layer l, row b, at
  // residual + b·residual_stride[0] + l·residual_stride[1] (H floats each; methods.caa)
  const float* residual = nullptr;
  int64_t residual_stride[2] = {0, 0};
};

// Runs the step: writes K/V of every layer at `slot`, and `out`; adds `residual` (if any) to the
// residual stream after every layer. Key j of row b is attended
// iff j < slot and key_mask[b, j], or j == slot (the token's own key).
void llama_int8_step(const LlamaModel& m, const LlamaStepArgs& a);

}  // namespace dglm
