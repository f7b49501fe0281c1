// Small-batch linear layer for the decode step (CPU): y[b, n] = sum_k x[b, k] * w[n, k], up to kMaxRows rows of x.
//
// At a few rows a linear layer is bound by reading w once. This kernel streams each weight row once for all rows
// of x, parallel over output rows; products are exact in float32 (bfloat16 pairs through vdpbf16ps, other types
// widened to float32 in registers), summed in float32 and rounded once to the input dtype.
//
// Batch invariance: every (x row, weight row) dot product is summed in one fixed order (dot_tile below), whatever
// the number of rows M and however the rows are grouped into tiles, so a row's output does not depend on the other
// rows of the batch (the continuous-batching scheduler relies on it: a request's tokens are the same alone or among
// others). at::linear (MKL) gives no such promise, hence kMaxRows = the scheduler's largest batch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_utils.h"
#include "gemv.h"

namespace llama_mm::cpu {
namespace {

constexpr int64_t kMaxRows = 64;

template <typename T>
inline float widen(T v) {
  return static_cast<float>(v);
}

// The weight rows of a tile come from distant parts of the matrix, so the loads form independent sequential
// streams: one stream per core leaves memory bandwidth unused. Each stream is also prefetched kPrefetchBytes ahead
// (past a row's end that is the stream's next row): the hardware prefetcher stops at every 4 KiB page. Measured on
// the 2-core dev machine, the weights of one decode step in bf16: 1 stream ~17 GB/s, 4 streams 27 GB/s, 4 streams
// + 1 KiB prefetch 31 GB/s (its read bandwidth, bench/cpp/read_bandwidth.cpp: 31.6 GB/s).
constexpr int64_t kPrefetchBytes = 1024;

inline void prefetch(const void* p) { __builtin_prefetch(static_cast<const char*>(p) + kPrefetchBytes, 0, 3); }

// sums[s * R + r] = w[s] . x[r] over K for S weight rows and R rows of x. The order of one dot product is fixed and
// depends on nothing but K: with vdpbf16ps (x bfloat16) two accumulators over chunks of two vectors (acc0 the first,
// acc1 the second), a last single vector into acc0, acc0 + acc1 summed across lanes; otherwise (x widened to float32
// once per call) one accumulator over vectors, summed across lanes; then the scalar tail in order.
template <typename T, typename XT, int S, int R>
inline void dot_tile(const XT* const* x, const T* const* w, int64_t K, float* sums) {
  int64_t k = 0;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    static_assert(std::is_same_v<XT, at::BFloat16>, "vdpbf16ps takes x as bfloat16");
    // vdpbf16ps: 32 bf16 products (exact in float32) summed in pairs into float32 lanes, no widening needed
    __m512 acc[S][R][2];
    for (int s = 0; s < S; ++s)
      for (int r = 0; r < R; ++r) acc[s][r][0] = acc[s][r][1] = _mm512_setzero_ps();
    for (; k + 64 <= K; k += 64) {
      __m512bh x0[R], x1[R];
      for (int r = 0; r < R; ++r) x0[r] = load32_bh(x[r] + k), x1[r] = load32_bh(x[r] + k + 32);
      for (int s = 0; s < S; ++s) {
        prefetch(w[s] + k);
        prefetch(w[s] + k + 32);
        const __m512bh w0 = load32_bh(w[s] + k), w1 = load32_bh(w[s] + k + 32);
        for (int r = 0; r < R; ++r) {
          acc[s][r][0] = _mm512_dpbf16_ps(acc[s][r][0], w0, x0[r]);
          acc[s][r][1] = _mm512_dpbf16_ps(acc[s][r][1], w1, x1[r]);
        }
      }
    }
    for (; k + 32 <= K; k += 32)
      for (int s = 0; s < S; ++s)
        for (int r = 0; r < R; ++r)
          acc[s][r][0] = _mm512_dpbf16_ps(acc[s][r][0], load32_bh(w[s] + k), load32_bh(x[r] + k));
    for (int s = 0; s < S; ++s)
      for (int r = 0; r < R; ++r) sums[s * R + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[s][r][0], acc[s][r][1]));
  } else
#endif
  {
    static_assert(std::is_same_v<XT, float>, "x is widened to float32 once per call on this path");
    // S x R accumulators, S weight vectors and one x vector live at a time: within the 16 vector registers of
    // AVX2 for the tiles used (4 x 1 at one row, 2 x 4 at more), so the FMAs run at the core's full rate
    constexpr int64_t V = fVec::size(), kStepBytes = V * sizeof(T);
    fVec acc[S][R];
    for (int s = 0; s < S; ++s)
      for (int r = 0; r < R; ++r) acc[s][r] = fVec(0.f);
    for (; k + V <= K; k += V) {
      fVec wv[S];
      for (int s = 0; s < S; ++s) {
        const char* bytes = reinterpret_cast<const char*>(w[s] + k);
        if constexpr (kStepBytes >= 64) {
          for (int64_t line = 0; line < kStepBytes; line += 64) prefetch(bytes + line);
        } else if ((k * int64_t(sizeof(T))) % 64 == 0) {
          prefetch(bytes);
        }
        wv[s] = load1(w[s] + k);
      }
      for (int r = 0; r < R; ++r) {
        const fVec xv = fVec::loadu(x[r] + k);
        for (int s = 0; s < S; ++s) acc[s][r] = at::vec::fmadd(wv[s], xv, acc[s][r]);
      }
    }
    for (int s = 0; s < S; ++s)
      for (int r = 0; r < R; ++r) sums[s * R + r] = hsum(acc[s][r]);
  }
  for (; k < K; ++k)
    for (int s = 0; s < S; ++s)
      for (int r = 0; r < R; ++r) sums[s * R + r] = std::fma(widen(w[s][k]), widen(x[r][k]), sums[s * R + r]);
}

