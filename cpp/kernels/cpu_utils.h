// Helpers shared by the CPU kernels: float32 vector I/O for float/bfloat16/half rows, rounding to a dtype,
// parallel grain.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#include <tuple>
#include <type_traits>

namespace llama_mm::cpu {

using fVec = at::vec::Vectorized<float>;

// Elements handled per step: two float32 vectors (= one Vectorized<BFloat16> or Vectorized<Half>).
constexpr int64_t kChunk = 2 * fVec::size();

// Load fVec::size() elements of T at p as one float32 vector.
template <typename T>
inline fVec load1(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p);
  } else {
    fVec v;
    at::vec::load_to_float<T>(p, v);
    return v;
  }
}

// Load n <= kChunk elements of T at p as two float32 vectors; elements past n read as 0.
template <typename T>
inline void load2(const T* p, int64_t n, fVec& lo, fVec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t V = fVec::size();
    if (n == kChunk) {
      lo = fVec::loadu(p);
      hi = fVec::loadu(p + V);
    } else {
      lo = fVec::loadu(p, std::min(n, V));
      hi = n > V ? fVec::loadu(p + V, n - V) : fVec(0.0f);
    }
  } else {
    using TVec = at::vec::Vectorized<T>;
    const TVec v = n == kChunk ? TVec::loadu(p) : TVec::loadu(p, n);
    std::tie(lo, hi) = at::vec::convert_to_float<T>(v);
  }
}

// Store the first n <= kChunk of (lo, hi) to p as T (round to nearest even, like Tensor.to(T)).
template <typename T>
inline void store2(T* p, int64_t n, const fVec& lo, const fVec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t V = fVec::size();
    if (n == kChunk) {
      lo.store(p);
      hi.store(p + V);
    } else {
      lo.store(p, std::min(n, V));
      if (n > V) hi.store(p + V, n - V);
    }
  } else {
    const auto v = at::vec::convert_from_float<T>(lo, hi);
    if (n == kChunk) {
      v.store(p);
    } else {
      v.store(p, n);
    }
  }
}

// Round float32 values to T's precision and back: what an intermediate `.to(T)` does in the reference.
template <typename T>
inline void round2(fVec& lo, fVec& hi) {
  if constexpr (!std::is_same_v<T, float>) {
    std::tie(lo, hi) = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(lo, hi));
  }
}

// Keeps v in a register: stops the compiler from folding a load that is used several times into each use.
inline void in_register(fVec& v) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  asm("" : "+x"(v));
#endif
}

inline float hsum(const fVec& v) {
  __at_align__ float a[fVec::size()];
  v.store(a);
  float s = 0.0f;
  for (int64_t i = 0; i < fVec::size(); ++i) s += a[i];
  return s;
}

#if defined(__AVX512BF16__)
// 32 bfloat16 at p as the operand of vdpbf16ps (products of pairs, exact in float32).
inline __m512bh load32_bh(const at::BFloat16* p) {
  return (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(p));
}
#endif

// f(n0, n1) over [0, N) in consecutive tasks of `task` items, each taken by whichever thread is free next. Unlike
// at::parallel_for's even split decided in advance, a thread that runs slower (the two vCPUs of a VM rarely run
// evenly) takes fewer tasks instead of keeping the others waiting at the end. Inside a parallel region: in order,
// on the calling thread.
template <typename F>
void parallel_tasks(int64_t N, int64_t task, const F& f) {
  const int64_t ntasks = (N + task - 1) / task;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(ntasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < ntasks;)
      f(t * task, std::min(N, (t + 1) * task));
  });
}

// Rows per at::parallel_for task so that one task touches about at::internal::GRAIN_SIZE elements.
inline int64_t row_grain(int64_t row_elems) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, row_elems));
}

}  // namespace llama_mm::cpu
