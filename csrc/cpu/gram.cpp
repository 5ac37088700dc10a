// CPU Gram matrix of cosine similarities: S_ij = dot(v_i, v_j) * inv_i * inv_j with inv = 1 / max(|v|, eps).
//
// Only the upper triangle is computed, in square blocks of rows (both blocks of a pair stay in L2 while the register
// tiles pass over them), block pairs split across threads; the lower triangle is its mirror image, so the matrix is
// exactly symmetric and S_ij is common.h's cosine(). A dot product does not depend on the tile it was computed in
// (each is its own chain of FMAs over d), so the FPS and DPP kernels that compute rows of S on demand reproduce these
// values bit for bit.
#include "cpu/common.h"

namespace mob::cpu {
namespace {
constexpr int64_t kBlock = 48;  // rows per block: a multiple of both register tiles' sides (4 x 6 and 4 x 3)
constexpr int64_t kMirror = 32;  // transpose tile
}  // namespace

void gram_sample(int64_t N, int64_t d, DType dtype, const VisRows& v, float* out, int64_t ld, bool parallel) {
  if (N <= 0) return;
  const int64_t nblk = (N + kBlock - 1) / kBlock;
  std::vector<std::pair<int64_t, int64_t>> pairs;  // block pairs (I, J), I <= J
  pairs.reserve(static_cast<size_t>(nblk * (nblk + 1) / 2));
  for (int64_t I = 0; I < nblk; ++I)
    for (int64_t J = I; J < nblk; ++J) pairs.emplace_back(I, J);
  const int64_t npairs = static_cast<int64_t>(pairs.size());
  const float* inv = v.inv.data();
#pragma omp parallel for schedule(dynamic, 1) if (parallel && work({N, N, d}) / 2 >= kParallelWork)
  for (int64_t p = 0; p < npairs; ++p) {
    const int64_t i0 = pairs[static_cast<size_t>(p)].first * kBlock, j0 = pairs[static_cast<size_t>(p)].second * kBlock;
    const int64_t ni = std::min(kBlock, N - i0), nj = std::min(kBlock, N - j0);
    float* blk = out + i0 * ld + j0;
    dot_tile(dtype, v.rows.data() + i0, ni, v.rows.data() + j0, nj, d, blk, ld);
    for (int64_t r = 0; r < ni; ++r)
      for (int64_t c = std::max<int64_t>(0, i0 + r - j0); c < nj; ++c)  // the upper triangle: i0 + r <= j0 + c
        blk[r * ld + c] = cosine(blk[r * ld + c], inv, i0 + r, j0 + c);
  }
  // Lower triangle := upper, in square tiles so both sides are read and written a cache line at a time.
  const int64_t nt = (N + kMirror - 1) / kMirror;
#pragma omp parallel for schedule(dynamic, 1) if (parallel && N * N >= kParallelWork)
  for (int64_t I = 0; I < nt; ++I)
    for (int64_t J = 0; J <= I; ++J) {
      const int64_t i1 = std::min(N, (I + 1) * kMirror), j1 = std::min(N, (J + 1) * kMirror);
      for (int64_t i = I * kMirror; i < i1; ++i)
        for (int64_t j = J * kMirror; j < std::min(j1, i); ++j) out[i * ld + j] = out[j * ld + i];
    }
}

}  // namespace mob::cpu

void mob::gram_cpu(int64_t B, int64_t N, int64_t d, Features vis, float* out) {
  cpu::require_sizes({B, N, 0, d, 0, 0, true});
  cpu::require_pointer("vis", vis.data, B * N * d);
  cpu::require_pointer("out", out, B * N * N);
  cpu::for_each_sample(B, cpu::work({N, N, d}) / 2, [&](int64_t b, bool parallel) {
    const cpu::VisRows v(vis, b, N, d, parallel);
    cpu::gram_sample(N, d, vis.dtype, v, out + b * N * N, N, parallel);
  });
}
