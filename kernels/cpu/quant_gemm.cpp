// Weight-only int4 / int8 matmul for the CPU, dequantization fused into the dot products.
// Semantics: kernels/quant.py (ref_dequantize) then y = x @ w.T; fp32 accumulation.
//   int4_linear(x [B,K] f32, q [N,K/2] u8, scales [N,K/G] f16, mins [N,K/G] f16, G) -> [B,N] f32
//   int8_linear(x [B,K] f32, q [N,K] i8, scales [N,K/G] f16, G) -> [B,N] f32
// Small B (decode): a GEMV per output row that reads each weight block once for up to 8 batch rows,
// using  sum_k x_k (q_k s + m) = s * sum_k x_k q_k + m * sum_k x_k  per group (the min terms for all
// rows and groups are one small sgemm).
// Large B (prefill): dequantize to fp32 once, then one sgemm.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>
#include <vector>

namespace {


inline float h2f(at::Half h) { return static_cast<float>(h); }


// NR batch rows at a time, NR a compile-time constant so the accumulators stay in registers; two
// accumulators per row (low and high nibbles) hide the FMA latency.
template <int NR>
void int4_block(const float* x, int64_t K, const uint8_t* qn, const at::Half* sn, int64_t G, int64_t ng, float* out,
                int64_t ystride) {
#if defined(__AVX512F__)
  __m512 a0[NR], a1[NR];
  for (int r = 0; r < NR; ++r) { a0[r] = _mm512_setzero_ps(); a1[r] = _mm512_setzero_ps(); }
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t g = 0; g < ng; ++g) {
    // a 16-entry table of this group's values q * scale (the min terms are in y already): each
    // nibble becomes its weight with one permute, no int->float conversion
    const __m512 table = _mm512_mul_ps(iota, _mm512_set1_ps(h2f(sn[g])));
    const int64_t nb = std::min<int64_t>(G, K - g * G) / 32;  // the last group may be shorter
    for (int64_t blk = 0; blk < nb; ++blk) {
      const int64_t k0 = g * G + blk * 32;
      const __m512i b32 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qn + k0 / 2)));
      const __m512 lo = _mm512_permutexvar_ps(b32, table);  // permutexvar reads the low 4 bits only
      const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b32, 4), table);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) {
        a0[r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + r * K + k0), a0[r]);
        a1[r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + r * K + k0 + 16), a1[r]);
      }
    }
  }
  for (int r = 0; r < NR; ++r) out[r * ystride] += _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
#else
  for (int r = 0; r < NR; ++r) {
    float acc = 0.f;
    for (int64_t g = 0; g < ng; ++g) {
      const float sc = h2f(sn[g]);
      const int64_t nb = std::min<int64_t>(G, K - g * G) / 32;
      float d = 0.f;
      for (int64_t blk = 0; blk < nb; ++blk) {
        const int64_t k0 = g * G + blk * 32;
        for (int j = 0; j < 16; ++j) {
          const uint8_t v = qn[k0 / 2 + j];
          d += x[r * K + k0 + j] * float(v & 0xF) + x[r * K + k0 + j + 16] * float(v >> 4);
        }
      }
      acc += sc * d;
    }
    out[r * ystride] += acc;
  }
#endif
}

template <int NR>
void int8_block(const float* x, int64_t K, const int8_t* qn, const at::Half* sn, int64_t G, int64_t ng, float* out,
                int64_t ystride) {
#if defined(__AVX512F__)
  __m512 a0[NR], a1[NR];
  for (int r = 0; r < NR; ++r) { a0[r] = _mm512_setzero_ps(); a1[r] = _mm512_setzero_ps(); }
  for (int64_t g = 0; g < ng; ++g) {
    const __m512 vs = _mm512_set1_ps(h2f(sn[g]));
    const int64_t nb = std::min<int64_t>(G, K - g * G) / 32;
    for (int64_t blk = 0; blk < nb; ++blk) {
      const int64_t k0 = g * G + blk * 32;
      const __m512 a = _mm512_mul_ps(vs, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qn + k0)))));
      const __m512 c = _mm512_mul_ps(vs, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qn + k0 + 16)))));
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) {
        a0[r] = _mm512_fmadd_ps(a, _mm512_loadu_ps(x + r * K + k0), a0[r]);
        a1[r] = _mm512_fmadd_ps(c, _mm512_loadu_ps(x + r * K + k0 + 16), a1[r]);
      }
    }
  }
  for (int r = 0; r < NR; ++r) out[r * ystride] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
