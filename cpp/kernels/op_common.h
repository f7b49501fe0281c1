// What the CPU (cpp/) and CUDA (cuda/) implementations of the llama_mm ops share: argument checks (every message
// starts with the op name and names the offending argument), the dtype dispatch, and the row view of inputs.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <optional>

// Run the lambda body with scalar_t = float, c10::BFloat16 or c10::Half (the dtypes every op accepts).
#define LLAMA_MM_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                              \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)                       \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace llama_mm {

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, "llama_mm.", op, ": ", name,
              " must be float32, bfloat16 or float16, got ", s);
}

// `t` must have the same dtype as `ref` (ref already checked).
inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "llama_mm.", op, ": ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

// `ref` must be on a `type` device, `t` on the same device as `ref`.
inline void check_device(const at::Tensor& t, const at::Tensor& ref, c10::DeviceType type, const char* op,
                         const char* name, const char* ref_name) {
  TORCH_CHECK(ref.device().type() == type, "llama_mm.", op, ": ", ref_name, " must be a ", c10::Device(type),
              " tensor for this implementation, got ", ref.device());
  TORCH_CHECK(t.device() == ref.device(), "llama_mm.", op, ": ", name, " must be on the device of ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

// x [..., D], weight [D]
inline void check_rms_norm_args(const at::Tensor& x, const at::Tensor& weight, double eps, c10::DeviceType type) {
  check_float_dtype(x, "rms_norm", "x");
  TORCH_CHECK(x.dim() >= 1, "llama_mm.rms_norm: x must have at least 1 dim, got a 0-dim tensor");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "llama_mm.rms_norm: weight must have shape [",
              x.size(-1), "] (the last dim of x ", x.sizes(), "), got ", weight.sizes());
  check_same_dtype(weight, x, "rms_norm", "weight", "x");
  check_device(weight, x, type, "rms_norm", "weight", "x");
  TORCH_CHECK(eps >= 0.0, "llama_mm.rms_norm: eps must be >= 0, got ", eps);
}

// x [B, T, H, D] with D even, positions [B, T] int64, inv_freq [D/2] float32
inline void check_rope_args(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq,
                            c10::DeviceType type) {
  check_float_dtype(x, "rope", "x");
  TORCH_CHECK(x.dim() == 4, "llama_mm.rope: x must have shape [B, T, H, D], got ", x.sizes());
  TORCH_CHECK(x.size(3) % 2 == 0, "llama_mm.rope: x's head dim D must be even, got ", x.size(3));
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == x.size(0) && positions.size(1) == x.size(1),
              "llama_mm.rope: positions must have shape [B, T] = [", x.size(0), ", ", x.size(1), "], got ",
              positions.sizes());
  TORCH_CHECK(positions.scalar_type() == at::kLong, "llama_mm.rope: positions must be int64, got ",
              positions.scalar_type());
  TORCH_CHECK(inv_freq.dim() == 1 && inv_freq.size(0) == x.size(3) / 2,
              "llama_mm.rope: inv_freq must have shape [D/2] = [", x.size(3) / 2, "], got ", inv_freq.sizes());
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat, "llama_mm.rope: inv_freq must be float32, got ",
              inv_freq.scalar_type());
  check_device(positions, x, type, "rope", "positions", "x");
  check_device(inv_freq, x, type, "rope", "inv_freq", "x");
}

// gate [..., F], up [..., F] (same shape)
inline void check_silu_mul_args(const at::Tensor& gate, const at::Tensor& up, c10::DeviceType type) {
  check_float_dtype(gate, "silu_mul", "gate");
  TORCH_CHECK(up.sizes() == gate.sizes(), "llama_mm.silu_mul: up must have the shape of gate (", gate.sizes(),
              "), got ", up.sizes());
  check_same_dtype(up, gate, "silu_mul", "up", "gate");
  check_device(up, gate, type, "silu_mul", "up", "gate");
}

