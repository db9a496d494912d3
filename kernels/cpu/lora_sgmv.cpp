// Batched LoRA shrink/expand (SGMV) for the CPU: the semantics of kernels/lora_shrink.py and
// kernels/lora_expand.py (their ref_ functions), same arguments, one call per fused Linear.
//   lora_shrink(h, x, pool, page_table, pt_start, desc, key, seg_start, seg_len, seg_slot)
//   lora_expand(y, h, pool, page_table, pt_start, desc, key, col_starts, widths, seg_start, seg_len, seg_slot)
//   lora_apply(y, x, pool, ..., col_starts, widths, seg_start, seg_len, seg_slot, max_rank): both, one call
// x / y fp32; the pool fp32 or bf16 (read through the page tables, upcast exactly); h fp32.
// Segments are cut into blocks of up to BLOCK tokens, spread over the threads by cost; within a block
// each weight row is read from memory once and reused from L1/L2 for all its tokens. Shrink is
// register-blocked over 4 rank rows x 4 tokens (16 dot products, summed across lanes at the end);
// expand adds 64 output columns per token at a time, held in registers across the rank loop. Both ask
// for the pages they read next ahead of time (prefetch_pages): a decode block reads each weight once.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

#include "simd.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SGMV_AVX512 1
#endif

namespace {

constexpr int64_t BLOCK = 64;  // tokens per work item (prefill segments are split; decode tokens are 1 each)
constexpr int64_t DESC_FIELDS = 11;

inline float to_f32(float v) { return v; }
inline float to_f32(at::BFloat16 v) { return static_cast<float>(v); }

#ifdef SGMV_AVX512
// 16 weights as fp32, all or the lanes of mask m (bf16 -> fp32 is exact: the high half of the fp32 word).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
inline __m512 load16(const at::BFloat16* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 load16(const at::BFloat16* p, __mmask16 m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
#endif

// Pool pages requested into L2 ahead of their use: pages[i * stride] for i < n. An adapter's pages can be
// anywhere in the pool and the hardware prefetchers stop at each page's end, so without this a decode
// block (one token: each weight used once) waits on memory for page after page.
template <typename T>
inline void prefetch_pages(const T* pool, int64_t P, const int32_t* pages, int64_t n, int64_t stride = 1) {
  const int64_t bytes = P * int64_t(sizeof(T));
  for (int64_t i = 0; i < n; ++i) {
    const char* p = reinterpret_cast<const char*>(pool + int64_t(pages[i * stride]) * P);
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 2);  // read, into L2 (x86: prefetcht1)
  }
}

// Rows of A requested ahead of the rows being computed in shrink: the next 4-row group. 64 distinct decode
// adapters' q/k/v/o on SmolLM2 (442 MB, bf16, one token each), interleaved A/B on this VM: 27.5 -> 23.8 ms with
// the pool's pages in order, 47.3 -> 33.1 ms scattered; 8 rows ahead was no better, 16 worse, T0 worse.
constexpr int64_t AHEAD_ROWS = 4;

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

// h[t, r] = x[t] . A[r] for NR rank rows x TB tokens; row r's pages are rows[r * np .. r * np + np).
template <typename T, int NR, int TB>
void shrink_micro(float* h, int64_t hs, const float* x, int64_t xs, const T* pool, int64_t P, const int32_t* rows,
                  int64_t np) {
#ifdef SGMV_AVX512
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t body = P / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (P % 16)) - 1);
  for (int64_t pi = 0; pi < np; ++pi) {
    const T* a[NR];
    const float* xk[TB];
    for (int r = 0; r < NR; ++r) a[r] = pool + int64_t(rows[r * np + pi]) * P;
    for (int t = 0; t < TB; ++t) xk[t] = x + t * xs + pi * P;
    for (int64_t i = 0; i < body; i += 16) {
      __m512 xv[TB];
      for (int t = 0; t < TB; ++t) xv[t] = _mm512_loadu_ps(xk[t] + i);
      for (int r = 0; r < NR; ++r) {
        const __m512 w = load16(a[r] + i);
        for (int t = 0; t < TB; ++t) acc[r * TB + t] = _mm512_fmadd_ps(w, xv[t], acc[r * TB + t]);
      }
    }
    if (tail) {
      __m512 xv[TB];
      for (int t = 0; t < TB; ++t) xv[t] = _mm512_maskz_loadu_ps(tail, xk[t] + body);
      for (int r = 0; r < NR; ++r) {
        const __m512 w = load16(a[r] + body, tail);
        for (int t = 0; t < TB; ++t) acc[r * TB + t] = _mm512_fmadd_ps(w, xv[t], acc[r * TB + t]);
      }
    }
  }
  alignas(64) float out[16];
  _mm512_store_ps(out, reduce16(acc));
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < TB; ++t) h[t * hs + r] = out[r * TB + t];
#else
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < TB; ++t) {
      float s = 0.f;
      for (int64_t pi = 0; pi < np; ++pi) {
        const T* a = pool + int64_t(rows[r * np + pi]) * P;
        const float* xk = x + t * xs + pi * P;
        for (int64_t i = 0; i < P; ++i) s += to_f32(a[i]) * xk[i];
      }
      h[t * hs + r] = s;
    }
