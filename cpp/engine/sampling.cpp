#include "sampling.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/cpu/vec/vec.h>
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

namespace {

constexpr const char* kNanLogits = "the model produced NaN logits (check the weights and the dtype: float16 can overflow)";

// Greedy pick from float32 logits [B, V]: the first index of each row's maximum, as at::argmax returns it, and an
// error on NaN, in one vectorised pass (at::argmax and at::isnan are scalar loops: ~0.35 ms together for a
// 128256-entry row). Each block of kBlock values is reduced to its maximum; only a block whose maximum beats the best
// so far is scanned for the first index of that maximum.
at::Tensor greedy(const at::Tensor& logits_in) {
  using fVec = at::vec::Vectorized<float>;
  constexpr int64_t kBlock = 16 * fVec::size();
  const auto logits = logits_in.contiguous();
  const int64_t B = logits.size(0), V = logits.size(1);
  auto out = at::empty({B}, at::kLong);
  for (int64_t b = 0; b < B; ++b) {
    const float* row = logits.data_ptr<float>() + b * V;
    float best = -std::numeric_limits<float>::infinity();
    int64_t arg = 0;
    bool nan = false;
    for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
      const int64_t n = std::min(kBlock, V - v0);
      float m = -std::numeric_limits<float>::infinity();
      int64_t v = 0;
      if (n == kBlock) {
        fVec mv = fVec::loadu(row + v0);
        for (v = fVec::size(); v < n; v += fVec::size()) mv = at::vec::maximum(mv, fVec::loadu(row + v0 + v));
        __at_align__ float lanes[fVec::size()];
        mv.store(lanes);  // at::vec::maximum propagates NaN
        for (int64_t l = 0; l < fVec::size(); ++l) {
          nan |= std::isnan(lanes[l]);
          m = std::max(m, lanes[l]);
        }
      } else {
        for (v = 0; v < n; ++v) {
          nan |= std::isnan(row[v0 + v]);
          m = std::max(m, row[v0 + v]);
        }
      }
      TORCH_CHECK_VALUE(!nan, kNanLogits);
      if (m > best) {
        best = m;
        for (v = 0; row[v0 + v] != m; ++v) {
        }
        arg = v0 + v;
      }
    }
    out.data_ptr<int64_t>()[b] = arg;
  }
  return out;
}

}  // namespace

at::Tensor sample_next(const at::Tensor& logits_in, const at::Tensor& seen, const SamplingParams& p,
                       at::Generator& gen) {
  auto logits = logits_in.to(at::kFloat);
  apply_repetition_penalty(logits, seen, p.repetition_penalty);  // finite factors: NaN only from the model
  if (!p.do_sample) return greedy(logits);
  TORCH_CHECK_VALUE(!at::isnan(logits).any().item<bool>(), kNanLogits);
  auto probs = sampling_probs(logits, p);
  auto u = at::rand({logits.size(0)}, gen, at::TensorOptions().dtype(at::kFloat));
  return draw(probs, u);
}

}  // namespace llama_mm
