// The raw-pointer interface shared by the C++ CPU backend, the CUDA backend and the pybind11 bindings.
//
// No libtorch: tensors arrive as data pointers, sizes and element strides, features tagged by dtype. Arithmetic is
// float32 whatever the input dtype (SPEC.md §2). Outputs are int64 and fully written by every call: no partial result.
// Element (b, i, c) of a feature batch lives at data[b * batch_stride + i * row_stride + c] (unit stride in d).
#pragma once
#include <cstdint>

namespace mob {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct Features {
  const void* data;
  DType dtype;
  int64_t batch_stride;  // elements
  int64_t row_stride;    // elements
};

// SPEC §2 steps 0-2. picks [B, k_p] by descending covering score, -1 padded; count [B].
// mask [B, L] (true = real prompt row). fold [B]: each sample's neighbour count f in [0, N], resolved by the caller
// (mob_kernels/methods/mob.py resolve_fold is the one place the automatic fold is computed).
void prompt_cover_cpu(int64_t B, int64_t N, int64_t L, int64_t d, Features vis, Features prompt, const bool* mask,
                      int64_t k_p, const int64_t* fold, int64_t* picks, int64_t* count);

// SPEC §2 step 3. seed [B, m] (-1 = none) are taken and seed the distances; sample b makes
// min(num_picks[b], k, untaken) picks, written to out [B, k] in selection order, -1 padded.
void farthest_point_sample_cpu(int64_t B, int64_t N, int64_t d, Features vis, const int64_t* seed, int64_t m,
                               const int64_t* num_picks, int64_t k, int64_t* out);

// SPEC §2 whole: out [B, k] sorted ascending.
void select_cpu(int64_t B, int64_t N, int64_t L, int64_t d, Features vis, Features prompt, const bool* mask,
                int64_t k_p, int64_t k, const int64_t* fold, int64_t* out);

}  // namespace mob