#endif
}

// TB tokens against all rank rows, 4 rows at a time (the tokens' x rows stay in L1 meanwhile).
template <typename T, int TB>
void shrink_tokens(float* h, int64_t hs, const float* x, int64_t xs, const T* pool, int64_t P, const int32_t* rows,
                   int64_t np, int64_t rank) {
  int64_t r = 0;
  for (; r + 4 <= rank; r += 4) {
    if (r + AHEAD_ROWS < rank)
      prefetch_pages(pool, P, rows + (r + AHEAD_ROWS) * np, std::min<int64_t>(4, rank - r - AHEAD_ROWS) * np);
    shrink_micro<T, 4, TB>(h + r, hs, x, xs, pool, P, rows + r * np, np);
  }
  for (; r + 2 <= rank; r += 2) shrink_micro<T, 2, TB>(h + r, hs, x, xs, pool, P, rows + r * np, np);
  for (; r < rank; ++r) shrink_micro<T, 1, TB>(h + r, hs, x, xs, pool, P, rows + r * np, np);
}

// h[t, 0:rank] for the block's n tokens; A (rank rows of K) starts at virtual page vpage and is read
// from memory once per block (then from L1/L2), 4 tokens at a time.
template <typename T>
void shrink_block(float* h, int64_t hs, const float* x, int64_t xs, int64_t n, const T* pool, int64_t P,
                  const int32_t* table, int64_t vpage, int64_t rank, int64_t K) {
  const int64_t np = K / P;  // pages per row of A (rows are whole pages)
  const int32_t* rows = table + vpage;
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) shrink_tokens<T, 4>(h + t * hs, hs, x + t * xs, xs, pool, P, rows, np, rank);
  for (; t + 2 <= n; t += 2) shrink_tokens<T, 2>(h + t * hs, hs, x + t * xs, xs, pool, P, rows, np, rank);
  for (; t < n; ++t) shrink_tokens<T, 1>(h + t * hs, hs, x + t * xs, xs, pool, P, rows, np, rank);
}

