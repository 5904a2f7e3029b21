// Prefill attention on the CPU, flash style: per (sequence, query head, block of BQ queries), only the key blocks of
// BK keys its causal/window band reaches, an online softmax over them (scores softcapped where asked) and P V
// accumulated in float32; threads take work items in turn, a head's costly (causal: last) blocks first. Keys and
// values are packed once per call and kv head (each key block serves every query block and query head that sees it;
// kv heads in groups whose packs fit a kept buffer): float32 K transposed per block ([D, BK], keys in vector lanes,
// a query element broadcast) and V [BK, Dv'], or for bfloat16 on a CPU with the AVX512-BF16 unit, pairs for
// `vdpbf16ps` (K [D/2, BK, 2], V [BK/2, Dv', 2], P rounded to bfloat16). Blocks wholly inside the band skip masking.
// A block mask (masks.py) is read in place: key blocks it leaves EMPTY for a query block are skipped, FULL ones
// inside the band run unmasked, the rest take one bit per (row, key) from its states and PARTIAL element masks.
// Built by native.py with decode.cpp.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "vec.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using portable_attn_cpu::bf16_unit;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t W = Vec::size();
constexpr int RB = 4;                        // query rows per micro-kernel
constexpr int NV = W == 16 ? 4 : 2;          // vectors of keys (scores) or of columns (P V) per micro-kernel:
constexpr int64_t BK = NV * W;               // RB x NV accumulators fit AVX-512's 32 registers, AVX2's 16
constexpr int64_t BQ = 64;                   // query rows per work item
static_assert(BQ % RB == 0 && RB <= W, "blocks of whole micro-kernels");
const float LOWEST = std::numeric_limits<float>::lowest();  // the running max before any key: exp(LOWEST - m) = 0
const float NEG_INF = -std::numeric_limits<float>::infinity();

// The keys query position p sees, [a, b) (b <= a: none), for a sequence of lk keys.
struct Band {
  bool causal;
  int64_t left, right, lk;
  int64_t lo(int64_t p) const { return left >= 0 ? std::max<int64_t>(0, p - left) : 0; }
  int64_t hi(int64_t p) const {
    int64_t b = lk;
    if (causal) b = std::min(b, p + 1);
    if (right >= 0) b = std::min(b, p + right + 1);
    return b;
  }
};

uint64_t span(int64_t n) { return n <= 0 ? 0 : n >= 64 ? ~uint64_t(0) : (uint64_t(1) << n) - 1; }

// n <= 64 bool bytes -> bits (bit i: x[i] != 0)
uint64_t to_bits(const uint8_t* x, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i b = _mm512_maskz_loadu_epi8(span(n), x);
  return _mm512_test_epi8_mask(b, b);
#else
  uint64_t bits = 0;
  for (int64_t i = 0; i < n; ++i) bits |= uint64_t(x[i] != 0) << i;
  return bits;
#endif
}

// A block mask read in place (masks.py): states [S|1, H|1, nqb, nkb] of bq x bk position blocks (0 EMPTY, 1 PARTIAL:
// its element mask partials[index], 2 FULL); positions outside the layout see nothing.
struct Mask {
  const int8_t* layout = nullptr;  // none: no mask
  const int32_t* index = nullptr;
  const uint8_t* partials = nullptr;
  int64_t S = 0, H = 0, nqb = 0, nkb = 0, bq = 1, bk = 1;
  enum Cover { NONE, SOME, ALL };

  // the first state of sequence s, query head h
  int64_t offset(int64_t s, int64_t h) const { return ((S > 1 ? s : 0) * H + (H > 1 ? h : 0)) * nqb * nkb; }

  // What query positions [p0, p1) see of keys [k0, k1) by the states from `base` (offset()) alone.
  Cover cover(int64_t base, int64_t p0, int64_t p1, int64_t k0, int64_t k1) const {
    const int64_t r0 = std::max<int64_t>(p0, 0), r1 = std::min(p1, nqb * bq), c1 = std::min(k1, nkb * bk);
    if (r0 >= r1 || k0 >= c1) return NONE;
    bool any = false, all = r0 == p0 && r1 == p1 && c1 == k1;
    for (int64_t qb = r0 / bq; qb * bq < r1; ++qb)
      for (int64_t kb = k0 / bk; kb * bk < c1; ++kb) {
        const int8_t st = layout[base + qb * nkb + kb];
        any |= st != 0;
        all &= st == 2;
      }
    return all ? ALL : any ? SOME : NONE;
  }

