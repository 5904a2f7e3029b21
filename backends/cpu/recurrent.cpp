// The recurrent ops on the CPU, one (sequence, head) state at a time, token by token: the gated delta rule (and KDA),
// linear attention (GLA: the same without the delta term) and Mamba-2's SSD (linear attention with q = C, k = B,
// v = d x). A token decays the state's rows and takes S'^T k and S'^T q while a block of columns sits in registers
// (pass 1), then adds k u^T (pass 2, folded into the next token's pass 1 in the sequence form). The sequence form
// runs each column block of the state through 16 tokens while it sits in L1; the step form reads and writes a
// state once (torch's ops made five passes over it, and a batched product of two rows ran at a fifth of the copy
// bandwidth). Built with decode.cpp by native.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "vec.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t COLS = 4;  // vectors of columns per block of pass 1: 8 accumulators in registers

// n elements of x, `stride` apart, as float32 into dst
template <typename T>
void load_floats(const T* x, int64_t stride, int64_t n, float* dst) {
  if (stride == 1) return at::vec::convert(x, dst, n);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(x[i * stride]);
}

// n floats into x, `stride` apart, in T
template <typename T>
void store_floats(const float* src, int64_t n, T* x, int64_t stride) {
  if (stride == 1) return at::vec::convert(src, x, n);
  for (int64_t i = 0; i < n; ++i) x[i * stride] = static_cast<T>(src[i]);
}

// A tensor's data, dtype and strides, taken once a call (at::Tensor's accessors check on every use): element [i, j, l]
// is s0 i + s1 j + s2 l elements from the start. `vector`: a 1-d or 2-d tensor read as [i, l] (D [H] or [H, P]: s1 0).
struct View {
  char* data = nullptr;
  bool given = false;  // a tensor (data is null for an empty one)
  at::ScalarType dtype = at::kFloat;
  int64_t elem = 4, s0 = 0, s1 = 0, s2 = 0;

  View() = default;
  View(const at::Tensor& t, bool vector = false)
      : data(static_cast<char*>(t.data_ptr())), given(true), dtype(t.scalar_type()), elem(t.element_size()) {
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                "recurrent kernels: float32, bfloat16 or float16 tensors, not ", dtype);
    s0 = t.stride(0);
    if (vector)
      s2 = t.dim() == 2 ? t.stride(1) : 0;
    else
      s1 = t.dim() > 1 ? t.stride(1) : 0, s2 = t.dim() > 2 ? t.stride(2) : 0;
  }
  View(const c10::optional<at::Tensor>& t, bool vector = false) : View() {
    if (t.has_value()) *this = View(*t, vector);
  }
  explicit operator bool() const { return given; }
  char* at(int64_t i, int64_t j) const { return data + (i * s0 + j * s1) * elem; }

  // elements [i, j, 0..n) as float32 into dst
  void read(int64_t i, int64_t j, int64_t n, float* dst) const {
    switch (dtype) {
      case at::kFloat: return load_floats(reinterpret_cast<const float*>(at(i, j)), s2, n, dst);
      case at::kBFloat16: return load_floats(reinterpret_cast<const at::BFloat16*>(at(i, j)), s2, n, dst);
      default: return load_floats(reinterpret_cast<const at::Half*>(at(i, j)), s2, n, dst);
    }
  }
  float scalar(int64_t i, int64_t j = 0) const {
    float x;
    read(i, j, 1, &x);
    return x;
  }
  // src [n] into elements [i, j, 0..n) in the tensor's dtype
  void write(int64_t i, int64_t j, int64_t n, const float* src) const {
    switch (dtype) {
      case at::kFloat: return store_floats(src, n, reinterpret_cast<float*>(at(i, j)), s2);
      case at::kBFloat16: return store_floats(src, n, reinterpret_cast<at::BFloat16*>(at(i, j)), s2);
      default: return store_floats(src, n, reinterpret_cast<at::Half*>(at(i, j)), s2);
    }
  }
  // elements [i, j, 0..n) into L2 where they are contiguous (rows of a token far apart defeat hardware prefetch)
  void prefetch(int64_t i, int64_t j, int64_t n) const {
    if (given && (n == 1 || s2 == 1)) portable_attn_cpu::prefetch_l2(at(i, j), n * elem);
  }
};

