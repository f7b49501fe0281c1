// Weight-only quantized linear layer, CUDA: y = x W^T with W int4 / int8 in compressed-tensors' pack-quantized
// layout (value k of row n in word k*bits/32 at bit (k*bits)%32, stored as q + 2^(bits-1)). Same contract as the
// CPU kernel (cpp/kernels/qlinear.h).
//
// Decode (M <= kQlinearDecodeRows): one warp per output row n. Lane l reads the row's packed words l, l+32, ...
// (coalesced), dequantizes each value in registers as (q - zero) * scale in float32 and multiplies it with up to
// kRows rows of x at once; the lanes' partial sums are added with a fixed butterfly. Every (m, n) result follows
// the same operations in the same order whatever M is: bitwise batch invariance.
// Prefill (more rows): W dequantized to float32 in tiles of output rows, then at::mm.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "cuda_ops.h"
#include "cuda_utils.cuh"
#include "qlinear.h"

namespace llama_mm::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kRows = 8;  // rows of x per pass over a weight row

struct QArgs {
  const uint32_t* w;  // [N, Wd] packed words
  const void* scale;  // [N, G]
  const int8_t* zero; // [N, G] or null
  int64_t N, K, G, gs, Wd;
};

// (q - zero) * scale of value j of `word`, k its index in the row, in float32.
template <int BITS, typename SC>
__device__ __forceinline__ float dequant(const QArgs& a, int64_t n, uint32_t word, int j, int64_t k) {
  const int64_t g = k / a.gs;
  const int u = static_cast<int>((word >> (j * BITS)) & ((1u << BITS) - 1));
  const int z = a.zero ? a.zero[n * a.G + g] : 0;
  const float s = static_cast<float>(static_cast<const SC*>(a.scale)[n * a.G + g]);
  return static_cast<float>(u - (1 << (BITS - 1)) - z) * s;
}

template <typename T, typename SC, int BITS>
__global__ void qlinear_decode_kernel(const T* __restrict__ x, QArgs a, T* __restrict__ y, int64_t M) {
  constexpr int kPerWord = 32 / BITS;
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (n >= a.N) return;
  const uint32_t* row = a.w + n * a.Wd;
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    float acc[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
    for (int64_t wi = lane; wi < a.Wd; wi += 32) {
      const uint32_t word = __ldg(row + wi);
#pragma unroll
      for (int j = 0; j < kPerWord; ++j) {
        const int64_t k = wi * kPerWord + j;
        const float wv = dequant<BITS, SC>(a, n, word, j, k);
#pragma unroll
        for (int r = 0; r < kRows; ++r)
          if (m0 + r < M) acc[r] = fmaf(wv, static_cast<float>(x[(m0 + r) * a.K + k]), acc[r]);
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float sum = warp_sum(acc[r]);
      if (lane == 0 && m0 + r < M) y[(m0 + r) * a.N + n] = static_cast<T>(sum);
    }
  }
}

// out [rows, K] float32 = W rows [n0, n0 + rows) dequantized.
template <typename SC, int BITS>
__global__ void qlinear_dequantize_kernel(QArgs a, int64_t n0, int64_t rows, float* __restrict__ out) {
  constexpr int kPerWord = 32 / BITS;
  const int64_t words = rows * a.Wd;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < words;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / a.Wd, wi = i % a.Wd, n = n0 + r;
    const uint32_t word = __ldg(a.w + n * a.Wd + wi);
#pragma unroll
    for (int j = 0; j < kPerWord; ++j) {
      const int64_t k = wi * kPerWord + j;
      out[r * a.K + k] = dequant<BITS, SC>(a, n, word, j, k);
    }
  }
}

template <typename T, typename SC>
void decode(const at::Tensor& x2, const QArgs& a, int64_t bits, at::Tensor& y, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(ceil_div(a.N, kWarpsPerBlock));
  const T* xp = x2.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  if (bits == 4) {
    qlinear_decode_kernel<T, SC, 4><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(xp, a, yp, x2.size(0));
  } else {
    qlinear_decode_kernel<T, SC, 8><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(xp, a, yp, x2.size(0));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// y [M, N] (x's dtype) = x2 [M, K] @ W^T, W dequantized to float32 in tiles of at most ~256 MiB.
template <typename SC>
void prefill(const at::Tensor& x2, const QArgs& a, int64_t bits, at::Tensor& y, cudaStream_t stream) {
  const at::Tensor xf = x2.to(at::kFloat);
  const int64_t tile = std::max<int64_t>(1, (int64_t{256} << 20) / (4 * a.K));
  at::Tensor wt = at::empty({std::min(tile, a.N), a.K}, xf.options());
  for (int64_t n0 = 0; n0 < a.N; n0 += tile) {
    const int64_t rows = std::min(tile, a.N - n0);
    at::Tensor wtile = wt.narrow(0, 0, rows);  // [rows, K]
    const unsigned blocks = static_cast<unsigned>(std::clamp<int64_t>(ceil_div(rows * a.Wd, 256), 1, 65535));
    if (bits == 4) {
      qlinear_dequantize_kernel<SC, 4><<<blocks, 256, 0, stream>>>(a, n0, rows, wtile.mutable_data_ptr<float>());
    } else {
      qlinear_dequantize_kernel<SC, 8><<<blocks, 256, 0, stream>>>(a, n0, rows, wtile.mutable_data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    y.narrow(1, n0, rows).copy_(at::mm(xf, wtile.t()));  // [M, rows]
  }
}

}  // namespace

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& packed_in, const at::Tensor& scale_in,
                   const std::optional<at::Tensor>& zero_in, int64_t bits, int64_t group_size) {
  check_qlinear_args(x, packed_in, scale_in, zero_in, bits, group_size, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  const int64_t K = x.size(-1), N = packed_in.size(0);
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();  // [M, K]
  const at::Tensor packed = packed_in.contiguous(), scale = scale_in.contiguous();
  const at::Tensor zero = zero_in.has_value() ? zero_in->contiguous() : at::Tensor();
  const int64_t M = x2.size(0);
  at::Tensor y = at::empty({M, N}, x2.options());  // [M, N]
  const QArgs a{reinterpret_cast<const uint32_t*>(packed.const_data_ptr<int32_t>()), scale.const_data_ptr(),
                zero.defined() ? zero.const_data_ptr<int8_t>() : nullptr, N, K, K / group_size, group_size,
                packed.size(1)};
  if (M > 0 && N > 0) {
    LLAMA_MM_DISPATCH_FLOAT_TYPES(scale.scalar_type(), "llama_mm.qlinear.cuda", [&] {
      using SC = scalar_t;
      if (M > llama_mm::cpu::kQlinearDecodeRows) {
        prefill<SC>(x2, a, bits, y, stream);
        return;
      }
      LLAMA_MM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "llama_mm.qlinear.cuda", [&] {
        decode<scalar_t, SC>(x2, a, bits, y, stream);
      });
    });
  }
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  return y.view(out_sizes);
}

}  // namespace llama_mm::cuda

TORCH_LIBRARY_IMPL(llama_mm, CUDA, m) {
  m.impl("qlinear", &llama_mm::cuda::qlinear);
}
