// CUDA farthest point sampling (the reference's farthest_point_sample) over rows of a Gram matrix, and the per-sample
// half of the prompt cover and of select.
//
// fps_kernel, one block per sample (a grid-stride loop over samples). Token i belongs to thread i % blockDim for the
// whole kernel: only its owner reads or writes dist[i] and off[i] (taken or invalid), so the per-token state needs no
// barrier at all; barriers separate only the phases and the shared slots of the reductions.
//   1. prompt-cover picks (when `count` is given): candidates (cover > -inf) compacted in index order by ballots, the
//      k_p best by counting, per candidate, the candidates that rank before it; picks[rank] = token.
//   2. seeds folded in one parallel pass: dist[i] = amin over the seeds s of (1 - G[s, i]) (NaN propagates), off[i] =
//      i is a seed or not valid; a block sum gives the picks n = min(want, N - #off).
//   3. n steps: the owner folds the last centre's row into dist[i] (torch.minimum semantics) and offers its best
//      untaken token (key: distance, NaN ranking as NAN_RANK, ties to the lower index; the first unseeded pick ranks by
//      raw norm instead); one block argmax (one barrier, common.cuh) names the centre, whose owner marks it taken.
//   4. select: the taken flags are then exactly the cover picks and the FPS picks, so a ballot/prefix compaction
//      writes them out already sorted: no sort kernel.
// Similarity rows come from a Gram matrix (the workspace's, or the caller's `sim`): a row read is one coalesced load
// per token. Without one (N too large for the Gram budget, or kCudaRowsOnDemand) the row of each seed and centre is
// computed from the features by warps into a row buffer, with a barrier on each side. dist/off (and the candidate
// keys and indices of phase 1) live in shared memory when they fit, else in the global workspace; same code.
#include "cuda/common.cuh"

