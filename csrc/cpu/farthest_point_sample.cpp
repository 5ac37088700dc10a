// CPU farthest point sampling: docs/contract.md §2.3, exact, with lazy distance updates.
//
// dist(i) = min over centres c of 1 - dot(v_i, v_c) / (max(|v_i|, eps) max(|v_c|, eps)) (common.h cosine). Distances
// only shrink (a NaN, once there, stays and ranks lowest), so a token's stored distance bounds its true one from above
// however many centres it has not seen yet. The untaken tokens sit in a max-heap by (stored distance, lower index).
// Pop the top: if it has seen every centre it is the exact argmax, ties included (every other token's true key ranks
// at or behind its stored key, which ranks behind the top); otherwise bring it up to date and push it back. The seeds
// (the prompt cover, or the largest-norm token when there is none) are applied eagerly as one blocked matrix product
// split across threads; the FPS centres lazily. The worst case is the eager algorithm; on spread-out features most
// steps refresh a handful of tokens instead of all N.
//
// Invalid tokens (valid[i] false) are never in the heap; seeds are centres whether valid or not, as in the reference.
// Given a Gram matrix (the composed DivPrune computes one anyway), distances are read from it instead of computed;
// given some rows of it (the fused DivPrune keeps those its first pick computed), those pairs are read.
#include <stdexcept>
#include <string>

#include "cpu/common.h"

namespace mob::cpu {
namespace {

constexpr float kNanRank = -3.0f;  // finite cosine distances lie in [0, 2] up to rounding
constexpr int64_t kBatch = 8;      // stale tokens refreshed together (two 4-row register tiles)
inline float rank_key(float dist) { return std::isnan(dist) ? kNanRank : dist; }

// dist[i] = min over centres of the cosine distance, for every row i (eager; rows split across threads).
void seed_distances(DType t, const std::vector<const void*>& rows, const float* inv, const std::vector<int64_t>& seeds,
                    int64_t d, float* dist, bool parallel) {
  const int64_t N = static_cast<int64_t>(rows.size()), S = static_cast<int64_t>(seeds.size());
  std::vector<const void*> srows(static_cast<size_t>(S));
  for (int64_t s = 0; s < S; ++s) srows[static_cast<size_t>(s)] = rows[static_cast<size_t>(seeds[s])];
  constexpr int64_t kRows = 24, kSeeds = 48;  // a block of rows stays in L2 while the seeds stream past
  const int64_t nblk = (N + kRows - 1) / kRows;
#pragma omp parallel if (parallel && work({N, S, d}) >= kParallelWork)
  {
    float buf[kRows * kSeeds];  // on the stack: nothing inside a parallel region may throw
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const int64_t i0 = blk * kRows, n = std::min(kRows, N - i0);
      for (int64_t s0 = 0; s0 < S; s0 += kSeeds) {
        const int64_t ns = std::min(kSeeds, S - s0);
        // Seeds as the 4-row side of the register tile, rows as the 6-column side: 24 rows and seed counts that are
        // multiples of 4 (the usual k_p) fill every tile.
        dot_tile(t, srows.data() + s0, ns, rows.data() + i0, n, d, buf, n);
        for (int64_t s = 0; s < ns; ++s)
          for (int64_t r = 0; r < n; ++r)
            dist[i0 + r] = nan_min(dist[i0 + r], 1.0f - cosine(buf[s * n + r], inv, i0 + r, seeds[s0 + s]));
      }
    }
  }
}

}  // namespace

