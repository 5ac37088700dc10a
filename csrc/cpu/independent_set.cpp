// CPU independent set (docs/contract.md §3.4.1, D2Pruner's greedy maximal independent set), without a Gram matrix.
//
// Candidates (rank >= 0) are visited in increasing rank, ties to the lower index (the reference's stable sort); each
// one that no earlier pick is adjacent to is picked, until num_picks (at most k) picks. Tokens i != j are adjacent when
// cos(v_i, v_j) > near (same tile of the grid, Chebyshev distance <= radius) or > far (otherwise; every pair without a
// grid), the thresholds rounded to float32 as the reference's comparison does; a NaN similarity is no edge. Every
// similarity is common.h's cosine() of a dot_tile dot product: gram_cpu's value bit for bit, so every decision is the
// one a walk over gram_cpu's matrix would make.
//
// The walk only needs, for each pick, its adjacency to the candidates still available after it. Those sit in a bitset
// over rank positions (at most N bits: 72 bytes at N = 576), and the thresholds are applied to each block of at most
// 64 x 48 dot products as soon as dot_tile has computed it; no similarity matrix is stored.
// * Dense graphs (the far threshold needs the cosine): the next P available candidates, P = the picks still wanted (at
//   most kBatch), are resolved together. Their P x P products decide which of them are picked (each is picked unless
//   an earlier pick of the batch is adjacent to it: every earlier pick outside the batch was already applied to them);
//   when that reaches num_picks the walk ends without another product. Otherwise the batch's picks, packed on one side
//   of the register tile, meet the available candidates after the batch in 64-position blocks (one bitset word each,
//   split across threads for a single large sample), clearing the adjacent ones.
// * Sparse graphs (far at or above the bound below, e.g. D2Pruner's alpha = 0.5 and alpha = 0): most pairs are
//   decided without a product, so the walk goes one pick at a time and computes only the pairs that need one (at
//   alpha = 0.5, the pick's spatial neighbours; at alpha = 0, none).
//
// Deciding a pair without its product is exact. For a "safe" row (float32 norm at most 2^60: finite features, no
// overflow anywhere below) and d <= 2^20, any summation order gives |computed cosine| <= 1 + 4 (d + 8) 2^-24 (the
// float32 dot product, norms, square root, division and two products each within their usual relative error bounds;
// a norm below eps is replaced by eps, and underflow only adds absolute errors far below that margin). So between two
// safe rows a threshold at or above that bound is never exceeded and one below its negative always is; no row's
// cosine exceeds +inf or a NaN threshold. Every other pair is computed.
#include <cfloat>
#include <utility>

#include "cpu/common.h"

namespace mob::cpu {
namespace {

constexpr int64_t kBatch = 48;  // candidates resolved together: at most dot.cpp's packed block, so picks pack once
constexpr int64_t kWord = 64;   // positions per bitset word, and per block of the marking pass
constexpr float kSafeNorm = 0x1p60f;  // 2^60: a row with a larger (or non-finite) norm is computed

enum class Pair : uint8_t { kNoEdge, kEdge, kCompute };

// A threshold rounded to float32; beyond the float range it is an infinity (a plain cast would be undefined there).
float to_float(double x) {
  if (std::isnan(x)) return NAN;
  return std::fabs(x) <= static_cast<double>(FLT_MAX) ? static_cast<float>(x) : (x > 0 ? INFINITY : -INFINITY);
}

// |a - b| with int64 wrap-around, as torch computes (row_i - row_j).abs() on int64 tensors.
inline int64_t abs_diff(int64_t a, int64_t b) {
  const uint64_t d = static_cast<uint64_t>(a) - static_cast<uint64_t>(b);
  return static_cast<int64_t>(static_cast<int64_t>(d) < 0 ? uint64_t{0} - d : d);
}

// One sample's candidates in visiting order (position p = rank order) and what the walk needs of them.
struct Walk {
  DType dtype;
  int64_t d, M;
  float near, far;
  double bound;  // |computed cosine| <= bound between safe rows (+inf: no such guarantee)
  bool grid;
  int64_t radius;
  std::vector<int64_t> tok;        // token index
  std::vector<const void*> rows;   // feature row
  std::vector<float> norm, inv;    // as gram_cpu computes them
  std::vector<uint8_t> safe;
  std::vector<int64_t> tile, row, col;
  std::vector<uint64_t> avail;     // bit p: candidate p can still be picked

