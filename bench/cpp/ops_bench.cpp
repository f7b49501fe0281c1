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
#include "qlinear.h"

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

// ---- qlinear: int4 / int8 weight-only linear against llama_mm's own gemv and against dequantize + at::linear -----

// Median and fastest per-call microseconds of each function, all timed in alternating batches (same machine load).
std::vector<std::pair<double, double>> time_each(const std::vector<std::function<void()>>& fns, int reps = 7) {
  using clock = std::chrono::steady_clock;
  std::vector<int> calls(fns.size(), 1);
  for (size_t f = 0; f < fns.size(); ++f) {
    fns[f]();  // warm up
    for (;;) {
      const auto t0 = clock::now();
      for (int i = 0; i < calls[f]; ++i) fns[f]();
      if (std::chrono::duration<double>(clock::now() - t0).count() >= 2e-3) break;
      calls[f] *= 2;
    }
  }
  std::vector<std::vector<double>> us(fns.size());
  for (int r = 0; r < reps; ++r)
    for (size_t f = 0; f < fns.size(); ++f) {
      const auto t0 = clock::now();
      for (int i = 0; i < calls[f]; ++i) fns[f]();
      us[f].push_back(std::chrono::duration<double, std::micro>(clock::now() - t0).count() / calls[f]);
    }
  std::vector<std::pair<double, double>> out;
  for (auto& v : us) {
    std::sort(v.begin(), v.end());
    out.emplace_back(v[v.size() / 2], v[0]);
  }
  return out;
}

// W [N, K] quantized per group of 128 (symmetric, bfloat16 scales) and packed like compressed-tensors does.
struct QWeight {
  at::Tensor packed, scale;
  int64_t bits;
};

QWeight quantize_packed(const at::Tensor& w, int64_t bits, int64_t gs) {
  const int64_t N = w.size(0), K = w.size(1), qmax = (1 << (bits - 1)) - 1;
  std::vector<at::Tensor> packed, scales;
  for (int64_t n0 = 0; n0 < N; n0 += 4096) {  // in slices of rows: the int64 temporaries stay small
    const int64_t rows = std::min<int64_t>(4096, N - n0);
    const at::Tensor wg = w.narrow(0, n0, rows).to(at::kFloat).view({rows, K / gs, gs});
    const at::Tensor scale = (wg.abs().amax(-1) / qmax).clamp_min(1e-8);                            // [rows, G]
    const at::Tensor u = (at::round(wg / scale.unsqueeze(-1)).clamp(-qmax - 1, qmax) + (qmax + 1))  // unsigned
                             .to(at::kLong).view({rows, K * bits / 32, 32 / bits});
    const at::Tensor words = u.bitwise_left_shift(at::arange(0, 32, bits, at::kLong)).sum(-1);  // an OR of fields
    packed.push_back(at::where(words >= (int64_t{1} << 31), words - (int64_t{1} << 32), words).to(at::kInt));
    scales.push_back(scale.to(at::kBFloat16));
  }
  return {at::cat(packed), at::cat(scales), bits};
}

// The same weight dequantized with plain ATen ops, in x's dtype: (q - 0) * scale.
at::Tensor dequantize_aten(const QWeight& q, at::ScalarType dtype) {
  const int64_t N = q.packed.size(0), K = q.packed.size(1) * 32 / q.bits, G = q.scale.size(1);
  const at::Tensor shifts = at::arange(0, 32, q.bits, at::kInt);
  const at::Tensor u = q.packed.unsqueeze(-1).bitwise_right_shift(shifts).bitwise_and((1 << q.bits) - 1);
  const at::Tensor qf = (u - (1 << (q.bits - 1))).to(at::kFloat).view({N, G, K / G});
  return (qf * q.scale.to(at::kFloat).unsqueeze(-1)).view({N, K}).to(dtype);
}

