// Decode on the CPU: one query per sequence over its keys (listed by a block table, or packed rows), each key
// and value row read once, in place, the rows a head loop reads next prefetched into L2 while it runs. Per tile of
// keys and kv head: the scores of its query heads in register blocks (one transpose-and-add tree for a block's sums;
// bfloat16 pairs in the AVX512-BF16 unit where there is one), then P V with the accumulators in registers
// across the tile. Built on first use by native.py, for the vector width of the machine it runs on (ATen's
// Vectorized<float>).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "vec.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using portable_attn_cpu::bf16_unit;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t SUB = Vec::size();   // keys per block of score accumulators: one vector of sums per query row
constexpr int64_t TILE = 2 * SUB;       // keys per softmax update (max, sums, rescale): 4 blocks ran 0-7 % slower
const float NEG_INF = -std::numeric_limits<float>::infinity();

// Software prefetch: chunk c + AHEAD of a work item's read order is prefetched into L2 while chunk c is read (a
// chunk: one kv head of a tile's key or value rows). Rows 2-4 KB apart (a key's row, in pages anywhere) defeat
// the hardware prefetchers, and prefetched into L1 a chunk evicts the one in use; into L2 the kernel runs 1.3-1.4x
// faster than copying each tile's rows first (Zen 4, docs/pitfalls.md).
constexpr int64_t AHEAD = 2;

// A chunk's rows: rows[j] + offset .. + bytes for j < t, prefetched into L2 one row per call of row(j)
template <typename T>
struct Ahead {
  const T* const* rows = nullptr;
  int64_t t = 0, offset = 0, bytes = 0;  // t = 0: nothing to prefetch
  void row(int64_t j) const {
    if (j >= t) return;
    portable_attn_cpu::prefetch_l2(rows[j] + offset, bytes);
  }
};

float hsum(Vec x) { return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, x); }
float hmax(Vec x) { return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x); }

// Vec::size() elements of a row as float32: converted in registers where the vector width is known.
template <typename T>
Vec as_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (std::is_same_v<T, at::BFloat16>)
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
    else
      return _mm512_cvtph_ps(x);
#elif defined(CPU_CAPABILITY_AVX2)
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (std::is_same_v<T, at::BFloat16>)
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
    else
      return _mm256_cvtph_ps(x);
#else
    float f[Vec::size()];
    for (int64_t i = 0; i < Vec::size(); ++i) f[i] = static_cast<float>(p[i]);
    return Vec::loadu(f);
#endif
  }
}

// Lane i of the result: the sum of a[i]'s lanes, for i < Vec::size(), in one transpose-and-add tree (a
// horizontal sum per vector costs about three times as many shuffles).
Vec sums(const Vec* a) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a, b, a, b] partials of vectors 2i, 2i + 1
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: [a, b, c, d], vectors 4i .. 4i + 4
    const __m512d x = _mm512_castps_pd(t[2 * i]), y = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes: vectors 8i .. 8i + 4 twice, then 8i + 4 .. 8i + 8 twice
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88), _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xdd));
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 t[4], u[2];
  for (int i = 0; i < 4; ++i)
    t[i] = _mm256_add_ps(_mm256_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm256_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 2; ++i) {
    const __m256d x = _mm256_castps_pd(t[2 * i]), y = _mm256_castps_pd(t[2 * i + 1]);
    u[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)), _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
  }
  return _mm256_add_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20), _mm256_permute2f128_ps(u[0], u[1], 0x31));
#else
  float f[Vec::size()];
  for (int64_t i = 0; i < Vec::size(); ++i) f[i] = hsum(a[i]);
  return Vec::loadu(f);
#endif
}

