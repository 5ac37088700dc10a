// Host-side launchers of the CUDA backend (csrc/cuda/*.cu), callable from plain C++ (csrc/cuda/bindings.cpp is built
// by the host compiler and never sees a CUDA header).
//
// Same ABI style as csrc/mob.h: raw device pointers, sizes, element strides and a dtype tag; no libtorch. Every
// launcher enqueues its kernels on `stream` (a cudaStream_t from torch.cuda.current_stream(), passed as void*) after
// selecting `device` in this library's own (static) CUDA runtime, never synchronises the host, and never aborts: it
// returns "" on success or a message naming what failed, which the binding raises as a Python exception.
//
// Scratch memory comes from the caller: `workspace` must hold cuda_workspace_bytes(...) bytes on `device`, 256-byte
// aligned (torch's allocator gives that). Outputs are fully written by every successful call.
#pragma once
#include <cstdint>
#include <string>

#include "mob.h"

namespace mob {

// Bits of the `options` argument.
enum CudaOptions : int64_t {
  kCudaForceGlobalWorkspace = 1,  // keep per-sample arrays in the global workspace even where shared memory would fit
};

// Bytes of workspace each launcher needs. `op`: 0 = prompt_cover, 1 = farthest_point_sample, 2 = select.
// Returns -1 for a negative size or an unknown op.
int64_t cuda_workspace_bytes(int op, int64_t B, int64_t N, int64_t L, int64_t k_p);

// SPEC §2 steps 0-2 (see mob.h's prompt_cover_cpu). mask, picks, count live on the device.
std::string prompt_cover_cuda(int device, void* stream, int64_t B, int64_t N, int64_t L, int64_t d, Features vis,
                              Features prompt, const bool* mask, int64_t k_p, const int64_t* fold, int64_t* picks,
                              int64_t* count, void* workspace, int64_t workspace_bytes, int64_t options);

// SPEC §2 step 3 (see mob.h's farthest_point_sample_cpu). seed [B, m], num_picks [B], out [B, k] on the device.
std::string farthest_point_sample_cuda(int device, void* stream, int64_t B, int64_t N, int64_t d, Features vis,
                                       const int64_t* seed, int64_t m, const int64_t* num_picks, int64_t k,
                                       int64_t* out, void* workspace, int64_t workspace_bytes, int64_t options);

// SPEC §2 whole (see mob.h's select_cpu): out [B, k] sorted ascending, on the device.
std::string select_cuda(int device, void* stream, int64_t B, int64_t N, int64_t L, int64_t d, Features vis,
                        Features prompt, const bool* mask, int64_t k_p, int64_t k, const int64_t* fold, int64_t* out,
                        void* workspace, int64_t workspace_bytes, int64_t options);

// CUDART_VERSION this library was compiled against (e.g. 13000), for diagnostics.
int cuda_runtime_version();

}  // namespace mob
