// CUDA farthest point sampling (SPEC.md §2 step 3) and the whole select (§2), plus the workspace query.
//
// fps_kernel: one block per sample (a grid-stride loop over samples). The running min-distances dist[N] and the taken
// flags live in shared memory when N * 5 bytes fit the device's per-block limit, else in the global workspace (same
// code through generic pointers). Each step is one sweep: warp w owns rows w, w + W, ...; for every untaken row it
// computes dot(v_i, v_centre) with the whole warp (coalesced along d, float32 accumulation of the raw inputs), sets
// dist(i) = min(dist(i), 1 - dot * inv_i * inv_centre) (a NaN stays, as torch.minimum), and keeps its best
// (dist, lower index) candidate; a warp-shuffle argmax and one across warps pick the next centre. Two barriers per
// step, no atomics, no host sync. Seeds (the prompt cover, -1 = none) are marked taken and swept in first; with no
// seed the first pick is the largest raw norm (NaN ranking lowest), as reference.py does.
// For select, the taken flags at the end are exactly S_p ∪ S_v, so a block-wide ballot/prefix compaction writes them
// out already sorted: no sort kernel.
#include "cuda/common.cuh"

namespace mob::gpu {
namespace {

constexpr int kFpsThreads = 512;

struct FpsArgs {
  const void* vis;
  int64_t v_bs, v_rs;
  int64_t B, N, d, k, m;
  const float* norm;  // [B, N]
  const float* inv;   // [B, N]
  const int64_t* seed;         // [B, m], -1 = none
  const int64_t* num_picks;    // [B] or null: then k - cover_count[b]
  const int64_t* cover_count;  // [B]
  int64_t* out_order;          // [B, k] or null
  int64_t* out_sorted;         // [B, k] or null
  float* g_dist;               // [B, N] global fallback
  uint8_t* g_taken;            // [B, N] global fallback
  bool in_shared;
};

// Shared-memory bytes for one sample's dist (float) and taken (uint8) arrays.
inline int64_t fps_shared_bytes(int64_t N) { return (N * 4 + 15) / 16 * 16 + N; }

struct FpsShared {
  ArgmaxScratch argmax;
  int64_t sum[kWarp + 1];
  int64_t warp_total[kWarp];
};

// dist(i) = min(dist(i), cosine distance to `centre`) for every untaken row (centre < 0: none), and the block's
// farthest untaken row when `want_argmax` (else the return value is meaningless). Every thread must call it.
template <typename T>
__device__ __forceinline__ int64_t sweep(const T* V, int64_t v_rs, const float* inv, int64_t N, int64_t d, int64_t centre,
                         float* dist, const uint8_t* taken, bool want_argmax, FpsShared& sh) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  Candidate best = no_candidate();
  const T* vc = centre >= 0 ? V + centre * v_rs : nullptr;
  const float inv_c = centre >= 0 ? inv[centre] : 0.f;
  for (int64_t i = warp; i < N; i += nwarps) {  // i is warp-uniform: the shuffles inside see the full warp
    if (taken[i]) continue;
    float di = dist[i];
    if (vc) {
      const float dot = warp_dot(V + i * v_rs, vc, d, lane);
      di = nan_min(di, 1.0f - dot * inv[i] * inv_c);
      __syncwarp();  // every lane has read dist[i] before lane 0 overwrites it
      if (lane == 0) dist[i] = di;
    }
    keep_better(best, isnan(di) ? kNanRank : di, i);
  }
  if (!want_argmax) return -1;
  return block_argmax(best, sh.argmax);
}

// out[0..k) = indices i < N with taken[i], ascending (-1 past the last); a ballot and a prefix over warps per chunk.
__device__ __forceinline__ void write_taken_sorted(const uint8_t* taken, int64_t N, int64_t k, int64_t* out, FpsShared& sh) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  int64_t base = 0;
  for (int64_t i0 = 0; i0 < N; i0 += blockDim.x) {
    const int64_t i = i0 + threadIdx.x;
    const bool flag = i < N && taken[i];
    const unsigned ballot = __ballot_sync(kFullMask, flag);
    if (lane == 0) sh.warp_total[warp] = __popc(ballot);
    __syncthreads();
    int64_t before = 0, total = 0;
    for (int w = 0; w < nwarps; ++w) {
      before += w < warp ? sh.warp_total[w] : 0;
      total += sh.warp_total[w];
    }
    const int64_t pos = base + before + __popc(ballot & ((1u << lane) - 1u));
    if (flag && pos < k) out[pos] = i;
    base += total;
    __syncthreads();  // warp_total is rewritten by the next chunk
  }
  for (int64_t r = base + threadIdx.x; r < k; r += blockDim.x) out[r] = -1;  // unreachable for valid arguments
}

