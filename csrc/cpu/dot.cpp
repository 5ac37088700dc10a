// Implementations of dot.h: register-tiled AVX-512 and AVX2 + FMA kernels (x86-64, chosen at run time) and a portable
// fallback written for the auto-vectoriser (SSE2 on baseline x86-64, NEON on aarch64).
#include "cpu/dot.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#define MOB_X86 1
#include <immintrin.h>
#else
#define MOB_X86 0
#endif

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

// Dot products of rows a[r] + a_off and b[c] + b_off over len elements (offsets in elements); add = accumulate into
// out instead of overwriting.
using TileFn = void (*)(const void* const*, int64_t, const void* const*, int64_t, int64_t, float*, int64_t, bool);

struct Bf16 {  // bfloat16 storage: sizeof must be 2 for the row pointer arithmetic
  uint16_t bits;
};

// d in chunks of kChunk elements: the rows of one chunk stay in L1/L2 while all tiles of the block pass over them.
constexpr int64_t kChunk = 1024;

// Up to kPackRows rows of b are copied, one chunk at a time, into a per-thread buffer whose row stride is not a
// multiple of 4 KiB. Feature rows with a power-of-two size (d = 4096 float32: 16 KiB apart) map to a handful of cache
// sets, so a block of them evicts itself from L1 and L2 while the tile rows stream past it; packed, it stays. The copy
// holds the same values (as float32 for a kernel that would otherwise convert each 16-bit load: exact), so every dot
// product is bit for bit what it is without packing.
constexpr int64_t kPackRows = 48;
constexpr int64_t kPackStride = kChunk + 32;  // elements: 64 bytes past the chunk even for 2-byte types
alignas(64) thread_local unsigned char pack_buffer[kPackRows * kPackStride * 4];

// The driver shared by the register-tiled kernels: Kernel::MR x Kernel::NR tiles over the na x nb block, edge tiles
// dispatched on the actual block size so every call does exactly na x nb dots. Each dot product is the sum over the
// chunks, in order, of each chunk's lane-wise partial sums: the same whatever the tile and block it is computed in.
template <class Kernel, int R, int C>
TileFn edge_tile(DType t, bool bf, bool b_float, int64_t nr, int64_t nc) {
  if constexpr (R > 1) {
    if (nr < R) return edge_tile<Kernel, R - 1, C>(t, bf, b_float, nr, nc);
  }
  if constexpr (C > 1) {
    if (nc < C) return edge_tile<Kernel, R, C - 1>(t, bf, b_float, nr, nc);
  }
  return Kernel::template pick<R, C>(t, bf, b_float);
}

template <class Kernel>
void dot_tile_tiled(DType t, bool bf, const void* const* a, int64_t na, const void* const* b, int64_t nb, int64_t d,
                    float* out, int64_t ld) {
  constexpr int MR = Kernel::MR, NR = Kernel::NR;
  const int64_t elem = t == DType::kFloat32 ? 4 : 2;
  // Packing pays when several tile rows pass over the block.
  const bool pack = na >= 2 * MR && nb >= 2 * NR;
  const bool b_float = pack && Kernel::kPackFloat && t != DType::kFloat32;
  const void* packed[kPackRows];
  for (int64_t off = 0; off < d; off += kChunk) {
    const int64_t len = std::min(d, off + kChunk) - off;
    for (int64_t c0 = 0; c0 < nb; c0 += kPackRows) {
      const int64_t ncb = std::min(kPackRows, nb - c0);
      const void* const* bb = b + c0;
      int64_t b_off = off;
      if (pack) {
        for (int64_t c = 0; c < ncb; ++c) {
          if (b_float) {  // a kernel that converts as it loads does it once here instead of once per tile row
            float* dst = reinterpret_cast<float*>(pack_buffer) + c * kPackStride;
            Kernel::to_float(t, b[c0 + c], off, len, dst);
            packed[c] = dst;
          } else {
            unsigned char* dst = pack_buffer + c * kPackStride * elem;
            const unsigned char* src = static_cast<const unsigned char*>(b[c0 + c]) + off * elem;
            std::memcpy(dst, src, static_cast<size_t>(len * elem));
            packed[c] = dst;
          }
        }
        bb = packed;
        b_off = 0;
      }
      for (int64_t r = 0; r < na; r += MR) {
        const int64_t nr = std::min<int64_t>(MR, na - r);
        for (int64_t c = 0; c < ncb; c += NR) {
          const int64_t nc = std::min<int64_t>(NR, ncb - c);
          const TileFn tile =
              nr == MR && nc == NR ? Kernel::template pick<MR, NR>(t, bf, b_float)
                                   : edge_tile<Kernel, MR, NR>(t, bf, b_float, nr, nc);
          tile(a + r, off, bb + c, b_off, len, out + r * ld + c0 + c, ld, off > 0);
        }
      }
    }
  }
}

