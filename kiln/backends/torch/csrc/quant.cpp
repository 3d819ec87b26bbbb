// kiln's GGUF-block matmul for the torch backend (built by kiln/backends/torch/kernels.py, load_quant).
//
// Weights stay in the blocks of llama.cpp's formats (backends/torch/quant.py recovers them exactly from the
// dequantised values): per output row n and per block b of 32 inputs,
//
//   w[n, 32 b + j] = d[n, b] * u_j + m[n, b]      u_j the block's integer codes
//
//   fmt 8 (Q8_0)        codes int8  [N, K]      u_j in [-127, 127]                      m = 0
//   fmt 4 (Q4_0, Q4_1)  codes uint8 [N, K/2]    byte j = u_j | u_(j+16) << 4, u in [0, 16)  m = -8 d (Q4_0)
//   fmt 5 (Q5_0, Q5_1)  codes as fmt 4, plus qh int32 [N, K/32], bit j = bit 4 of u_j     m = -16 d (Q5_0)
//   d, m                float16 [N, K/32]       (m absent: -off * d)
//
// The method is llama.cpp's: each activation row x [K] is rounded per block of 32 to int8 codes a with one
// float32 scale s (s = amax / 127, a = round-half-even(x / s)), once per call, so that a block's contribution is
//   d s sum_j u_j a_j + m s sum_j a_j
// with the integer sum exact in int32 (the m term is summed once per row after the blocks, 8 blocks a vector).
// AVX2 (quant_avx2.h): maddubs (u8 x s8 -> s16 pairs) + madd, two blocks of a 4/5-bit row per 256-bit step
// against the activations laid out once per call to match the nibble order; AVX-512 VNNI / AVX-VNNI: dpbusd.
// Several output rows per pass (4 at one activation row, 2 at 2-4), the activation rows MT at a time. The
// instruction set is fixed when the module is built for the host CPU (-march=native, kernels.py), which is the
// CPU-feature dispatch; a portable scalar loop elsewhere. Output rows are shared among threads
// (at::parallel_for, a few tens of thousands of weights at least per thread).
//
// The second method (int8_act false) keeps the activations float32 and converts each weight block's codes to
// float32 in registers: d sum_j u_j x_j + m sum_j x_j, the weights exactly gguf's, float32 rounding only.
//
//   quantize_rows(x [M, K] float32) -> (a int8 [M, K], s float32 [M, K/32], sa float32 [M, K/32] = s * sum a)
//   quant_matmul(x [M, K] float32, codes, qh, d, m, fmt, off, int8_act) -> y [M, N] float32
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>   // pybind11 + at::Tensor casters: torch/extension.h without the C++ frontend (~3x faster to build)
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int QK = 32;
constexpr int MT = 4;   // activation rows served per pass over a weight row

inline float h2f(const at::Half* p) { return static_cast<float>(*p); }

#if defined(__AVX2__)
inline float hsum(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}
#endif

// One block of 32 activations -> int8 codes a, scale s, s * sum(a) (llama.cpp's quantize_row_q8_0 rounding).
inline void quantize_block(const float* xb, int8_t* a, float* s, float* sa) {
#if defined(__AVX2__)
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4], mx = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(xb + 8 * i);
    mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float amax = _mm_cvtss_f32(m4);
  const float d = amax / 127.f;
  const __m256 id = _mm256_set1_ps(d != 0.f ? 1.f / d : 0.f);
  __m256i q[4], sum = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    sum = _mm256_add_epi32(sum, q[i]);
  }
  __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));   // undo the lane interleave
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(a), p);
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  *s = d;
  *sa = d * static_cast<float>(_mm_cvtsi128_si32(s4));
#else
  float amax = 0.f;
  for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(xb[j]));
  const float d = amax / 127.f;
  const float id = d != 0.f ? 1.f / d : 0.f;
  int sum = 0;
  for (int j = 0; j < QK; ++j) {
    const int q = static_cast<int>(std::nearbyint(xb[j] * id));   // round half to even (default mode)
    a[j] = static_cast<int8_t>(q);
    sum += q;
  }
  *s = d;
  *sa = d * static_cast<float>(sum);