template <typename T>
__global__ void __launch_bounds__(kFpsThreads, 1) fps_kernel(FpsArgs a) {
  extern __shared__ __align__(16) unsigned char fps_smem[];
  __shared__ FpsShared sh;
  const int64_t N = a.N, k = a.k;
  for (int64_t b = blockIdx.x; b < a.B; b += gridDim.x) {
    float* dist = a.in_shared ? reinterpret_cast<float*>(fps_smem) : a.g_dist + b * N;
    uint8_t* taken = a.in_shared ? fps_smem + (N * 4 + 15) / 16 * 16 : a.g_taken + b * N;
    const T* V = static_cast<const T*>(a.vis) + b * a.v_bs;
    const float* inv = a.inv + b * N;
    const float* norm = a.norm + b * N;
    const int64_t* seed = a.seed ? a.seed + b * a.m : nullptr;
    int64_t* order = a.out_order ? a.out_order + b * k : nullptr;

    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
      dist[i] = INFINITY;
      taken[i] = 0;
    }
    if (order)
      for (int64_t t = threadIdx.x; t < k; t += blockDim.x) order[t] = -1;
    __syncthreads();
    for (int64_t s = threadIdx.x; s < a.m; s += blockDim.x)
      if (seed[s] >= 0 && seed[s] < N) taken[seed[s]] = 1;  // duplicates write the same 1
    __syncthreads();
    int64_t n_taken = 0;
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) n_taken += taken[i];
    n_taken = block_sum(n_taken, sh.sum);

    int64_t want = a.num_picks ? a.num_picks[b] : k - a.cover_count[b];
    want = want < 0 ? 0 : (want < k ? want : k);
    const int64_t n = want < N - n_taken ? want : N - n_taken;

    int64_t t = 0, centre = -1;
    if (n > 0) {
      for (int64_t s = 0; s < a.m; ++s)  // seed[s] is block-uniform
        if (seed[s] >= 0 && seed[s] < N) sweep(V, a.v_rs, inv, N, a.d, seed[s], dist, taken, false, sh);
      if (n_taken == 0) {  // no seed: the largest raw norm first, NaN ranking lowest
        Candidate best = no_candidate();
        for (int64_t i = threadIdx.x; i < N; i += blockDim.x) keep_better(best, isnan(norm[i]) ? -1.f : norm[i], i);
        centre = block_argmax(best, sh.argmax);
        if (threadIdx.x == 0) {
          taken[centre] = 1;
          if (order) order[0] = centre;
        }
        t = 1;
        __syncthreads();  // taken[centre] visible to every warp
      }
    }
    for (; t < n; ++t) {
      centre = sweep(V, a.v_rs, inv, N, a.d, centre, dist, taken, true, sh);
      if (threadIdx.x == 0) {
        taken[centre] = 1;
        if (order) order[t] = centre;
      }
      __syncthreads();
    }
    if (a.out_sorted) write_taken_sorted(taken, N, k, a.out_sorted + b * k, sh);
    __syncthreads();  // dist / taken are reused by the next sample
  }
}

}  // namespace