// Output rows n[0..S) of y (T, [M, N] row-major) for the R rows of x starting at x row r0.
template <typename T, typename XT, int S, int R>
inline void tile(const XT* x, int64_t r0, const T* w, int64_t w_stride, int64_t K, int64_t N, const int64_t* n,
                 T* y) {
  const XT* xr[R];
  const T* wr[S];
  float sums[S * R];
  for (int r = 0; r < R; ++r) xr[r] = x + (r0 + r) * K;
  for (int s = 0; s < S; ++s) wr[s] = w + n[s] * w_stride;
  dot_tile<T, XT, S, R>(xr, wr, K, sums);
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < R; ++r) y[(r0 + r) * N + n[s]] = static_cast<T>(sums[s * R + r]);
}

// Output rows n[0..S) for all M rows of x, four x rows at a time.
template <typename T, typename XT, int S>
void tile_all_rows(const XT* x, int64_t M, const T* w, int64_t ws, int64_t K, int64_t N, const int64_t* n, T* y) {
  int64_t r0 = 0;
  for (; r0 + 4 <= M; r0 += 4) tile<T, XT, S, 4>(x, r0, w, ws, K, N, n, y);
  switch (M - r0) {
    case 3: tile<T, XT, S, 3>(x, r0, w, ws, K, N, n, y); break;
    case 2: tile<T, XT, S, 2>(x, r0, w, ws, K, N, n, y); break;
    case 1: tile<T, XT, S, 1>(x, r0, w, ws, K, N, n, y); break;
    default: break;
  }
}

