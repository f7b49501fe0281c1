// Weight-only quantized linear layer (CPU): y = x W^T, W int4 / int8 in compressed-tensors' pack-quantized layout.
//
// Decode (at most kQlinearDecodeRows rows of x): every packed weight row is streamed from memory once and unpacked
// in registers. The stored unsigned values u = q + 2^(bits-1) are multiplied by x as they are, the offset folded
// into the zero point (z' = zero + 2^(bits-1)):
//   y[m, n] = sum_g scale[n, g] * (sum_{k in g} u[n, k] x[m, k]) - sum_g scale[n, g] z'[n, g] xsum[m, g]
// with xsum[m, g] = sum_{k in g} x[m, k]; all in float32 (u and z' are exact), rounded once to x's dtype. Each
// (m, n) result goes through the same operations in the same order whatever the number of rows and wherever the
// row sits (rows are taken in blocks of up to four, qlinear_rows.h, each row with its own accumulators): bitwise batch
// invariance, which continuous batching relies on.
// Prefill (more rows): tiles of W dequantized to float32, (u - z') * scale exactly as the reference computes
// (q - zero) * scale, then at::mm.
#include "qlinear.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "cpu_utils.h"
#include "op_common.h"
#include "qlinear_rows.h"

namespace llama_mm::cpu {
namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the packed int32 words are read byte by byte");

constexpr int64_t kPrefetchBytes = 1024;

// The operands of one call, with x in float32 and its per-group sums.
template <typename SC>
struct QMat {
  const uint8_t* w;  // packed weights as bytes, row n at w + n * row_bytes
  int64_t row_bytes;
  const SC* scale;       // [N, G]
  const int8_t* zero;    // [N, G] or null
  int64_t K, G, gs, N;
  const float* x;     // [M, K]
  const float* xsum;  // [M, G]
  float* y;           // [M, N]
};

// Stored unsigned value k of a packed row.
template <int BITS>
inline float value_at(const uint8_t* row, int64_t k) {
  if constexpr (BITS == 4) {
    return static_cast<float>((row[k >> 1] >> ((k & 1) * 4)) & 0xF);
  } else {
    return static_cast<float>(row[k]);
  }
}

// sum_g scale[n, g] * z'[n, g] * xsum[m, g]: the zero point's (and the storage offset's) share of y[m, n].
template <int BITS, typename SC>
inline float zero_term(const QMat<SC>& a, int64_t n, int64_t m) {
  const SC* sc = a.scale + n * a.G;
  const int8_t* z = a.zero ? a.zero + n * a.G : nullptr;
  const float* xs = a.xsum + m * a.G;
  float t = 0.0f;
  for (int64_t g = 0; g < a.G; ++g) {
    const float zp = static_cast<float>((z ? z[g] : 0) + (1 << (BITS - 1)));
    t += static_cast<float>(sc[g]) * zp * xs[g];
  }
  return t;
}

// y[m, n] for the S output rows `n` and B x rows from m0: plain C++, one value at a time (also the path for group
// sizes that are not a multiple of 8 on every CPU).
template <int BITS, typename SC, int S, int B>
void rows_scalar(const QMat<SC>& a, const int64_t* n, int64_t m0) {
  for (int s = 0; s < S; ++s) {
    const uint8_t* row = a.w + n[s] * a.row_bytes;
    const SC* sc = a.scale + n[s] * a.G;
    for (int b = 0; b < B; ++b) {
      const float* x = a.x + (m0 + b) * a.K;
      float total = 0.0f;
      for (int64_t g = 0; g < a.G; ++g) {
        float acc = 0.0f;
        for (int64_t k = g * a.gs; k < (g + 1) * a.gs; ++k) acc += value_at<BITS>(row, k) * x[k];
        total += static_cast<float>(sc[g]) * acc;
      }
      a.y[(m0 + b) * a.N + n[s]] = total - zero_term<BITS>(a, n[s], m0 + b);
    }
  }
}

constexpr int64_t kChunk32 = 32;  // values per step of the AVX2 loop

// x [K] (widened to float32) laid out for the int4 vector loop: per 32-value chunk, values 2e (e < 16) then 2e + 1.
template <typename T>
inline void x_order_32(const T* x, float* out, int64_t K) {
  for (int64_t k = 0; k < K; ++k) out[qrows::even_odd_position(k, kChunk32)] = static_cast<float>(x[k]);
}

#if defined(__AVX2__) && defined(__FMA__)

// The AVX2 path takes 32 stored values at a time (group sizes that are multiples of 32). int4: their 16 bytes are
// zero-extended 8 at a time into the 8 int32 lanes of a vector, and each lane's low nibble (even k) and high nibble
// (odd k) taken apart; that gives the values in the order k0 + 0, 2, .., 14 | 16, 18, .., 30 | 1, 3, .., 15 |
// 17, .., 31, so x is laid out in that order once per call (x_order_32 above) instead of shuffling every weight
// (the zero-extending loads replaced a broadcast + 4 vpshufb in session 9, same vectors: 1.1-1.3x in a one-core
// harness). int8: the 32 bytes in order, 8 at a time zero-extended. About three vector operations per 8 values
// (unpack, convert, FMA): on AVX2 machines this loop, not memory, is what bounds the int4 kernel, so it has no
// other work in it.

// Stored values k .. k+31 of a packed row (k a multiple of 32) as four float vectors, in x's kernel order.
template <int BITS>
inline void load32(const uint8_t* row, int64_t k, __m256 w[4]) {
  if constexpr (BITS == 4) {
    // bytes 0-7 and 8-15 zero-extended to int32 lanes (each lane: one byte, two values); low nibbles are the even
    // k, high nibbles the odd k
    const __m256i nibble = _mm256_set1_epi32(0x0F);
    const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k / 2)));
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k / 2 + 8)));
    w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(a, nibble));
    w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b, nibble));
    w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4));
    w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
  } else {
    for (int i = 0; i < 4; ++i) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k + 8 * i));
      w[i] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
    }
  }
}

