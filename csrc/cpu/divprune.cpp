// CPU DivPrune, fused: mob_kernels/methods/divprune.py's composition (usable tokens, most isolated first pick, FPS
// seeded by it, completion to k) in one call per sample, without the whole N x N Gram matrix the composition builds.
// Every similarity is common.h's cosine(), the value gram_cpu would hold, so the picks are the composition's (run on
// this backend's primitives) bit for bit. The first pick needs every token's nearest neighbour, which bounds the work from
// below by a good share of the N^2 d / 2 multiply-adds of a Gram matrix; most_isolated below computes only the rows
// that can still matter, and keeps them: the FPS then reads the pairs they hold (on spread-out features about 60% of
// those it needs) and computes the others lazily, as farthest_point_sample does.
#include <cfloat>
#include <memory>

#include "cpu/common.h"

namespace mob::cpu {
namespace {

constexpr int64_t kRowBlock = 12;  // candidate rows computed together: smaller steps stop sooner (N = 576: -11% pairs)
constexpr int64_t kColBlock = 48;  // columns per task
constexpr int64_t kKeepFloats = int64_t{8} << 20;  // 32 MiB of kept similarities at most (N = 2880: every row)

// The similarity rows most_isolated kept, in the layout KnownSims reads (row s at rows + s * N).
struct KeptRows {
  std::vector<float> rows;
  std::vector<int64_t> slot;
};

// The key of a nearest-neighbour distance (mob_kernels/methods/divprune.py most_isolated): NaN ranks as -3, below
// every finite distance; -inf as the most negative float; +inf (no usable neighbour) stays.
inline float isolation_key(float nearest) {
  return std::isnan(nearest) ? -3.0f : (nearest == -INFINITY ? -FLT_MAX : nearest);
}

// most_isolated over the usable tokens U (ok): the token whose nearest usable neighbour (cosine distance 1 - S) is
// farthest, first maximum; -1 when U is empty. Exact without the whole Gram matrix: rows of S are computed in blocks
// against every token whose row is not computed yet, so each pair once (S is symmetric), and every token keeps the
// nearest distance over the pairs computed so far: exact once its row is computed, an upper bound on its key before
// (nan_min, so a NaN among them already fixes its key at -3, as the full amin would). Blocks take the candidates with
// the largest bounds; a token is ruled out once its bound ranks behind the best exact key found (ties go to the lower
// index), and the loop ends when no candidate is left. Spread-out features (Gaussian) need about a third of the rows,
// clustered ones fewer. Workspace O(N) besides the kept rows:
//
// the similarities computed on the way are kept in `keep` (the rows of each block, in block order, until a block
// would take the kept rows past kKeepFloats), so the FPS that follows reads them instead of computing them again.
int64_t most_isolated(int64_t N, int64_t d, DType dtype, const VisRows& v, const bool* ok, bool parallel,
                      KeptRows& keep) {
  std::vector<int64_t> U;  // usable tokens, ascending: positions in U order like token indices
  for (int64_t i = 0; i < N; ++i)
    if (ok[i]) U.push_back(i);
  const int64_t M = static_cast<int64_t>(U.size());
  if (M == 0) return -1;
  std::vector<const void*> rows(static_cast<size_t>(M));
  for (int64_t p = 0; p < M; ++p) rows[static_cast<size_t>(p)] = v.rows[static_cast<size_t>(U[p])];
  std::vector<float> nearest(M, INFINITY);  // nan_min of 1 - S over the pairs computed so far
  std::vector<uint8_t> done(M, 0), in_block(M, 0);
  std::vector<int64_t> cand(M), block, cols;  // cand: not computed and not ruled out
  for (int64_t p = 0; p < M; ++p) cand[p] = p;
  float best_key = -INFINITY;
  int64_t best = -1;  // position in U
  const float* inv = v.inv.data();
  keep.slot.assign(static_cast<size_t>(N), -1);
  keep.rows.clear();
  int64_t kept = 0;  // rows kept so far
  bool keeping = true;
  while (true) {
    cand.erase(std::remove_if(cand.begin(), cand.end(),
                              [&](int64_t p) {
                                const float key = isolation_key(nearest[p]);
                                return best >= 0 && !ranks_before(key, p, best_key, best);
                              }),
               cand.end());
    if (cand.empty()) break;
    const int64_t nb = std::min<int64_t>(kRowBlock, static_cast<int64_t>(cand.size()));
    std::partial_sort(cand.begin(), cand.begin() + nb, cand.end(), [&](int64_t a, int64_t b) {
      return ranks_before(isolation_key(nearest[a]), a, isolation_key(nearest[b]), b);
    });
    block.assign(cand.begin(), cand.begin() + nb);
    cand.erase(cand.begin(), cand.begin() + nb);
    for (int64_t p : block) in_block[p] = 1;
    // Kept rows must be a prefix of the block order (KnownSims' rule), so once a block does not fit, none is kept.
    keeping = keeping && (kept + nb) * N <= kKeepFloats;
    float* keep_rows = nullptr;
    if (keeping) {
      keep.rows.resize(static_cast<size_t>((kept + nb) * N), 0.0f);
      keep_rows = keep.rows.data() + kept * N;
      for (int64_t r = 0; r < nb; ++r) keep.slot[static_cast<size_t>(U[block[r]])] = kept + r;
      kept += nb;
    }
    // Columns: every token whose row is not computed yet, ruled-out ones included (they are still neighbours).
    cols.clear();
    for (int64_t q = 0; q < M; ++q)
      if (!done[q]) cols.push_back(q);
    const int64_t nc = static_cast<int64_t>(cols.size()), ntask = (nc + kColBlock - 1) / kColBlock;
#pragma omp parallel if (parallel && work({nb, nc, d}) >= kParallelWork)
    {
      // On the stack: nothing inside a parallel region may throw.
      const void* brows[kRowBlock];
      const void* crows[kColBlock];
      float dots[kRowBlock * kColBlock], row_min[kRowBlock];
      for (int64_t r = 0; r < nb; ++r) {
        brows[r] = rows[static_cast<size_t>(block[r])];
        row_min[r] = INFINITY;
      }
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < ntask; ++task) {
        const int64_t c0 = task * kColBlock, ncol = std::min(kColBlock, nc - c0);
        for (int64_t c = 0; c < ncol; ++c) crows[c] = rows[static_cast<size_t>(cols[c0 + c])];
        // Columns on the tile's row side, the block (reused by every task) on the packed side.
        dot_tile(dtype, crows, ncol, brows, nb, d, dots, nb);
        for (int64_t c = 0; c < ncol; ++c) {
          const int64_t q = cols[c0 + c];
          for (int64_t r = 0; r < nb; ++r) {
            const int64_t p = block[r];
            if (p == q) continue;
            const float sim = cosine(dots[c * nb + r], inv, U[p], U[q]);
            if (keep_rows) keep_rows[r * N + U[q]] = sim;  // this task's column alone
            const float dist = 1.0f - sim;
            row_min[r] = nan_min(row_min[r], dist);
            if (!in_block[q]) nearest[q] = nan_min(nearest[q], dist);  // this task's column alone
          }
        }
      }
      // nan_min is associative and commutative: the threads' partial minima merge in any order.
#pragma omp critical(mob_divprune_row_min)
      for (int64_t r = 0; r < nb; ++r) nearest[block[r]] = nan_min(nearest[block[r]], row_min[r]);
    }
    for (int64_t p : block) {  // exact now
      done[p] = 1;
      in_block[p] = 0;
      const float key = isolation_key(nearest[p]);
      if (best < 0 || ranks_before(key, p, best_key, best)) {
        best = p;
        best_key = key;
      }
    }
  }
  return U[best];
}

void divprune_sample(int64_t N, int64_t d, DType dtype, const VisRows& v, const bool* valid, int64_t k, int64_t* out,
                     bool parallel) {
  if (k <= 0) return;
  std::unique_ptr<bool[]> ok(new bool[static_cast<size_t>(N)]);  // usable: valid and finite
  int64_t n_ok = 0;
  for (int64_t i = 0; i < N; ++i) {
    const size_t r = static_cast<size_t>(i);
    ok[i] = (!valid || valid[i]) && finite_row(dtype, v.rows[r], d, v.norm[r]);
    n_ok += ok[i];
  }
  std::vector<int64_t> chosen;
  chosen.reserve(static_cast<size_t>(k));
  if (n_ok > 0) {
    KeptRows keep;
    const int64_t first = most_isolated(N, d, dtype, v, ok.get(), parallel, keep);
    chosen.push_back(first);
    // FPS from the first pick: pairs the first pick computed are read, the others computed on demand; the same values
    // as reading the Gram matrix.
    FpsInputs in;
    in.valid = ok.get();
    in.known = {keep.rows.data(), N, keep.slot.data()};
    std::vector<int64_t> picks(static_cast<size_t>(k));
    fps_sample(N, d, dtype, v, &first, 1, std::min(n_ok, k) - 1, k, in, picks.data(), parallel);
    for (int64_t p : picks)
      if (p >= 0) chosen.push_back(p);
  }
  // Completed with the lowest-index tokens not chosen, then sorted.
  std::vector<uint8_t> taken(static_cast<size_t>(N), 0);
  for (int64_t c : chosen) taken[c] = 1;
  for (int64_t i = 0; i < N && static_cast<int64_t>(chosen.size()) < k; ++i)
    if (!taken[i]) chosen.push_back(i);
  std::sort(chosen.begin(), chosen.end());
  std::copy(chosen.begin(), chosen.end(), out);
}

}  // namespace
}  // namespace mob::cpu

void mob::divprune_cpu(int64_t B, int64_t N, int64_t d, Features vis, const bool* valid, int64_t k, int64_t* out) {
  cpu::require_sizes({B, N, 0, d, 0, k, true});
  cpu::require_pointer("vis", vis.data, B * N * d);
  cpu::require_pointer("out", out, B * k);
  // valid is optional: nullptr means every token.
  cpu::for_each_sample(B, cpu::work({N, N, d}) / 2, [&](int64_t b, bool parallel) {
    const cpu::VisRows v(vis, b, N, d, parallel);
    cpu::divprune_sample(N, d, vis.dtype, v, valid ? valid + b * N : nullptr, k, out + b * k, parallel);
  });
}
