#include "text_weights.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <string>

#include "ops_dispatch.h"

namespace llama_mm {

TextWeights::TextWeights(const WeightMap& w, EngineConfig config, at::Tensor inv_freq_in)
    : cfg(std::move(config)), inv_freq(std::move(inv_freq_in)) {
  TORCH_CHECK_VALUE(cfg.num_heads > 0 && cfg.num_kv_heads > 0 && cfg.num_heads % cfg.num_kv_heads == 0 &&
                        cfg.hidden_size % cfg.num_heads == 0,
                    "Engine: inconsistent head counts");
  const std::string p = "language_model.model.";
  embed = get_weight(w, p + "embed_tokens.weight");
  final_norm = get_weight(w, p + "norm.weight");
  TORCH_CHECK_VALUE(!cfg.int8_activations || embed.device().is_cpu(),
                    "Engine: int8 activations (llama_mm::qlinear_a8) run on the CPU only, the weights are on ",
                    embed.device());
  lm_head = Linear::load(w, "language_model.lm_head", cfg.int8_activations);
  TORCH_CHECK_VALUE(embed.dim() == 2 && embed.size(1) == cfg.hidden_size && lm_head.out_features() == cfg.vocab_size &&
                        lm_head.in_features() == cfg.hidden_size,
                    "Engine: embedding ", embed.sizes(), " or lm_head [", lm_head.out_features(), ", ",
                    lm_head.in_features(), "] disagree with the config");
  lm_head.check(embed.device(), embed.scalar_type(), "lm_head");
  TORCH_CHECK_VALUE(inv_freq.scalar_type() == at::kFloat && inv_freq.numel() == cfg.head_dim() / 2,
                    "Engine: inv_freq must be float32 [head_dim / 2]");
  inv_freq = inv_freq.to(embed.device());
  for (int64_t i = 0; i < cfg.num_layers; ++i) {
    const std::string l = p + "layers." + std::to_string(i) + ".";
    Layer layer;
    layer.cross = std::find(cfg.cross_attention_layers.begin(), cfg.cross_attention_layers.end(), i) !=
                  cfg.cross_attention_layers.end();
    const std::string a = layer.cross ? l + "cross_attn." : l + "self_attn.";
    layer.input_norm = get_weight(w, l + "input_layernorm.weight");
    layer.post_norm = get_weight(w, l + "post_attention_layernorm.weight");
    layer.wq = Linear::load(w, a + "q_proj", cfg.int8_activations);
    layer.wk = Linear::load(w, a + "k_proj", cfg.int8_activations);
    layer.wv = Linear::load(w, a + "v_proj", cfg.int8_activations);
    layer.wo = Linear::load(w, a + "o_proj", cfg.int8_activations);
    layer.w_gate = Linear::load(w, l + "mlp.gate_proj", cfg.int8_activations);
    layer.w_up = Linear::load(w, l + "mlp.up_proj", cfg.int8_activations);
    layer.w_down = Linear::load(w, l + "mlp.down_proj", cfg.int8_activations);
    for (const auto* t : {&layer.input_norm, &layer.post_norm})
      TORCH_CHECK_VALUE(t->device() == embed.device() && t->scalar_type() == embed.scalar_type(),
                        "Engine: layer ", i, " norms must share the embedding's device and dtype");
    for (const auto* lin : {&layer.wq, &layer.wk, &layer.wv, &layer.wo, &layer.w_gate, &layer.w_up, &layer.w_down})
      lin->check(embed.device(), embed.scalar_type(), "layer " + std::to_string(i));
    if (layer.cross) {
      layer.q_norm = get_weight(w, a + "q_norm.weight");
      layer.k_norm = get_weight(w, a + "k_norm.weight");
      layer.attn_gate = get_weight(w, l + "cross_attn_attn_gate").tanh();
      layer.mlp_gate = get_weight(w, l + "cross_attn_mlp_gate").tanh();
    }
    layers.push_back(std::move(layer));
  }
}

at::Tensor TextWeights::mlp(const Layer& l, const at::Tensor& x) const {
  return l.w_down(dispatch::silu_mul(l.w_gate(x), l.w_up(x)));
}

at::Tensor TextWeights::image_kv(const at::Tensor& vision_states) const {
  TORCH_CHECK_VALUE(vision_states.dim() == 3 && vision_states.size(2) == cfg.hidden_size,
                    "vision_states must be [B, S, hidden] = [B, S, ", cfg.hidden_size, "], got ",
                    vision_states.sizes());
  const auto vs = vision_states.to(device(), dtype());
  const int64_t B = vs.size(0), S = vs.size(1), Hkv = cfg.num_kv_heads, D = cfg.head_dim();
  const auto L = static_cast<int64_t>(cfg.cross_attention_layers.size());
  auto out = at::empty({L, 2, B, Hkv, S, D}, options());
  int64_t j = 0;
  for (const Layer& l : layers) {
    if (!l.cross) continue;
    auto k = dispatch::rms_norm(l.wk(vs).view({B, S, Hkv, D}), l.k_norm, cfg.rms_norm_eps);  // (B, S, Hkv, D)
    out[j][0].copy_(k.transpose(1, 2));                                                      // (B, Hkv, S, D)
    out[j][1].copy_(l.wv(vs).view({B, S, Hkv, D}).transpose(1, 2));
    ++j;
  }
  return out;
}

int64_t TextWeights::check_image_kv(const at::Tensor& kv, int64_t B) const {
  const auto L = static_cast<int64_t>(cfg.cross_attention_layers.size());
  TORCH_CHECK_VALUE(kv.dim() == 6 && kv.size(0) == L && kv.size(1) == 2 && kv.size(2) == B &&
                        kv.size(3) == cfg.num_kv_heads && kv.size(5) == cfg.head_dim(),
                    "image_kv must be [cross layers, 2, B, kv heads, S, head dim] = [", L, ", 2, ", B, ", ",
                    cfg.num_kv_heads, ", S, ", cfg.head_dim(), "], got ", kv.sizes());
  TORCH_CHECK_VALUE(kv.scalar_type() == dtype() && kv.device() == device(), "image_kv must be ", dtype(), " on ",
                    device(), " (the model's), got ", kv.scalar_type(), " on ", kv.device());
  TORCH_CHECK_VALUE(kv.is_contiguous(), "image_kv must be contiguous");
  return kv.size(4);
}

void TextWeights::split_image_kv(const at::Tensor& kv, std::vector<at::Tensor>& k, std::vector<at::Tensor>& v) const {
  k.assign(layers.size(), at::Tensor());
  v.assign(layers.size(), at::Tensor());
  int64_t j = 0;
  for (size_t i = 0; i < layers.size(); ++i) {
    if (!layers[i].cross) continue;
    k[i] = kv[j][0];  // (B, Hkv, S, D), contiguous views: a cached image's K/V are read in place
    v[i] = kv[j][1];
    ++j;
  }
}

void cut_masked_cross_keys(at::Tensor& step_mask, std::vector<at::Tensor>& k, std::vector<at::Tensor>& v,
                           at::ScalarType model_dtype, bool copy) {
  TORCH_CHECK(step_mask.dim() == 2 && step_mask.scalar_type() == at::kFloat,
              "cut_masked_cross_keys: step_mask must be [B, S] float32, got ", step_mask.sizes(), " ",
              step_mask.scalar_type());
  const int64_t S = step_mask.size(1);
  const auto attended = step_mask.ne(dispatch::lowest(model_dtype)).any(0).nonzero();  // (n, 1) key indices
  if (attended.numel() == 0) return;
  const int64_t last = attended.max().item<int64_t>();
  const int64_t keep = std::min(S, (last + kDecodeKeyAlign) / kDecodeKeyAlign * kDecodeKeyAlign);
  if (keep == S) return;
  step_mask = step_mask.narrow(1, 0, keep).contiguous();
  for (size_t i = 0; i < k.size(); ++i) {
    if (!k[i].defined()) continue;
    TORCH_CHECK(k[i].size(2) == S && v[i].size(2) == S, "cut_masked_cross_keys: layer ", i, " K/V hold ",
                k[i].size(2), " keys, the mask ", S);
    k[i] = k[i].narrow(2, 0, keep);  // (B, Hkv, keep, D)
    v[i] = v[i].narrow(2, 0, keep);
    if (copy) {  // the cut keys' memory is freed with the views of the uncut K/V
      k[i] = k[i].contiguous();
      v[i] = v[i].contiguous();
    }
  }
}

at::Tensor TextWeights::logits(const at::Tensor& x) const {
  return lm_head(dispatch::rms_norm(x, final_norm, cfg.rms_norm_eps));
}

}  // namespace llama_mm
