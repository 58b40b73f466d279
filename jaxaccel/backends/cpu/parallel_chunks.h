// Splitting a kernel's work over XLA's intra-op thread pool (shared by the C++ kernels here).
//
// Items [0, items) are cut into about `target_chunks` chunks, claimed from a shared counter by
// the calling thread and by helper tasks on the pool. The caller waits for finished chunks,
// never for tasks: a helper that starts late finds nothing left and returns, so a busy or
// one-thread pool cannot deadlock. One core cannot pull the machine's memory bandwidth, so
// even a matrix-vector product is split.

#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace jaxaccel {

constexpr int kSpins = 1 << 16;  // pauses (~1 ms) before blocking

inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

template <typename Body>
struct Chunks {
  Body body;  // body(first_item, end_item)
  int64_t items, per_chunk, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mutex;
  std::condition_variable finished;

  Chunks(Body b, int64_t n, int64_t target)
      : body(b), items(n), per_chunk(std::max<int64_t>(1, n / target)),
        chunks((n + per_chunk - 1) / per_chunk) {}

  void run() {
    for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
      body(c * per_chunk, std::min(items, (c + 1) * per_chunk));
      if (done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
  }

  // The caller waits only for chunks a helper has already claimed, i.e. at most one chunk:
  // spin for it, since sleeping on the condition variable costs a wake-up per call (dozens
  // of calls per decode step); block only after kSpins.
  void wait() {
    for (int spin = 0; spin < kSpins; ++spin) {
      if (done.load(std::memory_order_acquire) == chunks) return;
      spin_pause();
    }
    std::unique_lock<std::mutex> lock(mutex);
    finished.wait(lock, [this] { return done.load() == chunks; });
  }
};

// body(first, end) over [0, items) on the calling thread and the pool's threads.
template <typename Body>
void parallel_chunks(xla::ffi::ThreadPool& pool, int64_t items, int64_t target_chunks,
                     Body body) {
  auto work = std::make_shared<Chunks<Body>>(body, items, target_chunks);
  int64_t helpers = std::min<int64_t>(pool.num_threads(), work->chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->run(); });
  work->run();
  work->wait();
}

}  // namespace jaxaccel
