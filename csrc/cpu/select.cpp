// CPU select: MoB, docs/contract.md §3.1, per sample: prompt cover, FPS seeded by the cover for k - count picks, sorted union.
// Every entry point checks its sizes and pointers with csrc/checks.h first, repeating the Python checks, so that a
// direct caller of the extension can never make the kernels read or write out of bounds or through a null pointer:
// they throw (pybind11 turns that into ValueError) instead.
#include "cpu/common.h"

namespace mob {

void cpu::check_fold(int64_t f, int64_t N) {
  if (f < 0 || f > N)
    throw std::invalid_argument("fold must be in [0, N], got fold=" + std::to_string(f) + " with N=" + std::to_string(N));
}

void select_cpu(int64_t B, int64_t N, int64_t L, int64_t d, Features vis, Features prompt, const bool* mask,
                int64_t k_p, int64_t k, const int64_t* fold, int64_t* out) {
  cpu::require_sizes({B, N, L, d, k_p, k});
  cpu::require_pointer("vis", vis.data, B * N * d);
  cpu::require_pointer("prompt", prompt.data, B * L * d);
  cpu::require_pointer("prompt_mask", mask, B * L);
  cpu::require_pointer("fold", fold, B);
  cpu::require_pointer("out", out, B * k);
  for (int64_t b = 0; b < B; ++b) cpu::check_fold(fold[b], N);
  cpu::for_each_sample(B, cpu::work({N, d, L + k_p + 1}), [&](int64_t b, bool parallel) {
    std::vector<int64_t> cover(static_cast<size_t>(k_p)), fps(static_cast<size_t>(k));
    const cpu::VisRows v(vis, b, N, d, parallel);
    const int64_t cnt =
        cpu::prompt_cover_sample(b, N, L, d, vis, v, prompt, mask, k_p, fold[b], cover.data(), parallel);
    cpu::fps_sample(N, d, vis.dtype, v, cover.data(), cnt, k - cnt, k, {}, fps.data(), parallel);
    int64_t* o = out + b * k;
    std::copy(cover.begin(), cover.begin() + cnt, o);
    std::copy(fps.begin(), fps.begin() + (k - cnt), o + cnt);
    std::sort(o, o + k);
  });
}

}  // namespace mob
