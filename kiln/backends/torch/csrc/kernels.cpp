// kiln's CPU kernels for the torch backend (built by kiln/backends/torch/kernels.py).
//
// decode_attention: one layer's attention for a decode step, straight from kiln's paged KV cache: rotary embedding of the new
// token's q and k, the write of its K/V into the cache, and its attention over the whole context, in one call.
//
// The torch-ops path runs ~25 small ops per layer for this (rope, two scatters, two gathers into contiguous
// copies, head-major permutes, batched matmuls, softmax); at batch 1 their dispatch costs more than the math.
// Here every cached K/V block is read once, in place, and scores stay float32. One task per (row, kv head)
// serves the G = H / KVH query heads that share that kv head. The cache layout makes both products vector
// loops over contiguous memory, with no horizontal sums:
//
//   qkv      [B, (H + 2 KVH) Dh]     float32 or bfloat16: the fused projection of the new tokens
//   cos, sin [B, Dh]                 float32 rotary tables at each row's position (sin's first half negated)
//   k_cache  [NB, KVH, Dh, bs]       float32 or bfloat16 (one layer; K transposed within a block)
//   v_cache  [NB, KVH, bs, Dh]
//   tables   [B, NBt]                int64 block ids
//   ctx_lens [B]                     int64 tokens of context, the new token's included
//   window                           > 0: a sliding layer, the new token sees only the last `window` positions
//   returns  [B, H Dh]               qkv's dtype
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>   // pybind11 + at::Tensor casters: torch/extension.h without the C++ frontend (~3x faster to build)
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const at::BFloat16* p) {   // bf16 -> f32: the 16 bits become the high half
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
#endif

// Scores of up to 4 query heads (qs rows g0.., zero-padded to 4) against one K block [DH, 16]: four
// independent FMA chains per K row loaded, instead of one dependent chain per head.
template <typename TC, int DH>
static inline void block_scores4(const float* qs, const TC* kb, float* s0, float* s1, float* s2, float* s3) {
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int d = 0; d < DH; ++d) {
    const __m512 k = load16(kb + d * 16);
    a0 = _mm512_fmadd_ps(_mm512_set1_ps(qs[d]), k, a0);
    a1 = _mm512_fmadd_ps(_mm512_set1_ps(qs[DH + d]), k, a1);
    a2 = _mm512_fmadd_ps(_mm512_set1_ps(qs[2 * DH + d]), k, a2);
    a3 = _mm512_fmadd_ps(_mm512_set1_ps(qs[3 * DH + d]), k, a3);
  }
  _mm512_storeu_ps(s0, a0); _mm512_storeu_ps(s1, a1); _mm512_storeu_ps(s2, a2); _mm512_storeu_ps(s3, a3);
#else
  float* out[4] = {s0, s1, s2, s3};
  for (int j = 0; j < 4; ++j) {
    float a[16] = {};
    for (int d = 0; d < DH; ++d)
      for (int t = 0; t < 16; ++t) a[t] += qs[j * DH + d] * static_cast<float>(kb[d * 16 + t]);
    std::copy(a, a + 16, out[j]);
  }
#endif
}

// acc[g0 + j, c0 : c0 + 64] = sum_t p[g0 + j, t] V[t, c0 : c0 + 64] for 4 heads (p rows zero-padded) and one
// 64-wide chunk of head_dim: 16 accumulators stay in registers over the whole context.
template <typename TC, int DH, int BS>
static inline void pv_chunk4(const float* p, int64_t Sp, int64_t t0, int64_t S, const TC* vc,
                             const int64_t* table, int64_t KVH, int64_t h, int c0, float* acc) {
#if defined(__AVX512F__)
  __m512 a[4][4];
  for (int j = 0; j < 4; ++j)
    for (int c = 0; c < 4; ++c) a[j][c] = _mm512_setzero_ps();
  for (int64_t t = t0; t < S; ++t) {
    const TC* v = vc + ((table[t / BS] * KVH + h) * BS + t % BS) * DH + c0;
    const __m512 v0 = load16(v), v1 = load16(v + 16), v2 = load16(v + 32), v3 = load16(v + 48);
    for (int j = 0; j < 4; ++j) {
      const __m512 pj = _mm512_set1_ps(p[j * Sp + t]);
      a[j][0] = _mm512_fmadd_ps(pj, v0, a[j][0]);
      a[j][1] = _mm512_fmadd_ps(pj, v1, a[j][1]);
      a[j][2] = _mm512_fmadd_ps(pj, v2, a[j][2]);
      a[j][3] = _mm512_fmadd_ps(pj, v3, a[j][3]);
    }
  }
  for (int j = 0; j < 4; ++j)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(acc + j * DH + c0 + 16 * c, a[j][c]);
#endif
}

