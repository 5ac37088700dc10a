// Pieces shared by the CUDA kernels: dtype loads, the contract's ordering and NaN rules, warp/block reductions, and
// the host-side plumbing (argument checks, dtype dispatch, shared-memory sizing, launch error checks). The stages the
// entry points chain (Gram, norms, prompt-cover membership, the per-sample FPS and DPP kernels) are declared at the
// bottom; each .cu file defines its own.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "checks.h"
#include "cuda/layout.h"
#include "cuda/mob_cuda.h"
#include "mob.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the mob_kernels CUDA backend needs sm_80 or newer (bf16/tf32 mma.sync, cp.async)"
#endif

namespace mob::gpu {

constexpr float kEps = 1e-12f;     // reference.EPS
constexpr float kNanRank = -3.0f;  // reference.NAN_RANK: finite cosine distances lie in [0, 2] up to rounding
constexpr float kDppStop = 1e-5f;  // reference.DPP_STOP
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

// ------------------------------------------------------------------------------------------------ device helpers

// Inputs of lower precision are converted on load; all arithmetic is float32.
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T zero_of();
template <>
__device__ __forceinline__ float zero_of<float>() { return 0.f; }
template <>
__device__ __forceinline__ __half zero_of<__half>() { return __float2half(0.f); }
template <>
__device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() { return __float2bfloat16(0.f); }

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

// torch.minimum / torch.amin semantics: a NaN, once there, stays.
__device__ __forceinline__ float nan_min(float cur, float x) {
  if (isnan(cur)) return cur;
  return (isnan(x) || x < cur) ? x : cur;
}
__device__ __forceinline__ float nan_max(float cur, float x) {
  if (isnan(cur)) return cur;
  return (isnan(x) || x > cur) ? x : cur;
}

// The per-row factor of a cosine: 1 / max(|v|, eps) for a finite row; NaN for a row holding NaN or inf (the
// reference's v / |v| has a NaN entry there, so every similarity with that row is NaN).
__device__ __forceinline__ float row_scale(float norm, bool finite) {
  return finite ? 1.0f / fmaxf(norm, kEps) : __int_as_float(0x7fc00000);
}

// v̂_i · v̂_j from the raw dot product and the two row factors, as the reference's unit rows give it: NaN with a
// non-finite row; 0 with a finite row whose norm overflows float32 (its unit row is 0 there; the raw product may be
// inf); otherwise raw * s_i * s_j.
__device__ __forceinline__ float cosine(float raw, float si, float sj) {
  if (isnan(si) || isnan(sj)) return si + sj;
  if (si == 0.f || sj == 0.f) return 0.f;
  return raw * si * sj;
}

// FPS keys (reference: nan_to_num(dist, nan=NAN_RANK) and, for the first unseeded pick, nan_to_num(norm, nan=-1);
// nan_to_num also maps +-inf to +-FLT_MAX).
__device__ __forceinline__ float distance_key(float d) {
  return isnan(d) ? kNanRank : fminf(fmaxf(d, -FLT_MAX), FLT_MAX);
}
__device__ __forceinline__ float norm_key(float n) { return isnan(n) ? -1.0f : fminf(fmaxf(n, -FLT_MAX), FLT_MAX); }

// "Largest, ties to the lower index" (torch.argmax / stable descending sort). Keys here are never NaN.
struct Candidate {
  float key;
  int idx;
};
__device__ __forceinline__ Candidate no_candidate() { return {-INFINITY, INT_MAX}; }
__device__ __forceinline__ bool ranks_before(float a, int64_t ia, float b, int64_t ib) {
  return a > b || (a == b && ia < ib);
}
// torch.argmax on data that may hold NaN: a NaN is the maximum (the first NaN wins).
__device__ __forceinline__ bool ranks_before_nan_first(float a, int ia, float b, int ib) {
  const bool an = isnan(a), bn = isnan(b);
  if (an || bn) return an && (!bn || ia < ib);
  return ranks_before(a, ia, b, ib);
}

template <bool kNanFirst>
__device__ __forceinline__ void keep_better(Candidate& best, float key, int idx) {
  const bool better = kNanFirst ? ranks_before_nan_first(key, idx, best.key, best.idx)
                                : ranks_before(key, idx, best.key, best.idx);
  if (better) best = {key, idx};
}

// Argmax over the warp by shuffles; every lane ends with the winner (a total order, so the result is unique).
template <bool kNanFirst>
__device__ __forceinline__ Candidate warp_argmax(Candidate c) {
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const float k = __shfl_xor_sync(kFullMask, c.key, o);
    const int i = __shfl_xor_sync(kFullMask, c.idx, o);
    keep_better<kNanFirst>(c, k, i);
  }
  return c;
}

