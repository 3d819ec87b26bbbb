// AVX2 kernels of csrc/quant.cpp (included there; see its comment for the formats and the method).
//
// int8 activations, 4/5-bit weights: a weight row's codes are read 32 bytes at a time, which is two blocks
// (2p, 2p+1): the low nibbles are [u_0..15 of 2p | u_0..15 of 2p+1], the high ones the same for u_16..31. The
// activations are laid out once per call to match (pair_layout), so one maddubs per half needs no shuffle:
//   lo[t][p] = [a(2p, 0..15) | a(2p+1, 0..15)]   hi[t][p] = [a(2p, 16..31) | a(2p+1, 16..31)]
//   sx[t][p] = [s(2p) x4 | s(2p+1) x4]           (a missing block 2p+1, nb odd: zeros)
// and the row's d expanded the same way ([d(2p) x4 | d(2p+1) x4]) once per row. Q8_0 blocks are one 32-byte
// block a step, with llama.cpp's sign trick (|u| unsigned, a takes u's sign).
#pragma once
#if defined(__AVX2__)

namespace {

template <int FMT>
inline __m256i codes_avx2(const uint8_t* row, const int32_t* qh, int64_t b) {
  if (FMT == 8) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * QK));
  const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * (QK / 2)));
  __m256i u = _mm256_and_si256(_mm256_insertf128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1),
                               _mm256_set1_epi8(0x0F));   // bytes 0..15: low nibbles, 16..31: high nibbles
  if (FMT == 5) {                                           // byte j |= 0x10 where bit j of qh is set
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    __m256i bits = _mm256_shuffle_epi8(_mm256_set1_epi32(qh[b]), shuf);
    bits = _mm256_or_si256(bits, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    bits = _mm256_cmpeq_epi8(bits, _mm256_set1_epi64x(-1));
    u = _mm256_or_si256(u, _mm256_and_si256(bits, _mm256_set1_epi8(0x10)));
  }
  return u;
}

struct PairActs {
  std::vector<int8_t> lo, hi;   // [M, np, 32]
  std::vector<float> sx;        // [M, np, 8]
  int64_t np = 0;
};

PairActs pair_layout(const int8_t* a, const float* s, int64_t M, int64_t nb) {
  PairActs r;
  r.np = (nb + 1) / 2;
  r.lo.assign(M * r.np * 32, 0);
  r.hi.assign(M * r.np * 32, 0);
  r.sx.assign(M * r.np * 8, 0.f);
  for (int64_t t = 0; t < M; ++t)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t o = (t * r.np + b / 2) * 32 + 16 * (b % 2), src = (t * nb + b) * QK;
      std::memcpy(&r.lo[o], a + src, 16);
      std::memcpy(&r.hi[o], a + src + 16, 16);
      for (int i = 0; i < 4; ++i) r.sx[(t * r.np + b / 2) * 8 + 4 * (b % 2) + i] = s[t * nb + b];
    }
  return r;
}

struct RowArgs {
  const uint8_t* codes;
  const int32_t* qh;
  const at::Half* d;
  const at::Half* mn;
  float off;
  int64_t nb, row_bytes;
};

// u_j * a_j summed in int32 over both halves (8 lanes: 4 per block of the pair, or per 8 codes of one block)
inline __m256i dot2(__m256i lo, __m256i alo, __m256i hi, __m256i ahi) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, alo), hi, ahi);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo, alo), hi, ahi);
#else   // u <= 31, |a| <= 127: 2 * 2 * 31 * 127 < 2^15, the int16 pair sums do not saturate
  return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, alo), _mm256_maddubs_epi16(hi, ahi)),
                           _mm256_set1_epi16(1));
#endif
}

inline __m256i dot1(__m256i u, __m256i a) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, a);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, a);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, a), _mm256_set1_epi16(1));
#endif
}

// float32 [nb] of a float16 row, 8 at a time
inline void half_row(const at::Half* h, int64_t nb, float* out) {
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8)
    _mm256_storeu_ps(out + b, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + b))));
  for (; b < nb; ++b) out[b] = h2f(h + b);
}

