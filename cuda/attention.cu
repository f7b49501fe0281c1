// Single-query attention of the decode step, CUDA (flash-decoding): decode_attention over the self-attention KV
// cache and cross_attention over the image K/V. Same arithmetic as the CPU kernels (cpp/attention.cpp):
//   scores = q.k * D^-1/2 (+ additive mask; a key_valid=false slot gets the lowest float), softmax in float32,
//   out = sum_j p_j v_j.
//
// Work split: block (split, kv head x query-head tile, batch row) takes the G query heads of one KV head (up to kG
// of them) over one chunk of key slots, so every K/V row is read once for the whole group:
//   pass 1  scores of the chunk -> shared memory (a group of `lanes` threads per key row, 16-byte loads, shuffle sum)
//   pass 2  the chunk's max and sum of exp per query head (block reductions)
//   pass 3  sum_j exp(s_j - max) v_j in registers, then summed over the block
// With one split the block writes the output; otherwise it writes (max, sum, unnormalised out) to a float32
// workspace and combine_kernel merges the splits. The number of splits depends on S, the batch, the heads and the
// SM count only, never on `length` (a captured CUDA graph replays it with a new length): blocks whose chunk starts
// at or past the length exit at once and combine_kernel reads only the live splits.
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <optional>

#include "cuda_ops.h"
#include "cuda_utils.cuh"

namespace llama_mm::cuda {
namespace {

constexpr int kThreads = 128, kWarps = kThreads / 32;
constexpr int kMaxHeadDim = 256;
constexpr int kMaxElemsPerLane = kMaxHeadDim / 32;  // a 32-lane group covers a 256-wide row with 8 each
constexpr int kUnroll = 4;                          // key rows in flight per thread group
constexpr int kMinChunk = 64, kMaxChunk = 1024;     // key slots per block (multiples of 32)

struct AttnArgs {
  const void* q;                      // [B, H, D], unit stride along D
  int64_t q_sb, q_sh;
  const void* k;                      // [B, Hkv, S, D], unit stride along D
  int64_t k_sb, k_sh, k_ss;
  const void* v;                      // [B, Hkv, S, D], unit stride along D
  int64_t v_sb, v_sh, v_ss;
  const bool* key_valid;              // [B, >= S], unit stride along S; or null
  int64_t valid_sb;
  const float* mask;                  // [B, S] additive, contiguous; or null
  const int64_t* length;              // one int64 on the device: slots [0, length) attended; null: all S
  void* out;                          // [B, H, D] contiguous (written when splits == 1)
  float* ws_out;                      // [B, H, splits, D] unnormalised partial outputs (splits > 1)
  float* ws_max;                      // [B, H, splits] chunk max of the scores
  float* ws_sum;                      // [B, H, splits] chunk sum of exp(score - max)
  int64_t S;
  int H, G, D, lanes, chunk, splits, head_tiles;
  float scale;
};

// Slots to attend to: the device-side length clamped to [1, S] (it cannot be checked on the host without a sync;
// the clamp keeps every read inside the cache), or all S.
__device__ __forceinline__ int64_t live_length(const int64_t* length, int64_t S) {
  if (!length) return S;
  const int64_t n = *length;
  return n < 1 ? 1 : n > S ? S : n;
}

template <typename T, int kVec>
__device__ __forceinline__ Pack<T, kVec> load_or_zero(const T* p, bool load) {
  Pack<T, kVec> r;
  if (load) {
    r = load_pack<T, kVec>(p);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) r.v[k] = static_cast<T>(0.0f);
  }
  return r;
}

// Reduce kG values over the block (max or sum); every thread gets the results. red: shared [kWarps][kG].
template <int kG, bool kMax>
__device__ __forceinline__ void block_reduce(float (&x)[kG], float (*red)[kG]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int g = 0; g < kG; ++g) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float y = __shfl_xor_sync(0xffffffffu, x[g], o);
      x[g] = kMax ? fmaxf(x[g], y) : x[g] + y;
    }
    if (lane == 0) red[warp][g] = x[g];
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < kG; ++g) {
    x[g] = red[0][g];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) x[g] = kMax ? fmaxf(x[g], red[w][g]) : x[g] + red[w][g];
  }
  __syncthreads();  // red may be reused
}

