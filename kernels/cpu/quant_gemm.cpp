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

namespace {

constexpr int kRows = 16;  // batch rows sharing one pass over the weights (16 zmm accumulators)

inline float h2f(at::Half h) { return static_cast<float>(h); }

#if defined(__AVX512F__)
inline __m512 lo_nibbles(__m128i b) { return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_cvtepu8_epi32(b), _mm512_set1_epi32(0xF))); }
inline __m512 hi_nibbles(__m128i b) { return _mm512_cvtepi32_ps(_mm512_srli_epi32(_mm512_cvtepu8_epi32(b), 4)); }
#endif

void int4_rows(const float* x, int64_t B, int64_t K, const uint8_t* q, const at::Half* s,
               int64_t G, int64_t n0, int64_t n1, int64_t N, float* y) {
  const int64_t ng = (K + G - 1) / G;
  for (int64_t b0 = 0; b0 < B; b0 += kRows) {
    const int64_t nr = std::min<int64_t>(kRows, B - b0);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* qn = q + n * (K / 2);
#if defined(__AVX512F__)
      __m512 acc[kRows];
      for (int r = 0; r < nr; ++r) acc[r] = _mm512_setzero_ps();
#else
      float acc[kRows] = {0};
#endif
      for (int64_t g = 0; g < ng; ++g) {
        const float sc = h2f(s[n * ng + g]);
        const int64_t nb = std::min<int64_t>(G, K - g * G) / 32;  // the last group may be shorter
#if defined(__AVX512F__)
        // a 16-entry table of this group's dequantized values, q * scale (the min is in y already):
        // each nibble becomes its weight with one permute, no int->float conversion
        const __m512 table = _mm512_mul_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_ps(sc));
        for (int64_t blk = 0; blk < nb; ++blk) {
          const int64_t k0 = g * G + blk * 32;
          const __m512i b32 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qn + k0 / 2)));
          const __m512 lo = _mm512_permutexvar_ps(b32, table);  // permutexvar reads the low 4 bits only
          const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b32, 4), table);
          for (int r = 0; r < nr; ++r) {
            const float* xr = x + (b0 + r) * K + k0;
            acc[r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr), acc[r]);
            acc[r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + 16), acc[r]);
          }
        }
#else
        for (int r = 0; r < nr; ++r) {
          float d = 0.f;
          for (int64_t blk = 0; blk < nb; ++blk) {
            const int64_t k0 = g * G + blk * 32;
            const float* xr = x + (b0 + r) * K + k0;
            for (int j = 0; j < 16; ++j) {
              const uint8_t v = qn[k0 / 2 + j];
              d += xr[j] * float(v & 0xF) + xr[j + 16] * float(v >> 4);
            }
          }
          acc[r] += sc * d;
        }
#endif
      }
#if defined(__AVX512F__)
      for (int r = 0; r < nr; ++r) y[(b0 + r) * N + n] += _mm512_reduce_add_ps(acc[r]);
#else
      for (int r = 0; r < nr; ++r) y[(b0 + r) * N + n] += acc[r];
#endif
    }
  }
}

void int8_rows(const float* x, int64_t B, int64_t K, const int8_t* q, const at::Half* s, int64_t G,
               int64_t n0, int64_t n1, int64_t N, float* y) {
  const int64_t ng = (K + G - 1) / G;
  for (int64_t b0 = 0; b0 < B; b0 += kRows) {
    const int64_t nr = std::min<int64_t>(kRows, B - b0);
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* qn = q + n * K;
#if defined(__AVX512F__)
      __m512 acc[kRows];
      for (int r = 0; r < nr; ++r) acc[r] = _mm512_setzero_ps();
#else
      float acc[kRows] = {0};
#endif
      for (int64_t g = 0; g < ng; ++g) {
        const float sc = h2f(s[n * ng + g]);
        const int64_t nb = std::min<int64_t>(G, K - g * G) / 32;
#if defined(__AVX512F__)
        const __m512 vs = _mm512_set1_ps(sc);
        for (int64_t blk = 0; blk < nb; ++blk) {
          const int64_t k0 = g * G + blk * 32;
          const __m512 a = _mm512_mul_ps(vs, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qn + k0)))));
          const __m512 c = _mm512_mul_ps(vs, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qn + k0 + 16)))));
          for (int r = 0; r < nr; ++r) {
            const float* xr = x + (b0 + r) * K + k0;
            acc[r] = _mm512_fmadd_ps(a, _mm512_loadu_ps(xr), acc[r]);
            acc[r] = _mm512_fmadd_ps(c, _mm512_loadu_ps(xr + 16), acc[r]);
          }
        }
