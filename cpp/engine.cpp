#include "engine.h"

#include "gemv.h"

#include <ATen/core/dispatch/Dispatcher.h>
#ifdef LLAMA_MM_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif
#include <c10/util/Exception.h>

#include <limits>

namespace llama_mm {
namespace {

// The llama_mm ops through the dispatcher: CPU or CUDA kernels by the tensors' device.
template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  static auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("llama_mm::rms_norm");
  return h.call(x, w, eps);
}
at::Tensor rope(const at::Tensor& x, const at::Tensor& pos, const at::Tensor& inv_freq) {
  static auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("llama_mm::rope");
  return h.call(x, pos, inv_freq);
}
at::Tensor silu_mul(const at::Tensor& g, const at::Tensor& u) {
  static auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&)>("llama_mm::silu_mul");
  return h.call(g, u);
}
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& valid,
                            const at::Tensor& length) {
  static auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&)>("llama_mm::decode_attention");
  return h.call(q, k, v, valid, length);
}
at::Tensor cross_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& mask) {
  static auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const std::optional<at::Tensor>&)>("llama_mm::cross_attention");
  return h.call(q, k, v, mask);
}

// The most negative finite value of a dtype: transformers' finfo(dtype).min mask value.
at::Scalar lowest(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return static_cast<double>(std::numeric_limits<c10::BFloat16>::lowest());
    case at::kHalf: return static_cast<double>(std::numeric_limits<c10::Half>::lowest());
    default: return static_cast<double>(std::numeric_limits<float>::lowest());
  }
}

// Matrix product with a weight: the streaming matrix-vector kernel for the decode step's few rows on the CPU,
// else at::linear.
at::Tensor matmul_t(const at::Tensor& x, const at::Tensor& w) {
  return cpu::gemv_applies(x, w) ? cpu::gemv(x, w) : at::linear(x, w);
}

const at::Tensor& get(const std::unordered_map<std::string, at::Tensor>& w, const std::string& name) {
  auto it = w.find(name);
  TORCH_CHECK_VALUE(it != w.end(), "Engine: weight '", name, "' is missing");
  return it->second;
}

}  // namespace

// `module` without ".weight"; picks up an unmerged LoRA adapter when the weights hold one.
Engine::Linear Engine::linear(const std::unordered_map<std::string, at::Tensor>& w, const std::string& module) {
  Linear lin{get(w, module + ".weight"), {}, {}};
  const auto a = w.find(module + ".lora_A.weight"), b = w.find(module + ".lora_B.weight");
  TORCH_CHECK_VALUE((a == w.end()) == (b == w.end()), "Engine: ", module, " has only one of lora_A / lora_B");
  if (a != w.end()) {
    TORCH_CHECK_VALUE(a->second.dim() == 2 && b->second.dim() == 2 && a->second.size(1) == lin.w.size(1) &&
                          b->second.size(0) == lin.w.size(0) && b->second.size(1) == a->second.size(0),
                      "Engine: LoRA shapes of ", module, " (A ", a->second.sizes(), ", B ", b->second.sizes(),
                      ") do not fit its weight ", lin.w.sizes());
    lin.lora_a = a->second;
    lin.lora_b = b->second;
  }
  return lin;
}

// y = x W^T (+ the LoRA update in float32, rounded once to x's dtype, as the PyTorch LoraLinear does).
at::Tensor Engine::project(const at::Tensor& x, const Linear& l) {
  auto y = matmul_t(x, l.w);
  if (!l.lora_a.defined()) return y;
  auto xf = x.to(l.lora_a.scalar_type());
  return y + matmul_t(matmul_t(xf, l.lora_a), l.lora_b).to(y.scalar_type());
}

namespace {

}  // namespace

