// Batched LoRA shrink/expand (SGMV) for the CPU: the semantics of kernels/lora_shrink.py and
// kernels/lora_expand.py (their ref_ functions), same arguments, one call per fused Linear.
//   lora_shrink(h, x, pool, page_table, pt_start, desc, key, seg_start, seg_len, seg_slot)
//   lora_expand(y, h, pool, page_table, pt_start, desc, key, col_starts, widths, seg_start, seg_len, seg_slot)
// x / y fp32; the pool fp32 or bf16 (read through the page tables, upcast exactly); h fp32.
// Short segments (decode tokens, small prefill chunks) run as AVX-512 GEMV blocks, in parallel over
// (segment, block of up to ROWS tokens), each weight page read from memory once per block.
// Long segments gather their adapter's rows once and use one BLAS call each.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <immintrin.h>
#include <vector>

namespace {

constexpr int64_t ROWS = 8;        // tokens per GEMV block (accumulators for all of them stay in cache)
constexpr int64_t BLAS_MIN = 32;   // segments at least this long take the gather + BLAS path
constexpr int64_t DESC_FIELDS = 11;

// 16 weights as fp32 (bf16 -> fp32 is exact: the bf16 bits are the high half of the fp32 word).
#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif
inline float to_f32(float v) { return v; }
inline float to_f32(at::BFloat16 v) { return static_cast<float>(v); }

struct Seg {
  int64_t start, n, slot;
};

struct Meta {
  const int32_t* pt;
  const int32_t* pt_start;
  const int32_t* desc;
  int64_t desc_stride_a, key_off;
  const int32_t* d(int64_t slot) const { return desc + slot * desc_stride_a + key_off; }
  const int32_t* table(int64_t slot) const { return pt + pt_start[slot]; }
};

std::vector<Seg> segments(const torch::Tensor& s0, const torch::Tensor& sl, const torch::Tensor& ss) {
  std::vector<Seg> out;
  const int32_t *a = s0.data_ptr<int32_t>(), *b = sl.data_ptr<int32_t>(), *c = ss.data_ptr<int32_t>();
  for (int64_t i = 0; i < s0.numel(); ++i)
    if (b[i] > 0) out.push_back({a[i], b[i], c[i]});
  return out;
}

// The [rows, width] matrix at virtual page vpage of an adapter as an fp32 tensor (BLAS path): a view of
// the pool when its pages are consecutive (the allocator's usual case), else a gathered copy.
torch::Tensor gather(const torch::Tensor& pool, const int32_t* table, int64_t vpage, int64_t rows, int64_t width) {
  const int64_t P = pool.size(1), np = rows * width / P;
  const int32_t* pages = table + vpage;
  bool run = true;
  for (int64_t i = 1; i < np && run; ++i) run = pages[i] == pages[0] + i;
  torch::Tensor m;
  if (run) {
    m = pool.narrow(0, pages[0], np).view({rows, width});
  } else {
    auto idx = torch::from_blob(const_cast<int32_t*>(pages), {np}, torch::kInt32).to(torch::kLong);
    m = pool.index_select(0, idx).view({rows, width});
  }
  return m.to(torch::kFloat32);
}

void check_meta(const torch::Tensor& pool, const torch::Tensor& pt, const torch::Tensor& pts, const torch::Tensor& desc,
                const torch::Tensor& s0, const torch::Tensor& sl, const torch::Tensor& ss) {
  for (const auto* t : {&pt, &pts, &desc, &s0, &sl, &ss})
    TORCH_CHECK(t->dtype() == torch::kInt32 && t->is_contiguous() && t->device().is_cpu(), "metadata: contiguous int32 on the CPU");
  TORCH_CHECK(desc.dim() == 3 && desc.size(2) == DESC_FIELDS, "desc must be [A, keys, DESC_FIELDS]");
  TORCH_CHECK(pool.dim() == 2 && pool.is_contiguous() &&
                  (pool.dtype() == torch::kFloat32 || pool.dtype() == torch::kBFloat16),
              "pool: contiguous fp32 or bf16 [pages, P]");
}

// h[t, r] = x[t] . A[r] for the block's n tokens and every rank row r; A read page by page.
template <typename T>
void shrink_block(float* h, int64_t hs, const float* x, int64_t xs, int64_t n, const T* pool, int64_t P,
                  const int32_t* table, int64_t vpage, int64_t rank, int64_t K) {
  const int64_t np = K / P;  // pages per row of A (rows are whole pages)
  for (int64_t r = 0; r < rank; ++r) {
    const int32_t* row = table + vpage + r * np;  // row r's pages, in order
    for (int64_t t = 0; t < n; ++t) {
      const float* xt = x + t * xs;
      float s = 0.f;
#if defined(__AVX512F__)
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
#endif
      for (int64_t pi = 0; pi < np; ++pi) {
        const T* a = pool + int64_t(row[pi]) * P;
        const float* xk = xt + pi * P;
        int64_t i = 0;
#if defined(__AVX512F__)
        for (; i + 32 <= P; i += 32) {
          acc0 = _mm512_fmadd_ps(load16(a + i), _mm512_loadu_ps(xk + i), acc0);
          acc1 = _mm512_fmadd_ps(load16(a + i + 16), _mm512_loadu_ps(xk + i + 16), acc1);
        }
        for (; i + 16 <= P; i += 16) acc0 = _mm512_fmadd_ps(load16(a + i), _mm512_loadu_ps(xk + i), acc0);
#endif
        for (; i < P; ++i) s += to_f32(a[i]) * xk[i];
      }
#if defined(__AVX512F__)
      s += _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#endif
      h[t * hs + r] = s;
    }
  }
}

// y[t, 0:width] += h[t, r0:r1] @ Bt for the block's n tokens, 64 output columns at a time held in
// registers across the rank loop (one load and store of y per column chunk).
template <typename T>
void expand_block(float* y, int64_t ys, const float* h, int64_t hs, int64_t n, const T* pool, int64_t P,
                  const int32_t* table, int64_t vpage, int64_t r0, int64_t r1, int64_t width) {
  const int64_t R = r1 - r0, np = width / P;  // pages per row of Bt
  const int32_t* rows = table + vpage;  // row k's page ci is rows[k * np + ci]
  for (int64_t ci = 0; ci < np; ++ci) {  // one page-wide column chunk: the same page offset in every row
    for (int64_t t = 0; t < n; ++t) {
      const float* ht = h + t * hs + r0;
      float* yt = y + t * ys + ci * P;
      int64_t j = 0;
#if defined(__AVX512F__)
      for (; j + 64 <= P; j += 64) {
        __m512 a0 = _mm512_loadu_ps(yt + j), a1 = _mm512_loadu_ps(yt + j + 16);
        __m512 a2 = _mm512_loadu_ps(yt + j + 32), a3 = _mm512_loadu_ps(yt + j + 48);
        for (int64_t k = 0; k < R; ++k) {
          const T* b = pool + int64_t(rows[k * np + ci]) * P + j;
          const __m512 hk = _mm512_set1_ps(ht[k]);
          a0 = _mm512_fmadd_ps(hk, load16(b), a0);
          a1 = _mm512_fmadd_ps(hk, load16(b + 16), a1);
          a2 = _mm512_fmadd_ps(hk, load16(b + 32), a2);
          a3 = _mm512_fmadd_ps(hk, load16(b + 48), a3);
        }
        _mm512_storeu_ps(yt + j, a0);
        _mm512_storeu_ps(yt + j + 16, a1);
        _mm512_storeu_ps(yt + j + 32, a2);
        _mm512_storeu_ps(yt + j + 48, a3);
      }
#endif
      for (; j < P; ++j) {
        float acc = yt[j];
        for (int64_t k = 0; k < R; ++k) acc += ht[k] * to_f32(pool[int64_t(rows[k * np + ci]) * P + j]);
        yt[j] = acc;
      }
    }
  }
}

// (segment, first row, rows) work items for the GEMV path; long segments listed apart for BLAS.
void split(const std::vector<Seg>& segs, std::vector<Seg>& blocks, std::vector<Seg>& longs) {
  for (const auto& s : segs) {
    if (s.n >= BLAS_MIN) {
      longs.push_back(s);
      continue;
    }
    for (int64_t m = 0; m < s.n; m += ROWS) blocks.push_back({s.start + m, std::min(ROWS, s.n - m), s.slot});
  }
}

template <typename T>
void shrink_impl(torch::Tensor& h, const torch::Tensor& x, const torch::Tensor& pool, const Meta& meta,
                 const std::vector<Seg>& blocks) {
  const int64_t P = pool.size(1), K = x.size(1), hs = h.stride(0), xs = x.stride(0);
  float* hp = h.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const T* pp = pool.data_ptr<T>();
  at::parallel_for(0, blocks.size(), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const Seg& s = blocks[b];
      const int32_t* d = meta.d(s.slot);
      if (d[1] == 0) continue;
      shrink_block<T>(hp + s.start * hs, hs, xp + s.start * xs, xs, s.n, pp, P, meta.table(s.slot), d[0], d[1], K);
    }
  });
}

