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

float silu(float y) { return y / (1.f + std::exp(-y)); }

template <typename T>
void conv_seq(const at::Tensor& x, const at::Tensor& taps, const c10::optional<at::Tensor>& bias,
              const at::Tensor& head, const at::Tensor& cu, bool act, at::Tensor y, at::Tensor finals) {
  const int64_t T_ = x.size(0), C = x.size(1), W = taps.size(0), w = W - 1, S = cu.size(0) - 1, n = Vec::size();
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const float* tp = taps.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const float* hp = head.data_ptr<float>();
  const int64_t* cp = cu.data_ptr<int64_t>();
  const int64_t xs = x.stride(0), ys = y.stride(0);
  // rows of tokens in parallel (no recurrence): each finds its sequence once per chunk, then walks on
  at::parallel_for(0, T_, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(C);
    std::vector<const float*> hrow(W);
    std::vector<const T*> xrow(W);
    int64_t s = std::upper_bound(cp, cp + S + 1, begin) - cp - 1;
    for (int64_t r = begin; r < end; ++r) {
      while (r >= cp[s + 1]) ++s;
      const int64_t p = r - cp[s];
      for (int64_t j = 0; j < W; ++j) {  // tap j reads position p - w + j
        const int64_t pos = p - w + j;
        xrow[j] = pos >= 0 ? xp + (cp[s] + pos) * xs : nullptr;
        hrow[j] = pos >= 0 ? nullptr : hp + (s * w + w + pos) * C;
      }
      for (int64_t c = 0; c < C; c += n) {
        const int64_t m = std::min(n, C - c);
        Vec acc = bp != nullptr ? Vec::loadu(bp + c, m) : Vec(0.f);
        for (int64_t j = 0; j < W; ++j) {
          const Vec in = xrow[j] != nullptr ? load(xrow[j] + c, m) : Vec::loadu(hrow[j] + c, m);
          acc = at::vec::fmadd(in, Vec::loadu(tp + j * C + c, m), acc);
        }
        if (act) acc = acc / (Vec(1.f) + acc.neg().exp());
        acc.store(row.data() + c, m);
      }
      at::vec::convert(row.data(), yp + r * ys, C);
    }
  });
  // the final state of each sequence: its last w input rows, float32
  float* fp = finals.data_ptr<float>();
  for (int64_t s = 0; s < S; ++s) {
    const int64_t len = cp[s + 1] - cp[s];
    for (int64_t i = 0; i < w; ++i) {
      const int64_t pos = len - w + i;
      float* dst = fp + (s * w + i) * C;
      if (pos >= 0)
        at::vec::convert(xp + (cp[s] + pos) * xs, dst, C);
      else
        std::copy(hp + (s * w + w + pos) * C, hp + (s * w + w + pos + 1) * C, dst);
    }
  }
}

template <typename T>
void conv_step(const at::Tensor& x, const at::Tensor& taps, const c10::optional<at::Tensor>& bias, at::Tensor state,
               const at::Tensor& rows, bool act, at::Tensor out) {
  const int64_t B = x.size(0), C = x.size(1), W = taps.size(0), w = W - 1;
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  T* sp = state.data_ptr<T>();
  const float* tp = taps.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const int64_t x0 = x.stride(0), x1 = x.stride(1), o0 = out.stride(0), o1 = out.stride(1);
  const int64_t s0 = state.stride(0), s1 = state.stride(1), s2 = state.stride(2);
  const bool wide = rows.scalar_type() == at::kLong;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t slot = wide ? rows.data_ptr<int64_t>()[b * rows.stride(0)] : rows.data_ptr<int32_t>()[b * rows.stride(0)];
      for (int64_t c = 0; c < C; ++c) {
        T* st = slot >= 0 ? sp + slot * s0 + c * s1 : nullptr;  // -1: a zero state, nothing written
        const float xv = static_cast<float>(xp[b * x0 + c * x1]);
        float acc = (bp != nullptr ? bp[c] : 0.f) + tp[w * C + c] * xv;
        if (st != nullptr) {
          for (int64_t j = 0; j < w; ++j) acc += tp[j * C + c] * static_cast<float>(st[j * s2]);
          for (int64_t j = 0; j + 1 < w; ++j) st[j * s2] = st[(j + 1) * s2];
          if (w > 0) st[(w - 1) * s2] = xp[b * x0 + c * x1];
        }
        op[b * o0 + c * o1] = static_cast<T>(act ? silu(acc) : acc);
      }
    }
  });
}

template <typename F>
void by_dtype(at::ScalarType t, const char* what, F f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(at::BFloat16{});
    case at::kHalf: return f(at::Half{});
    default: TORCH_CHECK(false, what, ": float32, bfloat16 or float16 tensors, not ", t);
  }
}

}  // namespace

// x [T, C] (channels contiguous), taps [W, C] float32 contiguous (the weight transposed), bias float32 [C] or None,
// head [S, W-1, C] float32 contiguous (each sequence's initial state, oldest row first), cu int64 [S+1]
// contiguous, y [T, C] of x's dtype (channels contiguous), finals [S, W-1, C] float32 contiguous (written: each
// sequence's last W-1 inputs).
void conv_seq_any(const at::Tensor& x, const at::Tensor& taps, const c10::optional<at::Tensor>& bias,
                  const at::Tensor& head, const at::Tensor& cu, bool silu, at::Tensor y, at::Tensor finals) {
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1 && y.scalar_type() == x.scalar_type(),
              "conv_seq: x and y [T, C] of one dtype, channels contiguous");
  TORCH_CHECK(taps.is_contiguous() && head.is_contiguous() && cu.is_contiguous() && finals.is_contiguous() &&
              cu.scalar_type() == at::kLong, "conv_seq: taps, head, finals float32 and cu int64, contiguous");
  by_dtype(x.scalar_type(), "conv_seq", [&](auto t) {
    conv_seq<decltype(t)>(x, taps, bias, head, cu, silu, y, finals);
  });
}

// x [B, C], state [slots, C, W-1] of x's dtype (any strides), rows int32 or int64 [B] (-1: a zero state, nothing
// written; no row twice), out [B, C] of x's dtype; taps and bias as conv_seq's. The listed state rows shift by one
// in place, x their newest input.
void conv_step_any(const at::Tensor& x, const at::Tensor& taps, const c10::optional<at::Tensor>& bias,
                   at::Tensor state, const at::Tensor& rows, bool silu, at::Tensor out) {
  TORCH_CHECK(state.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(),
              "conv_step: x, state and out of one dtype");
  TORCH_CHECK(taps.is_contiguous() && (rows.scalar_type() == at::kInt || rows.scalar_type() == at::kLong),
              "conv_step: taps contiguous, rows int32 or int64");
  by_dtype(x.scalar_type(), "conv_step", [&](auto t) { conv_step<decltype(t)>(x, taps, bias, state, rows, silu, out); });
}
