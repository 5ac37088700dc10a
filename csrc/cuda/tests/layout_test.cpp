// Host-only checks of the CUDA backend's index and layout arithmetic (csrc/cuda/layout.h), run by csrc/cuda/check.sh:
// no GPU is needed, so CI machines without one still catch a wrong fragment coordinate or an overlapping workspace.
//
//   * the Gram kernel's fragment addressing against an independent transcription of the PTX ISA's fragment tables
//     (mma.m16n8k16 for 16-bit inputs, mma.m16n8k8 for TF32), by emulating one 64 x 64 x 32 stage of the kernel;
//   * the upper-triangle tile numbering;
//   * workspace regions (aligned, disjoint, large enough, chunking, overflow) and the shared-memory layouts.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/layout.h"

using namespace mob;
using namespace mob::gpu;

namespace {

int failures = 0;

#define CHECK(cond)                                                      \
  do {                                                                   \
    if (!(cond)) {                                                       \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                        \
    }                                                                    \
  } while (0)

// ---------------------------------------------------------------------------------------- PTX fragment tables
// Transcribed from the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type" and "... for
// mma.m16n8k8", .tf32). groupID = lane >> 2, threadID_in_group = lane % 4; element i of a fragment.
struct RC {
  int row, col;
};
RC ptx_a16(int lane, int i) {  // A 16 x 16, elements a0..a7 (register i / 2 holds a_i, a_{i+1})
  const int g = lane >> 2, t = lane % 4;
  const int row = (i == 0 || i == 1 || i == 4 || i == 5) ? g : g + 8;
  const int col = i < 4 ? t * 2 + (i & 1) : t * 2 + 8 + (i & 1);
  return {row, col};
}
RC ptx_b16(int lane, int i) {  // B 16 x 8 (k, n), elements b0..b3
  const int g = lane >> 2, t = lane % 4;
  return {i < 2 ? t * 2 + (i & 1) : t * 2 + 8 + (i & 1), g};
}
RC ptx_a8(int lane, int i) {  // A 16 x 8 .tf32, elements a0..a3
  const int g = lane >> 2, t = lane % 4;
  return {(i == 0 || i == 2) ? g : g + 8, i < 2 ? t : t + 4};
}
RC ptx_b8(int lane, int i) {  // B 8 x 8 (k, n) .tf32, elements b0, b1
  const int g = lane >> 2, t = lane % 4;
  return {i == 0 ? t : t + 4, g};
}
RC ptx_c(int lane, int i) {  // C/D 16 x 8 float, elements c0..c3
  const int g = lane >> 2, t = lane % 4;
  return {i < 2 ? g : g + 8, t * 2 + (i & 1)};
}

// One 64 x 64 tile, depth 32, as the kernel's 4 warps compute it: registers filled through layout.h's coordinates,
// the mma emulated through the PTX tables, results placed through layout.h's accumulator coordinates.
void check_fragments(bool tf32) {
  constexpr int kK = 32;
  float A[64][kK], B[64][kK];
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < kK; ++c) {
      A[r][c] = static_cast<float>((r * 7 + c * 3) % 11 - 5);  // small integers: every sum is exact
      B[r][c] = static_cast<float>((r * 5 + c * 13) % 9 - 4);
    }
  std::vector<float> out(64 * 64, 0.f);
  std::vector<int> written(64 * 64, 0);
  const int step = tf32 ? 8 : 16;
  for (int warp = 0; warp < 4; ++warp) {
    float acc[32][2][4][4] = {};
    for (int ks = 0; ks < kK; ks += step) {
      for (int mi = 0; mi < 2; ++mi)
        for (int ni = 0; ni < 4; ++ni) {
          // Registers as the kernel loads them: element values of each lane.
          float a_el[32][8], b_el[32][4];
          for (int lane = 0; lane < 32; ++lane) {
            if (tf32) {
              for (int r = 0; r < 4; ++r)
                a_el[lane][r] = A[warp_row0(warp) + mi * 16 + a32_row(lane, r)][ks + a32_col(lane, r)];
              for (int r = 0; r < 2; ++r) b_el[lane][r] = B[warp_col0(warp) + ni * 8 + b_n(lane)][ks + b32_k(lane, r)];
            } else {
              for (int r = 0; r < 4; ++r)
                for (int h = 0; h < 2; ++h)  // a 32-bit load: the pair at (row, col) and (row, col + 1)
                  a_el[lane][2 * r + h] = A[warp_row0(warp) + mi * 16 + a16_row(lane, r)][ks + a16_col(lane, r) + h];
              for (int r = 0; r < 2; ++r)
                for (int h = 0; h < 2; ++h)
                  b_el[lane][2 * r + h] = B[warp_col0(warp) + ni * 8 + b_n(lane)][ks + b16_k(lane, r) + h];
            }
          }
          // The hardware's view of those registers (PTX tables); every matrix element held exactly once.
          float Am[16][16] = {}, Bm[16][8] = {};
          int a_seen[16][16] = {}, b_seen[16][8] = {};
          for (int lane = 0; lane < 32; ++lane) {
            for (int i = 0; i < (tf32 ? 4 : 8); ++i) {
              const RC p = tf32 ? ptx_a8(lane, i) : ptx_a16(lane, i);
              Am[p.row][p.col] = a_el[lane][i];
              ++a_seen[p.row][p.col];
            }
            for (int i = 0; i < (tf32 ? 2 : 4); ++i) {
              const RC p = tf32 ? ptx_b8(lane, i) : ptx_b16(lane, i);
              Bm[p.row][p.col] = b_el[lane][i];
              ++b_seen[p.row][p.col];
            }
          }
          for (int r = 0; r < 16; ++r)
            for (int c = 0; c < step; ++c) CHECK(a_seen[r][c] == 1);
          for (int r = 0; r < step; ++r)
            for (int c = 0; c < 8; ++c) CHECK(b_seen[r][c] == 1);
          for (int lane = 0; lane < 32; ++lane)
            for (int e = 0; e < 4; ++e) {
              const RC p = ptx_c(lane, e);
              float d = 0.f;
              for (int q = 0; q < step; ++q) d += Am[p.row][q] * Bm[q][p.col];
              acc[lane][mi][ni][e] += d;
            }
        }
    }
    for (int lane = 0; lane < 32; ++lane)
      for (int mi = 0; mi < 2; ++mi)
        for (int ni = 0; ni < 4; ++ni)
          for (int e = 0; e < 4; ++e) {
            const int r = warp_row0(warp) + mi * 16 + c_row(lane, e), c = warp_col0(warp) + ni * 8 + c_col(lane, e);
            out[r * 64 + c] = acc[lane][mi][ni][e];
            ++written[r * 64 + c];
          }
  }
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < 64; ++c) {
      float want = 0.f;
      for (int q = 0; q < kK; ++q) want += A[r][q] * B[c][q];
      CHECK(written[r * 64 + c] == 1);
      CHECK(out[r * 64 + c] == want);
    }
}

