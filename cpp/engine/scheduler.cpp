#include "scheduler.h"

#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "ops_dispatch.h"

namespace llama_mm {

using namespace dispatch;
using at::indexing::Slice;

constexpr int64_t kMaxBatch = 64;  // gemv's batch-invariant limit

struct Scheduler::Sequence {
  BatchRequest req;
  int64_t prompt_len = 0, image_tokens = 0;
  int64_t need = 0;          // blocks it can ever hold: prompt + token budget + image charge (worst case)
  int64_t image_blocks = 0;  // image K/V charged (from admission)
  std::vector<int32_t> blocks;             // the block table
  int64_t length = 0;                      // tokens whose K/V are in the cache
  int64_t generated = 0;
  int64_t next_token = -1;                 // sampled, not yet fed
  bool done = false;
  at::Generator gen;
  at::Tensor seen;                              // [1, V] bool, for the repetition penalty
  std::vector<at::Tensor> cross_k, cross_v;     // per layer [1, Hkv, S, D] (cross layers of image requests)
  at::Tensor step_cross_mask, step_row_mask;    // decode rows: [1, S] float32 additive, [1, 1, 1]
  bool image = false;                           // cross layers run (else skipped, as for text only)
};

Scheduler::Scheduler(std::shared_ptr<const TextWeights> weights, SchedulerConfig cfg)
    : w_(std::move(weights)), cfg_(cfg), cache_(*w_, cfg.kv_cache_mb * 1024.0 * 1024.0, cfg.block_size) {
  TORCH_CHECK_VALUE(cfg_.max_batch >= 1 && cfg_.max_batch <= kMaxBatch, "max_batch must be in [1, ", kMaxBatch,
                    "], got ", cfg_.max_batch);
  TORCH_CHECK_VALUE(cfg_.prefill_chunk >= 1, "prefill_chunk must be >= 1, got ", cfg_.prefill_chunk);
}

Scheduler::~Scheduler() = default;

std::string Scheduler::fit_error(int64_t prompt_tokens, int64_t max_new_tokens, int64_t image_tokens) const {
  const int64_t total = prompt_tokens + max_new_tokens;
  if (total > w_->cfg.max_positions)
    return "prompt of " + std::to_string(prompt_tokens) + " tokens + max_new_tokens " +
           std::to_string(max_new_tokens) + " = " + std::to_string(total) + " exceeds the model context of " +
           std::to_string(w_->cfg.max_positions) + " positions";
  const int64_t need = cache_.blocks_for(total, image_tokens);
  if (need > cache_.num_blocks())
    return "prompt of " + std::to_string(prompt_tokens) + " tokens + max_new_tokens " +
           std::to_string(max_new_tokens) + (image_tokens ? " + image K/V of " + std::to_string(image_tokens) +
                                                                " tokens" : std::string()) +
           " needs " + std::to_string(need) + " KV blocks of " + std::to_string(cache_.block_size()) +
           " tokens, more than the whole pool of " + std::to_string(cache_.num_blocks()) + " blocks (" +
           std::to_string(cfg_.kv_cache_mb) + " MiB)";
  return "";
}

int64_t Scheduler::max_new_tokens_fitting(int64_t prompt_tokens, int64_t image_tokens) const {
  const int64_t pool_tokens = (cache_.num_blocks() - cache_.blocks_for(0, image_tokens)) * cache_.block_size();
  return std::max<int64_t>(0, std::min(w_->cfg.max_positions, pool_tokens) - prompt_tokens);
}

void Scheduler::add(BatchRequest r) {
  const auto& ids = r.input_ids;
  TORCH_CHECK_VALUE(ids.defined() && ids.dim() == 1 && ids.scalar_type() == at::kLong && ids.numel() > 0,
                    "input_ids must be a non-empty int64 [T] tensor");
  const int64_t T = ids.numel(), rows = w_->embed.size(0);
  TORCH_CHECK_VALUE(ids.min().item<int64_t>() >= 0 && ids.max().item<int64_t>() < rows,
                    "input_ids outside the embedding table [0, ", rows, ")");
  TORCH_CHECK_VALUE(r.max_new_tokens > 0, "max_new_tokens must be > 0, got ", r.max_new_tokens);
  TORCH_CHECK_VALUE(r.logprobs >= 0 && r.logprobs <= w_->cfg.vocab_size, "logprobs must be in [0, ",
                    w_->cfg.vocab_size, "], got ", r.logprobs);
  r.sampling.validate();
  auto s = std::make_unique<Sequence>();
  if (r.image_kv.defined()) {
    const int64_t S = w_->check_image_kv(r.image_kv, 1);
    TORCH_CHECK_VALUE(r.cross_mask.defined() && r.cross_mask.sizes() == at::IntArrayRef({1, 1, T, S}),
                      "cross_mask must be [1, 1, T, S] = [1, 1, ", T, ", ", S, "]");
    TORCH_CHECK_VALUE(r.row_mask.defined() && r.row_mask.sizes() == at::IntArrayRef({1, T, 1}),
                      "row_mask must be [1, T, 1] = [1, ", T, ", 1]");
    s->image_tokens = S;
    s->image = true;
  }
  const std::string why = fit_error(T, r.max_new_tokens, s->image_tokens);
  TORCH_CHECK_VALUE(why.empty(), why);
  s->prompt_len = T;
  s->need = cache_.blocks_for(T + r.max_new_tokens, s->image_tokens);
  s->image_blocks = s->need - cache_.blocks_for(T + r.max_new_tokens, 0);
  s->gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(r.sampling.seed));
  if (r.sampling.repetition_penalty != 1.0) {
    const int64_t V = w_->cfg.vocab_size;
    // ids >= V (<|image|> and the other rows lm_head cannot produce) land in a dummy last column
    auto seen = at::zeros({1, V + 1}, at::TensorOptions().dtype(at::kBool));
    seen.scatter_(1, ids.cpu().clamp(0, V).unsqueeze(0), true);
    s->seen = seen.narrow(1, 0, V).contiguous();
  }
  s->req = std::move(r);
  waiting_.push_back(std::move(s));
}

