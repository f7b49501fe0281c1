// Small-batch linear layer for the decode step (CPU): y[b, n] = sum_k x[b, k] * w[n, k], b < 8.
//
// At batch 1-8 a linear layer is a matrix-vector product bound by reading w once. This kernel streams each weight
// row once for all batch rows, parallel over output rows; products are exact in float32 (bfloat16 pairs through
// vdpbf16ps, other types widened to float32 in registers), summed in float32 and rounded once to the input dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_utils.h"
#include "gemv.h"

namespace llama_mm::cpu {
namespace {

constexpr int64_t kMaxRows = 8;

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


// Dot products of x (T, [K]) with S weight rows at once, summed in float32. The S rows come from S distant parts of
// the weight matrix, so the loads form S independent sequential streams: one stream per core leaves memory
// bandwidth unused. Each stream is also prefetched kPrefetchBytes ahead (past a row's end that is the stream's
// next row): the hardware prefetcher stops at every 4 KiB page. Measured on the 2-core dev machine, the weights of
// one decode step in bf16: 1 stream ~17 GB/s, 4 streams 27 GB/s, 4 streams + 1 KiB prefetch 31 GB/s (its read
// bandwidth, bench/cpp/read_bandwidth.cpp: 31.6 GB/s).
constexpr int64_t kPrefetchBytes = 1024;

inline void prefetch(const void* p) { __builtin_prefetch(static_cast<const char*>(p) + kPrefetchBytes, 0, 3); }

template <typename T, int S>
inline void dot_rows(const T* x, const T* const* wr, int64_t K, float* sums) {
  int64_t k = 0;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    // vdpbf16ps: 32 bf16 products (exact in float32) summed in pairs into float32 lanes, no widening needed
    __m512 acc[S][2];
    for (int s = 0; s < S; ++s) acc[s][0] = acc[s][1] = _mm512_setzero_ps();
    for (; k + 64 <= K; k += 64) {
      const __m512bh x0 = load32_bh(x + k), x1 = load32_bh(x + k + 32);
      for (int s = 0; s < S; ++s) {
        prefetch(wr[s] + k);
        prefetch(wr[s] + k + 32);
        acc[s][0] = _mm512_dpbf16_ps(acc[s][0], load32_bh(wr[s] + k), x0);
        acc[s][1] = _mm512_dpbf16_ps(acc[s][1], load32_bh(wr[s] + k + 32), x1);
      }
    }
    for (; k + 32 <= K; k += 32)
      for (int s = 0; s < S; ++s) acc[s][0] = _mm512_dpbf16_ps(acc[s][0], load32_bh(wr[s] + k), load32_bh(x + k));
    for (int s = 0; s < S; ++s) sums[s] = _mm512_reduce_add_ps(_mm512_add_ps(acc[s][0], acc[s][1]));
  } else
#endif
  {
#if defined(__AVX512F__)
    __m512 acc[S][2];
    for (int s = 0; s < S; ++s) acc[s][0] = acc[s][1] = _mm512_setzero_ps();
    for (; k + 32 <= K; k += 32) {
      const __m512 x0 = load16(x + k), x1 = load16(x + k + 16);
      for (int s = 0; s < S; ++s) {
        const char* bytes = reinterpret_cast<const char*>(wr[s] + k);
        for (int64_t line = 0; line < 32 * int64_t(sizeof(T)); line += 64) prefetch(bytes + line);
        acc[s][0] = _mm512_fmadd_ps(load16(wr[s] + k), x0, acc[s][0]);
        acc[s][1] = _mm512_fmadd_ps(load16(wr[s] + k + 16), x1, acc[s][1]);
      }
    }
    for (; k + 16 <= K; k += 16)
      for (int s = 0; s < S; ++s) acc[s][0] = _mm512_fmadd_ps(load16(wr[s] + k), load16(x + k), acc[s][0]);
    for (int s = 0; s < S; ++s) sums[s] = _mm512_reduce_add_ps(_mm512_add_ps(acc[s][0], acc[s][1]));
#else
    for (int s = 0; s < S; ++s) sums[s] = 0.f;
#endif
  }
  for (; k < K; ++k)
    for (int s = 0; s < S; ++s) sums[s] += widen(wr[s][k]) * widen(x[k]);
}

// Batch 1, rows [n0, n1) of y: the block is cut into kStreams contiguous parts walked side by side, one row of each
// per step; the rows left over (fewer than kStreams) go one at a time.
constexpr int kStreams = 4;

template <typename T>
void gemv_rows_1(const T* x, const T* w, int64_t w_stride, int64_t K, int64_t n0, int64_t n1, T* y) {
  const int64_t part = (n1 - n0) / kStreams;
  for (int64_t i = 0; i < part; ++i) {
    const T* wr[kStreams];
    float sums[kStreams];
    for (int s = 0; s < kStreams; ++s) wr[s] = w + (n0 + s * part + i) * w_stride;
    dot_rows<T, kStreams>(x, wr, K, sums);
    for (int s = 0; s < kStreams; ++s) y[n0 + s * part + i] = static_cast<T>(sums[s]);
  }
  for (int64_t n = n0 + kStreams * part; n < n1; ++n) {
    const T* wr = w + n * w_stride;
    float sum;
    dot_rows<T, 1>(x, &wr, K, &sum);
    y[n] = static_cast<T>(sum);
  }
}

// Batch 2-8, rows [n0, n1) of y (T, [B, N], each value rounded once from its float32 sum) from x (T, [B, K],
// contiguous) and w (T, [N, K], rows contiguous): each weight row is read once (prefetched ahead) for all B rows of
// x, which stay in L1. bfloat16 multiplies pairs with vdpbf16ps as batch 1 does; other types widen to float32.
template <typename T, int B>
void gemv_rows(const T* x, const T* w, int64_t w_stride, int64_t K, int64_t N, int64_t n0, int64_t n1, T* y) {
  for (int64_t n = n0; n < n1; ++n) {
    const T* wr = w + n * w_stride;
    float sums[B];
    int64_t k = 0;
#if defined(__AVX512F__)
    __m512 acc[B];
    for (int b = 0; b < B; ++b) acc[b] = _mm512_setzero_ps();
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, at::BFloat16>) {
        for (; k + 32 <= K; k += 32) {
        prefetch(wr + k);
        const __m512bh wv = load32_bh(wr + k);
        for (int b = 0; b < B; ++b) acc[b] = _mm512_dpbf16_ps(acc[b], wv, load32_bh(x + b * K + k));
      }
    } else
#endif
    {
      for (; k + 16 <= K; k += 16) {
        if (k % (64 / sizeof(T)) == 0) prefetch(wr + k);
        const __m512 wv = load16(wr + k);
        for (int b = 0; b < B; ++b) acc[b] = _mm512_fmadd_ps(wv, load16(x + b * K + k), acc[b]);
      }
    }
    for (int b = 0; b < B; ++b) sums[b] = _mm512_reduce_add_ps(acc[b]);
#else
    for (int b = 0; b < B; ++b) sums[b] = 0.f;
#endif
    for (; k < K; ++k) {
      const float wk = widen(wr[k]);
      for (int b = 0; b < B; ++b) sums[b] += wk * widen(x[b * K + k]);
    }
    for (int b = 0; b < B; ++b) y[b * N + n] = static_cast<T>(sums[b]);
  }
}