// grid (splits, Hkv * head_tiles, B), kThreads threads; dynamic shared memory max(kG * chunk, kWarps * kG * D)
// floats. Lane li of a `lanes`-thread group owns packs li, li + lanes, ... of a row (kVec elements each).
template <typename T, int kVec, int kG>
__global__ void __launch_bounds__(kThreads) attention_kernel(const AttnArgs a) {
  constexpr int kPPL = kMaxElemsPerLane / kVec;  // packs per lane, at most
  constexpr int kE = kPPL * kVec;                // elements per lane, at most
  const int split = blockIdx.x, kv_head = blockIdx.y / a.head_tiles, tile = blockIdx.y % a.head_tiles;
  const int64_t b = blockIdx.z;
  const int64_t len = live_length(a.length, a.S);
  const int64_t s0 = static_cast<int64_t>(split) * a.chunk;
  if (s0 >= len) return;  // past the length: nothing to do (the grid is sized for the whole cache)
  const int n = static_cast<int>(len - s0 < a.chunk ? len - s0 : a.chunk);  // keys in this chunk
  const int h0 = kv_head * a.G + tile * kG;  // first query head of the block
  const int gn = min(kG, a.G - tile * kG);   // query heads in the block
  const int P = a.D / kVec;                  // packs per row
  const int lanes = a.lanes, groups = kThreads / lanes;
  const int li = threadIdx.x % lanes, grp = threadIdx.x / lanes;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  extern __shared__ float smem[];  // scores / probabilities [kG][chunk]; later partial outputs [kWarps][kG][D]
  __shared__ float red[kWarps][kG];
  __shared__ float chunk_max[kG], chunk_sum[kG];

  // this lane's part of the G query rows, in float32
  float qf[kG][kE];
  const T* qb = static_cast<const T*>(a.q) + b * a.q_sb + static_cast<int64_t>(h0) * a.q_sh;
#pragma unroll
  for (int g = 0; g < kG; ++g) {
#pragma unroll
    for (int i = 0; i < kPPL; ++i) {
      const int pk = li + i * lanes;
      const Pack<T, kVec> x = load_or_zero<T, kVec>(qb + g * a.q_sh + pk * kVec, g < gn && pk < P);
#pragma unroll
      for (int k = 0; k < kVec; ++k) qf[g][i * kVec + k] = static_cast<float>(x.v[k]);
    }
  }

  // pass 1: scores[g][j] = q_g . k_j * scale + mask_j, or the lowest float for a key_valid=false slot
  const T* kb = static_cast<const T*>(a.k) + b * a.k_sb + kv_head * a.k_sh + s0 * a.k_ss;
  const bool* valid = a.key_valid ? a.key_valid + b * a.valid_sb + s0 : nullptr;
  const float* mask = a.mask ? a.mask + b * a.S + s0 : nullptr;
  for (int base = 0; base < n; base += kUnroll * groups) {  // block-uniform trip count: shuffles stay converged
    Pack<T, kVec> kr[kUnroll][kPPL];
    bool live[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = base + u * groups + grp;
      live[u] = j < n && (!valid || valid[j]);
#pragma unroll
      for (int i = 0; i < kPPL; ++i) {
        const int pk = li + i * lanes;
        kr[u][i] = load_or_zero<T, kVec>(kb + j * a.k_ss + pk * kVec, live[u] && pk < P);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = base + u * groups + grp;
      float dot[kG];
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        dot[g] = 0.0f;
        if (g >= gn) continue;  // block-uniform: the shuffles below stay converged
#pragma unroll
        for (int i = 0; i < kPPL; ++i)
#pragma unroll
          for (int k = 0; k < kVec; ++k) dot[g] += qf[g][i * kVec + k] * static_cast<float>(kr[u][i].v[k]);
        for (int o = lanes / 2; o > 0; o >>= 1) dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], o);
      }
      if (li == 0 && j < n) {
        const float add = mask ? mask[j] : 0.0f;
#pragma unroll
        for (int g = 0; g < kG; ++g)
          if (g < gn) smem[g * a.chunk + j] = live[u] ? dot[g] * a.scale + add : -FLT_MAX;
      }
    }
  }
  __syncthreads();

  // pass 2: the chunk's max and sum of exp(score - max) per query head; scores become exp(score - max). The max
  // starts at the lowest float, as on the CPU: a chunk of -inf scores (an additive -inf mask) gets weights 0.
  float m[kG], l[kG];