  // Bit j - k0 set where position p sees key j of [k0, k1) (k1 - k0 <= 64).
  uint64_t row(int64_t base, int64_t p, int64_t k0, int64_t k1) const {
    if (p < 0 || p >= nqb * bq) return 0;
    const int64_t qb = p / bq, c1 = std::min(k1, nkb * bk);
    uint64_t bits = 0;
    for (int64_t a = k0; a < c1;) {
      const int64_t kb = a / bk, b = std::min(c1, (kb + 1) * bk), cell = base + qb * nkb + kb;
      if (layout[cell] == 2) bits |= span(b - a) << (a - k0);
      if (layout[cell] == 1)
        bits |= to_bits(partials + (index[cell] * bq + p % bq) * bk + a - kb * bk, b - a) << (a - k0);
      a = b;
    }
    return bits;
  }
};

// 2^x for x <= 0 (-inf: 0) to float32's precision: x clamped to -200 (2^-200 underflows to 0), a Taylor polynomial
// of 2^f on [-1/2, 1/2] (relative error 1.2e-7) scaled by 2^n; half the instructions of Vec::exp_u20
Vec exp2_neg(Vec x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 y = _mm512_max_ps(x, _mm512_set1_ps(-200.f));
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, n);
  constexpr float c[] = {1.f, 0.6931472f, 0.2402265f, 0.05550411f, 0.009618129f, 0.001333356f, 0.0001540353f};
  __m512 p = _mm512_set1_ps(c[6]);
  for (int k = 5; k >= 0; --k) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[k]));
  return _mm512_scalef_ps(p, n);
#else
  return (x * Vec(float(M_LN2))).exp_u20();
#endif
}

// max without ATen's NaN propagation (four instructions a vector where the CPU's own max is one)
Vec vmax(Vec a, Vec b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_max_ps(a, b);
#else
  return at::vec::maximum(a, b);
#endif
}

float hmax(Vec x) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_max_ps(x);
#else
  return at::vec::vec_reduce_all<float>([](Vec& u, Vec& w) { return vmax(u, w); }, x);
#endif
}

using Block = Vec[RB][NV];  // scores of RB query rows x BK keys, in registers

// a where bit l of `keep` is set, else -inf (W lanes)
Vec hide(Vec a, uint64_t keep) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_mask_blend_ps(__mmask16(keep), _mm512_set1_ps(NEG_INF), a);
#else
  float lane[W];
  for (int l = 0; l < W; ++l) lane[l] = (keep >> l) & 1 ? 0.f : 1.f;
  return Vec::blendv(a, Vec(NEG_INF), Vec::loadu(lane) != Vec(0.f));
#endif
}