// Scores of G query rows (q, D apart, float32, scaled) against the first t keys of a tile (k[j]: key j's row; rows
// up to the next multiple of SUB / G are read, the tile repeats its last row): s[i * TILE + j] = q_i . k_j. Blocks
// of G x SUB / G (query, key) pairs, one accumulator each, so every key chunk loaded serves G queries and every
// query chunk SUB / G keys. The rows of `ahead` prefetched as many at a time.
template <int G, typename T>
void scores(const float* q, const T* const* k, int64_t d, int64_t t, float* s, const Ahead<T>& ahead) {
  constexpr int KB = SUB / G;
  for (int64_t j0 = 0; j0 < t; j0 += KB) {
    for (int j = 0; j < KB; ++j) ahead.row(j0 + j);
    Vec acc[SUB];
    for (int i = 0; i < SUB; ++i) acc[i] = Vec(0.f);
    int64_t e = 0;
    for (; e + Vec::size() <= d; e += Vec::size()) {
      Vec kv[KB];
      for (int j = 0; j < KB; ++j) kv[j] = as_float(k[j0 + j] + e);
      for (int i = 0; i < G; ++i) {
        const Vec qv = Vec::loadu(q + i * d + e);
        for (int j = 0; j < KB; ++j) acc[i * KB + j] = at::vec::fmadd(qv, kv[j], acc[i * KB + j]);
      }
    }
    float r[SUB];
    sums(acc).store(r);
    for (int i = 0; i < G; ++i)
      for (int j = 0; j < KB; ++j) {
        float x = r[i * KB + j];
        for (int64_t t = e; t < d; ++t) x += q[i * d + t] * static_cast<float>(k[j0 + j][t]);  // d % Vec::size()
        s[i * TILE + j0 + j] = x;
      }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// scores for bfloat16 queries (unscaled) and keys with d % 32 == 0, in the AVX512-BF16 unit where the CPU has one
// (bf16_unit()): pairs of exact products summed in float32, no conversion; s = scale * q_i . k_j.
template <int G>
__attribute__((target("avx512bf16"))) void scores_bf16(const at::BFloat16* q, const at::BFloat16* const* k, int64_t d,
                                                      int64_t t, float scale, float* s,
                                                      const Ahead<at::BFloat16>& ahead) {
  constexpr int KB = SUB / G;
  for (int64_t j0 = 0; j0 < t; j0 += KB) {
    for (int j = 0; j < KB; ++j) ahead.row(j0 + j);
    Vec acc[SUB];
    for (int i = 0; i < SUB; ++i) acc[i] = Vec(0.f);
    for (int64_t e = 0; e < d; e += 32) {
      __m512bh kv[KB];
      for (int j = 0; j < KB; ++j) kv[j] = (__m512bh)_mm512_loadu_si512(k[j0 + j] + e);
      for (int i = 0; i < G; ++i) {
        const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + i * d + e);
        for (int j = 0; j < KB; ++j) acc[i * KB + j] = _mm512_dpbf16_ps(acc[i * KB + j], qv, kv[j]);
      }
    }
    float r[SUB];
    (sums(acc) * Vec(scale)).store(r);
    for (int i = 0; i < G; ++i)
      for (int j = 0; j < KB; ++j) s[i * TILE + j0 + j] = r[i * KB + j];
  }
}

#endif

// Accumulator rows acc[i] (dv apart) = acc[i] * c[i] + sum_j p[i * TILE + j] v_j over the tile's t keys, for
// G rows and C vectors of columns from column e0: G x C accumulators in registers across the tile. The rows of
// `ahead` prefetched one per key.
template <int G, int C, typename T>
void value_cols(float* acc, const float* c, const float* p, const T* const* v, int64_t t, int64_t dv, int64_t e0,
                const Ahead<T>& ahead) {
  Vec a[G][C];
  for (int i = 0; i < G; ++i)
    for (int x = 0; x < C; ++x) a[i][x] = Vec(0.f);
  for (int64_t j = 0; j < t; ++j) {
    ahead.row(j);
    Vec vv[C];
    for (int x = 0; x < C; ++x) vv[x] = as_float(v[j] + e0 + x * Vec::size());
    for (int i = 0; i < G; ++i) {
      const Vec pv(p[i * TILE + j]);
      for (int x = 0; x < C; ++x) a[i][x] = at::vec::fmadd(pv, vv[x], a[i][x]);
    }
  }
  for (int i = 0; i < G; ++i)
    for (int x = 0; x < C; ++x) {
      float* dst = acc + i * dv + e0 + x * Vec::size();
      at::vec::fmadd(Vec::loadu(dst), Vec(c[i]), a[i][x]).store(dst);
    }
}

template <int G, typename T>
void values(float* acc, const float* c, const float* p, const T* const* v, int64_t t, int64_t dv,
            const Ahead<T>& ahead) {
  // G x C accumulators and C value vectors within the 32 vector registers of AVX-512 (half as many on AVX2's 16)
  constexpr int C = (G >= 4 ? 4 : 8) * Vec::size() / 16;
  const Ahead<T> none;  // `ahead` in the first pass over the keys only
  int64_t e = 0;
  for (; e + C * Vec::size() <= dv; e += C * Vec::size()) value_cols<G, C>(acc, c, p, v, t, dv, e, e ? none : ahead);
  for (; e + Vec::size() <= dv; e += Vec::size()) value_cols<G, 1>(acc, c, p, v, t, dv, e, e ? none : ahead);
  for (int i = 0; i < G; ++i)  // dv % Vec::size()
    for (int64_t x = e; x < dv; ++x) {
      float sum = 0.f;
      for (int64_t j = 0; j < t; ++j) sum += p[i * TILE + j] * static_cast<float>(v[j][x]);
      acc[i * dv + x] = acc[i * dv + x] * c[i] + sum;
    }
}

// f(std::integral_constant<int, G>, i) over rows i .. i + G of g rows, in blocks of 4, 2 and 1 rows
template <typename F>
void in_blocks(int64_t g, F f) {
  int64_t i = 0;
  for (; i + 4 <= g; i += 4) f(std::integral_constant<int, 4>{}, i);
  if (g - i >= 2) { f(std::integral_constant<int, 2>{}, i); i += 2; }
  if (g - i >= 1) f(std::integral_constant<int, 1>{}, i);
}

struct Strided {  // a cache [NB, BS, Hkv, D] read through its strides
  const void* data;
  int64_t block, slot, head, elem;
};

// Queries [S, Hq, D] (any strides), sinks [Hq] float32 or none -> out [S, Hq, Dv] (q's dtype, any strides), lse
// [Hq, S] float32 (none: not written). The keys of sequence s: paged, caches [NB, BS, Hkv, D|Dv] with block_table
// [S, MB] and seqused_k [S] (int32); or packed, k/v [T, 1, Hkv, D|Dv] with cu_seqlens_k [S + 1] (int32; none: one
// sequence of all T). Its query sits at its last key n - 1 and sees keys [first, n), first = n - 1 - left when
// left >= 0. Work items: (sequence, kv-head range), so that a batch smaller than the thread count still uses
// every thread.
template <typename T>
void decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const c10::optional<at::Tensor>& block_table, const c10::optional<at::Tensor>& seqused_k,
            const c10::optional<at::Tensor>& cu_seqlens_k, const c10::optional<at::Tensor>& sinks, double scale,
            int64_t left, double softcap, at::Tensor& out, const c10::optional<at::Tensor>& lse) {
  const int64_t S = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), Hkv = k_cache.size(2), Dv = v_cache.size(3), g = Hq / Hkv;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(Hkv, (at::get_num_threads() + S - 1) / std::max<int64_t>(S, 1)));
  const int64_t per_part = (Hkv + parts - 1) / parts;
  const T* qp = q.data_ptr<T>();
  const Strided kc{k_cache.data_ptr<T>(), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3)};
  const Strided vc{v_cache.data_ptr<T>(), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3)};
  const int32_t* table = block_table.has_value() ? block_table->data_ptr<int32_t>() : nullptr;
  const int32_t* used = seqused_k.has_value() ? seqused_k->data_ptr<int32_t>() : nullptr;
  const int32_t* cu = cu_seqlens_k.has_value() ? cu_seqlens_k->data_ptr<int32_t>() : nullptr;
  const float* sink = sinks.has_value() ? sinks->data_ptr<float>() : nullptr;
  T* op = out.data_ptr<T>();
  float* lp = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  const int64_t t0 = table ? block_table->stride(0) : 0, t1 = table ? block_table->stride(1) : 0;
  const int64_t u0 = used ? seqused_k->stride(0) : 0, c0 = cu ? cu_seqlens_k->stride(0) : 0;
  const auto qs = q.strides(), os = out.strides();
  const int64_t l0 = lp ? lse->stride(0) : 0, l1 = lp ? lse->stride(1) : 0;
  const float cap = static_cast<float>(softcap);
