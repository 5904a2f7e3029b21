// The softcap attention path's pass over one step of scores (tiles.py, _explicit): each row's capped scores,
// its hidden keys, max, exponentials and sum in one walk over the row while it sits in L1, where torch's ops made
// seven passes (tanh alone cost more than the products). Built with decode.cpp by native.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "vec.h"

#include <algorithm>
#include <array>
#include <limits>

namespace {

using Vec = at::vec::Vectorized<float>;
const float NEG_INF = -std::numeric_limits<float>::infinity();

}  // namespace

// s [B, H, R, K] float32 contiguous, q.k * scale / softcap on entry; on return exp(softcap * tanh(s) - m) (0 where
// `hidden` is true), m [B, H, R] the row max of the capped visible scores (float32's lowest for a row with none)
// and total [B, H, R] the row sum. hidden: bool broadcastable to [B, H, R, K] (strides 0 where broadcast), or None.
void softcap_softmax(at::Tensor s, const c10::optional<at::Tensor>& hidden, double softcap, at::Tensor m,
                     at::Tensor total) {
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 4 && s.is_contiguous(),
              "softcap_softmax: s float32 [B, H, R, K]");
  TORCH_CHECK(m.is_contiguous() && total.is_contiguous() && m.numel() * s.size(3) == s.numel() &&
              total.numel() == m.numel(), "softcap_softmax: m, total float32 [B, H, R]");
  const int64_t H = s.size(1), R = s.size(2), K = s.size(3), n = Vec::size();
  float* sp = s.data_ptr<float>();
  float* mp = m.data_ptr<float>();
  float* tp = total.data_ptr<float>();
  const bool* hp = nullptr;
  std::array<int64_t, 4> hs{};
  if (hidden.has_value()) {
    const at::Tensor h = hidden->expand(s.sizes());
    TORCH_CHECK(h.scalar_type() == at::kBool, "softcap_softmax: hidden bool");
    hp = h.data_ptr<bool>();
    for (int i = 0; i < 4; ++i) hs[i] = h.stride(i);
  }
  const float cap = static_cast<float>(softcap), lowest = std::numeric_limits<float>::lowest();
  const auto add = [](Vec& a, Vec& b) { return a + b; };
  const auto larger = [](Vec& a, Vec& b) { return at::vec::maximum(a, b); };
  at::parallel_for(0, s.size(0) * H * R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      float* x = sp + row * K;
      int64_t j = 0;
      for (; j + n <= K; j += n) portable_attn_cpu::cap_tanh(Vec::loadu(x + j), cap).store(x + j);
      if (j < K) portable_attn_cpu::cap_tanh(Vec::loadu(x + j, K - j), cap).store(x + j, K - j);
      if (hp != nullptr) {  // vectorised by the compiler where the key stride is 1
        const bool* hr = hp + row / (H * R) * hs[0] + row / R % H * hs[1] + row % R * hs[2];
        const int64_t step = hs[3];
        for (int64_t i = 0; i < K; ++i) x[i] = hr[i * step] ? NEG_INF : x[i];
      }
      // a row that sees nothing: exp(-inf - lowest) = 0 and a zero sum
      const float top = K == 0 ? lowest : std::max(lowest, at::vec::reduce_all<float>(larger, x, K));
      Vec acc(0.f);
      for (j = 0; j + n <= K; j += n) {
        const Vec e = (Vec::loadu(x + j) - Vec(top)).exp_u20();
        e.store(x + j);
        acc = acc + e;
      }
      float sum = at::vec::vec_reduce_all<float>(add, acc);
      if (j < K) {
        const Vec e = (Vec::loadu(x + j, K - j) - Vec(top)).exp_u20();
        e.store(x + j, K - j);
        sum += at::vec::vec_reduce_all<float>(add, e, K - j);  // its first K - j lanes
      }
      mp[row] = top;
      tp[row] = sum;
    }
  });
}
