// CPU kernels for the LowRA quantized weight (built on first use by kernels/cpu_backend.py).
//
// One element of the weight is  W[rows[i], k] = table[i, code(i, k)] * absmax[rows[i], k / group_size]
// (codes packed LSB-first into int32 words, 32/b per word, 10 for b = 3; kernels/layout.py).
// The product is taken in fp32 and rounded once to the output dtype, exactly as dequantize_ref does,
// so `dequant_group` is bit-exact with the reference.
//
// The hot loop (AVX2): 8 codes per step are shifted out of one broadcast word (b = 1, 2, 4) or a
// gathered pair of words (b = 3) with one variable shift, looked up in the row's <= 16-entry fp32
// table held in two registers (vpermps; two lookups + blend for 4 bits) and scaled by the group's
// absmax. The table and the scale stay in registers, so a row is dequantized at a few instructions
// per 8 weights and the only memory traffic is the packed codes (and the output, if any).
//
// Work is split with at::parallel_for, i.e. over torch.get_num_threads() threads.
//
// The Python side (kernels/cpu_backend.py) validates shapes, dtypes and contiguity and passes raw
// data pointers (a call costs ~1 us): the module needs pybind11, ATen/Parallel.h and, for lowra::lut_linear's
// CPU kernel at the end (a dispatcher kernel: torch.compile'd graphs call it with no Python), torch/library.h —
// not <torch/extension.h>, which takes several times as long to build.

#include <pybind11/pybind11.h>
#include <ATen/Parallel.h>
#include <ATen/core/stack.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include <pthread.h>
#include <cmath>
#include <stdexcept>
#include <type_traits>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LOWRA_AVX2 1
#else
#define LOWRA_AVX2 0
#endif

namespace {

constexpr int64_t kChunk = 512;   // inputs per L1-resident block (multiple of 8 and of 40)
constexpr int64_t kTable = 16;    // table row: the 2**b values repeated (see codes8)
// Weights per thread before a second thread is used (the backward GEMV; the forward GEMV's grain is
// an argument, GEMV_GRAIN in kernels/cpu_backend.py).
constexpr int64_t kGemvGrain = int64_t(1) << 20;
constexpr int64_t kDequantGrain = int64_t(1) << 18;

template <int BITS>
constexpr int per_word() { return BITS == 3 ? 10 : 32 / BITS; }

template <int BITS>
inline int scalar_code(const int32_t* words, int64_t k) {
  constexpr int PW = per_word<BITS>();
  const uint32_t w = static_cast<uint32_t>(words[k / PW]);
  return static_cast<int>((w >> ((k % PW) * BITS)) & ((1u << BITS) - 1u));
}

#if LOWRA_AVX2
// 8 codes starting at k (k % 8 == 0) as int32 lanes, in their low BITS bits: the bits above may
// hold the next codes. vpermps reads only the low 3 bits of an index, so the tables repeat a 1- or
// 2-bit codebook across all 8 entries (kernels/cpu_backend.py) and no mask is needed; the 4-bit
// lookup moves bit 3 to the sign bit, shifting the rest out.
alignas(32) static const int32_t kShift1[4][8] = {
    {0, 1, 2, 3, 4, 5, 6, 7}, {8, 9, 10, 11, 12, 13, 14, 15},
    {16, 17, 18, 19, 20, 21, 22, 23}, {24, 25, 26, 27, 28, 29, 30, 31}};
alignas(32) static const int32_t kShift2[2][8] = {{0, 2, 4, 6, 8, 10, 12, 14}, {16, 18, 20, 22, 24, 26, 28, 30}};
alignas(32) static const int32_t kShift4[8] = {0, 4, 8, 12, 16, 20, 24, 28};

inline __m256i load8i(const int32_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }

template <int BITS>
inline __m256i codes8(const int32_t* words, int64_t k) {
  if constexpr (BITS == 1) {
    return _mm256_srlv_epi32(_mm256_set1_epi32(words[k >> 5]), load8i(kShift1[(k & 31) >> 3]));
  } else if constexpr (BITS == 2) {
    return _mm256_srlv_epi32(_mm256_set1_epi32(words[k >> 4]), load8i(kShift2[(k & 15) >> 3]));
  } else if constexpr (BITS == 4) {
    return _mm256_srlv_epi32(_mm256_set1_epi32(words[k >> 3]), load8i(kShift4));
  } else {  // 3 bits, 10 codes per word: 8 codes span at most two words; 40 codes = 4 words repeat.
    // For k % 40 = 8r: the low and high word of the 8 lanes, and which lanes take the high word.
    static constexpr int lo_word[5] = {0, 0, 1, 2, 3};
    static constexpr int hi_word[5] = {0, 1, 2, 3, 3};
    alignas(32) static const int32_t hi_lane[5][8] = {
        {0, 0, 0, 0, 0, 0, 0, 0}, {0, 0, -1, -1, -1, -1, -1, -1}, {0, 0, 0, 0, -1, -1, -1, -1},
        {0, 0, 0, 0, 0, 0, -1, -1}, {0, 0, 0, 0, 0, 0, 0, 0}};
    alignas(32) static const int32_t shf[5][8] = {
        {0, 3, 6, 9, 12, 15, 18, 21}, {24, 27, 0, 3, 6, 9, 12, 15}, {18, 21, 24, 27, 0, 3, 6, 9},
        {12, 15, 18, 21, 24, 27, 0, 3}, {6, 9, 12, 15, 18, 21, 24, 27}};
    const int r = static_cast<int>((k % 40) >> 3);
    const int32_t* base = words + (k / 40) * 4;  // both words hold real codes (k + 7 < in_features)
    const __m256i w = _mm256_blendv_epi8(
        _mm256_set1_epi32(base[lo_word[r]]), _mm256_set1_epi32(base[hi_word[r]]),
        _mm256_load_si256(reinterpret_cast<const __m256i*>(hi_lane[r])));
    return _mm256_srlv_epi32(w, load8i(shf[r]));  // 3-bit codes: vpermps reads exactly these bits
  }
}

// 32 codes starting at k as four codes8 results. For b = 1, 2, 4 the caller keeps k % 32 == 0 (row_dot: every
// group starts there when 32 | group_size), so the words and shifts are fixed: 1, 2 or 4 broadcasts and
// constant shift vectors, no per-step table index.
template <int BITS>
inline void codes32(const int32_t* words, int64_t k, __m256i* c) {
  if constexpr (BITS == 1) {
    const __m256i w = _mm256_set1_epi32(words[k >> 5]);
    for (int j = 0; j < 4; ++j) c[j] = _mm256_srlv_epi32(w, load8i(kShift1[j]));
  } else if constexpr (BITS == 2) {
    const __m256i w0 = _mm256_set1_epi32(words[k >> 4]), w1 = _mm256_set1_epi32(words[(k >> 4) + 1]);
    const __m256i s0 = load8i(kShift2[0]), s1 = load8i(kShift2[1]);
    c[0] = _mm256_srlv_epi32(w0, s0);
    c[1] = _mm256_srlv_epi32(w0, s1);
    c[2] = _mm256_srlv_epi32(w1, s0);
    c[3] = _mm256_srlv_epi32(w1, s1);
  } else if constexpr (BITS == 4) {
    const __m256i s = load8i(kShift4);
    for (int j = 0; j < 4; ++j) c[j] = _mm256_srlv_epi32(_mm256_set1_epi32(words[(k >> 3) + j]), s);
  } else {
    for (int j = 0; j < 4; ++j) c[j] = codes8<BITS>(words, k + 8 * j);
  }
}

template <int BITS>
inline __m256 lookup8(__m256i idx, __m256 tlo, __m256 thi) {
  if constexpr (BITS == 4) {
    const __m256 lo = _mm256_permutevar8x32_ps(tlo, idx);
    const __m256 hi = _mm256_permutevar8x32_ps(thi, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  } else {
    (void)thi;
    return _mm256_permutevar8x32_ps(tlo, idx);
  }
}
#endif

// dst[j] = tab[code(k0 + j)] * scale[(k0 + j) / gs], j in [0, k1 - k0): one row segment in fp32.
template <int BITS, typename S>
void deq_segment(const int32_t* words, const float* tab, const S* scale, int64_t gs, int64_t k0,
                 int64_t k1, float* dst) {
  int64_t k = k0;
#if LOWRA_AVX2
  if (gs % 8 == 0) {
    for (; k < k1 && (k & 7); ++k) dst[k - k0] = tab[scalar_code<BITS>(words, k)] * static_cast<float>(scale[k / gs]);
    const __m256 tlo = _mm256_loadu_ps(tab);
    const __m256 thi = _mm256_loadu_ps(tab + 8);
    int64_t grp = k / gs, grp_end = (grp + 1) * gs;  // one absmax group at a time, no division
    while (k + 8 <= k1) {
      const int64_t end = std::min(k1, grp_end);  // >= k + 8 since 8 | gs and 8 | k
      const __m256 s = _mm256_set1_ps(static_cast<float>(scale[grp]));
      for (; k + 8 <= end; k += 8)
        _mm256_storeu_ps(dst + (k - k0), _mm256_mul_ps(lookup8<BITS>(codes8<BITS>(words, k), tlo, thi), s));
      ++grp;
      grp_end += gs;
    }
  }
#endif
  while (k < k1) {  // tail, or every input when gs % 8 != 0 or without AVX2
    const int64_t grp = k / gs;
    const int64_t end = std::min(k1, (grp + 1) * gs);
    const float s = static_cast<float>(scale[grp]);
    for (; k < end; ++k) dst[k - k0] = tab[scalar_code<BITS>(words, k)] * s;
  }
}

// sum_k x[k] * W[k] over one row, without storing the row (the M = 1 decode case).
template <int BITS, typename S>
float row_dot(const int32_t* words, const float* tab, const S* scale, int64_t gs, int64_t K,
              const float* x) {
  int64_t k = 0;
  float s = 0.f;
#if LOWRA_AVX2
  if (gs % 8 == 0) {
    const __m256 tlo = _mm256_loadu_ps(tab);
    const __m256 thi = _mm256_loadu_ps(tab + 8);
    __m256 acc = _mm256_setzero_ps();
    const bool wide = BITS == 3 || gs % 32 == 0;  // codes32's alignment (k = group start)
    int64_t grp = 0, grp_end = gs;
    while (k + 8 <= K) {
      const int64_t end = std::min(K, grp_end);
      // sum over the group of x * table value, then * absmax. Four independent accumulators: one chain of
      // dependent FMAs made the loop latency-bound (~4 cycles per 8 weights); the sum order is fixed by
      // the group size alone, so a row's result never depends on the thread that computes it.
      __m256 p0 = _mm256_setzero_ps(), p1 = _mm256_setzero_ps(), p2 = _mm256_setzero_ps(), p3 = _mm256_setzero_ps();
      for (; wide && k + 32 <= end; k += 32) {
        __m256i c[4];
        codes32<BITS>(words, k, c);
        p0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), lookup8<BITS>(c[0], tlo, thi), p0);
        p1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), lookup8<BITS>(c[1], tlo, thi), p1);
        p2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), lookup8<BITS>(c[2], tlo, thi), p2);
        p3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), lookup8<BITS>(c[3], tlo, thi), p3);
      }
      for (; k + 8 <= end; k += 8)
        p0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), lookup8<BITS>(codes8<BITS>(words, k), tlo, thi), p0);
      const __m256 part = _mm256_add_ps(_mm256_add_ps(p0, p1), _mm256_add_ps(p2, p3));
      acc = _mm256_fmadd_ps(part, _mm256_set1_ps(static_cast<float>(scale[grp])), acc);
      ++grp;
      grp_end += gs;
    }
    alignas(32) float t[8];
    _mm256_store_ps(t, acc);
    s = ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
  }