#else
  for (int r = 0; r < NR; ++r) {
    float acc = 0.f;
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t nb = std::min<int64_t>(G, K - g * G) / 32;
      float d = 0.f;
      for (int64_t j = 0; j < nb * 32; ++j) d += x[r * K + g * G + j] * float(qn[g * G + j]);
      acc += h2f(sn[g]) * d;
    }
    out[r * ystride] = acc;
  }
#endif
}

// Rows of the batch in chunks of 8, 4, 2, 1 (each a register-resident template instance: 8 rows use
// 16 of the 32 zmm registers for accumulators).
template <typename F8, typename F4, typename F2, typename F1>
void by_chunks(int64_t B, F8 f8, F4 f4, F2 f2, F1 f1) {
  int64_t b = 0;
  for (; b + 8 <= B; b += 8) f8(b);
  for (; b + 4 <= B; b += 4) f4(b);
  for (; b + 2 <= B; b += 2) f2(b);
  for (; b < B; ++b) f1(b);
}

void int4_rows(const float* x, int64_t B, int64_t K, const uint8_t* q, const at::Half* s,
               int64_t G, int64_t n0, int64_t n1, int64_t N, float* y) {
  const int64_t ng = (K + G - 1) / G;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qn = q + n * (K / 2);
    const at::Half* sn = s + n * ng;
    by_chunks(B, [&](int64_t b) { int4_block<8>(x + b * K, K, qn, sn, G, ng, y + b * N + n, N); },
              [&](int64_t b) { int4_block<4>(x + b * K, K, qn, sn, G, ng, y + b * N + n, N); },
              [&](int64_t b) { int4_block<2>(x + b * K, K, qn, sn, G, ng, y + b * N + n, N); },
              [&](int64_t b) { int4_block<1>(x + b * K, K, qn, sn, G, ng, y + b * N + n, N); });
  }
}

void int8_rows(const float* x, int64_t B, int64_t K, const int8_t* q, const at::Half* s, int64_t G,
               int64_t n0, int64_t n1, int64_t N, float* y) {
  const int64_t ng = (K + G - 1) / G;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* qn = q + n * K;
    const at::Half* sn = s + n * ng;
    by_chunks(B, [&](int64_t b) { int8_block<8>(x + b * K, K, qn, sn, G, ng, y + b * N + n, N); },
              [&](int64_t b) { int8_block<4>(x + b * K, K, qn, sn, G, ng, y + b * N + n, N); },
              [&](int64_t b) { int8_block<2>(x + b * K, K, qn, sn, G, ng, y + b * N + n, N); },
              [&](int64_t b) { int8_block<1>(x + b * K, K, qn, sn, G, ng, y + b * N + n, N); });
  }
}

// ---- medium batches (decode of many sequences): each thread dequantizes a few output rows at a
// time into a small row-major fp32 tile (vectorized, L1-resident) and multiplies it against x^T
// held k-major, vectorized over 16 batch rows: NTR outputs x BC*16 rows of accumulators in
// registers, one broadcast weight per output and BC loads of x^T per k; y written row by row.

// Row-major fp32 rows n0 .. n0 + nr of the weight (rows past nr of the tile left as they are).
void int4_rows_f32(const uint8_t* q, const at::Half* s, const at::Half* m, int64_t K, int64_t G, int64_t n0,
                   int64_t nr, float* W) {
  const int64_t ng = (K + G - 1) / G;
  for (int64_t j = 0; j < nr; ++j) {
    const uint8_t* qn = q + (n0 + j) * (K / 2);
    float* o = W + j * K;
    for (int64_t k0 = 0; k0 < K; k0 += 32) {
      const float sc = h2f(s[(n0 + j) * ng + k0 / G]), mn = h2f(m[(n0 + j) * ng + k0 / G]);
#if defined(__AVX512F__)
      const __m512 table = _mm512_fmadd_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_ps(sc), _mm512_set1_ps(mn));
      const __m512i b32 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qn + k0 / 2)));
      _mm512_storeu_ps(o + k0, _mm512_permutexvar_ps(b32, table));
      _mm512_storeu_ps(o + k0 + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(b32, 4), table));
