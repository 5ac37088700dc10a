// CUDA greedy MAP of a DPP (the reference's dpp_greedy; CDPruner's selection): fast greedy MAP with an incremental
// Cholesky factor over the kernel L_ij = r_i S_ij r_j, S the cosine Gram matrix and r the relevance; the rows and
// columns of tokens off `valid` are 0.
//
// dpp_kernel, one block per sample; token n belongs to thread n % blockDim. Initialisation: d2[n] = L_nn (-inf off
// `valid`), stop = DPP_STOP * max over n of (valid ? L_nn : 0), NaN propagating. Step i: a block argmax over d2
// (torch.argmax's rules: a NaN is the maximum, ties to the lower index) gives j and the gain g = d2[j]; the run stops
// for good unless g > stop (a NaN g or stop stops it); else each owner n computes
//     e_n = (r_j S_jn r_n - sum_{t<i} C[t, j] C[t, n]) / sqrt(g),   C[i, n] = e_n,   d2[n] -= e_n^2
// and d2[j] = -inf. The order of operations is the reference's ((r_j S_jn) r_n, a product and a difference that are
// never contracted into one fused multiply-add), so results agree to float32 rounding of the dot product only. One
// barrier per step: the argmax barrier also orders step i's writes of C and d2 before step i + 1 reads them.
// The Gram matrix comes from the workspace (tensor-core Gram kernel); without one (N too large for the Gram budget,
// or kCudaRowsOnDemand) the diagonal and the row S_j of each step are computed from the features by warps. d2 and the
// Cholesky rows C [k, N] live in shared memory when they fit, else in the global workspace (L2); same code.
#include "cuda/common.cuh"

namespace mob::gpu {
namespace {

struct DppArgs {
  int64_t B, N, d, k;
  const float* gram;
  int64_t g_bs, g_rs;
  const void* vis;
  int64_t v_bs, v_rs;
  const float* scale;
  const float* relevance;
  const bool* valid;
  int64_t* order;
  float* gain;
  bool in_shared;
  DppShared sh;
  float* g_gain;
  float* g_row;
  float* g_chol;
};

// NaN-propagating block max (every thread must call it; two barriers; the caller passes a barrier before reuse).
__device__ __forceinline__ float block_max_nan(float v, float* scratch /* kWarp + 1 */) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  for (int o = kWarp / 2; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(kFullMask, v, o));
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float m = scratch[0];
    for (int w = 1; w < nwarps; ++w) m = nan_max(m, scratch[w]);
    scratch[kWarp] = m;
  }
  __syncthreads();
  return scratch[kWarp];
}

template <typename T, bool kGram>
__global__ void __launch_bounds__(kRowThreadsMax) dpp_kernel(const DppArgs a) {
  extern __shared__ __align__(16) unsigned char dpp_smem[];
  __shared__ ArgmaxSlots slots;
  __shared__ float max_scratch[kWarp + 1];
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int64_t N = a.N, k = a.k;

  for (int64_t b = blockIdx.x; b < a.B; b += gridDim.x) {
    float* d2 = shared_or_global(dpp_smem, a.in_shared, a.sh.gain, a.g_gain, b * N);
    float* rowbuf = shared_or_global(dpp_smem, a.in_shared, a.sh.row, a.g_row, b * N);
    float* chol = shared_or_global(dpp_smem, a.in_shared, a.sh.chol, a.g_chol, b * k * N);  // C[t, n] at t * N + n
    const float* G = kGram ? a.gram + b * a.g_bs : nullptr;
    const T* V = static_cast<const T*>(a.vis) + b * a.v_bs;
    const float* scale = a.scale ? a.scale + b * N : nullptr;
    const float* rel = a.relevance + b * N;
    const bool* valid = a.valid + b * N;
    int64_t* order = a.order + b * k;
    float* gain = a.gain + b * k;

    // The diagonal S_nn (rows on demand: computed into the row buffer).
    if constexpr (!kGram) {
      const int lane = tid % kWarp, warp = tid / kWarp, nwarps = nthreads / kWarp;
      for (int64_t n = warp; n < N; n += nwarps) {
        const float raw = warp_dot(V + n * a.v_rs, V + n * a.v_rs, a.d, lane);
        if (lane == 0) rowbuf[n] = cosine(raw, scale[n], scale[n]);
      }
      __syncthreads();
    }
    float mx = -INFINITY;
    for (int64_t n = tid; n < N; n += nthreads) {
      const float r = valid[n] ? rel[n] : 0.f;
      const float snn = kGram ? G[n * a.g_rs + n] : rowbuf[n];
      const float l_nn = __fmul_rn(__fmul_rn(r, snn), r);
      mx = nan_max(mx, valid[n] ? l_nn : 0.f);
      d2[n] = valid[n] ? l_nn : -INFINITY;
    }
    const float stop = __fmul_rn(kDppStop, block_max_nan(mx, max_scratch));  // its barriers also free rowbuf

    int64_t i = 0;
    for (; i < k; ++i) {
      Candidate best = no_candidate();
      for (int64_t n = tid; n < N; n += nthreads) keep_better<true>(best, d2[n], static_cast<int>(n));
      const Candidate w = block_argmax<true>(best, slots, static_cast<int>(i & 1));
      const int64_t j = w.idx;
      const float g = w.key;
      if (!(g > stop)) break;  // block-uniform: every thread reduced the same slots
      if (tid == 0) {
        order[i] = j;
        gain[i] = g;
      }
      const float* row;
      if constexpr (kGram) {
        row = G + j * a.g_rs;
      } else {
        similarity_row(V, a.v_rs, a.d, scale, N, j, rowbuf);
        __syncthreads();  // the row is complete (the argmax barrier ordered the reads of the last one)
        row = rowbuf;
      }
      const float rj = valid[j] ? rel[j] : 0.f;
      const float root = sqrtf(g);
      for (int64_t n = tid; n < N; n += nthreads) {
        float dot = 0.f;
        for (int64_t t = 0; t < i; ++t) dot = fmaf(chol[t * N + j], chol[t * N + n], dot);
        // An unusable token's kernel entries are 0 whatever its features hold (NaN * 0 would be NaN).
        const float l = valid[n] ? __fmul_rn(__fmul_rn(rj, row[n]), rel[n]) : 0.f;
        const float e = __fdiv_rn(__fsub_rn(l, dot), root);
        chol[i * N + n] = e;
        d2[n] = n == j ? -INFINITY : __fsub_rn(d2[n], __fmul_rn(e, e));
      }
    }
    for (int64_t t = i + tid; t < k; t += nthreads) {  // after a stop: -1 and gain 0
      order[t] = -1;
      gain[t] = 0.f;
    }
    __syncthreads();  // shared arrays, slots and scratch are reused by the next sample
  }
}

