// How the two quantized decode kernels (qlinear.cpp: float32 products, qlinear_a8.cpp: int8 activations) walk their
// output: every packed weight row is streamed from memory once for all rows of x.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "op_common.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace llama_mm::cpu::qrows {

constexpr int kStreams = 4;   // weight rows walked side by side at one row of x (independent memory streams)
constexpr int kRowBlock = 4;  // rows of x per pass over a weight row at more rows (their x stays in L1)

// All M rows of x for weight row n, in blocks of kRowBlock: rows.template run<1, B>(&n, m0) for B rows from m0.
template <typename Rows>
void all_rows(const Rows& rows, int64_t n, int64_t M) {
  int64_t m = 0;
  for (; m + kRowBlock <= M; m += kRowBlock) rows.template run<1, kRowBlock>(&n, m);
  switch (M - m) {
    case 3: rows.template run<1, 3>(&n, m); break;
    case 2: rows.template run<1, 2>(&n, m); break;
    case 1: rows.template run<1, 1>(&n, m); break;
    default: break;
  }
  static_assert(kRowBlock == 4, "the remainder cases above cover 1 .. kRowBlock - 1 rows");
}

// Weight rows [n0, n1): cut into kStreams contiguous parts walked side by side (one row of each per step), so the
// weights are read as kStreams sequential streams (one row of x: rows.template run<kStreams, 1>(n, 0) on the
// kStreams rows at once); the rows left over one at a time.
template <typename Rows>
void walk(const Rows& rows, int64_t M, int64_t n0, int64_t n1) {
  const int64_t part = (n1 - n0) / kStreams;
  for (int64_t i = 0; i < part; ++i) {
    int64_t n[kStreams];
    for (int s = 0; s < kStreams; ++s) n[s] = n0 + s * part + i;
    if (M == 1) {
      rows.template run<kStreams, 1>(n, 0);
    } else {
      for (int s = 0; s < kStreams; ++s) all_rows(rows, n[s], M);
    }
  }
  for (int64_t n = n0 + kStreams * part; n < n1; ++n) all_rows(rows, n, M);
}

// walk() over all N weight rows, threads taking contiguous blocks of at least ~64 KiB of weights; each thread then
// calls after(n0, n1) on its block (e.g. to round its columns of y to the output dtype while they are in cache).
template <typename Rows, typename After>
void parallel_walk(const Rows& rows, int64_t M, int64_t N, int64_t row_bytes, const After& after) {
  const int64_t grain = std::max<int64_t>(1, 64 * 1024 / row_bytes);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    walk(rows, M, n0, n1);
    after(n0, n1);
  });
}

// The per-call buffers of a decode kernel carved out of one allocation (one allocator call instead of one per
// buffer: at a few microseconds of work per small layer, each call shows), every piece 64-byte aligned.
class Workspace {
 public:
  explicit Workspace(int64_t bytes) : buf_(at::empty({bytes + 64}, at::TensorOptions().dtype(at::kByte))) {
    next_ = reinterpret_cast<uintptr_t>(buf_.data_ptr<uint8_t>());
  }
  // Bytes a take<T>(n) needs, for sizing the workspace.
  template <typename T>
  static constexpr int64_t bytes(int64_t n) { return (n * static_cast<int64_t>(sizeof(T)) + 63) / 64 * 64; }
  template <typename T>
  T* take(int64_t n) {
    next_ = (next_ + 63) / 64 * 64;
    T* p = reinterpret_cast<T*>(next_);
    next_ += static_cast<uintptr_t>(n) * sizeof(T);
    TORCH_INTERNAL_ASSERT(next_ <= reinterpret_cast<uintptr_t>(buf_.data_ptr<uint8_t>()) + buf_.numel(),
                          "qrows::Workspace overrun");
    return p;
  }

 private:
  at::Tensor buf_;
  uintptr_t next_;
};

// out[m, n] = y[m, n] rounded to out's dtype (float32, bfloat16 or float16; out [M, N] contiguous) for the columns
// [n0, n1): nothing to do when out is y itself.
inline void round_columns(const float* y, const at::Tensor& out, int64_t n0, int64_t n1) {
  const int64_t M = out.size(0), N = out.size(1);
  LLAMA_MM_DISPATCH_FLOAT_TYPES(out.scalar_type(), "round_columns", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    if (static_cast<const void*>(o) == static_cast<const void*>(y)) return;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) o[m * N + n] = static_cast<scalar_t>(y[m * N + n]);
  });
}

// Where value k of x goes when x is laid out, per chunk of `chunk` values (an even number), even positions first
// and odd ones after: the order in which the int4 loaders produce a chunk's weights (low nibbles are the even k,
// high nibbles the odd k), so x is reordered once per call instead of every weight.
inline int64_t even_odd_position(int64_t k, int64_t chunk) {
  const int64_t j = k % chunk;
  return k - j + (j % 2) * (chunk / 2) + j / 2;
}

#if defined(__AVX2__)
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

}  // namespace llama_mm::cpu::qrows
