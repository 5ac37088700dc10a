// pybind11 wrappers of the CUDA entry points (csrc/cuda/mob_cuda.h), added to mob_kernels._C by csrc/bindings.cpp
// when the extension is built with nvcc. Built by the host compiler: no CUDA header here.
//
// Python (mob_kernels/backends/cuda.py) passes device pointers, sizes, element strides, the dtype tag, the device
// index and torch's current stream as plain ints. An entry point's error message becomes RuntimeError (CUDA failures)
// or ValueError (arguments a direct caller got wrong), so nothing here can abort the process.
#include <pybind11/pybind11.h>

#include <string>
#include <utility>

#include "cuda/layout.h"
#include "cuda/mob_cuda.h"
#include "mob.h"

namespace py = pybind11;

namespace {

mob::Features device_features(uintptr_t ptr, int dtype, int64_t batch_stride, int64_t row_stride) {
  if (dtype < 0 || dtype > 2) throw py::value_error("dtype tag must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  return mob::Features{reinterpret_cast<const void*>(ptr), static_cast<mob::DType>(dtype), batch_stride, row_stride};
}

void raise_if_error(const std::string& err) {
  if (err.empty()) return;
  // Entry points prefix CUDA runtime failures with the backend's name; everything else is an argument check.
  if (err.rfind("mob_kernels CUDA backend:", 0) == 0) throw std::runtime_error(err);
  throw py::value_error(err);
}

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// Runs an entry point without the GIL and raises its error.
template <typename F>
void call(F&& f) {
  std::string err;
  {
    py::gil_scoped_release release;
    err = f();
  }
  raise_if_error(err);
}

}  // namespace

void bind_cuda(py::module_& m) {
  m.attr("CUDA_RUNTIME_VERSION") = mob::cuda_runtime_version();
  m.attr("CUDA_FORCE_GLOBAL_WORKSPACE") = static_cast<int64_t>(mob::kCudaForceGlobalWorkspace);
  m.attr("CUDA_ROWS_ON_DEMAND") = static_cast<int64_t>(mob::kCudaRowsOnDemand);
  m.attr("CUDA_GRAM_BUDGET_BYTES") = mob::gpu::kGramBudgetBytes;

  py::enum_<mob::CudaOp>(m, "CudaOp", "Op codes of cuda_workspace_bytes / cuda_workspace_layout")
      .value("gram", mob::CudaOp::kGram)
      .value("prompt_cover", mob::CudaOp::kPromptCover)
      .value("farthest_point_sample", mob::CudaOp::kFarthestPointSample)
      .value("select", mob::CudaOp::kSelect)
      .value("dpp_greedy", mob::CudaOp::kDppGreedy);

  m.def(
      "cuda_workspace_bytes",
      [](mob::CudaOp op, int64_t B, int64_t N, int64_t L, int64_t k_p, int64_t k, bool has_sim, int64_t options) {
        return mob::cuda_workspace_bytes(static_cast<int>(op), B, N, L, k_p, k, has_sim, options);
      },
      py::arg("op"), py::arg("B"), py::arg("N"), py::arg("L") = 0, py::arg("k_p") = 0, py::arg("k") = 0,
      py::arg("has_sim") = false, py::arg("options") = 0,
      "Workspace bytes an entry point needs (-1: negative size, unknown option or int64 overflow)");

  m.def(
      "cuda_workspace_layout",
      [](mob::CudaOp op, int64_t B, int64_t N, int64_t L, int64_t k_p, int64_t k, bool has_sim, int64_t options) {
        const mob::gpu::Layout l =
            mob::gpu::workspace_layout(static_cast<int>(op), B, N, L, k_p, k, has_sim, options);
        py::dict d;
        d["chunk"] = l.chunk;
        d["gram"] = l.gram;
        d["rows_on_demand"] = l.rows_on_demand;
        d["total"] = l.total;
        py::dict regions;
        const std::pair<const char*, int64_t> named[] = {
            {"norm", l.norm},   {"scale", l.scale}, {"sim", l.sim},     {"cover", l.cover}, {"gram", l.gram_at},
            {"picks", l.picks}, {"count", l.count}, {"keys", l.keys},   {"index", l.index}, {"off", l.off},
            {"row", l.row},     {"chol", l.chol},
        };
        for (const auto& [name, offset] : named)
          if (offset >= 0) regions[name] = offset;
        d["regions"] = regions;
        return d;
      },
      py::arg("op"), py::arg("B"), py::arg("N"), py::arg("L") = 0, py::arg("k_p") = 0, py::arg("k") = 0,
      py::arg("has_sim") = false, py::arg("options") = 0,
      "The workspace's regions (byte offsets), samples per chunk and whether a Gram matrix is kept, for tests");

  m.def("gram_cuda", [](int device, uintptr_t stream, int64_t B, int64_t N, int64_t d, int dtype, uintptr_t vis,
                        int64_t vis_bs, int64_t vis_rs, uintptr_t out, int64_t options) {
    const mob::Features v = device_features(vis, dtype, vis_bs, vis_rs);
    call([&] { return mob::gram_cuda(device, ptr<void>(stream), B, N, d, v, ptr<float>(out), options); });
  });

  m.def("prompt_cover_cuda", [](int device, uintptr_t stream, int64_t B, int64_t N, int64_t L, int64_t d, int dtype,
                                uintptr_t vis, int64_t vis_bs, int64_t vis_rs, uintptr_t prompt, int64_t pr_bs,
                                int64_t pr_rs, uintptr_t mask, int64_t k_p, uintptr_t fold, uintptr_t picks,
                                uintptr_t count, uintptr_t workspace, int64_t workspace_bytes, int64_t options) {
    const mob::Features v = device_features(vis, dtype, vis_bs, vis_rs);
    const mob::Features p = device_features(prompt, dtype, pr_bs, pr_rs);
    call([&] {
      return mob::prompt_cover_cuda(device, ptr<void>(stream), B, N, L, d, v, p, ptr<const bool>(mask), k_p,
                                    ptr<const int64_t>(fold), ptr<int64_t>(picks), ptr<int64_t>(count),
                                    ptr<void>(workspace), workspace_bytes, options);
    });
  });

  m.def("farthest_point_sample_cuda",
        [](int device, uintptr_t stream, int64_t B, int64_t N, int64_t d, int dtype, uintptr_t vis, int64_t vis_bs,
           int64_t vis_rs, uintptr_t seed, int64_t m_seed, uintptr_t num_picks, int64_t k, uintptr_t valid,
           uintptr_t sim, int64_t sim_bs, int64_t sim_rs, uintptr_t out, uintptr_t workspace,
           int64_t workspace_bytes, int64_t options) {
          const mob::Features v = device_features(vis, dtype, vis_bs, vis_rs);
          call([&] {
            return mob::farthest_point_sample_cuda(device, ptr<void>(stream), B, N, d, v, ptr<const int64_t>(seed),
                                                   m_seed, ptr<const int64_t>(num_picks), k, ptr<const bool>(valid),
                                                   ptr<const float>(sim), sim_bs, sim_rs, ptr<int64_t>(out),
                                                   ptr<void>(workspace), workspace_bytes, options);
          });
        });

  m.def("dpp_greedy_cuda", [](int device, uintptr_t stream, int64_t B, int64_t N, int64_t d, int dtype, uintptr_t vis,
                              int64_t vis_bs, int64_t vis_rs, uintptr_t relevance, uintptr_t valid, int64_t k,
                              uintptr_t order, uintptr_t gain, uintptr_t workspace, int64_t workspace_bytes,
                              int64_t options) {
    const mob::Features v = device_features(vis, dtype, vis_bs, vis_rs);
    call([&] {
      return mob::dpp_greedy_cuda(device, ptr<void>(stream), B, N, d, v, ptr<const float>(relevance),
                                  ptr<const bool>(valid), k, ptr<int64_t>(order), ptr<float>(gain),
                                  ptr<void>(workspace), workspace_bytes, options);
    });
  });

  m.def("select_cuda", [](int device, uintptr_t stream, int64_t B, int64_t N, int64_t L, int64_t d, int dtype,
                          uintptr_t vis, int64_t vis_bs, int64_t vis_rs, uintptr_t prompt, int64_t pr_bs,
                          int64_t pr_rs, uintptr_t mask, int64_t k_p, int64_t k, uintptr_t fold, uintptr_t out,
                          uintptr_t workspace, int64_t workspace_bytes, int64_t options) {
    const mob::Features v = device_features(vis, dtype, vis_bs, vis_rs);
    const mob::Features p = device_features(prompt, dtype, pr_bs, pr_rs);
    call([&] {
      return mob::select_cuda(device, ptr<void>(stream), B, N, L, d, v, p, ptr<const bool>(mask), k_p, k,
                              ptr<const int64_t>(fold), ptr<int64_t>(out), ptr<void>(workspace), workspace_bytes,
                              options);
    });
  });
}