#endif
}

void quantize_rows_impl(const float* x, int64_t M, int64_t K, int8_t* a, float* s, float* sa) {
  const int64_t nb = K / QK;   // rows are contiguous: block i of the flat [M * nb] blocks
  at::parallel_for(0, M * nb, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) quantize_block(x + i * QK, a + i * QK, s + i, sa + i);
  });
}

// The 32 codes of block b of a weight row, as integers (fmt 4/5: unsigned; fmt 8: signed).
template <int FMT>
inline void codes_scalar(const uint8_t* row, const int32_t* qh, int64_t b, int32_t* u) {
  if (FMT == 8) {
    const int8_t* c = reinterpret_cast<const int8_t*>(row) + b * QK;
    for (int j = 0; j < QK; ++j) u[j] = c[j];
    return;
  }
  const uint8_t* c = row + b * (QK / 2);
  const uint32_t h = FMT == 5 ? static_cast<uint32_t>(qh[b]) : 0u;
  for (int j = 0; j < QK / 2; ++j) {
    u[j] = (c[j] & 0xF) | (FMT == 5 ? ((h >> j) & 1u) << 4 : 0);
    u[j + 16] = (c[j] >> 4) | (FMT == 5 ? ((h >> (j + 16)) & 1u) << 4 : 0);
  }
}

}  // namespace

#include "quant_avx2.h"

namespace {

// Portable int8-activation path: y[m0 + t, n] for t < mt, one weight row.
template <int FMT>
void row_dot_scalar(const uint8_t* row, const int32_t* qh, const at::Half* d, const at::Half* mn, float off,
                    const int8_t* a, const float* s, const float* sa, int64_t K, int64_t m0, int mt, float* out) {
  const int64_t nb = K / QK;
  float acc[MT] = {}, macc[MT] = {};
  int32_t u[QK];
  for (int64_t b = 0; b < nb; ++b) {
    codes_scalar<FMT>(row, qh, b, u);
    const float dw = h2f(d + b);
    for (int t = 0; t < mt; ++t) {
      const int64_t r = (m0 + t) * nb + b;
      int32_t isum = 0;
      for (int j = 0; j < QK; ++j) isum += u[j] * a[r * QK + j];
      acc[t] += dw * s[r] * static_cast<float>(isum);
      if (FMT != 8) macc[t] += (mn ? h2f(mn + b) : -off * dw) * sa[r];
    }
  }
  for (int t = 0; t < mt; ++t) out[t] = acc[t] + macc[t];
}

// float32 activations x [M, K] with per-block sums xs [M, K/32]; weights dequantised in registers.
template <int FMT, int mt>
void row_dot_f32_t(const uint8_t* row, const int32_t* qh, const at::Half* d, const at::Half* mn, float off,
                   const float* x, const float* xs, int64_t K, int64_t m0, float* out) {
  const int64_t nb = K / QK;
  float macc[mt] = {};
#if defined(__AVX2__)
  __m256 acc[mt];
  for (int t = 0; t < mt; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i u = codes_avx2<FMT>(row, qh, b);
    const __m128i lo = _mm256_castsi256_si128(u), hi = _mm256_extracti128_si256(u, 1);
    const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
    const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
    const float dw = h2f(d + b);
    const __m256 dv = _mm256_set1_ps(dw);
    for (int t = 0; t < mt; ++t) {
      const float* xb = x + (m0 + t) * K + b * QK;
      __m256 p = _mm256_mul_ps(w0, _mm256_loadu_ps(xb));
      p = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), p);
      p = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), p);
      p = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), p);
      acc[t] = _mm256_fmadd_ps(p, dv, acc[t]);
      if (FMT != 8) macc[t] += (mn ? h2f(mn + b) : -off * dw) * xs[(m0 + t) * nb + b];
    }
  }
  for (int t = 0; t < mt; ++t) out[t] = hsum(acc[t]) + macc[t];
