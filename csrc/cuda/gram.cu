// Cosine similarities on tensor cores: the contract's `gram` (v̂_i · v̂_j, float32 [B, N, N]) and the prompt cover's
// similarity S = p̂_j · v̂_i, both as one GEMM shape and, in select, one launch.
//
// One block of 4 warps per 64 x 64 output tile, the whole GPU busy: a sample's prompt tiles (L x N) come first, then
// the upper triangle of its Gram matrix (layout.h numbers them); an off-diagonal Gram tile is written twice (i, j) and
// (j, i), and a diagonal tile writes each of its mirrored pairs from one accumulator, so the Gram matrix is exactly
// symmetric. The depth d streams through shared memory in 32-wide stages, cp.async double/triple buffered (rows
// 16-byte aligned; otherwise plain loads), and mma.sync multiplies them:
//   * bfloat16 / float16: m16n8k16 with float32 accumulation (products of 16-bit inputs are exact in float32);
//   * float32: 3xTF32, m16n8k8 on each of hi*hi + hi*lo + lo*hi with x = hi + lo split into two TF32 numbers, which
//     keeps float32-level accuracy (plain TF32 would not: the contract judges index agreement at 1e-4 in cosine).
// While a stage sits in shared memory each thread also sums the squares of one of the tile's 128 rows (and whether
// they are finite), so the inverse norms need no separate pass: the epilogue scales raw dot products by them
// (cosine() in common.cuh gives NaN rows and overflowing rows the reference's values). Every block sums a row in the
// same order, so a row's norm is the same bits in every tile that uses it.
#include "cuda/common.cuh"

namespace mob::gpu {
namespace {

constexpr int kGramThreads = 128;  // 4 warps, 2 x 2, each a 32 x 32 quarter of the tile
constexpr int kBK = 32;            // depth per shared-memory stage

template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  static constexpr int kStepK = 16, kPad = 8, kStages = 3;  // pad: fragment loads hit 32 distinct banks
  static constexpr int kPitch = kBK + kPad;
};
template <>
struct Mma<__half> {
  static constexpr int kStepK = 16, kPad = 8, kStages = 3;
  static constexpr int kPitch = kBK + kPad;
};
template <>
struct Mma<float> {
  static constexpr int kStepK = 8, kPad = 4, kStages = 2;  // 2 stages keep the static shared memory under 48 KiB
  static constexpr int kPitch = kBK + kPad;
};

struct GramArgs {
  const void* v;
  int64_t v_bs, v_rs;
  const void* p;
  int64_t p_bs, p_rs;
  int64_t B, N, L, d;
  float* sim;
  float* gram;
  int64_t g_bs, g_rs;
  float* norm;
  float* cover;
  int64_t s_tiles, g_tiles;  // per sample
};

// --------------------------------------------------------------------------------------------- PTX wrappers

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_1688_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// x = hi + lo with hi, lo TF32 (hi: x rounded to 10 mantissa bits; lo: the rounded remainder).
__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(hi) : "f"(x));
  const float rest = x - __uint_as_float(hi);
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(lo) : "f"(rest));
}

__device__ __forceinline__ uint32_t lds32(const void* p) { return *static_cast<const uint32_t*>(p); }

