// Small per-token layer ops of the Llama family for the CPU, fp32, one pass over memory each:
//   rms_norm(x [T, D], w [D], eps) -> w * (x * rsqrt(mean(x^2) + eps))           (Hugging Face's order)
//   rotary_(q [T, H, Dh], k [T, KVH, Dh], cos [T, Dh], sin [T, Dh]): in place,
//       x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[Dh/2:], x[:Dh/2])
//   silu_mul(gate_up [T, 2I]) -> silu(gate) * up, silu(g) = g / (1 + exp(-g))  (SwiGLU; AVX-512 only)
// The products and sums are rounded one by one as torch's elementwise ops round them (no fused
// multiply-add), so rotary_ equals the torch expression exactly, and so does silu_mul: it uses the
// exp of torch's own vectorized silu (SLEEF's expf16_u10, exported by libtorch_cpu); rms_norm's sum of squares is
// accumulated in a different order than torch's mean (last-bit differences).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include "simd.h"  // Sleef_expf16_u10: null -> silu_mul unavailable, the caller keeps torch's

// No a * b + c contracted into one fused multiply-add: each product is rounded as torch rounds it.
#pragma GCC optimize("fp-contract=off")

namespace {

void check_f32(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.dtype() == torch::kFloat32 && t.stride(-1) == 1, what,
              ": fp32 on the CPU with unit stride in the last dimension");
}

// x[i] = x[i] * c[i] + r[i] * s[i] for one head, r = rotate_half(x) (read before any write).
void rotate_head(float* x, const float* c, const float* s, int64_t D) {
  const int64_t h = D / 2;
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= h; i += 16) {
    const __m512 lo = _mm512_loadu_ps(x + i), hi = _mm512_loadu_ps(x + h + i);
    const __m512 nlo = _mm512_add_ps(_mm512_mul_ps(lo, _mm512_loadu_ps(c + i)),
                                     _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), hi), _mm512_loadu_ps(s + i)));
    const __m512 nhi = _mm512_add_ps(_mm512_mul_ps(hi, _mm512_loadu_ps(c + h + i)),
                                     _mm512_mul_ps(lo, _mm512_loadu_ps(s + h + i)));
    _mm512_storeu_ps(x + i, nlo);
    _mm512_storeu_ps(x + h + i, nhi);
  }
#endif
  for (; i < h; ++i) {
    const float lo = x[i], hi = x[h + i];
    x[i] = lo * c[i] + -hi * s[i];
    x[h + i] = hi * c[h + i] + lo * s[h + i];
  }
}

}  // namespace

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  check_f32(x, "x");
  check_f32(w, "weight");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && w.size(0) == x.size(1), "x [T, D], weight [D]");
  const int64_t T = x.size(0), D = x.size(1), xs = x.stride(0);
  auto out = torch::empty({T, D}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* xr = xp + t * xs;
      float* o = op + t * D;
      int64_t i = 0;
      float ss = 0.f;
#if defined(__AVX512F__)
      __m512 acc = _mm512_setzero_ps();
      for (; i + 16 <= D; i += 16) {
        const __m512 v = _mm512_loadu_ps(xr + i);
        acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
      }
      ss = _mm512_reduce_add_ps(acc);
#endif
      for (; i < D; ++i) ss += xr[i] * xr[i];
      const float r = 1.f / std::sqrt(ss / float(D) + float(eps));
      i = 0;
#if defined(__AVX512F__)
      const __m512 rv = _mm512_set1_ps(r);
      for (; i + 16 <= D; i += 16)
        _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_loadu_ps(wp + i), _mm512_mul_ps(_mm512_loadu_ps(xr + i), rv)));
#endif
      for (; i < D; ++i) o[i] = wp[i] * (xr[i] * r);
    }
  });
  return out;
}

void rotary_(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin) {
  for (const auto* t : {&q, &k, &cos, &sin}) check_f32(*t, "q, k, cos, sin");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && cos.dim() == 2 && sin.sizes() == cos.sizes(), "q/k [T, H, Dh], cos/sin [T, Dh]");
  const int64_t T = q.size(0), D = q.size(2);
  TORCH_CHECK(k.size(0) == T && cos.size(0) == T && k.size(2) == D && cos.size(1) == D && D % 2 == 0,
              "q, k, cos, sin disagree on T or the head size");
  const int64_t H = q.size(1), KH = k.size(1);
  float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float *c = cp + t * cos.stride(0), *s = sp + t * sin.stride(0);
      for (int64_t h = 0; h < H; ++h) rotate_head(qp + t * q.stride(0) + h * q.stride(1), c, s, D);
      for (int64_t h = 0; h < KH; ++h) rotate_head(kp + t * k.stride(0) + h * k.stride(1), c, s, D);
    }
  });
}

bool silu_mul_available() {
#if defined(__AVX512F__)
  return Sleef_expf16_u10 != nullptr;
#else
  return false;
#endif
}

torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_f32(gate_up, "gate_up");
  TORCH_CHECK(silu_mul_available(), "silu_mul needs AVX-512 and torch's exported SLEEF exp");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 32 == 0, "gate_up [T, 2I] with I a multiple of 16");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2, gs = gate_up.stride(0);
  auto out = torch::empty({T, I}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
#if defined(__AVX512F__)
  at::parallel_for(0, T, 8, [&](int64_t t0, int64_t t1) {
    const __m512 one = _mm512_set1_ps(1.f);
    for (int64_t t = t0; t < t1; ++t) {
      const float *g = gp + t * gs, *u = g + I;
      float* o = op + t * I;
      for (int64_t i = 0; i < I; i += 16) {
        const __m512 x = _mm512_loadu_ps(g + i);
        const __m512 e = Sleef_expf16_u10(_mm512_sub_ps(_mm512_setzero_ps(), x));
        _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + i)));
      }
    }
  });
#endif
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("rms_norm", &rms_norm, py::call_guard<py::gil_scoped_release>());
  mod.def("rotary_", &rotary_, py::call_guard<py::gil_scoped_release>());
  mod.def("silu_mul", &silu_mul, py::call_guard<py::gil_scoped_release>());
  mod.def("silu_mul_available", &silu_mul_available, py::call_guard<py::gil_scoped_release>());
}
