// The llama_mm operator library: every op schema (declared once, here) and the CPU implementations.
// CUDA implementations register themselves from cuda/*.cu.
#include <torch/library.h>

#include "attention.h"
#include "gemv.h"
#include "ops.h"
#include "qlinear.h"
#include "qlinear_a8.h"
#include "paged_attention.h"
#include "widened_linear.h"

TORCH_LIBRARY(llama_mm, m) {
  // Fake (meta) implementations for tracing and torch.library.opcheck live in this Python module.
  m.set_python_module("llama_mm.ops");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor positions, Tensor inv_freq) -> Tensor");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor key_valid, Tensor length) -> Tensor");
  m.def("cross_attention(Tensor q, Tensor k, Tensor v, Tensor? mask) -> Tensor");
  m.def("gemv(Tensor x, Tensor weight) -> Tensor");
  m.def("widened_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("qlinear(Tensor x, Tensor packed, Tensor scale, Tensor? zero, int bits, int group_size) -> Tensor");
  m.def("qlinear_a8(Tensor x, Tensor packed, Tensor scale, Tensor? zero, int bits, int group_size) -> Tensor");
  m.def(
      "paged_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, Tensor lengths) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama_mm, CPU, m) {
  m.impl("rms_norm", &llama_mm::cpu::rms_norm);
  m.impl("rope", &llama_mm::cpu::rope);
  m.impl("silu_mul", &llama_mm::cpu::silu_mul);
  m.impl("decode_attention", &llama_mm::cpu::decode_attention);
  m.impl("cross_attention", &llama_mm::cpu::cross_attention);
  m.impl("gemv", &llama_mm::cpu::gemv);
  m.impl("widened_linear", &llama_mm::cpu::widened_linear);
  m.impl("qlinear", &llama_mm::cpu::qlinear);
  m.impl("qlinear_a8", &llama_mm::cpu::qlinear_a8);
  m.impl("paged_attention", &llama_mm::cpu::paged_attention);
}
