// The recurrent ops on the CPU, one (sequence, head) state at a time: the gated delta rule (and KDA) and linear
// attention (GLA: the same without the delta term) token by token with the state kept in the core's cache (sequence
// form) or read and written once (step form), and Mamba-2's SSD step. A gated-delta-rule token decays the state's rows and takes S'^T k and S'^T q while a block of columns sits
// in registers (pass 1), then adds k u^T (pass 2, folded into the next token's pass 1 in the sequence form).
// torch's ops made five passes over a step's state, and a batched product of two rows ran at a fifth of the copy
// bandwidth. Built with decode.cpp by native.py.
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

// The elements of t from element `off` of its data, `stride` apart, as float32: the small
// per-head vectors (q, k, v, g, beta) in whatever dtype they came.
void read_any(const at::Tensor& t, int64_t off, int64_t stride, int64_t n, float* dst) {
  switch (t.scalar_type()) {
    case at::kFloat: return read(t.data_ptr<float>() + off, stride, n, dst);
    case at::kBFloat16: return read(t.data_ptr<at::BFloat16>() + off, stride, n, dst);
    case at::kHalf: return read(t.data_ptr<at::Half>() + off, stride, n, dst);
    default: TORCH_CHECK(false, "recurrent kernels: float32, bfloat16 or float16 tensors, not ", t.scalar_type());
  }
}

template <typename T>
void write(const float* src, int64_t n, T* x, int64_t stride) {
  for (int64_t i = 0; i < n; ++i) x[i * stride] = static_cast<T>(src[i]);
}