// sum a_i b_i in vectors, two accumulators (one scalar sum is a chain of dependent adds)
float dot(const float* a, const float* b, int64_t n) {
  const int64_t m = Vec::size();
  Vec s0(0.f), s1(0.f);
  int64_t i = 0;
  for (; i + 2 * m <= n; i += 2 * m) {
    s0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), s0);
    s1 = at::vec::fmadd(Vec::loadu(a + i + m), Vec::loadu(b + i + m), s1);
  }
  for (; i < n; i += m) {
    const int64_t c = std::min(m, n - i);
    s0 = at::vec::fmadd(Vec::loadu(a + i, c), Vec::loadu(b + i, c), s0);
  }
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, s0 + s1);
}

// x <- x rsqrt(sum x^2 + 1e-6), as the spec's use_qk_l2norm
void l2norm(float* x, int64_t n) {
  const float r = 1.f / std::sqrt(dot(x, x, n) + 1e-6f);
  for (int64_t i = 0; i < n; ++i) x[i] *= r;
}

// Pass 1 over columns [j, j + NV vectors) of w [K, V] (float32, rows V apart): first the previous token's update
// w_i <- w_i + kp_i up where kp is given (the sequence form folds it into this pass), then w_i <- a_i w_i (with MUL),
// and the columns' sums kk = w'^T k (with KK: the delta rule's) and qq = w'^T q. `last` lanes of the last vector where
// the block ends inside one (else 0).
template <int NV, bool KK, bool MUL = true>
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
    const Vec ai(MUL ? a[i * a_step] : 1.f), ki(KK ? k[i] : 0.f), qi(q[i]);
    for (int x = 0; x < NV; ++x) {
      const bool part = last && x == NV - 1;
      Vec s = part ? Vec::loadu(row + x * n, last) : Vec::loadu(row + x * n);
      if (kp != nullptr) s = at::vec::fmadd(Vec(kp[i]), u[x], s);
      if constexpr (MUL) s = s * ai;
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

// Pass 1 over every column of the state w [K, V] (the step form)
template <bool KK>
void decay(float* w, int64_t K, int64_t V, const float* a, int64_t a_step, const float* k, const float* q, float* kk,
           float* qq) {
  const int64_t n = Vec::size();
  int64_t j = 0;
  for (; j + COLS * n <= V; j += COLS * n)
    decay_block<COLS, KK>(w, K, V, j, nullptr, nullptr, a, a_step, k, q, kk, qq, 0);
  for (; j < V; j += n)
    decay_block<1, KK>(w, K, V, j, nullptr, nullptr, a, a_step, k, q, kk, qq, V - j < n ? V - j : 0);
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
  View q, k, v, g, beta;
  int64_t K, V, Hv, r;  // r: value heads per q/k head
  bool per_key, l2, delta;

  // q, k [K], a = exp(g) [K or 1], v [V] and beta as float32
  void read(int64_t b, int64_t h, float* tq, float* tk, float* ta, float* tv, float* tbeta) const {
    const int64_t hq = h / r;
    q.read(b, hq, K, tq);
    k.read(b, hq, K, tk);
    v.read(b, h, V, tv);
    if (g)
      g.read(b, h, per_key ? K : 1, ta);
    else
      ta[0] = 0.f;  // exp(0): no decay
    if (delta) *tbeta = beta.scalar(b, h);
    if (l2) {
      l2norm(tq, K);
      l2norm(tk, K);
    }
    at::vec::map([](Vec x) { return x.exp(); }, ta, ta, per_key ? K : 1);
  }
  void read(int64_t b, int64_t h, Token& t) const { read(b, h, t.q, t.k, t.a, t.v, &t.beta); }
  void finish(int64_t, int64_t, float*, float*) const {}  // the output row as it is
  void prefetch(int64_t b, int64_t h) const {
    q.prefetch(b, h / r, K);
    k.prefetch(b, h / r, K);
    v.prefetch(b, h, V);
    g.prefetch(b, h, per_key ? K : 1);
    beta.prefetch(b, h, 1);
  }
};

// One token of the step form on the float32 state w [K, V] (nullptr: a zero state, left so): S' = diag(a) S,
// u = beta (v - S'^T k) (linear attention: u = v), t.qq <- the output (S'^T q + (q.k) u) scale, then S = S' + k u^T,
// its rows stored into `state` of type S, `row_stride` apart, unless that is w itself.
template <typename S>
void token(float* w, const Inputs& in, Token& t, float scale, S* state, int64_t row_stride) {
  const int64_t K = in.K, V = in.V;
  const int64_t a_step = in.per_key ? 1 : 0;
  if (w == nullptr)
    std::fill(t.kk, t.kk + 2 * V, 0.f);  // kk and qq
  else if (in.delta)
    decay<true>(w, K, V, t.a, a_step, t.k, t.q, t.kk, t.qq);
  else
    decay<false>(w, K, V, t.a, a_step, t.k, t.q, t.kk, t.qq);
  const float qk = dot(t.q, t.k, K);
  for (int64_t j = 0; j < V; ++j) {
    t.u[j] = in.delta ? t.beta * (t.v[j] - t.kk[j]) : t.v[j];
    t.qq[j] = (t.qq[j] + qk * t.u[j]) * scale;
  }
  if (w != nullptr) update<S>(w, K, V, t.k, t.u, state, row_stride);
}

Inputs inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& g,
              const c10::optional<at::Tensor>& beta, bool l2) {
  return Inputs{q, k, v, g, beta, q.size(2), v.size(2), v.size(1), v.size(1) / q.size(1),
                g.has_value() && g->dim() == 3, l2, beta.has_value()};
}

