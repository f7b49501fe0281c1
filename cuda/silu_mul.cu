// Fused SwiGLU activation silu(gate) * up, CUDA: grid-stride loop over 16-byte packs of [N, F] rows.
// Rounds like the reference `F.silu(gate) * up`: silu = gate / (1 + exp(-gate)) in float32 rounded to the dtype,
// then the product rounded to the dtype.
#include <torch/library.h>

#include "cuda_ops.h"
#include "cuda_utils.cuh"

namespace llama_mm::cuda {
namespace {

// gate row r at gate + r * g_stride, up row r at up + r * u_stride, out contiguous [N, F].
// kVec elements per load; the host guarantees F % kVec == 0, row strides % kVec == 0 and 16-byte alignment
// when kVec > 1.
template <typename T, int kVec>
__global__ void silu_mul_kernel(const T* __restrict__ gate, int64_t g_stride, const T* __restrict__ up,
                                int64_t u_stride, T* __restrict__ out, int64_t N, int64_t F) {
  const int64_t packs_per_row = F / kVec;
  const int64_t total = N * packs_per_row;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < total;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = p / packs_per_row, j = (p % packs_per_row) * kVec;
    const Pack<T, kVec> g = load_pack<T, kVec>(gate + r * g_stride + j);
    const Pack<T, kVec> u = load_pack<T, kVec>(up + r * u_stride + j);
    Pack<T, kVec> o;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float gf = static_cast<float>(g.v[k]);
      const float silu = round_to<T>(gf / (1.0f + expf(-gf)));
      o.v[k] = static_cast<T>(silu * static_cast<float>(u.v[k]));
    }
    store_pack<T, kVec>(out + r * F + j, o);
  }
}

template <typename T, int kVec>
void launch(const at::Tensor& g, const at::Tensor& u, at::Tensor& out, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t N = g.size(0), F = g.size(1);
  const int64_t blocks = std::clamp<int64_t>(ceil_div(N * (F / kVec), kThreads), 1, 65535);
  silu_mul_kernel<T, kVec><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      g.const_data_ptr<T>(), g.stride(0), u.const_data_ptr<T>(), u.stride(0), out.mutable_data_ptr<T>(), N, F);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void silu_mul_out(at::Tensor& out, const at::Tensor& gate, const at::Tensor& up) {
  check_silu_mul_args(gate, up, c10::DeviceType::CUDA);
  check_out(out, gate, "silu_mul");
  if (gate.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(gate.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(gate.device().index());
  const at::Tensor g = as_rows(gate), u = as_rows(up);  // [N, F]
  LLAMA_MM_DISPATCH_FLOAT_TYPES(gate.scalar_type(), "llama_mm.silu_mul.cuda", [&] {
    constexpr int kVec = kPackElems<scalar_t>;
    const bool vectorized = g.size(1) % kVec == 0 && g.stride(0) % kVec == 0 && u.stride(0) % kVec == 0 &&
                            is_aligned16(g.const_data_ptr()) && is_aligned16(u.const_data_ptr()) &&
                            is_aligned16(out.const_data_ptr());
    if (vectorized) {
      launch<scalar_t, kVec>(g, u, out, stream);
    } else {
      launch<scalar_t, 1>(g, u, out, stream);
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  silu_mul_out(out, gate, up);
  return out;
}

}  // namespace llama_mm::cuda

TORCH_LIBRARY_IMPL(llama_mm, CUDA, m) {
  m.impl("silu_mul", &llama_mm::cuda::silu_mul);
}