// AVX2 + FMA, group size a multiple of 32, x in kernel order. Per (s, b): two accumulators (vectors 0 and 2 of a
// chunk into the first, 1 and 3 into the second), their sum times the group's scale added into a running vector;
// one horizontal sum at the end. The order is the same for every S and B.
template <int BITS, typename SC, int S, int B>
void rows_avx2(const QMat<SC>& a, const int64_t* n, int64_t m0) {
  const uint8_t* row[S];
  const SC* sc[S];
  for (int s = 0; s < S; ++s) {
    row[s] = a.w + n[s] * a.row_bytes;
    sc[s] = a.scale + n[s] * a.G;
  }
  const float* x = a.x + m0 * a.K;
  __m256 total[S][B];
  for (int s = 0; s < S; ++s)
    for (int b = 0; b < B; ++b) total[s][b] = _mm256_setzero_ps();
  const int64_t group_bytes = a.gs * BITS / 8;
  for (int64_t g = 0; g < a.G; ++g) {
    const int64_t k0 = g * a.gs, k1 = k0 + a.gs;
    for (int s = 0; s < S; ++s)
      for (int64_t off = 0; off < group_bytes; off += 64) {
        __builtin_prefetch(row[s] + k0 * BITS / 8 + off + kPrefetchBytes, 0, 3);
      }
    __m256 acc[S][B][2];
    for (int s = 0; s < S; ++s)
      for (int b = 0; b < B; ++b) acc[s][b][0] = acc[s][b][1] = _mm256_setzero_ps();
    for (int64_t k = k0; k < k1; k += kChunk32) {
      for (int s = 0; s < S; ++s) {
        __m256 w[4];
        load32<BITS>(row[s], k, w);
        for (int b = 0; b < B; ++b) {
          const float* xk = x + b * a.K + k;
          acc[s][b][0] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xk), acc[s][b][0]);
          acc[s][b][1] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xk + 8), acc[s][b][1]);
          acc[s][b][0] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xk + 16), acc[s][b][0]);
          acc[s][b][1] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xk + 24), acc[s][b][1]);
        }
      }
    }
    for (int s = 0; s < S; ++s) {
      const __m256 scale = _mm256_set1_ps(static_cast<float>(sc[s][g]));
      for (int b = 0; b < B; ++b)
        total[s][b] = _mm256_fmadd_ps(_mm256_add_ps(acc[s][b][0], acc[s][b][1]), scale, total[s][b]);
    }
  }
  for (int s = 0; s < S; ++s)
    for (int b = 0; b < B; ++b)
      a.y[(m0 + b) * a.N + n[s]] = qrows::hsum8(total[s][b]) - zero_term<BITS>(a, n[s], m0 + b);
}

