// CPU prompt cover: docs/contract.md §3.1.2, one sample at a time.
//
// sim[j, i] = dot(p_j, v_i) / (max(|p_j|, eps) max(|v_i|, eps)) for the valid prompt rows j: a float32 matrix product
// through dot_tile, in blocks of visual rows that stay in L2 while every prompt row streams past, blocks split across
// threads. Then each row's f best tokens (ties to the lower index; a non-finite similarity never counts), a max-merge
// into the covering score c(i), and the k_p best candidates. Workspace: a 64 x N block of scores plus O(N).
#include "cpu/common.h"

namespace mob::cpu {

int64_t top_finite(const float* x, int64_t n, int64_t m, int64_t* out) {
  if (m <= 0) return 0;
  int64_t cnt = 0;
  if (m <= 64) {
    // One pass with a sorted buffer. i only grows, so an equal value never moves ahead of an earlier index.
    for (int64_t i = 0; i < n; ++i) {
      const float v = x[i];
      if (!std::isfinite(v) || (cnt == m && !(v > x[out[m - 1]]))) continue;
      int64_t p = cnt < m ? cnt++ : m - 1;
      for (; p > 0 && v > x[out[p - 1]]; --p) out[p] = out[p - 1];
      out[p] = i;
    }
    return cnt;
  }
  std::vector<int64_t> idx;
  idx.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    if (std::isfinite(x[i])) idx.push_back(i);
  cnt = std::min<int64_t>(m, static_cast<int64_t>(idx.size()));
  std::partial_sort(idx.begin(), idx.begin() + cnt, idx.end(),
                    [x](int64_t a, int64_t b) { return ranks_before(x[a], a, x[b], b); });
  std::copy(idx.begin(), idx.begin() + cnt, out);
  return cnt;
}

void inverse_norms(DType t, const std::vector<const void*>& rows, int64_t d, float* norm, float* inv, bool parallel) {
  const int64_t n = static_cast<int64_t>(rows.size());
  constexpr int64_t kRows = 32;
#pragma omp parallel for schedule(static) if (parallel && n * d >= kParallelWork)
  for (int64_t i0 = 0; i0 < n; i0 += kRows) {
    const int64_t m = std::min(kRows, n - i0);
    squared_norms(t, rows.data() + i0, m, d, norm + i0);
    for (int64_t i = i0; i < i0 + m; ++i) {
      norm[i] = std::sqrt(norm[i]);
      inv[i] = 1.0f / std::max(norm[i], kEps);
    }
  }
}

int64_t prompt_cover_sample(int64_t b, int64_t N, int64_t L, int64_t d, const Features& vis, const VisRows& v,
                            const Features& prompt, const bool* mask, int64_t k_p, int64_t f, int64_t* picks,
                            bool parallel) {
  std::fill(picks, picks + k_p, int64_t{-1});
  std::vector<const void*> prows;
  for (int64_t j = 0; j < L; ++j)
    if (mask[b * L + j]) prows.push_back(row_ptr(prompt, b, j));
  const int64_t Lv = static_cast<int64_t>(prows.size());
  if (k_p == 0 || N == 0 || Lv == 0 || f == 0) return 0;

  std::vector<float> pnorm(Lv), pinv(Lv);
  inverse_norms(prompt.dtype, prows, d, pnorm.data(), pinv.data(), parallel);

  // Prompt rows go through in chunks of kRows, so the score workspace is kRows x N floats however long the prompt is.
  constexpr int64_t kRows = 64;
  constexpr int64_t kBlock = 24;  // visual rows per block: 24 x 4096 float32 = 384 KiB, resident in L2
  const int64_t nblk = (N + kBlock - 1) / kBlock;
  std::vector<float> sim(static_cast<size_t>(std::min(Lv, kRows) * N)), cover(N, -INFINITY);
  std::vector<int64_t> top(static_cast<size_t>(f));
  for (int64_t j0 = 0; j0 < Lv; j0 += kRows) {
    const int64_t nj = std::min(kRows, Lv - j0);
#pragma omp parallel for schedule(static) if (parallel && nj * N * d >= kParallelWork)
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const int64_t i0 = blk * kBlock, n = std::min(kBlock, N - i0);
      dot_tile(vis.dtype, prows.data() + j0, nj, v.rows.data() + i0, n, d, sim.data() + i0, N);
      for (int64_t j = 0; j < nj; ++j)
        for (int64_t i = i0; i < i0 + n; ++i) sim[j * N + i] *= pinv[j0 + j] * v.inv[i];
    }
    for (int64_t j = 0; j < nj; ++j) {
      const float* row = sim.data() + j * N;
      const int64_t cnt = top_finite(row, N, f, top.data());
      for (int64_t r = 0; r < cnt; ++r) cover[top[r]] = std::max(cover[top[r]], row[top[r]]);
    }
  }
  // Tokens in no T_j keep -inf and so are never picked.
  return top_finite(cover.data(), N, k_p, picks);
}

}  // namespace mob::cpu

void mob::prompt_cover_cpu(int64_t B, int64_t N, int64_t L, int64_t d, Features vis, Features prompt,
                           const bool* mask, int64_t k_p, const int64_t* fold, int64_t* picks, int64_t* count) {
  cpu::require_sizes({B, N, L, d, k_p, k_p});
  cpu::require_pointer("vis", vis.data, B * N * d);
  cpu::require_pointer("prompt", prompt.data, B * L * d);
  cpu::require_pointer("prompt_mask", mask, B * L);
  cpu::require_pointer("fold", fold, B);
  cpu::require_pointer("picks", picks, B * k_p);
  cpu::require_pointer("count", count, B);
  for (int64_t b = 0; b < B; ++b) cpu::check_fold(fold[b], N);
  cpu::for_each_sample(B, cpu::work({N, d, L + 1}), [&](int64_t b, bool parallel) {
    const cpu::VisRows v(vis, b, N, d, parallel);
    count[b] = cpu::prompt_cover_sample(b, N, L, d, vis, v, prompt, mask, k_p, fold[b], picks + b * k_p, parallel);
  });
}
