// Attention over the paged KV cache for the CPU, the semantics of kernels/paged_attention.py:
//   paged_decode (ref_paged_decode): one query token per sequence, its context read through its block table;
//   paged_prefill (ref_paged_prefill): the causal queries of a step's prefill chunks, each chunk's context
//   read through its list of cache slots.
// Each (query token, KV head) pair is one task that reads its context's keys and values in place (no
// gathered copy, no padding to the longest context) for all the query heads sharing that KV head (GQA).
// With AVX-512 and head size 64 or 128: scores for 16 keys at a time (dot products summed across lanes by
// one transpose-and-add tree), torch's vectorized exp (SLEEF), and the weighted values accumulated in
// registers for up to 4 query heads; other head sizes (or no exported SLEEF exp) take a plain loop.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

#include "simd.h"

namespace {

#if defined(__AVX512F__)
// out[g] += sum_t p[g, t] v[t] for GC query heads g0 .. g0 + GC, accumulators in registers.
template <int DV, int GC>
void weighted_values(const float* vp, const int64_t* off, int64_t L, const float* p, int64_t Lp, int64_t g0,
                     float* ob) {
  __m512 o[GC][DV];
  for (int g = 0; g < GC; ++g)
    for (int j = 0; j < DV; ++j) o[g][j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < L; ++t) {
    const float* v = vp + off[t];
    __m512 vv[DV];
    for (int j = 0; j < DV; ++j) vv[j] = _mm512_loadu_ps(v + 16 * j);
    for (int g = 0; g < GC; ++g) {
      const __m512 w = _mm512_set1_ps(p[(g0 + g) * Lp + t]);
      for (int j = 0; j < DV; ++j) o[g][j] = _mm512_fmadd_ps(w, vv[j], o[g][j]);
    }
  }
  for (int g = 0; g < GC; ++g)
    for (int j = 0; j < DV; ++j) _mm512_storeu_ps(ob + (g0 + g) * DV * 16 + 16 * j, o[g][j]);
}

// One task, head size DV * 16. off[t]: element offset of token t's key/value row.
template <int DV>
void attend_avx(const float* qb, const float* kp, const float* vp, const int64_t* off, int64_t L, int64_t G,
                     float sc, float* ob, std::vector<float>& p) {
  constexpr int GMAX = DV <= 4 ? 4 : 2;  // query heads per pass over the values (GMAX * DV accumulators)
  const int64_t Lp = (L + 15) / 16 * 16;
  p.resize(G * Lp);
  const __m512 vsc = _mm512_set1_ps(sc), ninf = _mm512_set1_ps(-INFINITY);
  for (int64_t g = 0; g < G; ++g) {  // scores, 16 keys at a time; lanes past L hold -inf
    __m512 q[DV];
    for (int j = 0; j < DV; ++j) q[j] = _mm512_loadu_ps(qb + g * DV * 16 + 16 * j);
    float* pg = p.data() + g * Lp;
    __m512 mx = ninf;
    for (int64_t t0 = 0; t0 < L; t0 += 16) {
      const int n = int(std::min<int64_t>(16, L - t0));
      __m512 part[16];
      for (int i = 0; i < 16; ++i) {
        if (i < n) {
          const float* k = kp + off[t0 + i];
          __m512 acc = _mm512_mul_ps(q[0], _mm512_loadu_ps(k));
          for (int j = 1; j < DV; ++j) acc = _mm512_fmadd_ps(q[j], _mm512_loadu_ps(k + 16 * j), acc);
          part[i] = acc;
        } else {
          part[i] = _mm512_setzero_ps();
        }
      }
      const __m512 s = _mm512_mask_blend_ps(__mmask16((1u << n) - 1u), ninf, _mm512_mul_ps(reduce16(part), vsc));
      _mm512_storeu_ps(pg + t0, s);
      mx = _mm512_max_ps(mx, s);
    }
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t0 = 0; t0 < Lp; t0 += 16) {
      const __m512 e = Sleef_expf16_u10(_mm512_sub_ps(_mm512_loadu_ps(pg + t0), m));  // -inf lanes: 0
      _mm512_storeu_ps(pg + t0, e);
      sum = _mm512_add_ps(sum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
    for (int64_t t0 = 0; t0 < Lp; t0 += 16) _mm512_storeu_ps(pg + t0, _mm512_mul_ps(_mm512_loadu_ps(pg + t0), inv));
  }
  int64_t g0 = 0;
  for (; g0 + GMAX <= G; g0 += GMAX) weighted_values<DV, GMAX>(vp, off, L, p.data(), Lp, g0, ob);
  switch (G - g0) {
    case 3: weighted_values<DV, 3>(vp, off, L, p.data(), Lp, g0, ob); break;
    case 2: weighted_values<DV, 2>(vp, off, L, p.data(), Lp, g0, ob); break;
    case 1: weighted_values<DV, 1>(vp, off, L, p.data(), Lp, g0, ob); break;
    default: break;
  }
}
#endif


// One (query token, KV head) task without the vectorized path; DC = the head size when known at compile
// time (0: runtime D). off[t]: element offset of context token t's key/value row.
template <int DC>
void attend_task(const float* qb, const float* kp, const float* vp, const int64_t* off, int64_t L, int64_t G,
                 int64_t Drt, float sc, float* ob, std::vector<float>& p) {
  const int64_t D = DC ? DC : Drt;
  p.assign(G * L, 0.f);
  for (int64_t t = 0; t < L; ++t) {  // scores, keys read in place
    const float* __restrict k = kp + off[t];
    for (int64_t g = 0; g < G; ++g) {
      const float* __restrict qg = qb + g * D;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) s += qg[d] * k[d];
      p[g * L + t] = s * sc;
    }
  }
  for (int64_t g = 0; g < G; ++g) {  // softmax per query head
    float* pg = p.data() + g * L;
    const float m = *std::max_element(pg, pg + L);
    float sum = 0.f;
    for (int64_t t = 0; t < L; ++t) sum += (pg[t] = std::exp(pg[t] - m));
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < L; ++t) pg[t] *= inv;
  }
  std::fill(ob, ob + G * D, 0.f);
  for (int64_t t = 0; t < L; ++t) {  // weighted values, read in place
    const float* __restrict v = vp + off[t];
    for (int64_t g = 0; g < G; ++g) {
      const float w = p[g * L + t];
      float* __restrict og = ob + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) og[d] += w * v[d];
    }
  }
}