#endif

// Whether the AVX2 loop (and so x in kernel order) serves this group size on this build.
inline bool vector_path(int64_t gs) {
#if defined(__AVX2__) && defined(__FMA__)
  return gs % 32 == 0;
#else
  (void)gs;
  return false;
#endif
}

// The row kernel for qrows' walk: the AVX2 loop where it applies, else the scalar one.
template <int BITS, typename SC>
struct Rows {
  const QMat<SC>& a;
  template <int S, int B>
  void run(const int64_t* n, int64_t m0) const {
#if defined(__AVX2__) && defined(__FMA__)
    if (vector_path(a.gs)) return rows_avx2<BITS, SC, S, B>(a, n, m0);
#endif
    rows_scalar<BITS, SC, S, B>(a, n, m0);
  }
};

// x2 [M, K] contiguous (any float dtype) -> out [M, N] (x2's dtype) through the decode kernels: x widened (exactly)
// into the call's workspace as the row loops read it, y summed in float32 and rounded to out's dtype by each thread
// for its columns (float32: written in out directly).
template <typename SC>
void decode(const at::Tensor& x2, const at::Tensor& packed, const at::Tensor& scale, const int8_t* zero,
            int64_t bits, int64_t gs, at::Tensor& out) {
  const int64_t M = x2.size(0), K = x2.size(1), N = packed.size(0), G = K / gs;
  using W = qrows::Workspace;
  const bool direct = x2.scalar_type() == at::kFloat;
  const bool reorder = bits == 4 && vector_path(gs);  // int4, vector path: each 32-value chunk even k first
  const bool copy_x = reorder || !direct;             // else the row loops read x2 itself
  W ws(W::bytes<float>(M * G) + (copy_x ? W::bytes<float>(M * K) : 0) + (direct ? 0 : W::bytes<float>(M * N)));
  float* xs = ws.take<float>(M * G);  // [M, G], summed in order (the same for every M)
  float* xw = copy_x ? ws.take<float>(M * K) : nullptr;    // [M, K] x widened / reordered
  const float* xk = copy_x ? xw : x2.data_ptr<float>();  // [M, K] x as the row loops read it
  float* y = direct ? out.data_ptr<float>() : ws.take<float>(M * N);  // [M, N]
  LLAMA_MM_DISPATCH_FLOAT_TYPES(x2.scalar_type(), "qlinear", [&] {
    const scalar_t* xp = x2.data_ptr<scalar_t>();
    for (int64_t i = 0; i < M * G; ++i) {
      float t = 0.0f;
      for (int64_t k = 0; k < gs; ++k) t += static_cast<float>(xp[i * gs + k]);
      xs[i] = t;
    }
    if (!copy_x) return;
    for (int64_t m = 0; m < M; ++m) {
      if (reorder) {
        x_order_32(xp + m * K, xw + m * K, K);
      } else {
        for (int64_t k = 0; k < K; ++k) xw[m * K + k] = static_cast<float>(xp[m * K + k]);
      }
    }
  });
  const QMat<SC> a{reinterpret_cast<const uint8_t*>(packed.data_ptr<int32_t>()), packed.size(1) * 4,
                   scale.data_ptr<SC>(), zero, K, G, gs, N, xk, xs, y};
  const auto after = [&](int64_t n0, int64_t n1) { qrows::round_columns(y, out, n0, n1); };
  if (bits == 4) {
    qrows::parallel_walk(Rows<4, SC>{a}, M, N, a.row_bytes, after);
  } else {
    qrows::parallel_walk(Rows<8, SC>{a}, M, N, a.row_bytes, after);
  }
}

