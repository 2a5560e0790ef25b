// What the CPU kernels (depthwise.cc, matmul.cc, attention.cc, norm.cc) share: the vector type, aligned scratch
// memory and the loop that runs tasks on XLA's intra-op thread pool.
#ifndef DCLS_JAX_CSRC_COMMON_H_
#define DCLS_JAX_CSRC_COMMON_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>

#include "xla/ffi/api/ffi.h"

namespace dcls_jax {

namespace ffi = xla::ffi;

// Floats per vector: 16 with AVX-512 (32 vector registers), 8 elsewhere (AVX2, NEON: 16 registers).
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
constexpr int64_t kRegisters = 32;
#else
constexpr int64_t kLanes = 8;
constexpr int64_t kRegisters = 16;
#endif

typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));

// A thread's scratch floats, 64-byte aligned (so that vector loads never split a cache line): as left by the
// last use, or zero-filled.
class Scratch {
 public:
  float* get(int64_t n) {
    if (n > size_) {
      std::free(data_);
      size_ = round_up_size(n);
      data_ = static_cast<float*>(std::aligned_alloc(64, size_ * sizeof(float)));
      if (!data_) throw std::bad_alloc();
    }
    return data_;
  }
  float* zeroed(int64_t n) {
    float* p = get(n);
    std::memset(p, 0, n * sizeof(float));
    return p;
  }
  ~Scratch() { std::free(data_); }

 private:
  static int64_t round_up_size(int64_t n) { return (n + 15) / 16 * 16; }
  float* data_ = nullptr;
  int64_t size_ = 0;
};

inline vec load(const float* p) { vec v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }
inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }
// A scalar in every lane (s - 0 is s, so no arithmetic is left: one broadcast).
inline vec splat(float s) { return s - vec{}; }

// Runs body(t) for t in [0, tasks) on the caller and the pool. The caller waits only for tasks some thread has
// claimed, never for a closure still queued, so a busy or absent pool cannot deadlock it.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t tasks, const F& body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  const F* fn = &body;
  auto work = [state, fn, tasks]() {
    int64_t finished = 0;
    for (int64_t t; (t = state->next.fetch_add(1)) < tasks; ++finished) (*fn)(t);
    if (finished && state->done.fetch_add(finished) + finished == tasks) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->cv.notify_all();
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == tasks; });
}

}  // namespace dcls_jax

#endif  // DCLS_JAX_CSRC_COMMON_H_
