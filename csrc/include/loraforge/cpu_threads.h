// Split [0, count) into contiguous ranges, one per thread. Work is cut on block boundaries by the
// caller, so threads never share an output byte.
#pragma once
#include <algorithm>
#include <thread>
#include <vector>

namespace loraforge {

template <typename RangeFn>
void parallel_ranges(long long count, int num_threads, long long min_per_thread, RangeFn&& fn) {
  long long threads = std::max(1, num_threads);
  threads = std::min(threads, std::max(1LL, count / std::max(1LL, min_per_thread)));
  if (threads <= 1) {
    fn(0LL, count);
    return;
  }
  const long long per_thread = (count + threads - 1) / threads;
  std::vector<std::thread> workers;
  workers.reserve(threads - 1);
  for (long long t = 1; t < threads; ++t) {
    const long long begin = std::min(count, t * per_thread);
    const long long end = std::min(count, begin + per_thread);
    workers.emplace_back([&fn, begin, end] { fn(begin, end); });
  }
  fn(0LL, std::min(count, per_thread));
  for (auto& worker : workers) worker.join();
}

}  // namespace loraforge