template <typename T, bool kGram>
std::string run_dpp(cudaStream_t stream, int device, DppArgs a, int64_t options) {
  a.sh = dpp_shared_layout(a.N, a.k, !kGram);
  a.in_shared = shared_memory_fits(dpp_kernel<T, kGram>, a.sh.bytes, device, options);
  dpp_kernel<T, kGram><<<grid_dim(a.B, INT32_MAX), row_threads(a.N), a.in_shared ? a.sh.bytes : 0, stream>>>(a);
  return check_launch("dpp_kernel");
}

}  // namespace

std::string launch_dpp(cudaStream_t stream, int device, const DppJob& j, int64_t options) {
  if (j.B == 0 || j.k == 0) return "";
  DppArgs a{j.B, j.N, j.d, j.k, j.gram, j.g_bs, j.g_rs, j.vis.data, j.vis.batch_stride, j.vis.row_stride, j.scale,
            j.relevance, j.valid, j.order, j.gain, false, DppShared{}, j.g_gain, j.g_row, j.g_chol};
  if (j.gram) return run_dpp<float, true>(stream, device, a, options);
  return dispatch_dtype(j.vis.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return run_dpp<T, false>(stream, device, a, options);
  });
}

}  // namespace mob::gpu

std::string mob::dpp_greedy_cuda(int device, void* stream, int64_t B, int64_t N, int64_t d, Features vis,
                                 const float* relevance, const bool* valid, int64_t k, int64_t* order, float* gain,
                                 void* workspace, int64_t workspace_bytes, int64_t options) {
  const gpu::Layout l = gpu::workspace_layout(static_cast<int>(CudaOp::kDppGreedy), B, N, 0, 0, k, false, options);
  const std::string err = gpu::first_error({
      gpu::check_cuda_sizes(Sizes{B, N, 0, d, 0, k}, options),
      check_pointer("vis", vis.data, gpu::elements(B, N, d)),
      check_pointer("relevance", relevance, gpu::elements(B, N)),
      check_pointer("valid", valid, gpu::elements(B, N)),
      check_pointer("order", order, gpu::elements(B, k)),
      check_pointer("gain", gain, gpu::elements(B, k)),
      gpu::check_workspace(l, workspace, workspace_bytes),
  });
  if (!err.empty()) return err;
  if (B == 0 || k == 0 || N == 0) return "";
  if (const std::string e = gpu::use_device(device); !e.empty()) return e;
  const auto s = static_cast<cudaStream_t>(stream);
  for (int64_t b0 = 0; b0 < B; b0 += l.chunk) {
    const int64_t nb = B - b0 < l.chunk ? B - b0 : l.chunk;
    gpu::DppJob p;
    p.B = nb;
    p.N = N;
    p.d = d;
    p.k = k;
    p.vis = gpu::offset_features(vis, b0);
    std::string e;
    if (l.gram) {
      gpu::GramJob g;
      g.B = nb;
      g.N = N;
      g.d = d;
      g.vis = p.vis;
      g.gram = gpu::at<float>(workspace, l.gram_at);
      g.g_bs = N * N;
      g.g_rs = N;
      e = gpu::launch_gram(s, g);
      p.gram = g.gram;
      p.g_bs = g.g_bs;
      p.g_rs = g.g_rs;
    } else {
      float* scale = gpu::at<float>(workspace, l.scale);
      e = gpu::launch_row_norms(s, nb, N, d, p.vis, nullptr, scale);
      p.scale = scale;
    }
    if (!e.empty()) return e;
    p.relevance = relevance + b0 * N;
    p.valid = valid + b0 * N;
    p.order = order + b0 * k;
    p.gain = gain + b0 * k;
    p.g_gain = gpu::at<float>(workspace, l.keys);
    p.g_row = gpu::at<float>(workspace, l.row);
    p.g_chol = gpu::at<float>(workspace, l.chol);
    if (!(e = gpu::launch_dpp(s, device, p, options)).empty()) return e;
  }
  return "";
}