#endif
  while (k < K) {
    const int64_t grp = k / gs;
    const int64_t end = std::min(K, (grp + 1) * gs);
    const float sc = static_cast<float>(scale[grp]);
    for (; k < end; ++k) s += x[k] * (tab[scalar_code<BITS>(words, k)] * sc);
  }
  return s;
}

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t j = 0;
  float s = 0.f;
#if LOWRA_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), a1);
  }
  for (; j + 8 <= n; j += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), a0);
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_add_ps(a0, a1));
  s = ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
#endif
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  int64_t j = 0;
#if LOWRA_AVX2
  const __m256 va = _mm256_set1_ps(alpha);
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(y + j, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j)));
#endif
  for (; j < n; ++j) y[j] += alpha * x[j];
}

struct Group {
  const int32_t* codes;
  int64_t words;         // row stride of codes
  const int64_t* rows;
  const float* table;    // [n or 1, 16]
  int64_t table_stride;  // 16, or 0 for a shared table
  const void* absmax;    // [out, G] contiguous, fp16 (as stored) or fp32 (double-quant restore)
  bool absmax_half;
  int64_t ngroups;
  int64_t gs;
  int64_t n;
  int64_t in_features;
};

Group make_group(uintptr_t codes, int64_t n, int64_t words, uintptr_t rows, uintptr_t table,
                 bool shared_table, uintptr_t absmax, bool absmax_half, int64_t ngroups, int64_t group_size,
                 int64_t in_features) {
  Group g;
  g.codes = reinterpret_cast<const int32_t*>(codes);
  g.words = words;
  g.rows = reinterpret_cast<const int64_t*>(rows);
  g.table = reinterpret_cast<const float*>(table);
  g.table_stride = shared_table ? 0 : kTable;
  g.absmax = reinterpret_cast<const void*>(absmax);
  g.absmax_half = absmax_half;
  g.ngroups = ngroups;
  g.gs = group_size;
  g.n = n;
  g.in_features = in_features;
  return g;
}