// n floats into t from element `off` of its data, `stride` apart, in t's dtype (an output row)
void write_any(const float* src, int64_t n, at::Tensor& t, int64_t off, int64_t stride) {
  switch (t.scalar_type()) {
    case at::kFloat: return write(src, n, t.data_ptr<float>() + off, stride);
    case at::kBFloat16: return write(src, n, t.data_ptr<at::BFloat16>() + off, stride);
    default: return write(src, n, t.data_ptr<at::Half>() + off, stride);
  }
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

// Pass 1 over columns [j, j + NV vectors) of w [K, V] (float32, rows V apart): first the previous token's update
// w_i <- w_i + kp_i up where kp is given (the sequence form folds it into this pass), then w_i <- a_i w_i, and the
// columns' sums kk = w'^T k (with KK: the delta rule's) and qq = w'^T q. `last` lanes of the last vector where the
// block ends inside one (else 0).
template <int NV, bool KK>
void decay_block(float* w, int64_t K, int64_t V, int64_t j, const float* kp, const float* up, const float* a,
                 int64_t a_step, const float* k, const float* q, float* kk, float* qq, int64_t last) {
  const int64_t n = Vec::size();
  Vec ak[NV], aq[NV], u[NV];
  for (int x = 0; x < NV; ++x) {
    ak[x] = aq[x] = Vec(0.f);
    if (kp != nullptr) u[x] = last && x == NV - 1 ? Vec::loadu(up + j + x * n, last) : Vec::loadu(up + j + x * n);
  }
  for (int64_t i = 0; i < K; ++i) {
    float* row = w + i * V + j;
    const Vec ai(a[i * a_step]), ki(KK ? k[i] : 0.f), qi(q[i]);
    for (int x = 0; x < NV; ++x) {
      const bool part = last && x == NV - 1;
      Vec s = part ? Vec::loadu(row + x * n, last) : Vec::loadu(row + x * n);
      if (kp != nullptr) s = at::vec::fmadd(Vec(kp[i]), u[x], s);
      s = s * ai;
      part ? s.store(row + x * n, last) : s.store(row + x * n);
      if constexpr (KK) ak[x] = at::vec::fmadd(s, ki, ak[x]);
      aq[x] = at::vec::fmadd(s, qi, aq[x]);
    }
  }
  for (int x = 0; x < NV; ++x) {
    const bool part = last && x == NV - 1;
    if constexpr (KK) part ? ak[x].store(kk + j + x * n, last) : ak[x].store(kk + j + x * n);
    part ? aq[x].store(qq + j + x * n, last) : aq[x].store(qq + j + x * n);
  }
}

template <bool KK>
void decay(float* w, int64_t K, int64_t V, const float* kp, const float* up, const float* a, int64_t a_step,
           const float* k, const float* q, float* kk, float* qq) {
  const int64_t n = Vec::size();
  int64_t j = 0;
  for (; j + COLS * n <= V; j += COLS * n) decay_block<COLS, KK>(w, K, V, j, kp, up, a, a_step, k, q, kk, qq, 0);
  for (; j < V; j += n) decay_block<1, KK>(w, K, V, j, kp, up, a, a_step, k, q, kk, qq, V - j < n ? V - j : 0);
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

// A step form's working copy of one listed state row st (n floats): the row itself where S is float32, else st
// converted into `scratch`; nullptr where the row is -1 (st nullptr: a zero state).
template <typename S>
float* working(S* st, std::vector<float>& scratch, int64_t n) {
  if (st == nullptr) return nullptr;
  if constexpr (std::is_same_v<S, float>) {
    return st;
  } else {
    at::vec::convert(st, scratch.data(), n);
    return scratch.data();
  }
}

// f(S{}) for the state's dtype S
template <typename F>
void by_state_dtype(const at::Tensor& state, const char* what, F f) {
  switch (state.scalar_type()) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(at::BFloat16{});
    case at::kHalf: return f(at::Half{});
    default: TORCH_CHECK(false, what, ": a float32, bfloat16 or float16 state, not ", state.scalar_type());
  }
}

// One token's small vectors for one value head, float32 (per thread)
struct Token {
  std::vector<float> buf;
  float *q, *k, *a, *v, *kk, *qq, *u, beta = 0.f;
  Token(int64_t K, int64_t V) : buf(3 * K + 4 * V) {
    q = buf.data(), k = q + K, a = k + K, v = a + K, kk = v + V, qq = kk + V, u = qq + V;
  }
};

// The inputs of the op, read at row b (a token, or a sequence of the step form) for value head h. Without beta, linear
// attention: u = v (`delta` false); without g, no decay.
struct Inputs {
  const at::Tensor &q, &k, &v;
  const c10::optional<at::Tensor> &g, &beta;
  int64_t K, V, r;  // r: value heads per q/k head
  bool per_key, l2, delta;

  void read(int64_t b, int64_t h, Token& t) const {
    const int64_t hq = h / r;
    read_any(q, b * q.stride(0) + hq * q.stride(1), q.stride(2), K, t.q);
    read_any(k, b * k.stride(0) + hq * k.stride(1), k.stride(2), K, t.k);
    read_any(v, b * v.stride(0) + h * v.stride(1), v.stride(2), V, t.v);
    if (g.has_value())
      read_any(*g, b * g->stride(0) + h * g->stride(1), per_key ? g->stride(2) : 0, per_key ? K : 1, t.a);
    else
      t.a[0] = 0.f;  // exp(0): no decay
    if (delta) read_any(*beta, b * beta->stride(0) + h * beta->stride(1), 0, 1, &t.beta);
    if (l2) {
      l2norm(t.q, K);
      l2norm(t.k, K);
    }
    for (int64_t i = 0; i < (per_key ? K : 1); ++i) t.a[i] = std::exp(t.a[i]);
  }
};

// One token on the float32 state w [K, V] (nullptr: a zero state, left so): S' = diag(a) S, u = beta (v - S'^T k)
// (linear attention: u = v), t.qq <- the output (S'^T q + (q.k) u) scale, then S = S' + k u^T: its rows stored into `state` of type S,
// `row_stride` apart, unless that is w itself. With `prev` (the sequence form) that last update is not made
// here: the next token's pass makes it first (prev->k, prev->u: this token's k and u on return).
template <typename S>
void token(float* w, const Inputs& in, Token& t, float scale, S* state, int64_t row_stride, Token* prev = nullptr,
           bool pending = false) {
  const int64_t K = in.K, V = in.V;
  const float *kp = pending ? prev->k : nullptr, *up = pending ? prev->u : nullptr;
  const int64_t a_step = in.per_key ? 1 : 0;
  if (w == nullptr)
    std::fill(t.kk, t.kk + 2 * V, 0.f);  // kk and qq
  else if (in.delta)
    decay<true>(w, K, V, kp, up, t.a, a_step, t.k, t.q, t.kk, t.qq);
  else
    decay<false>(w, K, V, kp, up, t.a, a_step, t.k, t.q, t.kk, t.qq);
  const float qk = dot(t.q, t.k, K);
  for (int64_t j = 0; j < V; ++j) {
    t.u[j] = in.delta ? t.beta * (t.v[j] - t.kk[j]) : t.v[j];
    t.qq[j] = (t.qq[j] + qk * t.u[j]) * scale;
  }
  if (prev != nullptr) {
    std::copy(t.k, t.k + K, prev->k);
    std::copy(t.u, t.u + V, prev->u);
  } else if (w != nullptr) {
    update<S>(w, K, V, t.k, t.u, state, row_stride);
  }
}

// y into out[b, h, :] (n values, out's dtype)
void emit(const float* y, at::Tensor& out, int64_t b, int64_t h, int64_t n) {
  write_any(y, n, out, b * out.stride(0) + h * out.stride(1), out.stride(2));
}

Inputs inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& g,
              const c10::optional<at::Tensor>& beta, bool l2) {
  return Inputs{q, k, v, g, beta, q.size(2), v.size(2), v.size(1) / q.size(1), g.has_value() && g->dim() == 3, l2,
                beta.has_value()};
}

