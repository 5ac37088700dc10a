// CPU greedy MAP of a DPP (CDPruner): the fast greedy loop with an incremental Cholesky factor (Chen et al. 2018).
//
// Kernel L_jn = (r_j S_jn) r_n between valid tokens, with S the cosine similarity (common.h cosine: gram_cpu's values)
// and r the relevance; an invalid token's row and column are 0, so it never takes part (its residual stays -inf).
// Step i takes the largest residual d2 (first maximum; a NaN is the maximum, as torch.argmax has it, and then stops
// the loop since its gain is not above the threshold) and updates every valid residual:
//   e_n = (L_jn - sum_{t<i} c_t[j] c_t[n]) / sqrt(d2_j),  c_i[n] = e_n,  d2_n -= e_n^2,  d2_j = -inf.
// It stops when the best residual is at most kDppStop times the largest valid diagonal entry (a NaN there stops it at
// once). Only rows of L for the picked tokens are needed, computed on demand: k N d multiply-adds at most instead of
// the N^2 d of a Gram matrix.
//
// Two loops give the same bits:
// * eager: every step computes the picked token's row against every token and updates every valid residual, the
//   reference's sequence, so non-finite values propagate as they do there;
// * lazy (when every valid row, relevance and diagonal entry is finite and the threshold positive, so no residual can
//   become NaN): residuals only shrink, so a stored residual bounds the true one from above. The valid untaken tokens
//   sit in a max-heap by (stored residual, lower index); the top is the exact argmax once it is up to date, and a
//   stale token catches up on the steps it missed, in order, with the same arithmetic the eager loop would have done
//   (its products with the picked rows come from register tiles of up to 4 stale tokens). Tokens whose residual is far
//   below the best are never touched again, which on real and random features is most of them.
#include <cfloat>
#include <memory>

#include "cpu/common.h"

namespace mob::cpu {
namespace {

constexpr int64_t kBatch = 8;  // stale tokens refreshed together (two 4-row register tiles)

// torch.argmax over x: the first NaN if there is one, else the first maximum.
int64_t argmax_nan_first(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return i;
    if (x[i] > x[best]) best = i;
  }
  return best;
}

struct DppState {
  int64_t N, d, k;
  DType dtype;
  const VisRows& v;
  std::vector<float> r, d2;
  std::vector<float> c;  // c[n * k + t]: token n's Cholesky column (the c_t[n] of the steps it has seen)
  std::vector<int64_t> picked;  // j_t
  std::vector<float> root;      // sqrt(d2_{j_t}) at step t

