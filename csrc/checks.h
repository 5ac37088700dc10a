// The one argument check of the C++ entry points (CPU and CUDA): sizes, budgets and data pointers.
//
// Python checks every argument first (mob_kernels/checks.py); this repeats what the kernels' memory safety rests on,
// so that a direct caller of mob_kernels._C can never make a kernel read or write out of bounds or dereference null.
// Returns "" when the call is sound, else a message naming the argument (the CPU bindings raise it as ValueError; the
// CUDA launchers return it to their binding, which does the same).
#pragma once
#include <cstdint>
#include <initializer_list>
#include <string>

namespace mob {

struct Sizes {
  int64_t B = 0, N = 0, L = 0, d = 0;
  int64_t k_p = 0;  // must be in [0, k]
  int64_t k = 0;    // must be in [0, N]
  bool square = false;  // the call reads or writes an N x N matrix per sample (a Gram matrix)
};

// The product of dims as int64, or -1 when a factor is negative or the product overflows int64: element counts and
// offsets derived from sizes that pass check_sizes can then never wrap.
inline int64_t element_count(std::initializer_list<int64_t> dims) {
  int64_t n = 1;
  for (int64_t x : dims)
    if (x < 0 || __builtin_mul_overflow(n, x, &n)) return -1;
  return n;
}

inline std::string check_sizes(const Sizes& s) {
  if (s.B < 0 || s.N < 0 || s.L < 0 || s.d < 0)
    return "sizes must be >= 0, got B=" + std::to_string(s.B) + " N=" + std::to_string(s.N) +
           " L=" + std::to_string(s.L) + " d=" + std::to_string(s.d);
  // Every element count (and so every offset) must fit int64.
  if (element_count({s.B, s.N, s.d}) < 0 || element_count({s.B, s.L, s.d}) < 0 || element_count({s.B, s.N}) < 0 ||
      element_count({s.B, s.L}) < 0 || (s.square && element_count({s.B, s.N, s.N}) < 0))
    return "sizes overflow int64 element counts, got B=" + std::to_string(s.B) + " N=" + std::to_string(s.N) +
           " L=" + std::to_string(s.L) + " d=" + std::to_string(s.d);
  if (s.k < 0 || s.k > s.N)
    return "k must be in [0, N], got k=" + std::to_string(s.k) + " with N=" + std::to_string(s.N);
  if (s.k_p < 0 || s.k_p > s.k)
    return "k_p must be in [0, k], got k_p=" + std::to_string(s.k_p) + " with k=" + std::to_string(s.k);
  return "";
}

// A buffer of `count` elements the kernels will read or write must not be null (an empty one may be).
inline std::string check_pointer(const char* name, const void* p, int64_t count) {
  if (count > 0 && p == nullptr) return std::string(name) + " must not be a null pointer (it holds " +
                                        std::to_string(count) + " elements)";
  return "";
}

}  // namespace mob