// ---- float32 products: a = q [RB, D] . a packed key block kt [D, BK]; acc [RB, Dv'] = acc * c + p [RB, BK] @ v
// [BK, Dv'] for NC vectors of columns from e0.
void scores_f32(const float* q, int64_t d, const float* kt, Block& out) {
  Vec a[RB][NV];  // local: accumulators in registers (out may alias q and kt for the compiler)
  for (int i = 0; i < RB; ++i)
    for (int x = 0; x < NV; ++x) a[i][x] = Vec(0.f);
  for (int64_t e = 0; e < d; ++e) {
    Vec k[NV];
    for (int x = 0; x < NV; ++x) k[x] = Vec::loadu(kt + e * BK + x * W);
    for (int i = 0; i < RB; ++i) {
      const Vec qv(q[i * d + e]);
      for (int x = 0; x < NV; ++x) a[i][x] = at::vec::fmadd(qv, k[x], a[i][x]);
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int x = 0; x < NV; ++x) out[i][x] = a[i][x];
}

template <int NC>
void values_f32(float* acc, int64_t dv, const float* c, const float* p, const float* v, int64_t e0) {
  Vec a[RB][NC];
  for (int i = 0; i < RB; ++i)
    for (int x = 0; x < NC; ++x) a[i][x] = Vec::loadu(acc + i * dv + e0 + x * W) * Vec(c[i]);
  for (int64_t j = 0; j < BK; ++j) {
    Vec vv[NC];
    for (int x = 0; x < NC; ++x) vv[x] = Vec::loadu(v + j * dv + e0 + x * W);
    for (int i = 0; i < RB; ++i) {
      const Vec pv(p[i * BK + j]);
      for (int x = 0; x < NC; ++x) a[i][x] = at::vec::fmadd(pv, vv[x], a[i][x]);
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int x = 0; x < NC; ++x) a[i][x].store(acc + i * dv + e0 + x * W);
}

#if defined(CPU_CAPABILITY_AVX512)
// ---- bfloat16 pairs in the AVX512-BF16 unit: q [RB, D'] (D' even), kp [D'/2, BK, 2]; p [RB, BK] bfloat16,
// vp [BK/2, Dv', 2].
__attribute__((target("avx512bf16"))) void scores_bf16(const at::BFloat16* q, int64_t d, const at::BFloat16* kp,
                                                      Block& out) {
  __m512 a[RB][NV];
  for (int i = 0; i < RB; ++i)
    for (int x = 0; x < NV; ++x) a[i][x] = _mm512_setzero_ps();
  for (int64_t e = 0; e < d; e += 2) {
    __m512bh k[NV];
    for (int x = 0; x < NV; ++x) k[x] = (__m512bh)_mm512_loadu_si512(kp + (e * BK + 2 * x * W));
    for (int i = 0; i < RB; ++i) {
      int32_t pair;
      std::memcpy(&pair, q + i * d + e, sizeof(pair));
      const __m512bh qv = (__m512bh)_mm512_set1_epi32(pair);
      for (int x = 0; x < NV; ++x) a[i][x] = _mm512_dpbf16_ps(a[i][x], qv, k[x]);
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int x = 0; x < NV; ++x) out[i][x] = a[i][x];
}

template <int NC>
__attribute__((target("avx512bf16"))) void values_bf16(float* acc, int64_t dv, const float* c, const at::BFloat16* p,
                                                      const at::BFloat16* vp, int64_t e0) {
  __m512 a[RB][NC];
  for (int i = 0; i < RB; ++i)
    for (int x = 0; x < NC; ++x)
      a[i][x] = _mm512_mul_ps(_mm512_loadu_ps(acc + i * dv + e0 + x * W), _mm512_set1_ps(c[i]));
  for (int64_t j = 0; j < BK; j += 2) {
    __m512bh vv[NC];
    for (int x = 0; x < NC; ++x) vv[x] = (__m512bh)_mm512_loadu_si512(vp + 2 * (j / 2 * dv + e0 + x * W));
    for (int i = 0; i < RB; ++i) {
      int32_t pair;
      std::memcpy(&pair, p + i * BK + j, sizeof(pair));
      const __m512bh pv = (__m512bh)_mm512_set1_epi32(pair);
      for (int x = 0; x < NC; ++x) a[i][x] = _mm512_dpbf16_ps(a[i][x], pv, vv[x]);
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int x = 0; x < NC; ++x) _mm512_storeu_ps(acc + i * dv + e0 + x * W, a[i][x]);
}

// p [RB, BK] float32 -> bfloat16, rounded to nearest even
__attribute__((target("avx512bf16"))) void to_bf16(const float* p, at::BFloat16* dst) {
  for (int64_t j = 0; j < RB * BK; j += 2 * W)
    _mm512_storeu_si512(dst + j, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + j + W), _mm512_loadu_ps(p + j)));
}
#endif

// f(std::integral_constant<int, NC>, e0) over dv columns (a multiple of W) in chunks of NV vectors, the rest in one
template <typename F>
void in_columns(int64_t dv, F f) {
  int64_t e = 0;
  for (; e + NV * W <= dv; e += NV * W) f(std::integral_constant<int, NV>{}, e);
  switch ((dv - e) / W) {  // 1 .. NV - 1 vectors left
    case 1: f(std::integral_constant<int, 1>{}, e); break;
    case 2: f(std::integral_constant<int, 2>{}, e); break;
    case 3: f(std::integral_constant<int, 3>{}, e); break;
    default: break;
  }
}

struct Layout {  // a [T, H, X] tensor read through its strides (last one 1)
  const void* data;
  int64_t row, head;
};

// One call's geometry: sequences, heads, head dims (padded: dp even, dvp a multiple of W), the packed blocks.
struct Call {
  int64_t S, Hq, Hkv, D, Dv, dp, dvp;
  bool pairs;                        // bfloat16 pairs in the AVX512-BF16 unit
  Band band;                         // lk set per sequence
  std::vector<int64_t> q0, lq, k0, lk, blk0;  // per sequence: first query / key row, counts, first packed block
  int64_t kbytes, vbytes;            // per packed (block, kv head)
};

int64_t cu_at(const c10::optional<at::Tensor>& cu, int64_t s, int64_t total) {
  if (!cu.has_value()) return s == 0 ? 0 : total;
  return cu->data_ptr<int32_t>()[s * cu->stride(0)];
}

// The keys some query of sequence s sees: [first, last).
std::pair<int64_t, int64_t> seen_keys(const Call& c, int64_t s) {
  Band b = c.band;
  b.lk = c.lk[s];
  const int64_t off = c.lk[s] - c.lq[s];
  if (c.lq[s] == 0) return {0, 0};
  const int64_t first = b.lo(off), last = b.hi(c.lq[s] - 1 + off);
  return {first, std::max(first, last)};
}

#if defined(CPU_CAPABILITY_AVX512)
// One key row into the bfloat16 pair layouts: its K pairs (32 bits each) BK apart from kp, its V elements every other
// 16 bits of vp's pair rows (`odd`: the second of its pair), 16 at a time as 32-bit lanes under a 16-bit mask.
void pack_pairs(const at::BFloat16* kr, const at::BFloat16* vr, int64_t d, int64_t dv, bool odd, uint32_t* kp,
                at::BFloat16* vp) {
  for (int64_t e = 0; e + 1 < d; e += 2) std::memcpy(kp + e / 2 * BK, kr + e, 4);
  if (d % 2) kp[d / 2 * BK] = kr[d - 1].x;  // the pad half stays 0
  const __mmask32 half = odd ? 0xAAAAAAAAu : 0x55555555u;
  int64_t e = 0;
  for (; e + W <= dv; e += W) {
    const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vr + e)));
    _mm512_mask_storeu_epi16(vp + 2 * e, half, odd ? _mm512_slli_epi32(x, 16) : x);
  }
  for (; e < dv; ++e) vp[2 * e + odd] = vr[e];
}
#endif