  // e_t[n] for the steps t in [from, to), given dots[t - from] = dot(v_{j_t}, v_n): the Cholesky update both loops do.
  void update(int64_t n, int64_t from, int64_t to, const float* dots) {
    float* cn = c.data() + n * k;
    for (int64_t t = from; t < to; ++t) {
      const int64_t j = picked[static_cast<size_t>(t)];
      const float* cj = c.data() + j * k;
      float acc = r[j] * cosine(dots[t - from], v.inv.data(), j, n) * r[n];
      for (int64_t s = 0; s < t; ++s) acc -= cj[s] * cn[s];
      const float e = acc / root[static_cast<size_t>(t)];
      cn[t] = e;
      d2[n] = d2[n] - e * e;
    }
  }
};

// The eager loop: step i updates every valid token from the picked row's products with all of them.
void dpp_eager(DppState& st, const bool* valid, float stop, int64_t* order, float* gain, bool parallel) {
  const int64_t N = st.N;
  std::vector<float> dots(N);
  const bool split = parallel && work({N, st.d}) >= kParallelWork;
  for (int64_t i = 0; i < st.k; ++i) {
    const int64_t j = argmax_nan_first(st.d2.data(), N);
    const float g = st.d2[j];
    if (!(g > stop)) return;  // the rest stay -1 / 0
    st.picked.push_back(j);
    st.root.push_back(std::sqrt(g));
    const void* rowj = st.v.rows[static_cast<size_t>(j)];
    auto step = [&](int64_t n0, int64_t n1) {  // tokens [n0, n1)
      dot_tile(st.dtype, &rowj, 1, st.v.rows.data() + n0, n1 - n0, st.d, dots.data() + n0, n1 - n0);
      for (int64_t n = n0; n < n1; ++n)
        if (valid[n]) st.update(n, i, i + 1, dots.data() + n);
    };
    if (split) {
#pragma omp parallel
      {
#ifdef _OPENMP
        const int64_t nth = omp_get_num_threads(), me = omp_get_thread_num();
#else
        const int64_t nth = 1, me = 0;
#endif
        step(N * me / nth, N * (me + 1) / nth);
      }
    } else {
      step(0, N);  // no OpenMP construct at all: inside a batch-level region it would start a nested team
    }
    st.d2[j] = -INFINITY;
    order[i] = j;
    gain[i] = g;
  }
}

// The lazy loop (see the file comment); only valid tokens are candidates.
void dpp_lazy(DppState& st, const bool* valid, float stop, int64_t* order, float* gain, bool parallel) {
  const int64_t N = st.N, k = st.k;
  std::vector<HeapEntry> heap;
  heap.reserve(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n)
    if (valid[n]) heap.push_back({st.d2[n], n});
  std::make_heap(heap.begin(), heap.end(), heap_less);
  std::vector<int64_t> seen(N, 0), stale;
  std::vector<const void*> picked_rows;
  std::vector<float> dots(static_cast<size_t>(kBatch) * static_cast<size_t>(std::max<int64_t>(k, 1)));
  for (int64_t i = 0; i < k && !heap.empty(); ++i) {
    while (seen[heap.front().idx] != i) {
      stale.clear();
      while (!heap.empty() && static_cast<int64_t>(stale.size()) < kBatch && seen[heap.front().idx] != i) {
        stale.push_back(heap.front().idx);
        std::pop_heap(heap.begin(), heap.end(), heap_less);
        heap.pop_back();
      }
      // Groups of 4 tokens by recency share one register-tiled pass over the picked rows the least recent missed.
      std::sort(stale.begin(), stale.end(), [&](int64_t a, int64_t b) { return seen[a] > seen[b]; });
      const int64_t R = static_cast<int64_t>(stale.size()), groups = (R + 3) / 4;
      const int64_t missed = i - seen[stale[R - 1]];
#pragma omp parallel for schedule(static) if (parallel && groups > 1 && work({R, missed, st.d}) >= kParallelWork / 4)
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t r0 = 4 * g, nr = std::min<int64_t>(4, R - r0), from = seen[stale[r0 + nr - 1]], cnt = i - from;
        float* gdots = dots.data() + static_cast<size_t>(r0) * static_cast<size_t>(k);  // rows r0.. of the R x k scratch
        const void* grows[4];
        for (int64_t q = 0; q < nr; ++q) grows[q] = st.v.rows[static_cast<size_t>(stale[r0 + q])];
        dot_tile(st.dtype, grows, nr, picked_rows.data() + from, cnt, st.d, gdots, cnt);
        for (int64_t q = 0; q < nr; ++q) {
          const int64_t n = stale[r0 + q];
          st.update(n, seen[n], i, gdots + q * cnt + (seen[n] - from));
          seen[n] = i;
        }
      }
      for (int64_t n : stale) {
        heap.push_back({st.d2[n], n});
        std::push_heap(heap.begin(), heap.end(), heap_less);
      }
    }
    const int64_t j = heap.front().idx;
    const float g = st.d2[j];
    if (!(g > stop)) return;
    std::pop_heap(heap.begin(), heap.end(), heap_less);
    heap.pop_back();
    st.picked.push_back(j);
    st.root.push_back(std::sqrt(g));
    picked_rows.push_back(st.v.rows[static_cast<size_t>(j)]);
    st.d2[j] = -INFINITY;
    order[i] = j;
    gain[i] = g;
  }
}

void dpp_sample(int64_t N, int64_t d, DType dtype, const VisRows& v, const float* relevance, const bool* valid,
                int64_t k, bool lazy, int64_t* order, float* gain, bool parallel) {
  std::fill(order, order + k, int64_t{-1});
  std::fill(gain, gain + k, 0.f);
  if (k <= 0 || N <= 0) return;
  DppState st{N, d, k, dtype, v, std::vector<float>(N), std::vector<float>(N),
              std::vector<float>(static_cast<size_t>(N) * static_cast<size_t>(k)), {}, {}};
  for (int64_t n = 0; n < N; ++n) st.r[n] = valid[n] ? relevance[n] : 0.f;
  // Diagonal L_nn = (r_n S_nn) r_n from each row's product with itself.
#pragma omp parallel for schedule(static) if (parallel && work({N, d}) >= kParallelWork)
  for (int64_t n = 0; n < N; ++n) {
    float sq;
    dot_tile(dtype, &v.rows[static_cast<size_t>(n)], 1, &v.rows[static_cast<size_t>(n)], 1, d, &sq, 1);
    st.d2[n] = st.r[n] * cosine(sq, v.inv.data(), n, n) * st.r[n];
  }
  // stop = kDppStop * max over valid L_nn (invalid count as 0; a NaN propagates, as torch.amax does).
  float top = 0.f;
  bool nan = false, finite = true;
  for (int64_t n = 0; n < N; ++n)
    if (valid[n]) {
      nan |= std::isnan(st.d2[n]);
      // finite (and no product of two rows can overflow), finite relevance and diagonal
      finite &= v.norm[n] < 1e18f && std::isfinite(st.r[n]) && std::isfinite(st.d2[n]);
      top = std::max(top, st.d2[n]);
    }
  if (nan) top = NAN;
  const float stop = kDppStop * top;
  for (int64_t n = 0; n < N; ++n)
    if (!valid[n]) st.d2[n] = -INFINITY;
  // Lazy only where no residual can turn NaN: finite valid rows (|S| <= 1, no overflowing product), finite kernel, a positive threshold (so
  // sqrt(d2_j) > 0), and a diagonal small enough that no e_n^2 can overflow (|e_n| <= ~2 top / sqrt(stop)).
  if (lazy && finite && stop > 0.f && top < 1e30f)
    dpp_lazy(st, valid, stop, order, gain, parallel);
  else
    dpp_eager(st, valid, stop, order, gain, parallel);
}