  float threshold(int64_t p, int64_t q) const {
    if (!grid || tile[p] != tile[q]) return far;
    return std::max(abs_diff(row[p], row[q]), abs_diff(col[p], col[q])) <= radius ? near : far;
  }
  // common.h cosine() indexed by position: the order of the two products follows the token indices.
  float cosine(float dot, int64_t p, int64_t q) const {
    return tok[p] < tok[q] ? dot * inv[p] * inv[q] : dot * inv[q] * inv[p];
  }
  bool adjacent(float dot, int64_t p, int64_t q) const { return cosine(dot, p, q) > threshold(p, q); }
  // The pair decided without its product where that is exact (see the header), else kCompute.
  Pair decide(float thr, bool both_safe) const {
    if (std::isnan(thr) || thr == INFINITY) return Pair::kNoEdge;
    if (both_safe && static_cast<double>(thr) >= bound) return Pair::kNoEdge;
    if (both_safe && static_cast<double>(thr) < -bound) return Pair::kEdge;
    return Pair::kCompute;
  }
  void clear(int64_t p) { avail[static_cast<size_t>(p / kWord)] &= ~(uint64_t{1} << (p % kWord)); }
  // The first available position at or after p, or M.
  int64_t next(int64_t p) const {
    while (p < M) {
      const uint64_t w = avail[static_cast<size_t>(p / kWord)] >> (p % kWord);
      if (w) return p + __builtin_ctzll(w);
      p = (p / kWord + 1) * kWord;
    }
    return M;
  }
};

// Clears every available candidate at or after `from` that one of the picks (positions) is adjacent to: each block of
// up to 64 available candidates (one bitset word) against all picks in one dot_tile call, the picks on its packed side.
void mark_dense(Walk& w, const int64_t* picks, int64_t Q, int64_t from, bool parallel) {
  const void* prows[kBatch];
  for (int64_t q = 0; q < Q; ++q) prows[q] = w.rows[static_cast<size_t>(picks[q])];
  const int64_t W = static_cast<int64_t>(w.avail.size()), w0 = from / kWord;
  int64_t left = 0;  // available candidates still to meet, for the threading decision
  for (int64_t i = w0; i < W; ++i) {
    const uint64_t m = i == w0 ? ~uint64_t{0} << (from % kWord) : ~uint64_t{0};
    left += __builtin_popcountll(w.avail[static_cast<size_t>(i)] & m);
  }
#pragma omp parallel for schedule(dynamic, 1) if (parallel && work({Q, left, w.d}) >= kParallelWork)
  for (int64_t i = w0; i < W; ++i) {
    // On the stack: nothing inside a parallel region may throw. Each block writes only its own bitset word.
    const void* crows[kWord];
    int64_t cpos[kWord];
    float dots[kWord * kBatch];
    uint64_t bits = w.avail[static_cast<size_t>(i)] & (i == w0 ? ~uint64_t{0} << (from % kWord) : ~uint64_t{0});
    int64_t n = 0;
    for (uint64_t b = bits; b; b &= b - 1) {
      cpos[n] = i * kWord + __builtin_ctzll(b);
      crows[n] = w.rows[static_cast<size_t>(cpos[n])];
      ++n;
    }
    if (n == 0) continue;
    dot_tile(w.dtype, crows, n, prows, Q, w.d, dots, Q);
    for (int64_t c = 0; c < n; ++c)
      for (int64_t q = 0; q < Q; ++q)
        if (w.adjacent(dots[c * Q + q], picks[q], cpos[c])) {
          bits &= ~(uint64_t{1} << (cpos[c] % kWord));
          break;
        }
    const uint64_t keep = i == w0 ? ~(~uint64_t{0} << (from % kWord)) : uint64_t{0};  // positions before `from`
    w.avail[static_cast<size_t>(i)] = (w.avail[static_cast<size_t>(i)] & keep) | bits;
  }
}

// Clears every available candidate at or after `from` adjacent to pick p, computing only the pairs that need it.
void mark_sparse(Walk& w, int64_t p, int64_t from, std::vector<int64_t>& todo) {
  todo.clear();
  for (int64_t c = w.next(from); c < w.M; c = w.next(c + 1)) {
    const Pair e = w.decide(w.threshold(p, c), w.safe[static_cast<size_t>(p)] && w.safe[static_cast<size_t>(c)]);
    if (e == Pair::kEdge) w.clear(c);
    if (e == Pair::kCompute) todo.push_back(c);
  }
  const void* prow = w.rows[static_cast<size_t>(p)];
  const void* crows[kWord];
  float dots[kWord];
  for (size_t c0 = 0; c0 < todo.size(); c0 += kWord) {
    const int64_t n = std::min<int64_t>(kWord, static_cast<int64_t>(todo.size() - c0));
    for (int64_t c = 0; c < n; ++c) crows[c] = w.rows[static_cast<size_t>(todo[c0 + c])];
    dot_tile(w.dtype, &prow, 1, crows, n, w.d, dots, n);
    for (int64_t c = 0; c < n; ++c)
      if (w.adjacent(dots[c], p, todo[c0 + c])) w.clear(todo[c0 + c]);
  }
}

void independent_set_sample(int64_t b, int64_t N, int64_t d, const Features& vis, const int64_t* rank, int64_t limit,
                            float near, float far, const Grid& grid, int64_t radius, int64_t* out, bool parallel) {
  if (limit <= 0) return;
  std::vector<std::pair<int64_t, int64_t>> order;  // (rank, token): the visiting order, ties to the lower index
  for (int64_t i = 0; i < N; ++i)
    if (rank[i] >= 0) order.emplace_back(rank[i], i);
  if (order.empty()) return;
  std::sort(order.begin(), order.end());

  Walk w;
  w.dtype = vis.dtype;
  w.d = d;
  w.M = static_cast<int64_t>(order.size());
  w.near = near;
  w.far = far;
  w.bound = d <= (int64_t{1} << 20) ? 1.0 + 4.0 * static_cast<double>(d + 8) * 0x1p-24 : INFINITY;
  w.grid = grid.data != nullptr;
  w.radius = radius;
  const size_t M = order.size();
  w.tok.resize(M);
  w.rows.resize(M);
  w.norm.resize(M);
  w.inv.resize(M);
  w.safe.resize(M);
  for (size_t p = 0; p < M; ++p) {
    w.tok[p] = order[p].second;
    w.rows[p] = row_ptr(vis, b, w.tok[p]);
  }
  inverse_norms(vis.dtype, w.rows, d, w.norm.data(), w.inv.data(), parallel);  // per row: gram_cpu's values
  for (size_t p = 0; p < M; ++p) w.safe[p] = w.norm[p] <= kSafeNorm;  // false for a NaN or infinite norm
  if (w.grid) {
    w.tile.resize(M);
    w.row.resize(M);
    w.col.resize(M);
    for (size_t p = 0; p < M; ++p) {
      const int64_t* g = grid.data + b * grid.batch_stride + w.tok[p] * grid.row_stride;
      w.tile[p] = g[0];
      w.row[p] = g[1];
      w.col[p] = g[2];
    }
  }
  w.avail.assign((M + kWord - 1) / kWord, ~uint64_t{0});
  if (M % kWord) w.avail.back() = (uint64_t{1} << (M % kWord)) - 1;

  // Dense when most pairs need their product: the far threshold, between safe rows, is not decided in advance.
  const bool dense = w.decide(far, true) == Pair::kCompute;
  std::vector<int64_t> batch, picks, todo;
  std::vector<float> mutual;
  std::vector<const void*> brows;
  int64_t n = 0, cursor = 0;
  while (n < limit) {
    const int64_t want = dense ? std::min(kBatch, limit - n) : 1;
    batch.clear();
    for (int64_t p = w.next(cursor); p < w.M && static_cast<int64_t>(batch.size()) < want; p = w.next(p + 1))
      batch.push_back(p);
    if (batch.empty()) break;
    cursor = batch.back() + 1;
    const int64_t P = static_cast<int64_t>(batch.size());
    if (P > 1) {  // the batch's own products: which of its members its earlier picks leave available
      brows.resize(static_cast<size_t>(P));
      for (int64_t i = 0; i < P; ++i) brows[static_cast<size_t>(i)] = w.rows[static_cast<size_t>(batch[i])];
      mutual.resize(static_cast<size_t>(P * P));
      dot_tile(w.dtype, brows.data(), P, brows.data(), P, d, mutual.data(), P);
    }
    picks.clear();
    for (int64_t j = 0; j < P && n < limit; ++j) {
      bool blocked = false;
      for (size_t t = 0; t < picks.size() && !blocked; ++t) {
        const int64_t i = picks[t];
        blocked = w.adjacent(mutual[static_cast<size_t>(i * P + j)], batch[i], batch[j]);
      }
      if (blocked) continue;
      picks.push_back(j);
      out[n++] = w.tok[static_cast<size_t>(batch[j])];
    }
    if (n == limit) break;  // no later candidate matters
    for (int64_t& t : picks) t = batch[t];  // batch index -> position
    if (dense)
      mark_dense(w, picks.data(), static_cast<int64_t>(picks.size()), cursor, parallel);
    else
      mark_sparse(w, picks[0], cursor, todo);
  }
}

}  // namespace
}  // namespace mob::cpu

void mob::independent_set_cpu(int64_t B, int64_t N, int64_t d, Features vis, const int64_t* rank,
                              const int64_t* num_picks, int64_t k, double near, double far, Grid grid, int64_t radius,
                              int64_t* out) {
  cpu::require_sizes({B, N, 0, d, 0, k});
  cpu::require_pointer("vis", vis.data, B * N * d);
  cpu::require_pointer("rank", rank, B * N);
  cpu::require_pointer("num_picks", num_picks, B);
  cpu::require_pointer("out", out, B * k);
  // grid is optional: nullptr means no spatial neighbours (every pair is held to far).
  // The reference compares float32 similarities with the thresholds rounded to float32.
  const float near_f = cpu::to_float(near), far_f = cpu::to_float(far);
  cpu::for_each_sample(B, cpu::work({N, d, k + 1}), [&](int64_t b, bool parallel) {
    int64_t* o = out + b * k;
    std::fill(o, o + k, int64_t{-1});
    cpu::independent_set_sample(b, N, d, vis, rank + b * N, std::min(num_picks[b], k), near_f, far_f, grid, radius, o,
                                parallel);
  });
}