template <typename S>
void delta_step(const Inputs& in, at::Tensor state, const at::Tensor& rows, float scale, at::Tensor out) {
  const int64_t B = in.v.size(0), Hv = in.v.size(1), K = in.K, V = in.V;
  S* sp = state.data_ptr<S>();
  const int64_t s0 = state.stride(0), s1 = state.stride(1);
  at::parallel_for(0, B * Hv, 4, [&](int64_t begin, int64_t end) {
    Token t(K, V);
    std::vector<float> scratch(std::is_same_v<S, float> ? 0 : K * V);  // the state being updated, where not in place
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hv, h = item % Hv, slot = index_at(rows, b);
      in.read(b, h, t);
      S* st = slot >= 0 ? sp + slot * s0 + h * s1 : nullptr;  // -1: a zero state, nothing written
      token<S>(working(st, scratch, K * V), in, t, scale, st, V);
      emit(t.qq, out, b, h, V);
    }
  });
}

// Mamba-2's SSD step for one (sequence, head): d = clamp(f(dt + dt_bias), lo, hi) (f = softplus or identity),
// h = exp(d A) h + d x B^T row by row (P rows of N), y_p = h_p . C + D_p x_p, times silu(z_p) where z is given.
// run(): w is the state [P, N] as float32 (nullptr: a zero state, left so), its rows stored into `state` (type S)
// unless that is w itself; returns y (P floats in `buf`).
struct Ssd {
  const at::Tensor &x, &dt, &A, &B, &C;
  const c10::optional<at::Tensor> &D, &z, &dt_bias;
  bool softplus;
  float lo, hi;
  int64_t P, N, r;  // r: heads per B/C group

  float step_size(int64_t b, int64_t h) const {
    float d;
    read_any(dt, b * dt.stride(0) + h * dt.stride(1), 0, 1, &d);
    if (dt_bias.has_value()) {
      float bias;
      read_any(*dt_bias, h * dt_bias->stride(0), 0, 1, &bias);
      d += bias;
    }
    if (softplus) d = std::max(d, 0.f) + std::log1p(std::exp(-std::abs(d)));  // log(1 + e^d), no overflow
    return std::min(std::max(d, lo), hi);
  }

