// Memory read bandwidth of this machine, the physical limit of a decode step (CMake target llama_mm_read_bandwidth).
//
// Every thread sums its share of a buffer far larger than the caches, read as S independent sequential streams
// (S contiguous parts walked side by side): one stream per core leaves bandwidth unused, so the best S is the limit.
// Prints one JSON line per S (best of `repeats` passes) and a last line with the best of all.
//
//     llama_mm_read_bandwidth [GiB=1] [repeats=7]
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Sum of floats [p, p + n) for S streams of n floats each, `stride` floats apart.
template <int S>
float sum_streams(const float* p, size_t n, size_t stride) {
#if defined(__AVX512F__)
  __m512 acc[S];
  for (int s = 0; s < S; ++s) acc[s] = _mm512_setzero_ps();
  for (size_t i = 0; i + 16 <= n; i += 16)
    for (int s = 0; s < S; ++s) acc[s] = _mm512_add_ps(acc[s], _mm512_loadu_ps(p + s * stride + i));
  float total = 0.f;
  for (int s = 0; s < S; ++s) total += _mm512_reduce_add_ps(acc[s]);
  return total;
#else
  float acc[S][16] = {};
  for (size_t i = 0; i + 16 <= n; i += 16)
    for (int s = 0; s < S; ++s)
      for (int l = 0; l < 16; ++l) acc[s][l] += p[s * stride + i + l];
  float total = 0.f;
  for (int s = 0; s < S; ++s)
    for (int l = 0; l < 16; ++l) total += acc[s][l];
  return total;
#endif
}

// GB/s of one pass over `n` floats with S streams per thread.
template <int S>
double pass(const float* data, size_t n) {
  const auto t0 = std::chrono::steady_clock::now();
  float total = 0.f;
#pragma omp parallel reduction(+ : total)
  {
    const size_t share = n / omp_get_num_threads(), part = share / S / 16 * 16;
    total += sum_streams<S>(data + omp_get_thread_num() * share, part, part);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (total != static_cast<float>(total)) std::abort();  // keep the sum alive
  return n * sizeof(float) / seconds / 1e9;
}

template <int S>
double best_of(const float* data, size_t n, int repeats) {
  double best = 0;
  for (int r = 0; r < repeats; ++r) best = std::max(best, pass<S>(data, n));
  std::printf("{\"streams_per_thread\": %d, \"threads\": %d, \"GBps\": %.2f}\n", S, omp_get_max_threads(), best);
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const double gib = argc > 1 ? std::atof(argv[1]) : 1.0;
  const int repeats = argc > 2 ? std::atoi(argv[2]) : 7;
  const size_t n = static_cast<size_t>(gib * (1ull << 30)) / sizeof(float);
  std::unique_ptr<float[]> data(new float[n]);
#pragma omp parallel for schedule(static)  // first touch: each thread's pages where it reads them
  for (size_t i = 0; i < n; ++i) data[i] = 1.f;
  double best = 0;
  best = std::max(best, best_of<1>(data.get(), n, repeats));
  best = std::max(best, best_of<2>(data.get(), n, repeats));
  best = std::max(best, best_of<4>(data.get(), n, repeats));
  best = std::max(best, best_of<6>(data.get(), n, repeats));
  best = std::max(best, best_of<8>(data.get(), n, repeats));
  std::printf("{\"best_GBps\": %.2f}\n", best);
  return 0;
}
