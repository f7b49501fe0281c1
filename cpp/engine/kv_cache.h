// The paged self-attention KV cache of the batching scheduler: per self-attention layer a K and a V pool
// [num_blocks, Hkv, block_size, D] (model dtype, the weights' device), and the block accounting.
//
// The pool is sized from a memory budget. A request reserves, at admission, the blocks it can ever need (prompt +
// token budget) plus its image K/V charged in blocks (those tensors live outside the pools but count against the
// same budget), so a running request never finds the pool empty; it takes physical blocks only as its tokens
// arrive, and everything goes back the moment it ends.
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

  // Admission: reserve `blocks` (of which `image_blocks` charge image K/V) when the unreserved rest allows it.
  bool try_reserve(int64_t blocks, int64_t image_blocks);
  void unreserve(int64_t blocks, int64_t image_blocks);
  // A physical block (within a reservation) and its return.
  int32_t allocate();
  void release(std::vector<int32_t>& blocks);

  at::Tensor& k(size_t layer) { return k_[layer]; }  // [num_blocks, Hkv, block_size, D]; undefined: cross layer
  at::Tensor& v(size_t layer) { return v_[layer]; }

 private:
  int64_t num_blocks_, block_size_, image_bytes_per_token_;
  int64_t block_bytes_;
  int64_t reserved_ = 0, allocated_ = 0, image_charged_ = 0;
  std::vector<int32_t> free_;
  std::vector<at::Tensor> k_, v_;
};

}  // namespace llama_mm
