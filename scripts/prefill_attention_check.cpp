// A check of csrc/prefill_attention.cpp's vector path (AVX-512 or AVX2, whatever -march=native gives) against a
// float64 reference, without torch: for machines where the tests' build is not the path to check (an AVX-512
// host beside an AVX2 development machine).
//
//   g++ -O3 -march=native -ffast-math -std=c++17 -DKILN_PREFILL_STANDALONE -I kiln/backends/torch/csrc \
//       scripts/prefill_attention_check.cpp -o /tmp/pa_check && /tmp/pa_check
//
// Prints the ISA, the worst error of each case and FAIL/ok; exits 1 on any failure. With `bench`, it then times
// one layer of the default model's prefill attention (9 heads over 3 kv heads, head_dim 64) at 512 and 2048 tokens
// on one thread (CPU time): build a second time with -mno-avx512f for the AVX2 path of the same machine.
#include "prefill_attention.cpp"

#include <cstdio>
#include <ctime>
#include <random>
#include <string>

static uint32_t g_seed = 1;

template <typename TC>
static double run_case(int64_t Dh, int64_t G, int64_t KVH, int64_t window, float cap, bool portable) {
  std::mt19937 rng(g_seed++);
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t B = 3, T = 40, bs = 32, H = G * KVH, NBt = 6, NB = B * NBt + 1;
  const int64_t starts[B] = {0, 17, 61}, q_lens[B] = {33, 7, 40};
  std::vector<int64_t> tables(B * NBt);
  for (int64_t i = 0; i < B * NBt; ++i) tables[i] = NB - 1 - i;                  // scattered blocks
  std::vector<TC> kc(NB * KVH * Dh * bs), vc(NB * KVH * bs * Dh);
  std::vector<float> q(B * T * H * Dh), out(B * T * H * Dh);
  for (auto& x : kc) kp::from_f32(nd(rng), &x);
  for (auto& x : vc) kp::from_f32(nd(rng), &x);
  for (auto& x : q) x = nd(rng);
  const float scale = 1.f / std::sqrt(static_cast<float>(Dh));
  kp::prefill_attention<float, TC>(q.data(), kc.data(), vc.data(), tables.data(), starts, q_lens, out.data(), B, T,
                                   H, KVH, Dh, bs, NBt, scale, window, cap, portable, 1,
                                   [](int64_t n, auto fn) { for (int64_t w = 0; w < n; ++w) fn(w); });
  double worst = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t hq = 0; hq < H; ++hq) {
        const int64_t h = hq / G, p = starts[b] + t;
        std::vector<double> o(Dh, 0.0);
        if (t < q_lens[b]) {
          std::vector<double> s(p + 1, -1e300);
          double mx = -1e300, z = 0;
          for (int64_t k = 0; k <= p; ++k) {
            if (window > 0 && p - k >= window) continue;
            const int64_t blk = tables[b * NBt + k / bs], off = k % bs;
            double a = 0;
            for (int64_t d = 0; d < Dh; ++d)
              a += double(q[((b * T + t) * H + hq) * Dh + d]) * kp::to_f32(kc[((blk * KVH + h) * Dh + d) * bs + off]);
            a *= scale;
            if (cap > 0) a = cap * std::tanh(a / cap);
            s[k] = a, mx = std::max(mx, a);
          }
          for (int64_t k = 0; k <= p; ++k) {
            if (s[k] <= -1e299) continue;
            const double e = std::exp(s[k] - mx);
            z += e;
            const int64_t blk = tables[b * NBt + k / bs], off = k % bs;
            for (int64_t d = 0; d < Dh; ++d) o[d] += e * kp::to_f32(vc[((blk * KVH + h) * bs + off) * Dh + d]);
          }
          for (auto& x : o) x /= z;
        }
        for (int64_t d = 0; d < Dh; ++d)
          worst = std::max(worst, std::fabs(o[d] - out[((b * T + t) * H + hq) * Dh + d]));
      }
  return worst;
}

static void bench(int64_t T) {
  const int64_t G = 3, KVH = 3, H = G * KVH, Dh = 64, bs = 16, NBt = T / bs, NB = NBt + 1;
  std::vector<float> kc(NB * KVH * Dh * bs, 0.5f), vc(NB * KVH * bs * Dh, 0.25f), q(T * H * Dh, 0.1f), out(T * H * Dh);
  std::vector<int64_t> tables(NBt);
  for (int64_t i = 0; i < NBt; ++i) tables[i] = i + 1;
  const int64_t starts[1] = {0}, q_lens[1] = {T};
  double best = 1e9;
  for (int r = 0; r < 5; ++r) {
    const std::clock_t t0 = std::clock();
    kp::prefill_attention<float, float>(q.data(), kc.data(), vc.data(), tables.data(), starts, q_lens, out.data(), 1, T,
                                        H, KVH, Dh, bs, NBt, 0.125f, 0, 0.f, false, 1,
                                        [](int64_t n, auto fn) { for (int64_t w = 0; w < n; ++w) fn(w); });
    best = std::min(best, double(std::clock() - t0) / CLOCKS_PER_SEC);
  }
  const double flops = 2.0 * 2 * H * Dh * T * (T + 1) / 2;
  std::printf("bench T=%lld: %.2f ms per layer on one thread, %.1f GFLOP/s\n", (long long)T, best * 1e3,
              flops / best / 1e9);
}

int main(int argc, char** argv) {
#if defined(__AVX512F__)
  const char* isa = "avx512";
#elif KP_SIMD
  const char* isa = "avx2";
#else
  const char* isa = "scalar";
#endif
  std::printf("vector path: %s\n", isa);
  int fails = 0;
  for (bool portable : {false, true})
    for (int64_t Dh : {24, 64, 128})
      for (int64_t G : {1, 3, 8})
        for (int64_t window : {0, 20})
          for (float cap : {0.f, 5.f}) {
            const double e32 = run_case<float>(Dh, G, 2, window, cap, portable);
            const double e16 = run_case<uint16_t>(Dh, G, 2, window, cap, portable);
            const bool bad = !(e32 < 2e-4 && e16 < 2e-4);
            fails += bad;
            std::printf("%s Dh=%3lld G=%lld window=%2lld cap=%.0f  f32 %.2e  bf16 cache %.2e  %s\n",
                        portable ? "scalar" : isa, (long long)Dh, (long long)G, (long long)window, cap, e32, e16,
                        bad ? "FAIL" : "ok");
          }
  std::printf("%s\n", fails ? "FAILED" : "all ok");
  if (argc > 1 && std::string(argv[1]) == "bench")
    for (int64_t T : {512, 2048}) bench(T);
  return fails ? 1 : 0;
}