// y[t, 0:width] += h[t, r0:r1] @ Bt for the block's n tokens, 64 output columns at a time held in
// registers across the rank loop (one load and store of y per column chunk); a page-wide column
// chunk of Bt (R x P) stays in L1 across the tokens.
template <typename T>
void expand_block(float* y, int64_t ys, const float* h, int64_t hs, int64_t n, const T* pool, int64_t P,
                  const int32_t* table, int64_t vpage, int64_t r0, int64_t r1, int64_t width) {
  const int64_t R = r1 - r0, np = width / P;  // pages per row of Bt
  const int32_t* rows = table + vpage;  // row k's page ci is rows[k * np + ci]
  for (int64_t ci = 0; ci < np; ++ci) {  // the same page offset in every row
    if (ci + 1 < np) prefetch_pages(pool, P, rows + ci + 1, R, np);  // the next page column of every row
    for (int64_t t = 0; t < n; ++t) {
      const float* ht = h + t * hs + r0;
      float* yt = y + t * ys + ci * P;
      int64_t j = 0;
#ifdef SGMV_AVX512
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
      for (; j < P; j += 16) {
        const __mmask16 m = j + 16 <= P ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (P - j)) - 1);
        __m512 a = _mm512_maskz_loadu_ps(m, yt + j);
        for (int64_t k = 0; k < R; ++k)
          a = _mm512_fmadd_ps(_mm512_set1_ps(ht[k]), load16(pool + int64_t(rows[k * np + ci]) * P + j, m), a);
        _mm512_mask_storeu_ps(yt + j, m, a);
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

// The non-empty segments cut into blocks of at most BLOCK tokens (near-equal parts).
// Checks every segment against the T token rows and the A adapters of the step.
std::vector<Seg> blocks_of(const torch::Tensor& s0, const torch::Tensor& sl, const torch::Tensor& ss, int64_t T,
                           int64_t A) {
  TORCH_CHECK(s0.numel() == sl.numel() && s0.numel() == ss.numel(), "seg_start/seg_len/seg_slot lengths differ");
  std::vector<Seg> out;
  const int32_t *a = s0.data_ptr<int32_t>(), *b = sl.data_ptr<int32_t>(), *c = ss.data_ptr<int32_t>();
  for (int64_t i = 0; i < s0.numel(); ++i) {
    if (b[i] <= 0) continue;
    TORCH_CHECK(a[i] >= 0 && a[i] + int64_t(b[i]) <= T && c[i] >= 0 && c[i] < A, "segment out of range");
    const int64_t n = b[i], parts = (n + BLOCK - 1) / BLOCK;
    for (int64_t p = 0, at = 0; p < parts; ++p) {
      const int64_t len = n / parts + (p < n % parts);
      out.push_back({a[i] + at, len, c[i]});
      at += len;
    }
  }
  return out;
}

// The blocks of one call and their split over the threads: each block goes to the least loaded
// thread, largest first (cost: tokens x rank rows); built once per call, used by shrink and expand.
struct Plan {
  std::vector<Seg> blocks;
  std::vector<std::vector<int64_t>> lists;  // per thread: indices into blocks
};

Plan plan_blocks(std::vector<Seg> blocks, const Meta& meta) {
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks.size()));
  std::vector<int64_t> order(blocks.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  auto cost = [&](int64_t i) { return blocks[i].n * std::max(1, meta.d(blocks[i].slot)[1]); };
  std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return cost(i) > cost(j); });
  std::vector<std::vector<int64_t>> lists(nt);
  std::vector<int64_t> load(nt, 0);
  for (int64_t i : order) {
    const int64_t w = std::min_element(load.begin(), load.end()) - load.begin();
    lists[w].push_back(i);
    load[w] += cost(i);
  }
  return {std::move(blocks), std::move(lists)};
}

// fn(block, its descriptor row, its page table) for every block, each thread running its own list;
// ahead(...) of the same arguments for the thread's next block first, so its weights are on the way
// while this one computes.
template <typename F, typename G>
void for_blocks(const Plan& plan, const Meta& meta, F fn, G ahead) {
  at::parallel_for(0, plan.lists.size(), 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const std::vector<int64_t>& list = plan.lists[w];
      for (size_t k = 0; k < list.size(); ++k) {
        if (k + 1 < list.size()) {
          const Seg& next = plan.blocks[list[k + 1]];
          ahead(next, meta.d(next.slot), meta.table(next.slot));
        }
        const Seg& s = plan.blocks[list[k]];
        fn(s, meta.d(s.slot), meta.table(s.slot));
      }
    }
  });
}

void check_meta(const torch::Tensor& pool, const torch::Tensor& pt, const torch::Tensor& pts, const torch::Tensor& desc,
                const torch::Tensor& s0, const torch::Tensor& sl, const torch::Tensor& ss) {
  for (const auto* t : {&pt, &pts, &desc, &s0, &sl, &ss})
    TORCH_CHECK(t->dtype() == torch::kInt32 && t->is_contiguous() && t->device().is_cpu(), "metadata: contiguous int32 on the CPU");
  TORCH_CHECK(desc.dim() == 3 && desc.size(2) == DESC_FIELDS && desc.size(0) == pts.numel(),
              "desc must be [A, keys, DESC_FIELDS], one row per pt_start entry");
  TORCH_CHECK(pool.dim() == 2 && pool.is_contiguous() &&
                  (pool.dtype() == torch::kFloat32 || pool.dtype() == torch::kBFloat16),
              "pool: contiguous fp32 or bf16 [pages, P]");
}

