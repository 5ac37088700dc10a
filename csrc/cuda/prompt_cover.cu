// CUDA prompt cover: SPEC.md §2 steps 0-2.
//
//   similarity_kernel  S[b, j, i] = dot(p_j, v_i) * inv|p_j| * inv|v_i|, a 32 x 32 shared-memory tiled product
//                      (float32 accumulation of the raw inputs; no TF32, so SPEC §4's exactness holds).
//   membership_kernel  one block per (prompt row j, sample b): token i is in T_j when S[j, i] is finite and fewer
//                      than f finite entries rank before it (value desc, index asc). Writes M[b, j, i] = S[j, i]
//                      for members and -inf otherwise (padding rows: all -inf). Counting ranks needs no sort, is
//                      exact for any f and keeps ties to the lower index; a thread stops counting at f.
//   cover_kernel       one block per sample: c(i) = max_j M[b, j, i] (-inf = not a candidate), then the k_p best
//                      candidates by the same rank count: a candidate of rank r < k_p writes picks[r] (ranks are
//                      distinct, so every slot has one writer: deterministic, no atomics on the result).
// The S row (membership) and c (cover) sit in shared memory when N floats fit the device's per-block limit, and are
// read from the global workspace otherwise. Every reduction is in a fixed order: the output never varies run to run.
#include "cuda/common.cuh"

namespace mob::gpu {
namespace {

constexpr int kTile = 32;          // tile edge (rows of each operand, and depth per pass)
constexpr int kTileRows = 8;       // threadIdx.y extent: each thread accumulates kTile / kTileRows outputs
constexpr int kRowThreads = 256;   // membership / cover blocks

template <typename T>
__global__ void __launch_bounds__(kTile* kTileRows)
    similarity_kernel(const T* vis, int64_t v_bs, int64_t v_rs, const T* prompt, int64_t p_bs, int64_t p_rs,
                      int64_t B, int64_t N, int64_t L, int64_t d, const float* vinv, const float* pinv, float* sim) {
  __shared__ float p_tile[kTile][kTile + 1];  // +1: column reads hit distinct banks
  __shared__ float v_tile[kTile][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  constexpr int kPer = kTile / kTileRows;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  for (int64_t b = blockIdx.z; b < B; b += gridDim.z) {
    for (int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTile; j0 < L; j0 += static_cast<int64_t>(gridDim.y) * kTile) {
      float acc[kPer] = {};
      for (int64_t c0 = 0; c0 < d; c0 += kTile) {
        const int64_t c = c0 + tx;
#pragma unroll
        for (int r = 0; r < kPer; ++r) {
          const int row = ty + r * kTileRows;
          const int64_t i = i0 + row, j = j0 + row;
          v_tile[row][tx] = (i < N && c < d) ? to_f32(row_of(vis, v_bs, v_rs, b, i)[c]) : 0.f;
          p_tile[row][tx] = (j < L && c < d) ? to_f32(row_of(prompt, p_bs, p_rs, b, j)[c]) : 0.f;
        }
        __syncthreads();
#pragma unroll 8
        for (int cc = 0; cc < kTile; ++cc) {
          const float v = v_tile[tx][cc];
#pragma unroll
          for (int r = 0; r < kPer; ++r) acc[r] = fmaf(p_tile[ty + r * kTileRows][cc], v, acc[r]);
        }
        __syncthreads();
      }
      const int64_t i = i0 + tx;
#pragma unroll
      for (int r = 0; r < kPer; ++r) {
        const int64_t j = j0 + ty + r * kTileRows;
        if (i < N && j < L) sim[(b * L + j) * N + i] = acc[r] * pinv[b * L + j] * vinv[b * N + i];
      }
    }
  }
}

__global__ void __launch_bounds__(kRowThreads)
    membership_kernel(const float* sim, const bool* mask, int64_t B, int64_t N, int64_t L, const int64_t* fold,
                      float* member, bool row_in_shared) {
  extern __shared__ float shared_row[];
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    // The sample's neighbour count f, resolved by the caller (mob_kernels/methods/mob.py resolve_fold), in [0, N].
    const int64_t f = fold[b] < 0 ? 0 : (fold[b] > N ? N : fold[b]);
    for (int64_t j = blockIdx.x; j < L; j += gridDim.x) {
      const float* src = sim + (b * L + j) * N;
      float* dst = member + (b * L + j) * N;
      if (!mask[b * L + j]) {  // padding prompt rows take no part
        for (int64_t i = threadIdx.x; i < N; i += blockDim.x) dst[i] = -INFINITY;
        continue;  // uniform across the block: no barrier is skipped by some threads only
      }
      const float* row = src;
      if (row_in_shared) {
        for (int64_t i = threadIdx.x; i < N; i += blockDim.x) shared_row[i] = src[i];
        __syncthreads();
        row = shared_row;
      }
      for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
        const float s = row[i];
        bool in = false;
        if (isfinite(s)) {
          int64_t ahead = 0;  // finite entries ranking before i, counted up to f
          for (int64_t q = 0; q < N && ahead < f; ++q) {
            const float x = row[q];
            ahead += (isfinite(x) && ranks_before(x, q, s, i)) ? 1 : 0;
          }
          in = ahead < f;
        }
        dst[i] = in ? s : -INFINITY;
      }
      __syncthreads();  // the shared row is overwritten by the next j
    }
  }
}

__global__ void __launch_bounds__(kRowThreads)
    cover_kernel(const float* member, int64_t B, int64_t N, int64_t L, int64_t k_p, float* cover_ws,
                 bool cover_in_shared, int64_t* picks, int64_t* count) {
  extern __shared__ float shared_cover[];
  __shared__ int64_t scratch[kWarp + 1];
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    float* cover = cover_in_shared ? shared_cover : cover_ws + b * N;
    int64_t candidates = 0;
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
      float c = -INFINITY;
      for (int64_t j = 0; j < L; ++j) c = fmaxf(c, member[(b * L + j) * N + i]);  // members are finite
      cover[i] = c;
      candidates += c > -INFINITY ? 1 : 0;
    }
    for (int64_t r = threadIdx.x; r < k_p; r += blockDim.x) picks[b * k_p + r] = -1;
    candidates = block_sum(candidates, scratch);  // its barriers also publish cover[] and the -1 padding
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
      const float c = cover[i];
      if (!(c > -INFINITY)) continue;
      int64_t ahead = 0;
      for (int64_t q = 0; q < N && ahead < k_p; ++q) ahead += ranks_before(cover[q], q, c, i) ? 1 : 0;
      if (ahead < k_p) picks[b * k_p + ahead] = i;
    }
    if (threadIdx.x == 0) count[b] = candidates < k_p ? candidates : k_p;
    __syncthreads();  // cover[] is reused by the next sample
  }
}

}  // namespace

