// CUDA kernels of token_stats (docs/ops.md): log-prob of the target, entropy, logsumexp (and on
// request varentropy and the top-2 margin) of every row of logits, and the fused backward.
//
// Forward: a group of warps per row reads the row once. Each thread keeps float32 sums relative to
// its running max m (d = (x − m)·inv_T ≤ 0, so no cancellation at large logits):
//   S = Σ e^d,  A = Σ e^d·d,  B = Σ e^d·d²,
// rescaled when m grows, then merged across the warp (shuffles) and the row's warps (shared
// memory) in a fixed order. With them: lse = m·inv_T + log S, H = log S − A/S,
// Var_p[log p] = B/S − (A/S)². Plain CUDA C++ (no torch headers); csrc/bindings.cpp wraps it.
#include "token_stats.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kVecBytes = 16;              // one 128-bit load or store
constexpr int kMaxWarpsPerRow = 16;        // 512 threads share the largest vocabularies
constexpr int kSmallRowWarpsPerBlock = 8;  // rows needing fewer warps share 256-thread blocks
constexpr int kMaxWarpsPerBlock = kMaxWarpsPerRow;
constexpr int kMaxThreadsPerBlock = kMaxWarpsPerBlock * kWarpSize;
constexpr int kChunksPerThread = 8;  // a row gets warps until each thread has at most this many
constexpr int kUnroll = 4;           // chunks loaded before they are used, to keep loads in flight
// Far below log(smallest float) ≈ −103.3: expf gives exactly 0 there and 0·d stays finite, so −inf
// logits (and the padding past V) add exactly 0 to S, A and B.
constexpr float kExpFloor = -1024.0f;
constexpr float kNegInf = -INFINITY;

static_assert(kSmallRowWarpsPerBlock <= kMaxWarpsPerBlock, "small-row blocks must fit the limit");

// ---------------------------------------------------------------------------------------------
// Element types

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// 16 bytes of elements: 4 float32 or 8 float16/bfloat16, moved in one access.
template <typename T>
struct alignas(kVecBytes) Pack {
  static constexpr int kSize = kVecBytes / static_cast<int>(sizeof(T));
  T v[kSize];
};

// Logits are read-only for the whole kernel: read them through the non-coherent cache.
template <typename T>
__device__ __forceinline__ float load_float(const T* p) {
  return to_float(__ldg(p));
}

// Packs move as one uint4: a single 128-bit load or store (a plain struct copy of 16-bit elements
// is split into narrower accesses by the compiler; __stwb keeps the store whole).
template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  const uint4 bits = __ldg(reinterpret_cast<const uint4*>(p));
  Pack<T> pack;
  memcpy(&pack, &bits, sizeof(pack));
  return pack;
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& pack) {
  uint4 bits;
  memcpy(&bits, &pack, sizeof(bits));
  __stwb(reinterpret_cast<uint4*>(p), bits);
}

// Max that propagates NaN (like torch.amax), so a row holding a NaN is known by its maximum.
__device__ __forceinline__ float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (b > a || b != b) ? b : a;
#endif
}

__device__ __forceinline__ int64_t row_offset(int64_t r, int64_t inner, int64_t stride_outer,
                                              int64_t stride_inner) {
  return (r / inner) * stride_outer + (r % inner) * stride_inner;  // appo_kernels/_strides.py
}

// ---------------------------------------------------------------------------------------------
// Forward: online accumulators

struct RowAcc {
  float m;     // running max of the raw logits (NaN once a NaN was seen)
  float s;     // Σ e^d with d = (x − m)·inv_T
  float a;     // Σ e^d·d
  float b;     // Σ e^d·d²          (varentropy only)
  float top1;  // largest raw logit (top2 only)
  float top2;  // second largest, a repeated maximum counting twice (as torch.topk)
};

__device__ __forceinline__ RowAcc empty_acc() {
  return RowAcc{kNegInf, 0.0f, 0.0f, 0.0f, kNegInf, kNegInf};
}

// Re-expresses the sums relative to a max m_new ≥ acc.m: d becomes d + δ, δ = (m − m_new)·inv_T.
template <bool kVar>
__device__ __forceinline__ void rescale(RowAcc& acc, float m_new, float inv_t) {
  if (acc.m == m_new) return;  // also keeps an empty accumulator (m = −inf) as it is
  const float delta = (acc.m - m_new) * inv_t;
  const float c = expf(delta);
  if (c == 0.0f) {
    // The old terms underflow, or there were none (m was −inf): δ·S could be (−inf)·0 here.
    acc.s = acc.a = acc.b = 0.0f;
  } else {
    if (kVar) acc.b = c * (acc.b + delta * (2.0f * acc.a + delta * acc.s));  // Σ e^(d+δ)(d+δ)²
    acc.a = c * (acc.a + delta * acc.s);                                     // Σ e^(d+δ)(d+δ)
    acc.s = c * acc.s;
  }
  acc.m = m_new;
}

