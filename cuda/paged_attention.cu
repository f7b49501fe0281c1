// Paged single-query attention, CUDA: the batched decode step's self-attention over the scheduler's paged KV pool.
// Same arithmetic as the CPU kernel (cpp/kernels/paged_attention.cpp): scores = q.k * D^-1/2, softmax in float32,
// out = sum_j p_j v_j; each row's keys found through its block table.
//
// Work split: one block per (KV head, batch row) takes the G query heads of that KV head, so every K/V row is read
// once for the group. Each warp walks keys j = warp, warp + kWarps, ... with an online softmax per query head
// (running max m, sum l and unnormalised output acc, each lane holding D / 32 elements), and the warps' partial
// results are merged at the end. A row's result depends on its own inputs only (batch-invariant).
#include <torch/library.h>

#include <cfloat>
#include <cmath>

#include "cuda_ops.h"
#include "cuda_utils.cuh"

namespace llama_mm::cuda {
namespace {

constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int kMaxGroup = 8;                   // query heads per KV head
constexpr int kMaxHeadDim = 256;
constexpr int kMaxPerLane = kMaxHeadDim / 32;  // head-dim elements per lane

struct PagedArgs {
  const void* q;  // [B, H, D], unit stride along D
  int64_t q_sb, q_sh;
  const void* k;  // [num_blocks, Hkv, bs, D], unit stride along D
  const void* v;
  int64_t k_sb, k_sh, k_ss, v_sb, v_sh, v_ss;
  const int64_t* tables;   // [B, max_blocks] contiguous
  const int64_t* lengths;  // [B]
  void* out;               // [B, H, D] contiguous
  int64_t num_blocks, max_blocks, bs;
  int H, G, D;
  float scale;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) paged_attention_kernel(PagedArgs a) {
  const int h = blockIdx.x, b = blockIdx.y;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int per_lane = (a.D + 31) / 32;
  const T* qp = static_cast<const T*>(a.q);
  const T* kp = static_cast<const T*>(a.k);
  const T* vp = static_cast<const T*>(a.v);
  // lengths are not checked on the host (no sync): clamp them to the table
  int64_t L = a.lengths[b];
  L = L < 1 ? 1 : (L > a.max_blocks * a.bs ? a.max_blocks * a.bs : L);

  float q[kMaxGroup][kMaxPerLane], acc[kMaxGroup][kMaxPerLane], m[kMaxGroup], l[kMaxGroup];
  for (int g = 0; g < a.G; ++g) {
    m[g] = -FLT_MAX;
    l[g] = 0.f;
    for (int e = 0; e < per_lane; ++e) {
      const int d = lane + 32 * e;
      q[g][e] = d < a.D ? static_cast<float>(qp[b * a.q_sb + (h * a.G + g) * a.q_sh + d]) : 0.f;
      acc[g][e] = 0.f;
    }
  }
  for (int64_t j = warp; j < L; j += kWarps) {
    int64_t block = a.tables[b * a.max_blocks + j / a.bs];
    block = block < 0 ? 0 : (block >= a.num_blocks ? a.num_blocks - 1 : block);
    const int64_t off = j % a.bs;
    const T* kj = kp + block * a.k_sb + h * a.k_sh + off * a.k_ss;
    const T* vj = vp + block * a.v_sb + h * a.v_sh + off * a.v_ss;
    float kv[kMaxPerLane], vv[kMaxPerLane];
    for (int e = 0; e < per_lane; ++e) {
      const int d = lane + 32 * e;
      kv[e] = d < a.D ? static_cast<float>(kj[d]) : 0.f;
      vv[e] = d < a.D ? static_cast<float>(vj[d]) : 0.f;
    }
    for (int g = 0; g < a.G; ++g) {
      float s = 0.f;
      for (int e = 0; e < per_lane; ++e) s += q[g][e] * kv[e];
      s = warp_sum(s) * a.scale;
      const float m_new = fmaxf(m[g], s);
      const float factor = __expf(m[g] - m_new), p = __expf(s - m_new);
      l[g] = l[g] * factor + p;
      for (int e = 0; e < per_lane; ++e) acc[g][e] = acc[g][e] * factor + p * vv[e];
      m[g] = m_new;
    }
  }
  // merge the warps: per query head, the global max, then each warp's sum and output rescaled to it
  __shared__ float s_m[kWarps][kMaxGroup], s_l[kWarps][kMaxGroup];
  __shared__ float s_acc[kWarps][kMaxGroup][kMaxHeadDim];
  for (int g = 0; g < a.G; ++g) {
    if (lane == 0) {
      s_m[warp][g] = m[g];
      s_l[warp][g] = l[g];
    }
    for (int e = 0; e < per_lane; ++e) {
      const int d = lane + 32 * e;
      if (d < a.D) s_acc[warp][g][d] = acc[g][e];
    }
  }
  __syncthreads();
  T* op = static_cast<T*>(a.out);
  for (int i = threadIdx.x; i < a.G * a.D; i += kThreads) {
    const int g = i / a.D, d = i % a.D;
    float mx = -FLT_MAX;
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, s_m[w][g]);
    float sum = 0.f, out = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      if (s_l[w][g] == 0.f) continue;  // a warp that saw no key
      const float f = __expf(s_m[w][g] - mx);
      sum += s_l[w][g] * f;
      out += s_acc[w][g][d] * f;
    }
    op[(static_cast<int64_t>(b) * a.H + h * a.G + g) * a.D + d] = static_cast<T>(out / sum);
  }
}

}  // namespace

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                           const at::Tensor& block_tables, const at::Tensor& lengths) {
  check_paged_attention_args(q, k_pool, v_pool, block_tables, lengths, c10::DeviceType::CUDA);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_pool.size(1), G = H / Hkv;
  TORCH_CHECK(G <= kMaxGroup, "llama_mm.paged_attention (CUDA): at most ", kMaxGroup,
              " query heads per KV head, got ", G);
  TORCH_CHECK(D <= kMaxHeadDim, "llama_mm.paged_attention (CUDA): head_dim at most ", kMaxHeadDim, ", got ", D);
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty({B, H, D}, q.options());
  if (B == 0) return out;
  const auto tables = block_tables.to(at::kLong).contiguous();
  const auto lens = lengths.to(at::kLong).contiguous();
  PagedArgs a{};
  a.q = q.data_ptr();
  a.q_sb = q.stride(0);
  a.q_sh = q.stride(1);
  a.k = k_pool.data_ptr();
  a.v = v_pool.data_ptr();
  a.k_sb = k_pool.stride(0);
  a.k_sh = k_pool.stride(1);
  a.k_ss = k_pool.stride(2);
  a.v_sb = v_pool.stride(0);
  a.v_sh = v_pool.stride(1);
  a.v_ss = v_pool.stride(2);
  a.tables = tables.data_ptr<int64_t>();
  a.lengths = lens.data_ptr<int64_t>();
  a.out = out.data_ptr();
  a.num_blocks = k_pool.size(0);
  a.max_blocks = tables.size(1);
  a.bs = k_pool.size(2);
  a.H = static_cast<int>(H);
  a.G = static_cast<int>(G);
  a.D = static_cast<int>(D);
  a.scale = 1.0f / std::sqrt(static_cast<float>(D));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index());
  LLAMA_MM_DISPATCH_FLOAT_TYPES(q.scalar_type(), "paged_attention", [&] {
    paged_attention_kernel<scalar_t><<<dim3(Hkv, B), kThreads, 0, stream>>>(a);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace llama_mm::cuda

TORCH_LIBRARY_IMPL(llama_mm, CUDA, m) {
  m.impl("paged_attention", &llama_mm::cuda::paged_attention);
}