// kPanelMinRows rows of x or more, x in float32 (every weight dtype, except bfloat16 with vdpbf16ps, whose pairwise
// order belongs to the tiles): each weight value is used M times, so the product is bound by the multiply-adds as
// much as by the reads, and the tiles above, re-reading x from L2 for every two weight rows, leave the FMA units
// mostly idle. Here K is cut into panels of pk = panel_k(M, ...) values; x is laid out once per call panel by panel
// (pack_x_panels: each panel's M row pieces contiguous, so they do not fall on the same L1 sets as rows K floats
// apart do), and kPanelRows weight rows' panels, read in place, are multiplied by every group of kPanelTileRows x
// rows while they sit in L1: 6 x 2 accumulators, 6 + 2 loads per 12 FMAs (bfloat16 / float16 weights widened in
// the register). The next panel (after a row group's last, the next group's first) is prefetched into L2 a share
// before each group of x rows, so that its reads spread over the whole panel's work. The accumulators wait in
// memory between panels, so each dot product is still summed lane by lane over k in order, then across lanes
// (hsum), then the scalar tail: dot_tile's order, bit for bit, whatever M (batch invariance holds across the two
// paths).
// Measured on 2 Zen 3 cores (one decode step's products, weights streamed from memory, kernels alternated in one
// process): weight rows read in place with the prefetch spread, against session 7's copy of each panel into an L1
// buffer with the prefetch issued during the first pair, float32 1.16-1.20x at 16 rows, 1.09x at 32, 1.0-1.04x at
// 64, and 1.39x at 8 and 16 rows at the 11B shapes; 4 x 3 tiles 0.85-0.9x of 6 x 2; prefetch 2-3 panels ahead 1.0x,
// into L1 0.87-0.97x. bfloat16 weights on panels against the tiles: 1.17-1.33x at 8 rows, 1.02-1.17x at 16,
// 1.0-1.06x at 32 (widening each panel into a buffer instead made 2-4 rows 0.8x and 16 rows even, session 7).
// Panels at 2-4 rows measured 0.85-1.05x the tiles, hence from 8 rows; panels of 1024 values no better than 512.
constexpr int kPanelRows = 6;
constexpr int kPanelTileRows = 2;
constexpr int64_t kPanelKMax = 512;
constexpr int64_t kPanelMinRows = 8;
constexpr int64_t kTaskBytes = 256 * 1024;

// Values per panel at M rows of x (weights of `bytes` per value): float32 weights 128 up to 12 rows, 256 up to
// 48, 512 beyond; 16-bit weights (widened in the register, which bounds them) 256 up to 8 rows, else 512.
// Measured on 2 Zen 3 cores, one decode step's products (the 450M checkpoint's shapes, weights streamed), the widths
// alternated in one process: float32 at 8 rows 128 1.15x of 512 (256 1.09x), 12 rows 1.11x, 16-32 rows 256
// 1.03-1.05x (128 1.00-1.04x), 48 rows 256 1.02x, 64 rows 512 best (256 0.98x, 128 0.93x); bfloat16 8 rows 256
// 1.05x, 16-64 rows 512 within 1% of 256 and 2-4% ahead of 128.
inline int64_t panel_k(int64_t M, int64_t bytes) {
  if (bytes == 4) return M <= 12 ? 128 : M <= 48 ? 256 : kPanelKMax;
  return M <= 8 ? 256 : kPanelKMax;
}

// Number of panels of the first K - K % V values (the vector part; the rest is the scalar tail).
inline int64_t panel_count(int64_t K, int64_t pk) { return (K - K % fVec::size() + pk - 1) / pk; }

// xp [panel_count(K, pk), M, pk] <- x [M, K] (float32): panel p holds x[:, p * pk, ...) of each row.
inline void pack_x_panels(const float* x, int64_t M, int64_t K, int64_t pk, float* xp) {
  const int64_t Kv = K - K % fVec::size();
  for (int64_t k0 = 0, p = 0; k0 < Kv; k0 += pk, ++p)
    for (int64_t r = 0; r < M; ++r)
      std::copy(x + r * K + k0, x + r * K + std::min(Kv, k0 + pk), xp + (p * M + r) * pk);
}