// One block-wide argmax per step with a single barrier: warp winners go to slot set `parity`; after the barrier every
// warp reduces the same slots the same way. A slot set is rewritten two calls later, behind the barrier of the call in
// between, so no reader can still be reading it. Every thread must call it; blockDim.x is a multiple of 32.
struct ArgmaxSlots {
  float key[2][kWarp];
  int idx[2][kWarp];
};
template <bool kNanFirst>
__device__ __forceinline__ Candidate block_argmax(Candidate c, ArgmaxSlots& s, int parity) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  c = warp_argmax<kNanFirst>(c);
  if (lane == 0) {
    s.key[parity][warp] = c.key;
    s.idx[parity][warp] = c.idx;
  }
  __syncthreads();
  const Candidate w = lane < nwarps ? Candidate{s.key[parity][lane], s.idx[parity][lane]} : no_candidate();
  return warp_argmax<kNanFirst>(w);
}

// Block-wide sum of one int64 per thread (every thread must call it; two barriers). The result is read from
// scratch[kWarp], so the caller must pass a barrier before scratch is used again.
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

// max(*addr, v) for non-NaN floats, as an integer atomic on the bit pattern (order-independent, so deterministic).
__device__ __forceinline__ void atomic_max_float(float* addr, float v) {
  if (!signbit(v)) {
    atomicMax(reinterpret_cast<int*>(addr), __float_as_int(v));
  } else {
    atomicMin(reinterpret_cast<unsigned int*>(addr), __float_as_uint(v));
  }
}

// Element pointer of row i of sample b (int64 offsets: N * d may exceed 2^31).
template <typename T>
__device__ __forceinline__ const T* row_of(const T* base, int64_t batch_stride, int64_t row_stride, int64_t b,
                                           int64_t i) {
  return base + b * batch_stride + i * row_stride;
}

// One similarity row computed from the features (rows on demand): row[i] = v̂_i · v̂_c, a warp per token. Every
// thread must call it; the caller puts a barrier between it and any read of `row` by another thread.
template <typename T>
__device__ __forceinline__ void similarity_row(const T* V, int64_t v_rs, int64_t d, const float* scale, int64_t N,
                                               int64_t c, float* row) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  const T* vc = V + c * v_rs;
  const float sc = scale[c];
  for (int64_t i = warp; i < N; i += nwarps) {  // warp-uniform: the shuffles inside see the full warp
    const float raw = warp_dot(V + i * v_rs, vc, d, lane);
    if (lane == 0) row[i] = cosine(raw, scale[i], sc);
  }
}