namespace mob::gpu {
namespace {

struct FpsArgs {
  int64_t B, N, d, k;
  const float* gram;
  int64_t g_bs, g_rs;
  const void* vis;
  int64_t v_bs, v_rs;
  const float* norm;
  const float* scale;
  const int64_t* seed;
  int64_t m;
  const bool* valid;
  const int64_t* num_picks;
  const float* cover;
  int64_t k_p;
  int64_t* picks;
  int64_t* count;
  int64_t* out_order;
  int64_t* out_sorted;
  bool in_shared;
  FpsShared sh;
  float* g_keys;
  int32_t* g_index;
  float* g_row;
  uint8_t* g_off;
};

// Phase 1: the k_p best candidates of `cover` (-inf: not a candidate; null: none) into picks[0, k_p), -1 padded;
// returns their number. Every thread must call it; it ends with a barrier.
__device__ int64_t cover_picks(const float* cover, int64_t N, int64_t k_p, float* key, int32_t* index, int64_t* picks,
                               int* warp_total) {
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp, nwarps = blockDim.x / kWarp;
  int64_t C = 0;
  if (cover) {
    for (int64_t i0 = 0; i0 < N; i0 += blockDim.x) {
      const int64_t i = i0 + tid;
      const float v = i < N ? cover[i] : -INFINITY;
      const bool cand = v > -INFINITY;
      const unsigned ballot = __ballot_sync(kFullMask, cand);
      if (lane == 0) warp_total[warp] = __popc(ballot);
      __syncthreads();
      int64_t before = 0, total = 0;
      for (int w = 0; w < nwarps; ++w) {
        before += w < warp ? warp_total[w] : 0;
        total += warp_total[w];
      }
      if (cand) {
        const int64_t pos = C + before + __popc(ballot & ((1u << lane) - 1u));
        key[pos] = v;
        index[pos] = static_cast<int32_t>(i);
      }
      C += total;
      __syncthreads();  // warp_total is rewritten by the next chunk; key/index complete after the last one
    }
  }
  const int64_t kc = C < k_p ? C : k_p;
  for (int64_t q = tid; q < C; q += blockDim.x) {
    const float v = key[q];
    const int32_t i = index[q];
    int64_t ahead = 0;  // candidates ranking before this one, counted up to k_p
    for (int64_t p = 0; p < C && ahead < k_p; ++p) ahead += ranks_before(key[p], index[p], v, i) ? 1 : 0;
    if (ahead < k_p) picks[ahead] = i;  // ranks are distinct: one writer per slot
  }
  for (int64_t r = kc + tid; r < k_p; r += blockDim.x) picks[r] = -1;
  __syncthreads();  // picks visible to the whole block; key/index free for the next phase
  return kc;
}

// Phase 4: out[0, k) = the tokens i < N with off[i], ascending (-1 past the last). Thread t reads only the off flags it
// owns (i = i0 + t with i0 a multiple of blockDim).
__device__ void write_taken_sorted(const uint8_t* off, int64_t N, int64_t k, int64_t* out, int* warp_total) {
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp, nwarps = blockDim.x / kWarp;
  int64_t base = 0;
  for (int64_t i0 = 0; i0 < N; i0 += blockDim.x) {
    const int64_t i = i0 + tid;
    const bool flag = i < N && off[i];
    const unsigned ballot = __ballot_sync(kFullMask, flag);
    if (lane == 0) warp_total[warp] = __popc(ballot);
    __syncthreads();
    int64_t before = 0, total = 0;
    for (int w = 0; w < nwarps; ++w) {
      before += w < warp ? warp_total[w] : 0;
      total += warp_total[w];
    }
    const int64_t pos = base + before + __popc(ballot & ((1u << lane) - 1u));
    if (flag && pos < k) out[pos] = i;
    base += total;
    __syncthreads();  // warp_total is rewritten by the next chunk
  }
  for (int64_t r = base + tid; r < k; r += blockDim.x) out[r] = -1;  // unreachable for valid arguments
}

template <typename T, bool kGram>
__global__ void __launch_bounds__(kRowThreadsMax) fps_kernel(const FpsArgs a) {
  extern __shared__ __align__(16) unsigned char fps_smem[];
  __shared__ ArgmaxSlots slots;
  __shared__ int64_t sum_scratch[kWarp + 1];
  __shared__ int warp_total[kWarp];
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int64_t N = a.N, k = a.k;

  for (int64_t b = blockIdx.x; b < a.B; b += gridDim.x) {
    float* dist = shared_or_global(fps_smem, a.in_shared, a.sh.keys, a.g_keys, b * N);
    int32_t* index = shared_or_global(fps_smem, a.in_shared, a.sh.index, a.g_index, b * N);
    float* rowbuf = shared_or_global(fps_smem, a.in_shared, a.sh.row, a.g_row, b * N);
    uint8_t* off = shared_or_global(fps_smem, a.in_shared, a.sh.off, a.g_off, b * N);

    // ---- 1. prompt-cover picks
    int64_t count = 0;
    if (a.count) {
      count = cover_picks(a.cover ? a.cover + b * N : nullptr, N, a.k_p, dist, index, a.picks + b * a.k_p,
                          warp_total);
      if (tid == 0) a.count[b] = count;
    }
    if (k == 0) continue;  // block-uniform; cover_picks ended with a barrier

    // ---- 2. seeds
    const int64_t m = a.seed ? a.m : 0;
    const int64_t* seed = a.seed ? a.seed + b * m : nullptr;
    const bool* valid = a.valid ? a.valid + b * N : nullptr;
    const float* G = kGram ? a.gram + b * a.g_bs : nullptr;
    const T* V = static_cast<const T*>(a.vis) + b * a.v_bs;
    const float* scale = a.scale ? a.scale + b * N : nullptr;
    const float* norm = a.norm + b * N;
    int64_t want = a.num_picks ? a.num_picks[b] : k - count;
    want = want < 0 ? 0 : (want < k ? want : k);
    bool seeded = false;
    for (int64_t s = 0; s < m; ++s) seeded |= seed[s] >= 0 && seed[s] < N;  // seeds out of range count as -1

    int64_t n_off = 0;
    if constexpr (kGram) {
      for (int64_t i = tid; i < N; i += nthreads) {
        bool taken = false;
        float di = INFINITY;
#pragma unroll 4
        for (int64_t s = 0; s < m; ++s) {
          const int64_t c = seed[s];
          if (c < 0 || c >= N) continue;
          taken |= c == i;
          di = nan_min(di, 1.0f - G[c * a.g_rs + i]);
        }
        dist[i] = di;
        const bool o = taken || (valid && !valid[i]);
        off[i] = o;
        n_off += o;
      }
    } else {
      for (int64_t i = tid; i < N; i += nthreads) {
        dist[i] = INFINITY;
        off[i] = valid && !valid[i];
      }
      for (int64_t s = 0; s < m; ++s) {
        const int64_t c = seed[s];
        if (c < 0 || c >= N) continue;  // block-uniform
        similarity_row(V, a.v_rs, a.d, scale, N, c, rowbuf);
        __syncthreads();  // the row is complete
        for (int64_t i = tid; i < N; i += nthreads) {
          dist[i] = nan_min(dist[i], 1.0f - rowbuf[i]);
          if (i == c) off[i] = 1;
        }
        __syncthreads();  // every owner has read the row before the next one is computed
      }
      for (int64_t i = tid; i < N; i += nthreads) n_off += off[i];
    }
    n_off = block_sum(n_off, sum_scratch);
    const int64_t n = want < N - n_off ? want : N - n_off;
    if (a.out_order)
      for (int64_t t = n + tid; t < k; t += nthreads) a.out_order[b * k + t] = -1;

    // ---- 3. the picks
    int64_t prev = -1;  // the last centre, whose row is not yet in dist
    for (int64_t t = 0; t < n; ++t) {
      const float* row = nullptr;
      if (prev >= 0) {
        if constexpr (kGram) {
          row = G + prev * a.g_rs;
        } else {
          similarity_row(V, a.v_rs, a.d, scale, N, prev, rowbuf);
          __syncthreads();  // the row is complete (the previous argmax barrier ordered the reads of the last one)
          row = rowbuf;
        }
      }
      const bool by_norm = t == 0 && !seeded;
      Candidate best = no_candidate();
      for (int64_t i = tid; i < N; i += nthreads) {
        if (off[i]) continue;
        float di = dist[i];
        if (row) {
          di = nan_min(di, 1.0f - row[i]);
          dist[i] = di;
        }
        keep_better<false>(best, by_norm ? norm_key(norm[i]) : distance_key(di), static_cast<int>(i));
      }
      const int c = block_argmax<false>(best, slots, static_cast<int>(t & 1)).idx;
      if (c % nthreads == tid) off[c] = 1;  // its owner; n <= untaken valid tokens, so c is a real token
      if (tid == 0 && a.out_order) a.out_order[b * k + t] = c;
      prev = c;
    }

    // ---- 4. select: the sorted union
    if (a.out_sorted) write_taken_sorted(off, N, k, a.out_sorted + b * k, warp_total);
    __syncthreads();  // shared arrays and slots are reused by the next sample
  }
}

template <typename T, bool kGram>
std::string run_fps(cudaStream_t stream, int device, FpsArgs a, int64_t options, bool with_index, bool with_row,
                    bool with_off) {
  a.sh = fps_shared_layout(a.N, with_index, with_row, with_off);
  a.in_shared = shared_memory_fits(fps_kernel<T, kGram>, a.sh.bytes, device, options);
  fps_kernel<T, kGram><<<grid_dim(a.B, INT32_MAX), row_threads(a.N), a.in_shared ? a.sh.bytes : 0, stream>>>(a);
  return check_launch("fps_kernel");
}

}  // namespace

std::string launch_fps(cudaStream_t stream, int device, const FpsJob& j, int64_t options) {
  if (j.B == 0 || (j.k == 0 && !j.count)) return "";
  FpsArgs a{j.B, j.N, j.d, j.k, j.gram, j.g_bs, j.g_rs, j.vis.data, j.vis.batch_stride, j.vis.row_stride,
            j.norm, j.scale, j.seed, j.m, j.valid, j.num_picks, j.cover, j.k_p, j.picks, j.count,
            j.out_order, j.out_sorted, false, FpsShared{}, j.g_keys, j.g_index, j.g_row, j.g_off};
  const bool with_index = j.count != nullptr, with_off = j.k > 0;
  if (j.gram || j.k == 0) return run_fps<float, true>(stream, device, a, options, with_index, false, with_off);
  return dispatch_dtype(j.vis.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return run_fps<T, false>(stream, device, a, options, with_index, true, with_off);
  });
}

}  // namespace mob::gpu