// acc[s * M + r] += w[s * ws, + kn) . x[r * pk, + kn) lane by lane, for S weight rows (ws apart) and R rows
// of x, kn % V == 0.
template <typename T, int S, int R>
inline void panel_tile(const T* w, int64_t ws, const float* x, int64_t M, int64_t pk, int64_t kn, float* acc) {
  constexpr int64_t V = fVec::size();
  fVec a[S][R];
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < R; ++r) a[s][r] = fVec::loadu(acc + (s * M + r) * V);
  for (int64_t k = 0; k < kn; k += V) {
    fVec xv[R];
    for (int r = 0; r < R; ++r) xv[r] = fVec::loadu(x + r * pk + k);
    for (int s = 0; s < S; ++s) {
      fVec wv = load1(w + s * ws + k);  // bfloat16 / float16 widened in the register
      in_register(wv);  // one load for its R uses, not one folded into each FMA (the loop would be load-bound)
      for (int r = 0; r < R; ++r) a[s][r] = at::vec::fmadd(wv, xv[r], a[s][r]);
    }
  }
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < R; ++r) a[s][r].store(acc + (s * M + r) * V);
}

// panel_tile for the next min(left, R) rows of x.
template <typename T, int S, int R>
inline void panel_group(const T* w, int64_t ws, const float* x, int64_t M, int64_t pk, int64_t kn, float* acc,
                        int64_t left) {
  if constexpr (R > 0) {
    if (left >= R) panel_tile<T, S, R>(w, ws, x, M, pk, kn, acc);
    else panel_group<T, S, R - 1>(w, ws, x, M, pk, kn, acc, left);
  }
}

// Output rows [n0, n0 + S) of y for all M rows of x (x [M, K], xp its panels), in a task ending at row n1.
template <typename T, int S>
void panel_rows(const float* x, const float* xp, int64_t M, const T* w, int64_t ws, int64_t K, int64_t N,
                int64_t n0, int64_t n1, int64_t pk, T* y) {
  constexpr int64_t V = fVec::size(), line = 64 / sizeof(T);  // line: elements per line
  const int64_t lines = pk / line;
  constexpr int R = kPanelTileRows;
  const int64_t Kv = K - K % V;
  const int64_t groups = (M + R - 1) / R;
  __at_align__ float acc[S * kMaxRows * V];  // [S, M, V] running lane sums
  std::fill(acc, acc + S * M * V, 0.0f);
  const T* wr = w + n0 * ws;  // [S, ws] these weight rows
  for (int64_t k0 = 0; k0 < Kv; k0 += pk) {
    const int64_t kn = std::min(pk, Kv - k0);
    const float* xk = xp + k0 / pk * M * pk;  // [M, pk] this panel of x
    // the next panel: these rows' next, or after their last the first of the next rows of the task
    const bool last = k0 + pk >= Kv;
    const T* ahead[S];
    for (int s = 0; s < S; ++s) ahead[s] = last ? w + std::min(n0 + S + s, n1 - 1) * ws : wr + s * ws + k0 + pk;
    for (int64_t r = 0, g = 0; r < M; r += R, ++g) {
      for (int64_t l = g * lines / groups; l < (g + 1) * lines / groups; ++l)
        for (int s = 0; s < S; ++s) __builtin_prefetch(ahead[s] + l * line, 0, 2);
      panel_group<T, S, R>(wr + k0, ws, xk + r * pk, M, pk, kn, acc + r * V, M - r);
    }
  }
  for (int s = 0; s < S; ++s)
    for (int64_t r = 0; r < M; ++r) {
      float sum = hsum(fVec::loadu(acc + (s * M + r) * V));
      for (int64_t k = Kv; k < K; ++k) sum = std::fma(widen(wr[s * ws + k]), x[r * K + k], sum);
      y[r * N + n0 + s] = static_cast<T>(sum);
    }
}

