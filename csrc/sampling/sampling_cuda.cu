// Temperature sampling CUDA kernels (ATen-free). Same semantics as sampling_cpu.h.
//
// sample_kernel: grid (B, splits); each CTA streams a contiguous part of one row once and
// keeps, per thread: the raw online log-sum-exp, the tempered log-sum-exp over kept entries,
// the Gumbel-max candidate (key, index) and the argmax (for tau = 0). Philox noise for 4
// consecutive entries comes from one Philox call keyed by (seed, offset, v / 4), exactly as
// on the CPU. Entries with l + tau * 17.5 below the thread's best key cannot win (Gumbel
// noise from 24-bit uniforms is < 17.33), so their noise is never computed.
// sample_finish_kernel merges the splits of each row. truncation_kernel (one CTA per row,
// only when top-k / top-p / min-p are given) finds the smallest kept logit by bisection on
// the order-preserving integer image of the floats.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>

#include "../common/philox.h"
#include "../dispatch.h"

namespace fusedlm {
namespace sampling_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPartial = 8;  // floats per (row, split) partial
constexpr float kMaxGumbel = 17.5f;

template <typename T>
__device__ __forceinline__ float load_logit(const T* p);
template <>
__device__ __forceinline__ float load_logit(const float* p) { return __ldg(p); }
template <>
__device__ __forceinline__ float load_logit(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <>
__device__ __forceinline__ float load_logit(const __half* p) { return __half2float(*p); }

struct RowState {
  float raw_max = -INFINITY, raw_sum = 0.f;   // sum of exp(l - raw_max)
  float p_max = -INFINITY, p_sum = 0.f;       // sum of exp((l - p_max) / tau) over kept
  float best_key = -INFINITY;
  int64_t best_idx = -1;
  float arg_val = -INFINITY;
  int64_t arg_idx = -1;
};

__device__ __forceinline__ void online_add(float& m, float& s, float x, float inv_tau) {
  if (x == -INFINITY) return;
  if (x > m) {
    s = s * __expf((m - x) * inv_tau) + 1.f;
    m = x;
  } else {
    s += __expf((x - m) * inv_tau);
  }
}

__device__ __forceinline__ void online_merge(float& m, float& s, float m2, float s2, float inv_tau) {
  if (m2 == -INFINITY) return;
  if (m == -INFINITY) {
    m = m2;
    s = s2;
    return;
  }
  const float mx = fmaxf(m, m2);
  s = s * __expf((m - mx) * inv_tau) + s2 * __expf((m2 - mx) * inv_tau);
  m = mx;
}

// Larger key wins; on equal keys the lower index wins (index -1 = empty).
__device__ __forceinline__ void best_merge(float& key, int64_t& idx, float key2, int64_t idx2) {
  if (idx2 < 0) return;
  if (idx < 0 || key2 > key || (key2 == key && idx2 < idx)) {
    key = key2;
    idx = idx2;
  }
}

__device__ void merge_state(RowState& a, const RowState& b, float inv_tau) {
  online_merge(a.raw_max, a.raw_sum, b.raw_max, b.raw_sum, 1.f);
  online_merge(a.p_max, a.p_sum, b.p_max, b.p_sum, inv_tau);
  best_merge(a.best_key, a.best_idx, b.best_key, b.best_idx);
  best_merge(a.arg_val, a.arg_idx, b.arg_val, b.arg_idx);
}

__device__ RowState shfl_state(const RowState& s, int off) {
  RowState o;
  o.raw_max = __shfl_xor_sync(0xffffffffu, s.raw_max, off);
  o.raw_sum = __shfl_xor_sync(0xffffffffu, s.raw_sum, off);
  o.p_max = __shfl_xor_sync(0xffffffffu, s.p_max, off);
  o.p_sum = __shfl_xor_sync(0xffffffffu, s.p_sum, off);
  o.best_key = __shfl_xor_sync(0xffffffffu, s.best_key, off);
  o.best_idx = __shfl_xor_sync(0xffffffffu, s.best_idx, off);
  o.arg_val = __shfl_xor_sync(0xffffffffu, s.arg_val, off);
  o.arg_idx = __shfl_xor_sync(0xffffffffu, s.arg_idx, off);
  return o;
}

__device__ RowState block_reduce(RowState s, float inv_tau) {
  __shared__ RowState warp_states[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) merge_state(s, shfl_state(s, off), inv_tau);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_states[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) merge_state(s, warp_states[w], inv_tau);
  }
  return s;  // valid in thread 0
}

__device__ __forceinline__ bool valid_tau(float tau) { return tau >= 0.f; }  // false for NaN

template <typename T>
__global__ void __launch_bounds__(kThreads) sample_kernel(SampleArgs a, const float* thresholds,
                                                          int64_t groups_per_split) {
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const T* l = static_cast<const T*>(a.logits) + row * a.ld;
  const float tau = a.temperature[row];
  const float inv_tau = tau > 0.f ? 1.f / tau : 1.f;
  const bool greedy = !(tau > 0.f);
  const float threshold = thresholds != nullptr ? thresholds[row] : -INFINITY;
  const uint64_t seed = static_cast<uint64_t>(a.seed[row]);
  const uint64_t offset = static_cast<uint64_t>(a.offset[row]);
  const int64_t total_groups = (a.V + 3) / 4;
  const int64_t g_begin = split * groups_per_split;
  const int64_t g_end = min(g_begin + groups_per_split, total_groups);
  RowState st;
  for (int64_t grp = g_begin + threadIdx.x; grp < g_end; grp += kThreads) {
    float x[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t v = grp * 4 + q;
      x[q] = v < a.V ? load_logit(l + v) : -INFINITY;
      online_add(st.raw_max, st.raw_sum, x[q], 1.f);
    }
    if (greedy) {
#pragma unroll
      for (int q = 0; q < 4; ++q) best_merge(st.arg_val, st.arg_idx, x[q], grp * 4 + q < a.V ? grp * 4 + q : -1);
      continue;
    }
    bool any_candidate = false;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (!(x[q] >= threshold)) x[q] = -INFINITY;  // truncated (or NaN)
      online_add(st.p_max, st.p_sum, x[q], inv_tau);
      any_candidate |= x[q] != -INFINITY && (st.best_idx < 0 || x[q] + tau * kMaxGumbel >= st.best_key);
    }
    if (!any_candidate) continue;
    const Uint4 bits = philox_block(seed, offset, static_cast<uint64_t>(grp));
    const uint32_t lane_bits[4] = {bits.x, bits.y, bits.z, bits.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (x[q] == -INFINITY) continue;
      const float key = __fadd_rn(x[q], __fmul_rn(tau, gumbel_from_bits(lane_bits[q])));
      best_merge(st.best_key, st.best_idx, key, grp * 4 + q);
    }
  }
  st = block_reduce(st, inv_tau);
  if (threadIdx.x == 0) {
    float* out = a.workspace + (row * a.splits + split) * kPartial;
    out[0] = st.raw_max;
    out[1] = st.raw_sum;
    out[2] = st.p_max;
    out[3] = st.p_sum;
    out[4] = greedy ? st.arg_val : st.best_key;
    out[5] = __int_as_float(static_cast<int>(greedy ? st.arg_idx : st.best_idx));
  }
}