// The G query heads at qb (sharing one KV head) attend to the L context rows at off -> ob.
void attend(const float* qb, const float* kp, const float* vp, const int64_t* off, int64_t L, int64_t G, int64_t D,
            float sc, float* ob, std::vector<float>& p) {
#if defined(__AVX512F__)
  if (Sleef_expf16_u10 != nullptr) {
    if (D == 64) return attend_avx<4>(qb, kp, vp, off, L, G, sc, ob, p);
    if (D == 128) return attend_avx<8>(qb, kp, vp, off, L, G, sc, ob, p);
  }
#endif
  if (D == 64) return attend_task<64>(qb, kp, vp, off, L, G, D, sc, ob, p);
  if (D == 128) return attend_task<128>(qb, kp, vp, off, L, G, D, sc, ob, p);
  attend_task<0>(qb, kp, vp, off, L, G, D, sc, ob, p);
}

void check_caches(const torch::Tensor& k_cache, const torch::Tensor& v_cache) {
  TORCH_CHECK(k_cache.dtype() == torch::kFloat32 && v_cache.dtype() == torch::kFloat32 && k_cache.dim() == 3 &&
                  k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes(),
              "caches: contiguous f32 [slots, KVH, D]");
}

}  // namespace

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
                           torch::Tensor lens, int64_t block_size, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && q.dim() == 3 && q.is_contiguous(), "q: contiguous f32 [B, H, D]");
  check_caches(k_cache, v_cache);
  TORCH_CHECK(block_tables.dtype() == torch::kLong && block_tables.dim() == 2 && block_tables.is_contiguous(),
              "block_tables: contiguous int64 [B, W]");
  TORCH_CHECK(lens.dtype() == torch::kInt && lens.is_contiguous() && lens.numel() == q.size(0), "lens: int32 [B]");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(1), W = block_tables.size(1);
  TORCH_CHECK(k_cache.size(2) == D && H % KVH == 0, "head shapes");
  const int64_t G = H / KVH, slots = k_cache.size(0);
  const int32_t* lp = lens.data_ptr<int32_t>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= W * block_size, "context length outside the block table");
    for (int64_t j = 0; j < (lp[b] + block_size - 1) / block_size; ++j)
      TORCH_CHECK(bt[b * W + j] >= 0 && (bt[b * W + j] + 1) * block_size <= slots, "block table points outside the cache");
  }
  auto out = torch::empty_like(q);
  const float *qp = q.data_ptr<float>(), *kp = k_cache.data_ptr<float>(), *vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * KVH, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p;
    std::vector<int64_t> off;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / KVH, h = i % KVH, L = lp[b];
      const int64_t* tb = bt + b * W;
      off.resize(L);
      for (int64_t t = 0; t < L; ++t) off[t] = ((tb[t / block_size] * block_size + t % block_size) * KVH + h) * D;
      attend(qp + (b * H + h * G) * D, kp, vp, off.data(), L, G, D, sc, op + (b * H + h * G) * D, p);
    }
  });
  return out;
}