template <typename T>
void expand_impl(torch::Tensor& y, const torch::Tensor& h, const torch::Tensor& pool, const Meta& meta,
                 const std::vector<int64_t>& cols, const std::vector<int64_t>& widths, const std::vector<Seg>& blocks) {
  const int64_t P = pool.size(1), hs = h.stride(0), ys = y.stride(0);
  float* yp = y.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  const T* pp = pool.data_ptr<T>();
  at::parallel_for(0, blocks.size(), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const Seg& s = blocks[b];
      const int32_t* d = meta.d(s.slot);
      for (size_t j = 0; j < widths.size(); ++j) {
        const int64_t vpage = d[2 + 3 * j], r0 = d[3 + 3 * j], r1 = d[4 + 3 * j];
        if (r1 <= r0) continue;
        expand_block<T>(yp + s.start * ys + cols[j], ys, hp + s.start * hs, hs, s.n, pp, P, meta.table(s.slot), vpage,
                        r0, r1, widths[j]);
      }
    }
  });
}

Meta make_meta(const torch::Tensor& pt, const torch::Tensor& pts, const torch::Tensor& desc, int64_t key) {
  TORCH_CHECK(key >= 0 && key < desc.size(1), "key out of range");
  return {pt.data_ptr<int32_t>(), pts.data_ptr<int32_t>(), desc.data_ptr<int32_t>(), desc.stride(0), key * DESC_FIELDS};
}

}  // namespace