#else
  float acc[mt] = {};
  int32_t u[QK];
  for (int64_t b = 0; b < nb; ++b) {
    codes_scalar<FMT>(row, qh, b, u);
    const float dw = h2f(d + b);
    for (int t = 0; t < mt; ++t) {
      const float* xb = x + (m0 + t) * K + b * QK;
      float p = 0.f;
      for (int j = 0; j < QK; ++j) p += static_cast<float>(u[j]) * xb[j];
      acc[t] += dw * p;
      if (FMT != 8) macc[t] += (mn ? h2f(mn + b) : -off * dw) * xs[(m0 + t) * nb + b];
    }
  }
  for (int t = 0; t < mt; ++t) out[t] = acc[t] + macc[t];
#endif
}

template <int FMT>
void row_dot_f32(const uint8_t* row, const int32_t* qh, const at::Half* d, const at::Half* mn, float off,
                 const float* x, const float* xs, int64_t K, int64_t m0, int mt, float* out) {
  switch (mt) {
    case 1: return row_dot_f32_t<FMT, 1>(row, qh, d, mn, off, x, xs, K, m0, out);
    case 2: return row_dot_f32_t<FMT, 2>(row, qh, d, mn, off, x, xs, K, m0, out);
    case 3: return row_dot_f32_t<FMT, 3>(row, qh, d, mn, off, x, xs, K, m0, out);
    default: return row_dot_f32_t<FMT, 4>(row, qh, d, mn, off, x, xs, K, m0, out);
  }
}

// at least this many weights per thread: below it the threads' start-up costs more than they save
constexpr int64_t MIN_WEIGHTS_PER_THREAD = 1 << 16;

template <int FMT, bool I8>
void matmul_impl(const int8_t* a, const float* s, const float* sa, const float* x, int64_t M, int64_t K,
                 const uint8_t* codes, const int32_t* qh, const at::Half* d, const at::Half* mn, float off, int64_t N,
                 float* y) {
  const int64_t nb = K / QK, row_bytes = FMT == 8 ? K : K / 2;
#if defined(__AVX2__)
  if (I8) {
    const PairActs acts = FMT == 8 ? PairActs() : pair_layout(a, s, M, nb);
    const int64_t tiles = (N + 3) / 4, grain = std::max<int64_t>(1, MIN_WEIGHTS_PER_THREAD / (4 * K));
    at::parallel_for(0, tiles, grain, [&](int64_t i0, int64_t i1) {
      std::vector<float> scratch(4 * ((nb + 1) / 2) * 8 + 4 * nb + 8);
      const RowArgs w{codes, qh, d, mn, off, nb, row_bytes};
      matmul_rows_avx2<FMT>(w, acts, a, s, sa, M, 4 * i0, std::min(N, 4 * i1), N, y, scratch.data());
    });
    return;
  }
#endif
  const int64_t grain = std::max<int64_t>(1, MIN_WEIGHTS_PER_THREAD / K);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    float out[MT];
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t m0 = 0; m0 < M; m0 += MT) {
        const int mt = static_cast<int>(std::min<int64_t>(MT, M - m0));
        const uint8_t* row = codes + n * row_bytes;
        const int32_t* h = qh ? qh + n * nb : nullptr;
        const at::Half* mr = mn ? mn + n * nb : nullptr;
        if (I8) row_dot_scalar<FMT>(row, h, d + n * nb, mr, off, a, s, sa, K, m0, mt, out);
        else row_dot_f32<FMT>(row, h, d + n * nb, mr, off, x, sa, K, m0, mt, out);
        for (int t = 0; t < mt; ++t) y[(m0 + t) * N + n] = out[t];
      }
    }
  });
}

}  // namespace