Meta make_meta(const torch::Tensor& pt, const torch::Tensor& pts, const torch::Tensor& desc, int64_t key) {
  TORCH_CHECK(key >= 0 && key < desc.size(1), "key out of range");
  return {pt.data_ptr<int32_t>(), pts.data_ptr<int32_t>(), desc.data_ptr<int32_t>(), desc.stride(0), key * DESC_FIELDS};
}

template <typename T>
void shrink_impl(torch::Tensor& h, const torch::Tensor& x, const torch::Tensor& pool, const Meta& meta,
                 const Plan& plan) {
  const int64_t P = pool.size(1), K = x.size(1), hs = h.stride(0), xs = x.stride(0);
  float* hp = h.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const T* pp = pool.data_ptr<T>();
  for (const Seg& s : plan.blocks) TORCH_CHECK(meta.d(s.slot)[1] <= h.size(1), "h has fewer columns than a rank");
  for_blocks(
      plan, meta,
      [&](const Seg& s, const int32_t* d, const int32_t* table) {
        if (d[1] > 0) shrink_block<T>(hp + s.start * hs, hs, xp + s.start * xs, xs, s.n, pp, P, table, d[0], d[1], K);
      },
      [&](const Seg&, const int32_t* d, const int32_t* table) {  // A's first rows (K / P pages each)
        prefetch_pages(pp, P, table + d[0], std::min<int64_t>(d[1], AHEAD_ROWS) * (K / P));
      });
}

template <typename T>
void expand_impl(torch::Tensor& y, const torch::Tensor& h, const torch::Tensor& pool, const Meta& meta,
                 const std::vector<int64_t>& cols, const std::vector<int64_t>& widths, const Plan& plan) {
  const int64_t P = pool.size(1), hs = h.stride(0), ys = y.stride(0);
  float* yp = y.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  const T* pp = pool.data_ptr<T>();
  for (const Seg& s : plan.blocks)
    for (size_t j = 0; j < widths.size(); ++j) TORCH_CHECK(meta.d(s.slot)[4 + 3 * j] <= h.size(1), "h has fewer columns than a rank");
  // slice j's Bt (rank rows of width / P pages each): the first page of every row, requested ahead
  auto first_column = [&](const int32_t* d, const int32_t* table, size_t j) {
    prefetch_pages(pp, P, table + d[2 + 3 * j], int64_t(d[4 + 3 * j] - d[3 + 3 * j]), widths[j] / P);
  };
  for_blocks(
      plan, meta,
      [&](const Seg& s, const int32_t* d, const int32_t* table) {
        for (size_t j = 0; j < widths.size(); ++j) {
          const int64_t vpage = d[2 + 3 * j], r0 = d[3 + 3 * j], r1 = d[4 + 3 * j];
          if (j + 1 < widths.size()) first_column(d, table, j + 1);
          if (r1 > r0)
            expand_block<T>(yp + s.start * ys + cols[j], ys, hp + s.start * hs, hs, s.n, pp, P, table, vpage, r0,
                            r1, widths[j]);
        }
      },
      [&](const Seg&, const int32_t* d, const int32_t* table) { first_column(d, table, 0); });
}

void check_shrink(const torch::Tensor& h, const torch::Tensor& x, const torch::Tensor& pool) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && h.dtype() == torch::kFloat32 && x.stride(1) == 1 && h.stride(1) == 1,
              "x, h: fp32 with unit column stride");
  TORCH_CHECK(x.size(1) % pool.size(1) == 0, "in_features must be a multiple of the page size");
  TORCH_CHECK(h.size(0) == x.size(0), "h and x rows differ");
}

void check_expand(const torch::Tensor& y, const torch::Tensor& h, const torch::Tensor& pool,
                  const std::vector<int64_t>& cols, const std::vector<int64_t>& widths) {
  TORCH_CHECK(y.dtype() == torch::kFloat32 && h.dtype() == torch::kFloat32 && y.stride(1) == 1 && h.stride(1) == 1,
              "y, h: fp32 with unit column stride");
  TORCH_CHECK(cols.size() == widths.size() && !widths.empty() && widths.size() <= 3, "1..3 output slices");
  for (size_t j = 0; j < widths.size(); ++j)
    TORCH_CHECK(widths[j] % pool.size(1) == 0 && cols[j] + widths[j] <= y.size(1), "slice widths/columns");
  TORCH_CHECK(h.size(0) == y.size(0), "h and y rows differ");
}