void fps_sample(int64_t N, int64_t d, DType dtype, const VisRows& v, const int64_t* seed, int64_t m, int64_t num_picks,
                int64_t k, const FpsInputs& in, int64_t* out, bool parallel) {
  std::fill(out, out + k, int64_t{-1});
  if (k <= 0 || N <= 0) return;
  const std::vector<const void*>& rows = v.rows;
  const float* inv = v.inv.data();
  // off: taken (a seed or a pick) or invalid; never picked. Only taken tokens are centres.
  std::vector<uint8_t> off(static_cast<size_t>(N), 0);
  std::vector<int64_t> seeds;  // distinct, in range
  for (int64_t s = 0; s < m; ++s)
    if (seed[s] >= 0 && seed[s] < N && !off[seed[s]]) {
      off[seed[s]] = 1;
      seeds.push_back(seed[s]);
    }
  int64_t n_off = static_cast<int64_t>(seeds.size());
  if (in.valid)
    for (int64_t i = 0; i < N; ++i)
      if (!in.valid[i] && !off[i]) {
        off[i] = 1;
        ++n_off;
      }
  const int64_t n = std::min({std::max<int64_t>(num_picks, 0), k, N - n_off});
  if (n <= 0) return;

  int64_t t = 0;
  if (seeds.empty()) {  // first pick: the largest raw norm among the pickable tokens, NaN ranking lowest
    const std::vector<float>& norm = v.norm;
    int64_t best = -1;
    for (int64_t i = 0; i < N; ++i)
      if (!off[i] && (best < 0 || ranks_before(std::isnan(norm[i]) ? -1.0f : norm[i], i,
                                               std::isnan(norm[best]) ? -1.0f : norm[best], best)))
        best = i;
    out[t++] = best;
    off[best] = 1;
    seeds.push_back(best);
  }
  const KnownSims& known = in.known;  // pairs read instead of computed
  std::vector<float> dist(N, INFINITY);
  std::vector<int64_t> computed_seeds;
  for (int64_t s : seeds) {
    if (!known.row_known(s)) {
      computed_seeds.push_back(s);
      continue;
    }
    for (int64_t i = 0; i < N; ++i) dist[i] = nan_min(dist[i], 1.0f - known.get(i, s));
  }
  if (!computed_seeds.empty()) seed_distances(dtype, rows, inv, computed_seeds, d, dist.data(), parallel);

  std::vector<HeapEntry> heap;
  heap.reserve(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i)
    if (!off[i]) heap.push_back({rank_key(dist[i]), i});
  std::make_heap(heap.begin(), heap.end(), heap_less);
  // FPS picks, applied lazily: those whose similarities can be read (kc) and those computed (uc). A token's dist
  // accounts for the first kseen[i] of kc and useen[i] of uc; min is order-free, so the split changes no value.
  std::vector<int64_t> kc, uc;
  std::vector<const void*> uc_rows;
  std::vector<int64_t> kseen(N, 0), useen(N, 0);
  auto fresh = [&](int64_t i) {
    return kseen[i] == static_cast<int64_t>(kc.size()) && useen[i] == static_cast<int64_t>(uc.size());
  };
  std::vector<float> dots;
  std::vector<int64_t> stale, todo;
  for (; t < n; ++t) {
    const int64_t K = static_cast<int64_t>(kc.size()), C = static_cast<int64_t>(uc.size());
    while (!fresh(heap.front().idx)) {
      // Refresh the stale head of the heap in a batch of up to kBatch tokens. Reads first: the readable centres, and
      // every centre for a token whose own pairs can all be read.
      stale.clear();
      while (!heap.empty() && static_cast<int64_t>(stale.size()) < kBatch && !fresh(heap.front().idx)) {
        stale.push_back(heap.front().idx);
        std::pop_heap(heap.begin(), heap.end(), heap_less);
        heap.pop_back();
      }
      todo.clear();
      for (int64_t i : stale) {
        for (int64_t c = kseen[i]; c < K; ++c) dist[i] = nan_min(dist[i], 1.0f - known.get(i, kc[c]));
        kseen[i] = K;
        if (known.row_known(i)) {
          for (int64_t c = useen[i]; c < C; ++c) dist[i] = nan_min(dist[i], 1.0f - known.get(i, uc[c]));
          useen[i] = C;
        } else if (useen[i] < C) {
          todo.push_back(i);
        }
      }
      if (!todo.empty()) {
        // The rest as register-tiled passes over the centres they missed instead of single-row passes: ordered by how
        // many centres each token has seen and cut into groups of 4 (the tile's row side); a group starts from its
        // least-recent token, and re-applying a centre another token of the group already saw changes nothing.
        std::sort(todo.begin(), todo.end(), [&](int64_t a, int64_t b) { return useen[a] > useen[b]; });
        const int64_t R = static_cast<int64_t>(todo.size()), groups = (R + 3) / 4;
        dots.resize(static_cast<size_t>(kBatch) * static_cast<size_t>(C));
        const int64_t work = R * (C - useen[todo[R - 1]]) * d;
        // The groups touch distinct tokens, so they can run on both cores when the refresh is large.
#pragma omp parallel for schedule(static) if (parallel && groups > 1 && work >= kParallelWork / 4)
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t r0 = 4 * g, nr = std::min<int64_t>(4, R - r0), from = useen[todo[r0 + nr - 1]];
          const int64_t cnt = C - from;
          float* gdots = dots.data() + static_cast<size_t>(r0) * static_cast<size_t>(C);  // this group's rows of the R x C scratch
          const void* grows[4];
          for (int64_t r = 0; r < nr; ++r) grows[r] = rows[static_cast<size_t>(todo[r0 + r])];
          dot_tile(dtype, grows, nr, uc_rows.data() + from, cnt, d, gdots, cnt);
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t i = todo[r0 + r];
            for (int64_t c = useen[i] - from; c < cnt; ++c)
              dist[i] = nan_min(dist[i], 1.0f - cosine(gdots[r * cnt + c], inv, i, uc[from + c]));
            useen[i] = C;
          }
        }
      }
      for (int64_t i : stale) {
        heap.push_back({rank_key(dist[i]), i});
        std::push_heap(heap.begin(), heap.end(), heap_less);
      }
    }
    const int64_t pick = heap.front().idx;
    std::pop_heap(heap.begin(), heap.end(), heap_less);
    heap.pop_back();
    out[t] = pick;
    off[pick] = 1;
    if (known.row_known(pick)) {
      kc.push_back(pick);
    } else {
      uc.push_back(pick);
      uc_rows.push_back(rows[static_cast<size_t>(pick)]);
    }
  }
}

}  // namespace mob::cpu

