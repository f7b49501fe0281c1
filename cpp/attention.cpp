// Single-query attention kernels for the decode step (CPU):
//   decode_attention: one new query per row against the self-attention KV cache, grouped KV heads.
//   cross_attention:  one query per row against the image K/V computed once per request.
// Both follow the reference's arithmetic: scores = q.k * D^-1/2 (+ additive mask), softmax in float32,
// out = sum_j p_j v_j. A key masked out gets the lowest float (as transformers' finfo.min mask does), so a row
// whose keys are all masked attends uniformly, exactly like the reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <vector>

#include "attention.h"

namespace llama_mm::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;

inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
#if defined(CPU_CAPABILITY_AVX512)
  float s = _mm512_reduce_add_ps(acc);
#else
  float lanes[Vec::size()];
  acc.store(lanes);
  float s = 0.f;
  for (int64_t l = 0; l < Vec::size(); ++l) s += lanes[l];
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  const Vec a(alpha);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) at::vec::fmadd(a, Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
  for (; i < n; ++i) y[i] += alpha * x[i];
}

template <typename T>
inline const float* as_float(const T* src, float* scratch, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) scratch[i] = static_cast<float>(src[i]);
    return scratch;
  }
}

// q [B, H, D]; k, v [B, Hkv, >=S, D] (last dim contiguous); mask_add [B, >=S] float additive or nullptr;
// key_valid [B, >=S] bool or nullptr. Writes out [B, H, D] contiguous.
template <typename T>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* mask_add,
            int64_t mask_stride, const bool* key_valid, int64_t valid_stride, int64_t S, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1), G = H / Hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float lowest = std::numeric_limits<float>::lowest();
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t qsb = q.stride(0), qsh = q.stride(1);
  const int64_t ksb = k.stride(0), ksh = k.stride(1), kss = k.stride(2);
  const int64_t vsb = v.stride(0), vsh = v.stride(1), vss = v.stride(2);

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), scores(G * S), acc(G * D), row(D);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / Hkv, h = unit % Hkv;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = static_cast<float>(qp[b * qsb + (h * G + g) * qsh + d]);
      // scores[g, j] = q_g . k_j * scale + mask
      const T* kb = kp + b * ksb + h * ksh;
      for (int64_t j = 0; j < S; ++j) {
        const float* kj = as_float(kb + j * kss, row.data(), D);
        const bool masked = key_valid && !key_valid[b * valid_stride + j];
        const float add = mask_add ? mask_add[b * mask_stride + j] : 0.f;
        for (int64_t g = 0; g < G; ++g)
          scores[g * S + j] = masked ? lowest : dot(qf.data() + g * D, kj, D) * scale + add;
      }
      // softmax per query head
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * S;
        float mx = lowest;
        for (int64_t j = 0; j < S; ++j) mx = std::max(mx, s[j]);
        float sum = 0.f;
        for (int64_t j = 0; j < S; ++j) sum += (s[j] = std::exp(s[j] - mx));
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < S; ++j) s[j] *= inv;
      }
      // out_g = sum_j p[g, j] v_j
      std::fill(acc.begin(), acc.end(), 0.f);
      const T* vb = vp + b * vsb + h * vsh;
      for (int64_t j = 0; j < S; ++j) {
        const float* vj = as_float(vb + j * vss, row.data(), D);
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * S + j];
          if (p != 0.f) axpy(p, vj, acc.data() + g * D, D);
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) op[(b * H + h * G + g) * D + d] = static_cast<T>(acc[g * D + d]);
    }
  });
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
    attend<T>(q, k_cache, v_cache, nullptr, 0, key_valid.data_ptr<bool>(), key_valid.stride(0), length, out);
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
    attend<T>(q, k, v, mp, ms, nullptr, 0, k.size(2), out);
  });
  return out;
}

}  // namespace llama_mm::cpu
