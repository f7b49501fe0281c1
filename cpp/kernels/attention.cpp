// Single-query attention kernels for the decode step (CPU):
//   decode_attention: one new query per row against the self-attention KV cache, grouped KV heads.
//   cross_attention:  one query per row against the image K/V computed once per request.
// Both run the online-softmax core of attention_core.h over keys held in one tensor.
#include <ATen/ATen.h>

#include "attention.h"
#include "attention_core.h"

namespace llama_mm::cpu {
namespace {

using namespace attention_core;

// Keys of k, v [B, Hkv, >=S, D]: the first S slots of every row.
template <typename T>
DenseKeys<T> dense_keys(const at::Tensor& k, const at::Tensor& v, int64_t S) {
  return {k.data_ptr<T>(), v.data_ptr<T>(), k.stride(0), k.stride(1), k.stride(2),
          v.stride(0),     v.stride(1),     v.stride(2), S};
}

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 3, op, ": q must be [B, H, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(), op, ": k and v must be [B, Hkv, S, D] of one shape, got k ",
              k.sizes(), " v ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(2), op, ": q ", q.sizes(), " and k ", k.sizes(),
              " disagree on batch or head_dim");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, op, ": query heads ", q.size(1), " not a multiple of kv heads ", k.size(1));
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), op,
              ": q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op, ": CPU tensors expected");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(3) == 1 && v.stride(3) == 1, op, ": head_dim must be contiguous");
}

template <typename F>
void dispatch_float(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kHalf: f(at::Half{}); break;
    default: TORCH_CHECK(false, op, ": dtype ", t, " not supported (float32, bfloat16, float16)");
  }
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& key_valid, const at::Tensor& length_t) {
  check_qkv("decode_attention", q, k_cache, v_cache);
  TORCH_CHECK(length_t.numel() == 1 && length_t.scalar_type() == at::kLong && length_t.device().is_cpu(),
              "decode_attention: length must be a one-element int64 CPU tensor, got ", length_t.scalar_type(), " ",
              length_t.sizes(), " on ", length_t.device());
  const int64_t length = length_t.item<int64_t>();
  TORCH_CHECK(length > 0 && length <= k_cache.size(2), "decode_attention: length ", length, " outside [1, ",
              k_cache.size(2), "]");
  TORCH_CHECK(key_valid.scalar_type() == at::kBool && key_valid.dim() == 2 && key_valid.size(0) == q.size(0) &&
                  key_valid.size(1) >= length && key_valid.stride(1) == 1,
              "decode_attention: key_valid must be a bool [B, >= length] tensor, got ", key_valid.scalar_type(), " ",
              key_valid.sizes());
  auto out = at::empty(q.sizes(), q.options());
  dispatch_float(q.scalar_type(), "decode_attention", [&](auto tag) {
    using T = decltype(tag);
    attend<T>(q, k_cache.size(1), dense_keys<T>(k_cache, v_cache, length), nullptr, 0, key_valid.data_ptr<bool>(),
              key_valid.stride(0), out);
  });
  return out;
}

at::Tensor cross_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& mask) {
  check_qkv("cross_attention", q, k, v);
  const float* mp = nullptr;
  int64_t ms = 0;
  at::Tensor m;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == q.size(0) && mask->size(1) == k.size(2),
                "cross_attention: mask must be [B, S] = [", q.size(0), ", ", k.size(2), "], got ", mask->sizes());
    TORCH_CHECK(mask->is_floating_point(), "cross_attention: mask must be an additive float mask, got ",
                mask->scalar_type());
    m = mask->to(at::kFloat).contiguous();
    mp = m.data_ptr<float>();
    ms = m.stride(0);
  }
  auto out = at::empty(q.sizes(), q.options());
  dispatch_float(q.scalar_type(), "cross_attention", [&](auto tag) {
    using T = decltype(tag);
    attend<T>(q, k.size(1), dense_keys<T>(k, v, k.size(2)), mp, ms, nullptr, 0, out);
  });
  return out;
}

}  // namespace llama_mm::cpu
