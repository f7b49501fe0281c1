// Microbenchmark of the llama_mm CPU kernels (called directly through cpp/ops.h, no dispatcher) against the plain
// ATen composition of the same formula, on decode-like and prefill-like Llama-3.2-11B shapes.
// Prints one JSON object per line: op, case, shape, dtype, threads, ours_us / aten_us (medians), speedup (of the
// medians), ours_min_us / aten_min_us, max_abs_diff (ours vs ATen).
// Built with -DLLAMA_MM_BUILD_BENCH=ON (target llama_mm_bench); bench/cpp/run_ops_bench.py runs it and records it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <utility>
#include <string>
#include <vector>

#include "attention.h"
#include "gemv.h"
#include "ops.h"

namespace {

// Per-call times in microseconds of `ours` and `aten` over `reps` batches, the two alternating batch by batch so
// both see the same machine load. A batch runs long enough (>= ~2 ms) for the clock, which matters for
// the microsecond-scale decode shapes.
struct Timing {
  double ours_median, ours_min, aten_median, aten_min;
};

Timing time_us(const std::function<void()>& ours, const std::function<void()>& aten,
                                  int reps = 21) {
  using clock = std::chrono::steady_clock;
  const auto calls_for = [](const std::function<void()>& fn) {
    for (int i = 0; i < 3; ++i) fn();  // warm up (allocator, caches, thread pool)
    int calls = 1;
    for (;;) {
      const auto t0 = clock::now();
      for (int i = 0; i < calls; ++i) fn();
      if (std::chrono::duration<double>(clock::now() - t0).count() >= 2e-3 || calls >= (1 << 20)) return calls;
      calls *= 2;
    }
  };
  const auto batch_us = [](const std::function<void()>& fn, int calls) {
    const auto t0 = clock::now();
    for (int i = 0; i < calls; ++i) fn();
    return std::chrono::duration<double, std::micro>(clock::now() - t0).count() / calls;
  };
  const int ours_calls = calls_for(ours), aten_calls = calls_for(aten);
  std::vector<double> ours_us, aten_us;
  for (int r = 0; r < reps; ++r) {
    ours_us.push_back(batch_us(ours, ours_calls));
    aten_us.push_back(batch_us(aten, aten_calls));
  }
  const auto median = [](std::vector<double> v) {
    std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
    return v[v.size() / 2];
  };
  const auto min = [](const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); };
  return {median(ours_us), min(ours_us), median(aten_us), min(aten_us)};
}

std::string shape_json(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

void report(const char* op, const char* kind, const at::Tensor& x, const std::function<at::Tensor()>& ours,
            const std::function<at::Tensor()>& aten) {
  const double diff = (ours().to(at::kFloat) - aten().to(at::kFloat)).abs().max().item<double>();
  const Timing t = time_us([&] { ours(); }, [&] { aten(); });
  std::printf(
      "{\"op\": \"%s\", \"case\": \"%s\", \"shape\": %s, \"dtype\": \"%s\", \"threads\": %d, "
      "\"ours_us\": %.3f, \"aten_us\": %.3f, \"speedup\": %.2f, \"ours_min_us\": %.3f, \"aten_min_us\": %.3f, "
      "\"max_abs_diff\": %.3g}\n",
      op, kind, shape_json(x.sizes()).c_str(), c10::toString(x.scalar_type()), at::get_num_threads(), t.ours_median,
      t.aten_median, t.aten_median / t.ours_median, t.ours_min, t.aten_min, diff);
  std::fflush(stdout);
}

// ---- the plain ATen compositions (the HF formulas, op by op) ---------------------------------------------------

at::Tensor rms_norm_aten(const at::Tensor& x, const at::Tensor& w, double eps) {
  const at::Tensor h = x.to(at::kFloat);
  const at::Tensor variance = h.pow(2).mean(-1, /*keepdim=*/true);
  return w * (h * at::rsqrt(variance + eps)).to(x.scalar_type());
}

at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
}

at::Tensor rope_aten(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq) {
  const at::Tensor freqs = positions.to(at::kFloat).unsqueeze(-1) * inv_freq;  // [B, T, D/2]
  const at::Tensor emb = at::cat({freqs, freqs}, -1);                           // [B, T, D]
  const at::Tensor cos = emb.cos().to(x.scalar_type()).unsqueeze(2);            // [B, T, 1, D]
  const at::Tensor sin = emb.sin().to(x.scalar_type()).unsqueeze(2);
  return x * cos + rotate_half(x) * sin;
}

at::Tensor silu_mul_aten(const at::Tensor& gate, const at::Tensor& up) {
  return at::silu(gate) * up;
}

// ---- cases -----------------------------------------------------------------------------------------------------

void bench_rms_norm(const char* kind, int64_t rows, int64_t D, at::ScalarType dtype) {
  const at::Tensor x = at::randn({rows, D}).to(dtype);
  const at::Tensor w = at::randn({D}).to(dtype);
  report("rms_norm", kind, x, [&] { return llama_mm::cpu::rms_norm(x, w, 1e-5); },
         [&] { return rms_norm_aten(x, w, 1e-5); });
}

