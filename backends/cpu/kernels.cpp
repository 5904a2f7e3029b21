// The cpu backend's compiled module: one binding per kernel (native.py builds this file with the kernels' own).
#include <torch/extension.h>

void decode_any(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                const c10::optional<at::Tensor>& block_table, const c10::optional<at::Tensor>& seqused_k,
                const c10::optional<at::Tensor>& cu_seqlens_k, const c10::optional<at::Tensor>& sinks, double scale,
                int64_t left, double softcap, at::Tensor out, const c10::optional<at::Tensor>& lse,
                int64_t copy_bytes);
void softcap_softmax(at::Tensor s, const c10::optional<at::Tensor>& hidden, double softcap, at::Tensor m,
                     at::Tensor total);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode", &decode_any, "one query per sequence over paged or packed keys, read in place (decode.cpp)");
  m.def("softcap_softmax", &softcap_softmax, "capped scores to softmax weights, row max and sum (softcap.cpp)");
}