std::string mob::farthest_point_sample_cuda(int device, void* stream, int64_t B, int64_t N, int64_t d, Features vis,
                                            const int64_t* seed, int64_t m, const int64_t* num_picks, int64_t k,
                                            const bool* valid, const float* sim, int64_t sim_bs, int64_t sim_rs,
                                            int64_t* out, void* workspace, int64_t workspace_bytes,
                                            int64_t options) {
  const bool has_sim = sim != nullptr;
  const gpu::Layout l =
      gpu::workspace_layout(static_cast<int>(CudaOp::kFarthestPointSample), B, N, 0, 0, k, has_sim, options);
  const std::string err = gpu::first_error({
      gpu::check_cuda_sizes(Sizes{B, N, 0, d, 0, k}, options),
      m < 0 ? "m (seeds per sample) must be >= 0, got m=" + std::to_string(m) : "",
      check_pointer("vis", vis.data, gpu::elements(B, N, d)),
      check_pointer("seed", seed, gpu::elements(B, m)),
      check_pointer("num_picks", num_picks, B),
      check_pointer("out", out, gpu::elements(B, k)),
      has_sim && (sim_rs < N || sim_bs < 0) ? "sim strides must describe [B, N, N] rows, got batch stride " +
                                                  std::to_string(sim_bs) + ", row stride " + std::to_string(sim_rs)
                                            : "",
      gpu::check_workspace(l, workspace, workspace_bytes),
  });
  if (!err.empty()) return err;
  if (B == 0 || k == 0 || N == 0) return "";
  if (const std::string e = gpu::use_device(device); !e.empty()) return e;
  const auto s = static_cast<cudaStream_t>(stream);
  for (int64_t b0 = 0; b0 < B; b0 += l.chunk) {
    const int64_t nb = B - b0 < l.chunk ? B - b0 : l.chunk;
    gpu::FpsJob f;
    f.B = nb;
    f.N = N;
    f.d = d;
    f.k = k;
    f.vis = gpu::offset_features(vis, b0);
    f.norm = gpu::at<float>(workspace, l.norm);
    std::string e;
    if (l.gram) {  // the Gram matrix (and the norms) in one tensor-core launch
      gpu::GramJob g;
      g.B = nb;
      g.N = N;
      g.d = d;
      g.vis = f.vis;
      g.gram = gpu::at<float>(workspace, l.gram_at);
      g.g_bs = N * N;
      g.g_rs = N;
      g.norm = gpu::at<float>(workspace, l.norm);
      e = gpu::launch_gram(s, g);
      f.gram = g.gram;
      f.g_bs = g.g_bs;
      f.g_rs = g.g_rs;
    } else {  // the caller's Gram matrix, or rows on demand: the norms alone
      f.scale = gpu::at<float>(workspace, l.scale);
      e = gpu::launch_row_norms(s, nb, N, d, f.vis, gpu::at<float>(workspace, l.norm), gpu::at<float>(workspace, l.scale));
      if (has_sim) {
        f.gram = sim + b0 * sim_bs;
        f.g_bs = sim_bs;
        f.g_rs = sim_rs;
      }
    }
    if (!e.empty()) return e;
    f.seed = m ? seed + b0 * m : nullptr;
    f.m = m;
    f.valid = valid ? valid + b0 * N : nullptr;
    f.num_picks = num_picks + b0;
    f.out_order = out + b0 * k;
    f.g_keys = gpu::at<float>(workspace, l.keys);
    f.g_off = gpu::at<uint8_t>(workspace, l.off);
    f.g_row = gpu::at<float>(workspace, l.row);
    if (!(e = gpu::launch_fps(s, device, f, options)).empty()) return e;
  }
  return "";
}
