// Decode on the CPU: one query per sequence over its keys (listed by a block table, or packed rows), read in
// place (no gather), each key and value row read once. Built on first use by native.py, for the
// vector width of the machine it runs on (ATen's Vectorized<float>).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t TILE = Vec::size();  // keys per softmax update: one vector of scores per query head
const float NEG_INF = -std::numeric_limits<float>::infinity();

float hsum(Vec x) { return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, x); }
float hmax(Vec x) { return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x); }

// G query rows against one key row: out[i * stride] = q_i . k (q rows D apart), k read once per chunk.
template <int G>
void dots(const float* q, const float* k, int64_t d, float* out, int64_t stride) {
  Vec acc[G];
  for (int i = 0; i < G; ++i) acc[i] = Vec(0.f);
  int64_t e = 0;
  for (; e + Vec::size() <= d; e += Vec::size()) {
    const Vec kv = Vec::loadu(k + e);
    for (int i = 0; i < G; ++i) acc[i] = at::vec::fmadd(Vec::loadu(q + i * d + e), kv, acc[i]);
  }
  for (int i = 0; i < G; ++i) {
    float r = hsum(acc[i]);
    for (int64_t t = e; t < d; ++t) r += q[i * d + t] * k[t];
    out[i * stride] = r;
  }
}

// G accumulator rows (dv apart) += p_i v, v read once per chunk; p_i = p[i * stride].
template <int G>
void axpys(float* acc, const float* p, int64_t stride, const float* v, int64_t dv) {
  Vec pv[G];
  for (int i = 0; i < G; ++i) pv[i] = Vec(p[i * stride]);
  int64_t e = 0;
  for (; e + Vec::size() <= dv; e += Vec::size()) {
    const Vec vv = Vec::loadu(v + e);
    for (int i = 0; i < G; ++i) at::vec::fmadd(pv[i], vv, Vec::loadu(acc + i * dv + e)).store(acc + i * dv + e);
  }
  for (int i = 0; i < G; ++i)
    for (int64_t t = e; t < dv; ++t) acc[i * dv + t] += p[i * stride] * v[t];
}

// f(std::integral_constant<int, G>, i) over rows i .. i + G of g rows, in blocks of 8, 4, 2 and 1 rows
template <typename F>
void in_blocks(int64_t g, F f) {
  int64_t i = 0;
  for (; i + 8 <= g; i += 8) f(std::integral_constant<int, 8>{}, i);
  if (g - i >= 4) { f(std::integral_constant<int, 4>{}, i); i += 4; }
  if (g - i >= 2) { f(std::integral_constant<int, 2>{}, i); i += 2; }
  if (g - i >= 1) f(std::integral_constant<int, 1>{}, i);
}

template <typename T>
const float* as_float(const T* row, int64_t stride, float* buf, int64_t n) {  // a cache row as contiguous float32
  if (stride != 1) {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(row[i * stride]);
    return buf;
  }
  if constexpr (std::is_same_v<T, float>) {
    return row;  // read in place
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(row[i]);  // unit stride: vectorised
    return buf;
  }
}

struct Strided {  // a cache [NB, BS, Hkv, D] read through its strides
  const void* data;
  int64_t block, slot, head, elem;
};

