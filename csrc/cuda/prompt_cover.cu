// CUDA prompt cover (the reference's prompt_cover): each valid prompt row j nominates its f best tokens T_j (finite
// similarities, value descending, ties to the lower index); token i scores c(i) = max of S[j, i] over the T_j holding
// it; the k_p best-scoring nominees are the picks, by descending score.
//
// Three launches (select shares them):
//   gram.cu            S[b, j, i] = p̂_j · v̂_i on tensor cores (the Gram kernel's prompt tiles), and cover[b] = -inf;
//   membership_kernel  one block per (prompt row j, sample b): i is in T_j when S[j, i] is finite and fewer than f
//                      finite entries rank before it (counting ranks needs no sort, is exact for any f, and a thread
//                      stops counting at f); members max-reduce S[j, i] into cover[b, i] with an integer atomic max
//                      (order-independent, so deterministic);
//   farthest_point_sample.cu's per-sample kernel, prompt-cover phase: the candidates (cover > -inf) compacted in
//                      index order, the k_p best by the same rank count; a candidate of rank r < k_p writes picks[r].
// The S row sits in shared memory when N floats fit the device's per-block limit, and is read from the workspace
// otherwise.
#include "cuda/common.cuh"

namespace mob::gpu {
namespace {

constexpr int kMemberThreads = 256;

__global__ void __launch_bounds__(kMemberThreads)
    membership_kernel(const float* sim, const bool* mask, int64_t B, int64_t N, int64_t L, const int64_t* fold,
                      float* cover, bool row_in_shared) {
  extern __shared__ float shared_row[];
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    // The sample's neighbour count f, resolved by the caller (mob_kernels/methods/mob.py resolve_fold), in [0, N].
    const int64_t f = fold[b] < 0 ? 0 : (fold[b] > N ? N : fold[b]);
    for (int64_t j = blockIdx.x; j < L; j += gridDim.x) {
      if (!mask[b * L + j] || f == 0) continue;  // padding rows take no part; uniform across the block
      const float* row = sim + (b * L + j) * N;
      if (row_in_shared) {
        for (int64_t i = threadIdx.x; i < N; i += blockDim.x) shared_row[i] = row[i];
        __syncthreads();
        row = shared_row;
      }
      for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
        const float s = row[i];
        if (!isfinite(s)) continue;
        int64_t ahead = 0;  // finite entries ranking before i, counted up to f
        for (int64_t q = 0; q < N && ahead < f; ++q) {
          const float x = row[q];
          ahead += (isfinite(x) && ranks_before(x, q, s, i)) ? 1 : 0;
        }
        if (ahead < f) atomic_max_float(cover + b * N + i, s);
      }
      if (row_in_shared) __syncthreads();  // the shared row is overwritten by the next j
    }
  }
}

}  // namespace

std::string launch_membership(cudaStream_t stream, int device, int64_t B, int64_t N, int64_t L, const float* sim,
                              const bool* mask, const int64_t* fold, float* cover, int64_t options) {
  if (B == 0 || N == 0 || L == 0) return "";
  const int64_t row_bytes = N * static_cast<int64_t>(sizeof(float));
  const bool row_in_shared = shared_memory_fits(membership_kernel, row_bytes, device, options);
  membership_kernel<<<dim3(grid_dim(L, 65535), grid_dim(B, 65535)), kMemberThreads, row_in_shared ? row_bytes : 0,
                      stream>>>(sim, mask, B, N, L, fold, cover, row_in_shared);
  return check_launch("membership_kernel");
}

}  // namespace mob::gpu

std::string mob::prompt_cover_cuda(int device, void* stream, int64_t B, int64_t N, int64_t L, int64_t d,
                                   Features vis, Features prompt, const bool* mask, int64_t k_p, const int64_t* fold,
                                   int64_t* picks, int64_t* count, void* workspace, int64_t workspace_bytes,
                                   int64_t options) {
  const gpu::Layout l = gpu::workspace_layout(static_cast<int>(CudaOp::kPromptCover), B, N, L, k_p, 0, false, options);
  const std::string err = gpu::first_error({
      gpu::check_cuda_sizes(Sizes{B, N, L, d, k_p, N}, options),
      check_pointer("vis", vis.data, gpu::elements(B, N, d)),
      check_pointer("prompt", prompt.data, gpu::elements(B, L, d)),
      check_pointer("mask", mask, gpu::elements(B, L)),
      check_pointer("fold", fold, B),
      check_pointer("picks", picks, gpu::elements(B, k_p)),
      check_pointer("count", count, B),
      gpu::check_workspace(l, workspace, workspace_bytes),
  });
  if (!err.empty()) return err;
  if (B == 0) return "";
  if (const std::string e = gpu::use_device(device); !e.empty()) return e;
  const auto s = static_cast<cudaStream_t>(stream);
  const bool cover_on = k_p > 0 && L > 0 && N > 0;
  for (int64_t b0 = 0; b0 < B; b0 += l.chunk) {
    const int64_t nb = B - b0 < l.chunk ? B - b0 : l.chunk;
    float* cover = cover_on ? gpu::at<float>(workspace, l.cover) : nullptr;
    if (cover_on) {
      gpu::GramJob g;
      g.B = nb;
      g.N = N;
      g.L = L;
      g.d = d;
      g.vis = gpu::offset_features(vis, b0);
      g.prompt = gpu::offset_features(prompt, b0);
      g.sim = gpu::at<float>(workspace, l.sim);
      g.cover = cover;
      std::string e = gpu::launch_gram(s, g);
      if (e.empty())
        e = gpu::launch_membership(s, device, nb, N, L, g.sim, mask + b0 * L, fold + b0, cover, options);
      if (!e.empty()) return e;
    }
    gpu::FpsJob f;  // the prompt-cover phase only (k = 0)
    f.B = nb;
    f.N = N;
    f.d = d;
    f.vis = gpu::offset_features(vis, b0);
    f.cover = cover;
    f.k_p = k_p;
    f.picks = picks + b0 * k_p;
    f.count = count + b0;
    f.g_keys = gpu::at<float>(workspace, l.keys);
    f.g_index = gpu::at<int32_t>(workspace, l.index);
    if (const std::string e = gpu::launch_fps(s, device, f, options); !e.empty()) return e;
  }
  return "";
}