template <typename T>
__global__ void sample_finish_kernel(SampleArgs a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= a.B) return;
  const float tau = a.temperature[row];
  const float inv_tau = tau > 0.f ? 1.f / tau : 1.f;
  RowState st;
  for (int s = 0; s < a.splits; ++s) {
    const float* p = a.workspace + (row * a.splits + s) * kPartial;
    online_merge(st.raw_max, st.raw_sum, p[0], p[1], 1.f);
    online_merge(st.p_max, st.p_sum, p[2], p[3], inv_tau);
    best_merge(st.best_key, st.best_idx, p[4], __float_as_int(p[5]));
  }
  if (!valid_tau(tau) || st.raw_max == -INFINITY || st.best_idx < 0) {
    // invalid temperature or a fully masked row: documented fallback, no crash
    a.tokens[row] = 0;
    a.logprob[row] = NAN;
    a.raw_logprob[row] = NAN;
    return;
  }
  const int64_t token = st.best_idx;
  const float lt = load_logit(static_cast<const T*>(a.logits) + row * a.ld + token);
  a.tokens[row] = token;
  a.raw_logprob[row] = lt - st.raw_max - logf(st.raw_sum);
  a.logprob[row] = tau > 0.f ? (lt - st.p_max) * inv_tau - logf(st.p_sum) : 0.f;
}