// qlinear: x [..., K]; packed int32 [N, K*bits/32]; scale [N, K/group_size] (any float dtype); zero int8
// [N, K/group_size] or none; bits 4 or 8; group_size divides K.
inline void check_qlinear_args(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                               const std::optional<at::Tensor>& zero, int64_t bits, int64_t group_size,
                               c10::DeviceType type, const char* op = "qlinear") {
  check_float_dtype(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, "llama_mm.", op, ": x must have shape [..., K], got a 0-dim tensor");
  TORCH_CHECK(bits == 4 || bits == 8, "llama_mm.", op, ": bits must be 4 or 8, got ", bits);
  const int64_t K = x.size(-1);
  TORCH_CHECK(K > 0, "llama_mm.", op, ": x must have K > 0 input features, got shape ", x.sizes());
  TORCH_CHECK(group_size > 0 && K % group_size == 0, "llama_mm.", op, ": group_size must divide K = ", K,
              " (the last dim of x ", x.sizes(), "), got ", group_size);
  TORCH_CHECK(K * bits % 32 == 0, "llama_mm.", op, ": K = ", K, " must be a multiple of ", 32 / bits,
              " (32 / bits) to pack into int32 words");
  TORCH_CHECK(packed.scalar_type() == at::kInt, "llama_mm.", op, ": packed must be int32, got ",
              packed.scalar_type());
  TORCH_CHECK(packed.dim() == 2 && packed.size(1) == K * bits / 32, "llama_mm.", op, ": packed must have shape [N, ",
              K * bits / 32, "] (K * bits / 32 for K = ", K, ", bits = ", bits, "), got ", packed.sizes());
  const int64_t N = packed.size(0), G = K / group_size;
  check_float_dtype(scale, op, "scale");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.size(1) == G,
              "llama_mm.", op, ": scale must have shape [N, K / group_size] = [", N, ", ", G, "], got ",
              scale.sizes());
  check_device(packed, x, type, op, "packed", "x");
  check_device(scale, x, type, op, "scale", "x");
  if (zero.has_value()) {
    TORCH_CHECK(zero->scalar_type() == at::kChar, "llama_mm.", op, ": zero must be int8, got ", zero->scalar_type());
    TORCH_CHECK(zero->dim() == 2 && zero->size(0) == N && zero->size(1) == G,
                "llama_mm.", op, ": zero must have shape [N, K / group_size] = [", N, ", ", G, "], got ",
                zero->sizes());
    check_device(*zero, x, type, op, "zero", "x");
  }
}

// paged_attention: q [B, H, D]; k_pool, v_pool [num_blocks, Hkv, block_size, D] (q's dtype, unit stride along D);
// block_tables [B, max_blocks] int32/int64; lengths [B] int32/int64 (the values are checked by the CPU kernel, which
// reads them on the host; the CUDA kernel clamps them).
inline void check_paged_attention_args(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                       const at::Tensor& block_tables, const at::Tensor& lengths,
                                       c10::DeviceType type) {
  const char* op = "paged_attention";
  check_float_dtype(q, op, "q");
  TORCH_CHECK(q.dim() == 3, "llama_mm.paged_attention: q must be [B, H, D], got ", q.sizes());
  TORCH_CHECK(k_pool.dim() == 4 && v_pool.sizes() == k_pool.sizes(),
              "llama_mm.paged_attention: k_pool and v_pool must be [num_blocks, Hkv, block_size, D] of one shape, "
              "got k_pool ", k_pool.sizes(), " v_pool ", v_pool.sizes());
  TORCH_CHECK(k_pool.size(3) == q.size(2), "llama_mm.paged_attention: head_dim of k_pool ", k_pool.sizes(),
              " differs from q ", q.sizes());
  TORCH_CHECK(k_pool.size(1) > 0 && q.size(1) % k_pool.size(1) == 0, "llama_mm.paged_attention: query heads ",
              q.size(1), " not a multiple of kv heads ", k_pool.size(1));
  check_same_dtype(k_pool, q, op, "k_pool", "q");
  check_same_dtype(v_pool, q, op, "v_pool", "q");
  TORCH_CHECK(q.stride(2) == 1 && k_pool.stride(3) == 1 && v_pool.stride(3) == 1,
              "llama_mm.paged_attention: the head dim of q, k_pool and v_pool must be contiguous");
  for (const auto* t : {&block_tables, &lengths})
    TORCH_CHECK(t->scalar_type() == at::kInt || t->scalar_type() == at::kLong, "llama_mm.paged_attention: ",
                t == &lengths ? "lengths" : "block_tables", " must be int32 or int64, got ", t->scalar_type());
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0) && block_tables.size(1) > 0,
              "llama_mm.paged_attention: block_tables must be [B, max_blocks] with B = ", q.size(0), ", got ",
              block_tables.sizes());
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == q.size(0), "llama_mm.paged_attention: lengths must be [B] = [",
              q.size(0), "], got ", lengths.sizes());
  check_device(k_pool, q, type, op, "k_pool", "q");
  check_device(v_pool, q, type, op, "v_pool", "q");
  check_device(block_tables, q, type, op, "block_tables", "q");
  check_device(lengths, q, type, op, "lengths", "q");
}

// t [..., D] as [N, D] with unit stride along D: a view when the leading dims allow it, else a contiguous copy.
inline at::Tensor as_rows(const at::Tensor& t) {
  at::Tensor r = t.reshape({-1, t.size(-1)});
  return (r.size(1) <= 1 || r.stride(1) == 1) ? r : r.contiguous();
}

// `out` of an *_out variant: contiguous, with the shape, dtype and device of `like`.
inline void check_out(const at::Tensor& out, const at::Tensor& like, const char* op) {
  TORCH_CHECK(out.sizes() == like.sizes(), "llama_mm.", op, ": out must have shape ", like.sizes(), ", got ",
              out.sizes());
  TORCH_CHECK(out.scalar_type() == like.scalar_type(), "llama_mm.", op, ": out must have dtype ",
              like.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK(out.device() == like.device(), "llama_mm.", op, ": out must be on ", like.device(), ", got ",
              out.device());
  TORCH_CHECK(out.is_contiguous(), "llama_mm.", op, ": out must be contiguous");
}

}  // namespace llama_mm