void check_triangle() {
  for (int64_t t = 1; t <= 300; ++t) {
    int64_t u = 0;
    for (int64_t i = 0; i < t; ++i)
      for (int64_t j = i; j < t; ++j, ++u) {
        int64_t I = -1, J = -1;
        triangle_tile(u, t, I, J);
        CHECK(I == i && J == j);
      }
    CHECK(u == triangle_tiles(t));
  }
  CHECK(tiles(0) == 0 && tiles(1) == 1 && tiles(64) == 1 && tiles(65) == 2);
}

struct Region {
  int64_t at, bytes;
};

// Every region `align`-aligned, inside `total`, and disjoint from the others.
void check_disjoint(const std::vector<Region>& rs, int64_t total, int64_t align = 256) {
  for (size_t a = 0; a < rs.size(); ++a) {
    CHECK(rs[a].at >= 0 && rs[a].at % align == 0 && rs[a].at + rs[a].bytes <= total);
    for (size_t b = a + 1; b < rs.size(); ++b)
      CHECK(rs[a].bytes == 0 || rs[b].bytes == 0 || rs[a].at + rs[a].bytes <= rs[b].at ||
            rs[b].at + rs[b].bytes <= rs[a].at);
  }
}

void check_workspace() {
  const int64_t B = 3, N = 577, L = 65, k_p = 33, k = 70;
  // select: every region it uses, sized for the chunk.
  Layout l = workspace_layout(static_cast<int>(CudaOp::kSelect), B, N, L, k_p, k, false, 0);
  CHECK(l.total > 0 && l.gram && !l.rows_on_demand && l.chunk == B);
  int64_t c = l.chunk;
  check_disjoint({{l.norm, c * N * 4}, {l.scale, c * N * 4}, {l.sim, c * L * N * 4}, {l.cover, c * N * 4},
                  {l.gram_at, c * N * N * 4}, {l.picks, c * k_p * 8}, {l.count, c * 8}, {l.keys, c * N * 4},
                  {l.index, c * N * 4}, {l.off, c * N}},
                 l.total);
  CHECK(l.row < 0 && l.chol < 0);

  // rows on demand: no Gram matrix, a row buffer instead.
  l = workspace_layout(static_cast<int>(CudaOp::kSelect), B, N, L, k_p, k, false, kCudaRowsOnDemand);
  CHECK(!l.gram && l.rows_on_demand && l.gram_at < 0 && l.row >= 0);
  // the caller's Gram matrix (farthest_point_sample with sim): neither.
  l = workspace_layout(static_cast<int>(CudaOp::kFarthestPointSample), B, N, 0, 0, k, true, 0);
  CHECK(!l.gram && !l.rows_on_demand && l.gram_at < 0 && l.row < 0 && l.sim < 0 && l.index < 0 && l.off >= 0);
  // gram writes into the caller's output.
  l = workspace_layout(static_cast<int>(CudaOp::kGram), B, N, 0, 0, 0, false, 0);
  CHECK(l.total == 0);
  // dpp: Cholesky rows.
  l = workspace_layout(static_cast<int>(CudaOp::kDppGreedy), B, N, 0, 0, k, false, 0);
  c = l.chunk;
  CHECK(l.gram && l.chol >= 0 && l.sim < 0);
  check_disjoint({{l.norm, c * N * 4}, {l.scale, c * N * 4}, {l.gram_at, c * N * N * 4}, {l.keys, c * N * 4},
                  {l.chol, c * k * N * 4}},
                 l.total);
  // prompt_cover: S, cover and the candidate arrays only.
  l = workspace_layout(static_cast<int>(CudaOp::kPromptCover), B, N, L, k_p, 0, false, 0);
  CHECK(!l.gram && l.sim >= 0 && l.cover >= 0 && l.index >= 0 && l.norm < 0 && l.off < 0 && l.picks < 0);

  // chunking keeps the Gram matrices within the budget; beyond one sample's budget, rows on demand.
  l = workspace_layout(static_cast<int>(CudaOp::kFarthestPointSample), 64, 8192, 0, 0, 10, false, 0);
  CHECK(l.gram && l.chunk == 4 && l.chunk * 8192LL * 8192 * 4 <= kGramBudgetBytes);
  l = workspace_layout(static_cast<int>(CudaOp::kFarthestPointSample), 2, 16385, 0, 0, 10, false, 0);
  CHECK(!l.gram && l.rows_on_demand && l.chunk == 2);
  l = workspace_layout(static_cast<int>(CudaOp::kFarthestPointSample), 2, 16384, 0, 0, 10, false, 0);
  CHECK(l.gram && l.chunk == 1);

  // bad arguments and overflow
  CHECK(workspace_layout(5, 1, 1, 1, 1, 1, false, 0).total == -1);
  CHECK(workspace_layout(-1, 1, 1, 1, 1, 1, false, 0).total == -1);
  CHECK(workspace_layout(3, -1, 1, 1, 1, 1, false, 0).total == -1);
  CHECK(workspace_layout(3, 1, 1, 1, 1, 1, false, 8).total == -1);
  CHECK(workspace_layout(3, int64_t(1) << 40, int64_t(1) << 40, 1 << 20, 4, 8, false, 0).total == -1);
  CHECK(workspace_layout(1, 1, int64_t(1) << 40, int64_t(1) << 40, 4, 0, false, 0).total == -1);
  CHECK(workspace_layout(3, 0, 100, 8, 4, 8, false, 0).total == 0);
}

