// pybind11 wrappers of the CUDA launchers (csrc/cuda/mob_cuda.h), added to mob_kernels._C by csrc/bindings.cpp when
// the extension is built with nvcc. Built by the host compiler: no CUDA header here.
//
// Python (mob_kernels/cuda.py) passes device pointers, sizes, element strides, the dtype tag, the device index and
// torch's current stream as plain ints. A launcher's error message becomes RuntimeError (CUDA failures) or
// ValueError (arguments a direct caller got wrong), so nothing here can abort the process.
#include <pybind11/pybind11.h>

#include <string>

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
  // Launchers prefix CUDA runtime failures with the backend's name; everything else is an argument check.
  if (err.rfind("mob_kernels CUDA backend:", 0) == 0) throw std::runtime_error(err);
  throw py::value_error(err);
}

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace

void bind_cuda(py::module_& m) {
  m.attr("CUDA_RUNTIME_VERSION") = mob::cuda_runtime_version();
  m.attr("CUDA_FORCE_GLOBAL_WORKSPACE") = static_cast<int64_t>(mob::kCudaForceGlobalWorkspace);

  m.def("cuda_workspace_bytes", &mob::cuda_workspace_bytes, py::arg("op"), py::arg("B"), py::arg("N"), py::arg("L"),
        py::arg("k_p"),
        "Workspace bytes for op 0 = prompt_cover, 1 = farthest_point_sample, 2 = select (-1: bad arguments)");

  m.def("prompt_cover_cuda", [](int device, uintptr_t stream, int64_t B, int64_t N, int64_t L, int64_t d, int dtype,
                                uintptr_t vis, int64_t vis_bs, int64_t vis_rs, uintptr_t prompt, int64_t pr_bs,
                                int64_t pr_rs, uintptr_t mask, int64_t k_p, uintptr_t fold, uintptr_t picks,
                                uintptr_t count, uintptr_t workspace, int64_t workspace_bytes, int64_t options) {
    const mob::Features v = device_features(vis, dtype, vis_bs, vis_rs), p = device_features(prompt, dtype, pr_bs, pr_rs);
    std::string err;
    {
      py::gil_scoped_release release;
      err = mob::prompt_cover_cuda(device, ptr<void>(stream), B, N, L, d, v, p, ptr<const bool>(mask), k_p,
                                   ptr<const int64_t>(fold),
                                   ptr<int64_t>(picks), ptr<int64_t>(count), ptr<void>(workspace), workspace_bytes,
                                   options);
    }
    raise_if_error(err);
  });

  m.def("farthest_point_sample_cuda",
        [](int device, uintptr_t stream, int64_t B, int64_t N, int64_t d, int dtype, uintptr_t vis, int64_t vis_bs,
           int64_t vis_rs, uintptr_t seed, int64_t m_seed, uintptr_t num_picks, int64_t k, uintptr_t out,
           uintptr_t workspace, int64_t workspace_bytes, int64_t options) {
          const mob::Features v = device_features(vis, dtype, vis_bs, vis_rs);
          std::string err;
          {
            py::gil_scoped_release release;
            err = mob::farthest_point_sample_cuda(device, ptr<void>(stream), B, N, d, v, ptr<const int64_t>(seed),
                                                  m_seed, ptr<const int64_t>(num_picks), k, ptr<int64_t>(out),
                                                  ptr<void>(workspace), workspace_bytes, options);
          }
          raise_if_error(err);
        });

  m.def("select_cuda", [](int device, uintptr_t stream, int64_t B, int64_t N, int64_t L, int64_t d, int dtype,
                          uintptr_t vis, int64_t vis_bs, int64_t vis_rs, uintptr_t prompt, int64_t pr_bs,
                          int64_t pr_rs, uintptr_t mask, int64_t k_p, int64_t k, uintptr_t fold, uintptr_t out,
                          uintptr_t workspace, int64_t workspace_bytes, int64_t options) {
    const mob::Features v = device_features(vis, dtype, vis_bs, vis_rs), p = device_features(prompt, dtype, pr_bs, pr_rs);
    std::string err;
    {
      py::gil_scoped_release release;
      err = mob::select_cuda(device, ptr<void>(stream), B, N, L, d, v, p, ptr<const bool>(mask), k_p, k,
                             ptr<const int64_t>(fold),
                             ptr<int64_t>(out), ptr<void>(workspace), workspace_bytes, options);
    }
    raise_if_error(err);
  });
}