Engine::Engine(const std::unordered_map<std::string, at::Tensor>& w, EngineConfig cfg, at::Tensor inv_freq)
    : cfg_(std::move(cfg)), inv_freq_(std::move(inv_freq)) {
  TORCH_CHECK_VALUE(cfg_.num_heads > 0 && cfg_.num_kv_heads > 0 && cfg_.num_heads % cfg_.num_kv_heads == 0 &&
                        cfg_.hidden_size % cfg_.num_heads == 0,
                    "Engine: inconsistent head counts");
  const std::string p = "language_model.model.";
  embed_ = get(w, p + "embed_tokens.weight");
  final_norm_ = get(w, p + "norm.weight");
  lm_head_ = get(w, "language_model.lm_head.weight");
  TORCH_CHECK_VALUE(embed_.dim() == 2 && embed_.size(1) == cfg_.hidden_size && lm_head_.size(0) == cfg_.vocab_size,
                    "Engine: embedding ", embed_.sizes(), " or lm_head ", lm_head_.sizes(), " disagree with the config");
  TORCH_CHECK_VALUE(inv_freq_.scalar_type() == at::kFloat && inv_freq_.numel() == cfg_.head_dim() / 2,
                    "Engine: inv_freq must be float32 [head_dim / 2]");
  inv_freq_ = inv_freq_.to(embed_.device());
  for (int64_t i = 0; i < cfg_.num_layers; ++i) {
    const std::string l = p + "layers." + std::to_string(i) + ".";
    Layer layer;
    layer.cross = std::find(cfg_.cross_attention_layers.begin(), cfg_.cross_attention_layers.end(), i) !=
                  cfg_.cross_attention_layers.end();
    const std::string a = layer.cross ? l + "cross_attn." : l + "self_attn.";
    layer.input_norm = get(w, l + "input_layernorm.weight");
    layer.post_norm = get(w, l + "post_attention_layernorm.weight");
    layer.wq = linear(w, a + "q_proj");
    layer.wk = linear(w, a + "k_proj");
    layer.wv = linear(w, a + "v_proj");
    layer.wo = linear(w, a + "o_proj");
    layer.w_gate = linear(w, l + "mlp.gate_proj");
    layer.w_up = linear(w, l + "mlp.up_proj");
    layer.w_down = linear(w, l + "mlp.down_proj");
    for (const auto* t : {&layer.input_norm, &layer.post_norm, &layer.wq.w, &layer.wk.w, &layer.wv.w, &layer.wo.w,
                          &layer.w_gate.w, &layer.w_up.w, &layer.w_down.w})
      TORCH_CHECK_VALUE(t->device() == embed_.device() && t->scalar_type() == embed_.scalar_type(),
                        "Engine: layer ", i, " weights must share the embedding's device and dtype");
    if (layer.cross) {
      layer.q_norm = get(w, a + "q_norm.weight");
      layer.k_norm = get(w, a + "k_norm.weight");
      layer.attn_gate = get(w, l + "cross_attn_attn_gate").tanh();
      layer.mlp_gate = get(w, l + "cross_attn_mlp_gate").tanh();
    }
    layers_.push_back(std::move(layer));
  }
}

at::Tensor Engine::mlp(const Layer& l, const at::Tensor& x) const {
  return project(silu_mul(project(x, l.w_gate), project(x, l.w_up)), l.w_down);
}

// The prompt: x [B, T, C] -> [B, T, C], filling cache slots [0, T).
at::Tensor Engine::prefill(const at::Tensor& x_in, const at::Tensor& positions) {
  const int64_t B = x_in.size(0), T = x_in.size(1), H = cfg_.num_heads, Hkv = cfg_.num_kv_heads, D = cfg_.head_dim();
  const double eps = cfg_.rms_norm_eps;
  at::Tensor x = x_in;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const Layer& l = layers_[i];
    if (l.cross) {
      if (!has_image_) continue;  // text only: cross layers are skipped, as in the reference
      auto q = rms_norm(project(rms_norm(x, l.input_norm, eps), l.wq).view({B, T, H, D}), l.q_norm, eps);
      auto attn = at::scaled_dot_product_attention(q.transpose(1, 2), cross_k_[i], cross_v_[i], cross_mask_, 0.0,
                                                   false, std::nullopt, Hkv != H);  // (B, H, T, D)
      x = x + l.attn_gate * project(attn.transpose(1, 2).reshape({B, T, H * D}), l.wo);
      x = x + l.mlp_gate * (row_mask_ * mlp(l, rms_norm(x, l.post_norm, eps)));
    } else {
      auto h = rms_norm(x, l.input_norm, eps);
      auto q = rope(project(h, l.wq).view({B, T, H, D}), positions, inv_freq_);    // (B, T, H, D)
      auto k = rope(project(h, l.wk).view({B, T, Hkv, D}), positions, inv_freq_);  // (B, T, Hkv, D)
      auto v = project(h, l.wv).view({B, T, Hkv, D});
      k_cache_[i].narrow(2, 0, T).copy_(k.transpose(1, 2));
      v_cache_[i].narrow(2, 0, T).copy_(v.transpose(1, 2));
      auto attn = at::scaled_dot_product_attention(q.transpose(1, 2), k_cache_[i].narrow(2, 0, T),
                                                   v_cache_[i].narrow(2, 0, T), self_mask_, 0.0, false, std::nullopt,
                                                   Hkv != H);  // (B, H, T, D)
      x = x + project(attn.transpose(1, 2).reshape({B, T, H * D}), l.wo);
      x = x + mlp(l, rms_norm(x, l.post_norm, eps));
    }
  }
  return x;
}

