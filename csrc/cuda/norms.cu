// Row norms (SPEC.md §2 step 0): norm = ||x_i||_2 in float32 and inv = 1 / max(norm, eps), for every row of every
// sample. One warp per row (lanes stride along d, loads coalesce), a grid-stride loop over rows, so any B * R fits.
// The other kernels never build the unit vectors: they scale raw float32-accumulated dot products by these inverses.
#include "cuda/common.cuh"

namespace mob::gpu {
namespace {

constexpr int kNormThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kNormThreads)
    row_norms_kernel(const T* x, int64_t batch_stride, int64_t row_stride, int64_t B, int64_t R, int64_t d,
                     float* norm, float* inv) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_block = blockDim.x / kWarp;
  const int64_t rows = B * R;
  for (int64_t r = blockIdx.x * warps_per_block + threadIdx.x / kWarp; r < rows; r += gridDim.x * warps_per_block) {
    const T* row = row_of(x, batch_stride, row_stride, r / R, r % R);
    const float n = sqrtf(warp_dot(row, row, d, lane));
    if (lane == 0) {
      if (norm) norm[r] = n;
      inv[r] = inverse_norm(n);
    }
  }
}

}  // namespace

std::string launch_row_norms(cudaStream_t stream, int64_t B, int64_t R, int64_t d, const Features& x, float* norm,
                             float* inv) {
  if (B == 0 || R == 0) return "";
  return dispatch_dtype(x.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t blocks = (B * R + kNormThreads / kWarp - 1) / (kNormThreads / kWarp);
    row_norms_kernel<T><<<grid_dim(blocks, 1 << 20), kNormThreads, 0, stream>>>(
        static_cast<const T*>(x.data), x.batch_stride, x.row_stride, B, R, d, norm, inv);
    return check_launch("row_norms_kernel");
  });
}

}  // namespace mob::gpu