template <int BITS>
inline void deq_row(const Group& g, int64_t i, int64_t k0, int64_t k1, float* dst) {
  const int32_t* words = g.codes + i * g.words;
  const float* tab = g.table + i * g.table_stride;
  const int64_t off = g.rows[i] * g.ngroups;
  if (g.absmax_half)
    deq_segment<BITS>(words, tab, static_cast<const c10::Half*>(g.absmax) + off, g.gs, k0, k1, dst);
  else
    deq_segment<BITS>(words, tab, static_cast<const float*>(g.absmax) + off, g.gs, k0, k1, dst);
}

template <int BITS>
inline float row_dot_group(const Group& g, int64_t i, const float* x) {
  const int32_t* words = g.codes + i * g.words;
  const float* tab = g.table + i * g.table_stride;
  const int64_t off = g.rows[i] * g.ngroups;
  if (g.absmax_half)
    return row_dot<BITS>(words, tab, static_cast<const c10::Half*>(g.absmax) + off, g.gs, g.in_features, x);
  return row_dot<BITS>(words, tab, static_cast<const float*>(g.absmax) + off, g.gs, g.in_features, x);
}

template <int BITS, typename T>
void dequant_to(const Group& g, T* o, int64_t s0, int64_t s1) {
  const int64_t K = g.in_features;
  const int64_t grain = std::max<int64_t>(1, kDequantGrain / std::max<int64_t>(K, 1));
  at::parallel_for(0, g.n, grain, [&](int64_t b, int64_t e) {
    if constexpr (std::is_same_v<T, float>) {
      if (s1 == 1) {
        for (int64_t i = b; i < e; ++i) deq_row<BITS>(g, i, 0, K, o + g.rows[i] * s0);
        return;
      }
    }
    std::vector<float> buf(K);
    for (int64_t i = b; i < e; ++i) {
      deq_row<BITS>(g, i, 0, K, buf.data());
      T* dst = o + g.rows[i] * s0;
      for (int64_t k = 0; k < K; ++k) dst[k * s1] = static_cast<T>(buf[k]);  // round once
    }
  });
}

// dtype: 0 fp32, 1 fp16, 2 bf16, 3 fp64 (element strides s0, s1)
template <int BITS>
void dequant_impl(const Group& g, uintptr_t out, int64_t dtype, int64_t s0, int64_t s1) {
  switch (dtype) {
    case 0: dequant_to<BITS>(g, reinterpret_cast<float*>(out), s0, s1); break;
    case 1: dequant_to<BITS>(g, reinterpret_cast<c10::Half*>(out), s0, s1); break;
    case 2: dequant_to<BITS>(g, reinterpret_cast<c10::BFloat16*>(out), s0, s1); break;
    case 3: dequant_to<BITS>(g, reinterpret_cast<double*>(out), s0, s1); break;
    default: throw std::invalid_argument("unsupported output dtype code");
  }
}

// y[m, rows[i]] = sum_k x[m, k] * W[i, k]  (x fp32 [M, K] contiguous, y fp32 [M, out] contiguous)
template <int BITS>
void gemv_impl(const Group& g, const float* x, int64_t M, float* y, int64_t out_features, int64_t grain_weights) {
  const int64_t K = g.in_features;
  const int64_t grain = std::max<int64_t>(1, grain_weights / std::max<int64_t>(K, 1));
  at::parallel_for(0, g.n, grain, [&](int64_t b, int64_t e) {
    alignas(32) float buf[kChunk];
    float acc[16];
    for (int64_t i = b; i < e; ++i) {
      if (M == 1) {
        y[g.rows[i]] = row_dot_group<BITS>(g, i, x);
        continue;
      }
      for (int64_t m = 0; m < M; ++m) acc[m] = 0.f;
      for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
        const int64_t k1 = std::min(K, k0 + kChunk);
        deq_row<BITS>(g, i, k0, k1, buf);
        for (int64_t m = 0; m < M; ++m) acc[m] += dot(x + m * K + k0, buf, k1 - k0);
      }
      const int64_t r = g.rows[i];
      for (int64_t m = 0; m < M; ++m) y[m * out_features + r] = acc[m];
    }
  });
}