// One decode step with static shapes: reads tokens_ [B], writes logits_ [B, V], and advances the step state held
// in tensors (slot_, attn_len_, next_pos_) in place, so the same body can be captured once as a CUDA graph and
// replayed.
void Engine::decode_body() {
  const int64_t B = tokens_.size(0), H = cfg_.num_heads, Hkv = cfg_.num_kv_heads, D = cfg_.head_dim();
  const double eps = cfg_.rms_norm_eps;
  auto x = at::embedding(embed_, tokens_.view({B, 1}));  // (B, 1, C)
  for (size_t i = 0; i < layers_.size(); ++i) {
    const Layer& l = layers_[i];
    if (l.cross) {
      if (!has_image_) continue;
      auto q = rms_norm(project(rms_norm(x, l.input_norm, eps), l.wq).view({B, H, D}), l.q_norm, eps);
      auto attn = cross_attention(q, cross_k_[i], cross_v_[i], step_cross_mask_);  // (B, H, D)
      x = x + l.attn_gate * project(attn.view({B, 1, H * D}), l.wo);
      x = x + l.mlp_gate * (step_row_mask_ * mlp(l, rms_norm(x, l.post_norm, eps)));
    } else {
      auto h = rms_norm(x, l.input_norm, eps);
      auto q = rope(project(h, l.wq).view({B, 1, H, D}), next_pos_, inv_freq_);    // (B, 1, H, D)
      auto k = rope(project(h, l.wk).view({B, 1, Hkv, D}), next_pos_, inv_freq_);  // (B, 1, Hkv, D)
      auto v = project(h, l.wv).view({B, 1, Hkv, D});
      k_cache_[i].index_copy_(2, slot_, k.transpose(1, 2));
      v_cache_[i].index_copy_(2, slot_, v.transpose(1, 2));
      auto attn = decode_attention(q.view({B, H, D}), k_cache_[i], v_cache_[i], key_valid_, attn_len_);  // (B, H, D)
      x = x + project(attn.view({B, 1, H * D}), l.wo);
      x = x + mlp(l, rms_norm(x, l.post_norm, eps));
    }
  }
  logits_.copy_(matmul_t(rms_norm(x.select(1, 0), final_norm_, eps), lm_head_));
  slot_.add_(1);
  attn_len_.add_(1);
  next_pos_.add_(1);
}

