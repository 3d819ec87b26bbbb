// prefill_attention: causal attention of each row's new tokens over that row's paged context, straight from
// kiln's KV cache (built by kiln/backends/torch/kernels.py as its own module). The new tokens' K/V are already
// in the cache (model.py writes them), so every key is read from its block, in place:
//
//   q        [B, T, H, Dh]        float32 or bfloat16, rotated; row b's tokens t < q_lens[b] sit at start[b] + t
//   k_cache  [NB, KVH, Dh, bs]    float32 or bfloat16 (one layer; K transposed within a block), bs % 16 == 0
//   v_cache  [NB, KVH, bs, Dh]
//   tables   [B, NBt]             int64 block ids; starts, q_lens [B] int64
//   window   > 0: a sliding layer, a query at p sees keys p - window < k <= p;  softcap > 0: cap * tanh(s / cap)
//   returns  [B, T, H, Dh]        q's dtype; padded tokens (t >= q_lens[b]) are zeros
//
// Flash-style: one task per (row, kv head, tile of TQ queries) serves the tile's TQ * G query vectors (G = H /
// KVH heads share a kv head), so each K/V tile of 16 positions is read once per query tile. Scores, the online
// softmax (running max and sum per query) and the output accumulators stay float32. K's layout makes the
// scores of 4 queries x 16 keys a register block fed by contiguous 16-key loads; V's makes P.V a register
// block over contiguous head_dim loads. Tasks are handed out longest first from one atomic counter (causal
// tiles differ in cost by their position). AVX-512 or AVX2+FMA where the build's -march has them; a scalar
// path otherwise, and on request (`portable`), so the tests check it on any machine.
//
// Compiled with -ffast-math: no infinities; masked scores use a finite NEG and are zeroed after the exp.
// KILN_PREFILL_STANDALONE builds the core without torch (a C++ check of the SIMD path against the scalar one).
#ifndef KILN_PREFILL_STANDALONE
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>   // pybind11 + at::Tensor casters: torch/extension.h without the C++ frontend (~3x faster to build)
#include <ATen/Parallel.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace kp {

