// Decode attention over the paged KV cache for the CPU: the semantics of kernels/paged_attention.py
// (ref_paged_decode). One query token per sequence; each (sequence, KV head) pair is one task that
// reads its context's keys and values in place through the block table (no gathered copy, no padding
// to the longest context) for all the query heads sharing that KV head (GQA).
//   paged_decode(q [B, H, D] f32, k_cache [slots, KVH, D] f32, v_cache, block_tables [B, W] i64,
//                lens [B] i32, block_size, scale) -> out [B, H, D] f32
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// One (sequence, KV head) task; DC = the head size when known at compile time (0: runtime D).
template <int DC>
void decode_task(const float* qb, const float* kp, const float* vp, const int64_t* bt, int64_t L, int64_t block_size,
                 int64_t KVH, int64_t h, int64_t G, int64_t Drt, float sc, float* ob, std::vector<float>& p) {
  const int64_t D = DC ? DC : Drt;
  p.assign(G * L, 0.f);
  for (int64_t t = 0; t < L; ++t) {  // scores, keys read in place
    const int64_t slot = bt[t / block_size] * block_size + t % block_size;
    const float* __restrict k = kp + (slot * KVH + h) * D;
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
    const int64_t slot = bt[t / block_size] * block_size + t % block_size;
    const float* __restrict v = vp + (slot * KVH + h) * D;
    for (int64_t g = 0; g < G; ++g) {
      const float w = p[g * L + t];
      float* __restrict og = ob + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) og[d] += w * v[d];
    }
  }
}

}  // namespace

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
                           torch::Tensor lens, int64_t block_size, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && q.dim() == 3 && q.is_contiguous(), "q: contiguous f32 [B, H, D]");
  TORCH_CHECK(k_cache.dtype() == torch::kFloat32 && v_cache.dtype() == torch::kFloat32 && k_cache.dim() == 3 &&
                  k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes(),
              "caches: contiguous f32 [slots, KVH, D]");
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
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / KVH, h = i % KVH;
      const float* qb = qp + (b * H + h * G) * D;
      float* ob = op + (b * H + h * G) * D;
      if (D == 64)
        decode_task<64>(qb, kp, vp, bt + b * W, lp[b], block_size, KVH, h, G, D, sc, ob, p);
      else if (D == 128)
        decode_task<128>(qb, kp, vp, bt + b * W, lp[b], block_size, KVH, h, G, D, sc, ob, p);
      else
        decode_task<0>(qb, kp, vp, bt + b * W, lp[b], block_size, KVH, h, G, D, sc, ob, p);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) { mod.def("paged_decode", &paged_decode); }