// Causal attention for the prefill chunks of a step, over their contexts in the cache (this step's keys and
// values already written). chunks [C, 4] int64 rows (q_start, n, slot_off, ctx_len): the chunk's queries are
// q[q_start : q_start + n], its context's cache slots slots[slot_off : slot_off + ctx_len] in order, and its
// query i sees context tokens 0 .. ctx_len - n + i. Results go to the same rows of out.
void paged_prefill(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor chunks,
                   torch::Tensor slots, double scale, torch::Tensor out) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && q.dim() == 3 && q.is_contiguous(), "q: contiguous f32 [T, H, D]");
  TORCH_CHECK(out.dtype() == torch::kFloat32 && out.is_contiguous() && out.sizes() == q.sizes(), "out: like q");
  check_caches(k_cache, v_cache);
  TORCH_CHECK(chunks.dtype() == torch::kLong && chunks.dim() == 2 && chunks.size(1) == 4 && chunks.is_contiguous(),
              "chunks: contiguous int64 [C, 4]");
  TORCH_CHECK(slots.dtype() == torch::kLong && slots.dim() == 1 && slots.is_contiguous(), "slots: contiguous int64 [S]");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(1), C = chunks.size(0);
  TORCH_CHECK(k_cache.size(2) == D && H % KVH == 0, "head shapes");
  const int64_t G = H / KVH, num_slots = k_cache.size(0), S = slots.numel();
  const int64_t* ch = chunks.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  std::vector<int64_t> first(C + 1, 0);  // first task of each chunk: (query, KV head) pairs
  for (int64_t c = 0; c < C; ++c) {
    const int64_t q0 = ch[4 * c], n = ch[4 * c + 1], so = ch[4 * c + 2], ctx = ch[4 * c + 3];
    TORCH_CHECK(q0 >= 0 && n >= 1 && q0 + n <= T && n <= ctx && so >= 0 && so + ctx <= S,
                "prefill chunk outside the step's queries or slots");
    for (int64_t t = 0; t < ctx; ++t) TORCH_CHECK(sl[so + t] >= 0 && sl[so + t] < num_slots, "slot outside the cache");
    first[c + 1] = first[c] + n * KVH;
  }
  const float *qp = q.data_ptr<float>(), *kp = k_cache.data_ptr<float>(), *vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, first[C], 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p;
    std::vector<int64_t> off;
    int64_t c = std::upper_bound(first.begin(), first.end(), i0) - first.begin() - 1;
    for (int64_t i = i0; i < i1; ++i) {
      while (i >= first[c + 1]) ++c;
      const int64_t q0 = ch[4 * c], n = ch[4 * c + 1], so = ch[4 * c + 2], ctx = ch[4 * c + 3];
      const int64_t j = (i - first[c]) / KVH, h = (i - first[c]) % KVH, L = ctx - n + j + 1;
      off.resize(L);
      for (int64_t t = 0; t < L; ++t) off[t] = (sl[so + t] * KVH + h) * D;
      const int64_t row = ((q0 + j) * H + h * G) * D;
      attend(qp + row, kp, vp, off.data(), L, G, D, sc, op + row, p);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("paged_decode", &paged_decode, py::call_guard<py::gil_scoped_release>());
  mod.def("paged_prefill", &paged_prefill, py::call_guard<py::gil_scoped_release>());
}