std::string launch_fps(cudaStream_t stream, int device, int64_t B, int64_t N, int64_t d, const Features& vis,
                       const int64_t* seed, int64_t m, const int64_t* num_picks, const int64_t* cover_count, int64_t k,
                       int64_t* out_order, int64_t* out_sorted, void* workspace, const Layout& l, int64_t options) {
  if (B == 0 || k == 0) return "";
  FpsArgs a{vis.data, vis.batch_stride, vis.row_stride, B, N, d, k, seed ? m : 0,
            at<float>(workspace, l.vnorm), at<float>(workspace, l.vinv), seed, num_picks, cover_count,
            out_order, out_sorted, at<float>(workspace, l.dist), at<uint8_t>(workspace, l.taken), false};
  std::string err = launch_row_norms(stream, B, N, d, vis, const_cast<float*>(a.norm), const_cast<float*>(a.inv));
  if (!err.empty()) return err;
  return dispatch_dtype(vis.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t bytes = fps_shared_bytes(N);
    a.in_shared = shared_memory_fits(fps_kernel<T>, bytes, device, options);
    fps_kernel<T><<<grid_dim(B, INT32_MAX), kFpsThreads, a.in_shared ? bytes : 0, stream>>>(a);
    return check_launch("fps_kernel");
  });
}

}  // namespace mob::gpu

namespace mob {
namespace {
std::string check_sizes(int64_t B, int64_t N, int64_t L, int64_t d, int64_t k) {
  if (B < 0 || N < 0 || L < 0 || d < 0) return "sizes must be >= 0";
  if (k < 0 || k > N) return "k must be in [0, N], got k=" + std::to_string(k) + " with N=" + std::to_string(N);
  return "";
}
std::string check_workspace(const gpu::Layout& l, int64_t bytes) {
  if (l.total >= 0 && bytes >= l.total) return "";
  return "workspace too small: need " + std::to_string(l.total) + " bytes, got " + std::to_string(bytes);
}
}  // namespace

int64_t cuda_workspace_bytes(int op, int64_t B, int64_t N, int64_t L, int64_t k_p) {
  if (op < 0 || op > 2 || B < 0 || N < 0 || L < 0 || k_p < 0) return -1;
  return gpu::workspace_layout(op, B, N, L, k_p).total;
}

int cuda_runtime_version() { return CUDART_VERSION; }

std::string farthest_point_sample_cuda(int device, void* stream, int64_t B, int64_t N, int64_t d, Features vis,
                                       const int64_t* seed, int64_t m, const int64_t* num_picks, int64_t k,
                                       int64_t* out, void* workspace, int64_t workspace_bytes, int64_t options) {
  std::string err = check_sizes(B, N, 0, d, k);
  if (err.empty() && m < 0) err = "m must be >= 0";
  if (err.empty() && !num_picks) err = "num_picks must not be null";
  const gpu::Layout l = gpu::workspace_layout(1, B, N, 0, 0);
  if (err.empty()) err = check_workspace(l, workspace_bytes);
  if (err.empty()) err = gpu::use_device(device);
  if (!err.empty()) return err;
  return gpu::launch_fps(static_cast<cudaStream_t>(stream), device, B, N, d, vis, m ? seed : nullptr, m, num_picks,
                         nullptr, k, out, nullptr, workspace, l, options);
}

std::string select_cuda(int device, void* stream, int64_t B, int64_t N, int64_t L, int64_t d, Features vis,
                        Features prompt, const bool* mask, int64_t k_p, int64_t k, const int64_t* fold, int64_t* out,
                        void* workspace, int64_t workspace_bytes, int64_t options) {
  std::string err = check_sizes(B, N, L, d, k);
  if (err.empty() && (k_p < 0 || k_p > k)) err = "k_p must be in [0, k], got k_p=" + std::to_string(k_p);
  if (err.empty() && !fold && B > 0) err = "fold must not be null";
  const gpu::Layout l = gpu::workspace_layout(2, B, N, L, k_p);
  if (err.empty()) err = check_workspace(l, workspace_bytes);
  if (err.empty()) err = gpu::use_device(device);
  if (!err.empty() || B == 0 || k == 0) return err;
  const auto s = static_cast<cudaStream_t>(stream);
  int64_t* picks = gpu::at<int64_t>(workspace, l.picks);
  int64_t* count = gpu::at<int64_t>(workspace, l.count);
  err = gpu::launch_prompt_cover(s, device, B, N, L, d, vis, prompt, mask, k_p, fold, picks, count, workspace, l,
                                 options);
  if (!err.empty()) return err;
  // FPS seeded by the cover for k - count picks; the taken set (cover ∪ FPS) comes out sorted.
  return gpu::launch_fps(s, device, B, N, d, vis, k_p ? picks : nullptr, k_p, nullptr, count, k, nullptr, out,
                         workspace, l, options);
}

}  // namespace mob
