// Index and memory-layout arithmetic of the CUDA backend, kept free of CUDA headers so that the host compiler builds it
// too: the bindings expose it (the workspace query) and csrc/cuda/tests/layout_test.cpp checks it without a GPU.
//
//   * CudaOp / CudaOptions: the workspace query's op codes and the option bits every entry point takes;
//   * Gram tiling: kTile x kTile output tiles; a sample's prompt-similarity tiles come first, then the upper triangle
//     of its Gram matrix in row-major order (triangle_tile inverts that numbering);
//   * workspace_layout: the byte offsets of every scratch region of one call, for `chunk` samples at a time (the batch
//     is processed in chunks so that the per-sample N x N Gram matrices stay under kGramBudgetBytes);
//   * the dynamic shared-memory layouts of the per-sample kernels (FPS / prompt-cover picks, greedy DPP).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define MOB_HD __host__ __device__
#else
#define MOB_HD
#endif

namespace mob {

// Op codes of cuda_workspace_bytes (exposed to Python as mob_kernels._C.CudaOp).
enum class CudaOp : int {
  kGram = 0,
  kPromptCover = 1,
  kFarthestPointSample = 2,
  kSelect = 3,
  kDppGreedy = 4,
};

// Bits of the `options` argument of every CUDA entry point.
enum CudaOptions : int64_t {
  kCudaForceGlobalWorkspace = 1,  // per-sample arrays in the global workspace even where shared memory would fit
  kCudaRowsOnDemand = 2,          // no Gram matrix: similarity rows computed from the features when needed
};
constexpr int64_t kCudaKnownOptions = kCudaForceGlobalWorkspace | kCudaRowsOnDemand;

namespace gpu {

constexpr int kTile = 64;                                // Gram output tile edge
constexpr int64_t kGramBudgetBytes = int64_t(1) << 30;   // workspace Gram matrices (and prompt similarities) per chunk
constexpr int kRowThreadsMax = 512;                      // per-sample kernels: threads per block at most

MOB_HD inline int64_t tiles(int64_t n) { return (n + kTile - 1) / kTile; }
MOB_HD inline int64_t triangle_tiles(int64_t t) { return t * (t + 1) / 2; }

// The u-th tile (I, J), I <= J, of the upper triangle of a t x t tile grid, numbered row by row. A loop rather than a
// square root: exact for any t, and at most t (<= 256 within the Gram budget) cheap steps per block.
MOB_HD inline void triangle_tile(int64_t u, int64_t t, int64_t& I, int64_t& J) {
  int64_t i = 0;
  while (u >= t - i) {
    u -= t - i;
    ++i;
  }
  I = i;
  J = i + u;
}

// Threads per block of the per-sample kernels: one token per thread up to kRowThreadsMax, whole warps, at least two.
MOB_HD inline int row_threads(int64_t n) {
  const int64_t w = (n + 31) / 32 * 32;
  return static_cast<int>(w < 64 ? 64 : (w > kRowThreadsMax ? kRowThreadsMax : w));
}

// Which elements of an mma.sync tile a lane holds (PTX ISA, "Matrix Fragments for mma.m16n8k16 / mma.m16n8k8"),
// as the Gram kernel addresses them. 16-bit inputs (m16n8k16): A register r (0..3) holds the pair at row
// a16_row(lane, r), columns a16_col(lane, r) + {0, 1}; B register r (0..1) the pair at k = b16_k(lane, r) + {0, 1},
// column b_n(lane). TF32 (m16n8k8): A register r holds (a32_row, a32_col); B register r holds (b32_k, b_n). The float
// accumulator element e (0..3) of both is at (c_row(lane, e), c_col(lane, e)).
MOB_HD inline int a16_row(int lane, int r) { return (lane >> 2) + 8 * (r & 1); }
MOB_HD inline int a16_col(int lane, int r) { return 2 * (lane & 3) + 8 * (r >> 1); }
MOB_HD inline int b16_k(int lane, int r) { return 2 * (lane & 3) + 8 * r; }
MOB_HD inline int a32_row(int lane, int r) { return (lane >> 2) + 8 * (r & 1); }
MOB_HD inline int a32_col(int lane, int r) { return (lane & 3) + 4 * (r >> 1); }
MOB_HD inline int b32_k(int lane, int r) { return (lane & 3) + 4 * r; }
MOB_HD inline int b_n(int lane) { return lane >> 2; }
MOB_HD inline int c_row(int lane, int e) { return (lane >> 2) + 8 * (e >> 1); }
MOB_HD inline int c_col(int lane, int e) { return 2 * (lane & 3) + (e & 1); }

// The Gram kernel's 4 warps split a tile 2 x 2; warp w computes rows warp_row0(w) + [0, 32) and columns
// warp_col0(w) + [0, 32) as 2 x 4 m16n8 tiles (mi, ni).
MOB_HD inline int warp_row0(int warp) { return (warp >> 1) * 32; }
MOB_HD inline int warp_col0(int warp) { return (warp & 1) * 32; }

inline int64_t align16(int64_t x) { return (x + 15) / 16 * 16; }

// a * b * c * elem bytes, or -1 on int64 overflow (any negative factor also gives -1).
inline int64_t region_bytes(int64_t a, int64_t b, int64_t c, int64_t elem) {
  if (a < 0 || b < 0 || c < 0 || elem < 0) return -1;
  int64_t n = 0;
  if (__builtin_mul_overflow(a, b, &n) || __builtin_mul_overflow(n, c, &n) || __builtin_mul_overflow(n, elem, &n))
    return -1;
  return n;
}

// Byte offsets into the caller's workspace, each region 256-byte aligned; -1 where the op does not use a region.
// Regions hold `chunk` samples (sample s of a chunk at s * its per-sample size).
struct Layout {
  int64_t chunk = 0;   // samples per pass over the batch
  bool gram = false;   // the Gram matrices live in the workspace (else: the caller's, or rows computed on demand)
  bool rows_on_demand = false;  // similarity rows computed from the features, one at a time, into `row`
  int64_t norm = -1;   // f32 [chunk, N] raw feature norms (largest-norm first pick)
  int64_t scale = -1;  // f32 [chunk, N] inverse norms (NaN for rows with a non-finite entry)
  int64_t sim = -1;    // f32 [chunk, L, N] prompt x vis cosine similarities
  int64_t cover = -1;  // f32 [chunk, N] covering scores (-inf: no candidate)
  int64_t gram_at = -1;  // f32 [chunk, N, N]
  int64_t picks = -1;  // i64 [chunk, k_p] prompt-cover picks (select)
  int64_t count = -1;  // i64 [chunk] their number (select)
  int64_t keys = -1;   // f32 [chunk, N] candidate keys / FPS distances / DPP gains (global fallback)
  int64_t index = -1;  // i32 [chunk, N] candidate indices (global fallback)
  int64_t off = -1;    // u8  [chunk, N] taken-or-invalid flags (global fallback)
  int64_t row = -1;    // f32 [chunk, N] one similarity row (global fallback, rows on demand)
  int64_t chol = -1;   // f32 [chunk, k, N] Cholesky rows of the greedy DPP (global fallback)
  int64_t total = 0;   // bytes; -1: bad arguments or int64 overflow
};

inline Layout workspace_layout(int op, int64_t B, int64_t N, int64_t L, int64_t k_p, int64_t k, bool has_sim,
                               int64_t options) {
  Layout l;
  if (op < 0 || op > 4 || B < 0 || N < 0 || L < 0 || k_p < 0 || k < 0 || (options & ~kCudaKnownOptions)) {
    l.total = -1;
    return l;
  }
  const CudaOp o = static_cast<CudaOp>(op);
  const bool cover = o == CudaOp::kPromptCover || o == CudaOp::kSelect;
  const bool fps = o == CudaOp::kFarthestPointSample || o == CudaOp::kSelect;
  const bool dpp = o == CudaOp::kDppGreedy;
  const bool reads_rows = fps || dpp;
  const bool caller_gram = o == CudaOp::kFarthestPointSample && has_sim;

  const int64_t nn = region_bytes(N, N, 1, 4);
  if (nn < 0) {
    l.total = -1;
    return l;
  }
  l.gram = reads_rows && !caller_gram && !(options & kCudaRowsOnDemand) && nn <= kGramBudgetBytes;
  l.rows_on_demand = reads_rows && !caller_gram && !l.gram;

  // Chunk: as many samples as keep the big per-sample regions within the budget (at least one).
  const int64_t s_bytes = cover ? region_bytes(L, N, 1, 4) : 0;
  const int64_t c_bytes = dpp ? region_bytes(k, N, 1, 4) : 0;
  if (s_bytes < 0 || c_bytes < 0) {
    l.total = -1;
    return l;
  }
  const int64_t big = s_bytes + (l.gram ? nn : 0) + c_bytes;  // each term < 2^62: no overflow
  l.chunk = B;
  if (big > 0 && B > 0) {
    const int64_t fit = kGramBudgetBytes / big;
    l.chunk = fit < 1 ? 1 : (fit < B ? fit : B);
  }
  if (o == CudaOp::kGram) return l;  // writes straight into the caller's output: no workspace

  const int64_t c = l.chunk;
  bool bad = false;
  auto take = [&](int64_t& at, int64_t a, int64_t b2, int64_t elem) {
    const int64_t n = region_bytes(c, a, b2, elem);
    if (n < 0 || bad || l.total > (INT64_MAX / 2) - n) {
      bad = true;
      return;
    }
    at = l.total;
    l.total += (n + 255) / 256 * 256;
  };
  if (reads_rows) {
    take(l.norm, N, 1, 4);
    take(l.scale, N, 1, 4);
  }
  if (cover) {
    take(l.sim, L, N, 4);
    take(l.cover, N, 1, 4);
  }
  if (l.gram) take(l.gram_at, N, N, 4);
  if (o == CudaOp::kSelect) {
    take(l.picks, k_p, 1, 8);
    take(l.count, 1, 1, 8);
  }
  take(l.keys, N, 1, 4);
  if (cover) take(l.index, N, 1, 4);
  if (fps) take(l.off, N, 1, 1);
  if (l.rows_on_demand) take(l.row, N, 1, 4);
  if (dpp) take(l.chol, k, N, 4);
  if (bad) l.total = -1;
  return l;
}

// Dynamic shared memory of one sample's arrays in the FPS / prompt-cover-picks kernel (byte offsets, 16-aligned):
// keys f32[N] (candidate keys, then FPS distances), index i32[N] (candidate indices; prompt-cover picks only),
// row f32[N] (rows on demand only), off u8[N] (FPS only). -1 where absent.
struct FpsShared {
  int64_t keys = 0, index = -1, row = -1, off = -1, bytes = 0;
};

inline FpsShared fps_shared_layout(int64_t N, bool with_index, bool with_row, bool with_off) {
  FpsShared s;
  int64_t at = align16(4 * N);
  if (with_index) {
    s.index = at;
    at += align16(4 * N);
  }
  if (with_row) {
    s.row = at;
    at += align16(4 * N);
  }
  if (with_off) {
    s.off = at;
    at += align16(N);
  }
  s.bytes = at;
  return s;
}

// Dynamic shared memory of one sample's arrays in the greedy-DPP kernel: gains f32[N], row f32[N] (rows on demand
// only), Cholesky rows f32[k, N].
struct DppShared {
  int64_t gain = 0, row = -1, chol = 0, bytes = 0;
};

inline DppShared dpp_shared_layout(int64_t N, int64_t k, bool with_row) {
  DppShared s;
  int64_t at = align16(4 * N);
  if (with_row) {
    s.row = at;
    at += align16(4 * N);
  }
  s.chol = at;
  const int64_t chol = region_bytes(k, N, 1, 4);
  s.bytes = chol < 0 ? -1 : at + align16(chol);
  return s;
}

}  // namespace gpu
}  // namespace mob