at::Tensor Engine::start(const at::Tensor& input_ids, const at::Tensor& attention_mask,
                         const std::optional<at::Tensor>& vision_states, const std::optional<at::Tensor>& cross_mask,
                         const std::optional<at::Tensor>& row_mask, int64_t max_new_tokens) {
  TORCH_CHECK_VALUE(input_ids.dim() == 2 && input_ids.scalar_type() == at::kLong && input_ids.size(1) > 0,
                    "input_ids must be a non-empty int64 [B, T] tensor, got ", input_ids.scalar_type(), " ",
                    input_ids.sizes());
  TORCH_CHECK_VALUE(attention_mask.sizes() == input_ids.sizes(), "attention_mask ", attention_mask.sizes(),
                    " must match input_ids ", input_ids.sizes());
  TORCH_CHECK_VALUE(max_new_tokens > 0, "max_new_tokens must be > 0, got ", max_new_tokens);
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  TORCH_CHECK_VALUE(T + max_new_tokens <= cfg_.max_positions, "prompt of ", T, " tokens + max_new_tokens ",
                    max_new_tokens, " exceeds the model context of ", cfg_.max_positions, " positions");
  TORCH_CHECK_VALUE(input_ids.min().item<int64_t>() >= 0 && input_ids.max().item<int64_t>() < embed_.size(0),
                    "input_ids outside the embedding table [0, ", embed_.size(0), ")");
  const auto dev = embed_.device();
  const auto opts = embed_.options();
  const int64_t Hkv = cfg_.num_kv_heads, D = cfg_.head_dim();
  capacity_ = T + max_new_tokens;
  length_ = 0;

  auto valid = attention_mask.to(dev).to(at::kBool);  // (B, T)
  key_valid_ = at::ones({B, capacity_}, at::TensorOptions().dtype(at::kBool).device(dev));
  key_valid_.narrow(1, 0, T).copy_(valid);
  // positions count real tokens only (left padding); pads get position 1, as transformers' generate does
  auto positions = (valid.to(at::kLong).cumsum(1) - 1).masked_fill(~valid, 1);  // (B, T)
  next_pos_ = positions.narrow(1, T - 1, 1) + 1;                                  // (B, 1)
  const auto long_opts = at::TensorOptions().dtype(at::kLong).device(dev);
  slot_ = at::full({1}, T, long_opts);          // the cache slot the next token goes to
  attn_len_ = at::full({1}, T + 1, long_opts);  // slots the next token attends to
  tokens_ = at::zeros({B}, long_opts);
  logits_ = at::empty({B, cfg_.vocab_size}, opts);
#ifdef LLAMA_MM_WITH_CUDA
  graph_.reset();
#endif

  auto idx = at::arange(T, at::TensorOptions().dtype(at::kLong).device(dev));
  auto allowed = idx.unsqueeze(1) >= idx.unsqueeze(0);                  // (T, T) causal
  allowed = allowed.unsqueeze(0) & valid.unsqueeze(1);                  // (B, T, T)
  self_mask_ = at::zeros({B, 1, T, T}, opts).masked_fill(~allowed.unsqueeze(1), lowest(opts.dtype().toScalarType()));

  k_cache_.assign(layers_.size(), at::Tensor());
  v_cache_.assign(layers_.size(), at::Tensor());
  cross_k_.assign(layers_.size(), at::Tensor());
  cross_v_.assign(layers_.size(), at::Tensor());
  has_image_ = vision_states.has_value() && vision_states->defined();
  if (has_image_) {
    const auto& vs = *vision_states;
    TORCH_CHECK_VALUE(vs.dim() == 3 && vs.size(0) == B && vs.size(2) == cfg_.hidden_size,
                      "vision_states must be [B, S, hidden] = [", B, ", S, ", cfg_.hidden_size, "], got ", vs.sizes());
    TORCH_CHECK_VALUE(cross_mask.has_value() && row_mask.has_value(), "an image needs cross_mask and row_mask");
    const int64_t S = vs.size(1);
    TORCH_CHECK_VALUE(cross_mask->sizes() == at::IntArrayRef({B, 1, T, S}), "cross_mask must be [B, 1, T, S] = [",
                      B, ", 1, ", T, ", ", S, "], got ", cross_mask->sizes());
    TORCH_CHECK_VALUE(row_mask->sizes() == at::IntArrayRef({B, T, 1}), "row_mask must be [B, T, 1], got ",
                      row_mask->sizes());
    auto v_in = vs.to(dev, embed_.scalar_type());
    cross_mask_ = cross_mask->to(dev, embed_.scalar_type());
    row_mask_ = row_mask->to(dev, embed_.scalar_type());
    // decode rows repeat the prompt's last row, as transformers' generate extends the mask
    step_cross_mask_ = cross_mask_.select(1, 0).select(1, T - 1).to(at::kFloat).contiguous();  // (B, S)
    step_row_mask_ = row_mask_.select(1, T - 1).unsqueeze(1).contiguous();                      // (B, 1, 1)
    for (size_t i = 0; i < layers_.size(); ++i) {
      if (!layers_[i].cross) continue;
      const auto& l = layers_[i];
      auto k = rms_norm(project(v_in, l.wk).view({B, S, Hkv, D}), l.k_norm, cfg_.rms_norm_eps);
      cross_k_[i] = k.transpose(1, 2).contiguous();                                                // (B, Hkv, S, D)
      cross_v_[i] = project(v_in, l.wv).view({B, S, Hkv, D}).transpose(1, 2).contiguous();  // (B, Hkv, S, D)
    }
  }
  for (size_t i = 0; i < layers_.size(); ++i) {
    if (layers_[i].cross) continue;
    k_cache_[i] = at::empty({B, Hkv, capacity_, D}, opts);
    v_cache_[i] = at::empty({B, Hkv, capacity_, D}, opts);
  }
  auto x = prefill(at::embedding(embed_, input_ids.to(dev)), positions);  // (B, T, C)
  length_ = T;
  auto last = rms_norm(x.select(1, T - 1), final_norm_, cfg_.rms_norm_eps);  // (B, C)
  return matmul_t(last, lm_head_);
}