// Packs key block kb of sequence s, kv head h into dst: keys outside [first, last) (never seen; memory there may hold
// anything) and beyond the head dims as zeros.
template <typename T>
void pack(const Call& c, const Layout& k, const Layout& v, int64_t s, int64_t kb, int64_t h, char* dst) {
  const auto [first, last] = seen_keys(c, s);
  const T* kbase = static_cast<const T*>(k.data) + c.k0[s] * k.row + h * k.head;
  const T* vbase = static_cast<const T*>(v.data) + c.k0[s] * v.row + h * v.head;
  std::memset(dst, 0, c.kbytes + c.vbytes);
  const int64_t j0 = std::max(first, kb * BK), j1 = std::min(last, (kb + 1) * BK);
  for (int64_t j = j0; j < j1; ++j) {
    const T* kr = kbase + j * k.row;
    const T* vr = vbase + j * v.row;
    const int64_t jj = j - kb * BK;
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, at::BFloat16>)
      if (c.pairs) {  // [dp/2, BK, 2] and [BK/2, dvp, 2]
        pack_pairs(kr, vr, c.D, c.Dv, jj % 2, reinterpret_cast<uint32_t*>(dst) + jj,
                   reinterpret_cast<at::BFloat16*>(dst + c.kbytes) + jj / 2 * c.dvp * 2);
        continue;
      }
#endif
    float* kt = reinterpret_cast<float*>(dst);  // [D, BK] and [BK, dvp] float32
    float* vf = reinterpret_cast<float*>(dst + c.kbytes) + jj * c.dvp;
    for (int64_t e = 0; e < c.D; ++e) kt[e * BK + jj] = static_cast<float>(kr[e]);
    for (int64_t e = 0; e < c.Dv; ++e) vf[e] = static_cast<float>(vr[e]);
  }
}

// A thread's working rows for one query block: queries, the running max m and sums l (a vector of partial sums
// per row) in log2 units, the accumulators' rescale c, the weights p of a key block; under a block mask the keys
// each row sees of a key block (bits) and that block's values with the keys no row sees zeroed (values).
struct Rows {
  std::vector<float> qf, acc, m, c, p;
  std::vector<Vec> l;
  std::vector<at::BFloat16> qb, pb;
  std::vector<uint64_t> bits;
  std::vector<char> values;
  Rows(const Call& k, bool masked)
      : qf(k.pairs ? 0 : BQ * k.D, 0.f), acc(BQ * k.dvp), m(BQ), c(BQ), p(BQ * BK, 0.f), l(BQ),
        qb(k.pairs ? BQ * k.dp : 0, at::BFloat16(0.f)), pb(k.pairs ? BQ * BK : 0, at::BFloat16(0.f)),
        bits(masked ? BQ : 0, 0), values(masked ? k.vbytes : 0) {}
};

