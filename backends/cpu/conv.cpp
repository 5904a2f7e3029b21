// Causal depthwise conv1d on the CPU: each output row read from its W input rows where they lie (the caller's
// token-major x, or a sequence's state rows before its first token) and written once, the bias and silu applied
// while the row is in registers; torch's ops made about fifteen passes over the tokens (a staging copy, W
// multiply-adds, a gather, the activation). The step form updates each listed state row in place. Built with
// decode.cpp by native.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

Vec silu(Vec y) { return y / (Vec(1.f) + y.neg().exp_u20()); }

// n <= Vec::size() elements from p as float32 (the rest of the lanes 0)
template <typename T>
Vec load(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return n == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, n);
  } else {
    float f[Vec::size()] = {};
    for (int64_t i = 0; i < n; ++i) f[i] = static_cast<float>(p[i]);
    return Vec::loadu(f);
  }
}

// One output row: act(bias + sum_j taps[j] * src[j]) over C channels, into dst (through `row`, float32, where T is
// not). W taps (W > 0: known at compile time, the loop unrolled; 0: `w1` + 1 taps at run time).
template <typename T, int W>
void conv_row(const T* const* src, const float* taps, const float* bias, int64_t C, int64_t w1, bool act, T* dst,
              float* row) {
  const int64_t n = Vec::size(), taps_n = W > 0 ? W : w1 + 1;
  for (int64_t c = 0; c < C; c += n) {
    const int64_t m = std::min(n, C - c);
    Vec acc = bias != nullptr ? Vec::loadu(bias + c, m) : Vec(0.f);
    for (int64_t j = 0; j < taps_n; ++j)
      acc = at::vec::fmadd(load(src[j] + c, m), Vec::loadu(taps + j * C + c, m), acc);
    if (act) acc = silu(acc);
    if constexpr (std::is_same_v<T, float>)
      acc.store(dst + c, m);
    else
      acc.store(row + c, m);
  }
  if constexpr (!std::is_same_v<T, float>) at::vec::convert(row, dst, C);
}

template <typename T, int W>
void conv_seq(const at::Tensor& x, const at::Tensor& taps, const c10::optional<at::Tensor>& bias,
              const at::Tensor& head, const at::Tensor& cu, bool act, at::Tensor y, at::Tensor finals) {
  const int64_t T_ = x.size(0), C = x.size(1), w = taps.size(0) - 1, S = cu.size(0) - 1;
  const T* xp = x.data_ptr<T>();
  const T* hp = head.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const float* tp = taps.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const int64_t* cp = cu.data_ptr<int64_t>();
  const int64_t xs = x.stride(0), ys = y.stride(0);
  // sequence s's input row at position pos of its tokens; pos < 0: its state rows in head [S, W-1, C]
  const auto input = [&](int64_t s, int64_t pos) {
    return pos >= 0 ? xp + (cp[s] + pos) * xs : hp + (s * w + w + pos) * C;
  };
  // rows of tokens in parallel (no recurrence): each chunk finds its sequence once, then walks on
  at::parallel_for(0, T_, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(std::is_same_v<T, float> ? 0 : C);
    std::vector<const T*> src(w + 1);
    int64_t s = std::upper_bound(cp, cp + S + 1, begin) - cp - 1;
    for (int64_t r = begin; r < end; ++r) {
      while (r >= cp[s + 1]) ++s;
      for (int64_t j = 0; j <= w; ++j) src[j] = input(s, r - cp[s] - w + j);  // tap j reads position p - w + j
      conv_row<T, W>(src.data(), tp, bp, C, w, act, yp + r * ys, row.data());
    }
  });
  // the final state of each sequence: its last w input rows, float32
  float* fp = finals.data_ptr<float>();
  for (int64_t s = 0; s < S; ++s)
    for (int64_t i = 0; i < w; ++i) at::vec::convert(input(s, cp[s + 1] - cp[s] - w + i), fp + (s * w + i) * C, C);
}

// silu over row [0, C) in place
void silu_row(float* row, int64_t C) {
  for (int64_t c = 0; c < C; c += Vec::size()) {
    const int64_t m = std::min<int64_t>(Vec::size(), C - c);
    silu(Vec::loadu(row + c, m)).store(row + c, m);
  }
}

// One sequence's step over channels [0, C): row = bias + taps . (state, x), the state shifted by one with x its
// newest input; then act(row) into out. S1, S2: the state's channel and element strides (0: run-time s1, s2); W
// taps as in conv_row.
template <typename T, int W, int S1, int S2>
void step_row(const T* x, int64_t x1, const float* taps, const float* bias, int64_t C, int64_t w1, T* st, int64_t s1,
              int64_t s2, bool act, float* row, T* out, int64_t o1) {
  const int64_t w = W > 0 ? W - 1 : w1, c1 = S1 > 0 ? S1 : s1, c2 = S2 > 0 ? S2 : s2;
  for (int64_t c = 0; c < C; ++c) {
    const float xv = static_cast<float>(x[c * x1]);
    float acc = (bias != nullptr ? bias[c] : 0.f) + taps[w * C + c] * xv;
    if (st != nullptr) {  // nullptr: a zero state, nothing written
      T* sc = st + c * c1;
      for (int64_t j = 0; j < w; ++j) acc += taps[j * C + c] * static_cast<float>(sc[j * c2]);
      for (int64_t j = 0; j + 1 < w; ++j) sc[j * c2] = sc[(j + 1) * c2];
      if (w > 0) sc[(w - 1) * c2] = x[c * x1];
    }
    row[c] = acc;
  }
  if (act) silu_row(row, C);
  if (o1 == 1)
    at::vec::convert(row, out, C);
  else
    for (int64_t c = 0; c < C; ++c) out[c * o1] = static_cast<T>(row[c]);
}

