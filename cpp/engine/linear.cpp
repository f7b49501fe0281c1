#include "linear.h"

#include <c10/util/Exception.h>

#include "ops_dispatch.h"

namespace llama_mm {

const at::Tensor& get_weight(const WeightMap& w, const std::string& name) {
  auto it = w.find(name);
  TORCH_CHECK_VALUE(it != w.end(), "Engine: weight '", name, "' is missing");
  return it->second;
}

namespace {

// The quantized tensors of `module` into `lin`, every shape and dtype checked (the rule of quant/layers.py's
// quant_geometry).
void load_quantized(Linear& lin, const WeightMap& w, const std::string& module) {
  lin.packed = get_weight(w, module + ".weight_packed");
  lin.scale = get_weight(w, module + ".weight_scale");
  const auto& shape = get_weight(w, module + ".weight_shape");
  TORCH_CHECK_VALUE(shape.scalar_type() == at::kLong && shape.numel() == 2, "Engine: ", module,
                    ".weight_shape must be int64 [2] (out, in), got ", shape.scalar_type(), " ", shape.sizes());
  const auto s = shape.cpu();
  lin.out = s[0].item<int64_t>();
  lin.in = s[1].item<int64_t>();
  TORCH_CHECK_VALUE(lin.packed.scalar_type() == at::kInt && lin.packed.dim() == 2 && lin.packed.size(0) == lin.out &&
                        lin.in > 0 && lin.packed.size(1) > 0 && (32 * lin.packed.size(1)) % lin.in == 0,
                    "Engine: ", module, ".weight_packed must be int32 [", lin.out, ", in * bits / 32] for in = ", lin.in,
                    ", got ", lin.packed.scalar_type(), " ", lin.packed.sizes());
  lin.bits = 32 * lin.packed.size(1) / lin.in;
  TORCH_CHECK_VALUE(lin.bits == 4 || lin.bits == 8, "Engine: ", module, ".weight_packed ", lin.packed.sizes(),
                    " packs ", lin.bits, " bits per value for in = ", lin.in, "; only 4 and 8 are supported");
  TORCH_CHECK_VALUE(lin.scale.dim() == 2 && lin.scale.size(0) == lin.out && lin.scale.size(1) > 0 &&
                        lin.in % lin.scale.size(1) == 0,
                    "Engine: ", module, ".weight_scale must be [", lin.out, ", in / group] with a group dividing ",
                    lin.in, ", got ", lin.scale.sizes());
  lin.group_size = lin.in / lin.scale.size(1);
  const auto z = w.find(module + ".weight_zero");
  if (z != w.end()) {
    lin.zero = z->second;
    TORCH_CHECK_VALUE(lin.zero.scalar_type() == at::kChar && lin.zero.sizes() == lin.scale.sizes(), "Engine: ",
                      module, ".weight_zero must be int8 shaped like weight_scale ", lin.scale.sizes(), ", got ",
                      lin.zero.scalar_type(), " ", lin.zero.sizes());
  }
}

}  // namespace

Linear Linear::load(const WeightMap& w, const std::string& module, bool int8_activations) {
  Linear lin;
  if (w.count(module + ".weight_packed")) {
    TORCH_CHECK_VALUE(!w.count(module + ".weight"), "Engine: ", module, " has both a dense weight and weight_packed");
    load_quantized(lin, w, module);
    lin.int8_activations = int8_activations;
  } else {
    lin.w = get_weight(w, module + ".weight");
    TORCH_CHECK_VALUE(lin.w.dim() == 2, "Engine: ", module, ".weight must be 2-D [out, in], got ", lin.w.sizes());
    lin.out = lin.w.size(0);
    lin.in = lin.w.size(1);
  }
  const auto a = w.find(module + ".lora_A.weight"), b = w.find(module + ".lora_B.weight");
  TORCH_CHECK_VALUE((a == w.end()) == (b == w.end()), "Engine: ", module, " has only one of lora_A / lora_B");
  if (a != w.end()) {
    TORCH_CHECK_VALUE(a->second.dim() == 2 && b->second.dim() == 2 && a->second.size(1) == lin.in &&
                          b->second.size(0) == lin.out && b->second.size(1) == a->second.size(0),
                      "Engine: LoRA shapes of ", module, " (A ", a->second.sizes(), ", B ", b->second.sizes(),
                      ") do not fit its weight [", lin.out, ", ", lin.in, "]");
    lin.lora_a = a->second;
    lin.lora_b = b->second;
  }
  return lin;
}

at::Tensor Linear::operator()(const at::Tensor& x) const {
  auto y = quantized() ? dispatch::qlinear(x, packed, scale, zero, bits, group_size, int8_activations)
                        : dispatch::matmul_t(x, w);
  if (!lora_a.defined()) return y;
  auto xf = x.to(lora_a.scalar_type());
  return y + dispatch::matmul_t(dispatch::matmul_t(xf, lora_a), lora_b).to(y.scalar_type());
}

void Linear::check(const c10::Device& device, at::ScalarType dtype, const std::string& what) const {
  const auto& t = quantized() ? scale : w;
  TORCH_CHECK_VALUE(t.device() == device && t.scalar_type() == dtype, "Engine: ", what,
                    quantized() ? " weight_scale (" : " weight (", t.scalar_type(), " on ", t.device(),
                    ") must share the embedding's device and dtype (", dtype, " on ", device, ")");
  TORCH_CHECK_VALUE(!quantized() || (packed.device() == device && (!zero.defined() || zero.device() == device)),
                    "Engine: ", what, " quantized tensors must be on ", device);
}

}  // namespace llama_mm