template <typename TQ, typename TC, int BS, int DH>
static void decode_attention_impl(const TQ* qkv, const float* cos, const float* sin, TC* kc, TC* vc,
                                  const int64_t* tables, const int64_t* ctx_lens, TQ* out, int64_t B, int64_t H,
                                  int64_t KVH, int64_t NBt, float scale, int64_t window) {
  static_assert(BS == 16, "block_scores4 reads K blocks of 16 positions");
  const int64_t G = H / KVH, W = (H + 2 * KVH) * DH;
  constexpr int HALF = DH / 2;
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    const int64_t G4 = (G + 3) / 4 * 4;                                 // heads padded to passes of 4
    std::vector<float> s, acc(G * DH), acc4(G4 * DH), qs(G4 * DH, 0.f), inv(G);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / KVH, h = i % KVH, S = ctx_lens[b], nblk = (S + BS - 1) / BS, Sp = nblk * BS;
      const int64_t t0 = window > 0 ? std::max<int64_t>(0, S - window) : 0;   // the first position seen
      const TQ* row = qkv + b * W;
      const float *c = cos + b * DH, *sn = sin + b * DH;
      auto rope = [&](const TQ* x, int d) {
        return static_cast<float>(x[d]) * c[d] + static_cast<float>(x[(d + HALF) % DH]) * sn[d];
      };
      for (int64_t g = 0; g < G; ++g)                                   // q of the G heads, rotated, scaled
        for (int d = 0; d < DH; ++d) qs[g * DH + d] = rope(row + (h * G + g) * DH, d) * scale;
      {                                                                 // the new token's K/V into the cache
        const int64_t p = S - 1, blk = tables[b * NBt + p / BS], off = p % BS;
        TC* kd = kc + (blk * KVH + h) * DH * BS + off;                  // K[blk, h, :, off]
        TC* vd = vc + ((blk * KVH + h) * BS + off) * DH;                // V[blk, h, off, :]
        const TQ* k = row + (H + h) * DH;
        const TQ* v = row + (H + KVH + h) * DH;
        for (int d = 0; d < DH; ++d) {
          kd[d * BS] = static_cast<TC>(rope(k, d));
          vd[d] = static_cast<TC>(static_cast<float>(v[d]));
        }
      }
      s.resize((G4 + 1) * Sp);                                          // + a scratch row for padded heads
      float* scratch = s.data() + G4 * Sp;
      for (int64_t blk = t0 / BS; blk < nblk; ++blk) {                  // scores: s[g, t] = q[g] . K[t]
        const TC* kb = kc + (tables[b * NBt + blk] * KVH + h) * DH * BS; // [DH, BS]
        for (int64_t g = 0; g < G4; g += 4) {
          float* o[4];
          for (int j = 0; j < 4; ++j) o[j] = (g + j < G ? s.data() + (g + j) * Sp : scratch) + blk * BS;
          block_scores4<TC, DH>(qs.data() + g * DH, kb, o[0], o[1], o[2], o[3]);
        }
      }
      for (int64_t g = 0; g < G; ++g) {                                 // softmax over positions [t0, S)
        float* sg = s.data() + g * Sp;
        const float m = *std::max_element(sg + t0, sg + S);
        float z = 0.f;
        for (int64_t t = t0; t < S; ++t) z += (sg[t] = std::exp(sg[t] - m));
        inv[g] = 1.f / z;
      }
#if defined(__AVX512F__)
      if constexpr (DH % 64 == 0) {                                     // acc[g] = sum_t p[g, t] V[t]
        for (int64_t g = 0; g < G4; g += 4) {
          const float* pg = s.data() + g * Sp;                          // rows past G: finite, discarded
          for (int c0 = 0; c0 < DH; c0 += 64)
            pv_chunk4<TC, DH, BS>(pg, Sp, t0, S, vc, tables + b * NBt, KVH, h, c0, acc4.data() + g * DH);
        }
        std::copy(acc4.begin(), acc4.begin() + G * DH, acc.begin());
      } else
#endif
      {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t t = t0; t < S; ++t) {                              // acc[g] += p[g, t] V[t]
          const TC* v = vc + ((tables[b * NBt + t / BS] * KVH + h) * BS + t % BS) * DH;
          float vr[DH];
          for (int d = 0; d < DH; ++d) vr[d] = static_cast<float>(v[d]);
          for (int64_t g = 0; g < G; ++g) {
            const float p = s[g * Sp + t];
            float* a = acc.data() + g * DH;
            for (int d = 0; d < DH; ++d) a[d] += p * vr[d];
          }
        }
      }
      TQ* o = out + b * H * DH + h * G * DH;
      for (int64_t g = 0; g < G; ++g)
        for (int d = 0; d < DH; ++d) o[g * DH + d] = static_cast<TQ>(acc[g * DH + d] * inv[g]);
    }
  });
}