#else
      for (int i = 0; i < 16; ++i) {
        const uint8_t v = qn[k0 / 2 + i];
        o[k0 + i] = float(v & 0xF) * sc + mn;
        o[k0 + 16 + i] = float(v >> 4) * sc + mn;
      }
#endif
    }
  }
}

void int8_rows_f32(const int8_t* q, const at::Half* s, int64_t K, int64_t G, int64_t n0, int64_t nr, float* W) {
  const int64_t ng = (K + G - 1) / G;
  for (int64_t j = 0; j < nr; ++j) {
    const int8_t* qn = q + (n0 + j) * K;
    float* o = W + j * K;
    for (int64_t g = 0; g < ng; ++g) {
      const float sc = h2f(s[(n0 + j) * ng + g]);
      int64_t k = g * G;
      const int64_t end = std::min<int64_t>(K, k + G);
#if defined(__AVX512F__)
      const __m512 vs = _mm512_set1_ps(sc);
      for (; k + 16 <= end; k += 16) {
        const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qn + k)));
        _mm512_storeu_ps(o + k, _mm512_mul_ps(_mm512_cvtepi32_ps(v), vs));
      }
#endif
      for (; k < end; ++k) o[k] = float(qn[k]) * sc;
    }
  }
}

#if defined(__AVX512F__)
// y[b0 + b, n0 + n] = sum_k W[n, k] xT[k, b0 + b] for n < nr, b < BC*16 (rows past B not written).
// The accumulators go through a small n-major tile so each batch row is written to y as one run.
template <int NTR, int BC>
void micro_t(const float* xT, int64_t Bp, int64_t b0, int64_t K, const float* W, float* y, int64_t B, int64_t N,
             int64_t n0, int64_t nr) {
  __m512 acc[NTR][BC];
  for (int n = 0; n < NTR; ++n)
    for (int c = 0; c < BC; ++c) acc[n][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 xv[BC];
    for (int c = 0; c < BC; ++c) xv[c] = _mm512_loadu_ps(xT + k * Bp + b0 + 16 * c);
#pragma GCC unroll 28
    for (int n = 0; n < NTR; ++n) {
      const __m512 w = _mm512_set1_ps(W[n * K + k]);
      for (int c = 0; c < BC; ++c) acc[n][c] = _mm512_fmadd_ps(w, xv[c], acc[n][c]);
    }
  }
  alignas(64) float tile[NTR][BC * 16];
  for (int n = 0; n < NTR; ++n)
    for (int c = 0; c < BC; ++c) _mm512_store_ps(&tile[n][16 * c], acc[n][c]);
  const int64_t rows = std::min<int64_t>(BC * 16, B - b0);
  for (int64_t b = 0; b < rows; ++b) {
    float* yb = y + (b0 + b) * N + n0;
    for (int64_t n = 0; n < nr; ++n) yb[n] = tile[n][b];
  }
}
#endif

// xT [K, Bp] (k-major, batch rows padded with zeros to Bp) from x [B, K], in 16 x 16 blocks.
void transpose_in(const float* x, int64_t B, int64_t K, int64_t Bp, float* xT) {
  for (int64_t k0 = 0; k0 < K; k0 += 16)
    for (int64_t b0 = 0; b0 < Bp; b0 += 16)
      for (int64_t k = k0; k < std::min(K, k0 + 16); ++k)
        for (int64_t b = b0; b < b0 + 16; ++b) xT[k * Bp + b] = b < B ? x[b * K + k] : 0.f;
}