template <typename T>
void gemv_dispatch(const T* x, int64_t B, const T* w, int64_t ws, int64_t K, int64_t N, int64_t n0, int64_t n1,
                   T* y) {
  switch (B) {
    case 1: return gemv_rows_1<T>(x, w, ws, K, n0, n1, y);
    case 2: return gemv_rows<T, 2>(x, w, ws, K, N, n0, n1, y);
    case 3: return gemv_rows<T, 3>(x, w, ws, K, N, n0, n1, y);
    case 4: return gemv_rows<T, 4>(x, w, ws, K, N, n0, n1, y);
    case 5: return gemv_rows<T, 5>(x, w, ws, K, N, n0, n1, y);
    case 6: return gemv_rows<T, 6>(x, w, ws, K, N, n0, n1, y);
    case 7: return gemv_rows<T, 7>(x, w, ws, K, N, n0, n1, y);
    default: return gemv_rows<T, 8>(x, w, ws, K, N, n0, n1, y);
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
  auto x = x_in.reshape({B, K}).contiguous();
  auto y = at::empty({B, N}, x_in.options());  // written in the output dtype: no conversion pass afterwards
  // at least ~64 KiB of weights per task; parallel_for gives each thread one contiguous block of rows
  const int64_t grain = std::max<int64_t>(1, 64 * 1024 / (K * w.element_size()));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* wp = w.data_ptr<T>();
    const T* xp = x.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      gemv_dispatch<T>(xp, B, wp, w.stride(0), K, N, n0, n1, yp);
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
  return y.view(out_sizes);
}

}  // namespace llama_mm::cpu
