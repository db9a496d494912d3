// Batched LoRA shrink/expand (SGMV) for the CPU: the semantics of kernels/lora_shrink.py and
// kernels/lora_expand.py (their ref_ functions), same arguments, one call per fused Linear.
//   lora_shrink(h, x, pool, page_table, pt_start, desc, key, seg_start, seg_len, seg_slot)
//   lora_expand(y, h, pool, page_table, pt_start, desc, key, col_starts, widths, seg_start, seg_len, seg_slot)
// x / y fp32; the pool fp32 or bf16 (read through the page tables, upcast exactly); h fp32.
// Short segments (decode tokens, small prefill chunks) run as hand-vectorized GEMV blocks, in
// parallel over (segment, block of up to ROWS tokens), each weight page read once per block.
// Long segments gather their adapter's rows once and use one BLAS call each.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t ROWS = 8;        // tokens per GEMV block (accumulators for all of them stay in cache)
constexpr int64_t BLAS_MIN = 32;   // segments at least this long take the gather + BLAS path
constexpr int64_t DESC_FIELDS = 11;

// One page of P weights as fp32 (a pointer into the pool, or the page upcast into `tmp`).
template <typename T>
inline const float* page_f32(const T* pool, int64_t page, int64_t P, float* tmp);

template <>
inline const float* page_f32<float>(const float* pool, int64_t page, int64_t P, float*) { return pool + page * P; }

template <>
inline const float* page_f32<at::BFloat16>(const at::BFloat16* pool, int64_t page, int64_t P, float* tmp) {
  const uint16_t* src = reinterpret_cast<const uint16_t*>(pool + page * P);
#pragma omp simd
  for (int64_t i = 0; i < P; ++i) {
    uint32_t bits = uint32_t(src[i]) << 16;  // bf16 -> fp32 is exact: the high half of the word
    float f;
    std::memcpy(&f, &bits, 4);
    tmp[i] = f;
  }
  return tmp;
}

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

// The [rows, width] matrix at virtual page vpage of an adapter, as one fp32 tensor (BLAS path).
torch::Tensor gather(const torch::Tensor& pool, const int32_t* table, int64_t vpage, int64_t rows, int64_t width) {
  const int64_t P = pool.size(1), np = rows * width / P;
  auto idx = torch::from_blob(const_cast<int32_t*>(table + vpage), {np}, torch::kInt32).to(torch::kLong);
  return pool.index_select(0, idx).view({rows, width}).to(torch::kFloat32);
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

template <typename T>
void shrink_block(float* h, int64_t hs, const float* x, int64_t xs, int64_t n, const T* pool, int64_t P,
                  const int32_t* table, int64_t vpage, int64_t rank, int64_t K) {
  float tmp[4096];
  float acc[ROWS];
  for (int64_t r = 0; r < rank; ++r) {
    for (int64_t t = 0; t < n; ++t) acc[t] = 0.f;
    for (int64_t k0 = 0; k0 < K; k0 += P) {
      const int64_t v = vpage * P + r * K + k0;  // virtual element of this page
      const float* a = page_f32<T>(pool, table[v / P], P, tmp);
      for (int64_t t = 0; t < n; ++t) {
        const float* xt = x + t * xs + k0;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < P; ++i) s += a[i] * xt[i];
        acc[t] += s;
      }
    }
    for (int64_t t = 0; t < n; ++t) h[t * hs + r] = acc[t];
  }
}

template <typename T>
void expand_block(float* y, int64_t ys, const float* h, int64_t hs, int64_t n, const T* pool, int64_t P,
                  const int32_t* table, int64_t vpage, int64_t r0, int64_t r1, int64_t width) {
  float tmp[4096];
  for (int64_t k = 0; k < r1 - r0; ++k) {
    for (int64_t c0 = 0; c0 < width; c0 += P) {
      const int64_t v = vpage * P + k * width + c0;
      const float* b = page_f32<T>(pool, table[v / P], P, tmp);
      for (int64_t t = 0; t < n; ++t) {
        const float hk = h[t * hs + r0 + k];
        float* yt = y + t * ys + c0;
#pragma omp simd
        for (int64_t i = 0; i < P; ++i) yt[i] += hk * b[i];
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
