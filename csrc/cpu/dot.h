// Row dot products in float32 for the CPU backend: the only arithmetic-heavy part of MoB selection.
//
// dot_tile computes a block of dot products a_i . b_j between rows of two feature batches, reading float32, float16
// or bfloat16 and accumulating in float32 (contract §1.2: "all arithmetic is float32"). The raw (unnormalised) rows are
// multiplied and callers divide by the norms afterwards: a product of two bfloat16 or float16 values is exact in
// float32, so this keeps reference-level accuracy while reading each input once, with no converted copy.
//
// Three implementations, chosen at run time on x86-64: AVX-512 (with AVX512-BF16 dot-product instructions for bfloat16
// when the CPU has them), AVX2 + FMA (float16 through F16C), and a portable one written for the auto-vectoriser (the
// only one on other architectures). No row is ever read past its d elements.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "mob.h"

namespace mob::cpu {

inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0x1fu) {
    u = sign | 0x7f800000u | (man << 13);  // inf / NaN
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal half: renormalise
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    u = sign | (static_cast<uint32_t>(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline const void* row_ptr(const Features& f, int64_t b, int64_t i) {
  const int64_t elem = f.dtype == DType::kFloat32 ? 4 : 2;
  return static_cast<const char*>(f.data) + (b * f.batch_stride + i * f.row_stride) * elem;
}

// out[r * ld + c] = dot(a[r], b[c]) for r < na, c < nb (row pointers into features of dtype t, d elements each).
void dot_tile(DType t, const void* const* a, int64_t na, const void* const* b, int64_t nb, int64_t d, float* out,
              int64_t ld);

// out[r] = dot(rows[r], rows[r]) for r < n, for the norms: summed in an order of its own (faster than a 1 x 1 tile),
// so not necessarily dot_tile's value for the same row.
void squared_norms(DType t, const void* const* rows, int64_t n, int64_t d, float* out);

// Which implementation dot_tile uses now: "avx512-bf16", "avx512", "avx2" or "portable". The best one the CPU runs,
// narrowed by the environment variable MOB_CPU_ISA (read at the first use in a process) and by set_dot_isa.
const char* dot_isa();
// The implementations this CPU can run, from "portable" up.
std::vector<std::string> supported_dot_isas();
// Narrows the choice to `name` (or the best the CPU has below it); "auto" restores the best. Returns the name now in
// use, or nullptr for an unknown name. For tests: a call running on another thread may see the change part-way.
const char* set_dot_isa(const char* name);

}  // namespace mob::cpu