// gx[m, k] += sum_i gy[m, rows[i]] * W[i, k]  (gy fp32 [M, out], gx fp32 [M, K]); split over k.
template <int BITS>
void gemv_t_impl(const Group& g, const float* gy, int64_t M, int64_t out_features, float* gx) {
  const int64_t K = g.in_features;
  const int64_t nchunks = (K + kChunk - 1) / kChunk;
  const int64_t grain = std::max<int64_t>(1, kGemvGrain / std::max<int64_t>(g.n * kChunk, 1));
  at::parallel_for(0, nchunks, grain, [&](int64_t b, int64_t e) {
    alignas(32) float buf[kChunk];
    for (int64_t c = b; c < e; ++c) {
      const int64_t k0 = c * kChunk, k1 = std::min(K, k0 + kChunk);
      for (int64_t i = 0; i < g.n; ++i) {
        deq_row<BITS>(g, i, k0, k1, buf);
        const int64_t r = g.rows[i];
        for (int64_t m = 0; m < M; ++m) {
          const float a = gy[m * out_features + r];
          if (a != 0.f) axpy(a, buf, gx + m * K + k0, k1 - k0);
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------ layer plan
// A whole quantized layer (every stored width) for the fused forward GEMV, built once per weight: the
// groups and, per output row, which group and which stored row hold it. One call computes every output
// row in ONE parallel region split over contiguous output rows — one fork/join per layer instead of one
// per width, and no two threads write the same cache line of y except at a chunk boundary (splitting a
// width's stored rows instead interleaves the threads' writes over y when widths are mixed).
struct LayerPlan {
  std::vector<Group> groups;
  std::vector<int32_t> bits;       // per group
  std::vector<int32_t> row_group;  // per output row: its group, or -1 (row of no group: written as 0)
  std::vector<int64_t> row_index;  // per output row: its stored row in that group
  int64_t in_features = 0;
  int64_t out_features = 0;
};

template <int BITS>
inline void row_out(const Group& g, int64_t i, const float* x, int64_t M, float* y, int64_t out_features,
                    int64_t r) {
  if (M == 1) {
    y[r] = row_dot_group<BITS>(g, i, x);
    return;
  }
  const int64_t K = g.in_features;
  alignas(32) float buf[kChunk];
  float acc[16];
  for (int64_t m = 0; m < M; ++m) acc[m] = 0.f;
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t k1 = std::min(K, k0 + kChunk);
    deq_row<BITS>(g, i, k0, k1, buf);
    for (int64_t m = 0; m < M; ++m) acc[m] += dot(x + m * K + k0, buf, k1 - k0);
  }
  for (int64_t m = 0; m < M; ++m) y[m * out_features + r] = acc[m];
}

// ------------------------------------------------------------------------------------ claiming pool
// The forward GEMV's threads. at::parallel_for (an OpenMP parallel region) ends in a barrier that waits for
// every thread of the team: when the machine is oversubscribed and a worker is descheduled, each region waits
// a scheduler time slice for it (measured: ~8 ms per call at 2 threads under load 3, 100x the work). Here the
// caller publishes a task of row chunks and claims chunks itself; helper threads claim chunks when they run.
// The caller waits only for chunks a helper has claimed and not finished, never for a helper that has not
// started: at worst a call costs the one-thread time. Each chunk (so each output row) is computed by exactly
// one thread with the same code, so results are bitwise independent of the thread count and of who ran what.
// One task at a time: a concurrent caller (another Python thread) runs its chunks inline.
class ClaimPool {
 public:
  static ClaimPool& get() {
    // never destroyed: helpers are detached and blocked at exit. A forked child (no helpers, a mutex perhaps
    // held by one at the fork) gets a fresh pool.
    static std::once_flag once;
    std::call_once(once, [] {
      instance() = new ClaimPool();
      pthread_atfork(nullptr, nullptr, [] { instance() = new ClaimPool(); });
    });
    return *instance();
  }

  // f(c) for every c in [0, n) on the caller and up to `helpers` pool threads.
  template <typename F>
  void run(int64_t n, int helpers, const F& f) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (helpers <= 0 || n <= 1 || !busy.owns_lock()) {
      for (int64_t c = 0; c < n; ++c) f(c);
      return;
    }
    ensure(helpers);
    auto task = std::make_shared<Task>();
    task->n = n;
    task->max_helpers = helpers;
    task->fn = [&f](int64_t c) { f(c); };
    {
      std::lock_guard<std::mutex> lock(mu_);
      current_ = task;
      ++epoch_;
    }
    if (sleeping_.load(std::memory_order_acquire) > 0) cv_.notify_all();
    work(*task);
    // every chunk is claimed now; wait for the ones helpers are still computing
    for (int spins = 0; task->done.load(std::memory_order_acquire) < n; ++spins) {
      if (spins < 4096) {
        pause();
      } else {
        std::this_thread::yield();
      }
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (current_ == task) current_.reset();
  }

 private:
  static ClaimPool*& instance() {
    static ClaimPool* pool = nullptr;
    return pool;
  }

  struct Task {
    std::atomic<int64_t> next{0}, done{0};
    std::atomic<int> joined{0};
    int64_t n = 0;
    int max_helpers = 0;
    std::function<void(int64_t)> fn;  // valid while done < n: a chunk is claimed only before that
  };

  static void pause() {
#if LOWRA_AVX2
    _mm_pause();
#endif
  }

  static void work(Task& t) {
    for (int64_t c; (c = t.next.fetch_add(1, std::memory_order_relaxed)) < t.n;) {
      t.fn(c);
      t.done.fetch_add(1, std::memory_order_release);
    }
  }

  void ensure(int helpers) {
    std::lock_guard<std::mutex> lock(mu_);
    while (static_cast<int>(threads_) < helpers) {
      std::thread(&ClaimPool::loop, this).detach();
      ++threads_;
    }
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Task> task;
      for (int spins = 0;; ++spins) {  // spin ~tens of us for the next task (a decode step's next layer), then sleep
        if (epoch_.load(std::memory_order_acquire) != seen) {
          std::lock_guard<std::mutex> lock(mu_);
          seen = epoch_.load(std::memory_order_relaxed);
          task = current_;
          break;
        }
        if (spins < 8000) {
          pause();
          continue;
        }
        std::unique_lock<std::mutex> lock(mu_);
        sleeping_.fetch_add(1, std::memory_order_acq_rel);
        cv_.wait(lock, [&] { return epoch_.load(std::memory_order_relaxed) != seen; });
        sleeping_.fetch_sub(1, std::memory_order_acq_rel);
        seen = epoch_.load(std::memory_order_relaxed);
        task = current_;
        break;
      }
      if (task && task->joined.fetch_add(1, std::memory_order_relaxed) < task->max_helpers) work(*task);
    }
  }

  std::mutex busy_;  // held by the caller of the task in flight
  std::mutex mu_;    // guards current_, and the helpers' sleep
  std::condition_variable cv_;
  std::shared_ptr<Task> current_;
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> sleeping_{0};
  size_t threads_ = 0;
};

bool g_claim_pool = true;  // set_claim_pool: the forward GEMV's threads from the ClaimPool (else at::parallel_for)

// y[m, r] = sum_k x[m, k] W[r, k] for every output row r (x fp32 [M, K], y fp32 [M, out], contiguous).
// Threads: min(torch.get_num_threads(), weights / grain_weights), over row chunks of the ClaimPool.
void layer_gemv_impl(const LayerPlan& p, const float* x, int64_t M, float* y, int64_t grain_weights) {
  const int64_t K = p.in_features, O = p.out_features;
  const auto rows_out = [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int32_t gi = p.row_group[r];
      if (gi < 0) {
        for (int64_t m = 0; m < M; ++m) y[m * O + r] = 0.f;
        continue;
      }
      const Group& g = p.groups[gi];
      const int64_t i = p.row_index[r];
      switch (p.bits[gi]) {
        case 1: row_out<1>(g, i, x, M, y, O, r); break;
        case 2: row_out<2>(g, i, x, M, y, O, r); break;
        case 3: row_out<3>(g, i, x, M, y, O, r); break;
        default: row_out<4>(g, i, x, M, y, O, r); break;
      }
    }
  };
  if (!g_claim_pool) {  // OpenMP (at::parallel_for), as before the pool
    at::parallel_for(0, O, std::max<int64_t>(1, grain_weights / std::max<int64_t>(K, 1)), rows_out);
    return;
  }
  const int64_t want =
      std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, O * K / std::max<int64_t>(grain_weights, 1)));
  const int64_t rows = want <= 1 ? O : std::max<int64_t>(8, (O + 8 * want - 1) / (8 * want));  // ~8 chunks a thread
  ClaimPool::get().run((O + rows - 1) / rows, static_cast<int>(want - 1),
                       [&](int64_t c) { rows_out(c * rows, std::min(O, c * rows + rows)); });
}

// The codebook / scale gradient of one bit group from rows of G = dL/dW (fp32): stored rows [i0, i1)
// of the group, stored row i's G row at gw + (i - i0) * ld (original row r = rows[i]). Per row and
// absmax group q: loc[c] = sum over the group's inputs with code c of G[r, k]; then
//   gcb[i, c] += absmax[r, q] * loc[c]            (dL/dcodebook: the per-row segment sum)
//   ga[r, q]   = sum_c table[i, c] * loc[c]       (dL/dabsmax: sum_k G[r, k] * cb[i, code])
// one pass over the codes for both (gcb [n, 2**b] per stored row, also for a shared table: the caller
// sums it; either output may be null). Rows are split over threads; each row is written by one.
template <int BITS, typename S>
void table_grad_row(const int32_t* words, const float* tab, const S* scale, int64_t gs, int64_t K,
                    const float* grow, float* gcb, float* ga) {
  constexpr int NC = 1 << BITS;
  for (int64_t k0 = 0, q = 0; k0 < K; k0 += gs, ++q) {
    const int64_t k1 = std::min(K, k0 + gs);
    float loc[NC] = {};
    for (int64_t k = k0; k < k1; ++k) loc[scalar_code<BITS>(words, k)] += grow[k];
    if (gcb) {
      const float s = static_cast<float>(scale[q]);
      for (int c = 0; c < NC; ++c) gcb[c] += s * loc[c];
    }
    if (ga) {
      float t = 0.f;
      for (int c = 0; c < NC; ++c) t += tab[c] * loc[c];
      ga[q] = t;
    }
  }
}

template <int BITS>
void table_grad_impl(const Group& g, const float* gw, int64_t i0, int64_t i1, int64_t ld, float* gcb, float* ga) {
  constexpr int NC = 1 << BITS;
  const int64_t K = g.in_features;
  const int64_t grain = std::max<int64_t>(1, kDequantGrain / std::max<int64_t>(K, 1));
  at::parallel_for(i0, i1, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t r = g.rows[i];
      const int32_t* words = g.codes + i * g.words;
      const float* tab = g.table + i * g.table_stride;
      const float* grow = gw + (i - i0) * ld;
      float* gc = gcb ? gcb + i * NC : nullptr;
      float* gq = ga ? ga + r * g.ngroups : nullptr;
      const int64_t off = r * g.ngroups;
      if (g.absmax_half)
        table_grad_row<BITS>(words, tab, static_cast<const c10::Half*>(g.absmax) + off, g.gs, K, grow, gc, gq);
      else
        table_grad_row<BITS>(words, tab, static_cast<const float*>(g.absmax) + off, g.gs, K, grow, gc, gq);
    }
  });
}