template <int kVec, bool kVar, bool kTop2>
__device__ __forceinline__ void accumulate_chunk(RowAcc& acc, const float (&x)[kVec],
                                                 float inv_t) {
  float chunk_max = x[0];
#pragma unroll
  for (int k = 1; k < kVec; ++k) chunk_max = max_nan(chunk_max, x[k]);
  if (chunk_max == kNegInf) return;  // all −inf (or padding): adds exactly nothing
  rescale<kVar>(acc, max_nan(acc.m, chunk_max), inv_t);
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    // Subtract the max before scaling by 1/T (docs/ops.md); the floor makes −inf add 0, not NaN.
    const float d = fmaxf((x[k] - acc.m) * inv_t, kExpFloor);
    const float e = expf(d);
    acc.s += e;
    acc.a = fmaf(e, d, acc.a);
    if (kVar) acc.b = fmaf(e * d, d, acc.b);
    if (kTop2) {
      acc.top2 = fmaxf(acc.top2, fminf(acc.top1, x[k]));
      acc.top1 = fmaxf(acc.top1, x[k]);
    }
  }
}

// Symmetric in its two arguments, so every lane of a butterfly ends with the same bits.
template <bool kVar, bool kTop2>
__device__ __forceinline__ void merge(RowAcc& acc, RowAcc other, float inv_t) {
  const float m = max_nan(acc.m, other.m);
  rescale<kVar>(acc, m, inv_t);
  rescale<kVar>(other, m, inv_t);
  acc.s += other.s;
  acc.a += other.a;
  if (kVar) acc.b += other.b;
  if (kTop2) {
    acc.top2 = fmaxf(fminf(acc.top1, other.top1), fmaxf(acc.top2, other.top2));
    acc.top1 = fmaxf(acc.top1, other.top1);
  }
}

template <bool kVar, bool kTop2>
__device__ __forceinline__ void warp_merge(RowAcc& acc, float inv_t) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    RowAcc other = empty_acc();
    other.m = __shfl_xor_sync(kFullWarp, acc.m, offset);
    other.s = __shfl_xor_sync(kFullWarp, acc.s, offset);
    other.a = __shfl_xor_sync(kFullWarp, acc.a, offset);
    if (kVar) other.b = __shfl_xor_sync(kFullWarp, acc.b, offset);
    if (kTop2) {
      other.top1 = __shfl_xor_sync(kFullWarp, acc.top1, offset);
      other.top2 = __shfl_xor_sync(kFullWarp, acc.top2, offset);
    }
    merge<kVar, kTop2>(acc, other, inv_t);
  }
}

// Chunk c holds elements [c·kVec, c·kVec + kVec); elements past V read as −inf, which adds 0.
// Aligned rows load a full chunk in one 16-byte access, others element by element, into the same
// registers in the same order: a row's bits do not depend on its address (batch invariance).
template <typename T>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, int64_t c, int64_t V,
                                           bool aligned, float (&x)[Pack<T>::kSize]) {
  constexpr int kVec = Pack<T>::kSize;
  const int64_t j0 = c * kVec;
  if (aligned && j0 + kVec <= V) {
    const Pack<T> p = load_pack(row + j0);
#pragma unroll
    for (int k = 0; k < kVec; ++k) x[k] = to_float(p.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) x[k] = j0 + k < V ? load_float(row + j0 + k) : kNegInf;
  }
}

struct FwdArgs {
  const void* logits;
  int64_t n_rows, inner, stride_outer, stride_inner, V;
  const int64_t* target;  // null: no logprob
  const bool* mask;       // null: every row
  float inv_t;
  float *logprob, *entropy, *lse, *varentropy, *top2, *row_max, *log_norm;
};