void bench_rope(const char* kind, int64_t T, at::ScalarType dtype) {
  constexpr int64_t H = 32, KV = 8, D = 128;
  // q as the model produces it: a [B, T, H, D] view of the fused qkv projection output
  const at::Tensor qkv = at::randn({1, T, (H + 2 * KV) * D}).to(dtype);
  const at::Tensor q = qkv.slice(-1, 0, H * D).view({1, T, H, D});
  const at::Tensor positions = at::arange(100, 100 + T, at::kLong).unsqueeze(0);
  const at::Tensor inv_freq = 1.0 / at::pow(500000.0, at::arange(0, D, 2, at::kFloat) / static_cast<double>(D));
  report("rope", kind, q, [&] { return llama_mm::cpu::rope(q, positions, inv_freq); },
         [&] { return rope_aten(q, positions, inv_freq); });
}

void bench_silu_mul(const char* kind, int64_t rows, int64_t F, at::ScalarType dtype) {
  const at::Tensor gate = at::randn({rows, F}).to(dtype);
  const at::Tensor up = at::randn({rows, F}).to(dtype);
  report("silu_mul", kind, gate, [&] { return llama_mm::cpu::silu_mul(gate, up); },
         [&] { return silu_mul_aten(gate, up); });
}

// Decode-step linear layer: the streaming GEMV against at::linear, on the 11B text stack's shapes. The weights
// (tens of MB) cycle through several copies so that each call reads from memory rather than a warm cache.
void bench_gemv(const char* kind, int64_t N, int64_t K, at::ScalarType dtype) {
  std::vector<at::Tensor> ws;
  for (int i = 0; i < 4; ++i) ws.push_back(at::randn({N, K}).to(dtype));
  const at::Tensor x = at::randn({1, K}).to(dtype);
  size_t i = 0, j = 0;
  report("gemv", kind, ws[0], [&] { return llama_mm::cpu::gemv(x, ws[i++ % ws.size()]); },
         [&] { return at::linear(x, ws[j++ % ws.size()]); });
}

// Decode attention over a KV cache (GQA 32/8 heads, head_dim 128) against the SDPA composition.
void bench_decode_attention(const char* kind, int64_t S, at::ScalarType dtype) {
  constexpr int64_t H = 32, KV = 8, D = 128;
  const at::Tensor q = at::randn({1, H, D}).to(dtype);
  const at::Tensor k = at::randn({1, KV, S, D}).to(dtype);
  const at::Tensor v = at::randn({1, KV, S, D}).to(dtype);
  const at::Tensor valid = at::ones({1, S}, at::kBool);
  const at::Tensor length = at::full({1}, S, at::kLong);
  report("decode_attention", kind, k, [&] { return llama_mm::cpu::decode_attention(q, k, v, valid, length); },
         [&] {
           return at::scaled_dot_product_attention(q.unsqueeze(2), k, v, std::nullopt, 0.0, false, std::nullopt, true)
               .squeeze(2);
         });
}

// Cross-attention of one decode token over a 4-tile image (4 x 1601 vision tokens) with its additive mask.
void bench_cross_attention(at::ScalarType dtype) {
  constexpr int64_t H = 32, KV = 8, D = 128, S = 4 * 1601;
  const at::Tensor q = at::randn({1, H, D}).to(dtype);
  const at::Tensor k = at::randn({1, KV, S, D}).to(dtype);
  const at::Tensor v = at::randn({1, KV, S, D}).to(dtype);
  const at::Tensor mask = at::zeros({1, S});
  report("cross_attention", "decode", k, [&] { return llama_mm::cpu::cross_attention(q, k, v, mask); },
         [&] {
           return at::scaled_dot_product_attention(q.unsqueeze(2), k, v, mask.view({1, 1, 1, S}).to(dtype), 0.0,
                                                   false, std::nullopt, true)
               .squeeze(2);
         });
}

}  // namespace

// usage: llama_mm_bench [threads]   (default: ATen's default, one per core)
int main(int argc, char** argv) {
  if (argc > 1) at::set_num_threads(std::stoi(argv[1]));
  c10::InferenceMode inference;  // as the decode engine runs: no autograd bookkeeping on either side
  at::manual_seed(0);
  for (const auto dtype : {at::kFloat, at::kBFloat16}) {
    bench_rms_norm("decode", 1, 4096, dtype);
    bench_rms_norm("prefill", 512, 4096, dtype);
    bench_rope("decode", 1, dtype);
    bench_rope("prefill", 512, dtype);
    bench_silu_mul("decode", 1, 14336, dtype);
    bench_silu_mul("prefill", 512, 14336, dtype);
    bench_gemv("qkv_o", 4096, 4096, dtype);
    bench_gemv("mlp_up", 14336, 4096, dtype);
    bench_gemv("mlp_down", 4096, 14336, dtype);
    bench_decode_attention("ctx_512", 512, dtype);
    bench_decode_attention("ctx_4096", 4096, dtype);
    bench_cross_attention(dtype);
  }
  return 0;
}
