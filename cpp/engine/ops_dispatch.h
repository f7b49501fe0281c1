// The llama_mm ops as the engine calls them: through the dispatcher, so the CPU or the CUDA kernels run by the
// tensors' device. Shared by the single-request engine and the batching scheduler.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <limits>
#include <optional>

#include "gemv.h"
#include "widened_linear.h"

namespace llama_mm::dispatch {

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

inline at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  static auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("llama_mm::rms_norm");
  return h.call(x, w, eps);
}
inline at::Tensor rope(const at::Tensor& x, const at::Tensor& pos, const at::Tensor& inv_freq) {
  static auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("llama_mm::rope");
  return h.call(x, pos, inv_freq);
}
inline at::Tensor silu_mul(const at::Tensor& g, const at::Tensor& u) {
  static auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&)>("llama_mm::silu_mul");
  return h.call(g, u);
}
inline at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& valid, const at::Tensor& length) {
  static auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&)>("llama_mm::decode_attention");
  return h.call(q, k, v, valid, length);
}
inline at::Tensor cross_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const std::optional<at::Tensor>& mask) {
  static auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const std::optional<at::Tensor>&)>("llama_mm::cross_attention");
  return h.call(q, k, v, mask);
}
// Quantized projection (python/llama_mm/quant/layers.py's layout): x [..., K] -> [..., N] in x's dtype; with
// int8_activations, x is quantized to int8 per 32 values and multiplied in integers (llama_mm::qlinear_a8).
inline at::Tensor qlinear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                          const at::Tensor& zero, int64_t bits, int64_t group_size, bool int8_activations) {
  using Fn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                        int64_t, int64_t);
  static auto weight_only = op<Fn>("llama_mm::qlinear");
  static auto a8 = op<Fn>("llama_mm::qlinear_a8");
  const auto z = zero.defined() ? std::optional<at::Tensor>(zero) : std::nullopt;
  return (int8_activations ? a8 : weight_only).call(x, packed, scale, z, bits, group_size);
}

inline at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                  const at::Tensor& block_tables, const at::Tensor& lengths) {
  static auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&)>("llama_mm::paged_attention");
  return h.call(q, k_pool, v_pool, block_tables, lengths);
}

// The most negative finite value of a dtype: transformers' finfo(dtype).min mask value.
inline at::Scalar lowest(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return static_cast<double>(std::numeric_limits<c10::BFloat16>::lowest());
    case at::kHalf: return static_cast<double>(std::numeric_limits<c10::Half>::lowest());
    default: return static_cast<double>(std::numeric_limits<float>::lowest());
  }
}

// Matrix product with a dense weight [N, K]: the streaming matrix-vector kernel for the decode step's few rows on
// the CPU; more rows with 16-bit weights on a CPU without 16-bit arithmetic: widened to float32 GEMMs; else
// at::linear.
inline at::Tensor matmul_t(const at::Tensor& x, const at::Tensor& w) {
  if (cpu::gemv_applies(x, w)) return cpu::gemv(x, w);
  return cpu::widened_linear_applies(x, w) ? cpu::widened_linear(x, w) : at::linear(x, w);
}

}  // namespace llama_mm::dispatch