// The online-softmax update of RB rows (query positions p0 + i) by key block [k0, k0 + BK), scores a (times mul:
// log2 units), capped at `cap` (0: not): keys outside a row's band hidden unless `full` (with `bits`: keys whose
// bit is clear), the running max m and sums l, c = 2^(m_old - m), p [RB, BK] = 2^(a - m).
void update(Block& a, float mul, float cap, const Band& band, int64_t p0, int64_t k0, bool full, const uint64_t* bits,
            float* m, Vec* l, float* c, float* p) {
  float top[W];
  for (int i = 0; i < RB; ++i) {
    if (mul != 1.f)
      for (int x = 0; x < NV; ++x) a[i][x] = a[i][x] * Vec(mul);
    if (cap > 0.f)
      for (int x = 0; x < NV; ++x) a[i][x] = portable_attn_cpu::cap_tanh(a[i][x] * Vec(1.f / cap), cap);
    if (bits != nullptr) {
      for (int x = 0; x < NV; ++x) a[i][x] = hide(a[i][x], bits[i] >> (x * W));
    } else if (!full) {
      const Vec lo(float(band.lo(p0 + i) - k0)), hi(float(band.hi(p0 + i) - k0));
      for (int x = 0; x < NV; ++x) {
        const Vec j = Vec::arange(float(x * W), 1.f);
        a[i][x] = Vec::blendv(a[i][x], Vec(NEG_INF), (j < lo) | (j >= hi));
      }
    }
    Vec mx = a[i][0];
    for (int x = 1; x < NV; ++x) mx = vmax(mx, a[i][x]);
    top[i] = std::max(m[i], hmax(mx));
  }
  exp2_neg(Vec::loadu(m, RB) - Vec::loadu(top, RB)).store(c, RB);
  for (int i = 0; i < RB; ++i) {
    Vec sum(0.f);
    for (int x = 0; x < NV; ++x) {
      const Vec e = exp2_neg(a[i][x] - Vec(top[i]));
      e.store(p + i * BK + x * W);
      sum = sum + e;
    }
    l[i] = at::vec::fmadd(l[i], Vec(c[i]), sum);
    m[i] = top[i];
  }
}

template <typename T>
struct Kernel {
  const Call& c;
  const Mask& mask;
  Layout q;
  const char* packed;  // blocks of kv heads h0 .. h0 + nh
  int64_t h0, nh;
  const float* sinks;
  float scale;         // softmax scale x log2(e): scores in log2 units
  float cap;           // softcap x log2(e), 0: none
  T* o;
  int64_t o0, o1;      // out's row and head strides (its last one 1)
  float* lse;
  int64_t l0, l1;

  const char* block(int64_t s, int64_t kb, int64_t h) const {
    return packed + ((c.blk0[s] + kb) * nh + h - h0) * (c.kbytes + c.vbytes);
  }

  // Query rows t0 .. t0 + n of sequence s, head hq.
  void run(Rows& r, int64_t s, int64_t hq, int64_t t0, int64_t n) const {
    Band band = c.band;
    band.lk = c.lk[s];
    const int64_t off = c.lk[s] - c.lq[s], p0 = t0 + off, h = hq / (c.Hq / c.Hkv);
    load_queries(r, s, hq, t0, n);
    std::fill(r.acc.begin(), r.acc.end(), 0.f);
    std::fill(r.m.begin(), r.m.end(), LOWEST);
    std::fill(r.l.begin(), r.l.end(), Vec(0.f));
    const int64_t lo = band.lo(p0), hi = band.hi(p0 + n - 1), rows = (n + RB - 1) / RB * RB;
    const int64_t base = mask.layout != nullptr ? mask.offset(s, hq) : 0;
    for (int64_t kb = lo / BK; lo < hi && kb * BK < hi; ++kb) {
      const bool full = band.lo(p0 + n - 1) <= kb * BK && band.hi(p0) >= (kb + 1) * BK;
      const char* blk = block(s, kb, h);
      const int64_t k0 = kb * BK, k1 = std::min(k0 + BK, band.lk);
      const Mask::Cover seen = mask.layout != nullptr ? mask.cover(base, p0, p0 + n, k0, k1) : Mask::ALL;
      if (seen == Mask::ALL && (full || mask.layout == nullptr)) {
        step(r, rows, band, p0, kb, full, nullptr, blk, blk + c.kbytes);
      } else if (seen != Mask::NONE) {
        const char* values = visible(r, base, band, p0, n, k0, k1, blk + c.kbytes);
        if (values != nullptr) step(r, rows, band, p0, kb, false, r.bits.data(), blk, values);
      }
    }
    write(r, s, hq, t0, n);
  }

