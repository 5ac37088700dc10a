// CPU select: SPEC.md §2 whole, per sample: prompt cover, FPS seeded by the cover for k - count picks, sorted union.
// Argument checks here repeat the Python ones so that a direct caller of the extension can never make the kernels
// read or write out of bounds: they throw (pybind11 turns that into ValueError) instead.
#include <stdexcept>
#include <string>

#include "cpu/common.h"

namespace mob {
namespace {
void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}
}  // namespace

void cpu::check_sizes(int64_t B, int64_t N, int64_t L, int64_t d, int64_t k_p, int64_t k) {
  require(B >= 0 && N >= 0 && L >= 0 && d >= 0, "sizes must be >= 0");
  require(k >= 0 && k <= N, "k must be in [0, N], got k=" + std::to_string(k) + " with N=" + std::to_string(N));
  require(k_p >= 0 && k_p <= k, "k_p must be in [0, k], got k_p=" + std::to_string(k_p));
}

void cpu::check_fold(int64_t f, int64_t N) {
  require(f >= 0 && f <= N, "fold must be in [0, N], got fold=" + std::to_string(f) + " with N=" + std::to_string(N));
}

void select_cpu(int64_t B, int64_t N, int64_t L, int64_t d, Features vis, Features prompt, const bool* mask,
                int64_t k_p, int64_t k, const int64_t* fold, int64_t* out) {
  cpu::check_sizes(B, N, L, d, k_p, k);
  cpu::for_each_sample(B, N * d * (L + k_p + 1), [&](int64_t b, bool parallel) {
    std::vector<int64_t> cover(static_cast<size_t>(k_p)), fps(static_cast<size_t>(k));
    const cpu::VisRows v(vis, b, N, d, parallel);
    const int64_t cnt =
        cpu::prompt_cover_sample(b, N, L, d, vis, v, prompt, mask, k_p, fold[b], cover.data(), parallel);
    cpu::fps_sample(N, d, vis.dtype, v, cover.data(), cnt, k - cnt, k, fps.data(), parallel);
    int64_t* o = out + b * k;
    std::copy(cover.begin(), cover.begin() + cnt, o);
    std::copy(fps.begin(), fps.begin() + (k - cnt), o + cnt);
    std::sort(o, o + k);
  });
}

}  // namespace mob