#if MOB_X86
// ---- AVX-512: MR x NR dot products per pass over d, MR*NR accumulators in zmm registers ------------------------------
#define MOB_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,f16c,fma")))

// One step of 16 (float32 / float16) elements: load as float32 lanes.
MOB_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
MOB_AVX512 inline __m512 load16(const uint16_t* p, __mmask16 m) {  // float16
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
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
MOB_AVX512 void tile_fma(const void* const* a, int64_t a_off, const void* const* b, int64_t b_off, int64_t len,
                         float* out, int64_t ld, bool add) {
  __m512 acc[MR][NR];
  zero_tile<MR, NR>(acc);
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 m = len - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (len - i)) - 1u);
    __m512 av[MR];
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) av[r] = load16(static_cast<const T*>(a[r]) + a_off + i, m);
    #pragma GCC unroll 8
    for (int c = 0; c < NR; ++c) {
      const __m512 bv = load16(static_cast<const T*>(b[c]) + b_off + i, m);
      #pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) acc[r][c] = _mm512_fmadd_ps(av[r], bv, acc[r][c]);
    }
  }
  store_tile<MR, NR>(acc, out, ld, add);
}

// bfloat16 pairs: vdpbf16ps multiplies 32 bf16 pairs exactly and accumulates in float32.
template <int MR, int NR>
MOB_AVX512 void tile_bf16(const void* const* a, int64_t a_off, const void* const* b, int64_t b_off, int64_t len,
                          float* out, int64_t ld, bool add) {
  __m512 acc[MR][NR];
  zero_tile<MR, NR>(acc);
  for (int64_t i = 0; i < len; i += 32) {
    const __mmask32 m = len - i >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << (len - i)) - 1u);
    __m512bh av[MR];
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
      av[r] = (__m512bh)_mm512_maskz_loadu_epi16(m, static_cast<const uint16_t*>(a[r]) + a_off + i);
    #pragma GCC unroll 8
    for (int c = 0; c < NR; ++c) {
      const __m512bh bv = (__m512bh)_mm512_maskz_loadu_epi16(m, static_cast<const uint16_t*>(b[c]) + b_off + i);
      #pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], av[r], bv);
    }
  }
  store_tile<MR, NR>(acc, out, ld, add);
}

// Squared norm of one row: four independent accumulator chains, so the FMA latency does not bound it.
template <class T>
MOB_AVX512 float sq_norm_avx512(const void* row, int64_t d) {
  const T* p = static_cast<const T*>(row);
  __m512 s[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t i = 0;
  for (; i + 64 <= d; i += 64)
    #pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const __m512 x = load16(p + i + 16 * u, __mmask16(0xffff));
      s[u] = _mm512_fmadd_ps(x, x, s[u]);
    }
  for (; i < d; i += 16) {
    const __m512 x = load16(p + i, d - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (d - i)) - 1u));
    s[0] = _mm512_fmadd_ps(x, x, s[0]);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3])));
}

// Register tile 4 x 6: 24 accumulators + 4 row operands + 1 column operand fit in the 32 zmm registers.
struct Avx512Kernel {
  static constexpr int MR = 4, NR = 6;
  static constexpr bool kPackFloat = false;  // vdpbf16ps reads bfloat16 pairs; masked loads convert at full speed
  static void to_float(DType, const void*, int64_t, int64_t, float*) {}
  template <int R, int C>
  static TileFn pick(DType t, bool bf16_dot, bool) {
    if (t == DType::kFloat32) return tile_fma<R, C, float>;
    if (t == DType::kFloat16) return tile_fma<R, C, uint16_t>;
    return bf16_dot ? tile_bf16<R, C> : tile_fma<R, C, Bf16>;
  }
};

// ---- AVX2 + FMA: the same scheme on 8-lane ymm registers (Zen 2/3, Haswell and later without AVX-512) --------------
#define MOB_AVX2 __attribute__((target("avx2,fma,f16c")))
#define MOB_AVX2_HELPER MOB_AVX2 inline __attribute__((always_inline))

