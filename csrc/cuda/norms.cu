// Row norms for the paths without a workspace Gram matrix (the caller's `sim`, or rows computed on demand): the raw
// float32 norm |x_i| (the reference's largest-norm first pick) and the cosine factor row_scale(|x_i|, finite row),
// i.e. 1 / max(|x_i|, 1e-12), or NaN where the row holds NaN or inf. One warp per row (lanes stride along d, loads
// coalesce), a grid-stride loop over rows, so any B * R fits. The Gram kernel sums the same squares itself.
#include "cuda/common.cuh"

namespace mob::gpu {
namespace {

constexpr int kNormThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kNormThreads)
    row_norms_kernel(const T* x, int64_t batch_stride, int64_t row_stride, int64_t B, int64_t R, int64_t d,
                     float* norm, float* scale) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_block = blockDim.x / kWarp;
  const int64_t rows = B * R;
  for (int64_t r = blockIdx.x * warps_per_block + threadIdx.x / kWarp; r < rows; r += gridDim.x * warps_per_block) {
    const T* row = row_of(x, batch_stride, row_stride, r / R, r % R);
    float acc = 0.f;
    bool finite = true;
    for (int64_t c = lane; c < d; c += kWarp) {
      const float v = to_f32(row[c]);
      acc = fmaf(v, v, acc);
      finite &= isfinite(v);
    }
    const float n = sqrtf(warp_sum(acc));
    finite = __all_sync(kFullMask, finite);
    if (lane == 0) {
      if (norm) norm[r] = n;
      scale[r] = row_scale(n, finite);
    }
  }
}

}  // namespace

std::string launch_row_norms(cudaStream_t stream, int64_t B, int64_t R, int64_t d, const Features& x, float* norm,
                             float* scale) {
  if (B == 0 || R == 0) return "";
  return dispatch_dtype(x.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t blocks = (B * R + kNormThreads / kWarp - 1) / (kNormThreads / kWarp);
    row_norms_kernel<T><<<grid_dim(blocks, 1 << 20), kNormThreads, 0, stream>>>(
        static_cast<const T*>(x.data), x.batch_stride, x.row_stride, B, R, d, norm, scale);
    return check_launch("row_norms_kernel");
  });
}

}  // namespace mob::gpu
