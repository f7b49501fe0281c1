// RMSNorm over the last dim, CUDA: one block per row, warp-shuffle block reduction, 16-byte packed loads.
//   out = weight * round_T(x * rsqrt(mean(x^2) + eps)), computed in float32 (see cpp/ops.h).
#include <torch/library.h>

#include "cuda_ops.h"
#include "cuda_utils.cuh"

namespace llama_mm::cuda {
namespace {

// grid: one block per row; x row r starts at x + r * x_row_stride, out is contiguous [N, D].
// kVec elements per load; the host guarantees D % kVec == 0 and 16-byte alignment when kVec > 1.
template <typename T, int kVec>
__global__ void rms_norm_kernel(const T* __restrict__ x, int64_t x_row_stride, const T* __restrict__ weight,
                                T* __restrict__ out, int D, float eps) {
  const T* xr = x + blockIdx.x * x_row_stride;
  T* orow = out + static_cast<int64_t>(blockIdx.x) * D;
  const int num_packs = D / kVec;

  float sumsq = 0.0f;
  for (int p = threadIdx.x; p < num_packs; p += blockDim.x) {
    const Pack<T, kVec> v = load_pack<T, kVec>(xr + p * kVec);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float f = static_cast<float>(v.v[k]);
      sumsq += f * f;
    }
  }
  const float rstd = rsqrtf(block_sum(sumsq) / static_cast<float>(D) + eps);

  for (int p = threadIdx.x; p < num_packs; p += blockDim.x) {
    const Pack<T, kVec> v = load_pack<T, kVec>(xr + p * kVec);
    const Pack<T, kVec> w = load_pack<T, kVec>(weight + p * kVec);
    Pack<T, kVec> o;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float normed = round_to<T>(static_cast<float>(v.v[k]) * rstd);  // .to(input_dtype)
      o.v[k] = static_cast<T>(static_cast<float>(w.v[k]) * normed);
    }
    store_pack<T, kVec>(orow + p * kVec, o);
  }
}

template <typename T, int kVec>
void launch(const at::Tensor& rows, const at::Tensor& w, at::Tensor& out, float eps, cudaStream_t stream) {
  const int64_t N = rows.size(0);
  const int D = static_cast<int>(rows.size(1));
  const int threads = static_cast<int>(std::clamp<int64_t>(ceil_div(D / kVec, 32) * 32, 32, 1024));
  rms_norm_kernel<T, kVec><<<static_cast<unsigned>(N), threads, 0, stream>>>(
      rows.const_data_ptr<T>(), rows.stride(0), w.const_data_ptr<T>(), out.mutable_data_ptr<T>(), D, eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void rms_norm_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm_args(x, weight, eps, c10::DeviceType::CUDA);
  check_out(out, x, "rms_norm");
  if (x.numel() == 0) return;
  TORCH_CHECK(x.size(-1) <= INT32_MAX, "llama_mm.rms_norm: the last dim of x is too large (", x.size(-1), ")");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  const at::Tensor rows = as_rows(x);  // [N, D]
  const at::Tensor w = weight.contiguous();
  TORCH_CHECK(rows.size(0) <= INT32_MAX, "llama_mm.rms_norm: too many rows in x (", rows.size(0), ")");
  LLAMA_MM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "llama_mm.rms_norm.cuda", [&] {
    constexpr int kVec = kPackElems<scalar_t>;
    const bool vectorized = rows.size(1) % kVec == 0 && rows.stride(0) % kVec == 0 &&
                            is_aligned16(rows.const_data_ptr()) && is_aligned16(w.const_data_ptr()) &&
                            is_aligned16(out.const_data_ptr());
    if (vectorized) {
      launch<scalar_t, kVec>(rows, w, out, static_cast<float>(eps), stream);
    } else {
      launch<scalar_t, 1>(rows, w, out, static_cast<float>(eps), stream);
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  rms_norm_out(out, x, weight, eps);
  return out;
}

}  // namespace llama_mm::cuda

TORCH_LIBRARY_IMPL(llama_mm, CUDA, m) {
  m.impl("rms_norm", &llama_mm::cuda::rms_norm);
}