__device__ __forceinline__ float from_order_key(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

__device__ float block_sum(float x) {
  __shared__ float part[kThreads / 32];
  __shared__ float total;
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = x;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) s += part[w];
    total = s;
  }
  __syncthreads();
  const float r = total;
  __syncthreads();
  return r;
}

__device__ float block_max(float x) {
  __shared__ float part[kThreads / 32];
  __shared__ float total;
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = x;
  __syncthreads();
  if (threadIdx.x == 0) {
    float m = -INFINITY;
    for (int w = 0; w < kThreads / 32; ++w) m = fmaxf(m, part[w]);
    total = m;
  }
  __syncthreads();
  const float r = total;
  __syncthreads();
  return r;
}

// Largest float t >= -inf with measure(t) >= target (measure is non-increasing in t), by
// bisection over the order-preserving integer image of the floats (-inf maps to 0x007fffff).
template <typename Measure>
__device__ float bisect_threshold(Measure&& measure, float target) {
  uint32_t lo = 0x007fffffu, hi = 0xff800000u;  // -inf .. +inf
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo + 1) / 2;
    if (measure(from_order_key(mid)) >= target) lo = mid; else hi = mid - 1;
  }
  return from_order_key(lo);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) truncation_kernel(SampleArgs a, float* thresholds) {
  const int64_t row = blockIdx.x;
  const T* l = static_cast<const T*>(a.logits) + row * a.ld;
  const float tau = a.temperature[row];
  float threshold = -INFINITY;
  if (!(tau > 0.f)) {
    if (threadIdx.x == 0) thresholds[row] = threshold;
    return;
  }
  float local_max = -INFINITY;
  for (int64_t v = threadIdx.x; v < a.V; v += kThreads) local_max = fmaxf(local_max, load_logit(l + v));
  const float row_max = block_max(local_max);
  const int64_t k = a.top_k != nullptr ? a.top_k[row] : 0;
  if (k > 0 && k < a.V) {
    auto count_at_least = [&](float t) {
      float n = 0.f;
      for (int64_t v = threadIdx.x; v < a.V; v += kThreads) n += load_logit(l + v) >= t ? 1.f : 0.f;
      return block_sum(n);
    };
    threshold = bisect_threshold(count_at_least, static_cast<float>(k));
  }
  const float top_p = a.top_p != nullptr ? a.top_p[row] : 1.f;
  if (top_p < 1.f && row_max != -INFINITY) {
    const float inv_tau = 1.f / tau;
    const float floor_k = threshold;
    auto mass_at_least = [&](float t) {
      float m = 0.f;
      for (int64_t v = threadIdx.x; v < a.V; v += kThreads) {
        const float x = load_logit(l + v);
        if (x >= t && x >= floor_k) m += __expf((x - row_max) * inv_tau);
      }
      return block_sum(m);
    };
    threshold = fmaxf(threshold, bisect_threshold(mass_at_least, top_p * mass_at_least(-INFINITY)));
  }
  const float min_p = a.min_p != nullptr ? a.min_p[row] : 0.f;
  if (min_p > 0.f) threshold = fmaxf(threshold, row_max + tau * logf(min_p));
  if (threadIdx.x == 0) thresholds[row] = threshold;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) temperature_logprobs_kernel(TemperatureLogprobArgs a) {
  constexpr int kMaxK = 16;
  const int64_t row = blockIdx.x;
  const T* l = static_cast<const T*>(a.logits) + row * a.ld;
  float local_max = -INFINITY;
  int64_t local_arg = -1;
  for (int64_t v = threadIdx.x; v < a.V; v += kThreads) {
    const float x = load_logit(l + v);
    if (local_arg < 0 || x > local_max) {
      local_max = x;
      local_arg = v;
    }
  }
  RowState st;
  st.arg_val = local_max;
  st.arg_idx = local_arg;
  st = block_reduce(st, 1.f);
  __shared__ float row_max;
  __shared__ int64_t row_arg;
  if (threadIdx.x == 0) {
    row_max = st.arg_val;
    row_arg = st.arg_idx;
  }
  __syncthreads();
  float sums[kMaxK];
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) sums[k] = 0.f;
  for (int64_t v = threadIdx.x; v < a.V; v += kThreads) {
    const float centred = load_logit(l + v) - row_max;
#pragma unroll
    for (int k = 0; k < kMaxK; ++k)
      if (k < a.K && a.temperatures[k] > 0.f) sums[k] += __expf(centred / a.temperatures[k]);
  }
  const int64_t token = a.tokens[row];
  const float lt = (token >= 0 && token < a.V) ? load_logit(l + token) : NAN;
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) {
    if (k >= a.K) break;
    const float total = block_sum(sums[k]);
    if (threadIdx.x == 0) {
      const float tau = a.temperatures[k];
      a.out[row * a.K + k] = tau > 0.f ? (lt - row_max) / tau - logf(total)
                                       : (token == row_arg ? 0.f : -INFINITY);
    }
  }
}