template <typename T>
__device__ __forceinline__ T from_bits(unsigned short bits);
template <>
__device__ __forceinline__ __half from_bits<__half>(unsigned short bits) { return __ushort_as_half(bits); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_bits<__nv_bfloat16>(unsigned short bits) {
  return __ushort_as_bfloat16(bits);
}

// ------------------------------------------------------------------------------------------------ the stages

// Rows [0, rows) of a 64-row operand tile, depth [k0, k0 + 32), into dst [64][pitch]; everything outside the matrix is
// zero. kVec: 16-byte cp.async (rows 16-byte aligned; a short tail copies fewer bytes and zero-fills the rest).
template <typename T, bool kVec>
__device__ __forceinline__ void load_rows(T* dst, const T* src, int64_t rs, int64_t rows, int64_t d, int64_t k0) {
  constexpr int kPitch = Mma<T>::kPitch;
  if constexpr (kVec) {
    constexpr int kPer = 16 / static_cast<int>(sizeof(T)), kPerRow = kBK / kPer;
    constexpr int kIters = kTile * kPerRow / kGramThreads;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int v = threadIdx.x + it * kGramThreads, r = v / kPerRow, c = (v % kPerRow) * kPer;
      const int64_t col = k0 + c;
      const T* g = src;  // a valid address even where nothing is read
      int bytes = 0;
      if (r < rows && col < d) {
        g = src + r * rs + col;
        const int64_t left = d - col;
        bytes = static_cast<int>(left < kPer ? left : kPer) * static_cast<int>(sizeof(T));
      }
      cp_async16(dst + r * kPitch + c, g, bytes);
    }
  } else {
    constexpr int kIters = kTile * kBK / kGramThreads;
#pragma unroll 4
    for (int it = 0; it < kIters; ++it) {
      const int e = threadIdx.x + it * kGramThreads, r = e / kBK, c = e % kBK;
      const int64_t col = k0 + c;
      dst[r * kPitch + c] = (r < rows && col < d) ? src[r * rs + col] : zero_of<T>();
    }
  }
}

// Sum of squares (and finiteness) of one staged row, starting at a row-dependent column so that the 32 threads of a
// warp spread over the banks. The order depends only on the row's position in its tile: the same in every block.
__device__ __forceinline__ void accumulate_row(const float* row, int rot, float& sumsq, bool& finite) {
#pragma unroll
  for (int c = 0; c < kBK; ++c) {
    const float x = row[(c + rot) & (kBK - 1)];
    sumsq = fmaf(x, x, sumsq);
    finite &= isfinite(x);
  }
}
template <typename T>
__device__ __forceinline__ void accumulate_row(const T* row, int rot, float& sumsq, bool& finite) {
  // Two 16-bit values per 32-bit load.
  const uint32_t* w = reinterpret_cast<const uint32_t*>(row);
#pragma unroll
  for (int c = 0; c < kBK / 2; ++c) {
    const uint32_t pair = w[(c + rot) & (kBK / 2 - 1)];
    const float x0 = to_f32(from_bits<T>(static_cast<unsigned short>(pair & 0xffffu)));
    const float x1 = to_f32(from_bits<T>(static_cast<unsigned short>(pair >> 16)));
    sumsq = fmaf(x0, x0, sumsq);
    sumsq = fmaf(x1, x1, sumsq);
    finite &= isfinite(x0) && isfinite(x1);
  }
}