at::Tensor Engine::step(const at::Tensor& tokens) {
  TORCH_CHECK_VALUE(length_ > 0, "step() before start()");
  TORCH_CHECK_VALUE(length_ < capacity_, "the KV cache is full (", capacity_, " slots)");
  const int64_t B = tokens_.size(0);
  TORCH_CHECK_VALUE(tokens.numel() == B, "step() needs one token per row (", B, "), got ", tokens.numel());
  tokens_.copy_(tokens.reshape({B}));
#ifdef LLAMA_MM_WITH_CUDA
  if (tokens_.is_cuda()) {
    // The first step runs eagerly (warm-up); the second captures the body once; every step replays it.
    if (graph_) {
      graph_->replay();
    } else if (warmed_up_) {
      // Capture on a side stream (capture is not allowed on the default stream), once per request.
      c10::cuda::getCurrentCUDAStream().synchronize();
      auto stream = c10::cuda::getStreamFromPool();
      {
        c10::cuda::CUDAStreamGuard guard(stream);
        graph_ = std::make_unique<at::cuda::CUDAGraph>();
        graph_->capture_begin();
        decode_body();
        graph_->capture_end();
      }
      stream.synchronize();
      graph_->replay();
    } else {
      decode_body();
      warmed_up_ = true;
    }
    ++length_;
    return logits_;
  }
#endif
  decode_body();
  ++length_;
  return logits_;
}

at::Tensor Engine::generate(const at::Tensor& input_ids, const at::Tensor& attention_mask,
                            const std::optional<at::Tensor>& vision_states,
                            const std::optional<at::Tensor>& cross_mask, const std::optional<at::Tensor>& row_mask,
                            int64_t max_new_tokens, const SamplingParams& sp, const std::vector<int64_t>& stop_ids,
                            int64_t pad_id, const StepCallback& on_step) {
  sp.validate();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(sp.seed));
  auto logits = start(input_ids, attention_mask, vision_states, cross_mask, row_mask, max_new_tokens);
  const int64_t B = input_ids.size(0);
  at::Tensor seen;  // tokens in the prompt and generated so far, for the repetition penalty
  if (sp.repetition_penalty != 1.0) {
    const int64_t V = logits.size(1);
    // ids >= V (<|image|> and the other rows lm_head cannot produce) land in a dummy last column
    seen = at::zeros({B, V + 1}, at::TensorOptions().dtype(at::kBool));
    seen.scatter_(1, input_ids.cpu().clamp(0, V), true);
    seen = seen.narrow(1, 0, V).contiguous();
  }
  auto stops = at::tensor(stop_ids, at::kLong);
  auto unfinished = at::ones({B}, at::kBool);
  std::vector<at::Tensor> out;
  for (int64_t n = 0; n < max_new_tokens; ++n) {
    auto next = sample_next(logits.cpu(), seen, sp, gen);  // (B,)
    next = at::where(unfinished, next, at::full_like(next, pad_id));
    out.push_back(next);
    if (seen.defined()) seen.scatter_(1, next.unsqueeze(1), true);
    if (stops.numel()) unfinished &= at::isin(next, stops).logical_not();
    const bool stop = on_step && on_step(next);
    if (stop || !unfinished.any().item<bool>() || n + 1 == max_new_tokens) break;
    logits = step(next.to(embed_.device()));
  }
  return at::stack(out, 1);  // (B, N)
}

}  // namespace llama_mm