template <typename TQ, typename TC>
static void dispatch_dh(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                        at::Tensor& kc, at::Tensor& vc, const at::Tensor& tables,
                        const at::Tensor& ctx_lens, at::Tensor& out, int64_t H, float scale, int64_t window) {
  const int64_t B = qkv.size(0), Dh = cos.size(1), KVH = kc.size(1), NBt = tables.size(1);
  auto run = [&](auto impl) {
    impl(qkv.data_ptr<TQ>(), cos.data_ptr<float>(), sin.data_ptr<float>(), kc.data_ptr<TC>(), vc.data_ptr<TC>(),
         tables.data_ptr<int64_t>(), ctx_lens.data_ptr<int64_t>(), out.data_ptr<TQ>(), B, H, KVH, NBt, scale,
         window);
  };
  switch (Dh) {   // kernels.HEAD_DIMS
    case 16: run(decode_attention_impl<TQ, TC, 16, 16>); break;
    case 24: run(decode_attention_impl<TQ, TC, 16, 24>); break;
    case 32: run(decode_attention_impl<TQ, TC, 16, 32>); break;
    case 64: run(decode_attention_impl<TQ, TC, 16, 64>); break;
    case 128: run(decode_attention_impl<TQ, TC, 16, 128>); break;
    default: TORCH_CHECK(false, "decode_attention: head_dim ", Dh, " not built");
  }
}

at::Tensor decode_attention(at::Tensor qkv, at::Tensor cos, at::Tensor sin, at::Tensor k_cache,
                               at::Tensor v_cache, at::Tensor tables, at::Tensor ctx_lens,
                               int64_t num_heads, int64_t block_size, double scale, int64_t window) {
  const int64_t B = qkv.size(0), KVH = k_cache.size(1), Dh = cos.size(-1);
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(1) == (num_heads + 2 * KVH) * Dh,
              "qkv: [B, (H + 2 KVH) Dh] contiguous");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
              sin.is_contiguous() && cos.size(0) == B && sin.sizes() == cos.sizes(), "cos/sin: [B, Dh] float32");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              k_cache.scalar_type() == v_cache.scalar_type() && k_cache.size(2) == Dh && v_cache.size(3) == Dh &&
              k_cache.size(3) == block_size && v_cache.size(2) == block_size,
              "k/v cache: [NB, KVH, Dh, bs] and [NB, KVH, bs, Dh], one dtype");
  TORCH_CHECK(num_heads % KVH == 0, "num_heads is not a multiple of the cache's kv heads");
  TORCH_CHECK(tables.scalar_type() == at::kLong && tables.is_contiguous() && tables.size(0) == B,
              "tables: [B, NBt] int64");
  TORCH_CHECK(ctx_lens.scalar_type() == at::kLong && ctx_lens.is_contiguous() && ctx_lens.numel() == B,
              "ctx_lens: [B] int64");
  TORCH_CHECK(B == 0 || (ctx_lens.min().item<int64_t>() >= 1 &&
                         ctx_lens.max().item<int64_t>() <= tables.size(1) * block_size),
              "ctx_lens outside [1, NBt * block_size]");
  TORCH_CHECK(block_size == 16, "decode_attention: block_size ", block_size, " not built");
  auto out = at::empty({B, num_heads * Dh}, qkv.options());
  const bool qf = qkv.scalar_type() == at::kFloat, cf = k_cache.scalar_type() == at::kFloat;
  TORCH_CHECK((qf || qkv.scalar_type() == at::kBFloat16) && (cf || k_cache.scalar_type() == at::kBFloat16),
              "qkv and the cache: float32 or bfloat16");
  const float sc = static_cast<float>(scale);
  if (qf && cf) dispatch_dh<float, float>(qkv, cos, sin, k_cache, v_cache, tables, ctx_lens, out, num_heads, sc, window);
  else if (qf) dispatch_dh<float, at::BFloat16>(qkv, cos, sin, k_cache, v_cache, tables, ctx_lens, out, num_heads, sc, window);
  else if (cf) dispatch_dh<at::BFloat16, float>(qkv, cos, sin, k_cache, v_cache, tables, ctx_lens, out, num_heads, sc, window);
  else dispatch_dh<at::BFloat16, at::BFloat16>(qkv, cos, sin, k_cache, v_cache, tables, ctx_lens, out, num_heads, sc, window);
  return out;
}

