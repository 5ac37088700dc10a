// Helpers shared by the CPU kernels: the contract's ordering rules (docs/contract.md §1.5) and per-sample row access.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

#include "checks.h"
#include "cpu/dot.h"
#include "mob.h"

namespace mob::cpu {

constexpr float kEps = 1e-12f;
// Multiply-adds below which a loop stays on one thread (~25 us of work): a top-level OpenMP fork/join costs ~1 us.
constexpr int64_t kParallelWork = int64_t{1} << 20;

// A rough multiply-add count for the threading decisions: the product, saturating instead of overflowing.
inline int64_t work(std::initializer_list<int64_t> factors) {
  const int64_t n = element_count(factors);
  return n < 0 ? INT64_MAX : n;
}

// "Largest, ties to the lower index" (contract §1.5): a ranks before b.
inline bool ranks_before(float a, int64_t ia, float b, int64_t ib) { return a > b || (a == b && ia < ib); }

// The cosine similarity of tokens i and j from the dot product of their raw rows and inv = 1 / max(|v|, eps), rounded
// the same way whichever order they come in: (dot * inv_a) * inv_b with a = min(i, j). Every CPU kernel that needs a
// similarity between visual tokens (Gram matrix, FPS, DPP, DivPrune) uses this, and a dot product does not depend on
// the register tile it was computed in, so all of them see gram_cpu's values bit for bit.
inline float cosine(float dot, const float* inv, int64_t i, int64_t j) {
  return i < j ? dot * inv[i] * inv[j] : dot * inv[j] * inv[i];
}

// The lazy greedy loops (FPS, DPP) keep their candidates in a std max-heap by (stored key, lower index): a is "less"
// than b when b ranks before a.
struct HeapEntry {
  float key;
  int64_t idx;
};
inline bool heap_less(const HeapEntry& a, const HeapEntry& b) { return ranks_before(b.key, b.idx, a.key, a.idx); }

// min() that keeps a NaN once it appears, as torch.minimum does.
inline float nan_min(float cur, float x) {
  if (std::isnan(cur)) return cur;
  return (std::isnan(x) || x < cur) ? x : cur;
}

// The m best finite entries of x[0..n) by (value desc, index asc), written in that order to out; returns how many
// (fewer than m when fewer entries are finite). Non-finite entries never count.
int64_t top_finite(const float* x, int64_t n, int64_t m, int64_t* out);

// Every feature of the row is finite (no NaN or infinity): exponent bits not all ones.
inline bool finite_row(DType t, const void* row, int64_t d) {
  uint32_t bad = 0;
  if (t == DType::kFloat32) {
    const uint32_t* p = static_cast<const uint32_t*>(row);
    for (int64_t c = 0; c < d; ++c) bad |= (p[c] & 0x7f800000u) == 0x7f800000u;
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(row);
    const uint16_t exp = t == DType::kFloat16 ? 0x7c00u : 0x7f80u;
    for (int64_t c = 0; c < d; ++c) bad |= (p[c] & exp) == exp;
  }
  return bad == 0;
}

// finite_row, given the row's norm: a NaN or an infinity among the features makes it NaN or infinite, so a finite
// norm settles it without reading the row again (an infinite one may be an overflow of finite features).
inline bool finite_row(DType t, const void* row, int64_t d, float norm) {
  return std::isfinite(norm) || finite_row(t, row, d);
}

// Pointers to the n rows of sample b.
inline std::vector<const void*> rows_of(const Features& f, int64_t b, int64_t n) {
  std::vector<const void*> r(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) r[static_cast<size_t>(i)] = row_ptr(f, b, i);
  return r;
}

// 1 / max(||row||, eps) for each row, and the raw norms.
void inverse_norms(DType t, const std::vector<const void*>& rows, int64_t d, float* norm, float* inv, bool parallel);

// Raw norms and 1 / max(norm, eps) of one sample's visual rows, computed once and shared by cover and FPS
// (norms = false: the row pointers only, for a caller that reads a Gram matrix instead).
struct VisRows {
  std::vector<const void*> rows;
  std::vector<float> norm, inv;
  VisRows(const Features& vis, int64_t b, int64_t N, int64_t d, bool parallel, bool norms = true)
      : rows(rows_of(vis, b, N)), norm(norms ? N : 0), inv(norms ? N : 0) {
    if (norms) inverse_norms(vis.dtype, rows, d, norm.data(), inv.data(), parallel);
  }
};

// Similarities of one sample that are already computed, so FPS reads them instead of computing them again. Either the
// whole Gram matrix (slot == nullptr: S[i][c] at rows[c * ld + i]), or some of its rows (slot[i] = token i's row or
// -1, row s at rows + s * ld): rows computed in slot order, each against every token whose row came later or not at
// all, so the pair (i, c) is in the row of whichever of them has the lower slot, and unknown when neither has one.
// Either way the values are cosine()'s, bit for bit what a computed distance would use.
struct KnownSims {
  const float* rows = nullptr;  // nullptr: nothing known
  int64_t ld = 0;
  const int64_t* slot = nullptr;
  // Every pair with token c can be read.
  bool row_known(int64_t c) const { return rows != nullptr && (slot == nullptr || slot[c] >= 0); }
  // S[i][c]; one of row_known(i), row_known(c) must hold.
  float get(int64_t i, int64_t c) const {
    if (slot == nullptr) return rows[c * ld + i];
    const int64_t si = slot[i], sc = slot[c];
    return si >= 0 && (sc < 0 || si <= sc) ? rows[si * ld + c] : rows[sc * ld + i];
  }
};

// How farthest point sampling reads one sample beyond its rows: valid [N] (nullptr: all valid) and the similarities
// already computed (none: every distance is computed from the rows).
struct FpsInputs {
  const bool* valid = nullptr;
  KnownSims known;
};

// Per-sample parts, so select_cpu can run cover and FPS back to back on one sample.
// prompt_cover_sample: picks[0..k_p) (-1 padded), returns the count. f is the sample's resolved neighbour count.
int64_t prompt_cover_sample(int64_t b, int64_t N, int64_t L, int64_t d, const Features& vis, const VisRows& v,
                            const Features& prompt, const bool* mask, int64_t k_p, int64_t f, int64_t* picks,
                            bool parallel);
// fps_sample: out[0..k) in selection order, -1 padded. v needs norms unless in.known holds the whole Gram matrix and a seed is
// in range.
void fps_sample(int64_t N, int64_t d, DType dtype, const VisRows& v, const int64_t* seed, int64_t m, int64_t num_picks,
                int64_t k, const FpsInputs& in, int64_t* out, bool parallel);
// gram_sample: out[i * ld + j] for i, j < N, exactly symmetric.
void gram_sample(int64_t N, int64_t d, DType dtype, const VisRows& v, float* out, int64_t ld, bool parallel);

// The entry points' argument checks (csrc/checks.h) raised: a non-empty message becomes std::invalid_argument (a
// ValueError through pybind11) before any kernel reads or writes memory.
inline void require(const std::string& error) {
  if (!error.empty()) throw std::invalid_argument(error);
}
inline void require_sizes(const Sizes& s) { require(check_sizes(s)); }
inline void require_pointer(const char* name, const void* p, int64_t count) { require(check_pointer(name, p, count)); }
// Throws std::invalid_argument unless 0 <= f <= N.
void check_fold(int64_t f, int64_t N);

}  // namespace mob::cpu

#include "cpu/parallel.h"
