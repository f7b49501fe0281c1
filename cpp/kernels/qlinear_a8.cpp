// Quantized linear layer with int8 activations (CPU), see qlinear_a8.h for the arithmetic.
//
// Every row of x is quantized once per call: per block of 32 values a float32 scale d and int8 values xq, laid out
// in the order the vector loop reads the weights (below), and per weight group the float sum its zero points
// multiply. Each weight row is then streamed once for all rows of x (qlinear_rows.h: one row of x, four weight rows
// walked side by side; more, blocks of four rows of x per weight row) and multiplied in integers:
//   int4, AVX2: 64 stored values (32 bytes) split into low nibbles (even k) and high nibbles (odd k); vpmaddubsw
//     multiplies the unsigned nibbles by xq (x laid out even k then odd k per 64 values) and adds pairs into int16,
//     the two halves are added (|sum| <= 4 * 15 * 127, no overflow), vpmaddwd makes int32 lanes: lanes 0-3 hold the
//     first block of 32 values, lanes 4-7 the second, each multiplied by its block's d. Group sizes that are odd
//     multiples of 32 take 32 values (one block) per step.
//   int8, AVX2: 32 stored bytes per step, made signed (q = u - 128), vpmaddubsw(|q|, sign(xq, q)) (|pair| <= 2 *
//     128 * 127), vpmaddwd to int32, times the block's d.
// CPUs with AVX-512 VNNI (+VL) sum each lane's four products with vpdpbusd instead (the same exact int32 sums).
// Every (row of x, weight row) result goes through the same operations in the same order whatever the number of
// rows: batch invariance. Group sizes that are not a multiple of 32, and builds without AVX2, take the scalar loop
// (same sums, integer-exact per block, in plain C++).
#include "qlinear_a8.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "op_common.h"
#include "qlinear.h"
#include "qlinear_rows.h"