  // Under a block mask, the keys [k0, k1) each of the n rows from position p0 sees (r.bits: band and mask); the key
  // block's values `v`, or a copy with the keys no row sees zeroed (they may hold NaN: 0 x NaN is NaN), or none where
  // no row sees any key.
  const char* visible(Rows& r, int64_t base, const Band& band, int64_t p0, int64_t n, int64_t k0, int64_t k1,
                      const char* v) const {
    uint64_t seen = 0;
    std::fill(r.bits.begin(), r.bits.end(), 0);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p = p0 + i, a = std::max(band.lo(p), k0), b = std::min(band.hi(p), k1);
      r.bits[i] = b > a ? mask.row(base, p, k0, k1) & (span(b - a) << (a - k0)) : 0;
      seen |= r.bits[i];
    }
    if (seen == 0) return nullptr;
    const uint64_t dead = ~seen & span(k1 - k0);
    if (dead == 0) return v;
    std::memcpy(r.values.data(), v, c.vbytes);
    for (int64_t j = 0; j < k1 - k0; ++j) {
      if (!((dead >> j) & 1)) continue;
      if (c.pairs)  // [BK/2, dvp, 2] bfloat16
        for (int64_t e = 0; e < c.dvp; ++e)
          reinterpret_cast<at::BFloat16*>(r.values.data())[(j / 2 * c.dvp + e) * 2 + j % 2] = 0.f;
      else  // [BK, dvp] float32
        std::fill_n(reinterpret_cast<float*>(r.values.data()) + j * c.dvp, c.dvp, 0.f);
    }
    return r.values.data();
  }

  void load_queries(Rows& r, int64_t s, int64_t hq, int64_t t0, int64_t n) const {
    const T* base = static_cast<const T*>(q.data) + (c.q0[s] + t0) * q.row + hq * q.head;
    if constexpr (std::is_same_v<T, at::BFloat16>)
      if (c.pairs) {  // bfloat16 as it came (scaled in update)
        for (int64_t i = 0; i < n; ++i) std::memcpy(&r.qb[i * c.dp], base + i * q.row, c.D * sizeof(T));
        std::fill(r.qb.begin() + n * c.dp, r.qb.end(), T(0.f));
        return;
      }
    for (int64_t i = 0; i < BQ; ++i)
      for (int64_t e = 0; e < c.D; ++e)
        r.qf[i * c.D + e] = i < n ? static_cast<float>(base[i * q.row + e]) * scale : 0.f;
  }

  // update() of rows i .. i + RB by key block kb
  void softmax(Rows& r, Block& a, float mul, const Band& band, int64_t p0, int64_t kb, bool full, const uint64_t* bits,
               int64_t i) const {
    update(a, mul, cap, band, p0 + i, kb * BK, full, bits == nullptr ? nullptr : bits + i, r.m.data() + i,
           r.l.data() + i, r.c.data() + i, r.p.data() + i * BK);
  }

  // Key block kb (packed keys kp, values vp) for the first `rows` rows, RB at a time: scores and softmax update for
  // all rows (`bits`: the keys each row sees), then P V (K and V blocks of float32 together fill L1: one at a time).
  void step(Rows& r, int64_t rows, const Band& band, int64_t p0, int64_t kb, bool full, const uint64_t* bits,
            const char* kp, const char* vp) const {
    Block a;
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, at::BFloat16>)
      if (c.pairs) {
        for (int64_t i = 0; i < rows; i += RB) {
          scores_bf16(r.qb.data() + i * c.dp, c.dp, reinterpret_cast<const at::BFloat16*>(kp), a);
          softmax(r, a, scale, band, p0, kb, full, bits, i);
          to_bf16(r.p.data() + i * BK, r.pb.data() + i * BK);
        }
        for (int64_t i = 0; i < rows; i += RB)
          in_columns(c.dvp, [&](auto NC, int64_t e0) {
            values_bf16<decltype(NC)::value>(r.acc.data() + i * c.dvp, c.dvp, r.c.data() + i, r.pb.data() + i * BK,
                                             reinterpret_cast<const at::BFloat16*>(vp), e0);
          });
        return;
      }
#endif
    for (int64_t i = 0; i < rows; i += RB) {
      scores_f32(r.qf.data() + i * c.D, c.D, reinterpret_cast<const float*>(kp), a);
      softmax(r, a, 1.f, band, p0, kb, full, bits, i);
    }
    for (int64_t i = 0; i < rows; i += RB)
      in_columns(c.dvp, [&](auto NC, int64_t e0) {
        values_f32<decltype(NC)::value>(r.acc.data() + i * c.dvp, c.dvp, r.c.data() + i, r.p.data() + i * BK,
                                        reinterpret_cast<const float*>(vp), e0);
      });
  }

  // o = acc / l (the sink joining the denominator), lse = m + log l; a row that saw nothing: o = 0, lse = -inf.
  void write(const Rows& r, int64_t s, int64_t hq, int64_t t0, int64_t n) const {
    for (int64_t i = 0; i < n; ++i) {
      const float l = at::vec::vec_reduce_all<float>([](Vec& u, Vec& w) { return u + w; }, r.l[i]);
      float total = l > 0 ? (r.m[i] + std::log2(l)) * float(M_LN2) : NEG_INF, weight = l > 0 ? 1.f / l : 0.f;
      if (sinks != nullptr) {
        const float z = sinks[hq], both = std::max(total, z);
        const float joined = both == NEG_INF ? NEG_INF : both + std::log(std::exp(total - both) + std::exp(z - both));
        weight = l > 0 ? std::exp(total - joined) / l : 0.f;
        total = joined;
      }
      const int64_t t = c.q0[s] + t0 + i;
      T* dst = o + t * o0 + hq * o1;
      for (int64_t e = 0; e < c.Dv; ++e) dst[e] = static_cast<T>(r.acc[i * c.dvp + e] * weight);
      if (lse != nullptr) lse[hq * l0 + t * l1] = total;
    }
  }
};

