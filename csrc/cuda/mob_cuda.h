// Host-side entry points of the CUDA backend (csrc/cuda/*.cu), callable from plain C++ (csrc/cuda/bindings.cpp is
// built by the host compiler and never sees a CUDA header).
//
// Same ABI style as csrc/mob.h: raw device pointers, sizes, element strides and a dtype tag; no libtorch. Every entry
// point checks its sizes and pointers (csrc/checks.h), enqueues its kernels on `stream` (a cudaStream_t from
// torch.cuda.current_stream(), passed as void*) after selecting `device` in this library's own (static) CUDA runtime,
// never synchronises the host (so a call can be captured in a CUDA graph), and never aborts: it returns "" on success
// or a message naming what failed, which the binding raises as a Python exception.
//
// Semantics are mob_kernels/backends/reference.py's primitives, exactly. Scratch memory comes from the caller:
// `workspace` must hold cuda_workspace_bytes(...) bytes on `device`, 256-byte aligned (torch's allocator gives that).
// Outputs are fully written by every successful call.
#pragma once
#include <cstdint>
#include <string>

#include "cuda/layout.h"
#include "mob.h"

namespace mob {

// Bytes of workspace an entry point needs for these sizes (`has_sim`: farthest_point_sample is given the Gram matrix;
// `options`: CudaOptions bits). -1 for negative sizes, an unknown op or option, or int64 overflow.
int64_t cuda_workspace_bytes(int op, int64_t B, int64_t N, int64_t L, int64_t k_p, int64_t k, bool has_sim,
                             int64_t options);

// gram: out [B, N, N] float32 contiguous = v̂_i · v̂_j with v̂ = v / max(|v|, 1e-12). No workspace.
std::string gram_cuda(int device, void* stream, int64_t B, int64_t N, int64_t d, Features vis, float* out,
                      int64_t options);

// prompt_cover: picks [B, k_p] by descending covering score (-1 padded), count [B]. mask [B, L] (true = real row);
// fold [B]: each sample's neighbour count, resolved by the caller (mob_kernels/methods/mob.py resolve_fold).
std::string prompt_cover_cuda(int device, void* stream, int64_t B, int64_t N, int64_t L, int64_t d, Features vis,
                              Features prompt, const bool* mask, int64_t k_p, const int64_t* fold, int64_t* picks,
                              int64_t* count, void* workspace, int64_t workspace_bytes, int64_t options);

// farthest_point_sample: seed [B, m] (-1 padded) are taken and seed the distances; valid [B, N] or null (all valid);
// sim [B, N, N] float32 (element strides sim_bs, sim_rs, unit column stride) or null (computed here); sample b makes
// min(num_picks[b], k, untaken valid) picks, written to out [B, k] in selection order, -1 padded.
std::string farthest_point_sample_cuda(int device, void* stream, int64_t B, int64_t N, int64_t d, Features vis,
                                       const int64_t* seed, int64_t m, const int64_t* num_picks, int64_t k,
                                       const bool* valid, const float* sim, int64_t sim_bs, int64_t sim_rs,
                                       int64_t* out, void* workspace, int64_t workspace_bytes, int64_t options);

// dpp_greedy: greedy MAP of the DPP with kernel r_i S_ij r_j over the valid tokens. relevance [B, N] float32, valid
// [B, N]; order [B, k] (-1 after a stop), gain [B, k] float32 (0 after a stop).
std::string dpp_greedy_cuda(int device, void* stream, int64_t B, int64_t N, int64_t d, Features vis,
                            const float* relevance, const bool* valid, int64_t k, int64_t* order, float* gain,
                            void* workspace, int64_t workspace_bytes, int64_t options);

// select (MoB): out [B, k] sorted ascending: the prompt cover's picks and FPS seeded by them for the rest.
std::string select_cuda(int device, void* stream, int64_t B, int64_t N, int64_t L, int64_t d, Features vis,
                        Features prompt, const bool* mask, int64_t k_p, int64_t k, const int64_t* fold, int64_t* out,
                        void* workspace, int64_t workspace_bytes, int64_t options);

// CUDART_VERSION this library was compiled against (e.g. 13000), for diagnostics.
int cuda_runtime_version();

}  // namespace mob
