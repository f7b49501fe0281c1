#include "kv_cache.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

namespace llama_mm {
namespace {

int64_t self_layers(const TextWeights& w) {
  int64_t n = 0;
  for (const auto& l : w.layers) n += !l.cross;
  return n;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

int64_t KvCache::block_bytes(const TextWeights& w, int64_t block_size) {
  return self_layers(w) * 2 * w.cfg.num_kv_heads * block_size * w.cfg.head_dim() * c10::elementSize(w.dtype());
}

KvCache::KvCache(const TextWeights& w, double budget_bytes, int64_t block_size) : block_size_(block_size) {
  TORCH_CHECK_VALUE(block_size > 0, "block_size must be > 0, got ", block_size);
  block_bytes_ = std::max<int64_t>(1, block_bytes(w, block_size));
  num_blocks_ = static_cast<int64_t>(budget_bytes / static_cast<double>(block_bytes_));
  TORCH_CHECK_VALUE(num_blocks_ >= 1, "a KV budget of ", budget_bytes / (1 << 20), " MiB holds no block of ",
                    block_size, " tokens (", block_bytes_, " bytes each)");
  TORCH_CHECK_VALUE(num_blocks_ <= INT32_MAX, "too many KV blocks: ", num_blocks_);
  const int64_t cross = static_cast<int64_t>(w.layers.size()) - self_layers(w);
  image_bytes_per_token_ = cross * 2 * w.cfg.num_kv_heads * w.cfg.head_dim() * c10::elementSize(w.dtype());
  const auto opts = w.options();
  k_.resize(w.layers.size());
  v_.resize(w.layers.size());
  for (size_t i = 0; i < w.layers.size(); ++i) {
    if (w.layers[i].cross) continue;
    k_[i] = at::empty({num_blocks_, w.cfg.num_kv_heads, block_size, w.cfg.head_dim()}, opts);
    v_[i] = at::empty_like(k_[i]);
  }
  free_.reserve(num_blocks_);
  for (int64_t b = num_blocks_ - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

int64_t KvCache::blocks_for(int64_t tokens, int64_t image_tokens) const {
  return ceil_div(tokens, block_size_) + ceil_div(image_tokens * image_bytes_per_token_, block_bytes_);
}

void KvCache::charge_image(int64_t blocks) {
  TORCH_INTERNAL_ASSERT(blocks >= 0 && blocks <= available(), "image charge of ", blocks, " blocks, ", available(),
                        " available");
  image_charged_ += blocks;
}

void KvCache::uncharge_image(int64_t blocks) {
  image_charged_ -= blocks;
  TORCH_INTERNAL_ASSERT(blocks >= 0 && image_charged_ >= 0);
}

int32_t KvCache::allocate() {
  TORCH_INTERNAL_ASSERT(!free_.empty() && available() > 0, "KV pool exhausted: the scheduler took a block that "
                        "was not available");
  const int32_t b = free_.back();
  free_.pop_back();
  ++allocated_;
  return b;
}

void KvCache::release(std::vector<int32_t>& blocks) {
  for (int32_t b : blocks) free_.push_back(b);
  allocated_ -= static_cast<int64_t>(blocks.size());
  blocks.clear();
}

}  // namespace llama_mm