template <typename T>
void flash(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& cu_q,
           const c10::optional<at::Tensor>& cu_k, bool causal, int64_t left, int64_t right, double scale,
           double softcap, const float* sinks, const Mask& mask, at::Tensor& out, const c10::optional<at::Tensor>& lse,
           int64_t keep_bytes) {
  Call c;
  c.S = cu_q.has_value() ? cu_q->size(0) - 1 : 1;
  c.Hq = q.size(1), c.Hkv = k.size(1), c.D = q.size(2), c.Dv = v.size(2);
  c.pairs = std::is_same_v<T, at::BFloat16> && bf16_unit();
  c.dp = (c.D + 1) / 2 * 2, c.dvp = (c.Dv + W - 1) / W * W;
  c.band = Band{causal, left, right, 0};
  c.kbytes = c.pairs ? c.dp * BK * 2 : c.D * BK * 4;
  c.vbytes = c.pairs ? BK * c.dvp * 2 : BK * c.dvp * 4;
  int64_t blocks = 0;
  for (int64_t s = 0; s < c.S; ++s) {
    c.q0.push_back(cu_at(cu_q, s, q.size(0)));
    c.lq.push_back(cu_at(cu_q, s + 1, q.size(0)) - c.q0[s]);
    c.k0.push_back(cu_at(cu_k, s, k.size(0)));
    c.lk.push_back(cu_at(cu_k, s + 1, k.size(0)) - c.k0[s]);
    c.blk0.push_back(blocks);
    blocks += (c.lk[s] + BK - 1) / BK;
  }
  // kv heads in groups whose packed blocks fit keep_bytes (kept per calling thread: fresh pages cost their faults;
  // a group of one head that does not fit gets a fresh buffer), each group's blocks packed, then its query heads run
  const int64_t per_head = std::max<int64_t>(1, blocks * (c.kbytes + c.vbytes));
  const int64_t group = std::clamp<int64_t>(keep_bytes / per_head, 1, std::max<int64_t>(1, c.Hkv));
  const size_t need = size_t(group * per_head) + 64;
  thread_local std::vector<char> kept;
  std::vector<char> fresh;
  std::vector<char>& store = group * per_head <= keep_bytes ? kept : fresh;
  if (store.size() < need) store.resize(need);
  char* packed = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(store.data()) + 63) & ~uintptr_t(63));
  std::vector<std::pair<int64_t, int64_t>> jobs;  // (sequence, block) to pack
  for (int64_t s = 0; s < c.S; ++s) {
    const auto [first, last] = seen_keys(c, s);
    for (int64_t kb = first / BK; first < last && kb * BK < last; ++kb) jobs.emplace_back(s, kb);
  }
  const Layout kl{k.data_ptr(), k.stride(0), k.stride(1)}, vl{v.data_ptr(), v.stride(0), v.stride(1)};
  const int64_t g = c.Hkv > 0 ? c.Hq / c.Hkv : 0;
  for (int64_t h0 = 0; h0 < c.Hkv; h0 += group) {
    const int64_t nh = std::min(group, c.Hkv - h0);
    at::parallel_for(0, int64_t(jobs.size()) * nh, 8, [&](int64_t b, int64_t e) {
      for (int64_t w = b; w < e; ++w) {
        const auto [s, kb] = jobs[w / nh];
        pack<T>(c, kl, vl, s, kb, h0 + w % nh, packed + ((c.blk0[s] + kb) * nh + w % nh) * (c.kbytes + c.vbytes));
      }
    });
    // work items (sequence, query head, query block), the costly last blocks of a head first; threads take them in
    // turn (causal blocks cost unlike)
    std::vector<std::array<int64_t, 3>> items;
    for (int64_t s = 0; s < c.S; ++s)
      for (int64_t hq = h0 * g; hq < (h0 + nh) * g; ++hq)
        for (int64_t qb = (c.lq[s] + BQ - 1) / BQ - 1; qb >= 0; --qb) items.push_back({s, hq, qb});
    const Kernel<T> kern{c, mask, Layout{q.data_ptr(), q.stride(0), q.stride(1)}, packed, h0, nh, sinks,
                         static_cast<float>(scale / M_LN2),
                         static_cast<float>(softcap / M_LN2),
                         out.data_ptr<T>(), out.stride(0), out.stride(1),
                         lse.has_value() ? lse->data_ptr<float>() : nullptr,
                         lse.has_value() ? lse->stride(0) : 0, lse.has_value() ? lse->stride(1) : 0};
    std::atomic<int64_t> next{0};
    const int64_t n_items = items.size();
    at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n_items), 1, [&](int64_t, int64_t) {
      Rows r(c, mask.layout != nullptr);
      for (int64_t w = next++; w < n_items; w = next++) {
        const auto [s, hq, qb] = items[w];
        kern.run(r, s, hq, qb * BQ, std::min(BQ, c.lq[s] - qb * BQ));
      }
    });
  }
}

}  // namespace

