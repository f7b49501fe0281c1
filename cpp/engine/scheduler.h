// Continuous batching: requests join and leave between steps; one step runs the prefill work of admitted requests
// (chunked, each request on its own) and then one decode step for every running request together (every weight
// read once for all rows, paged self-attention, per-request cross-attention and sampling). The logits of the
// requests whose prompt ended in this step's prefill come from the same lm_head product as the decode rows'.
//
// Batch invariance: a request's tokens do not depend on the other requests. Its prefill runs alone (B = 1) in
// chunks whose boundaries depend on its own prompt and prefill_chunk only; every op of the decode step, and the
// final norm and lm_head its prompt's last row shares with the decode rows, computes a row from that row's inputs
// in a fixed order (gemv, qlinear, paged_attention, cross_attention, rms_norm, rope, silu_mul).
//
// Memory: a request is admitted, and takes KV blocks as its tokens arrive, only while the state stays safe (banker's
// rule, Scheduler::safe_with): a request that would leave an older one unable to finish waits a step instead, so
// nothing is reserved up front and nothing is ever evicted. Waiting a step changes none of a request's arithmetic.
//
// Not thread-safe: one thread (the Python engine thread) calls it.
#pragma once

#include <ATen/ATen.h>

#include <deque>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "kv_cache.h"
#include "sampling.h"
#include "text_weights.h"

namespace llama_mm {

struct SchedulerConfig {
  int64_t max_batch = 16;       // running requests at most (<= 64, gemv's batch-invariant limit)
  double kv_cache_mb = 512;     // self-attention KV pool + image K/V budget
  int64_t block_size = 16;      // tokens per KV block
  int64_t prefill_chunk = 256;  // prompt tokens per step at most
};

struct BatchRequest {
  int64_t id = 0;
  at::Tensor input_ids;                          // [T] int64
  at::Tensor image_kv;             // [L, 2, 1, Hkv, S, D] (TextWeights::image_kv, read in place); undefined: text only
  bool image_kv_shared = false;    // image_kv is also held elsewhere (the image cache): see cut_masked_cross_keys
  at::Tensor cross_mask, row_mask;  // [1, 1, T, S], [1, T, 1] with an image
  int64_t max_new_tokens = 0;
  SamplingParams sampling;
  std::vector<int64_t> stop_ids;
  int64_t logprobs = 0;  // k > 0: the chosen token's log-softmax and the top-k (id, logprob) pairs
};

// A generated token (token >= 0) or the end of a request (finish non-empty: "stop", "length", "cancelled",
// "error").
struct BatchEvent {
  int64_t id = 0;
  int64_t token = -1;
  double logprob = 0.0;                          // valid when has_logprobs
  bool has_logprobs = false;
  std::vector<std::pair<int64_t, double>> top;   // the top-k (id, logprob), best first
  std::string finish, error;
  int64_t prompt_tokens = 0, completion_tokens = 0;
};

class Scheduler {
 public:
  Scheduler(std::shared_ptr<const TextWeights> weights, SchedulerConfig cfg);
  ~Scheduler();

  // Empty when a request of these sizes can ever run, else why not (naming the numbers).
  std::string fit_error(int64_t prompt_tokens, int64_t max_new_tokens, int64_t image_tokens) const;
  // The most new tokens a request of these sizes can be given (the context and the whole pool); 0 if none.
  int64_t max_new_tokens_fitting(int64_t prompt_tokens, int64_t image_tokens) const;
  // Queues a request (checked: shapes, ids, sampling, fit); runs from a later step.
  void add(BatchRequest r);
  // Ends a queued or running request now, freeing its blocks; its "cancelled" event (none if the id is unknown).
  std::vector<BatchEvent> cancel(int64_t id);
  // Ends every request with `reason` (e.g. "error" after a failed step).
  std::vector<BatchEvent> abort_all(const std::string& reason, const std::string& error);
  // One step: admission, prefill chunks, one decode step of the running batch. Its tokens and finished requests.
  std::vector<BatchEvent> step();

  bool has_work() const { return !waiting_.empty() || !active_.empty(); }
  int64_t running() const { return static_cast<int64_t>(active_.size()); }
  int64_t waiting() const { return static_cast<int64_t>(waiting_.size()); }
  // Admitted requests that could not take a KV block at the last step (see safe_with), so did not advance.
  int64_t waiting_for_blocks() const { return waiting_for_blocks_; }
  const KvCache& cache() const { return cache_; }

 private:
  struct Sequence;
  void admit();
  at::Tensor prefill_chunk(Sequence& s, int64_t n);  // hidden state [1, C] at the prompt's end, else undefined
  at::Tensor decode(const std::vector<Sequence*>& rows);  // hidden states [B, C] (before the final norm)
  void sample(Sequence& s, const at::Tensor& logits, std::vector<BatchEvent>& events);
  bool safe_with(size_t j, int64_t k, int64_t need_new) const;  // see scheduler.cpp
  // Blocks for `tokens` tokens of active_[j] when safe_with allows them; false (nothing taken): it waits this step.
  bool grow(size_t j, int64_t tokens);
  BatchEvent finish(Sequence& s, const std::string& reason, const std::string& error = "");
  void remove_finished();

  std::shared_ptr<const TextWeights> w_;
  SchedulerConfig cfg_;
  KvCache cache_;
  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> active_;  // admitted (prefilling or decoding), in admission order
  int64_t waiting_for_blocks_ = 0;
};

}  // namespace llama_mm
