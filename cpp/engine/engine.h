// The decode engine: prefill of the prompt, then a token loop entirely in C++ (the caller releases the GIL).
//
// It reads the text stack's weights from the tensors the Python model owns (no copy), keeps per request a
// preallocated self-attention KV cache [B, Hkv, S_max, D] per self layer and the image K/V per cross layer
// (computed once per image by TextWeights::image_kv, passed in), and samples with sampling.h. Ops go through the dispatcher
// (torch.ops.llama_mm.*, at::linear), so the same engine runs the CPU or the CUDA kernels of its weights' device.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <optional>
#include <vector>

#include "sampling.h"
#include "text_weights.h"

#ifdef LLAMA_MM_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <memory>

namespace llama_mm {

// Receives the tokens just chosen [B] (int64, CPU); returns true to stop the request.
using StepCallback = std::function<bool(const at::Tensor&)>;

class Engine {
 public:
  // weights: canonical checkpoint names (`language_model.model.layers.N...`, `language_model.lm_head.weight`); an
  // unmerged LoRA adapter adds `<module>.lora_A.weight` and `<module>.lora_B.weight` (B scaled) for its modules;
  // inv_freq [head_dim / 2] float32 (rope frequencies, llama3-scaled as the config says).
  Engine(const WeightMap& weights, EngineConfig cfg, at::Tensor inv_freq);
  // An engine over weights another engine or the scheduler already holds.
  explicit Engine(std::shared_ptr<const TextWeights> weights);
  const std::shared_ptr<const TextWeights>& weights() const { return w_; }

  // A whole request. input_ids / attention_mask [B, T] (left padding); image_kv [L, 2, B, Hkv, S, D] the images'
  // cross-layer K/V (TextWeights::image_kv; none: text only, cross layers skipped; read in place); cross_mask [B, 1, T, S] additive and row_mask [B, T, 1] as
  // model.cross_attention_masks builds them. Returns the new ids [B, N], N <= max_new_tokens; rows that stopped
  // are filled with pad_id.
  at::Tensor generate(const at::Tensor& input_ids, const at::Tensor& attention_mask,
                      const std::optional<at::Tensor>& image_kv, const std::optional<at::Tensor>& cross_mask,
                      const std::optional<at::Tensor>& row_mask, int64_t max_new_tokens, const SamplingParams& sp,
                      const std::vector<int64_t>& stop_ids, int64_t pad_id, const StepCallback& on_step);

  // The pieces, for tests and benchmarks. start() sets up the caches and runs the prompt, returning the last
  // position's logits [B, V]; step() feeds one token per row [B] and returns the next logits [B, V] (on CUDA the
  // graph's output buffer, overwritten by the next step: copy it to keep it).
  at::Tensor start(const at::Tensor& input_ids, const at::Tensor& attention_mask,
                   const std::optional<at::Tensor>& image_kv, const std::optional<at::Tensor>& cross_mask,
                   const std::optional<at::Tensor>& row_mask, int64_t max_new_tokens);
  at::Tensor step(const at::Tensor& tokens);


 private:
  at::Tensor prefill(const at::Tensor& x, const at::Tensor& positions);
  void decode_body();

  std::shared_ptr<const TextWeights> w_;
  const EngineConfig& cfg_;

  // Request state.
  std::vector<at::Tensor> k_cache_, v_cache_;      // per layer (undefined for cross layers)
  std::vector<at::Tensor> cross_k_, cross_v_;      // per layer (undefined for self layers / text only)
  at::Tensor key_valid_;                           // [B, S_max] bool
  at::Tensor self_mask_, cross_mask_, row_mask_;   // prefill: [B,1,T,T], [B,1,T,S], [B,T,1]
  at::Tensor step_cross_mask_, step_row_mask_;     // decode: [B, S], [B, 1, 1]
  // Decode-step state in tensors on the weights' device, advanced in place by decode_body().
  at::Tensor next_pos_;                            // [B, 1] int64: positions of the next tokens
  at::Tensor slot_, attn_len_;                     // [1] int64: cache slot to write, slots to attend to
  at::Tensor tokens_, logits_;                     // [B] int64 in, [B, V] out
  int64_t length_ = 0, capacity_ = 0;              // host copy of the filled cache length, and its size
  bool has_image_ = false;
#ifdef LLAMA_MM_WITH_CUDA
  std::unique_ptr<at::cuda::CUDAGraph> graph_;     // the captured decode step (CUDA)
  std::optional<c10::cuda::CUDAStream> capture_stream_;
  bool warmed_up_ = false;
#endif
};

}  // namespace llama_mm