template <typename Rows>
torch::Tensor tiled_linear(const torch::Tensor& x, int64_t N, Rows rows) {
  const int64_t B = x.size(0), K = x.size(1), Bp = (B + 15) / 16 * 16;
  std::vector<float> xT(K * Bp);
  transpose_in(x.data_ptr<float>(), B, K, Bp, xT.data());
  auto y = torch::empty({B, N}, x.options());
  const float* xp = xT.data();
  float* yp = y.data_ptr<float>();
  constexpr int64_t NTR = 14;  // outputs per tile: with BC = 2, 28 accumulators; W's tile stays in L1
  const int64_t tiles = (N + NTR - 1) / NTR;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> W(NTR * K, 0.f);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * NTR, nr = std::min<int64_t>(NTR, N - n0);
      rows(n0, nr, W.data());
#if defined(__AVX512F__)
      int64_t b0 = 0;
      for (; b0 + 32 <= Bp; b0 += 32) micro_t<NTR, 2>(xp, Bp, b0, K, W.data(), yp, B, N, n0, nr);
      if (b0 < Bp) micro_t<NTR, 1>(xp, Bp, b0, K, W.data(), yp, B, N, n0, nr);
#else
      for (int64_t n = 0; n < nr; ++n)
        for (int64_t b = 0; b < B; ++b) {
          float acc = 0.f;
          for (int64_t k = 0; k < K; ++k) acc += W[n * K + k] * xp[k * Bp + b];
          yp[b * N + n0 + n] = acc;
        }
#endif
    }
  });
  return y;
}

// Argument checks shared by every entry point of a format: the kernels index q, scales and mins by the
// same row n and group k / G, so their shapes must agree before any pointer is read.
void check_x(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "x: contiguous f32 [B, K] on the CPU");
}

void check_int4(const torch::Tensor& q, const torch::Tensor& s, const torch::Tensor& m, int64_t G, int64_t K) {
  TORCH_CHECK(q.dtype() == torch::kUInt8 && s.dtype() == torch::kHalf && m.dtype() == torch::kHalf,
              "int4 dtypes: q uint8, scales and mins fp16");
  TORCH_CHECK(q.is_contiguous() && s.is_contiguous() && m.is_contiguous() && q.dim() == 2 && s.dim() == 2,
              "int4: contiguous q [N, K/2], scales and mins [N, K/G]");
  TORCH_CHECK(q.size(1) * 2 == K && G > 0 && G % 32 == 0 && K % 32 == 0,
              "int4 shapes: K = 2 q.size(1), G and K multiples of 32");
  TORCH_CHECK(s.size(0) == q.size(0) && s.size(1) == (K + G - 1) / G && m.sizes() == s.sizes(),
              "int4 scales/mins must be [N, ceil(K/G)] for q [N, K/2]");
}

void check_int8(const torch::Tensor& q, const torch::Tensor& s, int64_t G, int64_t K) {
  TORCH_CHECK(q.dtype() == torch::kInt8 && s.dtype() == torch::kHalf, "int8 dtypes: q int8, scales fp16");
  TORCH_CHECK(q.is_contiguous() && s.is_contiguous() && q.dim() == 2 && s.dim() == 2,
              "int8: contiguous q [N, K], scales [N, K/G]");
  TORCH_CHECK(q.size(1) == K && G > 0 && G % 32 == 0 && K % 32 == 0,
              "int8 shapes: K = q.size(1), G and K multiples of 32");
  TORCH_CHECK(s.size(0) == q.size(0) && s.size(1) == (K + G - 1) / G,
              "int8 scales must be [N, ceil(K/G)] for q [N, K]");
}

}  // namespace

