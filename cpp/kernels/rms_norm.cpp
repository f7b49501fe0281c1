// RMSNorm over the last dim, CPU (see ops.h for the exact formula).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu_utils.h"
#include "op_common.h"
#include "ops.h"

namespace llama_mm::cpu {
namespace {

// ATen's cascade sum (SumKernel.cpp, multi_row_sum + row_sum) of load(0..size): the row is read as [size/4, 4]
// with 4 interleaved accumulators, summed in chunks of 2^level_power rows over 4 levels. Reproducing its order
// makes the variance bit-identical to the reference's x.pow(2).mean(-1).
template <typename Acc, typename Load>
Acc cascade_sum(const Load& load, int64_t size) {
  constexpr int64_t kIlp = 4, kLevels = 4;
  const int64_t rows = size / kIlp;
  const int64_t ceil_log2 = rows <= 2 ? 1 : 64 - __builtin_clzll(static_cast<uint64_t>(rows - 1));
  const int64_t level_power = std::max<int64_t>(4, ceil_log2 / kLevels);
  const int64_t level_step = int64_t(1) << level_power, level_mask = level_step - 1;
  Acc acc[kLevels][kIlp];
  for (auto& level : acc) std::fill_n(level, kIlp, Acc(0.0f));
  int64_t i = 0;
  while (i + level_step <= rows) {
    for (int64_t j = 0; j < level_step; ++j, ++i) {
      for (int64_t k = 0; k < kIlp; ++k) acc[0][k] = acc[0][k] + load(i * kIlp + k);
    }
    for (int64_t j = 1; j < kLevels; ++j) {
      for (int64_t k = 0; k < kIlp; ++k) {
        acc[j][k] = acc[j][k] + acc[j - 1][k];
        acc[j - 1][k] = Acc(0.0f);
      }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < rows; ++i) {
    for (int64_t k = 0; k < kIlp; ++k) acc[0][k] = acc[0][k] + load(i * kIlp + k);
  }
  for (int64_t j = 1; j < kLevels; ++j) {
    for (int64_t k = 0; k < kIlp; ++k) acc[0][k] = acc[0][k] + acc[j][k];
  }
  for (int64_t e = rows * kIlp; e < size; ++e) acc[0][0] = acc[0][0] + load(e);
  for (int64_t k = 1; k < kIlp; ++k) acc[0][0] = acc[0][0] + acc[0][k];
  return acc[0][0];
}

// ATen sums float32 with 8-lane vectors on x86-64 (its AVX2 sum kernel, which it also dispatches to on AVX512
// machines); its order depends on that width, so the squares are accumulated in 8-lane groups here too.
constexpr int64_t kSumLanes = 8;
struct SumLanes {
  float v[kSumLanes];
  explicit SumLanes(float fill = 0.0f) { std::fill_n(v, kSumLanes, fill); }
  SumLanes operator+(const SumLanes& o) const {
    SumLanes r(0.0f);
    for (int64_t k = 0; k < kSumLanes; ++k) r.v[k] = v[k] + o.v[k];
    return r;
  }
};

// sum(x.float()^2) over D elements, in ATen's order for a contiguous inner reduction: whole 8-lane groups through
// cascade_sum, then the leftover elements one by one, then the group's lanes one by one.
template <typename T>
float sum_of_squares(const T* x, int64_t D) {
  const auto square = [x](int64_t e) {
    const float f = static_cast<float>(x[e]);
    return f * f;
  };
  if (D < kSumLanes) return cascade_sum<float>(square, D);
  const SumLanes groups = cascade_sum<SumLanes>(
      [&](int64_t g) {
        SumLanes r(0.0f);
        for (int64_t k = 0; k < kSumLanes; ++k) r.v[k] = square(g * kSumLanes + k);
        return r;
      },
      D / kSumLanes);
  float total = 0.0f;
  for (int64_t e = D / kSumLanes * kSumLanes; e < D; ++e) total += square(e);
  for (int64_t k = 0; k < kSumLanes; ++k) total += groups.v[k];
  return total;
}

// One row of D elements: out = w * round_T(x * rstd), rstd = 1 / sqrt(mean(x^2) + eps), in float32.
template <typename T>
void rms_norm_row(const T* x, const T* w, T* out, int64_t D, float eps) {
  const float variance = sum_of_squares(x, D) / static_cast<float>(D);
  const fVec rstd(1.0f / std::sqrt(variance + eps));
  fVec a, b, c, d;
  for (int64_t j = 0; j < D; j += kChunk) {
    const int64_t n = std::min(kChunk, D - j);
    load2(x + j, n, a, b);
    a = a * rstd;
    b = b * rstd;
    round2<T>(a, b);  // hidden_states.to(input_dtype)
    load2(w + j, n, c, d);
    store2(out + j, n, c * a, d * b);
  }
}

}  // namespace

void rms_norm_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm_args(x, weight, eps, c10::DeviceType::CPU);
  check_out(out, x, "rms_norm");
  if (x.numel() == 0) return;
  const at::Tensor rows = as_rows(x);  // [N, D]
  const at::Tensor w = weight.contiguous();
  const int64_t N = rows.size(0), D = rows.size(1), row_stride = rows.stride(0);
  LLAMA_MM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "llama_mm.rms_norm", [&] {
    const scalar_t* xp = rows.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(D), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        rms_norm_row(xp + r * row_stride, wp, op + r * D, D, static_cast<float>(eps));
      }
    });
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  rms_norm_out(out, x, weight, eps);
  return out;
}

}  // namespace llama_mm::cpu