template <template <int> class F, typename... Args>
void by_bits(int64_t bits, Args&&... args) {
  switch (bits) {
    case 1: F<1>::run(std::forward<Args>(args)...); break;
    case 2: F<2>::run(std::forward<Args>(args)...); break;
    case 3: F<3>::run(std::forward<Args>(args)...); break;
    case 4: F<4>::run(std::forward<Args>(args)...); break;
    default: throw std::invalid_argument("bit-width must be 1, 2, 3 or 4");
  }
}

template <int B> struct DequantF {
  static void run(const Group& g, uintptr_t out, int64_t dtype, int64_t s0, int64_t s1) {
    dequant_impl<B>(g, out, dtype, s0, s1);
  }
};
template <int B> struct GemvF {
  static void run(const Group& g, const float* x, int64_t M, float* y, int64_t o, int64_t grain) {
    gemv_impl<B>(g, x, M, y, o, grain);
  }
};
template <int B> struct GemvTF {
  static void run(const Group& g, const float* gy, int64_t M, int64_t o, float* gx) { gemv_t_impl<B>(g, gy, M, o, gx); }
};

template <int B> struct TableGradF {
  static void run(const Group& g, const float* gw, int64_t i0, int64_t i1, int64_t ld, float* gcb, float* ga) {
    table_grad_impl<B>(g, gw, i0, i1, ld, gcb, ga);
  }
};

}  // namespace

namespace py = pybind11;

// Group arguments (validated by kernels/cpu_backend.py): codes int32 [n, words] contiguous, rows
// int64 [n], table fp32 [n or 1, 16] contiguous (shared_table when 1 row), absmax fp16 or fp32 [out, ngroups]
// contiguous, bits, group_size, in_features.
#define LOWRA_GROUP_ARGS                                                                             \
  uintptr_t codes, int64_t n, int64_t words, uintptr_t rows, uintptr_t table, bool shared_table,     \
      uintptr_t absmax, bool absmax_half, int64_t ngroups, int64_t bits, int64_t group_size, int64_t in_features
#define LOWRA_GROUP make_group(codes, n, words, rows, table, shared_table, absmax, absmax_half, ngroups, group_size, in_features)

void dequant_group(LOWRA_GROUP_ARGS, uintptr_t out, int64_t dtype, int64_t s0, int64_t s1) {
  if (n == 0) return;
  by_bits<DequantF>(bits, LOWRA_GROUP, out, dtype, s0, s1);
}

// x fp32 [M, in_features] contiguous (M <= 16), y fp32 [M, out_features] contiguous; rows are split over
// threads in blocks of at least `grain` weights.
void gemv_group(LOWRA_GROUP_ARGS, uintptr_t x, int64_t M, uintptr_t y, int64_t out_features, int64_t grain) {
  if (n == 0 || M == 0) return;
  if (M > 16) throw std::invalid_argument("the fused GEMV takes M <= 16 rows");
  by_bits<GemvF>(bits, LOWRA_GROUP, reinterpret_cast<const float*>(x), M, reinterpret_cast<float*>(y),
                 out_features, grain);
}

// gy fp32 [M, out_features] contiguous, gx fp32 [M, in_features] contiguous (accumulated into).
void gemv_t_group(LOWRA_GROUP_ARGS, uintptr_t gy, int64_t M, int64_t out_features, uintptr_t gx) {
  if (n == 0 || M == 0) return;
  by_bits<GemvTF>(bits, LOWRA_GROUP, reinterpret_cast<const float*>(gy), M, out_features,
                  reinterpret_cast<float*>(gx));
}

// gw fp32 [i1 - i0, >= in_features] (row stride ld): the dL/dW rows of stored rows [i0, i1) of the group;
// gcb fp32 [n, 2**bits] contiguous (accumulated into) or 0; ga fp32 [out, ngroups] contiguous (the
// group's rows written) or 0.
void table_grad_group(LOWRA_GROUP_ARGS, uintptr_t gw, int64_t i0, int64_t i1, int64_t ld, uintptr_t gcb,
                      uintptr_t ga) {
  if (i0 < 0 || i1 > n || i0 > i1) throw std::invalid_argument("stored row range out of bounds");
  if (i0 == i1) return;
  by_bits<TableGradF>(bits, LOWRA_GROUP, reinterpret_cast<const float*>(gw), i0, i1, ld,
                      reinterpret_cast<float*>(gcb), reinterpret_cast<float*>(ga));
}

