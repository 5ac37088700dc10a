// The raw-pointer interface shared by the C++ CPU backend, the CUDA backend and the pybind11 bindings.
//
// No libtorch: tensors arrive as data pointers, sizes and element strides, features tagged by dtype. Arithmetic is
// float32 whatever the input dtype (docs/contract.md §1.2). Outputs are int64 and fully written by every call: no partial result.
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

// Prompt cover (contract §3.1.2). picks [B, k_p] by descending covering score, -1 padded; count [B].
// mask [B, L] (true = real prompt row). fold [B]: each sample's neighbour count f in [0, N], resolved by the caller
// (mob_kernels/methods/mob.py resolve_fold is the one place the automatic fold is computed).
void prompt_cover_cpu(int64_t B, int64_t N, int64_t L, int64_t d, Features vis, Features prompt, const bool* mask,
                      int64_t k_p, const int64_t* fold, int64_t* picks, int64_t* count);

// A float32 [B, N, N] matrix with unit column stride (a Gram matrix of cosine similarities); data == nullptr: none.
struct Square {
  const float* data;
  int64_t batch_stride;  // elements
  int64_t row_stride;    // elements
};

// Cosine similarities out [B, N, N] (contiguous) float32: dot(v_i, v_j) / (max(|v_i|, eps) max(|v_j|, eps)), the dot
// of the raw rows accumulated in float32. Exactly symmetric (the upper triangle is computed and mirrored).
void gram_cpu(int64_t B, int64_t N, int64_t d, Features vis, float* out);

// Farthest point sampling (contract §2.3). seed [B, m] (-1 = none) are taken and seed the distances; tokens where valid [B, N] is false
// (valid == nullptr: all valid) are never picked; sample b makes min(num_picks[b], k, untaken valid) picks, written
// to out [B, k] in selection order, -1 padded. With no seed the first pick is the largest raw norm among the valid
// tokens. With sim.data set, the distance to centre c is 1 - sim[c, i] instead of a computed one.
void farthest_point_sample_cpu(int64_t B, int64_t N, int64_t d, Features vis, const int64_t* seed, int64_t m,
                               const int64_t* num_picks, int64_t k, const bool* valid, Square sim, int64_t* out);

// Greedy MAP of the DPP with kernel L_ij = r_i S_ij r_j (S cosine, r = relevance [B, N] float32 where valid [B, N],
// 0 elsewhere): each step takes the largest residual d2 (first maximum; a NaN stops), until it is at most
// kDppStop * (largest valid L_ii). order [B, k] (-1 after the stop), gain [B, k] float32 (the residual, 0 after).
// lazy = false forces the eager loop (every token updated every step); the lazy one gives the same bits where it runs.
constexpr float kDppStop = 1e-5f;
void dpp_greedy_cpu(int64_t B, int64_t N, int64_t d, Features vis, const float* relevance, const bool* valid,
                    int64_t k, int64_t* order, float* gain, bool lazy = true);

// CDPruner whole (mob_kernels/methods/cdpruner.py): usable = valid (nullptr: all), finite features and finite
// relevance [B, N] float32; the DPP's picks over the usable tokens, completed to k by relevance (descending, ties to
// the lower index, unusable tokens last); out [B, k] sorted ascending.
void cdpruner_cpu(int64_t B, int64_t N, int64_t d, Features vis, const float* relevance, const bool* valid, int64_t k,
                  int64_t* out);

// DivPrune whole (mob_kernels/methods/divprune.py): usable = valid (nullptr: all) and finite features; the most
// isolated usable token first, then farthest point sampling on the cosine Gram matrix, completed with the
// lowest-index other tokens to k; out [B, k] sorted ascending.
void divprune_cpu(int64_t B, int64_t N, int64_t d, Features vis, const bool* valid, int64_t k, int64_t* out);

// Where each token sits, int64 (tile, row, col) at data[b * batch_stride + i * row_stride + {0, 1, 2}] (elements);
// data == nullptr: none.
struct Grid {
  const int64_t* data;
  int64_t batch_stride;
  int64_t row_stride;
};

// Greedy maximal independent set (contract §3.4.1, D2Pruner): the candidates (rank [B, N] >= 0) in increasing rank,
// ties to the lower index; tokens i != j are adjacent when their cosine (gram_cpu's value) exceeds near (same tile,
// Chebyshev distance <= radius) or far (otherwise; every pair without a grid), thresholds rounded to float32, a NaN
// cosine no edge. Each candidate no earlier pick is adjacent to is picked, up to min(num_picks[b], k) picks, written to
// out [B, k] in pick order, -1 padded.
void independent_set_cpu(int64_t B, int64_t N, int64_t d, Features vis, const int64_t* rank, const int64_t* num_picks,
                         int64_t k, double near, double far, Grid grid, int64_t radius, int64_t* out);

// MoB select (contract §3.1): out [B, k] sorted ascending.
void select_cpu(int64_t B, int64_t N, int64_t L, int64_t d, Features vis, Features prompt, const bool* mask,
                int64_t k_p, int64_t k, const int64_t* fold, int64_t* out);

}  // namespace mob