torch::Tensor lora_shrink(torch::Tensor h, torch::Tensor x, torch::Tensor pool, torch::Tensor pt, torch::Tensor pts,
                          torch::Tensor desc, int64_t key, torch::Tensor s0, torch::Tensor sl, torch::Tensor ss) {
  check_meta(pool, pt, pts, desc, s0, sl, ss);
  TORCH_CHECK(x.dtype() == torch::kFloat32 && h.dtype() == torch::kFloat32 && x.stride(1) == 1 && h.stride(1) == 1,
              "x, h: fp32 with unit column stride");
  TORCH_CHECK(pool.size(1) <= 4096 && x.size(1) % pool.size(1) == 0, "in_features must be a multiple of the page size");
  const Meta meta = make_meta(pt, pts, desc, key);
  std::vector<Seg> blocks, longs;
  split(segments(s0, sl, ss), blocks, longs);
  if (pool.dtype() == torch::kFloat32)
    shrink_impl<float>(h, x, pool, meta, blocks);
  else
    shrink_impl<at::BFloat16>(h, x, pool, meta, blocks);
  const int64_t K = x.size(1);
  for (const auto& s : longs) {
    const int32_t* d = meta.d(s.slot);
    if (d[1] == 0) continue;
    auto A = gather(pool, meta.table(s.slot), d[0], d[1], K);
    h.narrow(0, s.start, s.n).narrow(1, 0, d[1]).copy_(torch::mm(x.narrow(0, s.start, s.n), A.t()));
  }
  return h;
}

torch::Tensor lora_expand(torch::Tensor y, torch::Tensor h, torch::Tensor pool, torch::Tensor pt, torch::Tensor pts,
                          torch::Tensor desc, int64_t key, std::vector<int64_t> cols, std::vector<int64_t> widths,
                          torch::Tensor s0, torch::Tensor sl, torch::Tensor ss) {
  check_meta(pool, pt, pts, desc, s0, sl, ss);
  TORCH_CHECK(y.dtype() == torch::kFloat32 && h.dtype() == torch::kFloat32 && y.stride(1) == 1 && h.stride(1) == 1,
              "y, h: fp32 with unit column stride");
  TORCH_CHECK(cols.size() == widths.size() && !widths.empty() && widths.size() <= 3, "1..3 output slices");
  for (size_t j = 0; j < widths.size(); ++j)
    TORCH_CHECK(widths[j] % pool.size(1) == 0 && cols[j] + widths[j] <= y.size(1), "slice widths/columns");
  TORCH_CHECK(pool.size(1) <= 4096, "page size at most 4096");
  const Meta meta = make_meta(pt, pts, desc, key);
  std::vector<Seg> blocks, longs;
  split(segments(s0, sl, ss), blocks, longs);
  if (pool.dtype() == torch::kFloat32)
    expand_impl<float>(y, h, pool, meta, cols, widths, blocks);
  else
    expand_impl<at::BFloat16>(y, h, pool, meta, cols, widths, blocks);
  for (const auto& s : longs) {
    const int32_t* d = meta.d(s.slot);
    for (size_t j = 0; j < widths.size(); ++j) {
      const int64_t r0 = d[3 + 3 * j], r1 = d[4 + 3 * j];
      if (r1 <= r0) continue;
      auto Bt = gather(pool, meta.table(s.slot), d[2 + 3 * j], r1 - r0, widths[j]);
      y.narrow(0, s.start, s.n).narrow(1, cols[j], widths[j]).addmm_(h.narrow(0, s.start, s.n).narrow(1, r0, r1 - r0), Bt);
    }
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("lora_shrink", &lora_shrink);
  mod.def("lora_expand", &lora_expand);
}