// One sample's array: at byte `offset` of the dynamic shared memory, or `sample_offset` elements into the global
// fallback array; null where the kernel does not use it (offset < 0, or no fallback array).
template <typename E>
__device__ __forceinline__ E* shared_or_global(unsigned char* smem, bool in_shared, int64_t offset, E* global,
                                               int64_t sample_offset) {
  if (in_shared) return offset < 0 ? nullptr : reinterpret_cast<E*>(smem + offset);
  return global ? global + sample_offset : nullptr;
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

inline int64_t dtype_bytes(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// The features of samples [b0, ...): the same strides, the data pointer moved b0 samples on.
inline Features offset_features(const Features& f, int64_t b0) {
  Features g = f;
  if (f.data) g.data = static_cast<const char*>(f.data) + b0 * f.batch_stride * dtype_bytes(f.dtype);
  return g;
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
  if ((options & kCudaForceGlobalWorkspace) || bytes < 0) return false;
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

// ---------------------------------------------------------------------------------------------- argument checks

// a * b * c saturated at INT64_MAX (a count for csrc/checks.h's null check, which only asks "is anything there").
inline int64_t elements(int64_t a, int64_t b, int64_t c = 1) {
  if (a <= 0 || b <= 0 || c <= 0) return 0;
  int64_t n = 0;
  if (__builtin_mul_overflow(a, b, &n) || __builtin_mul_overflow(n, c, &n)) return INT64_MAX;
  return n;
}

// csrc/checks.h's size check plus what the kernels add: token indices are 32-bit, known option bits only.
inline std::string check_cuda_sizes(const Sizes& s, int64_t options) {
  std::string err = check_sizes(s);
  if (!err.empty()) return err;
  if (s.N >= INT32_MAX) return "N must be < 2^31 on the cuda backend, got N=" + std::to_string(s.N);
  if (options & ~kCudaKnownOptions) return "options has unknown bits: " + std::to_string(options);
  return "";
}

inline std::string check_workspace(const Layout& l, const void* workspace, int64_t bytes) {
  if (l.total < 0) return "workspace size overflows int64 for these sizes";
  if (bytes < l.total)
    return "workspace too small: need " + std::to_string(l.total) + " bytes, got " + std::to_string(bytes);
  return check_pointer("workspace", workspace, l.total);
}

// The first error of a list of checks, or "".
inline std::string first_error(std::initializer_list<std::string> errs) {
  for (const std::string& e : errs)
    if (!e.empty()) return e;
  return "";
}

template <typename T>
inline T* at(void* workspace, int64_t offset) {
  return offset < 0 ? nullptr : reinterpret_cast<T*>(static_cast<char*>(workspace) + offset);
}

// ------------------------------------------------------------------------- stages (each .cu file defines its own)
// All enqueue on `stream` and return "" or an error message; the device is already selected.

// gram.cu: one launch of tensor-core tiles for `B` samples. sim [B, L, N] = prompt x vis cosines (when non-null and
// L > 0); gram (batch stride g_bs, row stride g_rs) = vis x vis cosines, upper-triangle tiles mirrored (when
// non-null); norm [B, N] = raw vis norms (when non-null, with gram); cover [B, N] = -inf (when non-null, with sim).
struct GramJob {
  int64_t B = 0, N = 0, L = 0, d = 0;
  Features vis{}, prompt{};
  float* sim = nullptr;
  float* gram = nullptr;
  int64_t g_bs = 0, g_rs = 0;
  float* norm = nullptr;
  float* cover = nullptr;
};
std::string launch_gram(cudaStream_t stream, const GramJob& job);

// norms.cu: norm[b * R + i] = |row i of sample b| (when non-null) and scale[...] = row_scale(norm, finite row).
std::string launch_row_norms(cudaStream_t stream, int64_t B, int64_t R, int64_t d, const Features& x, float* norm,
                             float* scale);

// prompt_cover.cu: cover[b, i] = max of S[b, j, i] over the valid prompt rows j whose f best tokens hold i (cover must
// hold -inf beforehand; launch_gram sets it). sim [B, L, N].
std::string launch_membership(cudaStream_t stream, int device, int64_t B, int64_t N, int64_t L, const float* sim,
                              const bool* mask, const int64_t* fold, float* cover, int64_t options);

// farthest_point_sample.cu: the per-sample kernel (one block per sample): prompt-cover picks from `cover` when `count`
// is non-null, then (k > 0) FPS seeded by `seed` (or by those picks) reading similarity rows from `gram` (a Gram
// matrix), or computed from `vis` with `scale` (rows on demand).
struct FpsJob {
  int64_t B = 0, N = 0, d = 0, k = 0;
  Features vis{};
  const float* gram = nullptr;
  int64_t g_bs = 0, g_rs = 0;
  const float* norm = nullptr;   // [B, N]
  const float* scale = nullptr;  // [B, N] (rows on demand)
  const int64_t* seed = nullptr;
  int64_t m = 0;
  const bool* valid = nullptr;
  const int64_t* num_picks = nullptr;  // [B] or null: k - count
  const float* cover = nullptr;        // [B, N] or null: no candidate
  int64_t k_p = 0;
  int64_t* picks = nullptr;  // [B, k_p]
  int64_t* count = nullptr;  // [B]; non-null runs the prompt-cover picks
  int64_t* out_order = nullptr;
  int64_t* out_sorted = nullptr;
  float* g_keys = nullptr;  // global fallback arrays [B, N]
  int32_t* g_index = nullptr;
  float* g_row = nullptr;
  uint8_t* g_off = nullptr;
};
std::string launch_fps(cudaStream_t stream, int device, const FpsJob& job, int64_t options);

// dpp_greedy.cu: the greedy-DPP kernel (one block per sample).
struct DppJob {
  int64_t B = 0, N = 0, d = 0, k = 0;
  Features vis{};
  const float* gram = nullptr;
  int64_t g_bs = 0, g_rs = 0;
  const float* scale = nullptr;
  const float* relevance = nullptr;
  const bool* valid = nullptr;
  int64_t* order = nullptr;
  float* gain = nullptr;
  float* g_gain = nullptr;  // global fallback arrays
  float* g_row = nullptr;
  float* g_chol = nullptr;
};
std::string launch_dpp(cudaStream_t stream, int device, const DppJob& job, int64_t options);

}  // namespace mob::gpu