template <typename S>
void delta_step(const Inputs& in, int64_t B, at::Tensor state, const at::Tensor& rows, float scale, const View& out) {
  const int64_t Hv = in.Hv, K = in.K, V = in.V;
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
      out.write(b, h, V, t.qq);
    }
  });
}

// Mamba-2's SSD for one (sequence, head): d = clamp(f(dt + dt_bias), lo, hi) (f = softplus or identity),
// h = exp(d A) h + d x B^T row by row (P rows of N), y_p = h_p . C + D_p x_p, times silu(z_p) where z is given.
// run(), the step form: w is the state [P, N] as float32 (nullptr: a zero state, left so), its rows stored into
// `state` (type S) unless that is w itself; returns y (P floats in `buf`). read(), finish(), prefetch(): a token of
// the sequence form (Sequence).
struct Ssd {
  View x, dt, A, B, C, D, z, dt_bias;
  bool softplus;
  float lo, hi;
  int64_t P, N, r;  // r: heads per B/C group

  float step_size(int64_t b, int64_t h) const {
    float d = dt.scalar(b, h);
    if (dt_bias) d += dt_bias.scalar(h);
    if (softplus) d = std::max(d, 0.f) + std::log1p(std::exp(-std::abs(d)));  // log(1 + e^d), no overflow
    return std::min(std::max(d, lo), hi);
  }

  template <typename S>
  const float* run(float* w, S* state, int64_t b, int64_t h, std::vector<float>& buf) const {
    float *xf = buf.data(), *Bf = xf + P, *Cf = Bf + N, *y = Cf + N, *extra = y + P;
    x.read(b, h, P, xf);
    B.read(b, h / r, N, Bf);
    C.read(b, h / r, N, Cf);
    const float d = step_size(b, h);
    const Vec a(std::exp(d * A.scalar(h)));
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
    gate(b, h, xf, y, extra);
    return y;
  }

  // y <- y + D x, times silu(z) where given (P floats; `scratch` P floats)
  void gate(int64_t b, int64_t h, const float* xf, float* y, float* scratch) const {
    if (D) {  // D [H] or [H, P]
      D.read(h, 0, P, scratch);
      for (int64_t p = 0; p < P; ++p) y[p] += scratch[p] * xf[p];
    }
    if (z) {
      z.read(b, h, P, scratch);
      for (int64_t p = 0; p < P; ++p) y[p] *= scratch[p] / (1.f + std::exp(-scratch[p]));
    }
  }

  // The sequence form's token (see Sequence): linear attention with q = C, k = B, a = exp(d A) and v = d x on the
  // state [P, N] transposed.
  void read(int64_t b, int64_t h, float* tq, float* tk, float* ta, float* tv, float*) const {
    C.read(b, h / r, N, tq);
    B.read(b, h / r, N, tk);
    x.read(b, h, P, tv);
    const float d = step_size(b, h);
    ta[0] = std::exp(d * A.scalar(h));
    for (int64_t p = 0; p < P; ++p) tv[p] *= d;
  }
  void finish(int64_t b, int64_t h, float* y, float* scratch) const {  // scratch: 2 P floats
    if (!D && !z) return;
    x.read(b, h, P, scratch + P);
    gate(b, h, scratch + P, y, scratch);
  }
  void prefetch(int64_t b, int64_t h) const {
    C.prefetch(b, h / r, N);
    B.prefetch(b, h / r, N);
    x.prefetch(b, h, P);
    dt.prefetch(b, h, 1);
    z.prefetch(b, h, P);
  }
};