namespace llama_mm::cpu {
namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the packed int32 words are read byte by byte");

constexpr int64_t kPrefetchBytes = 1024;
constexpr int64_t kB = kActivationBlock;

// The operands of one call: the packed weights and x quantized.
template <typename SC>
struct A8Args {
  const uint8_t* w;  // packed weights as bytes, row n at w + n * row_bytes
  int64_t row_bytes;
  const SC* scale;     // [N, G]
  const int8_t* zero;  // [N, G] or null
  int64_t K, G, gs, N;
  const int8_t* xq;    // [M, K]: int4 on the vector path even/odd per step (qrows::even_odd_position), else in order
  const float* d;      // [M, K / 32] block scales
  const float* dsteps; // vector path: [M, K / STEP, 8] the block scale of each lane of a step's products
  const float* xsum;   // [M, G]: sum_{k in g} d[block of k] * xq[k]
  float* y;            // [M, N]
};

// The value the kernels multiply for stored value k of a packed row, and the offset its zero point carries:
// int4 multiplies the unsigned nibble u = q + 8 (zero' = zero + 8), int8 the signed q = u - 128 (zero' = zero).
template <int BITS>
inline int32_t value_at(const uint8_t* row, int64_t k) {
  if constexpr (BITS == 4) {
    return (row[k >> 1] >> ((k & 1) * 4)) & 0xF;
  } else {
    return static_cast<int32_t>(row[k]) - 128;
  }
}
template <int BITS>
constexpr int32_t kZeroOffset = BITS == 4 ? 8 : 0;

// sum_g scale[n, g] * zero'[n, g] * xsum[m, g]: the zero points' share of y[m, n].
template <int BITS, typename SC>
inline float zero_term(const A8Args<SC>& a, int64_t n, int64_t m) {
  if (BITS == 8 && !a.zero) return 0.0f;
  const SC* sc = a.scale + n * a.G;
  const int8_t* z = a.zero ? a.zero + n * a.G : nullptr;
  const float* xs = a.xsum + m * a.G;
  float t = 0.0f;
  for (int64_t g = 0; g < a.G; ++g)
    t += static_cast<float>(sc[g]) * static_cast<float>((z ? z[g] : 0) + kZeroOffset<BITS>) * xs[g];
  return t;
}

// Values per step of the AVX2 loop for these bits and group size; 0: the scalar loop.
inline int64_t vector_step(int64_t bits, int64_t gs) {
#if defined(__AVX2__) && defined(__FMA__)
  if (gs % kB != 0) return 0;
  return bits == 4 && gs % (2 * kB) == 0 ? 2 * kB : kB;
#else
  (void)bits;
  (void)gs;
  return 0;
#endif
}

// One block of 32 values -> its int8 values q and its scale d = max |x| / 127 (returned): q = x / d rounded half to
// even (as torch.round), clamped to +-127; all zero when d = 0. The AVX2 form divides and rounds the same way.
inline float quantize_block(const float* xb, int8_t* q) {
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 v[4], m = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(xb + 8 * i);
    m = _mm256_max_ps(m, _mm256_and_ps(v[i], abs_mask));
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  const float d = _mm_cvtss_f32(h) / 127.0f;
  if (!(d > 0.0f)) {
    std::fill(q, q + kB, 0);
    return d;
  }
  const __m256 dv = _mm256_set1_ps(d), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  __m256i i32[4];
  for (int i = 0; i < 4; ++i) {
    const __m256 r = _mm256_round_ps(_mm256_div_ps(v[i], dv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    i32[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
  }
  // the packs work within 128-bit lanes: 4-byte groups come out as 0 2 4 6 1 3 5 7 of the natural order
  const __m256i p8 = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  return d;
#else
  float amax = 0.0f;
  for (int64_t i = 0; i < kB; ++i) amax = std::max(amax, std::fabs(xb[i]));
  const float d = amax / 127.0f;
  for (int64_t i = 0; i < kB; ++i) {
    const float r = d > 0.0f ? std::nearbyint(xb[i] / d) : 0.0f;
    q[i] = static_cast<int8_t>(std::clamp(r, -127.0f, 127.0f));
  }
  return d;
#endif
}

// One row of x [K] (K a multiple of 32, any float dtype: each block widened to float32 first, exactly) -> d [K/32],
// xsum [G], xq [K]: natural order, or (int4 on the vector path) per chunk of `chunk` values the even positions
// first, then the odd ones.
template <typename T>
void quantize_row(const T* x, int64_t K, int64_t gs, int64_t chunk, int8_t* xq, float* d, float* xsum) {
  int8_t q[kB];
  float xf[kB];
  int64_t g = 0;
  float gsum = 0.0f;
  for (int64_t b = 0; b < K / kB; ++b) {
    const float* xb = xf;
    if constexpr (std::is_same_v<T, float>) {
      xb = x + b * kB;
    } else {
      for (int64_t i = 0; i < kB; ++i) xf[i] = static_cast<float>(x[b * kB + i]);
    }
    const float db = quantize_block(xb, q);
    d[b] = db;
    // the block's share of each group's xsum, split where a group ends inside the block
    for (int64_t i0 = 0; i0 < kB;) {
      const int64_t group_end = (g + 1) * gs;  // k where the current group ends
      const int64_t i1 = std::min<int64_t>(kB, group_end - b * kB);
      int32_t s = 0;
      for (int64_t i = i0; i < i1; ++i) s += q[i];
      gsum += db * static_cast<float>(s);
      if (b * kB + i1 == group_end) {
        xsum[g++] = gsum;
        gsum = 0.0f;
      }
      i0 = i1;
    }
    for (int64_t i = 0; i < kB; ++i) {
      const int64_t k = b * kB + i;
      xq[chunk ? qrows::even_odd_position(k, chunk) : k] = q[i];
    }
  }
}

// y[m, n] for the S weight rows `n` and B rows of x from m0, one value at a time: per group, per block inside it,
// the integer sum times the block's d.
template <int BITS, typename SC, int S, int B>
void rows_scalar(const A8Args<SC>& a, const int64_t* n, int64_t m0) {
  for (int s = 0; s < S; ++s) {
    const uint8_t* row = a.w + n[s] * a.row_bytes;
    const SC* sc = a.scale + n[s] * a.G;
    for (int b = 0; b < B; ++b) {
      const int8_t* xq = a.xq + (m0 + b) * a.K;
      const float* d = a.d + (m0 + b) * (a.K / kB);
      float total = 0.0f;
      for (int64_t g = 0; g < a.G; ++g) {
        float acc = 0.0f;
        for (int64_t k = g * a.gs, end = (g + 1) * a.gs; k < end;) {
          const int64_t stop = std::min(end, (k / kB + 1) * kB);
          int32_t isum = 0;
          for (int64_t i = k; i < stop; ++i) isum += value_at<BITS>(row, i) * xq[i];
          acc += d[k / kB] * static_cast<float>(isum);
          k = stop;
        }
        total += static_cast<float>(sc[g]) * acc;
      }
      a.y[(m0 + b) * a.N + n[s]] = total - zero_term<BITS>(a, n[s], m0 + b);
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__)

// The STEP values of weight row `row` from k, as the operand(s) vpmaddubsw takes (see the file comment).
template <int BITS, int STEP>
struct Weights {
  __m256i lo, hi;  // int4, STEP 64: even and odd k; int4, STEP 32: lo only; int8: lo = |q|, hi = q
  inline void load(const uint8_t* row, int64_t k) {
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    if constexpr (BITS == 4 && STEP == 64) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + (static_cast<uint64_t>(k) >> 1)));
      lo = _mm256_and_si256(v, nibble);
      hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
    } else if constexpr (BITS == 4) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + (static_cast<uint64_t>(k) >> 1)));
      lo = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), nibble);
    } else {
      hi = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k)),
                            _mm256_set1_epi8(static_cast<char>(0x80)));
      lo = _mm256_abs_epi8(hi);
    }
  }
  // Eight int32 lanes of products with xq (STEP values from xk) as float32.
  inline __m256 dot(const int8_t* xk) const {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    // vpdpbusd: the four products of each int32 lane summed in one instruction (no int16 step: the same exact sums)
    const __m256i zero = _mm256_setzero_si256();
    const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xk));
    __m256i p;
    if constexpr (BITS == 4 && STEP == 64) {
      p = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(zero, lo, xa), hi,
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xk + 32)));
    } else if constexpr (BITS == 4) {
      p = _mm256_dpbusd_epi32(zero, lo, xa);
    } else {
      p = _mm256_dpbusd_epi32(zero, lo, _mm256_sign_epi8(xa, hi));
    }
    return _mm256_cvtepi32_ps(p);