// acc[mi][ni] += this warp's 32 x 32 quarter of As (64 x 32) * Bs^T (the B operand's rows are its columns). The
// fragment coordinates are layout.h's (checked against the PTX tables by csrc/cuda/tests/layout_test.cpp).
template <typename T>
__device__ __forceinline__ void mma_stage(const T* As, const T* Bs, float (&acc)[2][4][4], int warp, int lane) {
  constexpr int kPitch = Mma<T>::kPitch;
  const int r0 = warp_row0(warp), c0 = warp_col0(warp);
  if constexpr (sizeof(T) == 2) {
#pragma unroll
    for (int ks = 0; ks < kBK; ks += Mma<T>::kStepK) {
      uint32_t af[2][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int r = 0; r < 4; ++r)
          af[mi][r] = lds32(As + (r0 + mi * 16 + a16_row(lane, r)) * kPitch + ks + a16_col(lane, r));
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int r = 0; r < 2; ++r) bf[ni][r] = lds32(Bs + (c0 + ni * 8 + b_n(lane)) * kPitch + ks + b16_k(lane, r));
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_16816<T>(acc[mi][ni], af[mi], bf[ni]);
    }
  } else {
#pragma unroll
    for (int ks = 0; ks < kBK; ks += Mma<T>::kStepK) {
      uint32_t ahi[2][4], alo[2][4], bhi[4][2], blo[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int r = 0; r < 4; ++r)
          split_tf32(As[(r0 + mi * 16 + a32_row(lane, r)) * kPitch + ks + a32_col(lane, r)], ahi[mi][r], alo[mi][r]);
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          split_tf32(Bs[(c0 + ni * 8 + b_n(lane)) * kPitch + ks + b32_k(lane, r)], bhi[ni][r], blo[ni][r]);
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          mma_1688_tf32(acc[mi][ni], alo[mi], bhi[ni]);  // the small terms first
          mma_1688_tf32(acc[mi][ni], ahi[mi], blo[ni]);
          mma_1688_tf32(acc[mi][ni], ahi[mi], bhi[ni]);
        }
    }
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kGramThreads) gram_kernel(const GramArgs a) {
  using M = Mma<T>;
  constexpr int kPitch = Mma<T>::kPitch;
  constexpr int kStage = 2 * kTile * kPitch;  // elements: the A operand's rows, then B's
  __shared__ __align__(16) T stage[M::kStages * kStage];
  __shared__ float row_scale_s[2][kTile];  // [operand][row]

  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nop = threadIdx.x / kTile, nrow = threadIdx.x % kTile;  // the row whose norm this thread sums
  const int64_t per_sample = a.s_tiles + a.g_tiles, tasks = a.B * per_sample, nt = tiles(a.N);

  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t b = task / per_sample, u = task % per_sample;
    const bool prompt_tile = u < a.s_tiles;
    int64_t I, J;
    if (prompt_tile) {
      I = u / nt;
      J = u % nt;
    } else {
      triangle_tile(u - a.s_tiles, nt, I, J);
    }
    const int64_t a_rows_total = prompt_tile ? a.L : a.N;
    const T* a_src = prompt_tile ? static_cast<const T*>(a.p) + b * a.p_bs + I * kTile * a.p_rs
                                 : static_cast<const T*>(a.v) + b * a.v_bs + I * kTile * a.v_rs;
    const int64_t a_rs = prompt_tile ? a.p_rs : a.v_rs;
    const T* b_src = static_cast<const T*>(a.v) + b * a.v_bs + J * kTile * a.v_rs;
    const int64_t a_rows = a_rows_total - I * kTile < kTile ? a_rows_total - I * kTile : kTile;
    const int64_t b_rows = a.N - J * kTile < kTile ? a.N - J * kTile : kTile;

    float acc[2][4][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
    float sumsq = 0.f;
    bool finite = true;

    const int64_t nk = (a.d + kBK - 1) / kBK;
    auto load_stage = [&](int64_t kt) {
      T* s = stage + static_cast<int>(kt % M::kStages) * kStage;
      load_rows<T, kVec>(s, a_src, a_rs, a_rows, a.d, kt * kBK);
      load_rows<T, kVec>(s + kTile * kPitch, b_src, a.v_rs, b_rows, a.d, kt * kBK);
    };
#pragma unroll
    for (int s = 0; s < M::kStages - 1; ++s) {
      if (s < nk) load_stage(s);
      cp_async_commit();  // possibly empty: keeps one group per stage, so the wait count below is exact
    }
    for (int64_t kt = 0; kt < nk; ++kt) {
      cp_async_wait<M::kStages - 2>();  // this thread's copies of stage kt have landed ...
      __syncthreads();  // ... everyone's have, and everyone is done with the buffer refilled next
      if (kt + M::kStages - 1 < nk) load_stage(kt + M::kStages - 1);
      cp_async_commit();
      const T* s = stage + static_cast<int>(kt % M::kStages) * kStage;
      accumulate_row(s + (nop * kTile + nrow) * kPitch, nrow, sumsq, finite);
      mma_stage<T>(s, s + kTile * kPitch, acc, warp, lane);
    }
    cp_async_wait<0>();

    const float norm = sqrtf(sumsq);
    row_scale_s[nop][nrow] = row_scale(norm, finite);
    if (!prompt_tile && I == J && nop == 1 && a.norm && nrow < b_rows) a.norm[b * a.N + J * kTile + nrow] = norm;
    if (prompt_tile && I == 0 && a.cover && threadIdx.x < kTile && threadIdx.x < b_rows)
      a.cover[b * a.N + J * kTile + threadIdx.x] = -INFINITY;  // the membership kernel max-reduces into it
    __syncthreads();  // row_scale_s complete; every warp is past its last read of `stage`

#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = warp_row0(warp) + mi * 16 + c_row(lane, e);
          const int c = warp_col0(warp) + ni * 8 + c_col(lane, e);
          if (r >= a_rows || c >= b_rows) continue;
          const float val = cosine(acc[mi][ni][e], row_scale_s[0][r], row_scale_s[1][c]);
          const int64_t i = I * kTile + r, j = J * kTile + c;
          if (prompt_tile) {
            a.sim[(b * a.L + i) * a.N + j] = val;
          } else if (I != J) {
            a.gram[b * a.g_bs + i * a.g_rs + j] = val;
            a.gram[b * a.g_bs + j * a.g_rs + i] = val;
          } else if (r <= c) {  // diagonal tile: (r, c) and (c, r) both from this one accumulator
            a.gram[b * a.g_bs + i * a.g_rs + j] = val;
            a.gram[b * a.g_bs + j * a.g_rs + i] = val;
          }
        }
    __syncthreads();  // row_scale_s and `stage` are rewritten by the next task
  }
}

