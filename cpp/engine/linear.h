// A linear layer of the text stack as the engine runs it: y = x W^T with W [out, in] (nn.Linear layout), plus an
// optional unmerged LoRA adapter. One place for how a projection is computed, so other weight formats (quantized)
// are added here and nowhere else.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <unordered_map>

namespace llama_mm {

using WeightMap = std::unordered_map<std::string, at::Tensor>;

// The tensor `name` of the map; a clear error naming it when it is missing.
const at::Tensor& get_weight(const WeightMap& w, const std::string& name);

struct Linear {
  at::Tensor w;               // [out, in]
  at::Tensor lora_a, lora_b;  // [r, in], [out, r] (B already multiplied by the adapter's scaling), float32

  // `module` without ".weight" (e.g. "language_model.model.layers.0.self_attn.q_proj"); picks up
  // `<module>.lora_A.weight` / `<module>.lora_B.weight` when the map holds an unmerged adapter.
  static Linear load(const WeightMap& w, const std::string& module);

  // x [..., in] -> [..., out] in x's dtype (the LoRA update in float32, rounded once, as lora.LoraLinear does).
  at::Tensor operator()(const at::Tensor& x) const;

  int64_t in_features() const { return w.size(1); }
  int64_t out_features() const { return w.size(0); }
  // Checks that the layer computes on `device` in `dtype`; `what` names it in the error.
  void check(const c10::Device& device, at::ScalarType dtype, const std::string& what) const;
};

}  // namespace llama_mm