// Eight elements as float32 lanes. float16 through F16C; bfloat16 is the high half of a float32, so zero-extending
// each 16-bit value to 32 bits and shifting it up 16 is the exact conversion.
MOB_AVX2_HELPER __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
MOB_AVX2_HELPER __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
MOB_AVX2_HELPER __m256 load8(const Bf16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
// The last n < 8 elements of a row, zero-padded through a stack copy: AVX2 has no masked 16-bit load, and the row
// must never be read past its end.
template <class T>
MOB_AVX2_HELPER __m256 load8_tail(const T* p, int64_t n) {
  T buf[8];
  std::memset(buf, 0, sizeof(buf));
  std::memcpy(buf, p, static_cast<size_t>(n) * sizeof(T));
  return load8(buf);
}

MOB_AVX2_HELPER float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One step: the NR column operands are loaded first and each row operand is consumed as soon as it is loaded, so a
// 4 x 3 tile needs 12 accumulators + 3 column operands + 1 row operand: exactly the 16 ymm registers.
// TA / TB: the element types of the two sides (TB is float32 when the driver packed b converted).
template <int MR, int NR, class TA, class TB, bool kTail>
MOB_AVX2_HELPER void avx2_step(__m256 (&acc)[MR][NR], const void* const* a, int64_t ai, const void* const* b,
                               int64_t bi, int64_t n) {
  __m256 bv[NR];
  #pragma GCC unroll 8
  for (int c = 0; c < NR; ++c)
    bv[c] = kTail ? load8_tail(static_cast<const TB*>(b[c]) + bi, n) : load8(static_cast<const TB*>(b[c]) + bi);
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const __m256 av =
        kTail ? load8_tail(static_cast<const TA*>(a[r]) + ai, n) : load8(static_cast<const TA*>(a[r]) + ai);
    #pragma GCC unroll 8
    for (int c = 0; c < NR; ++c) acc[r][c] = _mm256_fmadd_ps(av, bv[c], acc[r][c]);
  }
}

template <int MR, int NR, class TA, class TB>
MOB_AVX2 void tile_avx2(const void* const* a, int64_t a_off, const void* const* b, int64_t b_off, int64_t len,
                        float* out, int64_t ld, bool add) {
  __m256 acc[MR][NR];
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 8
    for (int c = 0; c < NR; ++c) acc[r][c] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) avx2_step<MR, NR, TA, TB, false>(acc, a, a_off + i, b, b_off + i, 8);
  if (i < len) avx2_step<MR, NR, TA, TB, true>(acc, a, a_off + i, b, b_off + i, len - i);
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 8
    for (int c = 0; c < NR; ++c) out[r * ld + c] = (add ? out[r * ld + c] : 0.f) + hsum8(acc[r][c]);
}

// Squared norm of one row: four independent accumulator chains, so the FMA latency does not bound it.
template <class T>
MOB_AVX2 float sq_norm_avx2(const void* row, int64_t d) {
  const T* p = static_cast<const T*>(row);
  __m256 s[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= d; i += 32)
    #pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const __m256 x = load8(p + i + 8 * u);
      s[u] = _mm256_fmadd_ps(x, x, s[u]);
    }
  for (; i + 8 <= d; i += 8) {
    const __m256 x = load8(p + i);
    s[0] = _mm256_fmadd_ps(x, x, s[0]);
  }
  if (i < d) {
    const __m256 x = load8_tail(p + i, d - i);
    s[0] = _mm256_fmadd_ps(x, x, s[0]);
  }
  return hsum8(_mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3])));
}

template <class T>
MOB_AVX2 void to_float_avx2(const void* row, int64_t off, int64_t len, float* dst) {
  const T* src = static_cast<const T*>(row) + off;
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) _mm256_storeu_ps(dst + i, load8(src + i));
  for (; i < len; ++i) _mm_store_ss(dst + i, _mm256_castps256_ps128(load8_tail(src + i, 1)));
}