bool rows_aligned16(const Features& f, int64_t rows) {
  if (rows == 0 || !f.data) return true;
  const int64_t es = dtype_bytes(f.dtype);
  return reinterpret_cast<uintptr_t>(f.data) % 16 == 0 && (f.batch_stride * es) % 16 == 0 &&
         (f.row_stride * es) % 16 == 0;
}

}  // namespace

std::string launch_gram(cudaStream_t stream, const GramJob& job) {
  GramArgs a{job.vis.data, job.vis.batch_stride, job.vis.row_stride, job.prompt.data, job.prompt.batch_stride,
             job.prompt.row_stride, job.B, job.N, job.L, job.d, job.sim, job.gram, job.g_bs, job.g_rs, job.norm,
             job.cover, 0, 0};
  const int64_t nt = tiles(job.N);
  a.s_tiles = (job.sim && job.L > 0) ? tiles(job.L) * nt : 0;
  a.g_tiles = job.gram ? triangle_tiles(nt) : 0;
  if (job.B == 0 || job.N == 0 || a.s_tiles + a.g_tiles == 0) return "";
  const bool vec = rows_aligned16(job.vis, job.N) && (a.s_tiles == 0 || rows_aligned16(job.prompt, job.L));
  const int64_t tasks = job.B * (a.s_tiles + a.g_tiles);
  return dispatch_dtype(job.vis.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (vec)
      gram_kernel<T, true><<<grid_dim(tasks, INT32_MAX), kGramThreads, 0, stream>>>(a);
    else
      gram_kernel<T, false><<<grid_dim(tasks, INT32_MAX), kGramThreads, 0, stream>>>(a);
    return check_launch("gram_kernel");
  });
}

}  // namespace mob::gpu

std::string mob::gram_cuda(int device, void* stream, int64_t B, int64_t N, int64_t d, Features vis, float* out,
                           int64_t options) {
  const std::string err = gpu::first_error({
      gpu::check_cuda_sizes(Sizes{B, N, 0, d, 0, 0}, options),
      check_pointer("vis", vis.data, gpu::elements(B, N, d)),
      check_pointer("out", out, gpu::elements(B, N, N)),
  });
  if (!err.empty()) return err;
  if (B == 0 || N == 0) return "";
  if (const std::string e = gpu::use_device(device); !e.empty()) return e;
  gpu::GramJob job;
  job.B = B;
  job.N = N;
  job.d = d;
  job.vis = vis;
  job.gram = out;
  job.g_bs = N * N;
  job.g_rs = N;
  return gpu::launch_gram(static_cast<cudaStream_t>(stream), job);
}
