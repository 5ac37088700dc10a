// Stand-alone driver for the C++ CPU backend (no Python): runs every entry point of csrc/mob.h on fixed pseudo-random
// inputs and prints the results as text, so that two builds (x86-64 and aarch64 under qemu, or two instruction-set
// paths) can be compared with diff. scripts/cross_check_aarch64.sh builds and runs it.
//
// Inputs are Gaussian with sizes that exercise every tail (d not a multiple of any vector width, N not a multiple of
// any tile side), in float32, float16 and bfloat16. Index outputs are printed as they are; floating-point outputs
// (the Gram matrix, DPP gains) are checked here against a float64 computation and printed as pass/fail, since their
// last bits depend on the instruction set. Well-separated random inputs make every decision win by a wide margin, so
// the indices must agree across builds.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/dot.h"
#include "mob.h"

namespace {

uint64_t rng_state = 0x9e3779b97f4a7c15ull;
uint64_t next_u64() {  // xorshift64*
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return rng_state * 0x2545f4914f6cdd1dull;
}
double uniform() { return (static_cast<double>(next_u64() >> 11) + 0.5) / 9007199254740992.0; }
float gaussian() { return static_cast<float>(std::sqrt(-2.0 * std::log(uniform())) * std::cos(6.283185307179586 * uniform())); }

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
uint16_t to_bf16(float f) {  // round to nearest even (finite inputs)
  const uint32_t u = bits(f);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
uint16_t to_f16(float f) {  // round to nearest even, normal range (|f| < 65504, Gaussian inputs never leave it)
  const uint32_t u = bits(f), sign = (u >> 16) & 0x8000u;
  const int exp = static_cast<int>((u >> 23) & 0xff) - 127 + 15;
  if (exp <= 0) return static_cast<uint16_t>(sign);  // flush the (vanishingly rare) subnormal halves to zero
  uint32_t man = u & 0x7fffffu, h = sign | (static_cast<uint32_t>(exp) << 10) | (man >> 13);
  const uint32_t rest = man & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(h);
}

// A feature batch [B, n, d] in dtype t, and its values as float (what the kernels see after rounding).
struct Batch {
  mob::DType t;
  int64_t B, n, d;
  std::vector<float> f32, value;
  std::vector<uint16_t> h16;
  Batch(mob::DType t_, int64_t B_, int64_t n_, int64_t d_) : t(t_), B(B_), n(n_), d(d_), value(B_ * n_ * d_) {
    for (float& x : value) x = gaussian();
    if (t == mob::DType::kFloat32) {
      f32 = value;
    } else {
      h16.resize(value.size());
      for (size_t i = 0; i < value.size(); ++i) {
        h16[i] = t == mob::DType::kBFloat16 ? to_bf16(value[i]) : to_f16(value[i]);
        value[i] = t == mob::DType::kBFloat16 ? mob::cpu::bf16_to_float(h16[i]) : mob::cpu::f16_to_float(h16[i]);
      }
    }
  }
  mob::Features features() const {
    const void* p = t == mob::DType::kFloat32 ? static_cast<const void*>(f32.data()) : h16.data();
    return mob::Features{p, t, n * d, d};
  }
};

void print(const char* what, const std::vector<int64_t>& v, int64_t width) {
  std::printf("%s:", what);
  for (size_t i = 0; i < v.size(); ++i) std::printf("%s%lld", i % width == 0 ? (i ? " |" : " ") : ",", static_cast<long long>(v[i]));
  std::printf("\n");
}

int failures = 0;
void check(bool ok, const std::string& what) {
  std::printf("%s: %s\n", what.c_str(), ok ? "ok" : "FAIL");
  failures += !ok;
}

// Cosine similarity in float64 from the rounded values.
double cosine64(const Batch& x, int64_t b, int64_t i, int64_t j) {
  double dot = 0, ni = 0, nj = 0;
  const float* a = &x.value[(b * x.n + i) * x.d];
  const float* c = &x.value[(b * x.n + j) * x.d];
  for (int64_t e = 0; e < x.d; ++e) {
    dot += double(a[e]) * c[e];
    ni += double(a[e]) * a[e];
    nj += double(c[e]) * c[e];
  }
  return dot / (std::max(std::sqrt(ni), 1e-12) * std::max(std::sqrt(nj), 1e-12));
}

void run(mob::DType t, const char* name) {
  const int64_t B = 2, N = 97, L = 9, d = 67, k = 20, k_p = 8;
  const Batch vis(t, B, N, d), prompt(t, B, L, d);
  std::vector<uint8_t> mask_bytes(B * L, 1), valid_bytes(B * N, 1);
  for (int64_t j = 6; j < L; ++j) mask_bytes[1 * L + j] = 0;  // sample 1: three padding prompt rows
  for (int64_t i = 0; i < N; i += 5) valid_bytes[i] = 0;      // every fifth token invalid
  const bool* mask = reinterpret_cast<const bool*>(mask_bytes.data());
  const bool* valid = reinterpret_cast<const bool*>(valid_bytes.data());
  const std::vector<int64_t> fold = {2, 3};  // neighbours per prompt row
  std::string tag = std::string(name) + " ";

  std::vector<int64_t> picks(B * k_p), count(B), out(B * k);
  mob::prompt_cover_cpu(B, N, L, d, vis.features(), prompt.features(), mask, k_p, fold.data(), picks.data(),
                        count.data());
  print((tag + "prompt_cover picks").c_str(), picks, k_p);
  print((tag + "prompt_cover count").c_str(), count, B);

  mob::select_cpu(B, N, L, d, vis.features(), prompt.features(), mask, k_p, k, fold.data(), out.data());
  print((tag + "select").c_str(), out, k);

  std::vector<int64_t> seed = {3, -1, 17, -1, -1, -1}, num_picks = {k, k - 5};
  mob::farthest_point_sample_cpu(B, N, d, vis.features(), seed.data(), 3, num_picks.data(), k, nullptr,
                                 mob::Square{nullptr, 0, 0}, out.data());
  print((tag + "fps").c_str(), out, k);
  mob::farthest_point_sample_cpu(B, N, d, vis.features(), seed.data(), 3, num_picks.data(), k, valid,
                                 mob::Square{nullptr, 0, 0}, out.data());
  print((tag + "fps valid").c_str(), out, k);

  std::vector<float> sim(B * N * N);
  mob::gram_cpu(B, N, d, vis.features(), sim.data());
  double err = 0;
  bool symmetric = true;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < N; ++j) {
        err = std::max(err, std::fabs(sim[(b * N + i) * N + j] - cosine64(vis, b, i, j)));
        symmetric &= bits(sim[(b * N + i) * N + j]) == bits(sim[(b * N + j) * N + i]);
      }
  check(symmetric && err < 1e-5, tag + "gram symmetric, within 1e-5 of float64");
  std::vector<int64_t> from_sim(B * k);
  mob::farthest_point_sample_cpu(B, N, d, vis.features(), seed.data(), 3, num_picks.data(), k, valid,
                                 mob::Square{sim.data(), N * N, N}, from_sim.data());
  check(from_sim == out, tag + "fps valid reading the Gram matrix == computing it");

  std::vector<float> relevance(B * N), gain(B * k), gain_eager(B * k);
  for (float& r : relevance) r = static_cast<float>(uniform());
  std::vector<int64_t> order_eager(B * k);
  mob::dpp_greedy_cpu(B, N, d, vis.features(), relevance.data(), valid, k, out.data(), gain.data(), true);
  print((tag + "dpp_greedy").c_str(), out, k);
  mob::dpp_greedy_cpu(B, N, d, vis.features(), relevance.data(), valid, k, order_eager.data(), gain_eager.data(),
                      false);
  check(order_eager == out && std::memcmp(gain.data(), gain_eager.data(), gain.size() * 4) == 0,
        tag + "dpp_greedy lazy == eager, bit for bit");

  mob::divprune_cpu(B, N, d, vis.features(), valid, k, out.data());
  print((tag + "divprune").c_str(), out, k);
}

// Each entry point rejects a null buffer and impossible sizes before touching memory.
void run_rejections() {
  const int64_t fold = 1;
  int64_t out[4];
  float fout[4];
  bool valid[2] = {true, true};
  float rel[2] = {1, 1};
  float data[8] = {};
  const mob::Features none{nullptr, mob::DType::kFloat32, 4, 4}, some{data, mob::DType::kFloat32, 4, 4};
  auto rejected = [](const char* what, auto call) {
    try {
      call();
    } catch (const std::invalid_argument& e) {
      std::printf("rejected %s: %s\n", what, e.what());
      return;
    }
    std::printf("NOT rejected %s\n", what);
    ++failures;
  };
  rejected("select null vis", [&] { mob::select_cpu(1, 2, 1, 4, none, some, valid, 1, 1, &fold, out); });
  rejected("prompt_cover null count", [&] { mob::prompt_cover_cpu(1, 2, 1, 4, some, some, valid, 1, &fold, out, nullptr); });
  rejected("fps null num_picks", [&] {
    mob::farthest_point_sample_cpu(1, 2, 4, some, nullptr, 0, nullptr, 1, nullptr, mob::Square{nullptr, 0, 0}, out);
  });
  rejected("gram null out", [&] { mob::gram_cpu(1, 2, 4, some, nullptr); });
  rejected("dpp null relevance", [&] { mob::dpp_greedy_cpu(1, 2, 4, some, nullptr, valid, 1, out, fout); });
  rejected("dpp null valid", [&] { mob::dpp_greedy_cpu(1, 2, 4, some, rel, nullptr, 1, out, fout); });
  rejected("divprune null out", [&] { mob::divprune_cpu(1, 2, 4, some, nullptr, 1, nullptr); });
  rejected("gram overflowing sizes", [&] { mob::gram_cpu(1, int64_t{1} << 32, 1, some, fout); });
  rejected("select k > N", [&] { mob::select_cpu(1, 2, 1, 4, some, some, valid, 1, 3, &fold, out); });
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--list") == 0) {  // the instruction-set paths this CPU runs
    for (const std::string& isa : mob::cpu::supported_dot_isas()) std::printf("%s\n", isa.c_str());
    return 0;
  }
  if (argc > 1 && !mob::cpu::set_dot_isa(argv[1])) {
    std::fprintf(stderr, "unknown instruction set %s\n", argv[1]);
    return 2;
  }
  std::fprintf(stderr, "dot products: %s\n", mob::cpu::dot_isa());
  run(mob::DType::kFloat32, "float32");
  run(mob::DType::kFloat16, "float16");
  run(mob::DType::kBFloat16, "bfloat16");
  run_rejections();
  return failures == 0 ? 0 : 1;
}