struct Avx2Kernel {
  static constexpr int MR = 4, NR = 3;  // MR = 4 matches the 4-row groups the FPS refreshes and seeds use
  // float16 and bfloat16 cost two extra instructions per load on AVX2 (they compete with the FMAs): a packed block of
  // b is converted once (exactly) and read as float32 by every tile row that passes over it.
  static constexpr bool kPackFloat = true;
  static void to_float(DType t, const void* row, int64_t off, int64_t len, float* dst) {
    if (t == DType::kFloat16) return to_float_avx2<uint16_t>(row, off, len, dst);
    to_float_avx2<Bf16>(row, off, len, dst);
  }
  template <int R, int C>
  static TileFn pick(DType t, bool, bool b_float) {
    if (t == DType::kFloat32) return tile_avx2<R, C, float, float>;
    if (t == DType::kFloat16) return b_float ? tile_avx2<R, C, uint16_t, float> : tile_avx2<R, C, uint16_t, uint16_t>;
    return b_float ? tile_avx2<R, C, Bf16, float> : tile_avx2<R, C, Bf16, Bf16>;
  }
};
#endif  // MOB_X86

// ---- which implementation runs ------------------------------------------------------------------------------------
enum Level : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
constexpr const char* kLevelNames[] = {"portable", "avx2", "avx512", "avx512-bf16"};

// The best level this CPU runs (and this build contains).
Level best_level() {
#if MOB_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  if (avx512 && __builtin_cpu_supports("avx512bf16")) return kAvx512Bf16;
  if (avx512) return kAvx512;
  if (avx2) return kAvx2;
#endif
  return kPortable;
}

int level_of(const char* name) {  // -1 when the name is unknown
  for (int l = kPortable; l <= kAvx512Bf16; ++l)
    if (std::strcmp(name, kLevelNames[l]) == 0) return l;
  return -1;
}

// The level in use: the best the CPU has, narrowed by MOB_CPU_ISA at the first use in a process (tests run every
// implementation on one machine), and by set_dot_isa at any time after. Atomic so a change is seen by every thread;
// each dot_tile call reads it once.
std::atomic<int>& current_level() {
  static std::atomic<int> level = [] {
    int l = best_level();
    const char* want = std::getenv("MOB_CPU_ISA");
    if (want && level_of(want) >= 0) l = std::min(l, level_of(want));
    return l;
  }();
  return level;
}

}  // namespace

void dot_tile(DType t, const void* const* a, int64_t na, const void* const* b, int64_t nb, int64_t d, float* out,
              int64_t ld) {
  if (na <= 0 || nb <= 0) return;
  if (d <= 0) {
    for (int64_t r = 0; r < na; ++r) std::fill(out + r * ld, out + r * ld + nb, 0.f);
    return;
  }
  const int level = current_level().load(std::memory_order_relaxed);
#if MOB_X86
  if (level >= kAvx512) return dot_tile_tiled<Avx512Kernel>(t, level == kAvx512Bf16, a, na, b, nb, d, out, ld);
  if (level == kAvx2) return dot_tile_tiled<Avx2Kernel>(t, false, a, na, b, nb, d, out, ld);
#else
  (void)level;
#endif
  dot_tile_portable(t, a, na, b, nb, d, out, ld);
}

void squared_norms(DType t, const void* const* rows, int64_t n, int64_t d, float* out) {
  const int level = current_level().load(std::memory_order_relaxed);
  for (int64_t r = 0; r < n; ++r) {
#if MOB_X86
    if (level >= kAvx512) {
      out[r] = t == DType::kFloat32   ? sq_norm_avx512<float>(rows[r], d)
               : t == DType::kFloat16 ? sq_norm_avx512<uint16_t>(rows[r], d)
                                      : sq_norm_avx512<Bf16>(rows[r], d);
      continue;
    }
    if (level == kAvx2) {
      out[r] = t == DType::kFloat32   ? sq_norm_avx2<float>(rows[r], d)
               : t == DType::kFloat16 ? sq_norm_avx2<uint16_t>(rows[r], d)
                                      : sq_norm_avx2<Bf16>(rows[r], d);
      continue;
    }
#else
    (void)level;
#endif
    dot_tile_portable(t, rows + r, 1, rows + r, 1, d, out + r, 1);  // 16 partial sums already
  }
}

const char* dot_isa() { return kLevelNames[current_level().load(std::memory_order_relaxed)]; }

std::vector<std::string> supported_dot_isas() {
  std::vector<std::string> out;
  for (int l = kPortable; l <= best_level(); ++l) out.emplace_back(kLevelNames[l]);
  return out;
}

const char* set_dot_isa(const char* name) {
  const int want = std::strcmp(name, "auto") == 0 ? static_cast<int>(kAvx512Bf16) : level_of(name);
  if (want < 0) return nullptr;
  current_level().store(std::min(want, static_cast<int>(best_level())), std::memory_order_relaxed);
  return dot_isa();
}

}  // namespace mob::cpu
