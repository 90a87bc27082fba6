// Nucleus (top-k, then top-p) sampling by the Gumbel-max trick on CPU, one row at a time: the
// same tokens as dglm.engine.decoding.sampling.sample_tokens(full_sort=True, uniform=True) (the
// torch path) without sorting the vocabulary.
#pragma once

#include <cstdint>

namespace dglm {

struct NucleusArgs {
  const float* logits = nullptr;       // rows of V fp32 logits, row r at logits + r·stride
  int64_t stride = 0;
  const int64_t* rows = nullptr;       // (S,) logits row of each sampled row; nullptr = row s
  const float* uniforms = nullptr;     // (S, V) U ∈ (0, 1): the Gumbel noise is −log(−log U)
  const float* temperature = nullptr;  // (S,) > 0
  const int64_t* top_k = nullptr;      // (S,) 0 = off
  const double* top_p = nullptr;       // (S,) in (0, 1]
  int64_t S = 0;
  int64_t V = 0;
  int64_t* out = nullptr;              // (S,) sampled token ids
};

// For each row: scores s = logits / T; top-k keeps s ≥ the k-th largest (ties kept); the
// nucleus drops the tokens whose ascending cumulative probability (fp64 softmax of the kept
// scores) is ≤ 1 − top_p, never the best; the token is argmax(s + G) over what is kept.
// The nucleus is looked for among the tokens within a few nats of the best first, widened until
// the mass left outside is itself droppable (then the decision is the full sort's).
void sample_nucleus(const NucleusArgs& a);

}  // namespace dglm
