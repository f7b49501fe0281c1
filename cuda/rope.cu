// Rotary position embedding, CUDA: one block per position (b, t). The block first computes the D/2 cos/sin values
// of that position into shared memory (rounded to x's dtype, like the reference's `.to(x.dtype)`), then rotates
// every head's pairs (x[i], x[i + D/2]) with 16-byte packed loads (see cpp/ops.h and cpp/rope.cpp for the formula).
#include <torch/library.h>

#include "cuda_ops.h"
#include "cuda_utils.cuh"

namespace llama_mm::cuda {
namespace {

// grid: B * T blocks; dynamic shared memory: 2 * half floats. x [B, T, H, D] with strides (sB, sT, sH, 1),
// out contiguous. kVec elements per load; the host guarantees half % kVec == 0, strides % kVec == 0 and
// 16-byte aligned x and out when kVec > 1.
template <typename T, int kVec>
__global__ void rope_kernel(const T* __restrict__ x, int64_t sB, int64_t sT, int64_t sH,
                            const int64_t* __restrict__ positions, const float* __restrict__ inv_freq,
                            T* __restrict__ out, int T_len, int H, int half) {
  extern __shared__ float cos_sin[];  // cos [half], then sin [half]
  float* cs = cos_sin;
  float* sn = cos_sin + half;
  const int64_t bt = blockIdx.x;  // b * T + t
  const float pos = static_cast<float>(positions[bt]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float angle = pos * inv_freq[i];  // freqs = positions.float() * inv_freq
    cs[i] = round_to<T>(cosf(angle));
    sn[i] = round_to<T>(sinf(angle));
  }
  __syncthreads();

  const T* xrow = x + (bt / T_len) * sB + (bt % T_len) * sT;
  T* orow = out + bt * H * (2 * static_cast<int64_t>(half));
  const int packs_per_head = half / kVec;
  for (int idx = threadIdx.x; idx < H * packs_per_head; idx += blockDim.x) {
    const int h = idx / packs_per_head, i = (idx % packs_per_head) * kVec;
    const T* xh = xrow + h * sH;
    T* oh = orow + static_cast<int64_t>(h) * 2 * half;
    const Pack<T, kVec> x1 = load_pack<T, kVec>(xh + i);
    const Pack<T, kVec> x2 = load_pack<T, kVec>(xh + half + i);
    Pack<T, kVec> o1, o2;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float a = static_cast<float>(x1.v[k]), b = static_cast<float>(x2.v[k]);
      const float c = cs[i + k], s = sn[i + k];
      // each product and the sum rounded to T, like the reference's separate tensor ops
      o1.v[k] = static_cast<T>(round_to<T>(a * c) + round_to<T>(-b * s));
      o2.v[k] = static_cast<T>(round_to<T>(b * c) + round_to<T>(a * s));
    }
    store_pack<T, kVec>(oh + i, o1);
    store_pack<T, kVec>(oh + half + i, o2);
  }
}

template <typename T, int kVec>
void launch(const at::Tensor& x, const at::Tensor& pos, const at::Tensor& freq, at::Tensor& out,
            cudaStream_t stream) {
  const int64_t BT = x.size(0) * x.size(1);
  const int H = static_cast<int>(x.size(2)), half = static_cast<int>(x.size(3) / 2);
  const int threads = static_cast<int>(std::clamp<int64_t>(ceil_div(int64_t(H) * (half / kVec), 32) * 32, 64, 512));
  const size_t smem = 2 * static_cast<size_t>(half) * sizeof(float);
  rope_kernel<T, kVec><<<static_cast<unsigned>(BT), threads, smem, stream>>>(
      x.const_data_ptr<T>(), x.stride(0), x.stride(1), x.stride(2), pos.const_data_ptr<int64_t>(),
      freq.const_data_ptr<float>(), out.mutable_data_ptr<T>(), static_cast<int>(x.size(1)), H, half);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void rope_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq) {
  check_rope_args(x, positions, inv_freq, c10::DeviceType::CUDA);
  check_out(out, x, "rope");
  if (x.numel() == 0) return;
  TORCH_CHECK(x.size(0) * x.size(1) <= INT32_MAX && x.size(1) <= INT32_MAX && x.size(2) * x.size(3) <= INT32_MAX,
              "llama_mm.rope: x is too large for the CUDA kernel, got ", x.sizes());
  TORCH_CHECK(x.size(3) * sizeof(float) <= 48 * 1024, "llama_mm.rope: head dim D too large, got ", x.size(3));
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  const at::Tensor xs = x.stride(3) == 1 ? x : x.contiguous();  // [B, T, H, D], unit stride along D
  const at::Tensor pos = positions.contiguous();                 // [B, T]
  const at::Tensor freq = inv_freq.contiguous();                 // [D/2]
  LLAMA_MM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "llama_mm.rope.cuda", [&] {
    constexpr int kVec = kPackElems<scalar_t>;
    const bool vectorized = (xs.size(3) / 2) % kVec == 0 && xs.stride(0) % kVec == 0 &&
                            xs.stride(1) % kVec == 0 && xs.stride(2) % kVec == 0 &&
                            is_aligned16(xs.const_data_ptr()) && is_aligned16(out.const_data_ptr());
    if (vectorized) {
      launch<scalar_t, kVec>(xs, pos, freq, out, stream);
    } else {
      launch<scalar_t, 1>(xs, pos, freq, out, stream);
    }
  });
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  rope_out(out, x, positions, inv_freq);
  return out;
}

}  // namespace llama_mm::cuda

TORCH_LIBRARY_IMPL(llama_mm, CUDA, m) {
  m.impl("rope", &llama_mm::cuda::rope);
}
