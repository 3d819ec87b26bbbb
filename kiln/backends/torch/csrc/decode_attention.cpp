// Decode attention straight from kiln's paged KV cache: one new token per row attends over its whole context.
//
// The torch-ops path gathers each row's blocks into a contiguous copy, permutes it head-major (another copy)
// and runs small batched matmuls; this kernel reads every cached K/V block once, in place, and keeps scores in
// float32. One task per (row, kv head) computes the G = H / KVH query heads that share that kv head. The cache
// layout makes both products vector loops over contiguous memory, with no horizontal sums:
//
//   q        [B, H, Dh]              float32
//   k_cache  [NB, KVH, Dh, bs]       float32 or bfloat16 (one layer; K transposed within a block)
//   v_cache  [NB, KVH, bs, Dh]
//   tables   [B, NBt]                int64 block ids
//   ctx_lens [B]                     int64 tokens of context, the new token's included (its K/V written)
//   returns  [B, H, Dh]              float32
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

template <typename T, int BS, int DH>
static void decode_attention_impl(const float* q, const T* kc, const T* vc, const int64_t* tables,
                                  const int64_t* ctx_lens, float* out, int64_t B, int64_t H, int64_t KVH,
                                  int64_t NBt, float scale) {
  const int64_t G = H / KVH;
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s, acc(G * DH), qs(G * DH), inv(G);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / KVH, h = i % KVH, S = ctx_lens[b], nblk = (S + BS - 1) / BS, Sp = nblk * BS;
      const float* qb = q + (b * H + h * G) * DH;                       // [G, DH]
      for (int64_t j = 0; j < G * DH; ++j) qs[j] = qb[j] * scale;
      s.resize(G * Sp);
      for (int64_t blk = 0; blk < nblk; ++blk) {                        // scores: s[g, t] = q[g] . K[t]
        const T* kb = kc + (tables[b * NBt + blk] * KVH + h) * DH * BS; // [DH, BS]
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qs.data() + g * DH;
          float a[BS] = {};                                             // one vector register
          for (int d = 0; d < DH; ++d) {
            const float qd = qg[d];
            const T* kr = kb + d * BS;
            for (int t = 0; t < BS; ++t) a[t] += qd * static_cast<float>(kr[t]);
          }
          std::copy(a, a + BS, s.data() + g * Sp + blk * BS);
        }
      }
      for (int64_t g = 0; g < G; ++g) {                                 // softmax over the S real positions
        float* sg = s.data() + g * Sp;
        const float m = *std::max_element(sg, sg + S);
        float z = 0.f;
        for (int64_t t = 0; t < S; ++t) z += (sg[t] = std::exp(sg[t] - m));
        inv[g] = 1.f / z;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < S; ++t) {                                 // acc[g] += p[g, t] V[t]
        const T* v = vc + ((tables[b * NBt + t / BS] * KVH + h) * BS + t % BS) * DH;
        float vr[DH];
        for (int d = 0; d < DH; ++d) vr[d] = static_cast<float>(v[d]);
        for (int64_t g = 0; g < G; ++g) {
          const float p = s[g * Sp + t];
          float* a = acc.data() + g * DH;
          for (int d = 0; d < DH; ++d) a[d] += p * vr[d];
        }
      }
      float* o = out + (b * H + h * G) * DH;
      for (int64_t g = 0; g < G; ++g)
        for (int d = 0; d < DH; ++d) o[g * DH + d] = acc[g * DH + d] * inv[g];
    }
  });
}

template <typename T, int BS>
static void dispatch_dh(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                        const torch::Tensor& tables, const torch::Tensor& ctx_lens, torch::Tensor& out, float scale) {
  const int64_t B = q.size(0), H = q.size(1), Dh = q.size(2), KVH = kc.size(1), NBt = tables.size(1);
  auto args = std::make_tuple(q.data_ptr<float>(), kc.data_ptr<T>(), vc.data_ptr<T>(), tables.data_ptr<int64_t>(),
                              ctx_lens.data_ptr<int64_t>(), out.data_ptr<float>());
  auto run = [&](auto impl) {
    std::apply([&](auto... a) { impl(a..., B, H, KVH, NBt, scale); }, args);
  };
  switch (Dh) {   // kernels.HEAD_DIMS
    case 16: run(decode_attention_impl<T, BS, 16>); break;
    case 24: run(decode_attention_impl<T, BS, 24>); break;
    case 32: run(decode_attention_impl<T, BS, 32>); break;
    case 64: run(decode_attention_impl<T, BS, 64>); break;
    case 96: run(decode_attention_impl<T, BS, 96>); break;
    case 128: run(decode_attention_impl<T, BS, 128>); break;
    default: TORCH_CHECK(false, "decode_attention: head_dim ", Dh, " not built");
  }
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor tables, torch::Tensor ctx_lens, int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32 && q.is_contiguous(), "q: [B, H, Dh] float32");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              k_cache.scalar_type() == v_cache.scalar_type(),
              "k/v cache: [NB, KVH, Dh, bs] and [NB, KVH, bs, Dh], one dtype");
  TORCH_CHECK(tables.scalar_type() == torch::kInt64 && tables.is_contiguous() && tables.size(0) == q.size(0),
              "tables: [B, NBt] int64");
  TORCH_CHECK(ctx_lens.scalar_type() == torch::kInt64 && ctx_lens.numel() == q.size(0), "ctx_lens: [B] int64");
  const int64_t B = q.size(0), H = q.size(1), Dh = q.size(2), KVH = k_cache.size(1);
  TORCH_CHECK(H % KVH == 0 && k_cache.size(2) == Dh && k_cache.size(3) == block_size && v_cache.size(3) == Dh,
              "head counts, head_dim or block_size do not match the cache");
  TORCH_CHECK(ctx_lens.max().item<int64_t>() <= tables.size(1) * block_size, "context longer than its blocks");
  TORCH_CHECK(block_size == 16, "decode_attention: block_size ", block_size, " not built");
  auto out = torch::empty_like(q);
  if (k_cache.scalar_type() == torch::kFloat32) {
    dispatch_dh<float, 16>(q, k_cache, v_cache, tables, ctx_lens, out, static_cast<float>(scale));
  } else {
    TORCH_CHECK(k_cache.scalar_type() == torch::kBFloat16, "k/v cache: float32 or bfloat16");
    dispatch_dh<at::BFloat16, 16>(q, k_cache, v_cache, tables, ctx_lens, out, static_cast<float>(scale));
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "decode attention over a paged KV cache (CPU)");
}