torch::Tensor int4_linear(torch::Tensor x, torch::Tensor q, torch::Tensor s, torch::Tensor m, int64_t G) {
  check_x(x);
  check_int4(q, s, m, G, x.size(1));
  const int64_t B = x.size(0), K = x.size(1), N = q.size(0);
  const int64_t ng = (K + G - 1) / G;
  // the min terms, sum_g m[n, g] * sum_{k in g} x[b, k], are one small sgemm: y starts as it
  auto xsum = torch::constant_pad_nd(x, {0, ng * G - K}).view({B, ng, G}).sum(-1);  // [B, ng]
  auto y = torch::mm(xsum, m.to(torch::kFloat32).t()).contiguous();  // [B, N]
  const float* xp = x.data_ptr<float>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const at::Half* sp = s.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { int4_rows(xp, B, K, qp, sp, G, n0, n1, N, yp); });
  return y;
}

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor s, int64_t G) {
  check_x(x);
  check_int8(q, s, G, x.size(1));
  const int64_t B = x.size(0), K = x.size(1), N = q.size(0);
  auto y = torch::empty({B, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const at::Half* sp = s.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { int8_rows(xp, B, K, qp, sp, G, n0, n1, N, yp); });
  return y;
}

// Medium batches: the tiled kernels (semantics as int4_linear / int8_linear).
torch::Tensor int4_linear_tiled(torch::Tensor x, torch::Tensor q, torch::Tensor s, torch::Tensor m, int64_t G) {
  check_x(x);
  check_int4(q, s, m, G, x.size(1));
  const int64_t K = x.size(1), N = q.size(0);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const at::Half *sp = s.data_ptr<at::Half>(), *mp = m.data_ptr<at::Half>();
  return tiled_linear(x, N, [&](int64_t n0, int64_t nr, float* W) { int4_rows_f32(qp, sp, mp, K, G, n0, nr, W); });
}

torch::Tensor int8_linear_tiled(torch::Tensor x, torch::Tensor q, torch::Tensor s, int64_t G) {
  check_x(x);
  check_int8(q, s, G, x.size(1));
  const int64_t K = x.size(1), N = q.size(0);
  const int8_t* qp = q.data_ptr<int8_t>();
  const at::Half* sp = s.data_ptr<at::Half>();
  return tiled_linear(x, N, [&](int64_t n0, int64_t nr, float* W) { int8_rows_f32(qp, sp, K, G, n0, nr, W); });
}

// Dequantize to fp32 [N, K] (prefill path: then one sgemm).
// The dense fp32 weight [N, K], written into the first N*K elements of `out` (a reused buffer: a fresh
// allocation per call costs more in page faults than the dequantization itself).
torch::Tensor dense_out(const torch::Tensor& out, int64_t N, int64_t K) {
  TORCH_CHECK(out.dtype() == torch::kFloat32 && out.is_contiguous() && out.device().is_cpu() && out.numel() >= N * K,
              "out: a contiguous fp32 CPU buffer of at least N*K elements");
  return out.view(-1).narrow(0, 0, N * K).view({N, K});
}

torch::Tensor int4_dequantize(torch::Tensor q, torch::Tensor s, torch::Tensor m, int64_t G, torch::Tensor out) {
  TORCH_CHECK(q.dim() == 2, "int4: q [N, K/2]");
  check_int4(q, s, m, G, q.size(1) * 2);
  const int64_t N = q.size(0), K = q.size(1) * 2;
  auto w = dense_out(out, N, K);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const at::Half* sp = s.data_ptr<at::Half>();
  const at::Half* mp = m.data_ptr<at::Half>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { int4_rows_f32(qp, sp, mp, K, G, n0, n1 - n0, wp + n0 * K); });
  return w;
}

torch::Tensor int8_dequantize(torch::Tensor q, torch::Tensor s, int64_t G, torch::Tensor out) {
  TORCH_CHECK(q.dim() == 2, "int8: q [N, K]");
  check_int8(q, s, G, q.size(1));
  const int64_t N = q.size(0), K = q.size(1);
  auto w = dense_out(out, N, K);
  const int8_t* qp = q.data_ptr<int8_t>();
  const at::Half* sp = s.data_ptr<at::Half>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { int8_rows_f32(qp, sp, K, G, n0, n1 - n0, wp + n0 * K); });
  return w;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("int4_linear", &int4_linear, py::call_guard<py::gil_scoped_release>());
  mod.def("int8_linear", &int8_linear, py::call_guard<py::gil_scoped_release>());
  mod.def("int4_linear_tiled", &int4_linear_tiled, py::call_guard<py::gil_scoped_release>());
  mod.def("int8_linear_tiled", &int8_linear_tiled, py::call_guard<py::gil_scoped_release>());
  mod.def("int4_dequantize", &int4_dequantize, py::call_guard<py::gil_scoped_release>());
  mod.def("int8_dequantize", &int8_dequantize, py::call_guard<py::gil_scoped_release>());
}