// p[o] = sum_m a[m, o] * b[m, o] for fp32 a, b [M, out] contiguous (double accumulators): the
// per-row dot of grad_y and the output the 1-bit codebook gradient needs, in one pass over both.
void col_dot(uintptr_t a_, uintptr_t b_, int64_t M, int64_t out_features, uintptr_t p_) {
  const float* a = reinterpret_cast<const float*>(a_);
  const float* b = reinterpret_cast<const float*>(b_);
  double* p = reinterpret_cast<double*>(p_);
  at::parallel_for(0, out_features, 256, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) p[o] = 0.0;
    for (int64_t m = 0; m < M; ++m) {
      const float* am = a + m * out_features;
      const float* bm = b + m * out_features;
      for (int64_t o = o0; o < o1; ++o) p[o] += static_cast<double>(am[o]) * static_cast<double>(bm[o]);
    }
  });
}

// The codebook gradient of 1-bit rows in closed form (kernels/codebook_grad.py, one_bit_codebook_grad):
// for stored row i (r = rows[i]) with entries cb0, cb1 (fp16 or fp32 [n or 1, 2], row stride cb_stride)
//   g1 = (p[r] - cb0 q[r]) / (cb1 - cb0),  g0 = q[r] - g1     (p, q fp64 [out])
// written to g fp32 [n, 2]; a row with ratio * |cb1 - cb0| <= max(|cb0|, |cb1|) gets zeros and
// bad[i] = 1 (the caller computes it the exact way). Returns the number of such rows.
int64_t one_bit_grad(int64_t n, uintptr_t rows_, uintptr_t cb_, bool cb_half, int64_t cb_stride, uintptr_t p_,
                     uintptr_t q_, double ratio, uintptr_t g_, uintptr_t bad_) {
  const int64_t* rows = reinterpret_cast<const int64_t*>(rows_);
  const double* p = reinterpret_cast<const double*>(p_);
  const double* q = reinterpret_cast<const double*>(q_);
  float* g = reinterpret_cast<float*>(g_);
  uint8_t* bad = reinterpret_cast<uint8_t*>(bad_);
  int64_t nbad = 0;
  for (int64_t i = 0; i < n; ++i) {
    double c0, c1;
    if (cb_half) {
      const c10::Half* c = reinterpret_cast<const c10::Half*>(cb_) + i * cb_stride;
      c0 = static_cast<float>(c[0]);
      c1 = static_cast<float>(c[1]);
    } else {
      const float* c = reinterpret_cast<const float*>(cb_) + i * cb_stride;
      c0 = c[0];
      c1 = c[1];
    }
    const double d = c1 - c0;
    const int64_t r = rows[i];
    if (!(ratio * std::abs(d) > std::max(std::abs(c0), std::abs(c1)))) {
      g[2 * i] = g[2 * i + 1] = 0.f;
      bad[i] = 1;
      ++nbad;
      continue;
    }
    bad[i] = 0;
    const double g1 = (p[r] - c0 * q[r]) / d;
    g[2 * i] = static_cast<float>(q[r] - g1);
    g[2 * i + 1] = static_cast<float>(g1);
  }
  return nbad;
}

// y[m, o] += scaling * sum_r B[o, r] * (sum_k A[r, k] x[m, k]) + bias[o] for M <= 16 rows of fp32 x
// [M, K], A [rank, K], B [out, rank] (all contiguous; bias may be 0): a LoRA branch (and bias) added to
// a fused GEMV's output in the same call, so a decode step does not pay 4-5 small ATen ops per layer.
void lora_add(uintptr_t x_, int64_t M, int64_t K, uintptr_t a_, uintptr_t b_, int64_t rank, double scaling,
              uintptr_t bias_, uintptr_t y_, int64_t out_features) {
  if (M > 16 || rank > 1024) throw std::invalid_argument("lora_add takes M <= 16 rows and rank <= 1024");
  const float* x = reinterpret_cast<const float*>(x_);
  const float* a = reinterpret_cast<const float*>(a_);
  const float* b = reinterpret_cast<const float*>(b_);
  const float* bias = reinterpret_cast<const float*>(bias_);
  float* y = reinterpret_cast<float*>(y_);
  std::vector<float> t(static_cast<size_t>(M * rank));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < rank; ++r) t[m * rank + r] = dot(a + r * K, x + m * K, K);
  const float s = static_cast<float>(scaling);
  for (int64_t m = 0; m < M; ++m) {
    float* ym = y + m * out_features;
    const float* tm = t.data() + m * rank;
    for (int64_t o = 0; o < out_features; ++o) {
      const float u = rank ? dot(b + o * rank, tm, rank) : 0.f;
      ym[o] += s * u + (bias ? bias[o] : 0.f);
    }
  }
}

// A layer plan from each width's group arguments (tuples of LOWRA_GROUP_ARGS, validated by
// kernels/cpu_backend.py; the tensors they point into are kept alive by the caller with the plan).
LayerPlan make_layer(const py::list& group_args, int64_t out_features) {
  LayerPlan p;
  p.out_features = out_features;
  p.row_group.assign(static_cast<size_t>(out_features), -1);
  p.row_index.assign(static_cast<size_t>(out_features), 0);
  for (const auto& item : group_args) {
    const py::tuple t = py::reinterpret_borrow<py::tuple>(item);
    if (t.size() != 12) throw std::invalid_argument("a group takes 12 arguments");
    const int64_t n = t[1].cast<int64_t>(), bits = t[9].cast<int64_t>();
    if (bits < 1 || bits > 4) throw std::invalid_argument("bit-width must be 1, 2, 3 or 4");
    Group g = make_group(t[0].cast<uintptr_t>(), n, t[2].cast<int64_t>(), t[3].cast<uintptr_t>(),
                         t[4].cast<uintptr_t>(), t[5].cast<bool>(), t[6].cast<uintptr_t>(), t[7].cast<bool>(),
                         t[8].cast<int64_t>(), t[10].cast<int64_t>(), t[11].cast<int64_t>());
    if (!p.groups.empty() && g.in_features != p.in_features)
      throw std::invalid_argument("every group of a layer has the same in_features");
    p.in_features = g.in_features;
    const int32_t gi = static_cast<int32_t>(p.groups.size());
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = g.rows[i];
      if (r < 0 || r >= out_features) throw std::invalid_argument("a stored row lies outside the output");
      p.row_group[r] = gi;
      p.row_index[r] = i;
    }
    p.groups.push_back(g);
    p.bits.push_back(static_cast<int32_t>(bits));
  }
  return p;
}

// The fused forward of a whole layer: y = x W^T over every width in one parallel region.
void layer_gemv(const LayerPlan& p, uintptr_t x, int64_t M, uintptr_t y, int64_t grain) {
  if (M == 0 || p.out_features == 0) return;
  if (M > 16) throw std::invalid_argument("the fused GEMV takes M <= 16 rows");
  layer_gemv_impl(p, reinterpret_cast<const float*>(x), M, reinterpret_cast<float*>(y), grain);
}

