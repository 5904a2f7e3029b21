// One decode token of the gated delta rule (and KDA) per sequence, the state cache updated in place: each
// (sequence, value head) state [K, V] read once and written once from memory, where torch's ops made five passes
// over it (decay, the two products, the rank-one update) and a batched product of two rows ran at a fifth of the
// copy bandwidth. Pass 1 decays the rows and takes S'^T k and S'^T q while a block of columns sits in registers;
// pass 2 adds k u^T to the rows (still in L2) and writes them back. Built with decode.cpp by native.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t COLS = 4;  // vectors of columns per block of pass 1: 8 accumulators in registers

// n elements of x, `stride` apart, as float32 into dst.
template <typename T>
void read(const T* x, int64_t stride, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(x[i * stride]);
}

// The elements of t from offset `at` (of t's storage, in elements), `stride` apart, as float32: the small
// per-head vectors (q, k, v, g, beta) in whatever dtype they came.
void read_any(const at::Tensor& t, int64_t at, int64_t stride, int64_t n, float* dst) {
  switch (t.scalar_type()) {
    case at::kFloat: return read(t.data_ptr<float>() + at, stride, n, dst);
    case at::kBFloat16: return read(t.data_ptr<at::BFloat16>() + at, stride, n, dst);
    case at::kHalf: return read(t.data_ptr<at::Half>() + at, stride, n, dst);
    default: TORCH_CHECK(false, "delta_step: float32, bfloat16 or float16 tensors, not ", t.scalar_type());
  }
}

template <typename T>
void write(const float* src, int64_t n, T* x, int64_t stride) {
  for (int64_t i = 0; i < n; ++i) x[i * stride] = static_cast<T>(src[i]);
}

float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// x <- x rsqrt(sum x^2 + 1e-6), as the spec's use_qk_l2norm
void l2norm(float* x, int64_t n) {
  const float r = 1.f / std::sqrt(dot(x, x, n) + 1e-6f);
  for (int64_t i = 0; i < n; ++i) x[i] *= r;
}

// Pass 1 over columns [j, j + NV vectors) of w [K, V] (float32, rows V apart): w_i <- a_i w_i, and the columns'
// sums kk = w'^T k and qq = w'^T q. `last` lanes of the last vector where the block ends inside one (else 0).
template <int NV>
void decay_block(float* w, int64_t K, int64_t V, int64_t j, const float* a, int64_t a_step, const float* k,
                 const float* q, float* kk, float* qq, int64_t last) {
  const int64_t n = Vec::size();
  Vec ak[NV], aq[NV];
  for (int x = 0; x < NV; ++x) ak[x] = aq[x] = Vec(0.f);
  for (int64_t i = 0; i < K; ++i) {
    float* row = w + i * V + j;
    const Vec ai(a[i * a_step]), ki(k[i]), qi(q[i]);
    for (int x = 0; x < NV; ++x) {
      const bool part = last && x == NV - 1;
      Vec s = part ? Vec::loadu(row + x * n, last) : Vec::loadu(row + x * n);
      s = s * ai;
      part ? s.store(row + x * n, last) : s.store(row + x * n);
      ak[x] = at::vec::fmadd(s, ki, ak[x]);
      aq[x] = at::vec::fmadd(s, qi, aq[x]);
    }
  }
  for (int x = 0; x < NV; ++x) {
    const bool part = last && x == NV - 1;
    part ? ak[x].store(kk + j + x * n, last) : ak[x].store(kk + j + x * n);
    part ? aq[x].store(qq + j + x * n, last) : aq[x].store(qq + j + x * n);
  }
}

void decay(float* w, int64_t K, int64_t V, const float* a, int64_t a_step, const float* k, const float* q, float* kk,
           float* qq) {
  const int64_t n = Vec::size();
  int64_t j = 0;
  for (; j + COLS * n <= V; j += COLS * n) decay_block<COLS>(w, K, V, j, a, a_step, k, q, kk, qq, 0);
  for (; j < V; j += n) decay_block<1>(w, K, V, j, a, a_step, k, q, kk, qq, V - j < n ? V - j : 0);
}

// Pass 2: w_i <- w_i + k_i u for every row i, each row then stored into the state row (its dtype) unless the state
// is w itself.
template <typename S>
void update(float* w, int64_t K, int64_t V, const float* k, const float* u, S* state, int64_t row_stride) {
  const int64_t n = Vec::size();
  for (int64_t i = 0; i < K; ++i) {
    float* row = w + i * V;
    const Vec ki(k[i]);
    int64_t j = 0;
    for (; j + n <= V; j += n) at::vec::fmadd(ki, Vec::loadu(u + j), Vec::loadu(row + j)).store(row + j);
    if (j < V) at::vec::fmadd(ki, Vec::loadu(u + j, V - j), Vec::loadu(row + j, V - j)).store(row + j, V - j);
    if constexpr (!std::is_same_v<S, float>) at::vec::convert(row, state + i * row_stride, V);
  }
}