template <typename T, int W>
void conv_step(const at::Tensor& x, const at::Tensor& taps, const c10::optional<at::Tensor>& bias, at::Tensor state,
               const at::Tensor& rows, bool act, at::Tensor out) {
  const int64_t B = x.size(0), C = x.size(1), w = taps.size(0) - 1;
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  T* sp = state.data_ptr<T>();
  const float* tp = taps.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const int64_t x0 = x.stride(0), x1 = x.stride(1), o0 = out.stride(0), o1 = out.stride(1);
  const int64_t s0 = state.stride(0), s1 = state.stride(1), s2 = state.stride(2);
  const bool packed = W > 1 && s2 == 1 && s1 == w;  // each row's [C, W-1] contiguous: strides known here
  const bool wide = rows.scalar_type() == at::kLong;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(C);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t slot =
          wide ? rows.data_ptr<int64_t>()[b * rows.stride(0)] : rows.data_ptr<int32_t>()[b * rows.stride(0)];
      T* st = slot >= 0 ? sp + slot * s0 : nullptr;
      if (packed)
        step_row<T, W, (W > 1 ? W - 1 : 1), 1>(xp + b * x0, x1, tp, bp, C, w, st, s1, s2, act, row.data(),
                                               op + b * o0, o1);
      else
        step_row<T, W, 0, 0>(xp + b * x0, x1, tp, bp, C, w, st, s1, s2, act, row.data(), op + b * o0, o1);
    }
  });
}

// f(T{}, std::integral_constant<int, W>{}) for x's dtype T and the tap count W: 2-4 unrolled, others 0 (run time)
template <typename F>
void by_kind(at::ScalarType t, int64_t taps, const char* what, F f) {
  const auto width = [&](auto x) {
    switch (taps) {
      case 2: return f(x, std::integral_constant<int, 2>{});
      case 3: return f(x, std::integral_constant<int, 3>{});
      case 4: return f(x, std::integral_constant<int, 4>{});
      default: return f(x, std::integral_constant<int, 0>{});
    }
  };
  switch (t) {
    case at::kFloat: return width(float{});
    case at::kBFloat16: return width(at::BFloat16{});
    case at::kHalf: return width(at::Half{});
    default: TORCH_CHECK(false, what, ": float32, bfloat16 or float16 tensors, not ", t);
  }
}

// The kernels' float32 taps [W, C] of a weight [C, W] (any dtype and strides), and a float32 bias [C]: converted
// here, where two ATen calls cost a fraction of the same from Python.
at::Tensor taps_of(const at::Tensor& weight) { return weight.to(at::kFloat).t().contiguous(); }

c10::optional<at::Tensor> bias_of(const c10::optional<at::Tensor>& bias) {
  return bias.has_value() ? c10::optional<at::Tensor>(bias->to(at::kFloat).contiguous()) : c10::nullopt;
}

}  // namespace

// x [T, C] (channels contiguous), weight [C, W] and bias [C] or None (any dtype and strides), head [S, W-1, C] of
// x's dtype, contiguous (each sequence's initial state, oldest row first), cu int64 [S+1] contiguous, y [T, C] of
// x's dtype (channels contiguous), finals [S, W-1, C] float32 contiguous (written: each sequence's last W-1 inputs).
void conv_seq_any(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  const at::Tensor& head, const at::Tensor& cu, bool act, at::Tensor y, at::Tensor finals) {
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1 && y.scalar_type() == x.scalar_type(),
              "conv_seq: x and y [T, C] of one dtype, channels contiguous");
  TORCH_CHECK(head.is_contiguous() && cu.is_contiguous() && finals.is_contiguous() && cu.scalar_type() == at::kLong &&
              head.scalar_type() == x.scalar_type(),
              "conv_seq: finals float32, head of x's dtype, cu int64, contiguous");
  const at::Tensor taps = taps_of(weight);
  const c10::optional<at::Tensor> b = bias_of(bias);
  by_kind(x.scalar_type(), taps.size(0), "conv_seq", [&](auto t, auto w) {
    conv_seq<decltype(t), decltype(w)::value>(x, taps, b, head, cu, act, y, finals);
  });
}

// x [B, C], state [slots, C, W-1] (any strides), rows int32 or int64 [B] (-1: a zero state, nothing written; no row
// twice), out [B, C] of x's dtype or None (made here); weight and bias as conv_seq's. The listed state rows shift by
// one in place, x their newest input. Returns out, or None where the state's dtype is not x's (the caller's torch
// path).
at::Tensor conv_step_any(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         at::Tensor state, const at::Tensor& rows, bool act, const c10::optional<at::Tensor>& out) {
  if (state.scalar_type() != x.scalar_type()) return at::Tensor();
  TORCH_CHECK(rows.scalar_type() == at::kInt || rows.scalar_type() == at::kLong, "conv_step: rows int32 or int64");
  at::Tensor o = out.has_value() ? *out : at::empty(x.sizes(), x.options());
  TORCH_CHECK(o.scalar_type() == x.scalar_type(), "conv_step: out of x's dtype");
  const at::Tensor taps = taps_of(weight);
  const c10::optional<at::Tensor> b = bias_of(bias);
  by_kind(x.scalar_type(), taps.size(0), "conv_step", [&](auto t, auto w) {
    conv_step<decltype(t), decltype(w)::value>(x, taps, b, state, rows, act, o);
  });
  return o;
}
