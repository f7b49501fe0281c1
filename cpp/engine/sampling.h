// Token sampling for the decode loop, in the order transformers applies its logits processors:
// repetition penalty -> (greedy: argmax) -> temperature -> top-k -> top-p -> min-p -> softmax -> inverse-CDF draw
// with a uniform number from a seeded CPU generator (the same stream torch.rand gives in Python, so the reference
// in python/llama_mm/sampling.py draws the same tokens).
#pragma once

#include <ATen/ATen.h>

namespace llama_mm {

struct SamplingParams {
  bool do_sample = false;   // false: greedy (argmax after the repetition penalty)
  double temperature = 1.0; // > 0
  int64_t top_k = 0;        // 0: off
  double top_p = 1.0;       // (0, 1]; 1: off
  double min_p = 0.0;       // [0, 1]; 0: off
  double repetition_penalty = 1.0;  // > 0; 1: off
  int64_t seed = 0;

  void validate() const;  // throws with a message naming the bad field
};

// Penalise, in place, every token marked in `seen` [B, V] bool: logit < 0 ? logit * p : logit / p.
void apply_repetition_penalty(at::Tensor& logits, const at::Tensor& seen, double penalty);

// logits [B, V] float32 (after the repetition penalty) -> probabilities [B, V] float32 after temperature, top-k,
// top-p and min-p. Removed tokens have probability 0.
at::Tensor sampling_probs(const at::Tensor& logits, const SamplingParams& p);

// Inverse-CDF draw: probs [B, V], uniform [B] in [0, 1) -> token ids [B] int64.
at::Tensor draw(const at::Tensor& probs, const at::Tensor& uniform);

// One step: logits [B, V] (any float dtype), seen [B, V] bool (or undefined when no penalty) -> next ids [B].
at::Tensor sample_next(const at::Tensor& logits, const at::Tensor& seen, const SamplingParams& p,
                       at::Generator& gen);

}  // namespace llama_mm