bool has_avx2() { return LOWRA_AVX2 != 0; }

// ------------------------------------------------------------------------ lowra::lut_linear's CPU kernel
// The op (schema, fake and autograd: kernels/lut_linear.py) gets this C++ kernel for CPU tensors, so a
// torch.compile'd graph runs a layer with no Python in the call: the kernel reads the op's own arguments
// (weight = [codes…, rows…, codebooks…, absmax], meta = [group_size, in_features, bits…]), builds the
// layer's plan in thread-local scratch (the fp32 lookup tables, int64 rows, the row map: a few µs for a
// 1536-row layer, no Python cache lookup) and runs the same layer_gemv_impl + lora_add as the eager path
// (lut_lora_gemv_cpu), so both give the same bits. What it does not take (another backend, M > 16, non-fp32
// x or adapters, any shape or dtype it does not expect) goes to lowra::lut_linear_cpu_fallback, the op's
// Python implementation, which raises the eager path's errors.
static int64_t g_op_grain = int64_t(1) << 16;  // GEMV_GRAIN (kernels/cpu_backend.py) at install time
static c10::OperatorHandle* g_fallback = nullptr;
static bool g_no_launch = false;  // stubbed_launches (kernels/cpu_backend.py): the host path without the work

struct Scratch {
  std::vector<float> tables;
  std::vector<int64_t> rows;
};

// n codebook rows (2**bits entries each, fp16 or fp32) as the extension's fp32 tables: each row repeated to
// kTable values (cpu_backend.py's _table: the same fp32 values).
template <typename T>
static void fill_tables(const T* cb, int64_t n, int64_t bits, float* dst) {
  const int64_t e = int64_t(1) << bits;
#if LOWRA_AVX2
  if constexpr (std::is_same_v<T, c10::Half>) {
    const auto* h = reinterpret_cast<const uint16_t*>(cb);
    for (int64_t i = 0; i < n; ++i, h += e, dst += kTable) {
      __m256 v;
      if (e >= 8) {
        v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
        _mm256_storeu_ps(dst, v);
        _mm256_storeu_ps(dst + 8, e == 16 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + 8))) : v);
        continue;
      }
      int64_t bits4 = 0;  // the row's 2 or 4 halves, repeated to 4
      std::memcpy(&bits4, h, static_cast<size_t>(2 * e));
      if (e == 2) bits4 = (bits4 & 0xffffffff) | (bits4 << 32);
      const __m128 q = _mm_cvtph_ps(_mm_cvtsi64_si128(bits4));
      v = _mm256_set_m128(q, q);
      _mm256_storeu_ps(dst, v);
      _mm256_storeu_ps(dst + 8, v);
    }
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i, cb += e, dst += kTable) {
    for (int64_t j = 0; j < e; ++j) dst[j] = static_cast<float>(cb[j]);
    for (int64_t j = e; j < kTable; ++j) dst[j] = dst[j - e];
  }
}

// The plan of `weight` for in_features K, or false when the arguments are not what the fast path reads.
static bool plan_from_tensors(const std::vector<at::Tensor>& w, const std::vector<int64_t>& meta, LayerPlan& p,
                       Scratch& sc) {
  const int64_t nw = static_cast<int64_t>(meta.size()) - 2;
  if (nw < 1 || static_cast<int64_t>(w.size()) != 3 * nw + 1) return false;
  const int64_t gs = meta[0], K = meta[1];
  if (gs < 1 || K < 1) return false;
  const at::Tensor& absmax = w[3 * nw];
  if (absmax.dim() != 2 || !absmax.is_contiguous() || absmax.device().type() != c10::DeviceType::CPU ||
      absmax.size(1) != (K + gs - 1) / gs)
    return false;
  const bool half = absmax.scalar_type() == at::kHalf;
  if (!half && absmax.scalar_type() != at::kFloat) return false;
  const int64_t O = absmax.size(0);
  int64_t total = 0, tab_rows = 0;
  for (int64_t j = 0; j < nw; ++j) {
    const at::Tensor &codes = w[j], &rows = w[nw + j], &cb = w[2 * nw + j];
    const int64_t b = meta[2 + j];
    if (b < 1 || b > 4) return false;
    const int64_t per = b == 3 ? 10 : 32 / b, n = codes.dim() == 2 ? codes.size(0) : -1;
    if (n < 0 || codes.scalar_type() != at::kInt || !codes.is_contiguous() || codes.size(1) != (K + per - 1) / per ||
        rows.dim() != 1 || rows.size(0) != n || !rows.is_contiguous() ||
        (rows.scalar_type() != at::kInt && rows.scalar_type() != at::kLong) || cb.dim() != 2 ||
        cb.size(1) != (int64_t(1) << b) || (cb.size(0) != 1 && cb.size(0) != n) || !cb.is_contiguous() ||
        (cb.scalar_type() != at::kHalf && cb.scalar_type() != at::kFloat) ||
        codes.device().type() != c10::DeviceType::CPU || rows.device().type() != c10::DeviceType::CPU ||
        cb.device().type() != c10::DeviceType::CPU)
      return false;
    total += n;
    tab_rows += cb.size(0);
  }
  sc.tables.resize(static_cast<size_t>(tab_rows * kTable));
  sc.rows.resize(static_cast<size_t>(total));
  p.groups.clear();
  p.bits.clear();
  p.in_features = K;
  p.out_features = O;
  p.row_group.assign(static_cast<size_t>(O), -1);
  p.row_index.assign(static_cast<size_t>(O), 0);
  int64_t row0 = 0, tab0 = 0;
  for (int64_t j = 0; j < nw; ++j) {
    const at::Tensor &codes = w[j], &rows = w[nw + j], &cb = w[2 * nw + j];
    const int64_t b = meta[2 + j], n = codes.size(0);
    int64_t* r64 = sc.rows.data() + row0;
    const int32_t* r32 = rows.scalar_type() == at::kInt ? rows.data_ptr<int32_t>() : nullptr;
    const int64_t* rl = r32 ? nullptr : rows.data_ptr<int64_t>();
    int32_t* rg = p.row_group.data();
    int64_t* ri = p.row_index.data();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = r32 ? r32[i] : rl[i];
      if (r < 0 || r >= O) return false;
      r64[i] = r;
      rg[r] = static_cast<int32_t>(j);
      ri[r] = i;
    }
    float* tab = sc.tables.data() + tab0 * kTable;
    if (cb.scalar_type() == at::kHalf)
      fill_tables(cb.data_ptr<c10::Half>(), cb.size(0), b, tab);
    else
      fill_tables(cb.data_ptr<float>(), cb.size(0), b, tab);
    p.groups.push_back(make_group(reinterpret_cast<uintptr_t>(codes.data_ptr<int32_t>()), n, codes.size(1),
                                  reinterpret_cast<uintptr_t>(r64), reinterpret_cast<uintptr_t>(tab), cb.size(0) == 1,
                                  reinterpret_cast<uintptr_t>(absmax.data_ptr()), half, absmax.size(1), gs, K));
    p.bits.push_back(static_cast<int32_t>(b));
    row0 += n;
    tab0 += cb.size(0);
  }
  return true;
}