constexpr int KT = 16;             // keys per sub-tile: 16 consecutive positions inside one cache block
constexpr int NSUB = 4;            // sub-tiles per key chunk: the softmax's per-row work is per chunk
constexpr int KC = KT * NSUB;      // keys per chunk (64)
constexpr int ROWS = 64;           // target query vectors per task: TQ = max(1, ROWS / G)
constexpr float NEG = -1e30f;

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline uint16_t f32_to_bf16(float f) {   // round to nearest even (finite inputs)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline float to_f32(float x) { return x; }
static inline float to_f32(uint16_t x) { return bf16_to_f32(x); }
static inline void from_f32(float x, float* o) { *o = x; }
static inline void from_f32(float x, uint16_t* o) { *o = f32_to_bf16(x); }

// -- SIMD: one vector type per ISA, the handful of operations the block step needs -------------------------
#if defined(__AVX512F__)
#define KP_SIMD 1
constexpr int W = 16;
using vf = __m512;
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vf vload(const uint16_t* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
static inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
static inline vf vset(float x) { return _mm512_set1_ps(x); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline float vhmax(vf a) { return _mm512_reduce_max_ps(a); }
static inline float vhsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline vf vexp(vf x) {   // Cephes expf: 2^n * p(r), |r| <= ln2 / 2; inputs clamped to normal results
  x = _mm512_max_ps(_mm512_min_ps(x, vset(88.0f)), vset(-87.0f));
  const vf fx = _mm512_roundscale_ps(vmul(x, vset(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, vset(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, vset(-2.12194440e-4f), x);
  vf y = vfma(vset(1.9875691500e-4f), x, vset(1.3981999507e-3f));
  y = vfma(y, x, vset(8.3334519073e-3f));
  y = vfma(y, x, vset(4.1665795894e-2f));
  y = vfma(y, x, vset(1.6666665459e-1f));
  y = vfma(y, x, vset(5.0000001201e-1f));
  y = vfma(y, vmul(x, x), _mm512_add_ps(x, vset(1.0f)));
  const __m512i n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return vmul(y, _mm512_castsi512_ps(n));
}
#elif defined(__AVX2__) && defined(__FMA__)
#define KP_SIMD 1
constexpr int W = 8;
using vf = __m256;
static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vf vload(const uint16_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
static inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
static inline vf vset(float x) { return _mm256_set1_ps(x); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline float vhmax(vf a) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
static inline float vhsum(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
static inline vf vexp(vf x) {
  x = _mm256_max_ps(_mm256_min_ps(x, vset(88.0f)), vset(-87.0f));
  const vf fx = _mm256_round_ps(vmul(x, vset(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, vset(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, vset(-2.12194440e-4f), x);
  vf y = vfma(vset(1.9875691500e-4f), x, vset(1.3981999507e-3f));
  y = vfma(y, x, vset(8.3334519073e-3f));
  y = vfma(y, x, vset(4.1665795894e-2f));
  y = vfma(y, x, vset(1.6666665459e-1f));
  y = vfma(y, x, vset(5.0000001201e-1f));
  y = vfma(y, vmul(x, x), _mm256_add_ps(x, vset(1.0f)));
  const __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return vmul(y, _mm256_castsi256_ps(n));
}
#else
#define KP_SIMD 0
#endif

static inline float softcap1(float s, float cap) { return cap * std::tanh(s / cap); }

// What one task's block steps share: the query tile (scaled, [M4, Dh], rows m = ti * G + g, zero past M),
// the running max / sum / output accumulators, and each row's position (masks).
struct Tile {
  int64_t M, M4, Dh;
  float *q, *o, *s, *mx, *l;       // q, o [M4, Dh]; s [M4, KC] scores then probabilities; mx, l [M4]
  const int64_t* pos;              // [M] query positions
};

// Softcap, masks and the online softmax of one key chunk's scores s [M, KC] (keys k0 + j, j < nk): s becomes
// the probabilities (exact 0 where masked), o rows are rescaled by exp(old max - new max).
template <bool SIMD>
static inline void softmax_tile(Tile& t, int64_t k0, int nk, bool masked, int64_t window, float cap) {
  for (int64_t m = 0; m < t.M; ++m) {
    float* s = t.s + m * KC;
    const int64_t p = t.pos[m];
    auto seen = [&](int j) { return j < nk && k0 + j <= p && (window <= 0 || p - (k0 + j) < window); };
    float rmax = t.mx[m], rsum = 0.f;
#if KP_SIMD
    if constexpr (SIMD) {
      if (cap > 0.f)                                        // cap * tanh(s / cap) = cap - 2 cap / (exp(2 s / cap) + 1)
        for (int i = 0; i < KC / W; ++i) {
          const vf e = vexp(vmul(vload(s + i * W), vset(2.f / cap)));
          vstore(s + i * W, vsub(vset(cap), vdiv(vset(2.f * cap), vadd(e, vset(1.f)))));
        }
    } else
#endif
    if (cap > 0.f)
      for (int j = 0; j < KC; ++j) s[j] = softcap1(s[j], cap);
    int valid = KC;
    if (masked) {
      valid = 0;
      for (int j = 0; j < KC; ++j) {
        const bool ok = seen(j);
        valid += ok;
        if (!ok) s[j] = NEG;
      }
      if (valid == 0) {                                     // nothing of this tile is seen by this query
        std::fill(s, s + KC, 0.f);
        continue;
      }
    }
#if KP_SIMD
    if constexpr (SIMD) {
      vf v[KC / W], mv, sum = vset(0.f);
      for (int i = 0; i < KC / W; ++i) v[i] = vload(s + i * W);
      mv = v[0];
      for (int i = 1; i < KC / W; ++i) mv = vmax(mv, v[i]);
      rmax = std::max(rmax, vhmax(mv));
      for (int i = 0; i < KC / W; ++i) {
        v[i] = vexp(vsub(v[i], vset(rmax)));
        sum = vadd(sum, v[i]);
        vstore(s + i * W, v[i]);
      }
      rsum = vhsum(sum);
    } else
#endif
    {
      for (int j = 0; j < KC; ++j) rmax = std::max(rmax, s[j]);
      for (int j = 0; j < KC; ++j) rsum += (s[j] = std::exp(s[j] - rmax));
    }
    if (valid < KC) {                                       // exact zeros for the masked keys
      rsum = 0.f;
      for (int j = 0; j < KC; ++j) rsum += (s[j] = seen(j) ? s[j] : 0.f);
    }
    if (rmax != t.mx[m]) {                                  // rescale what earlier tiles accumulated
      const float a = std::exp(t.mx[m] - rmax);
      float* o = t.o + m * t.Dh;
      for (int64_t d = 0; d < t.Dh; ++d) o[d] *= a;
      t.l[m] *= a;
      t.mx[m] = rmax;
    }
    t.l[m] += rsum;
  }
}

// One key chunk (up to NSUB sub-tiles of 16 positions) of one task: scores s = q K^T, softmax_tile, o += P V.
//   kb[c]: sub-tile c's K[.., d, j] at kb[c][d * bs + j];  vb[c]: its V[j, d] at vb[c][j * Dh + d]
template <bool SIMD, typename TC>
static void block_step(Tile& t, const TC* const* kb, const TC* const* vb, int nsub, int64_t bs, int64_t k0, int nk,
                       bool masked, int64_t window, float cap) {
  const int64_t Dh = t.Dh;
#if KP_SIMD
  if constexpr (SIMD) {
    constexpr int NV = KT / W;
    for (int c = 0; c < nsub; ++c)
      for (int64_t m = 0; m < t.M4; m += 4) {               // scores: 4 queries x 16 keys in registers
        const float *q0 = t.q + m * Dh, *q1 = q0 + Dh, *q2 = q1 + Dh, *q3 = q2 + Dh;
        const TC* k = kb[c];
        vf a0[NV], a1[NV], a2[NV], a3[NV];
        for (int i = 0; i < NV; ++i) a0[i] = a1[i] = a2[i] = a3[i] = vset(0.f);
        for (int64_t d = 0; d < Dh; ++d) {
          vf kv[NV];
          for (int i = 0; i < NV; ++i) kv[i] = vload(k + d * bs + i * W);
          const vf b0 = vset(q0[d]), b1 = vset(q1[d]), b2 = vset(q2[d]), b3 = vset(q3[d]);
          for (int i = 0; i < NV; ++i) {
            a0[i] = vfma(b0, kv[i], a0[i]); a1[i] = vfma(b1, kv[i], a1[i]);
            a2[i] = vfma(b2, kv[i], a2[i]); a3[i] = vfma(b3, kv[i], a3[i]);
          }
        }
        float* s = t.s + m * KC + c * KT;
        for (int i = 0; i < NV; ++i) {
          vstore(s + i * W, a0[i]); vstore(s + KC + i * W, a1[i]);
          vstore(s + 2 * KC + i * W, a2[i]); vstore(s + 3 * KC + i * W, a3[i]);
        }
      }
    softmax_tile<true>(t, k0, nk, masked, window, cap);
    for (int64_t m = 0; m < t.M4; m += 4) {                 // o[m..m+3] += P V, head_dim in register chunks
      float* o = t.o + m * Dh;
      int64_t c = 0;
      for (; c + 2 * W <= Dh; c += 2 * W) {
        vf a[4][2];
        for (int r = 0; r < 4; ++r) { a[r][0] = vload(o + r * Dh + c); a[r][1] = vload(o + r * Dh + c + W); }
        for (int u = 0; u < nsub; ++u) {
          const float* p = t.s + m * KC + u * KT;           // rows past M: zeros (never written)
          const TC* v = vb[u] + c;
          for (int j = 0, nj = std::min(KT, nk - u * KT); j < nj; ++j) {
            const vf v0 = vload(v + j * Dh), v1 = vload(v + j * Dh + W);
            for (int r = 0; r < 4; ++r) {
              const vf pj = vset(p[r * KC + j]);
              a[r][0] = vfma(pj, v0, a[r][0]); a[r][1] = vfma(pj, v1, a[r][1]);
            }
          }
        }
        for (int r = 0; r < 4; ++r) { vstore(o + r * Dh + c, a[r][0]); vstore(o + r * Dh + c + W, a[r][1]); }
      }
      for (; c + W <= Dh; c += W) {
        vf a[4];
        for (int r = 0; r < 4; ++r) a[r] = vload(o + r * Dh + c);
        for (int u = 0; u < nsub; ++u) {
          const float* p = t.s + m * KC + u * KT;
          for (int j = 0, nj = std::min(KT, nk - u * KT); j < nj; ++j) {
            const vf v0 = vload(vb[u] + j * Dh + c);
            for (int r = 0; r < 4; ++r) a[r] = vfma(vset(p[r * KC + j]), v0, a[r]);
          }
        }
        for (int r = 0; r < 4; ++r) vstore(o + r * Dh + c, a[r]);
      }
      for (; c < Dh; ++c)                                   // head_dim tail (e.g. 24 under AVX-512)
        for (int r = 0; r < 4; ++r) {
          float acc = o[r * Dh + c];
          for (int u = 0; u < nsub; ++u)
            for (int j = 0, nj = std::min(KT, nk - u * KT); j < nj; ++j)
              acc += t.s[(m + r) * KC + u * KT + j] * to_f32(vb[u][j * Dh + c]);
          o[r * Dh + c] = acc;
        }
    }
    return;
  }
#endif
  for (int64_t m = 0; m < t.M; ++m) {                       // the scalar path: same steps, plain loops
    float* s = t.s + m * KC;
    const float* q = t.q + m * Dh;
    std::fill(s, s + KC, 0.f);
    for (int u = 0; u < nsub; ++u)
      for (int64_t d = 0; d < Dh; ++d)
        for (int j = 0; j < KT; ++j) s[u * KT + j] += q[d] * to_f32(kb[u][d * bs + j]);
  }
  softmax_tile<false>(t, k0, nk, masked, window, cap);
  for (int64_t m = 0; m < t.M; ++m) {
    float* o = t.o + m * Dh;
    for (int u = 0; u < nsub; ++u) {
      const float* p = t.s + m * KC + u * KT;
      for (int j = 0, nj = std::min(KT, nk - u * KT); j < nj; ++j)
        for (int64_t d = 0; d < Dh; ++d) o[d] += p[j] * to_f32(vb[u][j * Dh + d]);
    }
  }
}

struct Task { int64_t b, h, t0, nq, cost; };

// The whole call. parallel(n, fn): runs fn(worker) for worker < n workers (at::parallel_for under torch).
template <typename TQ, typename TC, typename Parallel>
void prefill_attention(const TQ* q, const TC* kc, const TC* vc, const int64_t* tables, const int64_t* starts,
                       const int64_t* q_lens, TQ* out, int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t Dh,
                       int64_t bs, int64_t NBt, float scale, int64_t window, float cap, bool portable,
                       int64_t workers, Parallel parallel) {
  const int64_t G = H / KVH, TQn = std::max<int64_t>(1, ROWS / G);
  std::vector<Task> tasks;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = q_lens[b]; t < T; ++t)                 // padded tokens: zeros
      for (int64_t i = 0; i < H * Dh; ++i) from_f32(0.f, out + (b * T + t) * H * Dh + i);
    for (int64_t t0 = 0; t0 < q_lens[b]; t0 += TQn) {
      const int64_t nq = std::min(TQn, q_lens[b] - t0), p0 = starts[b] + t0, p1 = p0 + nq - 1;
      const int64_t lo = window > 0 ? std::max<int64_t>(0, p0 - window + 1) : 0;
      for (int64_t h = 0; h < KVH; ++h) tasks.push_back({b, h, t0, nq, nq * (p1 + 1 - lo)});
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& c) { return a.cost > c.cost; });
  std::atomic<int64_t> next{0};
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  parallel(std::min(workers, std::max<int64_t>(n_tasks, 1)), [&](int64_t) {
    const int64_t M4max = (TQn * G + 3) / 4 * 4;
    std::vector<float> qbuf(M4max * Dh), obuf(M4max * Dh), sbuf(M4max * KC), mx(M4max), l(M4max);
    std::vector<int64_t> pos(M4max);
    for (int64_t i; (i = next.fetch_add(1)) < n_tasks;) {
      const Task& tk = tasks[i];
      const int64_t b = tk.b, h = tk.h, M = tk.nq * G, M4 = (M + 3) / 4 * 4;
      Tile t{M, M4, Dh, qbuf.data(), obuf.data(), sbuf.data(), mx.data(), l.data(), pos.data()};
      std::fill(qbuf.begin(), qbuf.end(), 0.f);
      std::fill(obuf.begin(), obuf.end(), 0.f);
      std::fill(sbuf.begin(), sbuf.end(), 0.f);
      std::fill(mx.begin(), mx.end(), NEG);
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t ti = 0; ti < tk.nq; ++ti)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t m = ti * G + g;
          const TQ* src = q + ((b * T + tk.t0 + ti) * H + h * G + g) * Dh;
          for (int64_t d = 0; d < Dh; ++d) qbuf[m * Dh + d] = to_f32(src[d]) * scale;
          pos[m] = starts[b] + tk.t0 + ti;
        }
      const int64_t p0 = starts[b] + tk.t0, p1 = p0 + tk.nq - 1;
      const int64_t lo = window > 0 ? std::max<int64_t>(0, p0 - window + 1) : 0;
      for (int64_t k0 = lo / KT * KT; k0 <= p1; k0 += KC) {
        const TC *kb[NSUB], *vb[NSUB];
        int nsub = 0;
        for (int64_t k = k0; nsub < NSUB && k <= p1; k += KT, ++nsub) {   // the chunk's sub-tiles in the cache
          const int64_t blk = tables[b * NBt + k / bs], off = k % bs;
          kb[nsub] = kc + (blk * KVH + h) * Dh * bs + off;
          vb[nsub] = vc + ((blk * KVH + h) * bs + off) * Dh;
        }
        const int nk = static_cast<int>(std::min<int64_t>(KC, p1 + 1 - k0));
        const bool masked = k0 + KC - 1 > p0 || (window > 0 && k0 <= p1 - window);
        if (portable) block_step<false, TC>(t, kb, vb, nsub, bs, k0, nk, masked, window, cap);
        else block_step<true, TC>(t, kb, vb, nsub, bs, k0, nk, masked, window, cap);
      }
      for (int64_t ti = 0; ti < tk.nq; ++ti)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t m = ti * G + g;
          const float inv = 1.f / l[m];
          TQ* dst = out + ((b * T + tk.t0 + ti) * H + h * G + g) * Dh;
          for (int64_t d = 0; d < Dh; ++d) from_f32(obuf[m * Dh + d] * inv, dst + d);
        }
    }
  });
}

}  // namespace kp

#ifndef KILN_PREFILL_STANDALONE
template <typename TQ, typename TC>
static void run(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& tables,
                const at::Tensor& starts, const at::Tensor& q_lens, at::Tensor& out, float scale,
                int64_t window, float cap, bool portable) {
  using SQ = std::conditional_t<std::is_same_v<TQ, float>, float, uint16_t>;   // bf16 as its bits
  using SC = std::conditional_t<std::is_same_v<TC, float>, float, uint16_t>;
  const int64_t workers = at::get_num_threads();
  kp::prefill_attention<SQ, SC>(
      reinterpret_cast<const SQ*>(q.data_ptr<TQ>()), reinterpret_cast<const SC*>(kc.data_ptr<TC>()),
      reinterpret_cast<const SC*>(vc.data_ptr<TC>()), tables.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
      q_lens.data_ptr<int64_t>(), reinterpret_cast<SQ*>(out.data_ptr<TQ>()), q.size(0), q.size(1), q.size(2),
      kc.size(1), q.size(3), kc.size(3), tables.size(1), scale, window, cap, portable, workers,
      [](int64_t n, auto fn) { at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) { for (int64_t w = b; w < e; ++w) fn(w); }); });
}

at::Tensor prefill_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor tables,
                                at::Tensor starts, at::Tensor q_lens, double scale, int64_t window,
                                double softcap, bool portable) {
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous(), "q: [B, T, H, Dh] contiguous");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dh = q.size(3);
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              k_cache.scalar_type() == v_cache.scalar_type() && k_cache.size(2) == Dh && v_cache.size(3) == Dh &&
              v_cache.size(2) == k_cache.size(3) && v_cache.size(1) == k_cache.size(1) &&
              v_cache.size(0) == k_cache.size(0),
              "k/v cache: [NB, KVH, Dh, bs] and [NB, KVH, bs, Dh], one dtype");
  const int64_t KVH = k_cache.size(1), bs = k_cache.size(3);
  TORCH_CHECK(bs % kp::KT == 0, "prefill_attention: block_size ", bs, " is not a multiple of ", kp::KT);
  TORCH_CHECK(H % KVH == 0, "num_heads is not a multiple of the cache's kv heads");
  TORCH_CHECK(tables.scalar_type() == at::kLong && tables.is_contiguous() && tables.dim() == 2 &&
              tables.size(0) == B, "tables: [B, NBt] int64");
  for (const auto* x : {&starts, &q_lens})
    TORCH_CHECK(x->scalar_type() == at::kLong && x->is_contiguous() && x->numel() == B, "starts, q_lens: [B] int64");
  TORCH_CHECK(B == 0 || (starts.min().item<int64_t>() >= 0 && q_lens.min().item<int64_t>() >= 0 &&
                         q_lens.max().item<int64_t>() <= T &&
                         (starts + q_lens).max().item<int64_t>() <= tables.size(1) * bs),
              "starts/q_lens outside the step or the block tables");
  const auto qt = q.scalar_type(), ct = k_cache.scalar_type();
  TORCH_CHECK((qt == at::kFloat || qt == at::kBFloat16) && (ct == at::kFloat || ct == at::kBFloat16),
              "q and the cache: float32 or bfloat16");
  auto out = at::empty_like(q);
  const float sc = static_cast<float>(scale), cap = static_cast<float>(softcap);
  if (qt == at::kFloat && ct == at::kFloat) run<float, float>(q, k_cache, v_cache, tables, starts, q_lens, out, sc, window, cap, portable);
  else if (qt == at::kFloat) run<float, at::BFloat16>(q, k_cache, v_cache, tables, starts, q_lens, out, sc, window, cap, portable);
  else if (ct == at::kFloat) run<at::BFloat16, float>(q, k_cache, v_cache, tables, starts, q_lens, out, sc, window, cap, portable);
  else run<at::BFloat16, at::BFloat16>(q, k_cache, v_cache, tables, starts, q_lens, out, sc, window, cap, portable);
  return out;
}

bool simd() { return KP_SIMD != 0; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("prefill_attention", &prefill_attention,
        "causal attention of each row's new tokens over its paged context (flash-style tiles, GQA, window, softcap)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("tables"), py::arg("starts"), py::arg("q_lens"),
        py::arg("scale"), py::arg("window") = 0, py::arg("softcap") = 0.0, py::arg("portable") = false);
  m.def("simd", &simd, "whether the build has a vector path (AVX-512 or AVX2+FMA)");
}
#endif
