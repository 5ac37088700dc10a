// Pieces shared by the CUDA kernels: dtype loads, SPEC.md's ordering rules, warp/block reductions, the workspace
// layout and the host-side plumbing (dtype dispatch, shared-memory sizing, launch error checks).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>

#include "cuda/mob_cuda.h"
#include "mob.h"

namespace mob::gpu {

constexpr float kEps = 1e-12f;
constexpr float kNanRank = -3.0f;  // finite cosine distances lie in [0, 2] up to rounding: NaN ranks below them
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

// ------------------------------------------------------------------------------------------------ device helpers

// Inputs of lower precision are converted on load; all arithmetic is float32 (SPEC §2).
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// Sum over the warp by a butterfly: every lane ends with the same, order-fixed (so deterministic) value.
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// dot(a, b) over d elements by the whole warp (lanes stride along d, so loads coalesce); same result on every lane.
template <typename T>
__device__ __forceinline__ float warp_dot(const T* a, const T* b, int64_t d, int lane) {
  float acc0 = 0.f, acc1 = 0.f;  // two chains hide the FMA latency
  int64_t c = lane;
  for (; c + kWarp < d; c += 2 * kWarp) {
    acc0 = fmaf(to_f32(a[c]), to_f32(b[c]), acc0);
    acc1 = fmaf(to_f32(a[c + kWarp]), to_f32(b[c + kWarp]), acc1);
  }
  if (c < d) acc0 = fmaf(to_f32(a[c]), to_f32(b[c]), acc0);
  return warp_sum(acc0 + acc1);
}

// torch.minimum semantics: a NaN, once there, stays.
__device__ __forceinline__ float nan_min(float cur, float x) {
  if (isnan(cur)) return cur;
  return (isnan(x) || x < cur) ? x : cur;
}

// 1 / clamp_min(norm, eps) with torch's NaN propagation (fmaxf would drop the NaN).
__device__ __forceinline__ float inverse_norm(float norm) { return 1.0f / (isnan(norm) ? norm : fmaxf(norm, kEps)); }

// "Largest, ties to the lower index" (SPEC §2).
struct Candidate {
  float key;
  int64_t idx;
};
__device__ __forceinline__ bool ranks_before(float a, int64_t ia, float b, int64_t ib) {
  return a > b || (a == b && ia < ib);
}
__device__ __forceinline__ Candidate no_candidate() { return {-INFINITY, LLONG_MAX}; }
__device__ __forceinline__ void keep_better(Candidate& best, float key, int64_t idx) {
  if (ranks_before(key, idx, best.key, best.idx)) best = {key, idx};
}

// Argmax over the warp by shuffles; every lane ends with the winner.
__device__ __forceinline__ Candidate warp_argmax(Candidate c) {
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const float k = __shfl_xor_sync(kFullMask, c.key, o);
    const long long i = __shfl_xor_sync(kFullMask, static_cast<long long>(c.idx), o);
    keep_better(c, k, i);
  }
  return c;
}

// Scratch for block_argmax; one per block, in static shared memory.
struct ArgmaxScratch {
  float key[kWarp];
  int64_t idx[kWarp];
  int64_t winner;
};

// Block-wide argmax of each thread's candidate; returns the winner's index to every thread. Contains two
// __syncthreads, so every thread of the block must call it.
__device__ __forceinline__ int64_t block_argmax(Candidate c, ArgmaxScratch& s) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  c = warp_argmax(c);
  if (lane == 0) {
    s.key[warp] = c.key;
    s.idx[warp] = c.idx;
  }
  __syncthreads();
  if (warp == 0) {
    Candidate w = lane < nwarps ? Candidate{s.key[lane], s.idx[lane]} : no_candidate();
    w = warp_argmax(w);
    if (lane == 0) s.winner = w.idx;
  }
  __syncthreads();
  return s.winner;
}

// Block-wide sum of one int64 per thread (every thread must call it; two __syncthreads).
__device__ __forceinline__ int64_t block_sum(int64_t v, int64_t* scratch /* kWarp + 1 */) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, static_cast<long long>(v), o);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t total = 0;
    for (int w = 0; w < nwarps; ++w) total += scratch[w];
    scratch[kWarp] = total;
  }
  __syncthreads();
  return scratch[kWarp];
}

// Element pointer of row i of sample b (int64 offsets: N * d may exceed 2^31).
template <typename T>
__device__ __forceinline__ const T* row_of(const T* base, int64_t batch_stride, int64_t row_stride, int64_t b,
                                           int64_t i) {
  return base + b * batch_stride + i * row_stride;
}

// ----------------------------------------------------------------------------------------------- workspace layout

// Byte offsets into the caller's workspace (each region 256-byte aligned); -1 where an op does not use a region.
struct Layout {
  int64_t vnorm = -1, vinv = -1, pnorm = -1, pinv = -1, sim = -1, member = -1, cover = -1, picks = -1, count = -1,
          dist = -1, taken = -1;
  int64_t total = 0;  // -1 if the sizes overflow int64
};