static bool fp32_vector_arg(const c10::IValue& v, int64_t d0, int64_t d1) {  // None, or fp32 contiguous [d0(, d1)]
  if (v.isNone()) return true;
  const at::Tensor& t = v.toTensor();
  if (t.scalar_type() != at::kFloat || !t.is_contiguous() || t.device().type() != c10::DeviceType::CPU) return false;
  return d1 < 0 ? (t.dim() == 1 && t.size(0) == d0) : (t.dim() == 2 && t.size(0) == d0 && t.size(1) == d1);
}

// Boxed: x, weight, lora_A, lora_B, bias, meta, scaling, backend -> y.
static void lut_linear_cpu_kernel(const c10::OperatorHandle& /*op*/, torch::jit::Stack* stack) {
  thread_local LayerPlan plan;
  thread_local Scratch scratch;
  auto args = torch::jit::last(*stack, 8);
  const at::Tensor& x = args[0].toTensor();
  const std::string& backend = args[7].toStringRef();
  std::vector<int64_t> meta;
  bool ints = true;  // meta holds plain ints (symbolic ones take the fallback)
  for (const c10::IValue& v : args[5].toListRef()) {
    ints = ints && v.isInt();
    meta.push_back(v.isInt() ? v.toInt() : 0);
  }
  std::vector<at::Tensor> weight;
  for (const c10::IValue& v : args[1].toListRef()) weight.push_back(v.toTensor());
  const int64_t K = meta.size() >= 2 ? meta[1] : -1;
  const int64_t M = K > 0 && x.dim() >= 1 && x.size(-1) == K ? x.numel() / K : 0;
  bool fast = ints && (backend == "auto" || backend == "cpu") && x.scalar_type() == at::kFloat && M >= 1 && M <= 16 &&
              plan_from_tensors(weight, meta, plan, scratch);
  const int64_t O = fast ? plan.out_features : 0;
  const bool has_a = !args[2].isNone(), has_b = !args[3].isNone();
  const int64_t rank = has_a && args[2].toTensor().dim() == 2 ? args[2].toTensor().size(0) : 0;
  fast = fast && has_a == has_b && (!has_a || rank > 0) && fp32_vector_arg(args[2], rank, K) &&
         fp32_vector_arg(args[3], O, rank) &&
         fp32_vector_arg(args[4], O, -1) && rank <= 1024;
  if (!fast) {
    if (g_fallback == nullptr) throw std::runtime_error("lowra::lut_linear_cpu_fallback is not registered");
    g_fallback->callBoxed(stack);
    return;
  }
  const at::Tensor xc = x.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = O;
  at::Tensor y = at::empty(shape, x.options());
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (!g_no_launch) layer_gemv_impl(plan, xp, M, yp, g_op_grain);
  if (!g_no_launch && (rank || !args[4].isNone())) {
    const double scaling = args[6].toDouble();
    lora_add(reinterpret_cast<uintptr_t>(xp), M, K, rank ? reinterpret_cast<uintptr_t>(args[2].toTensor().data_ptr()) : 0,
             rank ? reinterpret_cast<uintptr_t>(args[3].toTensor().data_ptr()) : 0, rank, scaling,
             args[4].isNone() ? 0 : reinterpret_cast<uintptr_t>(args[4].toTensor().data_ptr()),
             reinterpret_cast<uintptr_t>(yp), O);
  }
  torch::jit::drop(*stack, 8);
  torch::jit::push(*stack, std::move(y));
}

void set_no_launch(bool on) { g_no_launch = on; }
void set_claim_pool(bool on) { g_claim_pool = on; }

// Registers lut_linear_cpu_kernel as lowra::lut_linear's CPU kernel (once; later calls update the grain).
// The schema and lowra::lut_linear_cpu_fallback must exist (kernels/lut_linear.py defines both first).
void register_lut_linear_cpu(int64_t grain) {
  static torch::Library* lib = nullptr;
  g_op_grain = std::max<int64_t>(1, grain);
  if (lib != nullptr) return;
  static c10::OperatorHandle fallback =
      c10::Dispatcher::singleton().findSchemaOrThrow("lowra::lut_linear_cpu_fallback", "");
  g_fallback = &fallback;
  // never freed: the registration lives as long as the process
  lib = new torch::Library(torch::Library::IMPL, "lowra", c10::DispatchKey::CPU, __FILE__, __LINE__);
  lib->impl("lut_linear", torch::CppFunction::makeFromBoxedFunction<&lut_linear_cpu_kernel>());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("dequant_group", &dequant_group, release(), "write the dequantized rows of one bit group");
  m.def("gemv_group", &gemv_group, release(), "y[:, rows] = x @ W_group^T for M <= 16 (fused, fp32)");
  m.def("gemv_t_group", &gemv_t_group, release(), "gx += gy[:, rows] @ W_group for M <= 16 (fused, fp32)");
  m.def("lora_add", &lora_add, release(), "y += scaling * (x @ A^T) @ B^T + bias for M <= 16 (fp32)");
  m.def("table_grad_group", &table_grad_group, release(),
        "codebook / absmax gradient of one bit group from rows of dL/dW (one pass over the codes, fp32)");
  m.def("col_dot", &col_dot, release(), "p[o] = sum_m a[m, o] b[m, o] (fp32 in, fp64 out)");
  m.def("one_bit_grad", &one_bit_grad, release(), "1-bit codebook gradient in closed form from p, q (returns bad rows)");
  m.def("has_avx2", &has_avx2, "whether the vectorized AVX2 path was compiled in");
  m.def("set_claim_pool", &set_claim_pool,
        "the forward GEMV's threads: the claiming pool (default) or at::parallel_for (OpenMP, for comparison)");
  m.def("set_no_launch", &set_no_launch, "lowra::lut_linear's C++ CPU kernel skips its GEMV (host-time benchmark)");
  m.def("register_lut_linear_cpu", &register_lut_linear_cpu,
        "register the C++ CPU kernel of lowra::lut_linear (needs the op and lowra::lut_linear_cpu_fallback)");
  py::class_<LayerPlan>(m, "LayerPlan")
      .def_readonly("in_features", &LayerPlan::in_features)
      .def_readonly("out_features", &LayerPlan::out_features);
  m.def("make_layer", &make_layer, "a layer plan from each width's group arguments");
  m.def("layer_gemv", &layer_gemv, release(), "y = x @ W^T over every width of a layer for M <= 16 (fused, fp32)");
}