// sum_b v[b] * sa[b] (v float16: m, or d for the symmetric formats)
inline float half_dot(const at::Half* v, const float* sa, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8)
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + b))),
                          _mm256_loadu_ps(sa + b), acc);
  float r = hsum(acc);
  for (; b < nb; ++b) r += h2f(v + b) * sa[b];
  return r;
}

// The codes of rows n..n+count (< N) towards L1: a tile asks for the one two tiles ahead (the interleaved rows
// of a tile are several streams, which the hardware prefetchers follow less well than one).
inline void prefetch_rows(const RowArgs& w, int64_t n, int64_t count, int64_t N) {
  const int64_t end = std::min(N, n + count) * w.row_bytes;
  for (int64_t o = n * w.row_bytes; o < end; o += 64) _mm_prefetch(reinterpret_cast<const char*>(w.codes + o), _MM_HINT_T0);
}

// 4/5-bit weights: rows n0..n0+NR, activation rows m0..m0+T; dx: scratch of NR * np * 8 floats
template <int FMT, int NR, int T>
void tile_nibbles(const RowArgs& w, const PairActs& A, const float* sa, int64_t m0, int64_t n0, int64_t N,
                  float* y, float* dx) {
  const int64_t nb = w.nb, np = A.np;
  prefetch_rows(w, n0 + 2 * NR, NR, N);
  for (int r = 0; r < NR; ++r) {                 // dx[r][p] = [d(2p) x4 | d(2p+1) x4]
    float* o = dx + r * np * 8;
    half_row(w.d + (n0 + r) * nb, nb, o + np * 8 - nb);   // (the tail of the buffer, expanded in place below)
    const float* dr = o + np * 8 - nb;
    for (int64_t b = 0; b < nb; ++b) {
      const float v = dr[b];
      for (int i = 0; i < 4; ++i) o[8 * (b / 2) + 4 * (b % 2) + i] = v;   // writes stay at or before dr[b]
    }
    if (nb % 2) for (int i = 4; i < 8; ++i) o[8 * (np - 1) + i] = 0.f;
  }
  __m256 acc[NR][T];
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  auto pair = [&](int64_t p, bool half) {
    for (int r = 0; r < NR; ++r) {
      const uint8_t* c = w.codes + (n0 + r) * w.row_bytes + p * 32;
      const __m256i v = half ? _mm256_inserti128_si256(_mm256_setzero_si256(),
                                                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(c)), 0)
                             : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c));
      __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      if (FMT == 5) {   // byte i of a 16-byte half |= 0x10 where bit i (lo) or 16 + i (hi) of its block's qh is set
        const int32_t* q = w.qh + (n0 + r) * nb + 2 * p;
        const __m256i hv = _mm256_set_m128i(_mm_set1_epi32(half ? 0 : q[1]), _mm_set1_epi32(q[0]));
        const __m256i sel = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe), all = _mm256_set1_epi64x(-1);
        const __m256i b5 = _mm256_set1_epi8(0x10);
        const __m256i cl = _mm256_set_epi64x(0x0101010101010101, 0, 0x0101010101010101, 0);
        const __m256i ch = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0303030303030303,
                                             0x0202020202020202);
        auto bits = [&](__m256i ctl) {
          return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_or_si256(_mm256_shuffle_epi8(hv, ctl), sel), all), b5);
        };
        lo = _mm256_or_si256(lo, bits(cl));
        hi = _mm256_or_si256(hi, bits(ch));
      }
      const __m256 dv = _mm256_loadu_ps(dx + (r * np + p) * 8);
      for (int t = 0; t < T; ++t) {
        const int64_t o = (m0 + t) * np + p;
        const __m256i q = dot2(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&A.lo[o * 32])), hi,
                               _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&A.hi[o * 32])));
        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_mul_ps(dv, _mm256_loadu_ps(&A.sx[o * 8])),
                                    acc[r][t]);
      }
    }
  };
  for (int64_t p = 0; p < nb / 2; ++p) pair(p, false);
  if (nb % 2) pair(np - 1, true);
  for (int r = 0; r < NR; ++r) {
    const int64_t n = n0 + r;
    const at::Half* mv = w.mn ? w.mn + n * nb : w.d + n * nb;
    const float f = w.mn ? 1.f : -w.off;
    for (int t = 0; t < T; ++t)
      y[(m0 + t) * N + n] = hsum(acc[r][t]) + f * half_dot(mv, sa + (m0 + t) * nb, nb);
  }
}