#pragma unroll
  for (int g = 0; g < kG; ++g) m[g] = -FLT_MAX;
  for (int j = threadIdx.x; j < n; j += kThreads)
#pragma unroll
    for (int g = 0; g < kG; ++g)
      if (g < gn) m[g] = fmaxf(m[g], smem[g * a.chunk + j]);
  block_reduce<kG, true>(m, red);
#pragma unroll
  for (int g = 0; g < kG; ++g) l[g] = 0.0f;
  for (int j = threadIdx.x; j < n; j += kThreads)
#pragma unroll
    for (int g = 0; g < kG; ++g)
      if (g < gn) {
        const float e = expf(smem[g * a.chunk + j] - m[g]);
        smem[g * a.chunk + j] = e;
        l[g] += e;
      }
  block_reduce<kG, false>(l, red);  // synchronises: the exp values are visible to all
  if (threadIdx.x == 0)
#pragma unroll
    for (int g = 0; g < kG; ++g) chunk_max[g] = m[g], chunk_sum[g] = l[g];

  // pass 3: acc_g = sum_j e[g][j] v_j over this thread group's keys
  float acc[kG][kE];
#pragma unroll
  for (int g = 0; g < kG; ++g)
#pragma unroll
    for (int e = 0; e < kE; ++e) acc[g][e] = 0.0f;
  const T* vb = static_cast<const T*>(a.v) + b * a.v_sb + kv_head * a.v_sh + s0 * a.v_ss;
  for (int base = 0; base < n; base += kUnroll * groups) {
    Pack<T, kVec> vr[kUnroll][kPPL];
    float pj[kUnroll][kG];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = base + u * groups + grp;
      bool any = false;  // a key with zero weight for every head is not read (as the CPU kernel skips p == 0)
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        pj[u][g] = (g < gn && j < n) ? smem[g * a.chunk + j] : 0.0f;
        any |= pj[u][g] != 0.0f;
      }
#pragma unroll
      for (int i = 0; i < kPPL; ++i) {
        const int pk = li + i * lanes;
        vr[u][i] = load_or_zero<T, kVec>(vb + j * a.v_ss + pk * kVec, any && pk < P);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int g = 0; g < kG; ++g)
        if (pj[u][g] != 0.0f)
#pragma unroll
          for (int i = 0; i < kPPL; ++i)
#pragma unroll
            for (int k = 0; k < kVec; ++k) acc[g][i * kVec + k] += pj[u][g] * static_cast<float>(vr[u][i].v[k]);
  }
  // sum over the thread groups of each warp (lanes with the same li), then over the warps in shared memory
#pragma unroll
  for (int g = 0; g < kG; ++g)
#pragma unroll
    for (int e = 0; e < kE; ++e)
      for (int o = lanes; o < 32; o <<= 1) acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], o);
  __syncthreads();  // every thread is done with the probabilities: smem now holds [kWarps][kG][D]
  if (lane < lanes)
#pragma unroll
    for (int g = 0; g < kG; ++g)