#else
        for (int r = 0; r < nr; ++r) {
          float d = 0.f;
          const float* xr = x + (b0 + r) * K + g * G;
          for (int64_t j = 0; j < nb * 32; ++j) d += xr[j] * float(qn[g * G + j]);
          acc[r] += sc * d;
        }
#endif
      }
#if defined(__AVX512F__)
      for (int r = 0; r < nr; ++r) y[(b0 + r) * N + n] = _mm512_reduce_add_ps(acc[r]);
#else
      for (int r = 0; r < nr; ++r) y[(b0 + r) * N + n] = acc[r];
#endif
    }
  }
}

}  // namespace

torch::Tensor int4_linear(torch::Tensor x, torch::Tensor q, torch::Tensor s, torch::Tensor m, int64_t G) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x: contiguous f32 [B, K]");
  TORCH_CHECK(q.dtype() == torch::kUInt8 && s.dtype() == torch::kHalf && m.dtype() == torch::kHalf, "int4 dtypes");
  const int64_t B = x.size(0), K = x.size(1), N = q.size(0);
  const int64_t ng = (K + G - 1) / G;
  TORCH_CHECK(q.size(1) * 2 == K && G % 32 == 0 && K % 32 == 0 && s.size(1) == ng, "int4 shapes");
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
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x: contiguous f32 [B, K]");
  TORCH_CHECK(q.dtype() == torch::kInt8 && s.dtype() == torch::kHalf, "int8 dtypes");
  const int64_t B = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) == K && G % 32 == 0 && K % 32 == 0 && s.size(1) == (K + G - 1) / G, "int8 shapes");
  auto y = torch::empty({B, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const at::Half* sp = s.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { int8_rows(xp, B, K, qp, sp, G, n0, n1, N, yp); });
  return y;
}

// Dequantize to fp32 [N, K] (prefill path: then one sgemm).
torch::Tensor int4_dequantize(torch::Tensor q, torch::Tensor s, torch::Tensor m, int64_t G) {
  const int64_t N = q.size(0), K = q.size(1) * 2, ng = (K + G - 1) / G;
  auto w = torch::empty({N, K}, torch::dtype(torch::kFloat32));
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const at::Half* sp = s.data_ptr<at::Half>();
  const at::Half* mp = m.data_ptr<at::Half>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k0 = 0; k0 < K; k0 += 32) {
        const float sc = h2f(sp[n * ng + k0 / G]), mn = h2f(mp[n * ng + k0 / G]);
        const uint8_t* b = qp + n * (K / 2) + k0 / 2;
        float* o = wp + n * K + k0;
        for (int j = 0; j < 16; ++j) { o[j] = float(b[j] & 0xF) * sc + mn; o[j + 16] = float(b[j] >> 4) * sc + mn; }
      }
  });
  return w;
}

torch::Tensor int8_dequantize(torch::Tensor q, torch::Tensor s, int64_t G) {
  const int64_t N = q.size(0), K = q.size(1), ng = (K + G - 1) / G;
  auto w = torch::empty({N, K}, torch::dtype(torch::kFloat32));
  const int8_t* qp = q.data_ptr<int8_t>();
  const at::Half* sp = s.data_ptr<at::Half>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < K; ++k) wp[n * K + k] = float(qp[n * K + k]) * h2f(sp[n * ng + k / G]);
  });
  return w;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("int4_linear", &int4_linear);
  mod.def("int8_linear", &int8_linear);
  mod.def("int4_dequantize", &int4_dequantize);
  mod.def("int8_dequantize", &int8_dequantize);
}