void check_shared_layouts() {
  for (int64_t N : {1, 5, 64, 577, 16384}) {
    const FpsShared s = fps_shared_layout(N, true, true, true);
    check_disjoint({{s.keys, 4 * N}, {s.index, 4 * N}, {s.row, 4 * N}, {s.off, N}}, s.bytes, 16);
    const FpsShared t = fps_shared_layout(N, false, false, true);
    CHECK(t.index < 0 && t.row < 0 && t.off >= 4 * N && t.bytes >= t.off + N);
    const DppShared d = dpp_shared_layout(N, 64, true);
    CHECK(d.row >= 4 * N && d.chol >= d.row + 4 * N && d.bytes >= d.chol + 64 * N * 4 && d.chol % 16 == 0);
  }
  CHECK(dpp_shared_layout(int64_t(1) << 40, int64_t(1) << 40, false).bytes == -1);
  CHECK(row_threads(1) == 64 && row_threads(65) == 96 && row_threads(300) == 320 && row_threads(576) == 512);
}

}  // namespace

int main() {
  check_fragments(false);
  check_fragments(true);
  check_triangle();
  check_workspace();
  check_shared_layouts();
  if (failures) {
    std::fprintf(stderr, "layout_test: %d check(s) failed\n", failures);
    return 1;
  }
  std::printf("layout_test: ok\n");
  return 0;
}
