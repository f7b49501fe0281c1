#include "linear.h"

#include <c10/util/Exception.h>

#include "ops_dispatch.h"

namespace llama_mm {

const at::Tensor& get_weight(const WeightMap& w, const std::string& name) {
  auto it = w.find(name);
  TORCH_CHECK_VALUE(it != w.end(), "Engine: weight '", name, "' is missing");
  return it->second;
}

Linear Linear::load(const WeightMap& w, const std::string& module) {
  Linear lin{get_weight(w, module + ".weight"), {}, {}};
  TORCH_CHECK_VALUE(lin.w.dim() == 2, "Engine: ", module, ".weight must be 2-D [out, in], got ", lin.w.sizes());
  const auto a = w.find(module + ".lora_A.weight"), b = w.find(module + ".lora_B.weight");
  TORCH_CHECK_VALUE((a == w.end()) == (b == w.end()), "Engine: ", module, " has only one of lora_A / lora_B");
  if (a != w.end()) {
    TORCH_CHECK_VALUE(a->second.dim() == 2 && b->second.dim() == 2 && a->second.size(1) == lin.in_features() &&
                          b->second.size(0) == lin.out_features() && b->second.size(1) == a->second.size(0),
                      "Engine: LoRA shapes of ", module, " (A ", a->second.sizes(), ", B ", b->second.sizes(),
                      ") do not fit its weight ", lin.w.sizes());
    lin.lora_a = a->second;
    lin.lora_b = b->second;
  }
  return lin;
}

at::Tensor Linear::operator()(const at::Tensor& x) const {
  auto y = dispatch::matmul_t(x, w);
  if (!lora_a.defined()) return y;
  auto xf = x.to(lora_a.scalar_type());
  return y + dispatch::matmul_t(dispatch::matmul_t(xf, lora_a), lora_b).to(y.scalar_type());
}

void Linear::check(const c10::Device& device, at::ScalarType dtype, const std::string& what) const {
  TORCH_CHECK_VALUE(w.device() == device && w.scalar_type() == dtype, "Engine: ", what, " weight (", w.scalar_type(),
                    " on ", w.device(), ") must share the embedding's device and dtype (", dtype, " on ", device,
                    ")");
}

}  // namespace llama_mm