template <typename T>
void apply_impl(torch::Tensor* h, const torch::Tensor* x, torch::Tensor* y, const torch::Tensor& pool, const Meta& meta,
                const std::vector<int64_t>& cols, const std::vector<int64_t>& widths, const Plan& plan) {
  if (x != nullptr) shrink_impl<T>(*h, *x, pool, meta, plan);
  if (y != nullptr) expand_impl<T>(*y, *h, pool, meta, cols, widths, plan);
}

// Shrink into h when x is given, then expand from h into y when y is given: one plan for both.
void run(torch::Tensor* h, const torch::Tensor* x, torch::Tensor* y, const torch::Tensor& pool, const torch::Tensor& pt,
         const torch::Tensor& pts, const torch::Tensor& desc, int64_t key, const std::vector<int64_t>& cols,
         const std::vector<int64_t>& widths, const torch::Tensor& s0, const torch::Tensor& sl, const torch::Tensor& ss) {
  const Meta meta = make_meta(pt, pts, desc, key);
  const Plan plan = plan_blocks(blocks_of(s0, sl, ss, h->size(0), pts.numel()), meta);
  if (pool.dtype() == torch::kFloat32)
    apply_impl<float>(h, x, y, pool, meta, cols, widths, plan);
  else
    apply_impl<at::BFloat16>(h, x, y, pool, meta, cols, widths, plan);
}

}  // namespace

torch::Tensor lora_shrink(torch::Tensor h, torch::Tensor x, torch::Tensor pool, torch::Tensor pt, torch::Tensor pts,
                          torch::Tensor desc, int64_t key, torch::Tensor s0, torch::Tensor sl, torch::Tensor ss) {
  check_meta(pool, pt, pts, desc, s0, sl, ss);
  check_shrink(h, x, pool);
  run(&h, &x, nullptr, pool, pt, pts, desc, key, {}, {}, s0, sl, ss);
  return h;
}

torch::Tensor lora_expand(torch::Tensor y, torch::Tensor h, torch::Tensor pool, torch::Tensor pt, torch::Tensor pts,
                          torch::Tensor desc, int64_t key, std::vector<int64_t> cols, std::vector<int64_t> widths,
                          torch::Tensor s0, torch::Tensor sl, torch::Tensor ss) {
  check_meta(pool, pt, pts, desc, s0, sl, ss);
  check_expand(y, h, pool, cols, widths);
  run(&h, nullptr, &y, pool, pt, pts, desc, key, cols, widths, s0, sl, ss);
  return y;
}

// Both in one call (a Linear whose step has no DoRA adapter): y[seg, cols_j] += (x[seg] @ A.T)[:, r0:r1] @ Bt_j;
// the metadata is checked and the blocks planned once for the two.
torch::Tensor lora_apply(torch::Tensor y, torch::Tensor x, torch::Tensor pool, torch::Tensor pt, torch::Tensor pts,
                         torch::Tensor desc, int64_t key, std::vector<int64_t> cols, std::vector<int64_t> widths,
                         torch::Tensor s0, torch::Tensor sl, torch::Tensor ss, int64_t max_rank) {
  check_meta(pool, pt, pts, desc, s0, sl, ss);
  auto h = torch::empty({x.size(0), std::max<int64_t>(max_rank, 1)}, x.options().dtype(torch::kFloat32));
  check_shrink(h, x, pool);
  check_expand(y, h, pool, cols, widths);
  run(&h, &x, &y, pool, pt, pts, desc, key, cols, widths, s0, sl, ss);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("lora_shrink", &lora_shrink, py::call_guard<py::gil_scoped_release>());
  mod.def("lora_expand", &lora_expand, py::call_guard<py::gil_scoped_release>());
  mod.def("lora_apply", &lora_apply, py::call_guard<py::gil_scoped_release>());
}
