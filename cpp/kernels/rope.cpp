// Rotary position embedding, CPU (see ops.h for the exact formula).
//
// Per position (b, t) the D/2 angles pos * inv_freq[i] give cos/sin once (rounded to x's dtype, as the reference's
// `.to(x.dtype)` does); every head then rotates its pairs (x[i], x[i + D/2]):
//   out[i]       = x[i] * cos[i] - x[i + D/2] * sin[i]
//   out[i + D/2] = x[i + D/2] * cos[i] + x[i] * sin[i]
// with each product and the sum rounded to x's dtype, like the reference's separate tensor ops.
#include <ATen/Config.h>
#include <ATen/Parallel.h>

#include <vector>

#include "cpu_utils.h"
#include "op_common.h"
#include "ops.h"

#if AT_MKL_ENABLED() && !defined(__APPLE__)
#define LLAMA_MM_USE_MKL_VML 1
#else
#define LLAMA_MM_USE_MKL_VML 0
#endif

#if LLAMA_MM_USE_MKL_VML
// ATen computes float32 cos/sin with MKL's VML (ATen/cpu/vml.h, LP64 MKL as in PyTorch's builds); calling the same
// functions, exported by libtorch_cpu, in the same mode makes our tables bit-identical to the reference's
// `emb.cos()` / `emb.sin()`.
extern "C" void vmsCos(int n, const float* a, float* r, long long mode);
extern "C" void vmsSin(int n, const float* a, float* r, long long mode);
#endif

namespace llama_mm::cpu {
namespace {

#if LLAMA_MM_USE_MKL_VML
constexpr long long kVmlMode = 0x2 /*VML_HA*/ | 0x140000 /*VML_FTZDAZ_OFF*/ | 0x100 /*VML_ERRMODE_IGNORE*/;

void cos_sin(const float* angles, int64_t n, float* cs, float* sn) {
  vmsCos(static_cast<int>(n), angles, cs, kVmlMode);
  vmsSin(static_cast<int>(n), angles, sn, kVmlMode);
}
#else
// Without MKL, ATen's cos/sin are Vectorized<float>::cos()/sin() (SLEEF): use the same.
void cos_sin(const float* angles, int64_t n, float* cs, float* sn) {
  fVec lo, hi;
  for (int64_t i = 0; i < n; i += kChunk) {
    const int64_t m = std::min(kChunk, n - i);
    load2(angles + i, m, lo, hi);
    store2(cs + i, m, lo.cos(), hi.cos());
    store2(sn + i, m, lo.sin(), hi.sin());
  }
}
#endif

// cos/sin of pos * inv_freq[0:half], rounded to T, into cs[0:padded] and sn[0:padded]; `angles` is scratch.
// padded = half rounded up to kChunk; entries past half are cos 1, sin 0.
template <typename T>
void cos_sin_row(float pos, const float* inv_freq, int64_t half, int64_t padded, float* angles, float* cs,
                 float* sn) {
  fVec lo, hi;
  const fVec p(pos);
  for (int64_t i = 0; i < padded; i += kChunk) {
    load2(inv_freq + i, std::min(kChunk, half - i), lo, hi);
    store2(angles + i, kChunk, p * lo, p * hi);  // freqs = positions.float() * inv_freq
  }
  cos_sin(angles, padded, cs, sn);
  for (int64_t i = 0; i < padded; i += kChunk) {  // .to(x.dtype)
    load2(cs + i, kChunk, lo, hi);
    round2<T>(lo, hi);
    store2(cs + i, kChunk, lo, hi);
    load2(sn + i, kChunk, lo, hi);
    round2<T>(lo, hi);
    store2(sn + i, kChunk, lo, hi);
  }
}

// One head: x[0:D] (unit stride) -> out[0:D].
template <typename T>
void rope_head(const T* x, T* out, const float* cs, const float* sn, int64_t half) {
  fVec x1_lo, x1_hi, x2_lo, x2_hi, c_lo, c_hi, s_lo, s_hi;
  for (int64_t i = 0; i < half; i += kChunk) {
    const int64_t n = std::min(kChunk, half - i);
    load2(x + i, n, x1_lo, x1_hi);
    load2(x + half + i, n, x2_lo, x2_hi);
    load2(cs + i, kChunk, c_lo, c_hi);
    load2(sn + i, kChunk, s_lo, s_hi);
    // first half: x1 * cos + (-x2) * sin
    fVec a_lo = x1_lo * c_lo, a_hi = x1_hi * c_hi;
    fVec b_lo = x2_lo.neg() * s_lo, b_hi = x2_hi.neg() * s_hi;
    round2<T>(a_lo, a_hi);
    round2<T>(b_lo, b_hi);
    store2(out + i, n, a_lo + b_lo, a_hi + b_hi);
    // second half: x2 * cos + x1 * sin
    a_lo = x2_lo * c_lo;
    a_hi = x2_hi * c_hi;
    b_lo = x1_lo * s_lo;
    b_hi = x1_hi * s_hi;
    round2<T>(a_lo, a_hi);
    round2<T>(b_lo, b_hi);
    store2(out + half + i, n, a_lo + b_lo, a_hi + b_hi);
  }
}

}  // namespace

void rope_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq) {
  check_rope_args(x, positions, inv_freq, c10::DeviceType::CPU);
  check_out(out, x, "rope");
  if (x.numel() == 0) return;
  const at::Tensor xs = x.stride(3) == 1 ? x : x.contiguous();  // [B, T, H, D], unit stride along D
  const at::Tensor pos = positions.contiguous();                 // [B, T]
  const at::Tensor freq = inv_freq.contiguous();                 // [D/2]
  const int64_t T = x.size(1), H = x.size(2), D = x.size(3), half = D / 2;
  const int64_t sB = xs.stride(0), sT = xs.stride(1), sH = xs.stride(2);
  const int64_t padded = (half + kChunk - 1) / kChunk * kChunk;
  LLAMA_MM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "llama_mm.rope", [&] {
    const scalar_t* xp = xs.const_data_ptr<scalar_t>();
    const int64_t* pp = pos.const_data_ptr<int64_t>();
    const float* fp = freq.const_data_ptr<float>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.size(0) * T, row_grain(H * D), [&](int64_t begin, int64_t end) {
      std::vector<float> angles(padded), cs(padded), sn(padded);
      for (int64_t bt = begin; bt < end; ++bt) {  // bt = b * T + t
        cos_sin_row<scalar_t>(static_cast<float>(pp[bt]), fp, half, padded, angles.data(), cs.data(), sn.data());
        const scalar_t* xrow = xp + (bt / T) * sB + (bt % T) * sT;
        for (int64_t h = 0; h < H; ++h) {
          rope_head(xrow + h * sH, op + (bt * H + h) * D, cs.data(), sn.data(), half);
        }
      }
    });
  });
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  rope_out(out, x, positions, inv_freq);
  return out;
}

}  // namespace llama_mm::cpu
