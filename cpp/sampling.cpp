#include "sampling.h"

#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

namespace llama_mm {

void SamplingParams::validate() const {
  TORCH_CHECK_VALUE(!do_sample || (std::isfinite(temperature) && temperature > 0),
                    "temperature must be > 0 when sampling, got ", temperature, " (temperature 0 is greedy decoding)");
  TORCH_CHECK_VALUE(top_k >= 0, "top_k must be >= 0 (0 disables it), got ", top_k);
  TORCH_CHECK_VALUE(top_p > 0 && top_p <= 1, "top_p must be in (0, 1], got ", top_p);
  TORCH_CHECK_VALUE(min_p >= 0 && min_p <= 1, "min_p must be in [0, 1], got ", min_p);
  TORCH_CHECK_VALUE(std::isfinite(repetition_penalty) && repetition_penalty > 0,
                    "repetition_penalty must be > 0, got ", repetition_penalty);
}

void apply_repetition_penalty(at::Tensor& logits, const at::Tensor& seen, double penalty) {
  if (penalty == 1.0 || !seen.defined()) return;
  auto penalised = at::where(logits < 0, logits * penalty, logits / penalty);
  logits = at::where(seen, penalised, logits);
}

at::Tensor sampling_probs(const at::Tensor& logits_in, const SamplingParams& p) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  auto scores = logits_in.to(at::kFloat);
  if (p.temperature != 1.0) scores = scores / p.temperature;
  const int64_t V = scores.size(-1);
  if (p.top_k > 0 && p.top_k < V) {
    auto kth = std::get<0>(at::topk(scores, p.top_k, -1)).narrow(-1, p.top_k - 1, 1);
    scores = scores.masked_fill(scores < kth, neg_inf);
  }
  if (p.top_p < 1.0) {
    auto [sorted, idx] = at::sort(scores, -1, /*descending=*/false);
    auto cum = sorted.softmax(-1).cumsum(-1);
    auto remove_sorted = cum <= (1.0 - p.top_p);
    remove_sorted.narrow(-1, V - 1, 1).fill_(false);  // keep at least the most likely token
    auto remove = at::zeros_like(remove_sorted).scatter(-1, idx, remove_sorted);
    scores = scores.masked_fill(remove, neg_inf);
  }
  if (p.min_p > 0.0) {
    auto probs = scores.softmax(-1);
    auto remove = probs < std::get<0>(probs.max(-1, true)) * p.min_p;
    auto top = scores.argmax(-1, true);
    remove.scatter_(-1, top, false);  // keep at least the most likely token
    scores = scores.masked_fill(remove, neg_inf);
  }
  return scores.softmax(-1);
}

at::Tensor draw(const at::Tensor& probs, const at::Tensor& uniform) {
  auto cdf = probs.cumsum(-1);                                  // [B, V]
  auto target = (uniform.to(at::kFloat) * cdf.select(-1, -1)).unsqueeze(-1);  // scale out rounding of the total
  auto idx = at::searchsorted(cdf, target, /*out_int32=*/false, /*right=*/true).squeeze(-1);
  return idx.clamp_max(probs.size(-1) - 1);
}

at::Tensor sample_next(const at::Tensor& logits_in, const at::Tensor& seen, const SamplingParams& p,
                       at::Generator& gen) {
  auto logits = logits_in.to(at::kFloat);
  TORCH_CHECK_VALUE(!at::isnan(logits).any().item<bool>(), "the model produced NaN logits (check the weights and "
                    "the dtype: float16 can overflow)");
  apply_repetition_penalty(logits, seen, p.repetition_penalty);
  if (!p.do_sample) return logits.argmax(-1);
  auto probs = sampling_probs(logits, p);
  auto u = at::rand({logits.size(0)}, gen, at::TensorOptions().dtype(at::kFloat));
  return draw(probs, u);
}

}  // namespace llama_mm