std::vector<at::Tensor> quantize_rows(at::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) % QK == 0,
              "x: [M, K] float32 contiguous, K a multiple of 32");
  const int64_t M = x.size(0), K = x.size(1);
  auto a = at::empty({M, K}, x.options().dtype(at::kChar));
  auto s = at::empty({M, K / QK}, x.options());
  auto sa = at::empty({M, K / QK}, x.options());
  quantize_rows_impl(x.data_ptr<float>(), M, K, a.data_ptr<int8_t>(), s.data_ptr<float>(), sa.data_ptr<float>());
  return {a, s, sa};
}

at::Tensor quant_matmul(at::Tensor x, at::Tensor codes, c10::optional<at::Tensor> qh, at::Tensor d,
                           c10::optional<at::Tensor> m, int64_t fmt, double off, bool int8_act) {
  TORCH_CHECK(fmt == 4 || fmt == 5 || fmt == 8, "fmt: 4, 5 or 8");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) % QK == 0,
              "x: [M, K] float32 contiguous, K a multiple of 32");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0), nb = K / QK;
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && codes.size(1) == (fmt == 8 ? K : K / 2) &&
              codes.scalar_type() == (fmt == 8 ? at::kChar : at::kByte),
              "codes: int8 [N, K] (fmt 8) or uint8 [N, K/2]");
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous() && d.dim() == 2 && d.size(0) == N &&
              d.size(1) == nb, "d: float16 [N, K/32]");
  if (m.has_value())
    TORCH_CHECK(m->scalar_type() == at::kHalf && m->is_contiguous() && m->sizes() == d.sizes(),
                "m: float16 [N, K/32]");
  TORCH_CHECK((fmt == 5) == qh.has_value(), "qh is given exactly for fmt 5");
  if (qh.has_value())
    TORCH_CHECK(qh->scalar_type() == at::kInt && qh->is_contiguous() && qh->sizes() == d.sizes(),
                "qh: int32 [N, K/32]");
  std::vector<at::Tensor> q;
  const float* xp = x.data_ptr<float>();
  if (int8_act) {
    q = quantize_rows(x);
  } else {                                                  // per-block sums of the float32 activations
    q = {at::Tensor(), at::Tensor(), at::empty({M, nb}, x.options())};
    float* xs = q[2].data_ptr<float>();
    for (int64_t i = 0; i < M * nb; ++i) {
      float t = 0.f;
      for (int j = 0; j < QK; ++j) t += xp[i * QK + j];
      xs[i] = t;
    }
  }
  auto y = at::empty({M, N}, x.options());
  const int8_t* a = int8_act ? q[0].data_ptr<int8_t>() : nullptr;
  const float *s = int8_act ? q[1].data_ptr<float>() : nullptr, *sa = q[2].data_ptr<float>();
  const uint8_t* c = reinterpret_cast<const uint8_t*>(codes.data_ptr());
  const int32_t* h = qh.has_value() ? qh->data_ptr<int32_t>() : nullptr;
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* mp = m.has_value() ? m->data_ptr<at::Half>() : nullptr;
  const float o = static_cast<float>(off);
  float* yp = y.data_ptr<float>();
  auto run = [&](auto impl) { impl(a, s, sa, xp, M, K, c, h, dp, mp, o, N, yp); };
  if (fmt == 8) int8_act ? run(matmul_impl<8, true>) : run(matmul_impl<8, false>);
  else if (fmt == 4) int8_act ? run(matmul_impl<4, true>) : run(matmul_impl<4, false>);
  else int8_act ? run(matmul_impl<5, true>) : run(matmul_impl<5, false>);
  return y;
}

std::string isa() {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx512-vnni";
#elif defined(__AVXVNNI__)
  return "avx-vnni";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "scalar";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_rows", &quantize_rows, "x [M, K] float32 -> int8 codes, per-32 scales, scales * code sums");
  m.def("quant_matmul", &quant_matmul, "x [M, K] float32 times GGUF-block weights [N, K] -> [M, N] float32",
        py::arg("x"), py::arg("codes"), py::arg("qh"), py::arg("d"), py::arg("m"), py::arg("fmt"), py::arg("off"), py::arg("int8_act"));
  m.def("isa", &isa, "the instruction set this build uses");
}