// One group of `warps_per_row` warps per row, blockDim.x / (32·warps_per_row) rows per block. The
// layout depends only on V and the dtype, never on n_rows (batch invariance).
template <typename T, bool kVar, bool kTop2>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    token_stats_fwd_kernel(const FwdArgs args, const int warps_per_row) {
  constexpr int kVec = Pack<T>::kSize;
  __shared__ RowAcc warp_acc[kMaxWarpsPerBlock];

  const int threads_per_row = warps_per_row * kWarpSize;
  const int rows_per_block = blockDim.x / threads_per_row;
  const int tid = threadIdx.x % threads_per_row;  // thread within the row's group
  const int64_t r =
      static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / threads_per_row;
  const bool in_range = r < args.n_rows;
  const bool active = in_range && (args.mask == nullptr || args.mask[r]);  // masked rows: not read
  const int64_t V = args.V;
  const float inv_t = args.inv_t;
  const T* row = static_cast<const T*>(args.logits) +
                 (active ? row_offset(r, args.inner, args.stride_outer, args.stride_inner) : 0);

  RowAcc acc = empty_acc();
  if (active) {
    const bool aligned = reinterpret_cast<uintptr_t>(row) % kVecBytes == 0;
    const int64_t n_chunks = (V + kVec - 1) / kVec;
    // Thread tid takes chunks tid, tid + threads_per_row, ... in increasing order.
    int64_t c = tid;
    for (; c + (kUnroll - 1) * threads_per_row < n_chunks; c += kUnroll * threads_per_row) {
      float x[kUnroll][kVec];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) load_chunk(row, c + u * threads_per_row, V, aligned, x[u]);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) accumulate_chunk<kVec, kVar, kTop2>(acc, x[u], inv_t);
    }
    for (; c < n_chunks; c += threads_per_row) {
      float x[kVec];
      load_chunk(row, c, V, aligned, x);
      accumulate_chunk<kVec, kVar, kTop2>(acc, x, inv_t);
    }
  }

  // Every warp of the block takes part, rows out of range or masked with empty accumulators.
  warp_merge<kVar, kTop2>(acc, inv_t);
  if (warps_per_row > 1) {  // uniform over the block, so the barrier is reached by all threads
    const int warp = threadIdx.x / kWarpSize;
    if (threadIdx.x % kWarpSize == 0) warp_acc[warp] = acc;
    __syncthreads();
    if (tid == 0) {  // first lane of the row's first warp merges its warps in a fixed order
      for (int w = 1; w < warps_per_row; ++w) merge<kVar, kTop2>(acc, warp_acc[warp + w], inv_t);
    }
  }
  if (tid != 0 || !in_range) return;

  if (!active) {
    if (args.logprob) args.logprob[r] = 0.0f;
    args.entropy[r] = 0.0f;
    args.lse[r] = 0.0f;
    if (kVar) args.varentropy[r] = 0.0f;
    if (kTop2) args.top2[r] = 0.0f;
    args.row_max[r] = 0.0f;
    args.log_norm[r] = 0.0f;
    return;
  }

  const float nan = NAN;
  // Not finite when the row holds a NaN (m is NaN) or +inf, or has no finite logit (m = −inf).
  const bool finite = isfinite(acc.m);
  // S ≥ 1 on a finite row (the maximum adds e^0), so the divisions are safe. Per-row finishing
  // math in double adds no rounding beyond the float32 sums.
  const double m = acc.m;
  const double s = acc.s;
  const double log_s = log(s);
  const double mean_d = acc.a / s;
  args.lse[r] = finite ? static_cast<float>(m * inv_t + log_s) : nan;
  args.entropy[r] = finite ? static_cast<float>(log_s - mean_d) : nan;
  args.row_max[r] = finite ? acc.m : 0.0f;
  args.log_norm[r] = finite ? static_cast<float>(log_s) : nan;
  if (args.logprob) {
    const int64_t t = args.target[r];
    float logprob = nan;  // also for a target outside [0, V)
    if (finite && t >= 0 && t < V) {
      logprob = static_cast<float>((static_cast<double>(load_float(row + t)) - m) * inv_t - log_s);
    }
    args.logprob[r] = logprob;
  }
  if (kVar) {
    const double var = acc.b / s - mean_d * mean_d;
    args.varentropy[r] = finite ? static_cast<float>(var > 0.0 ? var : 0.0) : nan;
  }
  if (kTop2) {
    // top2 stays −inf when V == 1 (the padding is −inf) or the runner-up is −inf: margin +inf.
    const float gap = acc.top2 == kNegInf
                          ? INFINITY
                          : static_cast<float>((static_cast<double>(acc.top1) - acc.top2) * inv_t);
    args.top2[r] = finite ? gap : nan;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

// out[j] = f(j, x_j) over one row, with 16-byte loads and stores when the two rows are equally
// misaligned (then a scalar head reaches the boundary), element by element otherwise. Without
// kRead the input is not touched and f gets x = 0.
template <typename T, bool kRead, typename F>
__device__ __forceinline__ void map_row(const T* __restrict__ row, T* __restrict__ out, int64_t V,
                                        int tid, int threads_per_row, F f) {
  constexpr int kVec = Pack<T>::kSize;
  constexpr int64_t kSize = sizeof(T);
  const uintptr_t out_mis = reinterpret_cast<uintptr_t>(out) % kVecBytes;
  const uintptr_t in_mis = kRead ? reinterpret_cast<uintptr_t>(row) % kVecBytes : out_mis;
  // Elements handled one by one before the vector body; all of them when it cannot be aligned.
  int64_t head = V;
  if (in_mis == out_mis) {
    const int64_t to_boundary = static_cast<int64_t>((kVecBytes - out_mis) % kVecBytes) / kSize;
    head = to_boundary < V ? to_boundary : V;
  }
  for (int64_t j = tid; j < head; j += threads_per_row) {
    out[j] = from_float<T>(f(j, kRead ? load_float(row + j) : 0.0f));
  }
  const int64_t n_vec = (V - head) / kVec;
  for (int64_t c = tid; c < n_vec; c += threads_per_row) {
    const int64_t j0 = head + c * kVec;
    Pack<T> in;
    if (kRead) in = load_pack(row + j0);
    Pack<T> res;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      res.v[k] = from_float<T>(f(j0 + k, kRead ? to_float(in.v[k]) : 0.0f));
    }
    store_pack(out + j0, res);
  }
  for (int64_t j = head + n_vec * kVec + tid; j < V; j += threads_per_row) {
    out[j] = from_float<T>(f(j, kRead ? load_float(row + j) : 0.0f));
  }
}