// add_rms_norm: the residual add and the RMS norm that follows it, one pass per row. The residual stream x
// [N, D] is float32 and updated in place (x += delta, when delta is given); returns the normed rows times
// weight [D] (float32) in out_dtype. Replaces ~8 small ops (add, pow, mean, add, rsqrt, mul, mul, cast).
template <typename TD, typename TO>
static void add_rms_norm_impl(float* x, const TD* delta, const float* w, TO* out, int64_t N, int64_t D, float eps) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* xr = x + i * D;
      if (delta != nullptr) {
        const TD* dr = delta + i * D;
        for (int64_t d = 0; d < D; ++d) xr[d] += static_cast<float>(dr[d]);
      }
      float ss = 0.f;
      for (int64_t d = 0; d < D; ++d) ss += xr[d] * xr[d];
      const float r = 1.f / std::sqrt(ss / D + eps);
      TO* o = out + i * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<TO>(xr[d] * r * w[d]);
    }
  });
}

template <typename TO>
static void add_rms_norm_delta(at::Tensor& x, const c10::optional<at::Tensor>& delta, const at::Tensor& w,
                               at::Tensor& out, float eps) {
  const int64_t N = x.size(0), D = x.size(1);
  if (!delta.has_value())
    add_rms_norm_impl<float, TO>(x.data_ptr<float>(), nullptr, w.data_ptr<float>(), out.data_ptr<TO>(), N, D, eps);
  else if (delta->scalar_type() == at::kFloat)
    add_rms_norm_impl<float, TO>(x.data_ptr<float>(), delta->data_ptr<float>(), w.data_ptr<float>(),
                                 out.data_ptr<TO>(), N, D, eps);
  else
    add_rms_norm_impl<at::BFloat16, TO>(x.data_ptr<float>(), delta->data_ptr<at::BFloat16>(), w.data_ptr<float>(),
                                        out.data_ptr<TO>(), N, D, eps);
}

at::Tensor add_rms_norm(at::Tensor x, c10::optional<at::Tensor> delta, at::Tensor weight, double eps,
                           bool bf16_out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: [N, D] float32");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == x.size(1),
              "weight: [D] float32");
  if (delta.has_value())
    TORCH_CHECK(delta->sizes() == x.sizes() && delta->is_contiguous() &&
                (delta->scalar_type() == at::kFloat || delta->scalar_type() == at::kBFloat16),
                "delta: [N, D] contiguous, float32 or bfloat16");
  auto out = at::empty(x.sizes(), x.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
  if (bf16_out) add_rms_norm_delta<at::BFloat16>(x, delta, weight, out, static_cast<float>(eps));
  else add_rms_norm_delta<float>(x, delta, weight, out, static_cast<float>(eps));
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_rms_norm", &add_rms_norm, "x += delta (in place); rms_norm(x) * weight (CPU)");
  m.def("decode_attention", &decode_attention,
        "rope + KV-cache write + attention of one decode step of one layer, over a paged KV cache (CPU)",
        py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("k_cache"), py::arg("v_cache"), py::arg("tables"),
        py::arg("ctx_lens"), py::arg("num_heads"), py::arg("block_size"), py::arg("scale"), py::arg("window") = 0);
}