int64_t index_at(const at::Tensor& rows, int64_t b) {
  return rows.scalar_type() == at::kInt ? rows.data_ptr<int32_t>()[b * rows.stride(0)]
                                        : rows.data_ptr<int64_t>()[b * rows.stride(0)];
}

template <typename S>
void delta_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                const at::Tensor& beta, at::Tensor state, const at::Tensor& rows, double scale, bool l2,
                at::Tensor out) {
  const int64_t B = v.size(0), Hv = v.size(1), V = v.size(2), H = q.size(1), K = q.size(2), r = Hv / H;
  const bool per_key = g.dim() == 3;
  S* sp = state.data_ptr<S>();
  const int64_t s0 = state.stride(0), s1 = state.stride(1);
  const auto o_type = out.scalar_type();
  at::parallel_for(0, B * Hv, 4, [&](int64_t begin, int64_t end) {
    // per thread: the small vectors as float32, and w, the state [K, V] being updated where it is not updated in place
    std::vector<float> small(4 * K + 4 * V + 1), scratch(std::is_same_v<S, float> ? 0 : K * V);
    float *qf = small.data(), *kf = qf + K, *af = kf + K, *vf = af + K, *kk = vf + V, *qq = kk + V, *u = qq + V;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hv, h = item % Hv, hq = h / r;
      read_any(q, b * q.stride(0) + hq * q.stride(1), q.stride(2), K, qf);
      read_any(k, b * k.stride(0) + hq * k.stride(1), k.stride(2), K, kf);
      read_any(v, b * v.stride(0) + h * v.stride(1), v.stride(2), V, vf);
      read_any(g, b * g.stride(0) + h * g.stride(1), per_key ? g.stride(2) : 0, per_key ? K : 1, af);
      float bt;
      read_any(beta, b * beta.stride(0) + h * beta.stride(1), 0, 1, &bt);
      if (l2) {
        l2norm(qf, K);
        l2norm(kf, K);
      }
      for (int64_t i = 0; i < (per_key ? K : 1); ++i) af[i] = std::exp(af[i]);
      const int64_t slot = index_at(rows, b);
      S* st = slot >= 0 ? sp + slot * s0 + h * s1 : nullptr;  // -1: a zero state, nothing written
      float* w = std::is_same_v<S, float> ? reinterpret_cast<float*>(st) : scratch.data();
      if (st != nullptr) {
        if constexpr (!std::is_same_v<S, float>) at::vec::convert(st, w, K * V);
        decay(w, K, V, af, per_key ? 1 : 0, kf, qf, kk, qq);
      } else {
        std::fill(kk, kk + 2 * V, 0.f);  // kk and qq
      }
      const float qk = dot(qf, kf, K);
      for (int64_t j = 0; j < V; ++j) {  // u = beta (v - S'^T k); o = (S'^T q + (q.k) u) scale
        u[j] = bt * (vf[j] - kk[j]);
        qq[j] = (qq[j] + qk * u[j]) * static_cast<float>(scale);
      }
      if (st != nullptr) update<S>(w, K, V, kf, u, st, V);
      const int64_t o_at = b * out.stride(0) + h * out.stride(1);
      switch (o_type) {
        case at::kFloat: write(qq, V, out.data_ptr<float>() + o_at, out.stride(2)); break;
        case at::kBFloat16: write(qq, V, out.data_ptr<at::BFloat16>() + o_at, out.stride(2)); break;
        default: write(qq, V, out.data_ptr<at::Half>() + o_at, out.stride(2)); break;
      }
    }
  });
}

}  // namespace

// q, k [B, H, K], v [B, Hv, V] (float32, bfloat16 or float16, any strides); g [B, Hv] or [B, Hv, K] (log-decay), beta
// [B, Hv]; state [slots, Hv, K, V] float32 or the activation dtype, each [K, V] contiguous; rows int32 or int64 [B]
// (-1: a zero state, nothing written; no row twice); out [B, Hv, V] of the activation dtype. The state rows listed
// are updated in place; out gets scale * (S^T q) of the updated state.
void delta_step_any(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                    const at::Tensor& beta, at::Tensor state, const at::Tensor& rows, double scale, bool l2,
                    at::Tensor out) {
  TORCH_CHECK(state.dim() == 4 && state.stride(3) == 1 && state.stride(2) == state.size(3),
              "delta_step: state [slots, Hv, K, V] with each [K, V] contiguous");
  TORCH_CHECK(rows.scalar_type() == at::kInt || rows.scalar_type() == at::kLong, "delta_step: rows int32 or int64");
  TORCH_CHECK(out.scalar_type() == v.scalar_type(), "delta_step: out in v's dtype");
  switch (state.scalar_type()) {
    case at::kFloat: return delta_step<float>(q, k, v, g, beta, state, rows, scale, l2, out);
    case at::kBFloat16: return delta_step<at::BFloat16>(q, k, v, g, beta, state, rows, scale, l2, out);
    case at::kHalf: return delta_step<at::Half>(q, k, v, g, beta, state, rows, scale, l2, out);
    default: TORCH_CHECK(false, "delta_step: a float32, bfloat16 or float16 state, not ", state.scalar_type());
  }
}