struct BwdArgs {
  const void* logits;
  int64_t n_rows, inner, stride_outer, stride_inner, V;
  const int64_t* target;
  const bool* mask;
  float inv_t;
  const float *row_max, *log_norm, *entropy;
  const float *g_logprob, *g_entropy, *g_lse;  // null: 0
  void* grad;                                  // contiguous [n_rows, V]
};

// Same row layout as the forward; rows are independent and no barrier is used.
template <typename T>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    token_stats_bwd_kernel(const BwdArgs args, const int warps_per_row) {
  const int threads_per_row = warps_per_row * kWarpSize;
  const int rows_per_block = blockDim.x / threads_per_row;
  const int tid = threadIdx.x % threads_per_row;
  const int64_t r =
      static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / threads_per_row;
  if (r >= args.n_rows) return;
  const int64_t V = args.V;
  T* out = static_cast<T*>(args.grad) + r * V;

  if (args.mask != nullptr && !args.mask[r]) {  // masked rows: not read, no gradient
    map_row<T, false>(nullptr, out, V, tid, threads_per_row, [](int64_t, float) { return 0.0f; });
    return;
  }
  const T* row = static_cast<const T*>(args.logits) +
                 row_offset(r, args.inner, args.stride_outer, args.stride_inner);

  const float inv_t = args.inv_t;
  const float m = args.row_max[r];
  const float log_norm = args.log_norm[r];
  const bool has_lp = args.g_logprob != nullptr && args.target != nullptr;
  const float g_lp = has_lp ? args.g_logprob[r] : 0.0f;
  const int64_t t = has_lp ? args.target[r] : -1;  // ids outside [0, V) match no j: no one-hot
  // Only upstream gradients that are given touch p: 0·p would turn a NaN row's zero grad to NaN.
  const bool has_p = has_lp || args.g_lse != nullptr;
  const float coef_p = (args.g_lse != nullptr ? args.g_lse[r] : 0.0f) - g_lp;
  const bool has_h = args.g_entropy != nullptr;
  const float g_h = has_h ? args.g_entropy[r] : 0.0f;
  const float h = has_h ? args.entropy[r] : 0.0f;

  // ∂lse/∂z = p, ∂logprob/∂z = onehot − p, ∂H/∂z_j = −p_j (log p_j + H); ∂z/∂x = inv_T.
  map_row<T, true>(row, out, V, tid, threads_per_row, [=](int64_t j, float x) {
    const float log_p = (x - m) * inv_t - log_norm;
    const float p = expf(log_p);
    float g = has_p ? coef_p * p : 0.0f;
    // p·(log p + H) → 0 as p → 0; where p == 0 (−inf logits) the product would be 0·(−inf).
    if (has_h) g -= g_h * (p > 0.0f ? p * (log_p + h) : 0.0f);
    if (j == t) g += g_lp;
    return g * inv_t;
  });
}

// ---------------------------------------------------------------------------------------------
// Launchers

struct RowLayout {
  int warps_per_row;
  int rows_per_block;
};

