// CUDA select (MoB; csrc/cpu/select.cpp is the CPU one): the prompt cover for k_p tokens, farthest point sampling
// seeded by them for the rest, the sorted union; plus the workspace query of every entry point.
//
// Three launches per chunk of samples, all on the caller's stream, no host synchronisation:
//   1. gram_kernel (gram.cu): the prompt tiles S = p̂ v̂ᵀ [L, N] and the upper-triangle tiles of G = v̂ v̂ᵀ [N, N] of
//      every sample in one tensor-core launch (norms fused; cover reset to -inf);
//   2. membership_kernel (prompt_cover.cu): each valid prompt row's f best tokens max-reduced into cover [N];
//   3. fps_kernel (farthest_point_sample.cu), one block per sample: the k_p best nominees, FPS seeded by them reading
//      rows of G for the remaining k - count picks, and the taken set written out sorted.
// Without prompt picks (k_p = 0 or no prompt rows) step 2 is skipped; beyond the Gram budget (N > 16384) step 1 makes
// S only and a norms launch replaces G (FPS then computes each centre's row from the features).
#include "cuda/common.cuh"

namespace mob {

int64_t cuda_workspace_bytes(int op, int64_t B, int64_t N, int64_t L, int64_t k_p, int64_t k, bool has_sim,
                             int64_t options) {
  return gpu::workspace_layout(op, B, N, L, k_p, k, has_sim, options).total;
}

int cuda_runtime_version() { return CUDART_VERSION; }

std::string select_cuda(int device, void* stream, int64_t B, int64_t N, int64_t L, int64_t d, Features vis,
                        Features prompt, const bool* mask, int64_t k_p, int64_t k, const int64_t* fold, int64_t* out,
                        void* workspace, int64_t workspace_bytes, int64_t options) {
  const gpu::Layout l = gpu::workspace_layout(static_cast<int>(CudaOp::kSelect), B, N, L, k_p, k, false, options);
  const std::string err = gpu::first_error({
      gpu::check_cuda_sizes(Sizes{B, N, L, d, k_p, k}, options),
      check_pointer("vis", vis.data, gpu::elements(B, N, d)),
      check_pointer("prompt", prompt.data, gpu::elements(B, L, d)),
      check_pointer("mask", mask, gpu::elements(B, L)),
      check_pointer("fold", fold, B),
      check_pointer("out", out, gpu::elements(B, k)),
      gpu::check_workspace(l, workspace, workspace_bytes),
  });
  if (!err.empty()) return err;
  if (B == 0 || k == 0) return "";
  if (const std::string e = gpu::use_device(device); !e.empty()) return e;
  const auto s = static_cast<cudaStream_t>(stream);
  const bool cover_on = k_p > 0 && L > 0;
  for (int64_t b0 = 0; b0 < B; b0 += l.chunk) {
    const int64_t nb = B - b0 < l.chunk ? B - b0 : l.chunk;
    const Features v = gpu::offset_features(vis, b0);

    // 1. S and G in one launch
    gpu::GramJob g;
    g.B = nb;
    g.N = N;
    g.L = cover_on ? L : 0;
    g.d = d;
    g.vis = v;
    g.prompt = gpu::offset_features(prompt, b0);
    g.sim = cover_on ? gpu::at<float>(workspace, l.sim) : nullptr;
    g.cover = cover_on ? gpu::at<float>(workspace, l.cover) : nullptr;
    if (l.gram) {
      g.gram = gpu::at<float>(workspace, l.gram_at);
      g.g_bs = N * N;
      g.g_rs = N;
      g.norm = gpu::at<float>(workspace, l.norm);
    }
    std::string e = gpu::launch_gram(s, g);
    if (e.empty() && !l.gram)
      e = gpu::launch_row_norms(s, nb, N, d, v, gpu::at<float>(workspace, l.norm), gpu::at<float>(workspace, l.scale));

    // 2. the prompt rows' nominees
    if (e.empty() && cover_on) e = gpu::launch_membership(s, device, nb, N, L, g.sim, mask + b0 * L, fold + b0, g.cover,
                                                          options);
    if (!e.empty()) return e;

    // 3. picks, FPS, sorted union
    gpu::FpsJob f;
    f.B = nb;
    f.N = N;
    f.d = d;
    f.k = k;
    f.vis = v;
    f.gram = g.gram;
    f.g_bs = g.g_bs;
    f.g_rs = g.g_rs;
    f.norm = gpu::at<float>(workspace, l.norm);
    f.scale = l.gram ? nullptr : gpu::at<float>(workspace, l.scale);
    f.cover = g.cover;
    f.k_p = k_p;
    f.picks = gpu::at<int64_t>(workspace, l.picks);
    f.count = gpu::at<int64_t>(workspace, l.count);
    f.seed = f.picks;  // FPS is seeded by the picks the same kernel has just made
    f.m = k_p;
    f.out_sorted = out + b0 * k;
    f.g_keys = gpu::at<float>(workspace, l.keys);
    f.g_index = gpu::at<int32_t>(workspace, l.index);
    f.g_off = gpu::at<uint8_t>(workspace, l.off);
    f.g_row = gpu::at<float>(workspace, l.row);
    if (!(e = gpu::launch_fps(s, device, f, options)).empty()) return e;
  }
  return "";
}

}  // namespace mob
