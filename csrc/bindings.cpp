// pybind11 module mob_kernels._C: thin wrappers from Python ints (pointers, sizes, strides) to csrc/mob.h.
// Python (mob_kernels/cpu.py, mob_kernels/cuda.py) checks every argument first; the GIL is released while C++ runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "cpu/dot.h"
#include "mob.h"

namespace py = pybind11;
using mob::DType;
using mob::Features;

static Features features(uintptr_t ptr, int dtype, int64_t batch_stride, int64_t row_stride) {
  if (dtype < 0 || dtype > 2) throw py::value_error("dtype tag must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  return Features{reinterpret_cast<const void*>(ptr), static_cast<DType>(dtype), batch_stride, row_stride};
}

#ifdef MOB_WITH_CUDA
void bind_cuda(py::module_& m);  // csrc/cuda/bindings.cpp
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "mob_kernels C++ backends (raw pointers, no libtorch)";

  m.def(
      "prompt_cover_cpu",
      [](int64_t B, int64_t N, int64_t L, int64_t d, int dtype, uintptr_t vis, int64_t vis_bs, int64_t vis_rs,
         uintptr_t prompt, int64_t pr_bs, int64_t pr_rs, uintptr_t mask, int64_t k_p, uintptr_t fold, uintptr_t picks,
         uintptr_t count) {
        Features v = features(vis, dtype, vis_bs, vis_rs), p = features(prompt, dtype, pr_bs, pr_rs);
        py::gil_scoped_release release;
        mob::prompt_cover_cpu(B, N, L, d, v, p, reinterpret_cast<const bool*>(mask), k_p,
                              reinterpret_cast<const int64_t*>(fold),
                              reinterpret_cast<int64_t*>(picks), reinterpret_cast<int64_t*>(count));
      });

  m.def("farthest_point_sample_cpu",
        [](int64_t B, int64_t N, int64_t d, int dtype, uintptr_t vis, int64_t vis_bs, int64_t vis_rs, uintptr_t seed,
           int64_t m_seed, uintptr_t num_picks, int64_t k, uintptr_t valid, uintptr_t sim, int64_t sim_bs,
           int64_t sim_rs, uintptr_t out) {
          Features v = features(vis, dtype, vis_bs, vis_rs);
          py::gil_scoped_release release;
          mob::farthest_point_sample_cpu(B, N, d, v, reinterpret_cast<const int64_t*>(seed), m_seed,
                                         reinterpret_cast<const int64_t*>(num_picks), k,
                                         reinterpret_cast<const bool*>(valid),
                                         mob::Square{reinterpret_cast<const float*>(sim), sim_bs, sim_rs},
                                         reinterpret_cast<int64_t*>(out));
        },
        "valid and sim are optional (0: none)");

  m.def("gram_cpu", [](int64_t B, int64_t N, int64_t d, int dtype, uintptr_t vis, int64_t vis_bs, int64_t vis_rs,
                       uintptr_t out) {
    Features v = features(vis, dtype, vis_bs, vis_rs);
    py::gil_scoped_release release;
    mob::gram_cpu(B, N, d, v, reinterpret_cast<float*>(out));
  });

  m.def(
      "dpp_greedy_cpu",
      [](int64_t B, int64_t N, int64_t d, int dtype, uintptr_t vis, int64_t vis_bs, int64_t vis_rs,
         uintptr_t relevance, uintptr_t valid, int64_t k, uintptr_t order, uintptr_t gain, bool lazy) {
        Features v = features(vis, dtype, vis_bs, vis_rs);
        py::gil_scoped_release release;
        mob::dpp_greedy_cpu(B, N, d, v, reinterpret_cast<const float*>(relevance),
                            reinterpret_cast<const bool*>(valid), k, reinterpret_cast<int64_t*>(order),
                            reinterpret_cast<float*>(gain), lazy);
      },
      py::arg("B"), py::arg("N"), py::arg("d"), py::arg("dtype"), py::arg("vis"), py::arg("vis_bs"),
      py::arg("vis_rs"), py::arg("relevance"), py::arg("valid"), py::arg("k"), py::arg("order"), py::arg("gain"),
      py::arg("lazy") = true, "lazy=False forces the eager loop (the same bits; for tests)");

  m.def(
      "cdpruner_cpu",
      [](int64_t B, int64_t N, int64_t d, int dtype, uintptr_t vis, int64_t vis_bs, int64_t vis_rs,
         uintptr_t relevance, uintptr_t valid, int64_t k, uintptr_t out) {
        Features v = features(vis, dtype, vis_bs, vis_rs);
        py::gil_scoped_release release;
        mob::cdpruner_cpu(B, N, d, v, reinterpret_cast<const float*>(relevance), reinterpret_cast<const bool*>(valid),
                          k, reinterpret_cast<int64_t*>(out));
      },
      "valid is optional (0: every token)");

  m.def(
      "divprune_cpu",
      [](int64_t B, int64_t N, int64_t d, int dtype, uintptr_t vis, int64_t vis_bs, int64_t vis_rs, uintptr_t valid,
         int64_t k, uintptr_t out) {
        Features v = features(vis, dtype, vis_bs, vis_rs);
        py::gil_scoped_release release;
        mob::divprune_cpu(B, N, d, v, reinterpret_cast<const bool*>(valid), k, reinterpret_cast<int64_t*>(out));
      },
      "valid is optional (0: every token)");

  m.def(
      "independent_set_cpu",
      [](int64_t B, int64_t N, int64_t d, int dtype, uintptr_t vis, int64_t vis_bs, int64_t vis_rs, uintptr_t rank,
         uintptr_t num_picks, int64_t k, double near, double far, uintptr_t grid, int64_t grid_bs, int64_t grid_rs,
         int64_t radius, uintptr_t out) {
        Features v = features(vis, dtype, vis_bs, vis_rs);
        py::gil_scoped_release release;
        mob::independent_set_cpu(B, N, d, v, reinterpret_cast<const int64_t*>(rank),
                                 reinterpret_cast<const int64_t*>(num_picks), k, near, far,
                                 mob::Grid{reinterpret_cast<const int64_t*>(grid), grid_bs, grid_rs}, radius,
                                 reinterpret_cast<int64_t*>(out));
      },
      "grid is optional (0: none)");

  m.def("select_cpu", [](int64_t B, int64_t N, int64_t L, int64_t d, int dtype, uintptr_t vis, int64_t vis_bs,
                         int64_t vis_rs, uintptr_t prompt, int64_t pr_bs, int64_t pr_rs, uintptr_t mask, int64_t k_p,
                         int64_t k, uintptr_t fold, uintptr_t out) {
    Features v = features(vis, dtype, vis_bs, vis_rs), p = features(prompt, dtype, pr_bs, pr_rs);
    py::gil_scoped_release release;
    mob::select_cpu(B, N, L, d, v, p, reinterpret_cast<const bool*>(mask), k_p, k, reinterpret_cast<const int64_t*>(fold),
                    reinterpret_cast<int64_t*>(out));
  });

  m.def("dot_isa", [] { return std::string(mob::cpu::dot_isa()); },
        "which dot-product implementation the CPU backend uses now: avx512-bf16, avx512, avx2 or portable");
  m.def("supported_dot_isas", &mob::cpu::supported_dot_isas,
        "the dot-product implementations this CPU can run, from portable up");
  m.def(
      "set_dot_isa",
      [](const std::string& name) {
        const char* now = mob::cpu::set_dot_isa(name.c_str());
        if (!now) throw py::value_error("isa must be auto, portable, avx2, avx512 or avx512-bf16, got " + name);
        return std::string(now);
      },
      "narrow the dot-product implementation to `isa` (or the best below it this CPU runs; 'auto': the best); "
      "returns the one now in use. Meant for tests: not while kernels run on other threads");

#ifdef MOB_WITH_CUDA
  m.attr("WITH_CUDA") = true;
  bind_cuda(m);
#else
  m.attr("WITH_CUDA") = false;
#endif
}
