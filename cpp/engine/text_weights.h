// The text stack's weights as the engine and the scheduler read them: the config numbers, and per decoder layer its
// norms, projections (linear.h) and, for cross-attention layers, q/k norms and tanh gates. Built once from the
// tensors the Python model owns (canonical checkpoint names, no copy) and shared read-only.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "linear.h"

namespace llama_mm {

struct EngineConfig {
  int64_t hidden_size = 0, num_layers = 0, num_heads = 0, num_kv_heads = 0, vocab_size = 0;
  double rms_norm_eps = 1e-5;
  int64_t max_positions = 0;
  std::vector<int64_t> cross_attention_layers;
  bool int8_activations = false;  // quantized projections take x as int8 per 32 values (load_model's activations)
  int64_t head_dim() const { return hidden_size / num_heads; }
};

struct Layer {
  bool cross = false;
  at::Tensor input_norm, post_norm;
  Linear wq, wk, wv, wo, w_gate, w_up, w_down;
  at::Tensor q_norm, k_norm, attn_gate, mlp_gate;  // cross layers only (gates hold tanh(gate))
};

struct TextWeights {
  // weights: `language_model.model.layers.N...`, `language_model.model.embed_tokens.weight`,
  // `language_model.model.norm.weight`, `language_model.lm_head.weight` (+ LoRA tensors, see linear.h);
  // inv_freq [head_dim / 2] float32 (rope frequencies, llama3-scaled as the config says).
  TextWeights(const WeightMap& weights, EngineConfig cfg, at::Tensor inv_freq);

  EngineConfig cfg;
  std::vector<Layer> layers;
  at::Tensor embed, final_norm, inv_freq;
  Linear lm_head;  // dense, or quantized (load_model's quantize_lm_head)

  c10::Device device() const { return embed.device(); }
  at::ScalarType dtype() const { return embed.scalar_type(); }
  at::TensorOptions options() const { return embed.options(); }

  // SwiGLU MLP of a layer: x [..., C] -> [..., C].
  at::Tensor mlp(const Layer& l, const at::Tensor& x) const;
  // An image's K/V for every cross layer: vision_states [B, S, C] -> [L, 2, B, Hkv, S, D] (L cross layers in
  // order; [j][0] the keys, RMS-normalised per head, [j][1] the values), in the model dtype on the weights' device.
  // What the cross layers read of an image: computed once per image and cached by the caller (image_cache.py).
  at::Tensor image_kv(const at::Tensor& vision_states) const;
  // Checks image_kv [L, 2, B, Hkv, S, D] for a request of B rows (names the wrong dimension); returns S.
  int64_t check_image_kv(const at::Tensor& image_kv, int64_t B) const;
  // The cross-layer K/V of image_kv as the decode kernels read them: per layer [B, Hkv, S, D] views (undefined
  // for self-attention layers).
  void split_image_kv(const at::Tensor& image_kv, std::vector<at::Tensor>& k, std::vector<at::Tensor>& v) const;
  // Final norm and lm_head: x [B, C] -> logits [B, V].
  at::Tensor logits(const at::Tensor& x) const;
};

// Decode rows of image requests attend the image keys their cross-attention mask lets through. Trailing keys that
// every row masks out (the padding tiles of an image with fewer tiles than max_num_tiles: 3 of 4 for a 1-tile image)
// add exact zeros to the softmax sums, so they are cut from the per-layer K/V and from the mask. With `copy` the kept
// keys are copied, freeing the rest with the uncut tensors; without (the K/V are also held elsewhere, e.g. by the
// image cache, so a copy would free nothing) they are read in place through strided views. The cut falls on a
// multiple of kDecodeKeyAlign keys, so the attention kernels' key blocks stay where they were and every result stays
// bit for bit. step_mask [B, S] float32 holds 0 or the lowest value of the model dtype (masked); k, v per layer
// [B, Hkv, S, D] (undefined for self-attention layers). Nothing is cut when no key is attended (the rows then attend
// uniformly over all keys).
constexpr int64_t kDecodeKeyAlign = 64;
void cut_masked_cross_keys(at::Tensor& step_mask, std::vector<at::Tensor>& k, std::vector<at::Tensor>& v,
                           at::ScalarType model_dtype, bool copy = true);

}  // namespace llama_mm