template <typename T>
cudaError_t sample_typed(const SampleArgs& a, cudaStream_t stream) {
  const int64_t total_groups = (a.V + 3) / 4;
  const int64_t groups_per_split = (total_groups + a.splits - 1) / a.splits;
  float* thresholds = nullptr;
  if (a.top_k != nullptr || a.top_p != nullptr || a.min_p != nullptr) {
    // The partials region has room after B * splits * kPartial floats (see the glue).
    thresholds = a.workspace + a.B * a.splits * kPartial;
    truncation_kernel<T><<<static_cast<unsigned>(a.B), kThreads, 0, stream>>>(a, thresholds);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  sample_kernel<T><<<dim3(static_cast<unsigned>(a.B), a.splits), kThreads, 0, stream>>>(
      a, thresholds, groups_per_split);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  sample_finish_kernel<T><<<static_cast<unsigned>((a.B + 127) / 128), 128, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

int sample_splits(int64_t B, int64_t V, int num_sms) {
  // Enough CTAs to fill the GPU at small batch, but at least ~2048 entries per CTA.
  const int64_t by_occupancy = (4 * static_cast<int64_t>(num_sms) + B - 1) / B;
  const int64_t by_work = (V + 2047) / 2048;
  const int64_t s = by_occupancy < by_work ? by_occupancy : by_work;
  return static_cast<int>(s < 1 ? 1 : (s > 65535 ? 65535 : s));
}

cudaError_t sample(const SampleArgs& a, cudaStream_t stream) {
  if (a.B == 0) return cudaSuccess;
  switch (a.dtype) {
    case DType::kFloat32: return sample_typed<float>(a, stream);
    case DType::kBFloat16: return sample_typed<__nv_bfloat16>(a, stream);
    case DType::kFloat16: return sample_typed<__half>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t temperature_logprobs(const TemperatureLogprobArgs& a, cudaStream_t stream) {
  if (a.B == 0 || a.K == 0) return cudaSuccess;
  if (a.K > 16) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat32:
      temperature_logprobs_kernel<float><<<static_cast<unsigned>(a.B), kThreads, 0, stream>>>(a);
      break;
    case DType::kBFloat16:
      temperature_logprobs_kernel<__nv_bfloat16><<<static_cast<unsigned>(a.B), kThreads, 0, stream>>>(a);
      break;
    case DType::kFloat16:
      temperature_logprobs_kernel<__half><<<static_cast<unsigned>(a.B), kThreads, 0, stream>>>(a);
      break;
  }
  return cudaGetLastError();
}

}  // namespace sampling_cuda
}  // namespace fusedlm