// Q8_0 weights: rows n0..n0+NR, activation rows m0..m0+T; dr: scratch of NR * nb floats
template <int NR, int T>
void tile_q8(const RowArgs& w, const int8_t* a, const float* s, int64_t m0, int64_t n0, int64_t N, float* y,
             float* dr) {
  const int64_t nb = w.nb;
  prefetch_rows(w, n0 + 2 * NR, NR, N);
  for (int r = 0; r < NR; ++r) half_row(w.d + (n0 + r) * nb, nb, dr + r * nb);
  __m256 acc[NR][T];
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    for (int r = 0; r < NR; ++r) {
      const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.codes + (n0 + r) * w.row_bytes + b * QK));
      const __m256i au = _mm256_sign_epi8(u, u);
      const float dw = dr[r * nb + b];
      for (int t = 0; t < T; ++t) {
        const int64_t i = (m0 + t) * nb + b;
        const __m256i av = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i * QK)), u);
        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot1(au, av)), _mm256_set1_ps(dw * s[i]), acc[r][t]);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < T; ++t) y[(m0 + t) * N + n0 + r] = hsum(acc[r][t]);
}

template <int FMT, int NR, int T>
inline void tile(const RowArgs& w, const PairActs& A, const int8_t* a, const float* s, const float* sa,
                 int64_t m0, int64_t n0, int64_t N, float* y, float* scratch) {
  if constexpr (FMT == 8) tile_q8<NR, T>(w, a, s, m0, n0, N, y, scratch);
  else tile_nibbles<FMT, NR, T>(w, A, sa, m0, n0, N, y, scratch);
}

// y[:, n0:n1] for all M activation rows: 4/5-bit rows 4 a pass at one activation row, 2 at 2..4; Q8_0 rows
// one a pass at one activation row (measured: its 4-row passes ran ~2x slower on weights streamed from DRAM),
// 2 at 2..4; 1 at the edge
template <int FMT, int T>
void rows_t(const RowArgs& w, const PairActs& A, const int8_t* a, const float* s, const float* sa, int64_t m0,
            int64_t n0, int64_t n1, int64_t N, float* y, float* scratch) {
  constexpr int NR = T == 1 ? (FMT == 8 ? 1 : 4) : 2;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) tile<FMT, NR, T>(w, A, a, s, sa, m0, n, N, y, scratch);
  for (; n < n1; ++n) tile<FMT, 1, T>(w, A, a, s, sa, m0, n, N, y, scratch);
}

template <int FMT>
void matmul_rows_avx2(const RowArgs& w, const PairActs& A, const int8_t* a, const float* s, const float* sa,
                      int64_t M, int64_t n0, int64_t n1, int64_t N, float* y, float* scratch) {
  for (int64_t m0 = 0; m0 < M; m0 += MT) {
    switch (std::min<int64_t>(MT, M - m0)) {
      case 1: rows_t<FMT, 1>(w, A, a, s, sa, m0, n0, n1, N, y, scratch); break;
      case 2: rows_t<FMT, 2>(w, A, a, s, sa, m0, n0, n1, N, y, scratch); break;
      case 3: rows_t<FMT, 3>(w, A, a, s, sa, m0, n0, n1, N, y, scratch); break;
      default: rows_t<FMT, 4>(w, A, a, s, sa, m0, n0, n1, N, y, scratch); break;
    }
  }
}

}  // namespace

#endif  // __AVX2__