inline Layout workspace_layout(int op, int64_t B, int64_t N, int64_t L, int64_t k_p) {
  Layout l;
  bool overflow = false;
  auto take = [&](int64_t& at, int64_t a, int64_t b, int64_t c, int64_t elem) {
    int64_t n = 0;
    overflow |= __builtin_mul_overflow(a, b, &n) || __builtin_mul_overflow(n, c, &n) ||
                __builtin_mul_overflow(n, elem, &n) || n > (INT64_MAX / 2);
    at = l.total;
    if (!overflow) l.total += (n + 255) / 256 * 256;
  };
  const bool cover = op == 0 || op == 2, fps = op == 1 || op == 2;
  take(l.vnorm, B, N, 1, 4);
  take(l.vinv, B, N, 1, 4);
  if (cover) {
    take(l.pnorm, B, L, 1, 4);
    take(l.pinv, B, L, 1, 4);
    take(l.sim, B, L, N, 4);
    take(l.member, B, L, N, 4);
    take(l.cover, B, N, 1, 4);
  }
  if (op == 2) {
    take(l.picks, B, k_p, 1, 8);
    take(l.count, B, 1, 1, 8);
  }
  if (fps) {
    take(l.dist, B, N, 1, 4);
    take(l.taken, B, N, 1, 1);
  }
  if (overflow) l.total = -1;
  return l;
}

template <typename T>
inline T* at(void* workspace, int64_t offset) {
  return reinterpret_cast<T*>(static_cast<char*>(workspace) + offset);
}

// ------------------------------------------------------------------------------------------------- host plumbing

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) with T the element type of `t`.
template <typename F>
std::string dispatch_dtype(DType t, F&& f) {
  switch (t) {
    case DType::kFloat32:
      return f(Tag<float>{});
    case DType::kFloat16:
      return f(Tag<__half>{});
    case DType::kBFloat16:
      return f(Tag<__nv_bfloat16>{});
  }
  return "dtype tag must be 0 (float32), 1 (float16) or 2 (bfloat16)";
}

inline std::string cuda_error(const char* what, cudaError_t e) {
  return std::string("mob_kernels CUDA backend: ") + what + " failed: " + cudaGetErrorName(e) + " (" +
         cudaGetErrorString(e) + ")";
}

// After a launch: configuration errors show up here; no host synchronisation.
inline std::string check_launch(const char* kernel) {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : cuda_error(kernel, e);
}

// Whether `kernel` can get `bytes` of dynamic shared memory on the current device (opting in above the 48 KiB
// default when the device allows more). False means: use the global-workspace path.
template <typename K>
inline bool shared_memory_fits(K* kernel, int64_t bytes, int device, int64_t options) {
  if (options & kCudaForceGlobalWorkspace) return false;
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  cudaFuncAttributes fa{};
  if (cudaFuncGetAttributes(&fa, kernel) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (bytes + static_cast<int64_t>(fa.sharedSizeBytes) > optin) return false;
  if (bytes > fa.maxDynamicSharedSizeBytes &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)) !=
          cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return true;
}

// Selects `device` in this library's runtime (it links cudart statically, so torch's current device is not ours).
inline std::string use_device(int device) {
  const cudaError_t e = cudaSetDevice(device);
  return e == cudaSuccess ? std::string() : cuda_error("cudaSetDevice", e);
}

inline unsigned grid_dim(int64_t n, int64_t cap) { return static_cast<unsigned>(n < 1 ? 1 : (n < cap ? n : cap)); }

// ------------------------------------------------------------------------- stages (each .cu file defines its own)
// All enqueue on `stream` and return "" or an error message; the device is already selected.

// norm[b * R + i] = ||row i of sample b||, inv[...] = 1 / clamp_min(norm, eps). (norms.cu)
std::string launch_row_norms(cudaStream_t stream, int64_t B, int64_t R, int64_t d, const Features& x, float* norm,
                             float* inv);

// SPEC steps 1-2 given the inverse norms in the workspace: picks [B, k_p] (-1 padded), count [B]. (prompt_cover.cu)
std::string launch_prompt_cover(cudaStream_t stream, int device, int64_t B, int64_t N, int64_t L, int64_t d,
                                const Features& vis, const Features& prompt, const bool* mask, int64_t k_p,
                                const int64_t* fold, int64_t* picks, int64_t* count, void* workspace, const Layout& l,
                                int64_t options);

// SPEC step 3 given the norms in the workspace. Sample b makes min(want, k, untaken) picks, where want is
// num_picks[b] or, when num_picks is null, k - cover_count[b]. out_order [B, k] gets the picks in selection order
// (-1 padded) and out_sorted [B, k] every taken token (seeds included) ascending; either may be null.
// (farthest_point_sample.cu)
std::string launch_fps(cudaStream_t stream, int device, int64_t B, int64_t N, int64_t d, const Features& vis,
                       const int64_t* seed, int64_t m, const int64_t* num_picks, const int64_t* cover_count, int64_t k,
                       int64_t* out_order, int64_t* out_sorted, void* workspace, const Layout& l, int64_t options);

}  // namespace mob::gpu
