// The cpu backend's compiled module: one binding per kernel (native.py builds this file with the kernels' own).
#include <torch/extension.h>

std::tuple<at::Tensor, at::Tensor> decode_any(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const c10::optional<at::Tensor>& block_table,
                                              const c10::optional<at::Tensor>& seqused_k,
                                              const c10::optional<at::Tensor>& cu_seqlens_k,
                                              const c10::optional<at::Tensor>& sinks, double scale, int64_t left,
                                              double softcap, const c10::optional<at::Tensor>& out, bool want_lse,
                                              int64_t max_keys);
std::tuple<at::Tensor, at::Tensor> flash_any(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& cu_seqlens_q,
    const c10::optional<at::Tensor>& cu_seqlens_k, bool causal, int64_t left, int64_t right, double scale,
    double softcap, const c10::optional<at::Tensor>& sinks, const c10::optional<at::Tensor>& layout,
    const c10::optional<at::Tensor>& partial_index, const c10::optional<at::Tensor>& partial_masks,
    std::vector<int64_t> block_size, const c10::optional<at::Tensor>& out, bool want_lse, int64_t keep_bytes);
void softcap_softmax(at::Tensor s, const c10::optional<at::Tensor>& hidden, double softcap, at::Tensor m,
                     at::Tensor total);
at::Tensor delta_step_any(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const c10::optional<at::Tensor>& g, const c10::optional<at::Tensor>& beta, at::Tensor state, const at::Tensor& rows, double scale, bool l2,
                          const c10::optional<at::Tensor>& out);
void delta_seq(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& g,
               const c10::optional<at::Tensor>& beta, const at::Tensor& cu, at::Tensor states, double scale, bool l2,
               at::Tensor out);
void ssd_seq(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
             const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
             const c10::optional<at::Tensor>& dt_bias, bool softplus, double lo, double hi, const at::Tensor& cu,
             at::Tensor states, at::Tensor out);
at::Tensor ssd_step_any(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                        const at::Tensor& C, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                        const c10::optional<at::Tensor>& dt_bias, bool softplus, double lo, double hi, at::Tensor state,
                        const at::Tensor& rows, const c10::optional<at::Tensor>& out);
void conv_seq_any(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  const at::Tensor& head, const at::Tensor& cu, bool act, at::Tensor y, at::Tensor finals);
at::Tensor conv_step_any(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         at::Tensor state, const at::Tensor& rows, bool act, const c10::optional<at::Tensor>& out);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode", &decode_any, "one query per sequence over paged or packed keys, read in place (decode.cpp)");
  namespace py = pybind11;
  m.def("flash", &flash_any, "prefill attention over packed sequences, key blocks of each query block's band and block mask (flash.cpp)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::kw_only(), py::arg("cu_seqlens_q") = py::none(),
        py::arg("cu_seqlens_k") = py::none(), py::arg("causal"), py::arg("left"), py::arg("right"), py::arg("scale"),
        py::arg("softcap") = 0.0, py::arg("sinks") = py::none(), py::arg("layout") = py::none(),
        py::arg("partial_index") = py::none(), py::arg("partial_masks") = py::none(),
        py::arg("block_size") = std::vector<int64_t>{}, py::arg("out") = py::none(), py::arg("want_lse") = false,
        py::arg("keep_bytes"));
  m.def("softcap_softmax", &softcap_softmax, "capped scores to softmax weights, row max and sum (softcap.cpp)");
  m.def("delta_step", &delta_step_any, "one gated-delta-rule (beta None: linear-attention) token per sequence, the state rows in place (recurrent.cpp)");
  m.def("delta_seq", &delta_seq, "the gated delta rule (beta None: linear attention) over packed sequences, token by token in cache (recurrent.cpp)");
  m.def("ssd_seq", &ssd_seq, "Mamba-2 SSD over packed sequences, token by token in cache (recurrent.cpp)");
  m.def("ssd_step", &ssd_step_any, "one Mamba-2 SSD token per sequence, the state rows in place (recurrent.cpp)");
  m.def("conv_seq", &conv_seq_any, "causal depthwise conv1d over packed sequences, each output row once (conv.cpp)");
  m.def("conv_step", &conv_step_any, "one causal conv1d token per sequence, the state rows shifted in place (conv.cpp)");
}