// W rows [n0, n0 + rows) dequantized to float32 [rows, K]: (q - zero) * scale, each factor in float32.
template <int BITS, typename SC>
void dequantize_rows(const uint8_t* w, int64_t row_bytes, const SC* scale, const int8_t* zero, int64_t K,
                     int64_t gs, int64_t n0, int64_t rows, float* out) {
  const int64_t G = K / gs;
  at::parallel_for(0, rows, row_grain(K), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = n0 + r;
      const uint8_t* row = w + n * row_bytes;
      for (int64_t g = 0; g < G; ++g) {
        const float s = static_cast<float>(scale[n * G + g]);
        const float zq = static_cast<float>((zero ? zero[n * G + g] : 0) + (1 << (BITS - 1)));
        for (int64_t k = g * gs; k < (g + 1) * gs; ++k) out[r * K + k] = (value_at<BITS>(row, k) - zq) * s;
      }
    }
  });
}

// x2 [M, K] float32 -> y [M, N] float32: tiles of W dequantized (about 8 MiB of float32 each), then at::mm.
template <typename SC>
void prefill(const at::Tensor& x2, const at::Tensor& packed, const at::Tensor& scale, const int8_t* zero,
             int64_t bits, int64_t gs, at::Tensor& y) {
  const int64_t K = x2.size(1), N = packed.size(0);
  const int64_t tile = std::max<int64_t>(16, (8 << 20) / (4 * K));
  const auto* w = reinterpret_cast<const uint8_t*>(packed.data_ptr<int32_t>());
  const int64_t row_bytes = packed.size(1) * 4;
  at::Tensor wt = at::empty({std::min(tile, N), K}, x2.options());
  for (int64_t n0 = 0; n0 < N; n0 += tile) {
    const int64_t rows = std::min(tile, N - n0);
    at::Tensor wtile = wt.narrow(0, 0, rows);  // [rows, K]
    if (bits == 4) {
      dequantize_rows<4>(w, row_bytes, scale.data_ptr<SC>(), zero, K, gs, n0, rows, wtile.data_ptr<float>());
    } else {
      dequantize_rows<8>(w, row_bytes, scale.data_ptr<SC>(), zero, K, gs, n0, rows, wtile.data_ptr<float>());
    }
    y.narrow(1, n0, rows).copy_(at::mm(x2, wtile.t()));  // [M, rows]
  }
}

}  // namespace

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& packed_in, const at::Tensor& scale_in,
                   const std::optional<at::Tensor>& zero_in, int64_t bits, int64_t group_size) {
  check_qlinear_args(x, packed_in, scale_in, zero_in, bits, group_size, c10::DeviceType::CPU);
  const int64_t K = x.size(-1), N = packed_in.size(0);
  const at::Tensor packed = packed_in.contiguous(), scale = scale_in.contiguous();
  const at::Tensor zero = zero_in.has_value() ? zero_in->contiguous() : at::Tensor();
  const int8_t* zp = zero.defined() ? zero.data_ptr<int8_t>() : nullptr;
  const int64_t M = x.numel() / K;
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  if (M <= kQlinearDecodeRows) {
    const at::Tensor x2 = x.reshape({-1, K}).contiguous();  // [M, K] in x's dtype
    at::Tensor out = at::empty({M, N}, x2.options());       // [M, N] in x's dtype
    if (M > 0 && N > 0) {
      LLAMA_MM_DISPATCH_FLOAT_TYPES(scale.scalar_type(), "qlinear", [&] {
        decode<scalar_t>(x2, packed, scale, zp, bits, group_size, out);
      });
    }
    return out.view(out_sizes);
  }
  const at::Tensor x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();  // [M, K]
  at::Tensor y = at::empty({M, N}, x2.options());                         // [M, N] float32
  if (N > 0) {
    LLAMA_MM_DISPATCH_FLOAT_TYPES(scale.scalar_type(), "qlinear", [&] {
      prefill<scalar_t>(x2, packed, scale, zp, bits, group_size, y);
    });
  }
  return y.to(x.scalar_type()).view(out_sizes);
}

}  // namespace llama_mm::cpu