// CDPruner whole (mob_kernels/methods/cdpruner.py): usable = valid, finite features and finite relevance; the DPP's
// picks, then the other tokens by relevance (descending, ties to the lower index; unusable ones last, by index);
// out[0..k) sorted ascending.
void cdpruner_sample(int64_t N, int64_t d, DType dtype, const VisRows& v, const float* relevance, const bool* valid,
                     int64_t k, int64_t* out, bool parallel) {
  if (k <= 0) return;
  std::unique_ptr<bool[]> ok(new bool[static_cast<size_t>(N)]);
  for (int64_t n = 0; n < N; ++n) {
    const size_t i = static_cast<size_t>(n);
    ok[n] = (!valid || valid[n]) && std::isfinite(relevance[n]) && finite_row(dtype, v.rows[i], d, v.norm[i]);
  }
  std::vector<int64_t> order(static_cast<size_t>(k));
  std::vector<float> gain(static_cast<size_t>(k));
  dpp_sample(N, d, dtype, v, relevance, ok.get(), k, true, order.data(), gain.data(), parallel);
  // complete(): the chosen first (+inf), then relevance, unusable tokens at -inf; a stable sort keeps index order.
  std::vector<float> key(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n) key[n] = ok[n] ? std::min(relevance[n], FLT_MAX) : -INFINITY;
  for (int64_t j : order)
    if (j >= 0) key[j] = INFINITY;
  std::vector<int64_t> idx(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n) idx[n] = n;
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return key[a] > key[b]; });
  std::sort(idx.begin(), idx.begin() + k);
  std::copy(idx.begin(), idx.begin() + k, out);
}

}  // namespace
}  // namespace mob::cpu

void mob::cdpruner_cpu(int64_t B, int64_t N, int64_t d, Features vis, const float* relevance, const bool* valid,
                       int64_t k, int64_t* out) {
  cpu::require_sizes({B, N, 0, d, 0, k});
  cpu::require_pointer("vis", vis.data, B * N * d);
  cpu::require_pointer("relevance", relevance, B * N);
  cpu::require_pointer("out", out, B * k);
  // valid is optional: nullptr means every token.
  cpu::for_each_sample(B, cpu::work({N, d, k + 1}), [&](int64_t b, bool parallel) {
    const cpu::VisRows v(vis, b, N, d, parallel);
    cpu::cdpruner_sample(N, d, vis.dtype, v, relevance + b * N, valid ? valid + b * N : nullptr, k, out + b * k,
                         parallel);
  });
}

void mob::dpp_greedy_cpu(int64_t B, int64_t N, int64_t d, Features vis, const float* relevance, const bool* valid,
                         int64_t k, int64_t* order, float* gain, bool lazy) {
  cpu::require_sizes({B, N, 0, d, 0, k});
  cpu::require_pointer("vis", vis.data, B * N * d);
  cpu::require_pointer("relevance", relevance, B * N);
  cpu::require_pointer("valid", valid, B * N);
  cpu::require_pointer("order", order, B * k);
  cpu::require_pointer("gain", gain, B * k);
  cpu::for_each_sample(B, cpu::work({N, d, k + 1}), [&](int64_t b, bool parallel) {
    const cpu::VisRows v(vis, b, N, d, parallel);
    cpu::dpp_sample(N, d, vis.dtype, v, relevance + b * N, valid + b * N, k, lazy, order + b * k, gain + b * k,
                    parallel);
  });
}