template <typename T, int S = kPanelRows>
void panel_block(const float* x, const float* xp, int64_t M, const T* w, int64_t ws, int64_t K, int64_t N,
                 int64_t n0, int64_t n1, int64_t pk, T* y) {
  int64_t n = n0;
  for (; n + S <= n1; n += S) panel_rows<T, S>(x, xp, M, w, ws, K, N, n, n1, pk, y);
  if constexpr (S > 1) {
    if (n < n1) panel_block<T, S - 1>(x, xp, M, w, ws, K, N, n, n1, pk, y);
  }
}

// Rows [n0, n1) of y from x (T, [M, K], contiguous) and w (T, [N, K], rows contiguous). One row of x: the block
// is cut into kStreams contiguous parts walked side by side (one row of each per step), the rows left over one at a
// time. More rows: two adjacent weight rows at a time, read once for all rows of x (which stay in cache); from
// kPanelMinRows rows (x in float32), panel_block instead.
constexpr int kStreams = 4;

template <typename T, typename XT>
void gemv_block(const XT* x, int64_t M, const T* w, int64_t ws, int64_t K, int64_t N, int64_t n0, int64_t n1, T* y) {
  int64_t n = n0;
  if (M == 1) {
    const int64_t part = (n1 - n0) / kStreams;
    for (int64_t i = 0; i < part; ++i) {
      int64_t rows[kStreams];
      for (int s = 0; s < kStreams; ++s) rows[s] = n0 + s * part + i;
      tile<T, XT, kStreams, 1>(x, 0, w, ws, K, N, rows, y);
    }
    n = n0 + kStreams * part;
  } else {
    for (; n + 2 <= n1; n += 2) {
      const int64_t rows[2] = {n, n + 1};
      tile_all_rows<T, XT, 2>(x, M, w, ws, K, N, rows, y);
    }
  }
  for (; n < n1; ++n) tile_all_rows<T, XT, 1>(x, M, w, ws, K, N, &n, y);
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
  auto run = [&](auto tag) {
    using T = decltype(tag);
#if defined(__AVX512BF16__)
    using XT = std::conditional_t<std::is_same_v<T, at::BFloat16>, T, float>;
#else
    using XT = float;
#endif
    // x as the dot products read it: bfloat16 for vdpbf16ps, else float32 (exact), widened once here
    const at::Tensor xw = std::is_same_v<XT, T> ? x : x.to(at::kFloat);  // [B, K]
    const T* wp = w.data_ptr<T>();
    const XT* xp = xw.data_ptr<XT>();
    T* yp = y.data_ptr<T>();
    if constexpr (std::is_same_v<XT, float>) {  // not vdpbf16ps: its pairwise order is the tiles' alone
      if (B >= kPanelMinRows) {
        const int64_t pk = panel_k(B, w.element_size());
        auto panels = at::empty({panel_count(K, pk), B, pk}, xw.options());  // x laid out panel by panel
        const float* xpp = panels.data_ptr<float>();
        pack_x_panels(xp, B, K, pk, panels.data_ptr<float>());
        // tasks of ~256 KiB of weights (whole row groups) for whichever thread is free: the batching engine's step
        // at 16 rows 7% faster than with at::parallel_for's even split (the two alternated in one process)
        const int64_t task = std::max<int64_t>(1, kTaskBytes / (K * w.element_size()) / kPanelRows) * kPanelRows;
        parallel_tasks(N, task, [&](int64_t n0, int64_t n1) {
          panel_block(xp, xpp, B, wp, w.stride(0), K, N, n0, n1, pk, yp);
        });
        return;
      }
    }
    // at least ~64 KiB of weights per task; parallel_for gives each thread one contiguous block of rows
    const int64_t grain = std::max<int64_t>(1, 64 * 1024 / (K * w.element_size()));
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      gemv_block<T, XT>(xp, B, wp, w.stride(0), K, N, n0, n1, yp);
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