#if defined(CPU_CAPABILITY_AVX512)
  const bool pairs = std::is_same_v<T, at::BFloat16> && D % 32 == 0 && bf16_unit();  // scores_bf16
#else
  const bool pairs = false;
#endif
  auto keys = [&](int64_t b) {  // sequence b's visible keys [first, n)
    const int64_t n = table ? used[b * u0] : cu ? cu[(b + 1) * c0] - cu[b * c0] : k_cache.size(0);
    return std::pair<int64_t, int64_t>{left >= 0 ? std::max<int64_t>(0, n - 1 - left) : 0, n};
  };
  const bool prefetch = kc.elem == 1 && vc.elem == 1;  // rows contiguous: Ahead's spans
  at::parallel_for(0, S * parts, 1, [&](int64_t begin, int64_t end) {
    const int64_t rows = per_part * g;
    std::vector<float> qf(pairs ? 0 : rows * D), acc(rows * Dv), m(rows), l(rows), c(rows), s(rows * TILE);
    std::vector<T> qb(pairs ? rows * D : 0);  // the queries as they came, for scores_bf16; else scaled float32
    std::vector<T> kstage(TILE * D), vstage(TILE * Dv);  // one head of a tile's rows of a cache whose elements are strided
    const T *kr[TILE], *vr[TILE], *kn[TILE], *vn[TILE];  // the tile's and the next one's key / value rows at kv head h0
    const T *kh[TILE], *vh[TILE];                        // the tile's rows at kv head h
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / parts, h0 = (w % parts) * per_part, h1 = std::min(Hkv, h0 + per_part);
      if (h0 >= h1) continue;
      const int64_t r0 = h0 * g, nr = (h1 - h0) * g;  // query heads r0 .. r0 + nr, local rows 0 .. nr
      const int64_t start = cu ? cu[b * c0] : 0;  // packed keys: the sequence's first row
      const auto [first, n] = keys(b);
      for (int64_t i = 0; i < nr; ++i)
        for (int64_t e = 0; e < D; ++e) {
          const T x = qp[b * qs[0] + (r0 + i) * qs[1] + e * qs[2]];
          if (pairs)
            qb[i * D + e] = x;
          else
            qf[i * D + e] = static_cast<float>(x) * static_cast<float>(scale);
        }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), NEG_INF);  // the running max score
      std::fill(l.begin(), l.end(), 0.f);
      auto row = [&](const Strided& cs, int64_t pos) {  // the row of key `pos`, kv head 0
        const T* data = static_cast<const T*>(cs.data);
        return table ? data + table[b * t0 + (pos / BS) * t1] * cs.block + (pos % BS) * cs.slot
                     : data + (start + pos) * cs.block;
      };
      auto fetch = [&](const Strided& cs, int64_t j0, int64_t t, const T** rows) {  // t rows from key j0, at kv head h0
        for (int64_t j = 0; j < t; ++j) rows[j] = row(cs, j0 + j) + h0 * cs.head;
      };
      auto head = [](const Strided& cs, const T* const* base, int64_t h, int64_t width, T* stage, const T** dst) {
        for (int64_t j = 0; j < TILE; ++j) {  // kv head h0 + h of each row, contiguous
          const T* x = base[j] + h * cs.head;
          if (cs.elem != 1) {
            for (int64_t e = 0; e < width; ++e) stage[j * width + e] = x[e * cs.elem];
            x = stage + j * width;
          }
          dst[j] = x;
        }
      };
      const int64_t nh = h1 - h0;
      for (int64_t j0 = first; j0 < n; j0 += TILE) {
        const int64_t t = std::min(TILE, n - j0), tn = prefetch ? std::min(TILE, n - j0 - t) : 0;
        fetch(kc, j0, t, kr);
        fetch(vc, j0, t, vr);
        for (int64_t j = t; j < TILE; ++j) kr[j] = kr[t - 1], vr[j] = vr[t - 1];  // a short tile: its last row (masked)
        fetch(kc, j0 + t, tn, kn);
        fetch(vc, j0 + t, tn, vn);
        // chunk x of the read order: the tile's key rows head by head, its value rows, then the next tile's
        auto chunk = [&](int64_t x) {
          const int64_t kb = D * int64_t(sizeof(T)), vb = Dv * int64_t(sizeof(T));
          if (!prefetch) return Ahead<T>{};
          if (x < nh) return Ahead<T>{kr, t, x * kc.head, kb};
          if (x < 2 * nh) return Ahead<T>{vr, t, (x - nh) * vc.head, vb};
          if (x < 3 * nh) return Ahead<T>{kn, tn, (x - 2 * nh) * kc.head, kb};
          return Ahead<T>{vn, tn, (x - 3 * nh) * vc.head, vb};  // AHEAD <= 2 nh: x < 4 nh
        };
        const Ahead<T> none;  // the second and later blocks of a head's query rows: prefetched by the first
        for (int64_t h = h0; h < h1; ++h) {  // scores s [nr, TILE]
          head(kc, kr, h - h0, D, kstage.data(), kh);
          const Ahead<T> ahead = chunk(h - h0 + AHEAD);
          const int64_t r = (h - h0) * g;  // its query heads' local rows r .. r + g
          in_blocks(g, [&](auto G, int64_t i) {
            const Ahead<T>& a = i ? none : ahead;
#if defined(CPU_CAPABILITY_AVX512)
            if constexpr (std::is_same_v<T, at::BFloat16>)
              if (pairs)
                return scores_bf16<decltype(G)::value>(qb.data() + (r + i) * D, kh, D, t, scale,
                                                       s.data() + (r + i) * TILE, a);
#endif
            scores<decltype(G)::value>(qf.data() + (r + i) * D, kh, D, t, s.data() + (r + i) * TILE, a);
          });
        }
        const int64_t nv = (t + SUB - 1) / SUB;  // vectors of scores the tile's keys fill
        for (int64_t i = 0; i < nr; ++i) {
          for (int64_t j = t; j < nv * SUB; ++j) s[i * TILE + j] = NEG_INF;
          if (cap > 0)
            for (int64_t j = 0; j < t; ++j) s[i * TILE + j] = cap * std::tanh(s[i * TILE + j] / cap);
        }
        for (int64_t i = 0; i < nr; ++i) {  // p = exp(s - running max); c: the accumulators' rescale
          float* si = s.data() + i * TILE;
          Vec top_v = Vec::loadu(si);
          for (int64_t x = 1; x < nv; ++x) top_v = at::vec::maximum(top_v, Vec::loadu(si + x * SUB));
          const float top = std::max(m[i], hmax(top_v));
          const float ref = std::isfinite(top) ? top : 0.f;  // no finite max: subtract nothing (as the reference)
          c[i] = top != m[i] && l[i] != 0.f ? std::exp((std::isfinite(m[i]) ? m[i] : 0.f) - ref) : 1.f;
          m[i] = top;
          Vec total(0.f);
          for (int64_t x = 0; x < nv; ++x) {
            const Vec p = (Vec::loadu(si + x * SUB) - Vec(ref)).exp_u20();
            p.store(si + x * SUB);
            total = total + p;
          }
          l[i] = l[i] * c[i] + hsum(total);
        }
        for (int64_t h = h0; h < h1; ++h) {  // acc [nr, Dv] = acc * c + p v
          head(vc, vr, h - h0, Dv, vstage.data(), vh);
          const Ahead<T> ahead = chunk(nh + h - h0 + AHEAD);
          const int64_t r = (h - h0) * g;
          in_blocks(g, [&](auto G, int64_t i) {
            values<decltype(G)::value>(acc.data() + (r + i) * Dv, c.data() + r + i, s.data() + (r + i) * TILE, vh, t,
                                       Dv, i ? none : ahead);
          });
        }
      }
      for (int64_t i = 0; i < nr; ++i) {
        float total = l[i] > 0 ? (std::isfinite(m[i]) ? m[i] : 0.f) + std::log(l[i]) : NEG_INF;  // lse over the keys
        float weight = l[i] > 0 ? 1.f / l[i] : 0.f;
        if (sink != nullptr) {  // the sink joins the denominator only
          const float z = sink[r0 + i], both = std::max(total, z);
          const float joined = both == NEG_INF ? NEG_INF : both + std::log(std::exp(total - both) + std::exp(z - both));
          weight = l[i] > 0 ? std::exp(total - joined) / l[i] : 0.f;
          total = joined;
        }
        T* dst = op + b * os[0] + (r0 + i) * os[1];
        for (int64_t e = 0; e < Dv; ++e) dst[e * os[2]] = static_cast<T>(acc[i * Dv + e] * weight);
        if (lp != nullptr) lp[(r0 + i) * l0 + b * l1] = total;
      }
    }
  });
}

