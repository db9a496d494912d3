// AVX-512 helpers shared by the CPU kernels (kernels/cpu/*.cpp). kernels/cpu_ext.py hashes this file
// into every kernel's build flags, so a change here rebuilds them all.
#pragma once
#include <immintrin.h>

#if defined(__AVX512F__)
// Lane i of the result = the sum of v[i]'s 16 lanes (a transpose-and-add tree: 8 + 4 + 2 + 1 adds).
inline __m512 reduce16(const __m512 v[16]) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // 128-bit blocks [v2i 0+2, v2i 1+3, v2i+1 0+2, v2i+1 1+3]
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // block m: the 4 partial sums of v[4i + m]
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // block m: [v(8i+m) 2 partials, v(8i+4+m) 2 partials] interleaved
    c[i] = _mm512_add_ps(_mm512_unpacklo_ps(b[2 * i], b[2 * i + 1]), _mm512_unpackhi_ps(b[2 * i], b[2 * i + 1]));
  const __m512 d = _mm512_add_ps(  // lane 4m + q = the sum of v[4q + m]
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(c[0]), _mm512_castps_pd(c[1]))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(c[0]), _mm512_castps_pd(c[1]))));
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), d);
}

// e^x for 16 lanes: torch's own AVX-512 Vectorized<float>::exp (SLEEF's expf16_u10, ~1 ulp), exported by
// libtorch_cpu. Weak: null where a torch build does not export it; callers then take their scalar path.
extern "C" __m512 Sleef_expf16_u10(__m512) __attribute__((weak));
#endif