// Banker's rule in admission order: the state where active_[j] holds `k` more blocks (j == active_.size(): a
// request being admitted, holding k, that can ever need `need_new`) is safe when the requests can finish one after
// another, oldest first, each taking what it may still need from what is free plus what the older ones gave back.
// Only safe states are entered, so the oldest request can always take its next block: no request ever has to be
// evicted, and nobody reserves a whole token budget up front.
bool Scheduler::safe_with(size_t j, int64_t k, int64_t need_new) const {
  int64_t free = cache_.available() - k;
  if (free < 0) return false;
  const size_t n = active_.size() + (j == active_.size() ? 1 : 0);
  for (size_t i = 0; i < n; ++i) {
    int64_t held = 0, need = need_new;
    if (i < active_.size()) {
      const Sequence& s = *active_[i];
      if (s.done) continue;
      held = static_cast<int64_t>(s.blocks.size()) + s.image_blocks;
      need = s.need;
    }
    if (i == j) held += k;
    if (need - held > free) return false;
    free += held;
  }
  return true;
}

void Scheduler::admit() {
  while (!waiting_.empty() && static_cast<int64_t>(active_.size()) < cfg_.max_batch) {
    Sequence& s = *waiting_.front();
    if (!safe_with(active_.size(), s.image_blocks, s.need)) break;  // first come, first served
    cache_.charge_image(s.image_blocks);
    active_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
}

bool Scheduler::grow(size_t j, int64_t tokens) {
  Sequence& s = *active_[j];
  const int64_t k = cache_.blocks_for(tokens, 0) - static_cast<int64_t>(s.blocks.size());
  if (k <= 0) return true;
  if (!safe_with(j, k, 0)) return false;
  for (int64_t i = 0; i < k; ++i) s.blocks.push_back(cache_.allocate());
  return true;
}

// Prompt tokens [length, length + n) of one request (B = 1): their K/V into its blocks, attention over all its
// tokens so far (causal), and at the prompt's end its last row's hidden state (step() takes its logits together
// with the decode rows': one read of lm_head for all).
at::Tensor Scheduler::prefill_chunk(Sequence& s, int64_t n) {
  const auto dev = w_->device();
  const auto opts = w_->options();
  const int64_t H = w_->cfg.num_heads, Hkv = w_->cfg.num_kv_heads, D = w_->cfg.head_dim(), bs = cache_.block_size();
  const double eps = w_->cfg.rms_norm_eps;
  const int64_t t0 = s.length, t1 = t0 + n;
  const auto long_opts = at::TensorOptions().dtype(at::kLong).device(dev);
  if (t0 == 0 && s.image) {
    // the image's K/V (read in place); decode rows repeat the prompt's last cross-attention row
    w_->split_image_kv(s.req.image_kv, s.cross_k, s.cross_v);
    s.req.cross_mask = s.req.cross_mask.to(dev, w_->dtype());
    s.req.row_mask = s.req.row_mask.to(dev, w_->dtype());
    s.step_cross_mask = s.req.cross_mask.select(1, 0).select(1, s.prompt_len - 1).to(at::kFloat).contiguous();
    s.step_row_mask = s.req.row_mask.select(1, s.prompt_len - 1).unsqueeze(1).contiguous();  // (1, 1, 1)
    s.req.image_kv = at::Tensor();  // the per-layer views hold it while the request needs it
  }
  TORCH_INTERNAL_ASSERT(static_cast<int64_t>(s.blocks.size()) * bs >= t1, "prefill before grow()");
  auto pos = at::arange(t0, t1, long_opts);                                    // (n,)
  auto table = at::tensor(std::vector<int64_t>(s.blocks.begin(), s.blocks.end()), at::kLong).to(dev);
  auto slot_block = table.index_select(0, at::div(pos, bs, "floor"));          // (n,)
  auto slot_off = at::remainder(pos, bs);                                      // (n,)
  auto keys = at::arange(t1, long_opts);
  auto mask = at::zeros({1, 1, n, t1}, opts).masked_fill(
      (keys.unsqueeze(0) > pos.unsqueeze(1)).view({1, 1, n, t1}), lowest(w_->dtype()));  // causal
  const int64_t nb = (t1 + bs - 1) / bs;
  auto x = at::embedding(w_->embed, s.req.input_ids.narrow(0, t0, n).to(dev)).unsqueeze(0);  // (1, n, C)
  auto positions = pos.unsqueeze(0);                                                          // (1, n)
  for (size_t i = 0; i < w_->layers.size(); ++i) {
    const Layer& l = w_->layers[i];
    if (l.cross) {
      if (!s.image) continue;  // text only: cross layers are skipped, as in the reference
      auto q = rms_norm(l.wq(rms_norm(x, l.input_norm, eps)).view({1, n, H, D}), l.q_norm, eps);
      auto attn = at::scaled_dot_product_attention(q.transpose(1, 2), s.cross_k[i], s.cross_v[i],
                                                   s.req.cross_mask.narrow(2, t0, n), 0.0, false, std::nullopt,
                                                   Hkv != H);  // (1, H, n, D)
      x = x + l.attn_gate * l.wo(attn.transpose(1, 2).reshape({1, n, H * D}));
      x = x + l.mlp_gate * (s.req.row_mask.narrow(1, t0, n) * w_->mlp(l, rms_norm(x, l.post_norm, eps)));
    } else {
      auto h = rms_norm(x, l.input_norm, eps);
      auto q = rope(l.wq(h).view({1, n, H, D}), positions, w_->inv_freq);    // (1, n, H, D)
      auto k = rope(l.wk(h).view({1, n, Hkv, D}), positions, w_->inv_freq);  // (1, n, Hkv, D)
      auto v = l.wv(h).view({1, n, Hkv, D});
      auto& kp = cache_.k(i);
      auto& vp = cache_.v(i);
      kp.index_put_({slot_block, Slice(), slot_off, Slice()}, k.view({n, Hkv, D}));
      vp.index_put_({slot_block, Slice(), slot_off, Slice()}, v.view({n, Hkv, D}));
      // this request's keys so far, gathered from its blocks: (1, Hkv, t1, D)
      auto gather = [&](const at::Tensor& pool) {
        return pool.index_select(0, table.narrow(0, 0, nb)).permute({1, 0, 2, 3}).reshape({1, Hkv, nb * bs, D})
            .narrow(2, 0, t1);
      };
      auto attn = at::scaled_dot_product_attention(q.transpose(1, 2), gather(kp), gather(vp), mask, 0.0, false,
                                                   std::nullopt, Hkv != H);  // (1, H, n, D)
      x = x + l.wo(attn.transpose(1, 2).reshape({1, n, H * D}));
      x = x + w_->mlp(l, rms_norm(x, l.post_norm, eps));
    }
  }
  s.length = t1;
  if (t1 < s.prompt_len) return at::Tensor();
  s.req.cross_mask = at::Tensor();  // the prompt is done: only the decode rows' masks stay
  s.req.row_mask = at::Tensor();
  if (s.image) {
    // the decode rows' image keys only: the charge for the keys cut goes back to the budget
    cut_masked_cross_keys(s.step_cross_mask, s.cross_k, s.cross_v, w_->dtype(), /*copy=*/!s.req.image_kv_shared);
    s.image_tokens = s.step_cross_mask.size(1);
    const int64_t image_blocks = cache_.blocks_for(0, s.image_tokens);
    cache_.uncharge_image(s.image_blocks - image_blocks);
    s.need -= s.image_blocks - image_blocks;
    s.image_blocks = image_blocks;
  }
  return x.select(1, n - 1);  // (1, C)
}

// One decode step for `rows` (each has a sampled token to feed): their hidden states [B, C].
at::Tensor Scheduler::decode(const std::vector<Sequence*>& rows) {
  const auto dev = w_->device();
  const int64_t B = static_cast<int64_t>(rows.size()), H = w_->cfg.num_heads, Hkv = w_->cfg.num_kv_heads,
                D = w_->cfg.head_dim(), bs = cache_.block_size();
  const double eps = w_->cfg.rms_norm_eps;
  int64_t max_blocks = 1;
  std::vector<int64_t> tokens(B), pos(B), slot_block(B), slot_off(B), lengths(B);
  std::vector<int64_t> image_rows;
  for (int64_t b = 0; b < B; ++b) {
    Sequence& s = *rows[b];
    TORCH_INTERNAL_ASSERT(static_cast<int64_t>(s.blocks.size()) * bs > s.length, "decode before grow()");
    tokens[b] = s.next_token;
    pos[b] = s.length;  // a request's prompt has no padding: positions count its tokens
    slot_block[b] = s.blocks[s.length / bs];
    slot_off[b] = s.length % bs;
    lengths[b] = s.length + 1;
    max_blocks = std::max<int64_t>(max_blocks, static_cast<int64_t>(s.blocks.size()));
    if (s.image) image_rows.push_back(b);
  }
  std::vector<int32_t> table(B * max_blocks, 0);  // unused entries: block 0, never read
  for (int64_t b = 0; b < B; ++b) std::copy(rows[b]->blocks.begin(), rows[b]->blocks.end(), table.begin() + b * max_blocks);
  auto to_dev = [&](const std::vector<int64_t>& v) { return at::tensor(v, at::kLong).to(dev); };
  auto positions = to_dev(pos).view({B, 1});
  auto blk = to_dev(slot_block), off = to_dev(slot_off), lens = to_dev(lengths);
  auto tables = at::tensor(table, at::kInt).view({B, max_blocks}).to(dev);
  auto img = to_dev(image_rows);
  const auto Bi = static_cast<int64_t>(image_rows.size());

  auto x = at::embedding(w_->embed, to_dev(tokens).view({B, 1}));  // (B, 1, C)
  for (size_t i = 0; i < w_->layers.size(); ++i) {
    const Layer& l = w_->layers[i];
    if (l.cross) {
      if (Bi == 0) continue;  // text-only rows skip cross layers
      auto xi = Bi == B ? x : x.index_select(0, img);  // (Bi, 1, C)
      auto q = rms_norm(l.wq(rms_norm(xi, l.input_norm, eps)).view({Bi, H, D}), l.q_norm, eps);
      std::vector<at::Tensor> attn, row_masks;
      for (int64_t r = 0; r < Bi; ++r) {  // each request against its own image
        const Sequence& s = *rows[image_rows[r]];
        attn.push_back(cross_attention(q.narrow(0, r, 1), s.cross_k[i], s.cross_v[i], s.step_cross_mask));
        row_masks.push_back(s.step_row_mask);
      }
      auto a = at::cat(attn, 0);  // (Bi, H, D)
      xi = xi + l.attn_gate * l.wo(a.view({Bi, 1, H * D}));
      xi = xi + l.mlp_gate * (at::cat(row_masks, 0) * w_->mlp(l, rms_norm(xi, l.post_norm, eps)));
      x = Bi == B ? xi : x.index_copy(0, img, xi);
    } else {
      auto h = rms_norm(x, l.input_norm, eps);
      auto q = rope(l.wq(h).view({B, 1, H, D}), positions, w_->inv_freq);    // (B, 1, H, D)
      auto k = rope(l.wk(h).view({B, 1, Hkv, D}), positions, w_->inv_freq);  // (B, 1, Hkv, D)
      auto v = l.wv(h).view({B, 1, Hkv, D});
      cache_.k(i).index_put_({blk, Slice(), off, Slice()}, k.view({B, Hkv, D}));
      cache_.v(i).index_put_({blk, Slice(), off, Slice()}, v.view({B, Hkv, D}));
      auto attn = paged_attention(q.view({B, H, D}), cache_.k(i), cache_.v(i), tables, lens);  // (B, H, D)
      x = x + l.wo(attn.view({B, 1, H * D}));
      x = x + w_->mlp(l, rms_norm(x, l.post_norm, eps));
    }
  }
  for (auto* s : rows) ++s->length;
  return x.select(1, 0);  // (B, C)
}

// The next token of `s` from its logits [1, V]: the token event, and the finish event when it ends the request.
void Scheduler::sample(Sequence& s, const at::Tensor& logits_in, std::vector<BatchEvent>& events) {
  auto logits = logits_in.to(at::kCPU);
  auto token = sample_next(logits, s.seen, s.req.sampling, s.gen).item<int64_t>();
  BatchEvent e;
  e.id = s.req.id;
  e.token = token;
  if (s.req.logprobs > 0) {
    // log-softmax of the raw logits (before penalty, temperature or filtering), float32
    auto lp = at::log_softmax(logits.to(at::kFloat).view({-1}), 0);
    e.has_logprobs = true;
    e.logprob = lp[token].item<float>();
    auto [vals, ids] = at::topk(lp, s.req.logprobs);
    auto va = vals.accessor<float, 1>();
    auto ia = ids.accessor<int64_t, 1>();
    for (int64_t j = 0; j < vals.size(0); ++j) e.top.emplace_back(ia[j], va[j]);
  }
  if (s.seen.defined()) s.seen.index_put_({0, token}, true);
  ++s.generated;
  s.next_token = token;
  e.prompt_tokens = s.prompt_len;
  e.completion_tokens = s.generated;
  events.push_back(std::move(e));
  const auto& stops = s.req.stop_ids;
  if (std::find(stops.begin(), stops.end(), token) != stops.end()) {
    events.push_back(finish(s, "stop"));
  } else if (s.generated >= s.req.max_new_tokens) {
    events.push_back(finish(s, "length"));
  }
}

BatchEvent Scheduler::finish(Sequence& s, const std::string& reason, const std::string& error) {
  cache_.release(s.blocks);
  cache_.uncharge_image(s.image_blocks);
  s.image_blocks = s.need = 0;
  s.cross_k.clear();
  s.cross_v.clear();
  s.done = true;
  BatchEvent e;
  e.id = s.req.id;
  e.finish = reason;
  e.error = error;
  e.prompt_tokens = s.prompt_len;
  e.completion_tokens = s.generated;
  return e;
}

void Scheduler::remove_finished() {
  active_.erase(std::remove_if(active_.begin(), active_.end(), [](const auto& s) { return s->done; }),
                active_.end());
}

std::vector<BatchEvent> Scheduler::cancel(int64_t id) {
  std::vector<BatchEvent> events;
  for (auto it = waiting_.begin(); it != waiting_.end(); ++it) {
    if ((*it)->req.id != id) continue;
    BatchEvent e;  // never admitted: nothing held
    e.id = id;
    e.finish = "cancelled";
    e.prompt_tokens = (*it)->prompt_len;
    waiting_.erase(it);
    events.push_back(std::move(e));
    return events;
  }
  for (auto& s : active_)
    if (s->req.id == id && !s->done) events.push_back(finish(*s, "cancelled"));
  remove_finished();
  return events;
}

std::vector<BatchEvent> Scheduler::abort_all(const std::string& reason, const std::string& error) {
  std::vector<BatchEvent> events;
  for (auto& s : active_)
    if (!s->done) events.push_back(finish(*s, reason, error));
  active_.clear();
  for (auto& s : waiting_) {
    BatchEvent e;
    e.id = s->req.id;
    e.finish = reason;
    e.error = error;
    e.prompt_tokens = s->prompt_len;
    events.push_back(std::move(e));
  }
  waiting_.clear();
  return events;
}

std::vector<BatchEvent> Scheduler::step() {
  std::vector<BatchEvent> events;
  admit();
  // (a) prefill: whole chunks of [k * prefill_chunk, (k + 1) * prefill_chunk) of each prompt, in admission order,
  // at most prefill_chunk tokens in all (at least one chunk)
  int64_t budget = cfg_.prefill_chunk;
  std::vector<Sequence*> decoding, prompt_done;  // prompt_done: the prompts that end in this step's prefill
  std::vector<at::Tensor> last_rows;             // theirs, [1, C] each
  waiting_for_blocks_ = 0;
  for (size_t j = 0; j < active_.size(); ++j) {
    Sequence& s = *active_[j];
    if (s.length < s.prompt_len) {
      const int64_t n = std::min(cfg_.prefill_chunk - s.length % cfg_.prefill_chunk, s.prompt_len - s.length);
      if (n > budget) continue;
      if (!grow(j, s.length + n)) {  // waits for blocks (see safe_with)
        ++waiting_for_blocks_;
        continue;
      }
      budget -= n;
      auto last = prefill_chunk(s, n);
      if (last.defined()) {
        prompt_done.push_back(&s);
        last_rows.push_back(last);
      }
    } else if (grow(j, s.length + 1)) {
      decoding.push_back(&s);
    } else {  // waits this step for a block (see safe_with)
      ++waiting_for_blocks_;
    }
  }
  // (b) one decode step for the requests that were running before this step, then the logits of its rows and of
  // the prompts just ended in one product (lm_head is the largest weight: read once, not once more per new request)
  std::vector<at::Tensor> hidden;
  if (!decoding.empty()) hidden.push_back(decode(decoding));  // (B, C)
  hidden.insert(hidden.end(), last_rows.begin(), last_rows.end());
  std::vector<Sequence*> rows = decoding;  // the rows of `hidden`
  rows.insert(rows.end(), prompt_done.begin(), prompt_done.end());
  if (!rows.empty()) {
    auto logits = w_->logits(at::cat(hidden, 0));  // (rows, V)
    for (size_t b = 0; b < rows.size(); ++b) sample(*rows[b], logits.narrow(0, b, 1), events);
    remove_finished();
  }
  return events;
}

}  // namespace llama_mm
