// Paged single-query attention (CPU): the online-softmax core of attention_core.h, walking each row's keys block by
// block through its block table.
#include "paged_attention.h"

#include <ATen/ATen.h>

#include <vector>

#include "attention_core.h"
#include "op_common.h"

namespace llama_mm::cpu {
namespace {

using namespace attention_core;

// Keys of row b: lengths[b] slots, slot j in pool block tables[b * max_blocks + j / bs] at offset j % bs.
template <typename T>
struct PagedKeys {
  const T* kp;
  const T* vp;
  int64_t kb, kh, kss, vb, vh, vss;  // pool strides: block, head, slot
  const int64_t* tables;             // [B, max_blocks]
  const int64_t* lengths;            // [B]
  int64_t max_blocks, bs;
  int64_t length(int64_t b) const { return lengths[b]; }
  KeyRun<T> run(int64_t b, int64_t h, int64_t j0) const {
    const int64_t block = tables[b * max_blocks + j0 / bs], off = j0 % bs;
    return {kp + block * kb + h * kh + off * kss, vp + block * vb + h * vh + off * vss, bs - off};
  }
};

}  // namespace

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                           const at::Tensor& block_tables, const at::Tensor& lengths) {
  check_paged_attention_args(q, k_pool, v_pool, block_tables, lengths, c10::DeviceType::CPU);
  const int64_t num_blocks = k_pool.size(0), bs = k_pool.size(2), max_blocks = block_tables.size(1);
  const auto tables = block_tables.to(at::kLong).contiguous();
  const auto lens = lengths.to(at::kLong).contiguous();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < q.size(0); ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= max_blocks * bs, "llama_mm.paged_attention: lengths[", b, "] = ", lp[b],
                " outside [1, max_blocks * block_size = ", max_blocks * bs, "]");
    for (int64_t i = 0; i < (lp[b] + bs - 1) / bs; ++i)
      TORCH_CHECK(tp[b * max_blocks + i] >= 0 && tp[b * max_blocks + i] < num_blocks,
                  "llama_mm.paged_attention: block_tables[", b, ", ", i, "] = ", tp[b * max_blocks + i],
                  " outside the pool's ", num_blocks, " blocks");
  }
  auto out = at::empty(q.sizes(), q.options());
  LLAMA_MM_DISPATCH_FLOAT_TYPES(q.scalar_type(), "paged_attention", [&] {
    using T = scalar_t;
    const PagedKeys<T> keys{k_pool.data_ptr<T>(), v_pool.data_ptr<T>(), k_pool.stride(0), k_pool.stride(1),
                            k_pool.stride(2),     v_pool.stride(0),     v_pool.stride(1), v_pool.stride(2),
                            tp,                   lp,                   max_blocks,       bs};
    attend<T>(q, k_pool.size(1), keys, nullptr, 0, nullptr, 0, out);
  });
  return out;
}

}  // namespace llama_mm::cpu
