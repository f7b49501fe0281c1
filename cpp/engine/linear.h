// A linear layer of the text stack as the engine runs it: y = x W^T with W [out, in] (nn.Linear layout), plus an
// optional unmerged LoRA adapter. One place for how a projection is computed: a dense weight, or a weight-only
// quantized one (int4 / int8 per group, compressed-tensors' packing, run by the llama_mm::qlinear op).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <unordered_map>

namespace llama_mm {

using WeightMap = std::unordered_map<std::string, at::Tensor>;

// The tensor `name` of the map; a clear error naming it when it is missing.
const at::Tensor& get_weight(const WeightMap& w, const std::string& name);

struct Linear {
  at::Tensor w;  // dense: [out, in]; undefined when quantized
  // quantized (python/llama_mm/quant/layers.py): packed int32 [out, in * bits / 32], scale [out, in / group] (model
  // dtype), zero int8 [out, in / group] or undefined (symmetric)
  at::Tensor packed, scale, zero;
  int64_t bits = 0, group_size = 0;
  bool int8_activations = false;  // quantized: x as int8 per 32 values, integer products (llama_mm::qlinear_a8)
  int64_t in = 0, out = 0;
  at::Tensor lora_a, lora_b;  // [r, in], [out, r] (B already multiplied by the adapter's scaling), float32

  // `module` without ".weight" (e.g. "language_model.model.layers.0.self_attn.q_proj"). Dense: `<module>.weight`.
  // Quantized: `<module>.weight_packed`, `.weight_scale`, `.weight_shape` (int64 [2] = out, in) and, when
  // asymmetric, `.weight_zero`; bits = 32 * packed.size(1) / in, group = in / scale.size(1). Picks up
  // `<module>.lora_A.weight` / `<module>.lora_B.weight` when the map holds an unmerged adapter. int8_activations
  // applies to a quantized weight only.
  static Linear load(const WeightMap& w, const std::string& module, bool int8_activations = false);

  // x [..., in] -> [..., out] in x's dtype (the LoRA update in float32, rounded once, as lora.LoraLinear does).
  at::Tensor operator()(const at::Tensor& x) const;

  bool quantized() const { return packed.defined(); }
  int64_t in_features() const { return in; }
  int64_t out_features() const { return out; }
  // Checks that the layer computes on `device` in `dtype`; `what` names it in the error.
  void check(const c10::Device& device, at::ScalarType dtype, const std::string& what) const;
};

}  // namespace llama_mm
