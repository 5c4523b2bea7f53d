// Host launchers of the token_stats CUDA kernels (docs/ops.md). Plain C++ with raw pointers so the
// kernels build without torch headers; csrc/bindings.cpp wraps them for torch.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

// Element type of `logits` (and of the gradient the backward writes).
enum AppoDType : int {
  APPO_DTYPE_FLOAT32 = 0,
  APPO_DTYPE_FLOAT16 = 1,
  APPO_DTYPE_BFLOAT16 = 2,
};

// Row r of `logits` starts at element (r / inner) * stride_outer + (r % inner) * stride_inner and
// holds V contiguous elements (appo_kernels/_strides.py). With z = (x - max) * inv_temperature,
// writes per row: lse, entropy, logprob of target[r] (when `logprob` is not null; NaN for a target
// outside [0, V)), varentropy and top2 (z_(1) - z_(2)) when their pointers are not null, and
// row_max / log_norm for the backward. A row with mask[r] false is not read and gets 0 everywhere;
// a row without a finite maximum gets NaN (row_max 0). `target` and `mask` may be null.
// Returns the launch error, if any; runs asynchronously on `stream`.
cudaError_t appo_token_stats_fwd(const void* logits, int dtype_code, int64_t n_rows, int64_t inner,
                                 int64_t stride_outer, int64_t stride_inner, int64_t V,
                                 const int64_t* target, const bool* mask, float inv_temperature,
                                 float* logprob, float* entropy, float* lse, float* varentropy,
                                 float* top2, float* row_max, float* log_norm,
                                 cudaStream_t stream);

// grad[r, j] = inv_T * [(g_lse - g_lp) * p_j + g_lp * [j == target] - g_H * p_j * (log p_j + H)],
// p_j = exp((x_j - row_max) * inv_T - log_norm), into the contiguous [n_rows, V] `grad` of the
// logits' dtype. A null upstream gradient counts as 0 (and `g_logprob` is ignored without
// `target`); rows with mask false get 0 without being read.
cudaError_t appo_token_stats_bwd(const void* logits, int dtype_code, int64_t n_rows, int64_t inner,
                                 int64_t stride_outer, int64_t stride_inner, int64_t V,
                                 const int64_t* target, const bool* mask, float inv_temperature,
                                 const float* row_max, const float* log_norm,
                                 const float* entropy, const float* g_logprob,
                                 const float* g_entropy, const float* g_lse, void* grad,
                                 cudaStream_t stream);
