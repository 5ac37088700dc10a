// OpenMP glue for the CPU kernels (falls back to serial loops when built without OpenMP).
#pragma once
#include <exception>
#include <mutex>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace mob::cpu {

// Runs body(b, parallel) for every sample, catching exceptions inside the OpenMP region (one escaping it would abort
// the process) and rethrowing the first afterwards. Several samples run side by side when the batch holds enough work
// (work = rough multiply-adds per sample); a single sample gets the threads inside instead (parallel = true).
template <class F>
void for_each_sample(int64_t B, int64_t work, F body) {
  if (!(B > 1 && work >= (kParallelWork + B - 1) / B)) {  // B * work >= kParallelWork, without overflow
    // No OpenMP construct here, not even an inactive one: a parallel region inside another region is a nested team,
    // which libgomp starts with fresh threads (~30 us a call here) instead of its warm top-level pool.
    for (int64_t b = 0; b < B; ++b) body(b, B == 1);
    return;
  }
  std::exception_ptr error;
  std::mutex error_mutex;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t b = 0; b < B; ++b) {
    try {
      body(b, false);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace mob::cpu
