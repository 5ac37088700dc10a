// Helpers shared by the CPU kernels: SPEC.md's ordering rules and per-sample row access.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/dot.h"
#include "mob.h"

namespace mob::cpu {

constexpr float kEps = 1e-12f;
// Multiply-adds below which a loop stays on one thread (~25 us of work): a top-level OpenMP fork/join costs ~1 us.
constexpr int64_t kParallelWork = int64_t{1} << 20;

// "Largest, ties to the lower index" (SPEC §2): a ranks before b.
inline bool ranks_before(float a, int64_t ia, float b, int64_t ib) { return a > b || (a == b && ia < ib); }

// min() that keeps a NaN once it appears, as torch.minimum does.
inline float nan_min(float cur, float x) {
  if (std::isnan(cur)) return cur;
  return (std::isnan(x) || x < cur) ? x : cur;
}

// The m best finite entries of x[0..n) by (value desc, index asc), written in that order to out; returns how many
// (fewer than m when fewer entries are finite). Non-finite entries never count.
int64_t top_finite(const float* x, int64_t n, int64_t m, int64_t* out);

// Pointers to the n rows of sample b.
inline std::vector<const void*> rows_of(const Features& f, int64_t b, int64_t n) {
  std::vector<const void*> r(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) r[static_cast<size_t>(i)] = row_ptr(f, b, i);
  return r;
}

// 1 / max(||row||, eps) for each row, and the raw norms.
void inverse_norms(DType t, const std::vector<const void*>& rows, int64_t d, float* norm, float* inv, bool parallel);

// Raw norms and 1 / max(norm, eps) of one sample's visual rows, computed once and shared by cover and FPS.
struct VisRows {
  std::vector<const void*> rows;
  std::vector<float> norm, inv;
  VisRows(const Features& vis, int64_t b, int64_t N, int64_t d, bool parallel) : rows(rows_of(vis, b, N)), norm(N), inv(N) {
    inverse_norms(vis.dtype, rows, d, norm.data(), inv.data(), parallel);
  }
};

// Per-sample parts, so select_cpu can run cover and FPS back to back on one sample.
// prompt_cover_sample: picks[0..k_p) (-1 padded), returns the count. f is the sample's resolved neighbour count.
int64_t prompt_cover_sample(int64_t b, int64_t N, int64_t L, int64_t d, const Features& vis, const VisRows& v,
                            const Features& prompt, const bool* mask, int64_t k_p, int64_t f, int64_t* picks,
                            bool parallel);
// fps_sample: out[0..k) in selection order, -1 padded.
void fps_sample(int64_t N, int64_t d, DType dtype, const VisRows& v, const int64_t* seed, int64_t m, int64_t num_picks,
                int64_t k, int64_t* out, bool parallel);

// Throws std::invalid_argument unless 0 <= k_p <= k <= N and sizes >= 0: a direct caller of the extension can then
// never make a kernel index out of bounds.
void check_sizes(int64_t B, int64_t N, int64_t L, int64_t d, int64_t k_p, int64_t k);
// Throws std::invalid_argument unless 0 <= f <= N.
void check_fold(int64_t f, int64_t N);

}  // namespace mob::cpu

#include "cpu/parallel.h"
