// Fused SwiGLU activation silu(gate) * up, CPU (see ops.h).
// Rounds like the reference `F.silu(gate) * up`: silu in float32 as gate / (1 + exp(-gate)) (ATen's formula),
// rounded to the dtype, then the product rounded to the dtype.
#include <ATen/Parallel.h>

#include "cpu_utils.h"
#include "op_common.h"
#include "ops.h"

namespace llama_mm::cpu {
namespace {

template <typename T>
void silu_mul_row(const T* gate, const T* up, T* out, int64_t F) {
  const fVec one(1.0f);
  fVec g_lo, g_hi, u_lo, u_hi;
  for (int64_t j = 0; j < F; j += kChunk) {
    const int64_t n = std::min(kChunk, F - j);
    load2(gate + j, n, g_lo, g_hi);
    load2(up + j, n, u_lo, u_hi);
    fVec s_lo = g_lo / (one + g_lo.neg().exp());
    fVec s_hi = g_hi / (one + g_hi.neg().exp());
    round2<T>(s_lo, s_hi);
    store2(out + j, n, s_lo * u_lo, s_hi * u_hi);
  }
}

}  // namespace

void silu_mul_out(at::Tensor& out, const at::Tensor& gate, const at::Tensor& up) {
  check_silu_mul_args(gate, up, c10::DeviceType::CPU);
  check_out(out, gate, "silu_mul");
  if (gate.numel() == 0) return;
  const at::Tensor g = as_rows(gate), u = as_rows(up);  // [N, F]
  const int64_t N = g.size(0), F = g.size(1), g_stride = g.stride(0), u_stride = u.stride(0);
  LLAMA_MM_DISPATCH_FLOAT_TYPES(gate.scalar_type(), "llama_mm.silu_mul", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* up_ = u.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(F), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        silu_mul_row(gp + r * g_stride, up_ + r * u_stride, op + r * F, F);
      }
    });
  });
}

at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  silu_mul_out(out, gate, up);
  return out;
}

}  // namespace llama_mm::cpu
