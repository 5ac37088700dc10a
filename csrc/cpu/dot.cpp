// Implementations of dot.h: an AVX-512 register-tiled kernel (chosen at run time) and a portable fallback.
#include "cpu/dot.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace mob::cpu {
namespace {

// ---- portable: 16 independent float32 partial sums per dot product so the compiler can vectorise the d loop --------
template <class Load>
float dot_portable(const void* a, const void* b, int64_t d, Load load) {
  float acc[16] = {};
  int64_t c = 0;
  for (; c + 16 <= d; c += 16)
    for (int l = 0; l < 16; ++l) acc[l] += load(a, c + l) * load(b, c + l);
  for (; c < d; ++c) acc[0] += load(a, c) * load(b, c);
  float s = 0.f;
  for (int l = 0; l < 16; ++l) s += acc[l];
  return s;
}

void dot_tile_portable(DType t, const void* const* a, int64_t na, const void* const* b, int64_t nb, int64_t d,
                       float* out, int64_t ld) {
  for (int64_t r = 0; r < na; ++r)
    for (int64_t c = 0; c < nb; ++c) {
      float v;
      if (t == DType::kFloat32)
        v = dot_portable(a[r], b[c], d, [](const void* p, int64_t i) { return static_cast<const float*>(p)[i]; });
      else if (t == DType::kBFloat16)
        v = dot_portable(a[r], b[c], d,
                         [](const void* p, int64_t i) { return bf16_to_float(static_cast<const uint16_t*>(p)[i]); });
      else
        v = dot_portable(a[r], b[c], d,
                         [](const void* p, int64_t i) { return f16_to_float(static_cast<const uint16_t*>(p)[i]); });
      out[r * ld + c] = v;
    }
}

// ---- AVX-512: MR x NR dot products per pass over d, MR*NR accumulators in zmm registers ------------------------------
#define MOB_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,f16c,fma")))

// One step of 16 (float32 / float16) elements: load as float32 lanes.
MOB_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
MOB_AVX512 inline __m512 load16(const uint16_t* p, __mmask16 m) {  // float16
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
struct Bf16 {  // bfloat16 storage: sizeof must be 2 for the row pointer arithmetic
  uint16_t bits;
};
MOB_AVX512 inline __m512 load16(const Bf16* p, __mmask16 m) {  // bfloat16: the high half of a float32
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, reinterpret_cast<const uint16_t*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// The accumulator block of one register tile: cleared before the pass over d, summed lane-wise into out after it
// (added to what out holds when add is set). Always inlined so the block stays in registers.
#define MOB_TILE_HELPER MOB_AVX512 inline __attribute__((always_inline))
template <int MR, int NR>
MOB_TILE_HELPER void zero_tile(__m512 (&acc)[MR][NR]) {
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 8
    for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_setzero_ps();
}
template <int MR, int NR>
MOB_TILE_HELPER void store_tile(const __m512 (&acc)[MR][NR], float* out, int64_t ld, bool add) {
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 8
    for (int c = 0; c < NR; ++c) out[r * ld + c] = (add ? out[r * ld + c] : 0.f) + _mm512_reduce_add_ps(acc[r][c]);
}

template <int MR, int NR, class T>
MOB_AVX512 void tile_fma(const void* const* a, const void* const* b, int64_t off, int64_t d, float* out, int64_t ld,
                         bool add) {
  __m512 acc[MR][NR];
  zero_tile<MR, NR>(acc);
  for (int64_t i = off; i < d; i += 16) {
    const __mmask16 m = d - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (d - i)) - 1u);
    __m512 av[MR];
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) av[r] = load16(static_cast<const T*>(a[r]) + i, m);
    #pragma GCC unroll 8
    for (int c = 0; c < NR; ++c) {
      const __m512 bv = load16(static_cast<const T*>(b[c]) + i, m);
      #pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) acc[r][c] = _mm512_fmadd_ps(av[r], bv, acc[r][c]);
    }
  }
  store_tile<MR, NR>(acc, out, ld, add);
}

