// On CPUs without bfloat16 / float16 arithmetic, at::linear's 16-bit GEMM runs far below the float32 one (measured
// on 2 Zen 3 cores, bfloat16: an image's cross K/V product 6404 x 4096 -> 1024 4.98 s against 0.60 s widened; the
// vision tower's MLP 6432 x 1280 -> 5120 7.46 s against 0.89 s; a 512-token prompt's MLP up 4096 -> 14336 3.22 s
// against 0.71 s). Widening a block of weight rows costs N x K conversions against the GEMM's M x N x K products.
#include "widened_linear.h"

#include <algorithm>
#include <optional>

namespace llama_mm::cpu {
namespace {

constexpr int64_t kBlockBytes = 8 << 20;  // float32 weight rows widened at a time

bool cpu_has_16bit_arithmetic(at::ScalarType t) {
#if defined(__x86_64__) || defined(__i386__)
  static const bool bf16 = __builtin_cpu_supports("avx512bf16");
  static const bool fp16 = __builtin_cpu_supports("avx512fp16");
  return t == at::kBFloat16 ? bf16 : fp16;
#else
  return true;  // elsewhere: trust at::linear
#endif
}

}  // namespace

bool widened_linear_applies(const at::Tensor& x, const at::Tensor& w) {
  const auto t = w.scalar_type();
  return x.device().is_cpu() && w.device().is_cpu() && w.dim() == 2 && x.scalar_type() == t &&
         (t == at::kBFloat16 || t == at::kHalf) && !cpu_has_16bit_arithmetic(t);
}

at::Tensor widened_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && x.size(-1) == w.size(1), "widened_linear: x ", x.sizes(), " and weight ", w.sizes(),
              " disagree on K");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "widened_linear: x and weight must share a dtype, got ",
              x.scalar_type(), " and ", w.scalar_type());
  const int64_t N = w.size(0), K = w.size(1);
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "widened_linear: bias must be [N] = [", N, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == w.scalar_type() && bias->device() == w.device(),
                "widened_linear: bias must have the weight's dtype and device, got ", bias->scalar_type(), " on ",
                bias->device());
  }
  const auto xf = x.reshape({-1, K}).to(at::kFloat);  // [M, K]
  auto y = at::empty({xf.size(0), N}, x.options());   // [M, N] in the dtype
  const int64_t block = std::max<int64_t>(1, kBlockBytes / (K * 4));
  for (int64_t n0 = 0; n0 < N; n0 += block) {
    const int64_t n = std::min(block, N - n0);
    const std::optional<at::Tensor> b =
        bias ? std::optional<at::Tensor>(bias->narrow(0, n0, n).to(at::kFloat)) : std::nullopt;
    y.narrow(1, n0, n).copy_(at::linear(xf, w.narrow(0, n0, n).to(at::kFloat), b));  // rounded once
  }
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return y.view(sizes);
}

}  // namespace llama_mm::cpu