template <typename S>
void ssd_step(const Ssd& in, int64_t B, int64_t H, at::Tensor state, const at::Tensor& rows, const View& out) {
  const int64_t P = in.P, N = in.N;
  S* sp = state.data_ptr<S>();
  const int64_t s0 = state.stride(0), s1 = state.stride(1);
  at::parallel_for(0, B * H, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(3 * P + 2 * N + std::max(P, N)), scratch(std::is_same_v<S, float> ? 0 : P * N);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / H, h = item % H, slot = index_at(rows, b);
      S* st = slot >= 0 ? sp + slot * s0 + h * s1 : nullptr;  // -1: a zero state, nothing written
      out.write(b, h, P, in.run<S>(working(st, scratch, P * N), st, b, h, buf));
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

constexpr int64_t TB = 16;  // tokens of a time block: their inputs read once, then run column block by column block

// The sequence form of the gated delta rule, linear attention and SSD, one (sequence, head) at a time (see
// delta_seq). `In` reads a token's q, k [K], a [Ka], v [V] and beta as float32 and finishes its output row (Inputs,
// Ssd). The state of each (sequence, head) is [K, V], or [V, K] where `transposed` (SSD's [P, N]).
template <typename In>
struct Sequence {
  const In& in;
  int64_t K, V, Hv, Ka;
  bool transposed;
  const int64_t* cu;
  int64_t S;
  float* states;  // [S, Hv, K, V] or [S, Hv, V, K]
  float scale;
  View out;

  // Every (sequence, head), in column blocks of K x W floats within 16 KB (half the smallest L1 data cache targeted)
  template <bool KK>
  void all() const {
    K * 2 * Vec::size() * 4 <= 16384 ? spread<2, KK>() : spread<1, KK>();
  }

  // The (sequence, head) pairs, longest sequences first, taken one at a time by whichever thread is free: packed
  // sequences of unequal lengths split into equal ranges of pairs left one thread with most of the work.
  template <int NV, bool KK>
  void spread() const {
    std::vector<int64_t> order(S);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return cu[a + 1] - cu[a] > cu[b + 1] - cu[b]; });
    const int64_t items = S * Hv;
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min<int64_t>(items, at::get_num_threads()), 1, [&](int64_t, int64_t) {
      Work w(K, V, NV * Vec::size(), Ka);
      for (int64_t i = next++; i < items; i = next++) one<NV, KK>(order[i / Hv], i % Hv, w);
    });
  }

  // A thread's buffers: the state in column blocks [Vp / W, K, W] (columns past V zero: they stay so, v being zero
  // there), and a time block's rows: q, k [TB, K], a [TB, Ka], v, u, o [TB, Vp], beta, q.k, sc [TB], then the carried k
  // [K] and u [Vp] of the token before it, whose state update is pending, and scratch [2 Vp] for `finish`
  struct Work {
    int64_t K, W, Vp, Ka;
    std::vector<float> w, buf;
    float *q, *k, *a, *v, *u, *o, *beta, *qk, *sc, *kc, *uc, *scratch;
    bool mul[TB];
    Work(int64_t K, int64_t V, int64_t W, int64_t Ka)
        : K(K), W(W), Vp((V + W - 1) / W * W), Ka(Ka), w(Vp * K),
          buf(TB * (2 * K + Ka + 3 * Vp + 3) + K + 3 * Vp, 0.f) {
      q = buf.data(), k = q + TB * K, a = k + TB * K, v = a + TB * Ka, u = v + TB * Vp, o = u + TB * Vp;
      beta = o + TB * Vp, qk = beta + TB, sc = qk + TB, kc = sc + TB, uc = kc + K, scratch = uc + Vp;
    }
  };

  // A decay per head is kept out of the state's passes: the state is held as S / c, c the product of the decays
  // since the last pass that applied it, and the sums of a pass are scaled by c after it. A pass applies c (and c
  // restarts at 1) only where c leaves [1e-18, 1e18], so S / c stays far inside float32's range; a decay per key
  // dim (KDA, GLA) is applied in every pass. Returns the running c after the tokens [0, m) of a time block, given
  // it before.
  static float scales(Work& wk, int64_t m, float c) {
    for (int64_t i = 0; i < m; ++i) {
      const float next = c * wk.a[i * wk.Ka];
      wk.mul[i] = wk.Ka > 1 || !(next >= 1e-18f && next <= 1e18f);
      if (wk.Ka > 1) {
        wk.sc[i] = 1.f;
      } else {
        wk.a[i] = next;  // the factor a pass applies, where it does
        c = wk.mul[i] ? 1.f : next;
        wk.sc[i] = c;
      }
    }
    return c;
  }

  template <int NV, bool KK>
  void one(int64_t s, int64_t h, Work& wk) const {
    const int64_t W = wk.W, Vp = wk.Vp, b0 = cu[s], b1 = cu[s + 1];
    float* st = states + (s * Hv + h) * K * V;
    blocks(st, wk.w.data(), W, true);
    float c = 1.f;
    for (int64_t t0 = b0; t0 < b1; t0 += TB) {
      const int64_t m = std::min(TB, b1 - t0);
      for (int64_t i = 0; i < m; ++i) {
        in.read(t0 + i, h, wk.q + i * K, wk.k + i * K, wk.a + i * Ka, wk.v + i * Vp, wk.beta + i);
        wk.qk[i] = dot(wk.q + i * K, wk.k + i * K, K);
      }
      c = scales(wk, m, c);
      for (int64_t col = 0; col < Vp; col += W) {  // a column block through the time block's tokens
        float* wc = wk.w.data() + col * K;
        for (int64_t i = 0; i < m; ++i) {
          if (col == 0 && t0 + TB + i < b1) in.prefetch(t0 + TB + i, h);  // the next time block's rows
          // the previous token's update is folded into this token's pass
          const float* kp = i > 0 ? wk.k + (i - 1) * K : t0 > b0 ? wk.kc : nullptr;
          const float* up = (i > 0 ? wk.u + (i - 1) * Vp : wk.uc) + col;
          float *u = wk.u + i * Vp + col, *o = wk.o + i * Vp + col;
          const float *v = wk.v + i * Vp + col, *ki = wk.k + i * K, *qi = wk.q + i * K, *ai = wk.a + i * Ka;
          if (wk.mul[i])
            decay_block<NV, KK, true>(wc, K, W, 0, kp, up, ai, Ka > 1 ? 1 : 0, ki, qi, u, o, 0);
          else
            decay_block<NV, KK, false>(wc, K, W, 0, kp, up, ai, 0, ki, qi, u, o, 0);
          const float sc = wk.sc[i], qk = wk.qk[i], beta = wk.beta[i];
          for (int64_t j = 0; j < W; ++j) {
            const float uj = KK ? beta * (v[j] - sc * u[j]) : v[j];
            o[j] = (sc * o[j] + qk * uj) * scale;
            u[j] = uj / sc;  // the update of the state held as S / c
          }
        }
      }
      for (int64_t i = 0; i < m; ++i) {
        in.finish(t0 + i, h, wk.o + i * Vp, wk.scratch);
        out.write(t0 + i, h, V, wk.o + i * Vp);
      }
      std::copy(wk.k + (m - 1) * K, wk.k + m * K, wk.kc);
      std::copy(wk.u + (m - 1) * Vp, wk.u + m * Vp, wk.uc);
    }
    if (b1 > b0)  // the last token's update
      for (int64_t col = 0; col < Vp; col += W)
        update<float>(wk.w.data() + col * K, K, W, wk.kc, wk.uc + col, wk.w.data() + col * K, W);
    blocks(st, wk.w.data(), W, false, c);
  }

  // the state st [K, V] (or [V, K]) into column blocks w [Vp / W, K, W] (zero past V), or back (`into` false) times c
  // (held as S / c)
  void blocks(float* st, float* w, int64_t W, bool into, float c = 1.f) const {
    const int64_t si = transposed ? 1 : V, sj = transposed ? K : 1;  // element (i, j) at st[i si + j sj]
    for (int64_t col = 0; col < V; col += W)
      for (int64_t i = 0; i < K; ++i) {
        float *row = st + i * si + col * sj, *blk = w + col * K + i * W;
        const int64_t n = std::min(W, V - col);
        for (int64_t j = 0; j < n; ++j) into ? blk[j] = row[j * sj] : row[j * sj] = c * blk[j];
        if (into) std::fill(blk + n, blk + W, 0.f);
      }
  }
};

}  // namespace

