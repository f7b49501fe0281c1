// The paged self-attention KV cache of the batching scheduler: per self-attention layer a K and a V pool
// [num_blocks, Hkv, block_size, D] (model dtype, the weights' device), and the block accounting.
//
// The pool is sized from a memory budget. Requests take physical blocks as their tokens arrive; their image K/V
// are charged in blocks (those tensors live outside the pools but count against the same budget); everything goes
// back the moment a request ends. Which request may take a block when is the scheduler's decision (scheduler.h).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "text_weights.h"

namespace llama_mm {

class KvCache {
 public:
  // Blocks of `block_size` tokens that fit in `budget_bytes` (all self layers, K and V).
  KvCache(const TextWeights& w, double budget_bytes, int64_t block_size);

  // Bytes of one block across every self layer, K and V.
  static int64_t block_bytes(const TextWeights& w, int64_t block_size);
  // Blocks charged for a request: its tokens' blocks plus its image K/V (image_tokens keys per cross layer).
  int64_t blocks_for(int64_t tokens, int64_t image_tokens) const;

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  // Blocks in use: the physical blocks handed out plus the image K/V charged.
  int64_t used_blocks() const { return allocated_ + image_charged_; }

  // Blocks neither handed out nor charged.
  int64_t available() const { return num_blocks_ - allocated_ - image_charged_; }
  // Image K/V charged against the budget, and returned.
  void charge_image(int64_t blocks);
  void uncharge_image(int64_t blocks);
  // A physical block (one must be available) and its return.
  int32_t allocate();
  void release(std::vector<int32_t>& blocks);

  at::Tensor& k(size_t layer) { return k_[layer]; }  // [num_blocks, Hkv, block_size, D]; undefined: cross layer
  at::Tensor& v(size_t layer) { return v_[layer]; }

 private:
  int64_t num_blocks_, block_size_, image_bytes_per_token_;
  int64_t block_bytes_;
  int64_t allocated_ = 0, image_charged_ = 0;
  std::vector<int32_t> free_;
  std::vector<at::Tensor> k_, v_;
};

}  // namespace llama_mm