  template <typename S>
  const float* run(float* w, S* state, int64_t b, int64_t h, std::vector<float>& buf) const {
    float *xf = buf.data(), *Bf = xf + P, *Cf = Bf + N, *y = Cf + N, *extra = y + P;
    read_any(x, b * x.stride(0) + h * x.stride(1), x.stride(2), P, xf);
    read_any(B, b * B.stride(0) + h / r * B.stride(1), B.stride(2), N, Bf);
    read_any(C, b * C.stride(0) + h / r * C.stride(1), C.stride(2), N, Cf);
    const float d = step_size(b, h);
    float a_log;
    read_any(A, h * A.stride(0), 0, 1, &a_log);
    const Vec a(std::exp(d * a_log));
    const int64_t n = Vec::size();
    for (int64_t p = 0; p < P; ++p) {
      float* row = w != nullptr ? w + p * N : extra;  // a zero state: the row built in scratch, not kept
      const Vec dx(d * xf[p]);
      Vec acc(0.f);
      for (int64_t j = 0; j < N; j += n) {
        const int64_t m = std::min(n, N - j);
        const Vec old = w != nullptr ? Vec::loadu(row + j, m) : Vec(0.f);
        const Vec s = at::vec::fmadd(dx, Vec::loadu(Bf + j, m), old * a);
        s.store(row + j, m);
        acc = at::vec::fmadd(s, Vec::loadu(Cf + j, m), acc);
      }
      y[p] = at::vec::vec_reduce_all<float>([](Vec& u, Vec& v) { return u + v; }, acc);
      if constexpr (!std::is_same_v<S, float>)
        if (w != nullptr) at::vec::convert(row, state + p * N, N);
    }
    if (D.has_value()) {  // D [H] or [H, P]
      read_any(*D, h * D->stride(0), D->dim() == 2 ? D->stride(1) : 0, P, extra);
      for (int64_t p = 0; p < P; ++p) y[p] += extra[p] * xf[p];
    }
    if (z.has_value()) {
      read_any(*z, b * z->stride(0) + h * z->stride(1), z->stride(2), P, extra);
      for (int64_t p = 0; p < P; ++p) y[p] *= extra[p] / (1.f + std::exp(-extra[p]));
    }
    return y;
  }
};

template <typename S>
void ssd_step(const Ssd& in, at::Tensor state, const at::Tensor& rows, at::Tensor out) {
  const int64_t B = in.x.size(0), H = in.x.size(1), P = in.P, N = in.N;
  S* sp = state.data_ptr<S>();
  const int64_t s0 = state.stride(0), s1 = state.stride(1);
  at::parallel_for(0, B * H, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(3 * P + 2 * N + std::max(P, N)), scratch(std::is_same_v<S, float> ? 0 : P * N);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / H, h = item % H, slot = index_at(rows, b);
      S* st = slot >= 0 ? sp + slot * s0 + h * s1 : nullptr;  // -1: a zero state, nothing written
      emit(in.run<S>(working(st, scratch, P * N), st, b, h, buf), out, b, h, P);
    }
  });
}

// Whether each state of a cache [slots, H, M, N] is one contiguous [M, N] block (what the step kernels read).
bool rows_contiguous(const at::Tensor& state) {
  return state.dim() == 4 && state.stride(3) == 1 && state.stride(2) == state.size(3);
}

// A step's output: `out` where given, else a new contiguous tensor shaped and typed like `like` (made here: an
// allocation from Python costs several times as much).
at::Tensor output(const c10::optional<at::Tensor>& out, const at::Tensor& like, const char* what) {
  if (!out.has_value()) return at::empty(like.sizes(), like.options());
  TORCH_CHECK(out->scalar_type() == like.scalar_type(), what, ": out in the activation dtype");
  return *out;
}

}  // namespace

// q, k [B, H, K], v [B, Hv, V] (float32, bfloat16 or float16, any strides); g [B, Hv] or [B, Hv, K] (log-decay) or
// None (no decay), beta [B, Hv] or None (linear attention); state [slots, Hv, K, V] float32 or the activation dtype, each [K, V] contiguous; rows int32 or int64 [B]
// (-1: a zero state, nothing written; no row twice); out [B, Hv, V] of the activation dtype or None (made here). The
// state rows listed are updated in place; returns out with scale * (S^T q) of the updated state, or None where the
// states are not each contiguous (the caller's torch path).
at::Tensor delta_step_any(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const c10::optional<at::Tensor>& g, const c10::optional<at::Tensor>& beta, at::Tensor state, const at::Tensor& rows, double scale, bool l2,
                          const c10::optional<at::Tensor>& out) {
  if (!rows_contiguous(state)) return at::Tensor();  // None: the caller's torch path
  TORCH_CHECK(rows.scalar_type() == at::kInt || rows.scalar_type() == at::kLong, "delta_step: rows int32 or int64");
  at::Tensor o = output(out, v, "delta_step");
  const Inputs in = inputs(q, k, v, g, beta, l2);
  const float sc = static_cast<float>(scale);
  by_state_dtype(state, "delta_step", [&](auto s) { delta_step<decltype(s)>(in, state, rows, sc, o); });
  return o;
}