#pragma unroll
      for (int i = 0; i < kPPL; ++i) {
        const int pk = li + i * lanes;
        if (g < gn && pk < P)
#pragma unroll
          for (int k = 0; k < kVec; ++k) smem[(warp * kG + g) * a.D + pk * kVec + k] = acc[g][i * kVec + k];
      }
  __syncthreads();

  const int64_t row0 = b * a.H + h0;  // output row of query head h0
  for (int idx = threadIdx.x; idx < gn * a.D; idx += kThreads) {
    const int g = idx / a.D, d = idx % a.D;
    float o = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += smem[(w * kG + g) * a.D + d];
    if (a.splits == 1) {
      static_cast<T*>(a.out)[(row0 + g) * a.D + d] = static_cast<T>(o / chunk_sum[g]);
    } else {
      a.ws_out[((row0 + g) * a.splits + split) * a.D + d] = o;
    }
  }
  if (a.splits > 1 && threadIdx.x < gn) {
    const int64_t at = (row0 + threadIdx.x) * a.splits + split;
    a.ws_max[at] = chunk_max[threadIdx.x];
    a.ws_sum[at] = chunk_sum[threadIdx.x];
  }
}

// grid B * H blocks, kThreads threads, dynamic shared memory `splits` floats. Merges the live splits:
//   M = max_i m_i; w_i = exp(m_i - M); out = sum_i w_i o_i / sum_i w_i l_i.
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(const float* __restrict__ ws_out,
                                                           const float* __restrict__ ws_max,
                                                           const float* __restrict__ ws_sum, const int64_t* length,
                                                           int64_t S, int chunk, int splits, int D,
                                                           T* __restrict__ out) {
  extern __shared__ float weight[];  // [splits]
  __shared__ float red[kWarps][1];
  const int64_t row = blockIdx.x;
  const int64_t len = live_length(length, S);
  const int live = static_cast<int>((len + chunk - 1) / chunk);
  const float* m = ws_max + row * splits;
  const float* l = ws_sum + row * splits;

  float mx[1] = {-FLT_MAX};
  for (int i = threadIdx.x; i < live; i += kThreads) mx[0] = fmaxf(mx[0], m[i]);
  block_reduce<1, true>(mx, red);
  float total[1] = {0.0f};
  for (int i = threadIdx.x; i < live; i += kThreads) {
    weight[i] = expf(m[i] - mx[0]);
    if (weight[i] != 0.0f) total[0] += weight[i] * l[i];
  }
  block_reduce<1, false>(total, red);  // synchronises: the weights are visible to all
  const float inv = 1.0f / total[0];
  for (int d = threadIdx.x; d < D; d += kThreads) {
    float o = 0.0f;
    for (int i = 0; i < live; ++i)  // a split of zero weight is skipped, as the CPU kernel skips p == 0 keys
      if (weight[i] != 0.0f) o += weight[i] * ws_out[(row * splits + i) * D + d];
    out[row * D + d] = static_cast<T>(o * inv);
  }
}

template <typename T, int kVec, int kG>
void launch_split(const AttnArgs& a, int64_t B, int64_t Hkv, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.splits), static_cast<unsigned>(Hkv * a.head_tiles),
                  static_cast<unsigned>(B));
  const size_t smem = sizeof(float) * std::max<size_t>(size_t{kG} * a.chunk, size_t{kWarps} * kG * a.D);
  attention_kernel<T, kVec, kG><<<grid, kThreads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Streaming multiprocessors of a device, queried once per device (then safe to call during graph capture).
int sm_count(int device) {
  static std::array<std::atomic<int>, 64> cache{};  // 0: not queried yet
  if (device >= 0 && device < static_cast<int>(cache.size())) {
    if (const int n = cache[device].load(std::memory_order_relaxed)) return n;
  }
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < static_cast<int>(cache.size())) cache[device].store(n, std::memory_order_relaxed);
  return n;
}

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_float_dtype(q, op, "q");
  TORCH_CHECK(q.dim() == 3, "llama_mm.", op, ": q must be [B, H, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(), "llama_mm.", op,
              ": k and v must be [B, Hkv, S, D] of one shape, got k ", k.sizes(), " v ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(2), "llama_mm.", op, ": q ", q.sizes(), " and k ",
              k.sizes(), " disagree on batch or head_dim");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "llama_mm.", op, ": query heads ", q.size(1),
              " not a multiple of kv heads ", k.size(1));
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), "llama_mm.", op,
              ": q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  check_device(k, q, c10::DeviceType::CUDA, op, "k", "q");
  check_device(v, q, c10::DeviceType::CUDA, op, "v", "q");
  TORCH_CHECK(q.size(2) >= 1 && q.size(2) <= kMaxHeadDim, "llama_mm.", op, ": head_dim must be in [1, ",
              kMaxHeadDim, "], got ", q.size(2));
  TORCH_CHECK(q.stride(2) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "llama_mm.", op,
              ": head_dim must be contiguous (unit stride) in q, k and v");
  // grid.z is the batch; the combine kernel keeps one float per split (at most S / kMaxChunk + 1) in shared memory
  TORCH_CHECK(q.size(0) <= 65535 && k.size(2) <= kMaxChunk * int64_t{8192}, "llama_mm.", op,
              ": too large for the CUDA kernel (batch <= 65535, S <= ", kMaxChunk * int64_t{8192}, "): q ",
              q.sizes(), ", k ", k.sizes());
}

