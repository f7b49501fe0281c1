#include "engine.h"

#include "ops_dispatch.h"

#ifdef LLAMA_MM_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif
#include <c10/util/Exception.h>


namespace llama_mm {

using namespace dispatch;

Engine::Engine(const WeightMap& w, EngineConfig cfg, at::Tensor inv_freq)
    : Engine(std::make_shared<const TextWeights>(w, std::move(cfg), std::move(inv_freq))) {}

Engine::Engine(std::shared_ptr<const TextWeights> weights) : w_(std::move(weights)), cfg_(w_->cfg) {}

// The prompt: x [B, T, C] -> [B, T, C], filling cache slots [0, T).
at::Tensor Engine::prefill(const at::Tensor& x_in, const at::Tensor& positions) {
  const int64_t B = x_in.size(0), T = x_in.size(1), H = cfg_.num_heads, Hkv = cfg_.num_kv_heads, D = cfg_.head_dim();
  const double eps = cfg_.rms_norm_eps;
  at::Tensor x = x_in;
  for (size_t i = 0; i < w_->layers.size(); ++i) {
    const Layer& l = w_->layers[i];
    if (l.cross) {
      if (!has_image_) continue;  // text only: cross layers are skipped, as in the reference
      auto q = rms_norm(l.wq(rms_norm(x, l.input_norm, eps)).view({B, T, H, D}), l.q_norm, eps);
      auto attn = at::scaled_dot_product_attention(q.transpose(1, 2), cross_k_[i], cross_v_[i], cross_mask_, 0.0,
                                                   false, std::nullopt, Hkv != H);  // (B, H, T, D)
      x = x + l.attn_gate * l.wo(attn.transpose(1, 2).reshape({B, T, H * D}));
      x = x + l.mlp_gate * (row_mask_ * w_->mlp(l, rms_norm(x, l.post_norm, eps)));
    } else {
      auto h = rms_norm(x, l.input_norm, eps);
      auto q = rope(l.wq(h).view({B, T, H, D}), positions, w_->inv_freq);    // (B, T, H, D)
      auto k = rope(l.wk(h).view({B, T, Hkv, D}), positions, w_->inv_freq);  // (B, T, Hkv, D)
      auto v = l.wv(h).view({B, T, Hkv, D});
      k_cache_[i].narrow(2, 0, T).copy_(k.transpose(1, 2));
      v_cache_[i].narrow(2, 0, T).copy_(v.transpose(1, 2));
      auto attn = at::scaled_dot_product_attention(q.transpose(1, 2), k_cache_[i].narrow(2, 0, T),
                                                   v_cache_[i].narrow(2, 0, T), self_mask_, 0.0, false, std::nullopt,
                                                   Hkv != H);  // (B, H, T, D)
      x = x + l.wo(attn.transpose(1, 2).reshape({B, T, H * D}));
      x = x + w_->mlp(l, rms_norm(x, l.post_norm, eps));
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
  auto x = at::embedding(w_->embed, tokens_.view({B, 1}));  // (B, 1, C)
  for (size_t i = 0; i < w_->layers.size(); ++i) {
    const Layer& l = w_->layers[i];
    if (l.cross) {
      if (!has_image_) continue;
      auto q = rms_norm(l.wq(rms_norm(x, l.input_norm, eps)).view({B, H, D}), l.q_norm, eps);
      auto attn = cross_attention(q, cross_k_[i], cross_v_[i], step_cross_mask_);  // (B, H, D)
      x = x + l.attn_gate * l.wo(attn.view({B, 1, H * D}));
      x = x + l.mlp_gate * (step_row_mask_ * w_->mlp(l, rms_norm(x, l.post_norm, eps)));
    } else {
      auto h = rms_norm(x, l.input_norm, eps);
      auto q = rope(l.wq(h).view({B, 1, H, D}), next_pos_, w_->inv_freq);    // (B, 1, H, D)
      auto k = rope(l.wk(h).view({B, 1, Hkv, D}), next_pos_, w_->inv_freq);  // (B, 1, Hkv, D)
      auto v = l.wv(h).view({B, 1, Hkv, D});
      k_cache_[i].index_copy_(2, slot_, k.transpose(1, 2));
      v_cache_[i].index_copy_(2, slot_, v.transpose(1, 2));
      auto attn = decode_attention(q.view({B, H, D}), k_cache_[i], v_cache_[i], key_valid_, attn_len_);  // (B, H, D)
      x = x + l.wo(attn.view({B, 1, H * D}));
      x = x + w_->mlp(l, rms_norm(x, l.post_norm, eps));
    }
  }
  auto logits = w_->logits(x.select(1, 0));  // (B, V)
  if (logits_.is_cuda()) {
    logits_.copy_(logits);  // a captured graph writes into its static buffer
  } else {
    logits_ = logits;
  }
  slot_.add_(1);
  attn_len_.add_(1);
  next_pos_.add_(1);
}

at::Tensor Engine::start(const at::Tensor& input_ids, const at::Tensor& attention_mask,
                         const std::optional<at::Tensor>& image_kv, const std::optional<at::Tensor>& cross_mask,
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
  TORCH_CHECK_VALUE(input_ids.min().item<int64_t>() >= 0 && input_ids.max().item<int64_t>() < w_->embed.size(0),
                    "input_ids outside the embedding table [0, ", w_->embed.size(0), ")");
  const auto dev = w_->embed.device();
  const auto opts = w_->embed.options();
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
  graph_.reset();  // the buffers are new: capture again for this request
  warmed_up_ = false;
#endif

  auto idx = at::arange(T, at::TensorOptions().dtype(at::kLong).device(dev));
  auto allowed = idx.unsqueeze(1) >= idx.unsqueeze(0);                  // (T, T) causal
  allowed = allowed.unsqueeze(0) & valid.unsqueeze(1);                  // (B, T, T)
  self_mask_ = at::zeros({B, 1, T, T}, opts).masked_fill(~allowed.unsqueeze(1), lowest(opts.dtype().toScalarType()));

  k_cache_.assign(w_->layers.size(), at::Tensor());
  v_cache_.assign(w_->layers.size(), at::Tensor());
  cross_k_.assign(w_->layers.size(), at::Tensor());
  cross_v_.assign(w_->layers.size(), at::Tensor());
  has_image_ = image_kv.has_value() && image_kv->defined();
  if (has_image_) {
    const int64_t S = w_->check_image_kv(*image_kv, B);
    TORCH_CHECK_VALUE(cross_mask.has_value() && row_mask.has_value(), "an image needs cross_mask and row_mask");
    TORCH_CHECK_VALUE(cross_mask->sizes() == at::IntArrayRef({B, 1, T, S}), "cross_mask must be [B, 1, T, S] = [",
                      B, ", 1, ", T, ", ", S, "], got ", cross_mask->sizes());
    TORCH_CHECK_VALUE(row_mask->sizes() == at::IntArrayRef({B, T, 1}), "row_mask must be [B, T, 1], got ",
                      row_mask->sizes());
    cross_mask_ = cross_mask->to(dev, w_->embed.scalar_type());
    row_mask_ = row_mask->to(dev, w_->embed.scalar_type());
    // decode rows repeat the prompt's last row, as transformers' generate extends the mask
    step_cross_mask_ = cross_mask_.select(1, 0).select(1, T - 1).to(at::kFloat).contiguous();  // (B, S)
    step_row_mask_ = row_mask_.select(1, T - 1).unsqueeze(1).contiguous();                      // (B, 1, 1)
    w_->split_image_kv(*image_kv, cross_k_, cross_v_);  // (B, Hkv, S, D) per cross layer
  }
  for (size_t i = 0; i < w_->layers.size(); ++i) {
    if (w_->layers[i].cross) continue;
    k_cache_[i] = at::empty({B, Hkv, capacity_, D}, opts);
    v_cache_[i] = at::empty({B, Hkv, capacity_, D}, opts);
  }
  auto x = prefill(at::embedding(w_->embed, input_ids.to(dev)), positions);  // (B, T, C)
  length_ = T;
  if (has_image_) cut_masked_cross_keys(step_cross_mask_, cross_k_, cross_v_, w_->dtype());
  cross_mask_ = at::Tensor();  // the prompt's rows only
  return w_->logits(x.select(1, T - 1));  // (B, V)
}

at::Tensor Engine::step(const at::Tensor& tokens) {
  TORCH_CHECK_VALUE(length_ > 0, "step() before start()");
  TORCH_CHECK_VALUE(length_ < capacity_, "the KV cache is full (", capacity_, " slots)");
  const int64_t B = tokens_.size(0);
  TORCH_CHECK_VALUE(tokens.numel() == B, "step() needs one token per row (", B, "), got ", tokens.numel());
  tokens_.copy_(tokens.reshape({B}));
#ifdef LLAMA_MM_WITH_CUDA
  if (tokens_.is_cuda()) {
    // The first step runs eagerly on a side stream (warm-up: cuBLAS workspaces, allocator); the second captures
    // the body on that same stream; every later step of the request replays it.
    if (graph_) {
      graph_->replay();
    } else {
      c10::cuda::getCurrentCUDAStream().synchronize();
      if (!capture_stream_) capture_stream_ = c10::cuda::getStreamFromPool();
      {
        c10::cuda::CUDAStreamGuard guard(*capture_stream_);
        if (warmed_up_) {
          graph_ = std::make_unique<at::cuda::CUDAGraph>();
          // thread-local mode: other threads may use CUDA while this one (without the GIL) captures
          graph_->capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
          decode_body();
          graph_->capture_end();
        } else {
          decode_body();
          warmed_up_ = true;
        }
      }
      capture_stream_->synchronize();
      if (graph_) graph_->replay();
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
                            const std::optional<at::Tensor>& image_kv,
                            const std::optional<at::Tensor>& cross_mask, const std::optional<at::Tensor>& row_mask,
                            int64_t max_new_tokens, const SamplingParams& sp, const std::vector<int64_t>& stop_ids,
                            int64_t pad_id, const StepCallback& on_step) {
  sp.validate();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(sp.seed));
  auto logits = start(input_ids, attention_mask, image_kv, cross_mask, row_mask, max_new_tokens);
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
    logits = step(next.to(w_->embed.device()));
  }
  return at::stack(out, 1);  // (B, N)
}

}  // namespace llama_mm
