// The torch extension appo_kernels._C: thin wrappers that allocate outputs and call the raw-pointer
// launchers on the current CUDA stream. Arguments arrive checked by appo_kernels (its Python glue
// passes target as int64, mask as bool and upstream gradients as float32, all contiguous [n_rows]).
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <tuple>

#include "token_stats.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

int dtype_code(const Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat: return APPO_DTYPE_FLOAT32;
    case at::kHalf: return APPO_DTYPE_FLOAT16;
    case at::kBFloat16: return APPO_DTYPE_BFLOAT16;
    default: break;
  }
  TORCH_CHECK(false, "appo token_stats: logits must be float32, float16 or bfloat16, got ",
              logits.scalar_type());
  return -1;  // unreachable: TORCH_CHECK(false) throws
}

template <typename T>
const T* ptr_or_null(const OptTensor& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

float* out_or_null(Tensor& t, bool wanted) { return wanted ? t.data_ptr<float>() : nullptr; }

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "appo ", what, " failed: ", cudaGetErrorString(err));
}

// Returns (logprob, entropy, lse, varentropy, top2, row_max, log_norm), float32 [n_rows]; logprob
// (without target), varentropy and top2 (unless requested) are empty [0].
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> token_stats_fwd(
    const Tensor& logits, const OptTensor& target, const OptTensor& mask, int64_t n_rows,
    int64_t inner, int64_t stride_outer, int64_t stride_inner, double inv_temperature,
    bool want_varentropy, bool want_top2) {
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto opts = logits.options().dtype(at::kFloat);
  auto rows = [&](bool wanted) { return at::empty({wanted ? n_rows : 0}, opts); };
  Tensor logprob = rows(target.has_value()), entropy = rows(true), lse = rows(true);
  Tensor varentropy = rows(want_varentropy), top2 = rows(want_top2);
  Tensor row_max = rows(true), log_norm = rows(true);
  check_launch(
      appo_token_stats_fwd(logits.const_data_ptr(), dtype_code(logits), n_rows, inner, stride_outer,
                           stride_inner, logits.size(-1), ptr_or_null<int64_t>(target),
                           ptr_or_null<bool>(mask), static_cast<float>(inv_temperature),
                           out_or_null(logprob, target.has_value()),
                           entropy.data_ptr<float>(), lse.data_ptr<float>(),
                           out_or_null(varentropy, want_varentropy),
                           out_or_null(top2, want_top2), row_max.data_ptr<float>(),
                           log_norm.data_ptr<float>(), stream),
      "token_stats_fwd");
  return {logprob, entropy, lse, varentropy, top2, row_max, log_norm};
}

// Returns the gradient with respect to the rows of `logits`, contiguous [n_rows, V] in its dtype.
Tensor token_stats_bwd(const Tensor& logits, const OptTensor& target, const OptTensor& mask,
                       int64_t n_rows, int64_t inner, int64_t stride_outer, int64_t stride_inner,
                       const Tensor& row_max, const Tensor& log_norm, const Tensor& entropy,
                       const OptTensor& g_logprob, const OptTensor& g_entropy,
                       const OptTensor& g_lse, double inv_temperature) {
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  Tensor grad = at::empty({n_rows, logits.size(-1)}, logits.options());
  check_launch(
      appo_token_stats_bwd(logits.const_data_ptr(), dtype_code(logits), n_rows, inner, stride_outer,
                           stride_inner, logits.size(-1), ptr_or_null<int64_t>(target),
                           ptr_or_null<bool>(mask), static_cast<float>(inv_temperature),
                           row_max.const_data_ptr<float>(), log_norm.const_data_ptr<float>(),
                           entropy.const_data_ptr<float>(), ptr_or_null<float>(g_logprob),
                           ptr_or_null<float>(g_entropy), ptr_or_null<float>(g_lse),
                           grad.data_ptr(), stream),
      "token_stats_bwd");
  return grad;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "appo CUDA kernels (see appo_kernels for the public API)";
  m.def("token_stats_fwd", &token_stats_fwd, "token_stats forward over rows of logits",
        py::arg("logits"), py::arg("target"), py::arg("mask"), py::arg("n_rows"),
        py::arg("inner"), py::arg("stride_outer"), py::arg("stride_inner"),
        py::arg("inv_temperature"), py::arg("want_varentropy"), py::arg("want_top2"));
  m.def("token_stats_bwd", &token_stats_bwd, "token_stats backward (gradient wrt logits rows)",
        py::arg("logits"), py::arg("target"), py::arg("mask"), py::arg("n_rows"),
        py::arg("inner"), py::arg("stride_outer"), py::arg("stride_inner"), py::arg("row_max"),
        py::arg("log_norm"), py::arg("entropy"), py::arg("g_logprob"), py::arg("g_entropy"),
        py::arg("g_lse"), py::arg("inv_temperature"));
}