// out [B, H, D] = attention of q over k/v slots [0, length) (length: device scalar, or null for all S).
void attend(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* key_valid,
            int64_t valid_sb, const float* mask, const int64_t* length, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1), S = k.size(2), G = H / Hkv;
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index());
  AttnArgs a{};
  a.q = q.const_data_ptr();
  a.q_sb = q.stride(0), a.q_sh = q.stride(1);
  a.k = k.const_data_ptr();
  a.k_sb = k.stride(0), a.k_sh = k.stride(1), a.k_ss = k.stride(2);
  a.v = v.const_data_ptr();
  a.v_sb = v.stride(0), a.v_sh = v.stride(1), a.v_ss = v.stride(2);
  a.key_valid = key_valid, a.valid_sb = valid_sb;
  a.mask = mask, a.length = length;
  a.out = out.mutable_data_ptr();
  a.S = S;
  a.H = static_cast<int>(H), a.G = static_cast<int>(G), a.D = static_cast<int>(D);
  a.scale = 1.0f / std::sqrt(static_cast<float>(D));

  LLAMA_MM_DISPATCH_FLOAT_TYPES(q.scalar_type(), "llama_mm.attention.cuda", [&] {
    constexpr int kVec = kPackElems<scalar_t>;
    const bool vectorized = D % kVec == 0 && is_aligned16(a.q) && is_aligned16(a.k) && is_aligned16(a.v) &&
                            a.q_sb % kVec == 0 && a.q_sh % kVec == 0 && a.k_sb % kVec == 0 &&
                            a.k_sh % kVec == 0 && a.k_ss % kVec == 0 && a.v_sb % kVec == 0 &&
                            a.v_sh % kVec == 0 && a.v_ss % kVec == 0;
    const int64_t packs = vectorized ? D / kVec : D;
    a.lanes = 1;  // threads per key row: the packs of a row, rounded up to a power of two, at most a warp
    while (a.lanes < packs && a.lanes < 32) a.lanes *= 2;
    // query heads per block: G rounded up to 1, 2, 4 or 8 (tiles of 8 for larger groups); the scalar-load
    // fallback (unaligned or odd head_dim) always uses tiles of 8, which keeps the number of kernels down
    int kg = 8;
    if (vectorized) {
      kg = 1;
      while (kg < G && kg < 8) kg *= 2;
    }
    a.head_tiles = static_cast<int>(ceil_div(G, kg));
    TORCH_CHECK(Hkv * a.head_tiles <= 65535, "llama_mm.", op, ": too many kv heads for the CUDA kernel: ", Hkv);

    // Splits: enough blocks for a few per SM (batch-1 decode fills the GPU), chunks of kMinChunk..kMaxChunk slots.
    const int64_t units = B * Hkv * a.head_tiles;
    const int64_t want = std::clamp<int64_t>(ceil_div(4 * sm_count(q.device().index()), units), 1,
                                             ceil_div(S, kMinChunk));
    a.chunk = static_cast<int>(std::min<int64_t>(kMaxChunk, ceil_div(ceil_div(S, want), 32) * 32));
    a.splits = static_cast<int>(ceil_div(S, a.chunk));
    at::Tensor ws_out, ws_stats;
    if (a.splits > 1) {
      const auto fopts = q.options().dtype(at::kFloat);
      ws_out = at::empty({B, H, a.splits, D}, fopts);
      ws_stats = at::empty({2, B, H, a.splits}, fopts);
      a.ws_out = ws_out.mutable_data_ptr<float>();
      a.ws_max = ws_stats[0].mutable_data_ptr<float>();
      a.ws_sum = ws_stats[1].mutable_data_ptr<float>();
    }

    if (vectorized) {
      switch (kg) {
        case 1: launch_split<scalar_t, kVec, 1>(a, B, Hkv, stream); break;
        case 2: launch_split<scalar_t, kVec, 2>(a, B, Hkv, stream); break;
        case 4: launch_split<scalar_t, kVec, 4>(a, B, Hkv, stream); break;
        default: launch_split<scalar_t, kVec, 8>(a, B, Hkv, stream); break;
      }
    } else {
      launch_split<scalar_t, 1, 8>(a, B, Hkv, stream);
    }
    if (a.splits > 1) {
      combine_kernel<scalar_t><<<static_cast<unsigned>(B * H), kThreads, sizeof(float) * a.splits, stream>>>(
          a.ws_out, a.ws_max, a.ws_sum, length, S, a.chunk, a.splits, a.D, out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& key_valid, const at::Tensor& length) {
  const char* op = "decode_attention";
  check_qkv(op, q, k_cache, v_cache);
  const int64_t S_max = k_cache.size(2);
  TORCH_CHECK(S_max >= 1, "llama_mm.decode_attention: the cache has no slots (k_cache ", k_cache.sizes(), ")");
  TORCH_CHECK(length.numel() == 1 && length.scalar_type() == at::kLong && length.device() == q.device(),
              "llama_mm.decode_attention: length must be a one-element int64 tensor on ", q.device(),
              " (it is read on the device, so a captured CUDA graph sees its current value), got ",
              length.scalar_type(), " ", length.sizes(), " on ", length.device());
  // The length is not known on the host, so key_valid must cover the whole cache. A length outside [1, S_max]
  // is clamped to it on the device.
  TORCH_CHECK(key_valid.scalar_type() == at::kBool && key_valid.dim() == 2 && key_valid.size(0) == q.size(0) &&
                  key_valid.size(1) >= S_max && (key_valid.stride(1) == 1 || key_valid.size(1) == 1),
              "llama_mm.decode_attention: key_valid must be a bool [B, >= S_max] = [", q.size(0), ", >= ", S_max,
              "] tensor with unit stride along the slots, got ", key_valid.scalar_type(), " ", key_valid.sizes());
  check_device(key_valid, q, c10::DeviceType::CUDA, op, "key_valid", "q");
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (out.numel() == 0) return out;
  attend(op, q, k_cache, v_cache, key_valid.const_data_ptr<bool>(), key_valid.stride(0), nullptr,
         length.const_data_ptr<int64_t>(), out);
  return out;
}

at::Tensor cross_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& mask) {
  const char* op = "cross_attention";
  check_qkv(op, q, k, v);
  at::Tensor m;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == q.size(0) && mask->size(1) == k.size(2),
                "llama_mm.cross_attention: mask must be [B, S] = [", q.size(0), ", ", k.size(2), "], got ",
                mask->sizes());
    TORCH_CHECK(mask->is_floating_point(), "llama_mm.cross_attention: mask must be an additive float mask, got ",
                mask->scalar_type());
    check_device(*mask, q, c10::DeviceType::CUDA, op, "mask", "q");
    m = mask->to(at::kFloat).contiguous();  // [B, S]; no copy for the engine's float32 mask
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (out.numel() == 0) return out;
  if (k.size(2) == 0) return out.zero_();  // no keys: the CPU kernel's result
  attend(op, q, k, v, nullptr, 0, m.defined() ? m.const_data_ptr<float>() : nullptr, nullptr, out);
  return out;
}

}  // namespace llama_mm::cuda

TORCH_LIBRARY_IMPL(llama_mm, CUDA, m) {
  m.impl("decode_attention", &llama_mm::cuda::decode_attention);
  m.impl("cross_attention", &llama_mm::cuda::cross_attention);
}