// The sequence form: q, k [T, H, K], v [T, Hv, V], g [T, Hv(, K)] or None, beta [T, Hv] or None as delta_step's (one
// row per token); cu int64 [S+1] contiguous; states float32 [S, Hv, K, V] contiguous, each sequence's initial state, its
// final state on return; out [T, Hv, V] of v's dtype. Token by token, each (sequence, head) state kept in the
// core's cache meanwhile: about 4 K V flops a token, where the chunked matrix form takes about 11 K V (its
// products at 64-token chunks) and only matrix units make those cheaper.
void delta_seq(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& g,
               const c10::optional<at::Tensor>& beta, const at::Tensor& cu, at::Tensor states, double scale, bool l2,
               at::Tensor out) {
  TORCH_CHECK(states.scalar_type() == at::kFloat && states.is_contiguous() && cu.scalar_type() == at::kLong &&
              cu.is_contiguous(), "delta_seq: states float32 [S, Hv, K, V] and cu int64, contiguous");
  TORCH_CHECK(out.scalar_type() == v.scalar_type(), "delta_seq: out in v's dtype");
  const Inputs in = inputs(q, k, v, g, beta, l2);
  const int64_t Hv = v.size(1), K = in.K, V = in.V;
  const int64_t* cp = cu.data_ptr<int64_t>();
  float* sp = states.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, (cu.size(0) - 1) * Hv, 1, [&](int64_t begin, int64_t end) {
    Token t(K, V), prev(K, V);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / Hv, h = item % Hv;
      float* w = sp + item * K * V;
      for (int64_t b = cp[s]; b < cp[s + 1]; ++b) {  // each token's state update folded into the next one's pass
        in.read(b, h, t);
        token<float>(w, in, t, sc, w, V, &prev, b > cp[s]);
        emit(t.qq, out, b, h, V);
      }
      if (cp[s + 1] > cp[s]) update<float>(w, K, V, prev.k, prev.u, w, V);  // the last token's
    }
  });
}

// Mamba-2's SSD step: x [B, H, P], dt [B, H], A [H], B and C [B, G, N], D [H] or [H, P], z [B, H, P], dt_bias [H]
// (any strides; float32, bfloat16 or float16), state [slots, H, P, N] float32 or x's dtype with each [P, N]
// contiguous, rows int32 or int64 [B] (-1: a zero state, nothing written; no row twice), out [B, H, P] of x's dtype
// or None (made here). Returns out, or None where the states are not each contiguous (the caller's torch path).
at::Tensor ssd_step_any(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                        const at::Tensor& C, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                        const c10::optional<at::Tensor>& dt_bias, bool softplus, double lo, double hi, at::Tensor state,
                        const at::Tensor& rows, const c10::optional<at::Tensor>& out) {
  if (!rows_contiguous(state)) return at::Tensor();  // None: the caller's torch path
  TORCH_CHECK(rows.scalar_type() == at::kInt || rows.scalar_type() == at::kLong, "ssd_step: rows int32 or int64");
  at::Tensor o = output(out, x, "ssd_step");
  const Ssd in{x, dt, A, B, C, D, z, dt_bias, softplus, static_cast<float>(lo), static_cast<float>(hi),
               x.size(2), B.size(2), x.size(1) / B.size(1)};
  by_state_dtype(state, "ssd_step", [&](auto s) { ssd_step<decltype(s)>(in, state, rows, o); });
  return o;
}