std::string launch_prompt_cover(cudaStream_t stream, int device, int64_t B, int64_t N, int64_t L, int64_t d,
                                const Features& vis, const Features& prompt, const bool* mask, int64_t k_p,
                                const int64_t* fold, int64_t* picks, int64_t* count, void* workspace, const Layout& l,
                                int64_t options) {
  if (B == 0) return "";
  if (k_p == 0 || N == 0 || L == 0) {  // S_p is empty: all -1 picks (every byte 0xff), zero counts
    cudaError_t e = k_p ? cudaMemsetAsync(picks, 0xff, sizeof(int64_t) * B * k_p, stream) : cudaSuccess;
    if (e == cudaSuccess) e = cudaMemsetAsync(count, 0, sizeof(int64_t) * B, stream);
    return e == cudaSuccess ? std::string() : cuda_error("cudaMemsetAsync", e);
  }
  float* vinv = at<float>(workspace, l.vinv);
  float* pinv = at<float>(workspace, l.pinv);
  float* sim = at<float>(workspace, l.sim);
  float* member = at<float>(workspace, l.member);
  std::string err = launch_row_norms(stream, B, N, d, vis, at<float>(workspace, l.vnorm), vinv);
  if (err.empty()) err = launch_row_norms(stream, B, L, d, prompt, at<float>(workspace, l.pnorm), pinv);
  if (!err.empty()) return err;

  err = dispatch_dtype(vis.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const dim3 grid(grid_dim((N + kTile - 1) / kTile, INT32_MAX), grid_dim((L + kTile - 1) / kTile, 65535),
                    grid_dim(B, 65535));
    similarity_kernel<T><<<grid, dim3(kTile, kTileRows), 0, stream>>>(
        static_cast<const T*>(vis.data), vis.batch_stride, vis.row_stride, static_cast<const T*>(prompt.data),
        prompt.batch_stride, prompt.row_stride, B, N, L, d, vinv, pinv, sim);
    return check_launch("similarity_kernel");
  });
  if (!err.empty()) return err;

  const int64_t row_bytes = N * static_cast<int64_t>(sizeof(float));
  const bool row_in_shared = shared_memory_fits(membership_kernel, row_bytes, device, options);
  membership_kernel<<<dim3(grid_dim(L, 65535), grid_dim(B, 65535)), kRowThreads, row_in_shared ? row_bytes : 0,
                      stream>>>(sim, mask, B, N, L, fold, member, row_in_shared);
  if (!(err = check_launch("membership_kernel")).empty()) return err;

  const bool cover_in_shared = shared_memory_fits(cover_kernel, row_bytes, device, options);
  cover_kernel<<<grid_dim(B, INT32_MAX), kRowThreads, cover_in_shared ? row_bytes : 0, stream>>>(
      member, B, N, L, k_p, at<float>(workspace, l.cover), cover_in_shared, picks, count);
  return check_launch("cover_kernel");
}

}  // namespace mob::gpu

std::string mob::prompt_cover_cuda(int device, void* stream, int64_t B, int64_t N, int64_t L, int64_t d,
                                   Features vis, Features prompt, const bool* mask, int64_t k_p, const int64_t* fold,
                                   int64_t* picks, int64_t* count, void* workspace, int64_t workspace_bytes,
                                   int64_t options) {
  if (B < 0 || N < 0 || L < 0 || d < 0) return "sizes must be >= 0";
  if (k_p < 0 || k_p > N) return "k_p must be in [0, N], got k_p=" + std::to_string(k_p);
  if (!fold && B > 0) return "fold must not be null";
  const gpu::Layout l = gpu::workspace_layout(0, B, N, L, k_p);
  if (l.total < 0 || workspace_bytes < l.total)
    return "workspace too small: need " + std::to_string(l.total) + " bytes, got " + std::to_string(workspace_bytes);
  std::string err = gpu::use_device(device);
  if (!err.empty()) return err;
  return gpu::launch_prompt_cover(static_cast<cudaStream_t>(stream), device, B, N, L, d, vis, prompt, mask, k_p,
                                  fold, picks, count, workspace, l, options);
}