// The index values a paged call reads, checked before anything is written (the op's own value checks skip this
// path: Backend.checks_values): each key count within the table's blocks and max_keys (-1: none), the block ids
// in use within the cache. IndexError: the caller runs checks.py's value checks, which say which value is wrong.
void check_pages(const at::Tensor& table, const at::Tensor& used, int64_t nb, int64_t bs, int64_t max_keys) {
  const int32_t* t = table.data_ptr<int32_t>();
  const int32_t* u = used.data_ptr<int32_t>();
  const int64_t t0 = table.stride(0), t1 = table.stride(1), u0 = used.stride(0), mb = table.size(1);
  for (int64_t b = 0; b < table.size(0); ++b) {
    const int64_t n = u[b * u0];
    TORCH_CHECK_INDEX(n >= 0 && n <= mb * bs && (max_keys < 0 || n <= max_keys), "decode: seqused_k[", b, "] = ", n,
                      " is out of range");
    for (int64_t p = 0; p * bs < n; ++p)
      TORCH_CHECK_INDEX(t[b * t0 + p * t1] >= 0 && t[b * t0 + p * t1] < nb, "decode: block_table[", b, ", ", p,
                        "] = ", t[b * t0 + p * t1], " is out of range");
  }
}

}  // namespace

// The binding: packed keys [T, Hkv, D] read as T blocks of one row; paged ones' index values checked first (max_keys:
// the op's max_seqlen_k, -1 none); o made here unless `out` is given (an allocation costs a fraction of Python's),
// lse [Hq, S] float32 made when wanted (else undefined: None).
std::tuple<at::Tensor, at::Tensor> decode_any(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const c10::optional<at::Tensor>& block_table,
                                              const c10::optional<at::Tensor>& seqused_k,
                                              const c10::optional<at::Tensor>& cu_seqlens_k,
                                              const c10::optional<at::Tensor>& sinks, double scale, int64_t left,
                                              double softcap, const c10::optional<at::Tensor>& out, bool want_lse,
                                              int64_t max_keys) {
  if (block_table.has_value()) check_pages(*block_table, *seqused_k, k.size(0), k.size(1), max_keys);
  const at::Tensor kc = k.dim() == 3 ? k.unsqueeze(1) : k, vc = v.dim() == 3 ? v.unsqueeze(1) : v;
  at::Tensor o = out.has_value() ? *out : at::empty({q.size(0), q.size(1), vc.size(3)}, q.options());
  const c10::optional<at::Tensor> lse =
      want_lse ? c10::optional<at::Tensor>(at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat))) : c10::nullopt;
  const c10::optional<at::Tensor> sink = sinks.has_value() ? c10::optional<at::Tensor>(sinks->to(at::kFloat).contiguous()) : c10::nullopt;
  switch (q.scalar_type()) {  // the types as_float reads
    case at::kFloat:
      decode<float>(q, kc, vc, block_table, seqused_k, cu_seqlens_k, sink, scale, left, softcap, o, lse);
      break;
    case at::kBFloat16:
      decode<at::BFloat16>(q, kc, vc, block_table, seqused_k, cu_seqlens_k, sink, scale, left, softcap, o, lse);
      break;
    case at::kHalf:
      decode<at::Half>(q, kc, vc, block_table, seqused_k, cu_seqlens_k, sink, scale, left, softcap, o, lse);
      break;
    default:
      TORCH_CHECK(false, "decode: float32, bfloat16 or float16 tensors, not ", q.scalar_type());
  }
  return {o, lse.has_value() ? *lse : at::Tensor()};
}