#else
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i p;
    if constexpr (BITS == 4 && STEP == 64) {
      p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xk))),
                           _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xk + 32))));
    } else if constexpr (BITS == 4) {
      p = _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xk)));
    } else {
      p = _mm256_maddubs_epi16(lo, _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xk)), hi));
    }
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
#endif
  }
};

template <int BITS, int STEP, typename SC, int S, int B>
void rows_avx2(const A8Args<SC>& a, const int64_t* n, int64_t m0) {
  const uint8_t* row[S];
  const SC* sc[S];
  for (int s = 0; s < S; ++s) {
    row[s] = a.w + n[s] * a.row_bytes;
    sc[s] = a.scale + n[s] * a.G;
  }
  const int8_t* xq = a.xq + m0 * a.K;
  const float* ds = a.dsteps + m0 * (a.K / STEP) * 8;
  __m256 total[S][B];
  for (int s = 0; s < S; ++s)
    for (int b = 0; b < B; ++b) total[s][b] = _mm256_setzero_ps();
  const int64_t group_bytes = a.gs * BITS / 8;
  for (int64_t g = 0; g < a.G; ++g) {
    const int64_t k0 = g * a.gs, k1 = k0 + a.gs;
    for (int s = 0; s < S; ++s)
      for (int64_t off = 0; off < group_bytes; off += 64)
        __builtin_prefetch(row[s] + k0 * BITS / 8 + off + kPrefetchBytes, 0, 3);
    __m256 acc[S][B];
    for (int s = 0; s < S; ++s)
      for (int b = 0; b < B; ++b) acc[s][b] = _mm256_setzero_ps();
    for (int64_t k = k0; k < k1; k += STEP) {
      const uint64_t step = static_cast<uint64_t>(k) / STEP;
      __m256 scales[B];
      for (int b = 0; b < B; ++b) scales[b] = _mm256_loadu_ps(ds + (b * (a.K / STEP) + step) * 8);
      for (int s = 0; s < S; ++s) {
        Weights<BITS, STEP> w;
        w.load(row[s], k);
        for (int b = 0; b < B; ++b) acc[s][b] = _mm256_fmadd_ps(w.dot(xq + b * a.K + k), scales[b], acc[s][b]);
      }
    }
    for (int s = 0; s < S; ++s) {
      const __m256 scale = _mm256_set1_ps(static_cast<float>(sc[s][g]));
      for (int b = 0; b < B; ++b) total[s][b] = _mm256_fmadd_ps(acc[s][b], scale, total[s][b]);
    }
  }
  for (int s = 0; s < S; ++s)
    for (int b = 0; b < B; ++b)
      a.y[(m0 + b) * a.N + n[s]] = qrows::hsum8(total[s][b]) - zero_term<BITS>(a, n[s], m0 + b);
}

#endif

// The row kernel for qrows' walk. STEP 0: the scalar loop; 32 / 64: the AVX2 loop taking that many values per step.
template <int BITS, int STEP, typename SC>
struct Rows {
  const A8Args<SC>& a;
  template <int S, int B>
  void run(const int64_t* n, int64_t m0) const {
#if defined(__AVX2__) && defined(__FMA__)
    if constexpr (STEP != 0) return rows_avx2<BITS, STEP, SC, S, B>(a, n, m0);
#endif
    rows_scalar<BITS, SC, S, B>(a, n, m0);
  }
};

