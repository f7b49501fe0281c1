// Small-batch linear layer for the decode step (CPU): y[b, n] = sum_k x[b, k] * w[n, k], b < 8.
//
// At batch 1-8 a linear layer is a matrix-vector product bound by reading w once. This kernel streams each weight
// row once for all batch rows, widening bfloat16/float16 weights to float32 in registers and accumulating in
// float32 (products exact, one rounding of the output to the input dtype), parallel over output rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "gemv.h"

namespace llama_mm::cpu {
namespace {

constexpr int64_t kMaxRows = 8;
constexpr int64_t kTile = 4;  // weight rows per inner iteration (x is reused from registers/L1 across them)

template <typename T>
inline float widen(T v) {
  return static_cast<float>(v);
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  auto u16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(u16), 16));
}
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

// rows [n0, n1) of y (float32, [B, N]) from x (float32, [B, K]) and w (T, [N, K], rows contiguous)
template <typename T>
void gemv_rows(const float* x, int64_t B, const T* w, int64_t w_stride, int64_t K, int64_t N, int64_t n0,
               int64_t n1, float* y) {
  int64_t n = n0;
#if defined(__AVX512F__)
  for (; n + kTile <= n1; n += kTile) {
    __m512 acc[kTile][kMaxRows];
    for (int t = 0; t < kTile; ++t)
      for (int64_t b = 0; b < B; ++b) acc[t][b] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      __m512 wv[kTile];
      for (int t = 0; t < kTile; ++t) wv[t] = load16(w + (n + t) * w_stride + k);
      for (int64_t b = 0; b < B; ++b) {
        const __m512 xv = _mm512_loadu_ps(x + b * K + k);
        for (int t = 0; t < kTile; ++t) acc[t][b] = _mm512_fmadd_ps(wv[t], xv, acc[t][b]);
      }
    }
    for (int t = 0; t < kTile; ++t)
      for (int64_t b = 0; b < B; ++b) {
        float s = _mm512_reduce_add_ps(acc[t][b]);
        for (int64_t kk = k; kk < K; ++kk) s += widen(w[(n + t) * w_stride + kk]) * x[b * K + kk];
        y[b * N + n + t] = s;
      }
  }
#endif
  for (; n < n1; ++n)
    for (int64_t b = 0; b < B; ++b) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += widen(w[n * w_stride + k]) * x[b * K + k];
      y[b * N + n] = s;
    }
}

}  // namespace

bool gemv_applies(const at::Tensor& x, const at::Tensor& w) {
  if (!x.device().is_cpu() || !w.device().is_cpu() || w.dim() != 2 || x.size(-1) != w.size(1)) return false;
  if (x.scalar_type() != w.scalar_type() || w.stride(1) != 1) return false;
  const auto t = w.scalar_type();
  if (t != at::kFloat && t != at::kBFloat16 && t != at::kHalf) return false;
  return x.numel() / std::max<int64_t>(1, x.size(-1)) <= kMaxRows;
}

at::Tensor gemv(const at::Tensor& x_in, const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "gemv: weight must be [N, K], got ", w.sizes());
  TORCH_CHECK(x_in.size(-1) == w.size(1), "gemv: x ", x_in.sizes(), " and weight ", w.sizes(), " disagree on K");
  TORCH_CHECK(x_in.scalar_type() == w.scalar_type(), "gemv: x and weight must share a dtype, got ",
              x_in.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(x_in.device().is_cpu() && w.device().is_cpu(), "gemv: CPU tensors expected");
  TORCH_CHECK(w.stride(1) == 1, "gemv: weight rows must be contiguous");
  const int64_t K = w.size(1), N = w.size(0);
  const int64_t B = x_in.numel() / std::max<int64_t>(1, K);
  TORCH_CHECK(B <= kMaxRows, "gemv: at most ", kMaxRows, " rows, got ", B);
  auto x = x_in.reshape({B, K}).to(at::kFloat).contiguous();
  auto y = at::empty({B, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // ~64 KiB of weights per task: enough work per thread to stream, enough tasks to balance
  const int64_t grain = std::max<int64_t>(kTile, (64 * 1024 / (K * w.element_size()) + kTile - 1) / kTile * kTile);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* wp = w.data_ptr<T>();
    at::parallel_for(0, (N + kTile - 1) / kTile, std::max<int64_t>(1, grain / kTile), [&](int64_t t0, int64_t t1) {
      gemv_rows<T>(xp, B, wp, w.stride(0), K, N, t0 * kTile, std::min(N, t1 * kTile), yp);
    });
  };
  switch (w.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(at::BFloat16{}); break;
    case at::kHalf: run(at::Half{}); break;
    default: TORCH_CHECK(false, "gemv: dtype ", w.scalar_type(), " not supported (float32, bfloat16, float16)");
  }
  auto out_sizes = x_in.sizes().vec();
  out_sizes.back() = N;
  return y.to(x_in.scalar_type()).view(out_sizes);
}

}  // namespace llama_mm::cpu