// Queries [S, Hq, D] (any strides), sinks [Hq] float32 or none -> out [S, Hq, Dv] (q's dtype, any strides), lse
// [Hq, S] float32. The keys of sequence s: paged, caches [NB, BS, Hkv, D|Dv] with block_table [S, MB] and
// seqused_k [S] (int32); or packed, k/v [T, 1, Hkv, D|Dv] with cu_seqlens_k [S + 1] (int32; none: one
// sequence of all T). Its query sits at its last key n - 1 and sees keys [first, n), first = n - 1 - left when
// left >= 0. Work items: (sequence, kv-head range), so that a batch smaller than the thread count still uses
// every thread.
template <typename T>
void decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const c10::optional<at::Tensor>& block_table, const c10::optional<at::Tensor>& seqused_k,
            const c10::optional<at::Tensor>& cu_seqlens_k, const c10::optional<at::Tensor>& sinks, double scale,
            int64_t left, double softcap, at::Tensor& out, at::Tensor& lse) {
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
  float* lp = lse.data_ptr<float>();
  const int64_t t0 = table ? block_table->stride(0) : 0, t1 = table ? block_table->stride(1) : 0;
  const int64_t u0 = used ? seqused_k->stride(0) : 0, c0 = cu ? cu_seqlens_k->stride(0) : 0;
  const auto qs = q.strides(), os = out.strides(), ls = lse.strides();
  const float cap = static_cast<float>(softcap);
  at::parallel_for(0, S * parts, 1, [&](int64_t begin, int64_t end) {
    const int64_t rows = per_part * g;
    std::vector<float> qf(rows * D), acc(rows * Dv), m(rows), l(rows), s(rows * TILE), kbuf(D), vbuf(Dv);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / parts, h0 = (w % parts) * per_part, h1 = std::min(Hkv, h0 + per_part);
      if (h0 >= h1) continue;
      const int64_t r0 = h0 * g, nr = (h1 - h0) * g;  // query heads r0 .. r0 + nr, local rows 0 .. nr
      const int64_t start = cu ? cu[b * c0] : 0;  // packed keys: the sequence's first row
      const int64_t n = table ? used[b * u0] : cu ? cu[(b + 1) * c0] - start : k_cache.size(0);
      const int64_t first = left >= 0 ? std::max<int64_t>(0, n - 1 - left) : 0;
      for (int64_t i = 0; i < nr; ++i)
        for (int64_t e = 0; e < D; ++e)
          qf[i * D + e] = static_cast<float>(qp[b * qs[0] + (r0 + i) * qs[1] + e * qs[2]]) * static_cast<float>(scale);
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), NEG_INF);  // the running max score
      std::fill(l.begin(), l.end(), 0.f);
      auto row = [&](const Strided& c, int64_t pos) {  // the row of key `pos`, kv head 0
        const T* data = static_cast<const T*>(c.data);
        return table ? data + table[b * t0 + (pos / BS) * t1] * c.block + (pos % BS) * c.slot
                     : data + (start + pos) * c.block;
      };
      for (int64_t j0 = first; j0 < n; j0 += TILE) {
        const int64_t t = std::min(TILE, n - j0);
        std::fill(s.begin(), s.begin() + nr * TILE, NEG_INF);
        for (int64_t j = 0; j < t; ++j) {  // scores s [nr, TILE]
          const T* kr = row(kc, j0 + j);
          for (int64_t h = h0; h < h1; ++h) {
            const float* k = as_float(kr + h * kc.head, kc.elem, kbuf.data(), D);
            const int64_t r = (h - h0) * g;  // its query heads' local rows r .. r + g
            in_blocks(g, [&](auto G, int64_t i) {
              dots<decltype(G)::value>(qf.data() + (r + i) * D, k, D, s.data() + (r + i) * TILE + j, TILE);
            });
          }
        }
        if (cap > 0)
          for (int64_t i = 0; i < nr; ++i)
            for (int64_t j = 0; j < t; ++j) s[i * TILE + j] = cap * std::tanh(s[i * TILE + j] / cap);
        for (int64_t i = 0; i < nr; ++i) {  // one rescale of the accumulators per tile
          const Vec sv = Vec::loadu(s.data() + i * TILE);
          const float top = std::max(m[i], hmax(sv));
          const float ref = std::isfinite(top) ? top : 0.f;  // no finite max: subtract nothing (as the reference)
          if (top != m[i] && l[i] != 0.f) {  // l = 0: nothing accumulated to rescale
            const float c = std::exp((std::isfinite(m[i]) ? m[i] : 0.f) - ref);
            l[i] *= c;
            for (int64_t e = 0; e < Dv; ++e) acc[i * Dv + e] *= c;
          }
          m[i] = top;
          const Vec p = (sv - Vec(ref)).exp();
          p.store(s.data() + i * TILE);
          l[i] += hsum(p);
        }
        for (int64_t j = 0; j < t; ++j) {  // acc [nr, Dv] += p v
          const T* vr = row(vc, j0 + j);
          for (int64_t h = h0; h < h1; ++h) {
            const float* v = as_float(vr + h * vc.head, vc.elem, vbuf.data(), Dv);
            const int64_t r = (h - h0) * g;
            in_blocks(g, [&](auto G, int64_t i) {
              axpys<decltype(G)::value>(acc.data() + (r + i) * Dv, s.data() + (r + i) * TILE + j, TILE, v, Dv);
            });
          }
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
        lp[(r0 + i) * ls[0] + b * ls[1]] = total;
      }
    }
  });
}

void decode_any(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                const c10::optional<at::Tensor>& block_table, const c10::optional<at::Tensor>& seqused_k,
                const c10::optional<at::Tensor>& cu_seqlens_k, const c10::optional<at::Tensor>& sinks, double scale,
                int64_t left, double softcap, at::Tensor out, at::Tensor lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode", [&] {
    decode<scalar_t>(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_k, sinks, scale, left, softcap, out, lse);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode", &decode_any, "one query per sequence over paged or packed keys, read in place (decode.cpp)");
}