// One decode-shaped product y = x W^T, x [B, K] bfloat16, W [N, K]: qlinear int4 and int8 (group 128) against
// gemv bf16 and fp32 on the dense weight, at::linear bf16, and dequantize (ATen) + at::linear. Each variant cycles
// through enough copies of its weights (>= 96 MiB) that every call reads them from memory, as a decode step of a
// whole model does, not from the 32 MiB L3.
void bench_qlinear(const char* kind, int64_t N, int64_t K, int64_t B) {
  constexpr int64_t kGroup = 128;
  const double q4_bytes = N * K / 2.0 + N * (K / kGroup) * 2.0, q8_bytes = N * K + N * (K / kGroup) * 2.0;
  const auto copies_for = [](double bytes) { return std::clamp<int64_t>(int64_t((96 << 20) / bytes) + 1, 1, 1024); };
  // no float32 copies and no ATen dequantization (int32 + float32 temporaries of W's size) for the 128256-row
  // lm_head: they would not fit in memory comfortably
  const bool big = N * K > (int64_t{1} << 26);
  std::vector<at::Tensor> w16, w32;
  std::vector<QWeight> q4, q8;
  for (int64_t c = 0; c < copies_for(q4_bytes); ++c) {
    const at::Tensor w = at::randn({N, K}) * 0.02;
    q4.push_back(quantize_packed(w, 4, kGroup));
    if (c < copies_for(q8_bytes)) q8.push_back(quantize_packed(w, 8, kGroup));
    if (c < copies_for(N * K * 2.0)) w16.push_back(w.to(at::kBFloat16));
    if (!big && c < copies_for(N * K * 4.0)) w32.push_back(w);
  }
  const at::Tensor x = at::randn({B, K}).to(at::kBFloat16), x32 = x.to(at::kFloat);
  size_t i4 = 0, i8 = 0, ib = 0, il = 0, i32 = 0, id = 0;
  const auto ql = [&](std::vector<QWeight>& q, size_t& i) {
    const QWeight& w = q[i++ % q.size()];
    return llama_mm::cpu::qlinear(x, w.packed, w.scale, std::nullopt, w.bits, kGroup);
  };
  std::vector<std::string> names = {"qlinear_int4", "qlinear_int8", "gemv_bf16", "linear_bf16"};
  std::vector<double> bytes = {q4_bytes, q8_bytes, N * K * 2.0, N * K * 2.0};
  std::vector<std::function<void()>> fns = {
      [&] { ql(q4, i4); }, [&] { ql(q8, i8); }, [&] { llama_mm::cpu::gemv(x, w16[ib++ % w16.size()]); },
      [&] { at::linear(x, w16[il++ % w16.size()]); }};
  if (!big) {
    names.insert(names.end(), {"gemv_fp32", "dequant_linear_int4"});
    bytes.insert(bytes.end(), {N * K * 4.0, q4_bytes});
    fns.push_back([&] { llama_mm::cpu::gemv(x32, w32[i32++ % w32.size()]); });
    fns.push_back([&] { at::linear(x, dequantize_aten(q4[id++ % q4.size()], x.scalar_type())); });
  }
  // correctness of what is timed: qlinear against the dense product of its own dequantized weight
  const int64_t n_check = std::min<int64_t>(N, 256);
  const at::Tensor ref4 = at::linear(
      x32, dequantize_aten(QWeight{q4[0].packed.narrow(0, 0, n_check), q4[0].scale.narrow(0, 0, n_check), 4},
                           at::kFloat));
  const double diff4 = (ql(q4, i4 = 0).narrow(1, 0, n_check).to(at::kFloat) - ref4).abs().max().item<double>();
  const auto t = time_each(fns);
  std::printf("{\"op\": \"qlinear\", \"case\": \"%s\", \"N\": %lld, \"K\": %lld, \"batch\": %lld, \"group\": %lld, "
              "\"x_dtype\": \"BFloat16\", \"threads\": %d, \"int4_max_abs_diff_vs_dequant_linear\": %.3g, "
              "\"variants\": {",
              kind, (long long)N, (long long)K, (long long)B, (long long)kGroup, at::get_num_threads(), diff4);
  for (size_t f = 0; f < fns.size(); ++f)
    std::printf("%s\"%s\": {\"us\": %.2f, \"min_us\": %.2f, \"weight_bytes\": %.0f, \"GBps_at_min\": %.2f}",
                f ? ", " : "", names[f].c_str(), t[f].first, t[f].second, bytes[f], bytes[f] / t[f].second / 1e3);
  std::printf("}, \"speedup_vs_gemv_bf16\": {\"int4\": %.2f, \"int8\": %.2f}}\n", t[2].first / t[0].first,
              t[2].first / t[1].first);
  std::fflush(stdout);
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

// usage: llama_mm_bench [threads] [suite]   threads: default ATen's (one per core); suite: ops (default) or qlinear
int main(int argc, char** argv) {
  if (argc > 1) at::set_num_threads(std::stoi(argv[1]));
  const std::string suite = argc > 2 ? argv[2] : "ops";
  c10::InferenceMode inference;  // as the decode engine runs: no autograd bookkeeping on either side
  at::manual_seed(0);
  if (suite == "qlinear") {
    const struct { const char* kind; int64_t N, K; } shapes[] = {
        {"11b_qkv_o", 4096, 4096}, {"11b_kv", 1024, 4096}, {"11b_mlp_up", 14336, 4096},
        {"11b_mlp_down", 4096, 14336}, {"11b_lm_head", 128256, 4096}, {"450m_q_o", 1024, 1024},
        {"450m_kv", 256, 1024}, {"450m_mlp_up", 4096, 1024}, {"450m_mlp_down", 1024, 4096}};
    for (const auto& s : shapes)
      for (const int64_t B : {1, 4}) bench_qlinear(s.kind, s.N, s.K, B);
    return 0;
  }
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
