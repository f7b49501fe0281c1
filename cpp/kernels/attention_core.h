// The CPU single-query attention core shared by decode_attention, cross_attention (attention.cpp) and
// paged_attention (paged_attention.cpp): scores = q.k * D^-1/2 (+ additive mask), softmax in float32,
// out = sum_j p_j v_j, in one pass over the keys (online softmax: a running maximum and sum, the partial output
// rescaled when the maximum grows). A key masked out gets the lowest float (as transformers' finfo.min mask does),
// so a row whose keys are all masked attends uniformly, exactly like the reference.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_utils.h"

namespace llama_mm::cpu::attention_core {

constexpr int64_t V = fVec::size();
// Keys per block: a block of K or V rows is widened to float32 once into a scratch buffer that stays in L1.
constexpr int64_t kBlock = 4 * V;

// out[i] = sum of the lanes of in[i], for i < V (one vector of V sums).
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags the deliberately undefined pass-through operand inside the unpack/shuffle intrinsics
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
inline fVec reduce_lanes(const fVec* in) {
#if defined(CPU_CAPABILITY_AVX512)
  // pairs of vectors -> 128-bit lanes of 4 partial sums -> whole vectors: 45 shuffles/adds for 16 sums
  __m512 s2[8], s4[4], s8[2];
  for (int i = 0; i < 8; ++i) {
    const __m512 a = in[2 * i], b = in[2 * i + 1];
    s2[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(s2[2 * i]), b = _mm512_castps_pd(s2[2 * i + 1]);
    s4[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)
    s8[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s4[2 * i], s4[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_f32x4(s4[2 * i], s4[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s8[0], s8[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(s8[0], s8[1], _MM_SHUFFLE(3, 1, 3, 1)));
#elif defined(CPU_CAPABILITY_AVX2)
  // pairwise adds within 128-bit halves (hadd), then the two halves of each vector: 9 shuffles/adds for 8 sums
  // (8 stores and 56 scalar adds before: cross-attention over 1664 keys 1.44x faster)
  const __m256 s01 = _mm256_hadd_ps(in[0], in[1]), s23 = _mm256_hadd_ps(in[2], in[3]);
  const __m256 s45 = _mm256_hadd_ps(in[4], in[5]), s67 = _mm256_hadd_ps(in[6], in[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);  // [lo 0-3, hi 0-3] / 4-7
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
#else
  __at_align__ float sums[V];
  for (int64_t i = 0; i < V; ++i) sums[i] = hsum(in[i]);
  return fVec::loadu(sums);
#endif
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// n <= kBlock rows of D elements of T (row stride `stride`) as float32 rows of D: the rows themselves when T is
// float32, else widened into `scratch`.
template <typename T>
inline const float* rows_as_float(const T* src, int64_t stride, int64_t n, int64_t D, float* scratch,
                                  int64_t& out_stride) {
  if constexpr (std::is_same_v<T, float>) {
    out_stride = stride;
    return src;
  } else {
    for (int64_t j = 0; j < n; ++j) {
      int64_t d = 0;
      for (; d + V <= D; d += V) load1(src + j * stride + d).store(scratch + j * D + d);
      for (; d < D; ++d) scratch[j * D + d] = static_cast<float>(src[j * stride + d]);
    }
    out_stride = D;
    return scratch;
  }
}

// s[j] = q . k_j for n <= V rows k_j = k + j * ks (D floats; q zero-padded to a multiple of V).
inline fVec dot_rows(const float* q, const float* k, int64_t ks, int64_t n, int64_t D) {
  fVec part[V];
  for (int64_t j = 0; j < n; ++j) {
    const float* kj = k + j * ks;
    fVec acc(0.f);
    int64_t d = 0;
    for (; d + V <= D; d += V) acc = at::vec::fmadd(fVec::loadu(q + d), fVec::loadu(kj + d), acc);
    if (d < D) acc = at::vec::fmadd(fVec::loadu(q + d), fVec::loadu(kj + d, D - d), acc);
    part[j] = acc;
  }
  for (int64_t j = n; j < V; ++j) part[j] = fVec(0.f);
  return reduce_lanes(part);
}

// dot_rows for exactly V rows of D = NV * V: q held in registers, the V dot products unrolled into independent
// chains (the head dims of Llama 3.2 Vision, 64 in the small test models and 128 in the real ones).
template <int NV>
inline fVec dot_rows_fixed(const fVec* q, const float* k, int64_t ks) {
  fVec part[V];
  for (int j = 0; j < V; ++j) {
    const float* kj = k + j * ks;
    fVec acc = q[0] * fVec::loadu(kj);
    for (int i = 1; i < NV; ++i) acc = at::vec::fmadd(q[i], fVec::loadu(kj + i * V), acc);
    part[j] = acc;
  }
  return reduce_lanes(part);
}

// scores[j] = (q . k_j) * scale (+ mask_add[j]) for n rows k_j = k + j * ks.
template <int NV>
inline void scores_block(const float* q, const float* k, int64_t ks, int64_t n, int64_t D, float scale,
                  const float* mask_add, float* scores) {
  fVec qv[NV > 0 ? NV : 1];
  if constexpr (NV > 0)
    for (int i = 0; i < NV; ++i) qv[i] = fVec::loadu(q + i * V);
  for (int64_t j = 0; j < n; j += V) {
    const int64_t w = std::min(V, n - j);
    fVec s;
    if constexpr (NV > 0) {
      s = w == V ? dot_rows_fixed<NV>(qv, k + j * ks, ks) : dot_rows(q, k + j * ks, ks, w, D);
    } else {
      s = dot_rows(q, k + j * ks, ks, w, D);
    }
    s = s * fVec(scale);
    if (mask_add) s = s + fVec::loadu(mask_add + j, w);
    s.store(scores + j, w);
  }
}

// scores[g * kBlock + j] = (q_g . k_j) * scale (+ mask_add[j]) for 4 heads g (q rows qs floats apart, D = NV * V)
// and n rows k_j = k + j * ks of T, widened in registers: each key vector is read once for the 4 heads (the heads' q
// read from L1), two keys at a time, no widened copy of the block. Per (head, key) the same operations in the same
// order as dot_rows_fixed (q[0] k[0], then fmadd over the vectors in order, 8 keys' lanes summed by reduce_lanes),
// so the scores are bit for bit those of scores_block; a last part group of fewer than V keys goes through it.
template <int NV, typename T>
inline void scores_4heads(const float* q, int64_t qs, const T* k, int64_t ks, int64_t n, float scale,
                          const float* mask_add, float* scores) {
  int64_t j = 0;
  for (; j + V <= n; j += V) {
    fVec part[4][V];
    for (int64_t jj = 0; jj < V; jj += 2) {  // two keys: 8 independent chains of FMAs
      const T* k0 = k + (j + jj) * ks;
      const T* k1 = k0 + ks;
      fVec a0[4], a1[4];
      {
        const fVec x0 = load1(k0), x1 = load1(k1);
        for (int g = 0; g < 4; ++g) {
          const fVec qv = fVec::loadu(q + g * qs);
          a0[g] = qv * x0;
          a1[g] = qv * x1;
        }
      }
      for (int i = 1; i < NV; ++i) {
        const fVec x0 = load1(k0 + i * V), x1 = load1(k1 + i * V);
        for (int g = 0; g < 4; ++g) {
          const fVec qv = fVec::loadu(q + g * qs + i * V);
          a0[g] = at::vec::fmadd(qv, x0, a0[g]);
          a1[g] = at::vec::fmadd(qv, x1, a1[g]);
        }
      }
      for (int g = 0; g < 4; ++g) part[g][jj] = a0[g], part[g][jj + 1] = a1[g];
    }
    for (int g = 0; g < 4; ++g) {
      fVec sc = reduce_lanes(part[g]) * fVec(scale);
      if (mask_add) sc = sc + fVec::loadu(mask_add + j);
      sc.store(scores + g * kBlock + j);
    }
  }
  if (j < n) {
    float kf[V * NV * V];  // the last part group widened (at most V - 1 rows of D floats)
    int64_t kfs;
    const float* kp = rows_as_float(k + j * ks, ks, n - j, NV * V, kf, kfs);
    for (int g = 0; g < 4; ++g)
      scores_block<NV>(q + g * qs, kp, kfs, n - j, NV * V, scale, mask_add ? mask_add + j : nullptr,
                       scores + g * kBlock + j);
  }
}

#if defined(__AVX512BF16__)
// Scores straight from bfloat16 keys, D = NV * V: vdpbf16ps multiplies pairs of bfloat16 (products exact in
// float32) into float32 lanes. q is bfloat16 itself, so only the order of the float32 sums differs from widening
// first; no key block is widened. n <= V rows; q holds NV / 2 vectors of 32 bfloat16.
template <int NV>
inline fVec dot_rows_bf16(const __m512bh* q, const at::BFloat16* k, int64_t ks, int64_t n) {
  fVec part[V];
  for (int64_t j = 0; j < n; ++j) {
    const at::BFloat16* kj = k + j * ks;
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < NV / 2; ++i)
      acc = _mm512_dpbf16_ps(acc, q[i], load32_bh(kj + 2 * V * i));
    part[j] = acc;
  }
  for (int64_t j = n; j < V; ++j) part[j] = fVec(0.f);
  return reduce_lanes(part);
}

template <int NV>
inline void scores_block_bf16(const at::BFloat16* q, const at::BFloat16* k, int64_t ks, int64_t n, float scale,
                       const float* mask_add, float* scores) {
  __m512bh qv[NV / 2];
  for (int i = 0; i < NV / 2; ++i) qv[i] = load32_bh(q + 2 * V * i);
  for (int64_t j = 0; j < n; j += V) {
    const int64_t w = std::min(V, n - j);
    fVec s = dot_rows_bf16<NV>(qv, k + j * ks, ks, w) * fVec(scale);
    if (mask_add) s = s + fVec::loadu(mask_add + j, w);
    s.store(scores + j, w);
  }
}
#endif

// acc[0, D) += sum_j p[j] * v_j for n rows v_j = v + j * vs (D floats). Chunks of 4 vectors stay in registers.
inline void weighted_sum(const float* p, const float* v, int64_t vs, int64_t n, int64_t D, float* acc) {
  int64_t d = 0;
  for (; d + 4 * V <= D; d += 4 * V) {
    fVec a0 = fVec::loadu(acc + d), a1 = fVec::loadu(acc + d + V), a2 = fVec::loadu(acc + d + 2 * V),
         a3 = fVec::loadu(acc + d + 3 * V);
    for (int64_t j = 0; j < n; ++j) {
      const fVec pj(p[j]);
      const float* vj = v + j * vs + d;
      a0 = at::vec::fmadd(pj, fVec::loadu(vj), a0);
      a1 = at::vec::fmadd(pj, fVec::loadu(vj + V), a1);
      a2 = at::vec::fmadd(pj, fVec::loadu(vj + 2 * V), a2);
      a3 = at::vec::fmadd(pj, fVec::loadu(vj + 3 * V), a3);
    }
    a0.store(acc + d);
    a1.store(acc + d + V);
    a2.store(acc + d + 2 * V);
    a3.store(acc + d + 3 * V);
  }
  for (; d < D; d += V) {
    const int64_t w = std::min(V, D - d);
    fVec a = fVec::loadu(acc + d, w);
    for (int64_t j = 0; j < n; ++j) a = at::vec::fmadd(fVec(p[j]), fVec::loadu(v + j * vs + d, w), a);
    a.store(acc + d, w);
  }
}

// acc[g, 0, D) += sum_j p[g, j] * v_j for 4 heads g at once (p rows p_stride apart, acc rows D apart), n rows
// v_j = v + j * vs of T widened in registers, D a multiple of C * V, C = kSumChunk<T> vectors per pass: every V row
// is read once for the 4 heads and the 4 * C accumulators of a column chunk stay in registers. 16-bit values take
// C = 2 (8 accumulators, the 2 widened vectors and a broadcast p fit AVX2's 16 registers, where 4 spilled; with
// scores_4heads, cross-attention over bfloat16 keys 1.2-1.3x faster than 4 and the widened block copy), float32
// C = 4 (the rows are FMA operands in memory; 2 measured 3% slower). Each lane's sum runs over j in order, as in
// weighted_sum.
template <typename T>
constexpr int kSumChunk = std::is_same_v<T, float> ? 4 : 2;

template <typename T>
inline void weighted_sum_4heads(const float* p, int64_t p_stride, const T* v, int64_t vs, int64_t n, int64_t D, float* acc) {
  constexpr int C = kSumChunk<T>;
  for (int64_t d = 0; d < D; d += C * V) {
    fVec a[4][C];
    for (int g = 0; g < 4; ++g)
      for (int i = 0; i < C; ++i) a[g][i] = fVec::loadu(acc + g * D + d + i * V);
    for (int64_t j = 0; j < n; ++j) {
      const T* vj = v + j * vs + d;
      fVec vv[C];
      for (int i = 0; i < C; ++i) vv[i] = load1(vj + i * V);
      for (int g = 0; g < 4; ++g) {
        const fVec pj(p[g * p_stride + j]);
        for (int i = 0; i < C; ++i) a[g][i] = at::vec::fmadd(pj, vv[i], a[g][i]);
      }
    }
    for (int g = 0; g < 4; ++g)
      for (int i = 0; i < C; ++i) a[g][i].store(acc + g * D + d + i * V);
  }
}

// One block of n scores of a query head in a single-pass (online) softmax: m is the running maximum, l the running
// sum of exp(s - m) and acc [D] the running sum of exp(s - m) v. s[0, n) becomes exp(s - m) with the new m, and
// acc and l are rescaled when the maximum grows. The final output is acc / l.
inline void online_softmax_block(float* s, int64_t n, float& m, float& l, float* acc, int64_t D) {
  fVec mx_v(std::numeric_limits<float>::lowest());
  int64_t j = 0;
  for (; j + V <= n; j += V) mx_v = at::vec::maximum(mx_v, fVec::loadu(s + j));
  __at_align__ float lanes[V];
  mx_v.store(lanes);
  float bm = std::numeric_limits<float>::lowest();
  for (int64_t i = 0; i < V; ++i) bm = std::max(bm, lanes[i]);
  for (; j < n; ++j) bm = std::max(bm, s[j]);
  if (bm > m) {
    const float factor = std::exp(m - bm);  // 0 for the first block (m = -inf)
    l *= factor;
    for (int64_t d = 0; d < D; ++d) acc[d] *= factor;
    m = bm;
  }
  fVec sum_v(0.f);
  for (j = 0; j + V <= n; j += V) {
    const fVec e = (fVec::loadu(s + j) - fVec(m)).exp();
    e.store(s + j);
    sum_v = sum_v + e;
  }
  float sum = hsum(sum_v);
  for (; j < n; ++j) sum += (s[j] = std::exp(s[j] - m));
  l += sum;
}

// scores[g * stride + j] = lowest float for the keys j < n with valid[j] false (none when valid is null).
inline void mask_keys(const bool* valid, int64_t n, int64_t G, int64_t stride, float* scores) {
  if (!valid) return;
  for (int64_t j = 0; j < n; ++j)
    if (!valid[j])
      for (int64_t g = 0; g < G; ++g) scores[g * stride + j] = std::numeric_limits<float>::lowest();
}

// Where a (row, KV head)'s keys live: keys.length(b) keys for row b; keys.run(b, h, j0) -> {k, v, n}: pointers to
// key/value row j0 and how many rows follow it at the fixed strides keys.kss / keys.vss (a cache: all the rest; a
// paged cache: the rest of its block).
template <typename T>
struct KeyRun {
  const T* k;
  const T* v;
  int64_t n;
};

// Keys and values [B, Hkv, S, D] in one tensor each (row strides s*b, s*h, s*s).
template <typename T>
struct DenseKeys {
  const T* kp;
  const T* vp;
  int64_t ksb, ksh, kss, vsb, vsh, vss, S;
  int64_t length(int64_t) const { return S; }
  KeyRun<T> run(int64_t b, int64_t h, int64_t j0) const {
    return {kp + b * ksb + h * ksh + j0 * kss, vp + b * vsb + h * vsh + j0 * vss, S - j0};
  }
};

// q [B, H, D]; keys (DenseKeys, PagedKeys...) with Hkv heads of D elements (last dim contiguous); mask_add [B, >=S]
// float additive or nullptr; key_valid [B, >=S] bool or nullptr. Writes out [B, H, D] contiguous. One task per
// (row, KV head): its G query heads share every K and V row read. A row's result depends on its own inputs only
// (never on B), and the keys are visited in blocks of at most kBlock that never cross a run.
template <typename T, typename Keys>
void attend(const at::Tensor& q, int64_t Hkv, const Keys& keys, const float* mask_add, int64_t mask_stride,
            const bool* key_valid, int64_t valid_stride, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), G = H / Hkv;
  const int64_t Dp = (D + V - 1) / V * V;  // q rows zero-padded to whole vectors
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t qsb = q.stride(0), qsh = q.stride(1);
  const int64_t kss = keys.kss, vss = keys.vss;

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    // scores: one block of keys for the G heads ([G, kBlock]); m, l: running max and sum per head
    std::vector<float> qf(G * Dp), scores(G * kBlock), acc(G * D), block(kBlock * D), m(G), l(G);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / Hkv, h = unit % Hkv;
      std::fill(qf.begin(), qf.end(), 0.f);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) qf[g * Dp + d] = static_cast<float>(qp[b * qsb + (h * G + g) * qsh + d]);
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      const int64_t S = keys.length(b);
      // one pass over the keys: each block's K rows and then its V rows are read once, side by side
      for (int64_t j0 = 0, n = 0; j0 < S; j0 += n) {
        const KeyRun<T> r = keys.run(b, h, j0);
        n = std::min({kBlock, r.n, S - j0});
        const float* mask = mask_add ? mask_add + b * mask_stride + j0 : nullptr;
        // scores[g, j] = q_g . k_j * scale + mask
        bool done = false;
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<T, at::BFloat16>) {
          if (D == 4 * V || D == 8 * V) {
            for (int64_t g = 0; g < G; ++g) {
              const T* qg = qp + b * qsb + (h * G + g) * qsh;
              if (D == 4 * V) {
                scores_block_bf16<4>(qg, r.k, kss, n, scale, mask, scores.data() + g * kBlock);
              } else {
                scores_block_bf16<8>(qg, r.k, kss, n, scale, mask, scores.data() + g * kBlock);
              }
            }
            done = true;
          }
        }
#endif
        if constexpr (!std::is_same_v<T, float>) {  // float32 keys are read in place below, q held in registers
          if (!done && G % 4 == 0 && (D == 4 * V || D == 8 * V || D == 16 * V)) {
            for (int64_t g = 0; g < G; g += 4) {
              float* sg = scores.data() + g * kBlock;
              const float* qg = qf.data() + g * Dp;
              if (D == 4 * V) {
                scores_4heads<4>(qg, Dp, r.k, kss, n, scale, mask, sg);
              } else if (D == 8 * V) {
                scores_4heads<8>(qg, Dp, r.k, kss, n, scale, mask, sg);
              } else {
                scores_4heads<16>(qg, Dp, r.k, kss, n, scale, mask, sg);
              }
            }
            done = true;
          }
        }
        if (!done) {
          int64_t ks;
          const float* kf = rows_as_float(r.k, kss, n, D, block.data(), ks);
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qf.data() + g * Dp;
            float* sg = scores.data() + g * kBlock;
            if (D == 4 * V) {
              scores_block<4>(qg, kf, ks, n, D, scale, mask, sg);
            } else if (D == 8 * V) {
              scores_block<8>(qg, kf, ks, n, D, scale, mask, sg);
            } else {
              scores_block<0>(qg, kf, ks, n, D, scale, mask, sg);
            }
          }
        }
        mask_keys(key_valid ? key_valid + b * valid_stride + j0 : nullptr, n, G, kBlock, scores.data());
        for (int64_t g = 0; g < G; ++g)
          online_softmax_block(scores.data() + g * kBlock, n, m[g], l[g], acc.data() + g * D, D);
        // acc_g += sum_j p[g, j] v_j
        if (G % 4 == 0 && D % (kSumChunk<T> * V) == 0) {
          for (int64_t g = 0; g < G; g += 4)
            weighted_sum_4heads(scores.data() + g * kBlock, kBlock, r.v, vss, n, D, acc.data() + g * D);
        } else {
          int64_t vs;
          const float* vf = rows_as_float(r.v, vss, n, D, block.data(), vs);
          for (int64_t g = 0; g < G; ++g) weighted_sum(scores.data() + g * kBlock, vf, vs, n, D, acc.data() + g * D);
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d)
          op[(b * H + h * G + g) * D + d] = static_cast<T>(acc[g * D + d] / l[g]);
    }
  });
}

}  // namespace llama_mm::cpu::attention_core