// bfloat16 pairs: vdpbf16ps multiplies 32 bf16 pairs exactly and accumulates in float32.
template <int MR, int NR>
MOB_AVX512 void tile_bf16(const void* const* a, const void* const* b, int64_t off, int64_t d, float* out, int64_t ld,
                          bool add) {
  __m512 acc[MR][NR];
  zero_tile<MR, NR>(acc);
  for (int64_t i = off; i < d; i += 32) {
    const __mmask32 m = d - i >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << (d - i)) - 1u);
    __m512bh av[MR];
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
      av[r] = (__m512bh)_mm512_maskz_loadu_epi16(m, static_cast<const uint16_t*>(a[r]) + i);
    #pragma GCC unroll 8
    for (int c = 0; c < NR; ++c) {
      const __m512bh bv = (__m512bh)_mm512_maskz_loadu_epi16(m, static_cast<const uint16_t*>(b[c]) + i);
      #pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], av[r], bv);
    }
  }
  store_tile<MR, NR>(acc, out, ld, add);
}

// Dot products over elements [off, d) of each row; add = accumulate into out instead of overwriting.
using TileFn = void (*)(const void* const*, const void* const*, int64_t, int64_t, float*, int64_t, bool);

template <int MR, int NR>
TileFn pick_tile(DType t, bool bf16_dot) {
  if (t == DType::kFloat32) return tile_fma<MR, NR, float>;
  if (t == DType::kFloat16) return tile_fma<MR, NR, uint16_t>;
  return bf16_dot ? tile_bf16<MR, NR> : tile_fma<MR, NR, Bf16>;
}

// Register tile 4 x 6: 24 accumulators + 4 row operands + 1 column operand fit in the 32 zmm registers.
constexpr int MR = 4, NR = 6;
constexpr int64_t kChunk = 1024;

struct Isa {
  bool avx512 = false, bf16 = false;
  Isa() {
    __builtin_cpu_init();
    avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
    // MOB_CPU_ISA=portable|avx512 narrows the choice (tests run every implementation on one machine).
    const char* want = std::getenv("MOB_CPU_ISA");
    if (want && std::strcmp(want, "portable") == 0) avx512 = bf16 = false;
    if (want && std::strcmp(want, "avx512") == 0) bf16 = false;
  }
};
const Isa& isa() {
  static const Isa i;
  return i;
}

// Edge tiles dispatch on the actual block size so every call does exactly na x nb dots.
template <int R, int C>
TileFn edge(DType t, bool bf, int64_t nr, int64_t nc) {
  if constexpr (R > 1) {
    if (nr < R) return edge<R - 1, C>(t, bf, nr, nc);
  }
  if constexpr (C > 1) {
    if (nc < C) return edge<R, C - 1>(t, bf, nr, nc);
  }
  return pick_tile<R, C>(t, bf);
}

}  // namespace

void dot_tile(DType t, const void* const* a, int64_t na, const void* const* b, int64_t nb, int64_t d, float* out,
              int64_t ld) {
  if (na <= 0 || nb <= 0) return;
  if (d <= 0) {
    for (int64_t r = 0; r < na; ++r) std::fill(out + r * ld, out + r * ld + nb, 0.f);
    return;
  }
  if (!isa().avx512) return dot_tile_portable(t, a, na, b, nb, d, out, ld);
  const bool bf = isa().bf16;
  // d in chunks of kChunk elements: the a and b rows of one chunk stay in L1/L2 while all tiles pass over them.
  for (int64_t off = 0; off < d; off += kChunk) {
    const int64_t end = std::min(d, off + kChunk);
    for (int64_t r = 0; r < na; r += MR) {
      const int64_t nr = std::min<int64_t>(MR, na - r);
      for (int64_t c = 0; c < nb; c += NR) {
        const int64_t nc = std::min<int64_t>(NR, nb - c);
        const TileFn tile = nr == MR && nc == NR ? pick_tile<MR, NR>(t, bf) : edge<MR, NR>(t, bf, nr, nc);
        tile(a + r, b + c, off, end, out + r * ld + c, ld, off > 0);
      }
    }
  }
}

const char* dot_isa() {
  if (!isa().avx512) return "portable";
  return isa().bf16 ? "avx512-bf16" : "avx512";
}

}  // namespace mob::cpu