// q [Tq, Hq, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv] (k and v: last axes contiguous), cu_seqlens_q/k int32 [S + 1] or
// both none (one sequence), window (left, right) with -1 unbounded, softcap (0: none), sinks [Hq] or none, a block
// mask as masks.BlockMask holds it (layout int8 and partial_index int32 [S|1, Hq|1, nqb, nkb], partial_masks bool
// [M, bq, bk]) or none -> out [Tq, Hq, Dv] (into `out` when given) and lse [Hq, Tq] float32 when wanted (else
// undefined: None). Packed keys and values take at most keep_bytes kept across calls (more kv heads than fit are
// packed and run a group at a time).
std::tuple<at::Tensor, at::Tensor> flash_any(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& cu_seqlens_q,
    const c10::optional<at::Tensor>& cu_seqlens_k, bool causal, int64_t left, int64_t right, double scale,
    double softcap, const c10::optional<at::Tensor>& sinks, const c10::optional<at::Tensor>& layout,
    const c10::optional<at::Tensor>& partial_index, const c10::optional<at::Tensor>& partial_masks,
    std::vector<int64_t> block_size, const c10::optional<at::Tensor>& out, bool want_lse, int64_t keep_bytes) {
  const auto unit = [](const at::Tensor& x) { return x.stride(2) == 1 || x.size(2) <= 1 || x.numel() == 0; };
  TORCH_CHECK(unit(k) && unit(v), "flash: last axes of k and v contiguous");
  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(), "flash: cu_seqlens_q and _k, both or neither");
  const at::Tensor qc = unit(q) ? q : q.contiguous();
  at::Tensor o = out.has_value() && unit(*out) ? *out : at::empty({q.size(0), q.size(1), v.size(2)}, q.options());
  c10::optional<at::Tensor> lse;
  if (want_lse) lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  const at::Tensor sink = sinks.has_value() ? sinks->to(at::kFloat).contiguous() : at::Tensor();
  Mask mask;
  at::Tensor lay, idx, pm;  // the mask's tensors as read (kept alive for the call)
  if (layout.has_value()) {
    TORCH_CHECK(partial_index.has_value() && partial_masks.has_value() && block_size.size() == 2,
                "flash: a block mask's layout, partial_index, partial_masks and block_size together");
    lay = layout->contiguous(), idx = partial_index->contiguous(), pm = partial_masks->contiguous();
    mask = Mask{lay.data_ptr<int8_t>(), idx.data_ptr<int32_t>(), reinterpret_cast<const uint8_t*>(pm.data_ptr<bool>()),
                lay.size(0), lay.size(1), lay.size(2), lay.size(3), block_size[0], block_size[1]};
  }
  const float* sp = sink.defined() ? sink.data_ptr<float>() : nullptr;
  const auto run = [&](auto type) {
    flash<decltype(type)>(qc, k, v, cu_seqlens_q, cu_seqlens_k, causal, left, right, scale, softcap, sp, mask, o, lse,
                          keep_bytes);
  };
  switch (q.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(at::BFloat16{}); break;
    case at::kHalf: run(at::Half{}); break;
    default: TORCH_CHECK(false, "flash: float32, bfloat16 or float16 tensors, not ", q.scalar_type());
  }
  if (out.has_value() && !o.is_same(*out)) o = out->copy_(o);  // an out= whose last axis is strided
  return {o, lse.has_value() ? *lse : at::Tensor()};
}