template <int BITS, int STEP, typename SC, typename After>
void run(const A8Args<SC>& a, int64_t M, const After& after) {
  qrows::parallel_walk(Rows<BITS, STEP, SC>{a}, M, a.N, a.row_bytes, after);
}

}  // namespace

at::Tensor qlinear_a8(const at::Tensor& x, const at::Tensor& packed_in, const at::Tensor& scale_in,
                      const std::optional<at::Tensor>& zero_in, int64_t bits, int64_t group_size) {
  check_qlinear_args(x, packed_in, scale_in, zero_in, bits, group_size, c10::DeviceType::CPU, "qlinear_a8");
  const int64_t K = x.size(-1), N = packed_in.size(0), G = K / group_size;
  TORCH_CHECK(K % kB == 0, "llama_mm.qlinear_a8: K = ", K, " must be a multiple of ", kB,
              " (activations are quantized per block of ", kB, " values)");
  if (x.numel() / K > kQlinearDecodeRows) return qlinear(x, packed_in, scale_in, zero_in, bits, group_size);
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();  // [M, K] in x's dtype (quantized from it directly)
  const at::Tensor packed = packed_in.contiguous(), scale = scale_in.contiguous();
  const at::Tensor zero = zero_in.has_value() ? zero_in->contiguous() : at::Tensor();
  const int64_t M = x2.size(0), step = vector_step(bits, group_size);
  at::Tensor out = at::empty({M, N}, x2.options());  // [M, N] in x's dtype
  if (M > 0 && N > 0) {
    // the call's buffers in one allocation; y in float32 (rounded to x's dtype by each thread for its columns, or
    // out itself when x is float32)
    using W = qrows::Workspace;
    const bool direct = x2.scalar_type() == at::kFloat;
    const int64_t lanes_per_row = step ? K / step * 8 : 0;
    W ws(W::bytes<int8_t>(M * K) + W::bytes<float>(M * (K / kB)) + W::bytes<float>(M * G) +
         W::bytes<float>(M * lanes_per_row) + (direct ? 0 : W::bytes<float>(M * N)));
    int8_t* xq = ws.take<int8_t>(M * K);                // [M, K] kernel order
    float* d = ws.take<float>(M * (K / kB));             // [M, K / 32]
    float* xsum = ws.take<float>(M * G);                 // [M, G]
    float* dsteps = ws.take<float>(M * lanes_per_row);   // [M, K / step, 8]
    float* y = direct ? out.data_ptr<float>() : ws.take<float>(M * N);  // [M, N]
    const int64_t chunk = bits == 4 ? step : 0;  // int4's vector loop reads x even k first per step
    LLAMA_MM_DISPATCH_FLOAT_TYPES(x2.scalar_type(), "qlinear_a8", [&] {
      const scalar_t* xp = x2.data_ptr<scalar_t>();
      at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t m0, int64_t m1) {
        for (int64_t m = m0; m < m1; ++m) {
          float* dm = d + m * (K / kB);
          quantize_row(xp + m * K, K, group_size, chunk, xq + m * K, dm, xsum + m * G);
          // lane l of step j multiplies block j * blocks + l * blocks / 8 (two blocks per step: lanes 0-3, 4-7)
          float* lanes = dsteps + m * lanes_per_row;
          const int64_t blocks = step / kB;
          for (int64_t i = 0; i < lanes_per_row; ++i) lanes[i] = dm[(i / 8) * blocks + (i % 8) * blocks / 8];
        }
      });
    });
    const auto after = [&](int64_t n0, int64_t n1) { qrows::round_columns(y, out, n0, n1); };
    LLAMA_MM_DISPATCH_FLOAT_TYPES(scale.scalar_type(), "qlinear_a8", [&] {
      const A8Args<scalar_t> a{reinterpret_cast<const uint8_t*>(packed.data_ptr<int32_t>()), packed.size(1) * 4,
                               scale.data_ptr<scalar_t>(), zero.defined() ? zero.data_ptr<int8_t>() : nullptr,
                               K, G, group_size, N, xq, d, dsteps, xsum, y};
      if (bits == 4 && step == 64) {
        run<4, 64>(a, M, after);
      } else if (bits == 4 && step == 32) {
        run<4, 32>(a, M, after);
      } else if (bits == 4) {
        run<4, 0>(a, M, after);
      } else if (step == 32) {
        run<8, 32>(a, M, after);
      } else {
        run<8, 0>(a, M, after);
      }
    });
  }
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  return out.view(out_sizes);
}

}  // namespace llama_mm::cpu