// q, k [B, H, K], v [B, Hv, V] (float32, bfloat16 or float16, any strides); g [B, Hv] or [B, Hv, K] (log-decay) or
// None (no decay), beta [B, Hv] or None (linear attention); state [slots, Hv, K, V] float32 or the activation dtype,
// each [K, V] contiguous; rows int32 or int64 [B] (-1: a zero state, nothing written; no row twice); out [B, Hv, V] of
// the activation dtype or None (made here). The state rows listed are updated in place; returns out with
// scale * (S^T q) of the updated state, or None where the states are not each contiguous (the caller's torch path).
at::Tensor delta_step_any(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const c10::optional<at::Tensor>& g, const c10::optional<at::Tensor>& beta, at::Tensor state,
                          const at::Tensor& rows, double scale, bool l2, const c10::optional<at::Tensor>& out) {
  if (!rows_contiguous(state)) return at::Tensor();  // None: the caller's torch path
  TORCH_CHECK(rows.scalar_type() == at::kInt || rows.scalar_type() == at::kLong, "delta_step: rows int32 or int64");
  at::Tensor o = output(out, v, "delta_step");
  const Inputs in = inputs(q, k, v, g, beta, l2);
  const float sc = static_cast<float>(scale);
  by_state_dtype(state, "delta_step",
                 [&](auto s) { delta_step<decltype(s)>(in, v.size(0), state, rows, sc, View(o)); });
  return o;
}