void mob::farthest_point_sample_cpu(int64_t B, int64_t N, int64_t d, Features vis, const int64_t* seed, int64_t m,
                                    const int64_t* num_picks, int64_t k, const bool* valid, Square sim, int64_t* out) {
  cpu::require_sizes({B, N, 0, d, 0, k, sim.data != nullptr});
  if (m < 0) throw std::invalid_argument("seed width m must be >= 0, got m=" + std::to_string(m));
  if (element_count({B, m}) < 0) throw std::invalid_argument("seed sizes overflow int64, got B=" + std::to_string(B) +
                                                             " m=" + std::to_string(m));
  cpu::require_pointer("vis", vis.data, B * N * d);
  cpu::require_pointer("seed", seed, B * m);
  cpu::require_pointer("num_picks", num_picks, B);
  cpu::require_pointer("out", out, B * k);
  // valid and sim are optional: nullptr means none.
  cpu::for_each_sample(B, sim.data ? cpu::work({N, m + k}) : cpu::work({N, d, m + 1}), [&](int64_t b, bool parallel) {
    const int64_t* s = seed + b * m;
    const bool seeded = std::any_of(s, s + m, [N](int64_t i) { return i >= 0 && i < N; });
    // Norms are needed for computed distances and for the largest-norm first pick.
    const cpu::VisRows v(vis, b, N, d, parallel, sim.data == nullptr || !seeded);
    cpu::FpsInputs in;
    in.valid = valid ? valid + b * N : nullptr;
    if (sim.data) {  // the whole Gram matrix
      in.known.rows = sim.data + b * sim.batch_stride;
      in.known.ld = sim.row_stride;
    }
    cpu::fps_sample(N, d, vis.dtype, v, s, m, num_picks[b], k, in, out + b * k, parallel);
  });
}