// Depends only on V and the vector width (the dtype), never on n_rows: batch invariance.
RowLayout row_layout(int64_t V, int vec) {
  const int64_t n_chunks = (V + vec - 1) / vec;
  int warps = 1;
  while (warps < kMaxWarpsPerRow &&
         static_cast<int64_t>(warps) * kWarpSize * kChunksPerThread < n_chunks) {
    warps *= 2;
  }
  const int rows = warps < kSmallRowWarpsPerBlock ? kSmallRowWarpsPerBlock / warps : 1;
  return RowLayout{warps, rows};
}

bool grid_for(int64_t n_rows, const RowLayout& layout, dim3* grid, dim3* block) {
  const int64_t n_blocks = (n_rows + layout.rows_per_block - 1) / layout.rows_per_block;
  if (n_blocks > INT32_MAX) return false;  // gridDim.x limit
  *grid = dim3(static_cast<unsigned>(n_blocks));
  *block = dim3(static_cast<unsigned>(layout.warps_per_row * kWarpSize * layout.rows_per_block));
  return true;
}

template <typename T>
cudaError_t launch_fwd(const FwdArgs& args, cudaStream_t stream) {
  const RowLayout layout = row_layout(args.V, Pack<T>::kSize);
  dim3 grid, block;
  if (!grid_for(args.n_rows, layout, &grid, &block)) return cudaErrorInvalidConfiguration;
  const int w = layout.warps_per_row;
  const bool var = args.varentropy != nullptr;
  const bool top2 = args.top2 != nullptr;
  if (var && top2) {
    token_stats_fwd_kernel<T, true, true><<<grid, block, 0, stream>>>(args, w);
  } else if (var) {
    token_stats_fwd_kernel<T, true, false><<<grid, block, 0, stream>>>(args, w);
  } else if (top2) {
    token_stats_fwd_kernel<T, false, true><<<grid, block, 0, stream>>>(args, w);
  } else {
    token_stats_fwd_kernel<T, false, false><<<grid, block, 0, stream>>>(args, w);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const BwdArgs& args, cudaStream_t stream) {
  const RowLayout layout = row_layout(args.V, Pack<T>::kSize);
  dim3 grid, block;
  if (!grid_for(args.n_rows, layout, &grid, &block)) return cudaErrorInvalidConfiguration;
  token_stats_bwd_kernel<T><<<grid, block, 0, stream>>>(args, layout.warps_per_row);
  return cudaGetLastError();
}

}  // namespace

cudaError_t appo_token_stats_fwd(const void* logits, int dtype_code, int64_t n_rows, int64_t inner,
                                 int64_t stride_outer, int64_t stride_inner, int64_t V,
                                 const int64_t* target, const bool* mask, float inv_temperature,
                                 float* logprob, float* entropy, float* lse, float* varentropy,
                                 float* top2, float* row_max, float* log_norm,
                                 cudaStream_t stream) {
  if (n_rows == 0) return cudaSuccess;
  if (V < 1 || inner < 1) return cudaErrorInvalidValue;
  const FwdArgs args{logits,        n_rows, inner,   stride_outer, stride_inner,
                     V,             target, mask,    inv_temperature,
                     target != nullptr ? logprob : nullptr,
                     entropy,       lse,    varentropy, top2,      row_max,
                     log_norm};
  switch (dtype_code) {
    case APPO_DTYPE_FLOAT32: return launch_fwd<float>(args, stream);
    case APPO_DTYPE_FLOAT16: return launch_fwd<__half>(args, stream);
    case APPO_DTYPE_BFLOAT16: return launch_fwd<__nv_bfloat16>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t appo_token_stats_bwd(const void* logits, int dtype_code, int64_t n_rows, int64_t inner,
                                 int64_t stride_outer, int64_t stride_inner, int64_t V,
                                 const int64_t* target, const bool* mask, float inv_temperature,
                                 const float* row_max, const float* log_norm,
                                 const float* entropy, const float* g_logprob,
                                 const float* g_entropy, const float* g_lse, void* grad,
                                 cudaStream_t stream) {
  if (n_rows == 0) return cudaSuccess;
  if (V < 1 || inner < 1) return cudaErrorInvalidValue;
  const BwdArgs args{logits,   n_rows,   inner,   stride_outer, stride_inner, V,
                     target,   mask,     inv_temperature,       row_max,      log_norm,
                     entropy,  g_logprob, g_entropy,            g_lse,        grad};
  switch (dtype_code) {
    case APPO_DTYPE_FLOAT32: return launch_bwd<float>(args, stream);
    case APPO_DTYPE_FLOAT16: return launch_bwd<__half>(args, stream);
    case APPO_DTYPE_BFLOAT16: return launch_bwd<__nv_bfloat16>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}