// The sequence form: q, k [T, H, K], v [T, Hv, V], g [T, Hv(, K)] or None, beta [T, Hv] or None as delta_step's (one
// row per token); cu int64 [S+1] contiguous; states float32 [S, Hv, K, V] contiguous, each sequence's initial state,
// its final state on return; out [T, Hv, V] of v's dtype. Token by token (about 4 K V flops a token, where the
// chunked matrix form takes about 11 K V and only matrix units make those cheaper), on a copy of each (sequence,
// head) state cut into column blocks: the columns of the recurrence are independent, so each block runs a time
// block's tokens while it sits in L1 (the whole state does not: one pass a token over it ran at L2's speed).
void delta_seq(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& g,
               const c10::optional<at::Tensor>& beta, const at::Tensor& cu, at::Tensor states, double scale, bool l2,
               at::Tensor out) {
  TORCH_CHECK(states.scalar_type() == at::kFloat && states.is_contiguous() && cu.scalar_type() == at::kLong &&
              cu.is_contiguous(), "delta_seq: states float32 [S, Hv, K, V] and cu int64, contiguous");
  TORCH_CHECK(out.scalar_type() == v.scalar_type(), "delta_seq: out in v's dtype");
  const Inputs in = inputs(q, k, v, g, beta, l2);
  const Sequence<Inputs> run{in, in.K, in.V, in.Hv, in.per_key ? in.K : 1, false, cu.data_ptr<int64_t>(),
                             cu.size(0) - 1, states.data_ptr<float>(), static_cast<float>(scale), out};
  in.delta ? run.all<true>() : run.all<false>();
}

// Mamba-2's SSD over packed sequences: x [T, H, P], dt [T, H], A [H], B and C [T, G, N], D [H] or [H, P], z [T, H, P],
// dt_bias [H] (any strides; float32, bfloat16 or float16); cu int64 [S+1] contiguous; states float32 [S, H, P, N]
// contiguous, each sequence's initial state, its final state on return; out [T, H, P] of x's dtype. delta_seq's
// kernel without the delta term (linear attention with q = C, k = B, v = d x, log-decay d A).
void ssd_seq(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
             const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
             const c10::optional<at::Tensor>& dt_bias, bool softplus, double lo, double hi, const at::Tensor& cu,
             at::Tensor states, at::Tensor out) {
  TORCH_CHECK(states.scalar_type() == at::kFloat && states.is_contiguous() && cu.scalar_type() == at::kLong &&
              cu.is_contiguous(), "ssd_seq: states float32 [S, H, P, N] and cu int64, contiguous");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "ssd_seq: out in x's dtype");
  const int64_t P = x.size(2), N = B.size(2);
  const Ssd in{x, dt, A, B, C, View(D, true), z, dt_bias, softplus, static_cast<float>(lo), static_cast<float>(hi),
               P, N, x.size(1) / B.size(1)};
  const Sequence<Ssd> run{in, N, P, x.size(1), 1, true, cu.data_ptr<int64_t>(), cu.size(0) - 1,
                          states.data_ptr<float>(), 1.f, out};
  run.all<false>();
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
  const Ssd in{x, dt, A, B, C, View(D, true), z, dt_bias, softplus, static_cast<float>(lo), static_cast<float>(hi),
               x.size(2), B.size(2), x.size(1) / B.size(1)};
  by_state_dtype(state, "ssd_step",
                 [&](auto s) { ssd_step<decltype(s)>(in, x.size(0), x.size(1), state, rows, View(o)); });
  return o;
}
