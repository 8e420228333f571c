// Temperature sampling CUDA kernels (ATen-free). Same semantics as sampling_cpu.h.
//
// sample_kernel: grid (B, splits); each CTA streams a contiguous range of 64-entry tiles of
// one row once. A warp works on batches of 32 tiles: it issues all of a batch's coalesced
// 16-byte loads before using any (enough bytes in flight to reach DRAM bandwidth), then
// regroups them through padded shared memory so that each lane owns one whole tile. The lane
// forms the tile's log-mass log(sum exp(l / tau)) over kept entries (max, then the sum, over
// the tile in registers; truncated rows with log-probs: an online fold)
// and keeps the tile with the largest log-mass + Gumbel key (base 2; one Philox block per
// pair of tiles, counter = tile / 2, as on the CPU); also the raw log-sum-exp (only when
// log-probs are asked for) and, for tau = 0 rows, the argmax. sample_finish_kernel (one warp
// per row) merges the splits of a row, re-reads the winning tile and picks the token inside
// it by inverse CDF with the tile's uniform. When a row has one split (large batches) its
// CTA does that itself and no finish kernel runs; for small batches on sm_90 (B = 5..16 and
// 45..66 on an H100) a row's splits form a thread-block cluster and merge in its first CTA's
// shared memory instead (see use_cluster_merge and sample_splits). Rows that are not 16-byte
// aligned go through sample_unaligned_kernel (same tile keys, one tile per lane, simple
// per-lane loads). On sm_90 every kernel is a programmatic dependent launch (launch latency
// hidden).
// truncation_kernel (only when top-k / top-p / min-p are given; one CTA per row, or a cluster
// of up to 16 CTAs per row when rows are few) finds the smallest kept logit by radix selection
// over the order-preserving integer image of the floats: three histogram passes per threshold
// (two for 16-bit logits). For tokens-only calls on few rows it then draws the token itself
// (draw_in_truncation), and no draw kernel follows.
// Tokens-only calls with top-p alone draw by rejection first (see SamplePass): a plain draw,
// top_p_check_kernel, and the threshold only for the rows whose draw fell outside the set.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cfloat>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "../common/convert.cuh"
#include "../common/fast_math.cuh"
#include "../common/philox.h"
#include "../dispatch.h"
#include "row_values.h"
#include "top_p_rejection.h"

namespace fusedlm {
namespace sampling_cuda {
namespace {

constexpr int kThreads = 256;
// A row split over a cluster of two CTAs gives them up to 16 warps each (one CTA per SM, as
// many warps as the two 8-warp CTAs per SM of the other plans); see sample_splits.
constexpr int kClusterThreads = 512;
constexpr int kPartial = 8;  // floats per (row, split, warp) partial
static_assert(kThreads / 32 * kPartial == kSampleSplitFloats, "workspace per (row, split): see dispatch.h");

template <typename T>
__device__ __forceinline__ float load_logit(const T* p);
template <>
__device__ __forceinline__ float load_logit(const float* p) { return __ldg(p); }
template <>
__device__ __forceinline__ float load_logit(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <>
__device__ __forceinline__ float load_logit(const __half* p) { return __half2float(*p); }

// A row's value of a per-row parameter: its entry, or the one value of every row (see
// RowParam; a parameter not given holds its "off" value there).
template <typename V>
__device__ __forceinline__ V row_value(const RowParam<V>& p, int64_t row) {
  return p.values != nullptr ? p.values[row] : p.value;
}
// The row's Philox offset (0 when no offsets are given: no zero-filled tensor to launch).
__device__ __forceinline__ uint64_t row_offset(const SampleArgs& a, int64_t row) {
  return static_cast<uint64_t>(row_value(a.offset, row));
}
// The row's seed: its entry, or derived from the batch's one seed (by value, or on the device).
__device__ __forceinline__ uint64_t row_seed(const SampleArgs& a, int64_t row) {
  if (a.seed.values == nullptr) return sampling::derived_row_seed(static_cast<uint64_t>(a.seed.value), row);
  return a.batch_seed_on_device ? sampling::derived_row_seed(static_cast<uint64_t>(*a.seed.values), row)
                                : static_cast<uint64_t>(a.seed.values[row]);
}

// A tile's key, log2 of its mass plus its Gumbel noise (base 2), as base * scale2 + frac
// (scale2 = log2(e) / tau): base = the tile's maximum (a logit), frac = log2 of the sum of
// 2^((x - max) * scale2) over its kept entries x, minus log2(E) (a few units). The scaled
// maximum is never formed: it overflows float32 when tau is tiny. tau = 0 rows: base = the
// argmax logit, frac = 0.
struct TileKey {
  float base = -INFINITY, frac = 0.f;
};

struct RowState {
  float raw_max = -INFINITY, raw_sum = 0.f;   // sum of exp(l - raw_max)
  float p_max = -INFINITY, p_sum = 0.f;       // sum of exp((l - p_max) / tau) over kept (p_max: a logit)
  TileKey best_key;
  int64_t best_idx = -1;
  float arg_val = -INFINITY;
  int64_t arg_idx = -1;
};

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

// The same for tile keys, compared as (base2 - base) * scale2 + (frac2 - frac): the bases'
// difference is exact where it is small (Sterbenz), so tiles holding the same maximum race on
// their noise at any tau > 0; where it is large its product may overflow, to the right sign.
// (Keys summed into one float rounded the noise to the key's ulp: at tau = 1e-6 and a maximum
// of 12, to steps of 1, and the lower of two tied tiles won 62% of the draws, H100, 40000
// draws; 98% at tau = 1e-7.)
__device__ __forceinline__ void best_merge(TileKey& key, int64_t& idx, TileKey key2, int64_t idx2, float scale2) {
  if (idx2 < 0) return;
  const float d = key2.base == key.base ? key2.frac - key.frac  // (also equal infinite bases)
                                        : fmaf(key2.base - key.base, scale2, key2.frac - key.frac);
  if (idx < 0 || d > 0.f || (d == 0.f && idx2 < idx)) {
    key = key2;
    idx = idx2;
  }
}

__device__ void merge_state(RowState& a, const RowState& b, float scale2, float inv_tau) {
  online_merge(a.raw_max, a.raw_sum, b.raw_max, b.raw_sum, 1.f);
  online_merge(a.p_max, a.p_sum, b.p_max, b.p_sum, inv_tau);
  best_merge(a.best_key, a.best_idx, b.best_key, b.best_idx, scale2);
  best_merge(a.arg_val, a.arg_idx, b.arg_val, b.arg_idx);
}

__device__ RowState shfl_state(const RowState& s, int off) {
  RowState o;
  o.raw_max = __shfl_xor_sync(0xffffffffu, s.raw_max, off);
  o.raw_sum = __shfl_xor_sync(0xffffffffu, s.raw_sum, off);
  o.p_max = __shfl_xor_sync(0xffffffffu, s.p_max, off);
  o.p_sum = __shfl_xor_sync(0xffffffffu, s.p_sum, off);
  o.best_key.base = __shfl_xor_sync(0xffffffffu, s.best_key.base, off);
  o.best_key.frac = __shfl_xor_sync(0xffffffffu, s.best_key.frac, off);
  o.best_idx = __shfl_xor_sync(0xffffffffu, s.best_idx, off);
  o.arg_val = __shfl_xor_sync(0xffffffffu, s.arg_val, off);
  o.arg_idx = __shfl_xor_sync(0xffffffffu, s.arg_idx, off);
  return o;
}

// Every lane ends with the warp's merged state.
__device__ __noinline__ RowState warp_reduce(RowState s, float scale2, float inv_tau) {
  for (int off = 16; off > 0; off >>= 1) merge_state(s, shfl_state(s, off), scale2, inv_tau);
  return s;
}

// Without log-probs a row needs only its winning key and index (the winning tile's, or for
// tau = 0 rows the argmax as a key of frac 0): the other fields stay empty. That warp merge
// shuffles three words a step, inline; warp_reduce shuffles eleven and merges two
// log-sum-exps a step. The indices (tiles; tokens for tau = 0) fit 32 bits, as in the
// partials. (H100, graph of 20, bf16 V = 128256: B = 64 9.3 -> 8.5 us, B = 8 5.8 -> 5.2,
// B = 1 5.9 -> 5.3.)
__device__ __forceinline__ void warp_reduce_key_by_shuffles(TileKey& key, int64_t& idx, float scale2) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const TileKey other{__shfl_xor_sync(0xffffffffu, key.base, off), __shfl_xor_sync(0xffffffffu, key.frac, off)};
    const int other_idx = __shfl_xor_sync(0xffffffffu, static_cast<int>(idx), off);
    best_merge(key, idx, other, other_idx, scale2);
  }
}

// The same, kByMaximum: usually in one step. The key rounded once, fma(base, scale2, frac),
// is a monotone function of the key, so the lane with the largest real key holds the largest
// rounded key. One integer maximum over the lanes (REDUX) finds it; only lanes tied on it
// (equal keys, or a tiny tau where the rounding swallows the noise) take the shuffle merge,
// among themselves. (best_merge rounds the keys' differences, so for keys within an ulp or
// so of each other the two merges may pick different tiles: there this one follows the real
// keys.)
// (H100, bf16 V = 128256, per decode-like step: B = 64 -0.3 us, B = 8 -0.4; a warp's merge is
// on the path of the row's last warp and of its finishing warp.) sample_kernel's
// instantiation for log-probs or thresholds keeps the shuffle merge (see finish_from_partials).
template <bool kByMaximum>
__device__ __forceinline__ void warp_reduce_key(TileKey& key, int64_t& idx, float scale2) {
  if constexpr (!kByMaximum) {
    warp_reduce_key_by_shuffles(key, idx, scale2);
    return;
  }
  const float rounded = idx < 0 ? -INFINITY : fmaf(key.base, scale2, key.frac);
  const int bits = __float_as_int(rounded);
  // Order-preserving integer image of the float (NaN, which the keys of valid rows never
  // are: the largest).
  const int order = rounded != rounded ? INT_MAX : bits >= 0 ? bits : bits ^ 0x7fffffff;
  const int top = __reduce_max_sync(0xffffffffu, order);
  const unsigned tied = __ballot_sync(0xffffffffu, order == top);
  if (__popc(tied) == 1) {
    const int src = __ffs(tied) - 1;
    key.base = __shfl_sync(0xffffffffu, key.base, src);
    key.frac = __shfl_sync(0xffffffffu, key.frac, src);
    idx = __shfl_sync(0xffffffffu, static_cast<int>(idx), src);
    return;
  }
  if (order != top) idx = -1;
  warp_reduce_key_by_shuffles(key, idx, scale2);
}

template <bool kByMaximum>
__device__ __forceinline__ RowState warp_merge(RowState s, bool key_only, float scale2, float inv_tau) {
  if (!key_only) return warp_reduce(s, scale2, inv_tau);
  warp_reduce_key<kByMaximum>(s.best_key, s.best_idx, scale2);
  return s;
}

// The CTA's merged state, in every lane of warp 0. Warp 0 merges the warps' states with
// shuffles, in parallel, rather than thread 0 one after another (7 dependent merges, each
// with exps, at the end of every CTA).
template <bool kByMaximum = false>
__device__ RowState block_reduce(RowState s, float scale2, float inv_tau, bool key_only = false) {
  __shared__ RowState warp_states[kClusterThreads / 32];  // (sample_kernel<T, true, ...> may have 16 warps)
  s = warp_merge<kByMaximum>(s, key_only, scale2, inv_tau);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_states[warp] = s;
  __syncthreads();
  if (warp == 0)
    s = warp_merge<kByMaximum>(lane < static_cast<int>(blockDim.x / 32) ? warp_states[lane] : RowState(), key_only,
                               scale2, inv_tau);
  return s;
}

// +inf logits count as FLT_MAX wherever sums are formed (finite_logit, row_values.h). The
// largest-entry tests (maxima, argmax, thresholds) still see +inf; tiles holding +inf take the
// out-of-line clamped path (tile_sums_rare), the others are unchanged.
using sampling::finite_logit;
using sampling::valid_temperature;

// Per-row values the host does not check for CUDA tensors (no sync): a row with an invalid
// temperature, top_k, top_p or min_p (row_values.h; NaN included) returns token 0 and NaN
// log-probs (the CPU op raises instead). For the truncation values the truncation kernel gives
// such a row a NaN threshold, which finish_row reads as invalid (a check of the values there
// made the main kernels spill: 5% at batch 64).
__device__ __forceinline__ bool valid_truncation(const SampleArgs& a, int64_t row) {
  // (A parameter not given holds a valid "off" value.)
  return sampling::valid_top_k(row_value(a.top_k, row)) && sampling::valid_top_p(row_value(a.top_p, row)) &&
         sampling::valid_min_p(row_value(a.min_p, row));
}

// Four consecutive logits of a row (entries past V read as -inf). kVec: one 16-byte (float)
// or 8-byte (16-bit) load, valid when the row start is aligned (checked on the host).
template <typename T, bool kVec>
__device__ __forceinline__ void load4(const T* l, int64_t grp, int64_t V, float (&x)[4]) {
  const int64_t v0 = grp * 4;
  if (kVec && v0 + 3 < V) {
    if constexpr (sizeof(T) == 4) {
      const float4 q = __ldg(reinterpret_cast<const float4*>(l + v0));
      x[0] = q.x; x[1] = q.y; x[2] = q.z; x[3] = q.w;
    } else {
      const uint2 q = __ldg(reinterpret_cast<const uint2*>(l + v0));
      const T* h = reinterpret_cast<const T*>(&q);
#pragma unroll
      for (int i = 0; i < 4; ++i) x[i] = load_logit(&h[i]);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) x[i] = v0 + i < V ? load_logit(l + v0 + i) : -INFINITY;
}

// Fold four values into an online log-sum-exp of x * inv_tau (one rescale per group).
__device__ __forceinline__ void lse_add4(float& m, float& s, const float (&x)[4], float inv_tau) {
  const float m4 = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
  if (m4 == -INFINITY) return;
  if (m4 > m) {
    s = m == -INFINITY ? 0.f : s * __expf((m - m4) * inv_tau);
    m = m4;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) s += __expf((x[i] - m) * inv_tau);  // exp(-inf) = 0
}

__device__ __forceinline__ float warp_max(float x) {
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

constexpr int kTile = 64;  // entries per sampling tile (== CPU kSampleTile)

struct RowCtx {
  int64_t V;
  float tau, inv_tau, threshold;  // inv_tau: see inverse_temperature
  float scale2;  // log2(e) * inv_tau: tile sums and keys are in base 2
  bool greedy, need_logprobs;
  uint32_t round = 0;  // Philox draw round (see pair_counter)
};

// Top-p by rejection (tokens-only calls with top-p alone; see top_p_rejection.h): sample()
// launches kRejectionDraw (the whole tempered distribution, round 0), top_p_check_kernel
// (marks the rows whose draw is not clearly inside the top-p set, and those not drawn), then
// truncation (which unmarks a draw inside its set) and kExactRows for the marked rows only
// (from the top-p set, with round 1 where rejected). SampleArgs::pass says which rows a
// launch draws.
enum SamplePass : int { kAllRows = 0, kRejectionDraw, kExactRows };
using sampling::top_p_by_rejection;
using sampling::top_p_threshold_at_once;

__device__ __forceinline__ float row_top_p(const SampleArgs& a, int64_t row) {
  return row_value(a.top_p, row);  // (1 when not given)
}
// The per-row words after the partials (kSampleRowFloats, see dispatch.h): the thresholds,
// then the marks of top_p_check_kernel, then the maximum and tempered normaliser it found for
// each row (truncation reuses them: no max pass).
static_assert(kSampleRowFloats == 4, "per row: threshold, mark, maximum and sum");
__host__ __device__ __forceinline__ float* row_thresholds(const SampleArgs& a) {
  return a.workspace + a.B * a.splits * kSampleSplitFloats;
}
__device__ __forceinline__ int* row_marks(const SampleArgs& a) {
  return reinterpret_cast<int*>(row_thresholds(a) + a.B);
}
__device__ __forceinline__ float2* row_max_and_sum(const SampleArgs& a) {
  return reinterpret_cast<float2*>(row_thresholds(a) + 2 * a.B);
}

// Whether this launch draws `row`; sets c.round. Called before the row's threshold or partials
// are read: a pass leaves them unwritten for the rows it skips.
__device__ __forceinline__ bool row_in_pass(const SampleArgs& a, int64_t row, RowCtx& c) {
  if (a.pass == kAllRows) return true;
  const float top_p = row_top_p(a, row);
  if (a.pass == kRejectionDraw) return !top_p_threshold_at_once(c.tau, top_p);
  if (row_marks(a)[row] == 0) return false;  // (kExactRows)
  c.round = top_p_by_rejection(c.tau, top_p) ? 1u : 0u;
  return true;
}

// 1 / tau (tau > 0), at most 2^126: below tau ~ 2.9e-39 the reciprocal overflows, and
// (x - max) * inf is NaN at x = max. In float32 both temperatures give the same distribution:
// a one-hot draw among the maxima unless logits differ by less than ~1e-37.
__device__ __forceinline__ float inverse_temperature(float tau) { return fminf(1.f / tau, 0x1p126f); }

// (threshold: -inf until row_in_pass has accepted the row)
__device__ __forceinline__ RowCtx row_ctx(const SampleArgs& a, float tau) {
  RowCtx c;
  c.V = a.V;
  c.tau = tau;
  c.inv_tau = tau > 0.f ? inverse_temperature(tau) : 1.f;
  c.scale2 = c.inv_tau * kLog2e;
  c.greedy = !(tau > 0.f);  // also NaN / negative: finish_row returns token 0 for them
  c.threshold = -INFINITY;
  c.need_logprobs = a.need_logprobs;
  return c;
}

__device__ __forceinline__ float row_threshold(const float* thresholds, int64_t row) {
  return thresholds != nullptr ? thresholds[row] : -INFINITY;
}

// The row's context for a drawing kernel (tau: the row's temperature, which the caller
// loaded), or false if this launch skips the row (row_in_pass).
__device__ __forceinline__ bool row_ctx_in_pass(const SampleArgs& a, const float* thresholds, int64_t row, float tau,
                                                RowCtx& c) {
  c = row_ctx(a, tau);
  if (!row_in_pass(a, row, c)) return false;
  c.threshold = row_threshold(thresholds, row);
  return true;
}

// Folds one finished tile into the row state. The tile's mass, the sum of exp(l / tau) over
// its kept entries, is exp(tile_max / tau) * 2^log2_sum, log2_sum in [0, 6] (its largest
// term is 1). Plus the tile's Gumbel noise (noise: its tile_noise_word, as on the CPU), its
// log-mass competes for the sampled tile, in base 2: key = log2(mass) - log2(E) with
// E = -log(u) standard exponential (= (log(mass) + Gumbel) * log2(e), the CPU's key up to
// rounding), kept as TileKey{tile_max, log2_sum - log2(E)}.
// With log-probs the mass also joins the processed log-sum-exp (relative to a logit, p_max).
// The log2 (callers) and log2(E) are one MUFU.LG2 each (absolute error ~2^-22; sums and E are normal floats):
// accurate logf costs ~25 instructions each, a tenth of a tile's work at 64 entries. The
// inner log of the exponential stays accurate: for u near 1 only its relative error is small.
__device__ __forceinline__ void add_tile(RowState& st, float tile_max, float log2_sum, const RowCtx& c,
                                         uint32_t noise, int64_t t) {
  if (c.need_logprobs) online_merge(st.p_max, st.p_sum, tile_max, fast_exp2(log2_sum), c.inv_tau);
  best_merge(st.best_key, st.best_idx, TileKey{tile_max, log2_sum - fast_log2(exponential_from_bits(noise))}, t,
             c.scale2);
}

// Folds entries v .. v+3 (x; -inf past V) into the row state: the raw log-sum-exp (for
// log-probs), the argmax (tau = 0) or the tile's online log-sum-exp of kept entries. NaN
// entries count as -inf everywhere (as on the CPU).
__device__ __forceinline__ void fold4(RowState& st, float& tile_max, float& tile_sum, float (&x)[4], int64_t v,
                                      const RowCtx& c) {
  if (c.need_logprobs) {
    float r[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) r[i] = x[i] == x[i] ? finite_logit(x[i]) : -INFINITY;
    lse_add4(st.raw_max, st.raw_sum, r, 1.f);
  }
  if (c.greedy) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (v + i < c.V && x[i] == x[i] && (st.arg_idx < 0 || x[i] > st.arg_val)) {
        st.arg_val = x[i];
        st.arg_idx = v + i;
      }
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) x[i] = x[i] >= c.threshold ? finite_logit(x[i]) : -INFINITY;  // (truncated or NaN)
  lse_add4(tile_max, tile_sum, x, c.inv_tau);
}

// Programmatic dependent launch (sm_90; see launch): every sampling kernel is launched
// while the kernel before it still runs, and waits here for its results before touching
// global memory; both are no-ops without the launch attribute.
__device__ __forceinline__ void griddep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void griddep_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Split cluster barrier (sm_90): every thread arrives early and waits later, before its first
// access to another CTA's shared memory (that CTA must have started).
__device__ __forceinline__ void cluster_arrive_relaxed() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
#endif
}
// The same with release semantics: this thread's writes before it are visible to every thread
// of the cluster after its cluster_wait (acquire).
__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
#endif
}

// Barrier over the CTAs that share a row (a cluster of `ctas`; one CTA: __syncthreads).
// Release / acquire: each CTA's shared-memory writes are visible to the others after it.
__device__ __forceinline__ void row_barrier(int ctas) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (ctas > 1) {
    cluster_arrive();
    cluster_wait();
    return;
  }
#endif
  __syncthreads();
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// The shared::cluster address of `p`'s shared-memory offset in CTA `rank` of this CTA's cluster.
__device__ __forceinline__ uint32_t cluster_shared_address(const void* p, int rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n"
               : "=r"(remote) : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(p))), "r"(rank));
  return remote;
}
#endif

// Stores v at `p`'s shared-memory offset in CTA `rank` of this CTA's cluster (sm_90).
__device__ __forceinline__ void store_cluster_shared(float4* p, int rank, float4 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint32_t remote = cluster_shared_address(p, rank);
  asm volatile("st.shared::cluster.v4.f32 [%0], {%1, %2, %3, %4};\n"
               :: "r"(remote), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w) : "memory");
#else
  (void)rank;
  *p = v;  // (never reached: clusters are launched on sm_90 only)
#endif
}

// The end of a tokens-only cluster kernel (sm_90; see finish_or_write_partial): each warp's
// partial goes to the row's first CTA, whose mbarrier counts them in; no cluster barrier.
__device__ __forceinline__ void push_mbar_init(uint64_t* bar, uint32_t arrivals, uint32_t remote_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(addr), "r"(arrivals + 1));
  // (the init is visible to the cluster after the relaxed cluster arrive that follows)
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(addr), "r"(remote_bytes) : "memory");
#endif
}

__device__ __forceinline__ uint4 as_uint4(float4 v) {
  return make_uint4(__float_as_uint(v.x), __float_as_uint(v.y), __float_as_uint(v.z), __float_as_uint(v.w));
}

// Stores v at `p`'s offset in the cluster's CTA 0: from CTA 0 itself a plain store (its warps
// then arrive on `bar`, see push_arrive), from the others an asynchronous store that completes
// its bytes on CTA 0's mbarrier `bar` (no fence, no barrier).
__device__ __forceinline__ void push_to_first_cta(uint4* p, uint4 v, uint64_t* bar, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (rank == 0) {
    *p = v;
    return;
  }
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];\n" ::"r"(
                   cluster_shared_address(p, 0)),
               "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(cluster_shared_address(bar, 0))
               : "memory");
#else
  (void)p; (void)v; (void)bar; (void)rank;
#endif
}

// One arrival per warp of CTA 0 once its pushes are stored (release). Its callers push from
// lane 0 only, which also arrives; the __syncwarp would order other lanes' pushes too.
__device__ __forceinline__ void push_arrive(uint64_t* bar, int rank, int lane) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (rank != 0) return;
  __syncwarp();
  if (lane == 0)
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar)))
                 : "memory");
#else
  (void)bar; (void)rank; (void)lane;
#endif
}

// (Default .acquire.cta, as for multicast TMA loads that other CTAs issue: the partials and
// the mbarrier are in this CTA's shared memory. The PTX memory model states the remote
// stores' release at .cluster scope; .acquire.cluster would add an L1 invalidation, not
// measured.)
__device__ __forceinline__ void push_mbar_wait(uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  uint32_t done = 0;
  while (!done) {
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0;\nselp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done)
                 : "r"(addr)
                 : "memory");
  }
#else
  (void)bar;
#endif
}

// The winning tile's entries as finish_row reads them (lane j < 16: entries 4j .. 4j + 3, -inf
// past the row) and its uniform word, when the caller already has them (see
// finish_from_partials); otherwise finish_row loads and draws them itself.
struct WinnerTile {
  float x[4];
  uint32_t uniform;
  float max;  // the tile's largest kept entry (its key's base): finish_row's stabiliser
};

// One warp, with the row's merged state in every lane: the token (inside the winning tile,
// by inverse CDF with the tile's uniform; tau = 0: the argmax) and the log-probs. The row's
// inputs (c, seed, offset) come from the caller, which loaded them early. write = false: a
// rehearsal, which stores nothing (see finish_or_write_partial).
template <typename T, bool kVec>
__device__ void finish_row(const SampleArgs& a, int64_t row, int lane, const RowState& st, const RowCtx& c,
                           uint64_t seed, uint64_t offset, const WinnerTile* given = nullptr, bool write = true) {
  const bool greedy = c.greedy;
  // (tau = 0: the argmax value is -inf only when every entry is -inf or NaN; its index, the
  // first non-NaN entry, is then not the documented token 0)
  const bool masked_row = greedy ? st.best_key.base == -INFINITY : st.best_idx < 0;
  if (!valid_temperature(c.tau) || c.threshold != c.threshold || st.best_idx < 0 || masked_row) {
    // invalid row values (see valid_truncation) or a fully masked row: documented fallback
    if (lane == 0 && write) {
      a.tokens[row] = 0;
      if (a.need_logprobs) {
        a.logprob[row] = NAN;
        a.raw_logprob[row] = NAN;
      }
    }
    return;
  }
  const T* l = static_cast<const T*>(a.logits) + row * a.ld;
  int64_t token = st.best_idx;     // greedy: the argmax index
  float token_logit = finite_logit(st.best_key.base);  // greedy: its logit (see finish_or_write_partial)
  if (!greedy) {
    const int64_t t = st.best_idx;
    const float threshold = c.threshold;
    float x[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    if (given != nullptr) {
#pragma unroll
      for (int q = 0; q < 4; ++q) x[q] = given->x[q];
    } else if (lane < kTile / 4) {
      load4<T, kVec>(l, t * (kTile / 4) + lane, a.V, x);
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) x[q] = x[q] >= threshold ? finite_logit(x[q]) : -INFINITY;
    // (given: the winning key's base is the same maximum, bit for bit; no warp maximum)
    const float m = given != nullptr ? given->max : warp_max(fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3])));
    float cum[4], run = 0.f;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      run += __expf((x[q] - m) * c.inv_tau);
      cum[q] = run;  // cumulative within the lane, in index order
    }
    float base = run;  // inclusive scan over lanes, then exclusive
    for (int off = 1; off < 32; off <<= 1) {
      const float up = __shfl_up_sync(0xffffffffu, base, off);
      if (lane >= off) base += up;
    }
    const float total = __shfl_sync(0xffffffffu, base, 31);
    base -= run;
    const uint32_t uniform = given != nullptr ? given->uniform : tile_uniform_word(tile_pair_block(seed, offset, t, c.round), t);
    const float target = bits_to_open_unit(uniform) * total;
    // Only entries that raise the lane's sum are candidates: a lane's base (rounded apart from
    // the previous lane's last sum) may leave a target in a one-ulp gap before an entry whose
    // exp underflowed to 0 (-inf entries weigh 0 too).
    int first = 4, last_kept = -1;
#pragma unroll
    for (int q = 3; q >= 0; --q) {
      if (!(cum[q] > (q > 0 ? cum[q - 1] : 0.f))) continue;
      if (last_kept < 0) last_kept = q;
      if (base + cum[q] > target) first = q;
    }
    const unsigned found = __ballot_sync(0xffffffffu, first < 4);
    // Not found: rounding left the target unreached; the last entry of positive weight.
    const unsigned any = found != 0u ? found : __ballot_sync(0xffffffffu, last_kept >= 0);
    const int src = found != 0u ? __ffs(found) - 1 : 31 - __clz(any);
    const int q = __shfl_sync(0xffffffffu, found != 0u ? first : last_kept, src);
    token = t * kTile + src * 4 + q;
    token_logit = __shfl_sync(0xffffffffu, q == 0 ? x[0] : q == 1 ? x[1] : q == 2 ? x[2] : x[3], src);
  }
  if (lane != 0 || !write) return;
  a.tokens[row] = token;
  if (!a.need_logprobs) return;
  const float lt = token_logit;  // kept, so never replaced by -inf above
  a.raw_logprob[row] = lt - st.raw_max - logf(st.raw_sum);
  // Relative to the row's largest kept logit: no term of size max / tau (whose float32
  // rounding swamped the result at small tau).
  a.logprob[row] = greedy ? 0.f : (lt - st.p_max) * c.inv_tau - logf(st.p_sum);
}

// The row's merged state, in every lane of one warp, from its n partials (one per warp of
// each split; float4 pairs, in global or shared memory): lanes merge strided partials in
// parallel, then across the warp. lo / hi: partial `lane`, which the caller loaded early.
// The warp merge is inline, without the argmax fields: warp_reduce (an out-of-line call)
// measured up to 1 us slower in the finish kernel (H100, B = 64 with log-probs).
// key_only: no log-probs (see warp_reduce_key).
template <bool kByMaximum>
__device__ __forceinline__ RowState merge_partials(const float4* partials, int n, int lane, float4 lo, float4 hi,
                                                   bool key_only, float scale2, float inv_tau) {
  RowState st;
  for (int s = lane; s < n; s += 32) {
    if (s != lane) {  // more than 32 partials per row (few rows)
      lo = partials[2 * s];
      hi = partials[2 * s + 1];
    }
    if (!key_only) {
      online_merge(st.raw_max, st.raw_sum, lo.x, lo.y, 1.f);
      online_merge(st.p_max, st.p_sum, lo.z, lo.w, inv_tau);
    }
    best_merge(st.best_key, st.best_idx, TileKey{hi.x, hi.z}, __float_as_int(hi.y), scale2);
  }
  if (key_only) {
    warp_reduce_key<kByMaximum>(st.best_key, st.best_idx, scale2);
    return st;
  }
  for (int off = 16; off > 0; off >>= 1) {
    const RowState other = shfl_state(st, off);
    online_merge(st.raw_max, st.raw_sum, other.raw_max, other.raw_sum, 1.f);
    online_merge(st.p_max, st.p_sum, other.p_max, other.p_sum, inv_tau);
    best_merge(st.best_key, st.best_idx, other.best_key, other.best_idx, scale2);
  }
  return st;
}

template <typename T>
__device__ __forceinline__ uint4 ldg_vec(const T* p);
template <typename T>
__device__ __forceinline__ uint4 ldg_vec_tail(const T* l, int64_t e, int64_t end);

// finish_row from the row's n partials (lo / hi: partial `lane`, loaded by the caller). For a
// 16-byte aligned row with tau > 0 and at most 32 partials, each lane first requests the tile
// its partial names and draws that tile's uniform, and only then do the lanes merge (by
// maximum, warp_reduce_key): the winner's tile reaches the warp through tile_shared (kTile
// entries) instead of a load after the merge, so the row's last round trip and its Philox
// overlap the merge. (H100, bf16 V = 128256, per decode-like step: B = 64 -0.4 us, B = 8 -0.3,
// B = 1 -0.3.) Used by sample_finish_kernel (every draw) and by sample_kernel's tokens-only
// instantiation; its instantiation for log-probs or thresholds keeps the merge by shuffles and
// the load after it: a build with both there measured its log-prob draws up to 25% slower
// (H100, one run; the merge by maximum alone spilled 8 bytes in its bf16 cluster kernel).
template <typename T, bool kVec>
__device__ void finish_from_partials(const SampleArgs& a, int64_t row, int lane, const float4* partials, int n,
                                     float4 lo, float4 hi, const RowCtx& c, uint64_t seed, uint64_t offset,
                                     uint4* tile_shared, bool write = true) {
  const bool key_only = !a.need_logprobs;
  const T* l = static_cast<const T*>(a.logits) + row * a.ld;
  if (c.greedy || n > 32 || reinterpret_cast<uintptr_t>(l) % 16 != 0) {
    finish_row<T, kVec>(a, row, lane, merge_partials<true>(partials, n, lane, lo, hi, key_only, c.scale2, c.inv_tau),
                        c, seed, offset, nullptr, write);
    return;
  }
  constexpr int kPer = 16 / static_cast<int>(sizeof(T)), kVecs = kTile / kPer;
  const int candidate = lane < n ? __float_as_int(hi.y) : -1;  // (the partial's tile; -1: none)
  uint4 tile[kVecs];
  uint32_t uniform = 0;
  if (candidate >= 0) {
    const int64_t e0 = static_cast<int64_t>(candidate) * kTile;
    if (e0 + kTile <= a.V) {
#pragma unroll
      for (int k = 0; k < kVecs; ++k) tile[k] = ldg_vec(l + e0 + k * kPer);
    } else {
#pragma unroll
      for (int k = 0; k < kVecs; ++k) tile[k] = ldg_vec_tail(l, e0 + k * kPer, a.V);
    }
    uniform = tile_uniform_word(tile_pair_block(seed, offset, candidate, c.round), candidate);
  }
  const RowState st = merge_partials<true>(partials, n, lane, lo, hi, key_only, c.scale2, c.inv_tau);
  const unsigned holders = __ballot_sync(0xffffffffu, candidate >= 0 && candidate == st.best_idx);
  if (holders == 0u) {  // no winner (a fully masked or invalid row): finish_row's fallback
    finish_row<T, kVec>(a, row, lane, st, c, seed, offset, nullptr, write);
    return;
  }
  const int src = __ffs(holders) - 1;
  if (lane == src) {
#pragma unroll
    for (int k = 0; k < kVecs; ++k) tile_shared[k] = tile[k];
  }
  __syncwarp();
  WinnerTile w{{-INFINITY, -INFINITY, -INFINITY, -INFINITY}, __shfl_sync(0xffffffffu, uniform, src), st.best_key.base};
  if (lane < kTile / 4) {
    const T* h = reinterpret_cast<const T*>(tile_shared) + 4 * lane;
#pragma unroll
    for (int q = 0; q < 4; ++q) w.x[q] = to_float(h[q]);
  }
  finish_row<T, kVec>(a, row, lane, st, c, seed, offset, &w, write);
}

constexpr int kMaxClusterSplits = 8;  // portable cluster size

// Whether the splits of each row merge in a thread-block cluster (sm_90) rather than in the
// finish kernel: up to 8 splits, and a grid of at most one CTA per SM (one wave) that covers
// at least a quarter of the SMs. (H100, graph of 20 calls, B = 8: V = 128256 bf16 6.5 -> 6.0
// us, fp32 6.8 -> 6.4; V = 256000 8.7 -> 7.2 and 9.6 -> 8.4; B = 16, V = 128256: 8.0 -> 7.3.
// Outside these limits it lost: B = 64's 256 CTAs in clusters of 4 took 9.9 -> 13.3 us,
// B = 1's 8 CTAs of 8 warps left the other SMs idle, V = 256000 6.3 -> 7.1 us.)
__host__ __device__ constexpr bool use_cluster_merge(int64_t B, int64_t splits, int num_sms) {
  return splits > 1 && splits <= kMaxClusterSplits && B * splits <= num_sms && 4 * B * splits >= num_sms;
}

// With one split the CTA holds the whole row: warp 0 merges the warps' states and draws the
// token itself (no finish kernel is launched). Otherwise each warp writes its (row, split,
// warp) partial to the workspace for the finish kernel: no barrier or CTA-wide merge at the
// end of the main kernel, whose slowest CTA the finish kernel waits for. kCluster (the row's
// splits form one thread-block cluster, sm_90): the partials go to cluster_partials in the
// shared memory of the row's first CTA instead, whose warp 0 merges them after a cluster
// barrier (kTokensOnly: its last warp, once CTA 0's mbarrier cluster_bar has counted them in)
// and draws the token (no finish kernel, no global round trip). kTokensOnly: see
// sample_kernel; tile_shared: kTile entries of shared memory for finish_from_partials.
template <typename T, bool kVec, bool kCluster = false, bool kTokensOnly = false>
__device__ void finish_or_write_partial(const SampleArgs& a, int64_t row, int split, RowState st, const RowCtx& c,
                                        uint64_t seed, uint64_t offset, float4* cluster_partials = nullptr,
                                        uint4* tile_shared = nullptr, uint64_t* cluster_bar = nullptr) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (c.greedy) {  // the winner slot holds the argmax for tau = 0 rows (a key of frac 0)
    st.best_key = TileKey{st.arg_val, 0.f};
    st.best_idx = st.arg_idx;
  }
  const bool key_only = !a.need_logprobs;
  st = a.splits == 1 ? block_reduce<kTokensOnly>(st, c.scale2, c.inv_tau, key_only)
                      : warp_merge<kTokensOnly>(st, key_only, c.scale2, c.inv_tau);
  if (a.splits == 1) {
    if (warp == 0) finish_row<T, kVec>(a, row, lane, st, c, seed, offset);
    return;
  }
  const int slot = split * warps + warp;
  const float4 lo = make_float4(st.raw_max, st.raw_sum, st.p_max, st.p_sum);
  const float4 hi = make_float4(st.best_key.base, __int_as_float(static_cast<int>(st.best_idx)), st.best_key.frac, 0.f);
  if constexpr (!kCluster) {
    if (lane == 0) {
      float4* out = reinterpret_cast<float4*>(a.workspace + row * a.splits * warps * kPartial);
      out[2 * slot] = lo;
      out[2 * slot + 1] = hi;
    }
  } else if constexpr (kTokensOnly) {
    // The partials go to CTA 0 as asynchronous stores counted on its mbarrier (cluster_bar, set
    // up by sample_kernel), which only its finishing warp waits for: no cluster barrier, whose
    // release made every warp wait for its remote stores. (H100, per decode-like step, with
    // finish_row's stabiliser taken from the winning key: bf16 B = 64, V = 128256 9.8 -> 9.3 us,
    // B = 8 5.3 -> 4.9, fp32 B = 64 11.0 -> 10.8.)
    cluster_wait();  // every CTA of the cluster has started, CTA 0's mbarrier is initialised
    if (lane == 0) {
      push_to_first_cta(reinterpret_cast<uint4*>(&cluster_partials[2 * slot]), as_uint4(lo), cluster_bar, split);
      push_to_first_cta(reinterpret_cast<uint4*>(&cluster_partials[2 * slot + 1]), as_uint4(hi), cluster_bar, split);
    }
    push_arrive(cluster_bar, split, lane);
    if (split != 0 || warp != warps - 1) return;  // (the finishing warp: see sample_kernel)
  } else {
    cluster_wait();  // every CTA of the cluster has started (see sample_kernel)
    if (lane == 0) {
      store_cluster_shared(&cluster_partials[2 * slot], 0, lo);
      store_cluster_shared(&cluster_partials[2 * slot + 1], 0, hi);
    }
    row_barrier(a.splits);  // release / acquire: the row's partials are in CTA 0
    if (split != 0 || warp != 0) return;
  }
  if constexpr (kCluster) {
    const int n = a.splits * warps;
    float4 plo = {}, phi = {};
    if constexpr (kTokensOnly) {
      // The finishing warp's code runs once per row, so it would run cold (instruction cache
      // misses at each branch, while the logits' stream keeps L2 busy). So first a rehearsal
      // on made-up partials (distinct keys; the winner tile 0), which stores nothing, while the
      // other warps still fold, then the real finish on the same code, warm. (H100, per
      // decode-like step, with the ranges of sample_kernel: bf16 B = 8 5.0 -> 4.9 us, B = 64 at
      // tau = 0 9.65 -> 9.5; B = 1 (no cluster), B = 16, B = 64 at random tau: unchanged.)
#pragma unroll 1
      for (int pass = n <= 32 ? 0 : 1; pass < 2; ++pass) {
        const bool rehearsal = pass == 0;
        if (rehearsal) {
          plo = float4{};
          phi = lane < n ? make_float4(0.f, __int_as_float(lane), -static_cast<float>(lane), 0.f) : float4{};
        } else {
          __syncwarp();  // (the rehearsal's reads of tile_shared are done)
          push_mbar_wait(cluster_bar);
          if (lane < n) {
            plo = cluster_partials[2 * lane];
            phi = cluster_partials[2 * lane + 1];
          }
        }
        finish_from_partials<T, kVec>(a, row, lane, cluster_partials, n, plo, phi, c, seed, offset, tile_shared,
                                      !rehearsal);
      }
    } else {
      if (lane < n) {
        plo = cluster_partials[2 * lane];
        phi = cluster_partials[2 * lane + 1];
      }
      finish_row<T, kVec>(a, row, lane,
                          merge_partials<false>(cluster_partials, n, lane, plo, phi, key_only, c.scale2, c.inv_tau), c,
                          seed, offset);
    }
  }
}

// One warp per row: merge the row's partials (one per warp of each split), then draw the
// token inside the winning tile.
template <typename T, bool kVec>
__global__ void sample_finish_kernel(SampleArgs a, const float* thresholds, int partials_per_row) {
  griddep_wait();  // the partials of the main kernel
  griddep_launch_dependents();  // (tiny kernel: the next one may get resident)
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x;
  RowCtx c = row_ctx(a, row_value(a.temperature, row));
  if (!row_in_pass(a, row, c)) return;  // (a pass that skips the row wrote no partials for it)
  // Every load of the row is issued before any is used (one memory round trip): with the
  // merge's branches between them, the partial's fields and the row's inputs were loaded one
  // dependent round trip after another. (row_in_pass loads nothing for plain calls.)
  const float4* partials = reinterpret_cast<const float4*>(a.workspace + row * partials_per_row * kPartial);
  float4 lo = {}, hi = {};
  if (lane < partials_per_row) {
    lo = partials[2 * lane];
    hi = partials[2 * lane + 1];
  }
  c.threshold = row_threshold(thresholds, row);
  const uint64_t seed = row_seed(a, row);
  const uint64_t offset = row_offset(a, row);
  __shared__ uint4 tile_shared[kTile * sizeof(T) / 16];
  finish_from_partials<T, kVec>(a, row, lane, partials, partials_per_row, lo, hi, c, seed, offset, tile_shared);
}

// Unaligned fallback (rows not 16-byte aligned): same tile keys as sample_kernel, but each
// lane loads its own tile 4 entries at a time (kVec: 8- or 16-byte loads where aligned).
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    sample_unaligned_kernel(SampleArgs a, const float* thresholds, int64_t tiles_per_split) {
  griddep_wait();  // launched early (PDL): the previous kernel's results
  griddep_launch_dependents();
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* l = static_cast<const T*>(a.logits) + row * a.ld;
  RowCtx c;
  if (!row_ctx_in_pass(a, thresholds, row, row_value(a.temperature, row), c)) return;
  const uint64_t seed = row_seed(a, row);
  const uint64_t offset = row_offset(a, row);
  const int64_t total_tiles = (a.V + kTile - 1) / kTile;
  const int64_t t_begin = split * tiles_per_split;
  const int64_t t_end = min(t_begin + tiles_per_split, total_tiles);
  RowState st;  // p_max / p_sum: log-sum-exp of tile log-masses; best_*: winning tile
  // Lane j of a warp owns a whole tile (t0 + j) and streams its 32 groups of 4 entries with an
  // online max / sum-exp in registers: no cross-lane reductions, one Philox draw per tile.
  constexpr int kWarps = kThreads / 32, kGroups = kTile / 4;
  for (int64_t t0 = t_begin + warp * 32; t0 < t_end; t0 += kWarps * 32) {
    const int64_t t = t0 + lane;
    if (t >= t_end) continue;
    float tile_max = -INFINITY, tile_sum = 0.f;
#pragma unroll 4
    for (int k = 0; k < kGroups; ++k) {
      float x[4];
      load4<T, kVec>(l, t * kGroups + k, a.V, x);
      fold4(st, tile_max, tile_sum, x, t * kTile + k * 4, c);
    }
    if (c.greedy || tile_max == -INFINITY) continue;  // -inf: nothing kept in the tile
    add_tile(st, tile_max, fast_log2(tile_sum), c, tile_noise_word(tile_pair_block(seed, offset, t, c.round), t), t);
  }
  finish_or_write_partial<T, kVec>(a, row, split, st, c, seed, offset);
}

// ---- sample_kernel: a warp loads a batch of 32 tiles with every load issued up front ----
// Loading and folding one vector at a time keeps only ~16 B in flight per lane, far below what
// an SM needs to reach DRAM bandwidth. Here each lane first issues all 16 (fp32) or 8 (16-bit)
// 16-byte loads of a batch (8 KB or 4 KB per warp), coalesced (each instruction reads 512
// contiguous bytes); the batch is then regrouped through shared memory so lane j holds tile
// b0 + j and folds it in the unaligned kernel's order (bit-identical tile keys and tokens).
constexpr int kBatchTiles = 32;  // tiles per warp batch: one per lane

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T> __device__ __forceinline__ T neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return -INFINITY; }
template <> __device__ __forceinline__ __nv_bfloat16 neg_inf<__nv_bfloat16>() { return __ushort_as_bfloat16(0xff80u); }
template <> __device__ __forceinline__ __half neg_inf<__half>() { return __ushort_as_half(0xfc00u); }

template <typename T>
__device__ __forceinline__ uint4 ldg_vec(const T* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// 16 bytes of entries [e, ...) of a row; entries at or past `end` read as -inf.
template <typename T>
__device__ __forceinline__ uint4 ldg_vec_tail(const T* l, int64_t e, int64_t end) {
  constexpr int kPer = 16 / sizeof(T);
  if (e + kPer <= end) return ldg_vec(l + e);
  uint4 q;
  T* h = reinterpret_cast<T*>(&q);
#pragma unroll
  for (int i = 0; i < kPer; ++i) h[i] = e + i < end ? l[e + i] : neg_inf<T>();
  return q;
}

// Fold one 16-byte vector (entries v, v+1, ...) in groups of 4, as sample_unaligned_kernel does.
template <typename T>
__device__ __forceinline__ void fold_vec(RowState& st, float& tile_max, float& tile_sum,
                                         const uint4& q, int64_t v, const RowCtx& c) {
  const T* h = reinterpret_cast<const T*>(&q);
#pragma unroll
  for (int g = 0; g < static_cast<int>(16 / sizeof(T)) / 4; ++g) {
    float x[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) x[i] = to_float(h[g * 4 + i]);
    fold4(st, tile_max, tile_sum, x, v + g * 4, c);
  }
}

// Entry `high` (0: the lower address) of a 32-bit word holding two 16-bit entries, as a
// float: one instruction (bf16: a shift or a mask).
template <typename T>
__device__ __forceinline__ float pair_half_to_float(uint32_t w, int high) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __uint_as_float(high ? (w & 0xffff0000u) : (w << 16));
  } else {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(high ? w >> 16 : w & 0xffffu)));
  }
}

// The largest of a tile's 16-bit entries, compared in pairs (one instruction for two
// entries, no conversions; exact), or NaN if an entry is NaN.
template <typename T>
__device__ __forceinline__ float tile_max_pairs(const uint4 (&q)[kTile * 2 / 16]) {
  using Pair = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
  const T ninf = neg_inf<T>();
  Pair m[4] = {{ninf, ninf}, {ninf, ninf}, {ninf, ninf}, {ninf, ninf}};
#pragma unroll
  for (int i = 0; i < kTile * 2 / 16; ++i) {
    const Pair* pairs = reinterpret_cast<const Pair*>(&q[i]);
#pragma unroll
    for (int w = 0; w < 4; ++w) m[w] = __hmax2_nan(m[w], pairs[w]);
  }
  const Pair r = __hmax2_nan(__hmax2_nan(m[0], m[1]), __hmax2_nan(m[2], m[3]));
  return fmax_nan(to_float(r.x), to_float(r.y));
}

// ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
__device__ __forceinline__ float tree_sum8(const float (&x)[8]) {
  return ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
}

// The sum of n = 4 or 8 floats as a tree (tree_sum8's order).
template <int n>
__device__ __forceinline__ float tree_sum(const float (&x)[n]) {
  static_assert(n == 4 || n == 8, "a 16-byte vector's entries");
  if constexpr (n == 8) return tree_sum8(x);
  else return (x[0] + x[1]) + (x[2] + x[3]);
}

// Entry j of a tile held as 16-byte vectors, as a float (kThreshold: -inf below the threshold,
// and for NaN).
template <typename T, bool kThreshold>
__device__ __forceinline__ float tile_entry(const uint4 (&q)[kTile * sizeof(T) / 16], int j, float threshold) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));
  float x;
  if constexpr (sizeof(T) == 2) {  // converted straight from the 32-bit word of a pair
    x = pair_half_to_float<T>(reinterpret_cast<const uint32_t*>(&q[j / kPer])[j % kPer / 2], j % 2);
  } else {
    x = reinterpret_cast<const float*>(&q[j / kPer])[j % kPer];
  }
  return kThreshold && !(x >= threshold) ? -INFINITY : x;
}

struct TileSums {
  float max;    // the largest kept entry (-inf: none kept)
  float shift;  // sum = 2^shift * (the sum of 2^((x - max) * scale2) over the kept entries)
  float sum, raw_sum;  // raw_sum: of exp(x - max) over all entries (tau = 1)
};

// The sum of 2^z(i) over the 8 entries i of a 16-byte vector of 16-bit entries, as a tree: the
// order of tile_exp2_sum and race_batch_bounded's vector_exp2_sum, which must agree bit for bit.
template <typename Exponent>
__device__ __forceinline__ float vector_tree_exp2_sum(Exponent z) {
  float e[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) e[i] = fast_exp2(z(i));
  return tree_sum8(e);
}

// The sum of 2^term(x) over a tile's entries x. clamp: NaN terms count 0. 16-bit tiles: each
// 16-byte vector's 8 terms as a tree, then the 8 vector sums as a tree; race_batch_bounded
// sums a tile in this order across 4 lanes, bit for bit. float32 tiles: four accumulators.
template <typename T, bool kThreshold, typename Term>
__device__ __forceinline__ float tile_exp2_sum(const uint4 (&q)[kTile * sizeof(T) / 16], float threshold, bool clamp,
                                               Term term) {
  auto exponent = [&](int j) {
    const float x = tile_entry<T, kThreshold>(q, j, threshold);
    const float z = term(clamp ? finite_logit(x) : x);
    return clamp ? fmaxf(z, -INFINITY) : z;
  };
  if constexpr (sizeof(T) == 2) {
    float v[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = vector_tree_exp2_sum([&](int i) { return exponent(8 * k + i); });
    return tree_sum8(v);
  } else {
    float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int j = 0; j < kTile; ++j) s[j % 4] += fast_exp2(exponent(j));
    return (s[0] + s[1]) + (s[2] + s[3]);
  }
}

// Whether max * scale2 (already formed: base) is small enough for tile_sums' FFMA terms
// (false for NaN and infinite maxima).
__device__ __forceinline__ bool scale_is_flat(float base) { return fabsf(base) < 0x1p30f; }

// Whether tile_sums' FFMA terms fit a tile of maximum max: the tempered ones and, kRaw, the raw
// ones (max * log2(e)), which differ where tau > 1 and |max| >= 2^30 / log2(e) (~7.4e8).
template <bool kRaw>
__device__ __forceinline__ bool sums_are_flat(float max, float scale2) {
  return scale_is_flat(max * scale2) && (!kRaw || scale_is_flat(max * kLog2e));
}

// A tile's sums given its maximum (> -inf), in base 2 with four accumulators. Tempered terms
// are 2^(x * scale2 - base) with base = max * scale2 rounded: one FFMA per entry, exact but
// for the final rounding ((x - max) * scale2 costs an FADD per entry more); the sum is then
// 2^shift times the sum relative to max, shift = max * scale2 - base (exact, by FFMA). That
// needs |shift| small (<= 64), i.e. scale_is_flat(base); other tiles (tiny tau) take
// tile_sums_far, whose kRelative terms are 2^((x - max) * scale2) (shift 0). kClamp: NaN terms
// (from NaN entries, or x = max = +inf) count 0; without it a NaN entry poisons the sum.
// kRaw: also the raw sum (tau = 1, untruncated, relative to max itself). Unless kRawRelative
// (by default kRelative), its terms are FFMAs too, 2^(x * log2(e) - raw_base) with raw_base =
// max * log2(e) rounded, the sum scaled back by 2^-raw_shift once (callers keep such sums only
// where sums_are_flat; clamped tiles alike, so that a tile whose NaN entries are replaced by
// -inf gives the same sums bit for bit); kRawIsSum (the caller's tau = 1 rows, nothing
// truncated): those terms are the tempered ones bit for bit (scale2 = log2(e)), so the tempered
// sum is reused. (H200, per decode-like step with log-probs, V = 128256, the same tokens: at tau = 1 on every row bf16
// B = 1024 107.6 -> 88.0 us, B = 64 13.0 -> 11.1, float32 B = 1024 144.3 -> 139.1; random tau
// bf16 B = 1024 107.7 -> 106.6, B = 64 13.1 -> 13.2, V = 256000 194.7 -> 188.6; B = 8 and
// truncated calls level. Raw terms by a polynomial on the FMA pipe instead, to offload MUFU:
// slower, 107.6 -> 111.7-146 us at B = 1024.)
template <typename T, bool kThreshold, bool kRaw, bool kClamp, bool kRelative = false, bool kRawIsSum = false,
          bool kRawRelative = kRelative>
__device__ __forceinline__ TileSums tile_sums(const uint4 (&q)[kTile * sizeof(T) / 16], float max, float threshold,
                                              float scale2) {
  static_assert(!kRawIsSum || (kRaw && !kThreshold && !kClamp && !kRelative), "the same terms: untruncated, flat");
  static_assert(kRelative <= kRawRelative, "tempered terms relative to max only if the raw ones are");
  const float base = max * scale2;
  TileSums r{max, kRelative || (kClamp && max == INFINITY) ? 0.f : fmaf(max, scale2, -base), 0.f, 0.f};  // (+inf: sum 0)
  if constexpr (kRelative)
    r.sum = tile_exp2_sum<T, kThreshold>(q, threshold, kClamp, [&](float x) { return (x - max) * scale2; });
  else
    r.sum = tile_exp2_sum<T, kThreshold>(q, threshold, kClamp, [&](float x) { return fmaf(x, scale2, -base); });
  if constexpr (kRaw && kRawRelative) {
    r.raw_sum = tile_exp2_sum<T, false>(q, threshold, kClamp, [&](float x) { return (x - max) * kLog2e; });
  } else if constexpr (kRaw) {
    const float raw_base = max * kLog2e;
    if constexpr (kRawIsSum)
      r.raw_sum = r.sum;
    else
      r.raw_sum = tile_exp2_sum<T, false>(q, threshold, kClamp, [&](float x) { return fmaf(x, kLog2e, -raw_base); });
    r.raw_sum *= fast_exp2(-fmaf(max, kLog2e, -raw_base));
  }
  return r;
}

// A tile's vectors back into registers from its copy in shared memory (the rare paths).
template <typename T>
__device__ __forceinline__ void load_tile_shared(uint4 (&q)[kTile * sizeof(T) / 16], const uint4* tile_shared) {
#pragma unroll
  for (int k = 0; k < kTile * static_cast<int>(sizeof(T)) / 16; ++k) q[k] = tile_shared[k];
}

// Tiles holding a NaN or +inf entry (rare): the maximum over non-NaN entries (the kept ones,
// but with kThreshold && kRaw all: see tile_sums_kept_and_raw) and clamped sums. Out of line,
// from the tile's copy in shared memory, so that the hot loop stays compact.
template <typename T, bool kThreshold, bool kRaw>
__device__ __noinline__ TileSums tile_sums_rare(const uint4* tile_shared, float threshold, float scale2) {
  uint4 q[kTile * sizeof(T) / 16];
  load_tile_shared<T>(q, tile_shared);
  float m = -INFINITY;
#pragma unroll
  for (int j = 0; j < kTile; ++j) m = fmaxf(m, tile_entry<T, kThreshold && !kRaw>(q, j, threshold));
  if (m == -INFINITY) return {m, 0.f, 0.f, 0.f};
  return tile_sums<T, kThreshold, kRaw, true>(q, finite_logit(m), threshold, scale2);
}

// Tiles whose finite maximum max (over non-NaN entries) is flat for the tempered terms but not
// for the raw ones (|max| >= 2^30 / log2(e) at tau > 1, rare): tempered FFMA terms, clamped
// (for finite entries the same bits), and raw terms relative to max. The tempered sum, and the
// tile's key with it, is then the tokens-only path's bit for bit. Out of line, from the tile's
// copy in shared memory; called by tile_sums_far only (its own code in tile_sums_far slowed the
// 16-bit cluster kernels with log-probs, whose code it changed: H200, bf16 B = 64 13.0 -> 13.7
// us a step).
template <typename T, bool kThreshold>
__device__ __noinline__ TileSums tile_sums_raw_far(const uint4* tile_shared, float max, float threshold, float scale2) {
  uint4 q[kTile * sizeof(T) / 16];
  load_tile_shared<T>(q, tile_shared);
  return tile_sums<T, kThreshold, true, true, false, false, /*kRawRelative=*/true>(q, max, threshold, scale2);
}

// Tiles whose finite maximum max (over non-NaN entries) is not flat (see sums_are_flat; rare):
// terms relative to it (kRelative), NaN terms counting 0; where only the raw terms are not
// flat (kRaw), tile_sums_raw_far. Out of line, from the tile's copy in shared memory.
// (tile_mass calls it and tile_sums_rare side by side: nested, or merged into one function,
// they made the main kernels spill and the bf16 main loop 2-3% slower, H100.)
template <typename T, bool kThreshold, bool kRaw>
__device__ __noinline__ TileSums tile_sums_far(const uint4* tile_shared, float max, float threshold, float scale2) {
  if constexpr (kRaw) {
    if (sums_are_flat<false>(max, scale2)) return tile_sums_raw_far<T, kThreshold>(tile_shared, max, threshold, scale2);
  }
  uint4 q[kTile * sizeof(T) / 16];
  load_tile_shared<T>(q, tile_shared);
  return tile_sums<T, kThreshold, kRaw, true, true>(q, max, threshold, scale2);
}

// The largest kept entry of a tile in registers, or NaN if an entry is NaN (without
// kThreshold; truncation already made NaN entries -inf).
template <typename T, bool kThreshold>
__device__ __forceinline__ float tile_largest(const uint4 (&q)[kTile * sizeof(T) / 16], float threshold) {
  if constexpr (sizeof(T) == 2 && !kThreshold) return tile_max_pairs<T>(q);
  float mj[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < kTile; ++j) mj[j % 4] = fmax_nan(mj[j % 4], tile_entry<T, kThreshold>(q, j, threshold));
  return fmax_nan(fmax_nan(mj[0], mj[1]), fmax_nan(mj[2], mj[3]));
}

// A whole tile in registers (tau > 0): its kept maximum, then the sum of
// exp((x - max) / tau) in a second pass, without the per-group rescaling of fold_vec (no
// branches, short dependency chains); kRaw: also the raw log-sum-exp (for log-probs), which
// shares the untruncated maximum. NaN entries count as truncated, as in fold_vec. The first
// pass's maximum is NaN if an entry is NaN (16-bit entries compared in pairs); only such
// tiles, and those holding +inf, can have NaN terms, and they go to tile_sums_rare (tiles
// whose max * scale2, or with kRaw max * log2(e), is not flat go to tile_sums_far: see
// there): the others skip the clamp of each term. tile_shared:
// the tile's copy in shared memory. Result: tile_max and log2_sum for add_tile (tile_max
// stays -inf if nothing is kept). kRawIsSum: see tile_sums.
// (H100, V = 128256, graph replay: fp32 B = 256 69 -> 59 us, bf16 B = 1024 165 -> 120 us.)
template <typename T, bool kThreshold, bool kRaw, bool kRawIsSum = false>
__device__ __forceinline__ void tile_mass(const uint4 (&q)[kTile * sizeof(T) / 16], const uint4* tile_shared,
                                          const RowCtx& c, float& tile_max, float& log2_sum, RowState& st) {
  static_assert(!(kRaw && kThreshold), "the raw log-sum-exp shares the untruncated maximum");
  const float m = tile_largest<T, kThreshold>(q, c.threshold);
  if (m == -INFINITY) return;  // nothing kept in the tile
  TileSums r;
  if (sums_are_flat<kRaw>(m, c.scale2)) {  // (false for NaN and +inf)
    r = tile_sums<T, kThreshold, kRaw, false, false, kRawIsSum>(q, m, c.threshold, c.scale2);
  } else {
    r = m < INFINITY ? TileSums{m, 0.f, 0.f, 0.f} : tile_sums_rare<T, kThreshold, kRaw>(tile_shared, c.threshold, c.scale2);
    if (r.max > -INFINITY && r.max < INFINITY && !sums_are_flat<kRaw>(r.max, c.scale2))
      r = tile_sums_far<T, kThreshold, kRaw>(tile_shared, r.max, c.threshold, c.scale2);
  }
  if (r.max == -INFINITY) return;
  if constexpr (kRaw) online_merge(st.raw_max, st.raw_sum, r.max, r.raw_sum, 1.f);
  tile_max = r.max;
  log2_sum = fast_log2(r.sum) - r.shift;
}

// A truncated tile's sums for a draw with log-probs, from its copy in shared memory: the kept
// entries' tempered sum and every entry's raw sum, both relative to the tile's maximum over all
// entries, which the raw sum needs. Where anything is kept that maximum is (x >= threshold), so
// it is the kept maximum too, and the tempered sum is tile_mass<T, true, false>'s, bit for bit
// (the same keys, so the same tokens as without log-probs); nothing kept: sum 0. It replaces
// fold_vec's fold of four entries at a time with rescaled exps (H200, per decode-like step
// with log-probs, bf16 V = 128256, the same tokens: top-p 0.9 B = 1024 781 -> 674 us, B = 64
// 67.9 -> 63.3, float32 B = 1024 961 -> 859; top-k 50 B = 1024 480 -> 418; both B = 256
// 235 -> 214). Out of line, so that the untruncated draws' loop keeps its registers: inline,
// the bf16 kernels spilled 16-24 bytes more and their untruncated draws slowed (B = 64 13.0
// -> 13.5 us), though truncated ones gained 3% more.
template <typename T>
__device__ __noinline__ TileSums tile_sums_kept_and_raw(const uint4* tile_shared, float threshold, float scale2) {
  uint4 q[kTile * sizeof(T) / 16];
  load_tile_shared<T>(q, tile_shared);
  const float m = tile_largest<T, false>(q, threshold);  // (NaN if an entry is NaN)
  if (m == -INFINITY) return {m, 0.f, 0.f, 0.f};
  if (sums_are_flat<true>(m, scale2)) return tile_sums<T, true, true, false>(q, m, threshold, scale2);
  TileSums r = m < INFINITY ? TileSums{m, 0.f, 0.f, 0.f}  // (finite, not flat)
                             : tile_sums_rare<T, true, true>(tile_shared, threshold, scale2);
  if (r.max > -INFINITY && r.max < INFINITY && !sums_are_flat<true>(r.max, scale2))
    r = tile_sums_far<T, true, true>(tile_shared, r.max, threshold, scale2);
  return r;
}

// A tau = 0 row's tile in registers: its largest entry and the lowest index holding it join
// the lane's argmax, and with log-probs its raw sum joins the log-sum-exp, in whole-tile passes
// as in tile_mass. NaN entries count as -inf, bit for bit (the maximum skips them, their terms
// are clamped to 0); tiles holding +inf (rare) take fold_vec's per-entry fold, which every
// tile took before (per-entry compares and rescaled exps; a batch waited for such a row: H100,
// bf16 B = 256 with log-probs and one tau = 0 row, 46 -> 33 us).
template <typename T>
__device__ __forceinline__ void tile_argmax(const uint4 (&q)[kTile * sizeof(T) / 16], int64_t t, const RowCtx& c,
                                            RowState& st) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(T)), kVecs = kTile / kPer;
  float m = tile_largest<T, false>(q, -INFINITY);
  const bool has_nan = m != m;
  if (has_nan) m = tile_largest<T, true>(q, -INFINITY);  // (the threshold test drops NaN)
  if (m == INFINITY) {
    float unused_max = -INFINITY, unused_sum = 0.f;
#pragma unroll
    for (int k = 0; k < kVecs; ++k) fold_vec<T>(st, unused_max, unused_sum, q[k], t * kTile + k * kPer, c);
    return;
  }
  if (c.need_logprobs && m > -INFINITY)
    online_merge(st.raw_max, st.raw_sum, m,
                 tile_exp2_sum<T, false>(q, 0.f, has_nan, [&](float x) { return (x - m) * kLog2e; }), 1.f);
  if (st.arg_idx >= 0 && !(m > st.arg_val)) return;  // (equal: the lane holds a lower index)
  // The first entry equal to m below V (an all -inf tile: its first non-NaN entry, as in
  // fold4; entries past the row read -inf).
  int first = -1;
#pragma unroll
  for (int j = kTile - 1; j >= 0; --j)
    if (tile_entry<T, false>(q, j, 0.f) == m && t * kTile + j < c.V) first = j;
  if (first < 0) return;
  st.arg_val = m;
  st.arg_idx = t * kTile + first;
}

// Order-preserving integer image of a float (larger float, larger key; -inf maps to
// 0x007fffff). -0 is folded onto +0, as a float comparison sees them.
__device__ __forceinline__ uint32_t to_order_key(float x) {
  const uint32_t bits = __float_as_uint(x == 0.f ? 0.f : x);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ float from_order_key(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// The 8 terms 2^(x * scale2 - base) of a 16-byte vector of 16-bit entries, summed as in
// tile_exp2_sum.
template <typename T>
__device__ __forceinline__ float vector_exp2_sum(uint4 v, float scale2, float base) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  return vector_tree_exp2_sum([&](int i) { return fmaf(pair_half_to_float<T>(w[i / 2], i % 2), scale2, -base); });
}

// One batch of a tokens-only tau > 0 row of 16-bit logits (lane: tile t, in registers and in
// the warp's stage), racing only the tiles that can still win. A tile's key is log2 of its
// mass plus its noise -log2(E). Each of its 8 vectors sums to between its largest term and 8
// times that, so with S = the sum of the vectors' largest terms the key lies in [low, low + 3],
// low = log2(S) - log2(E) (8 exps instead of 64). A tile whose upper end is below the largest
// low end seen in the CTA so far (cta_low, shared memory; any tile's low end is at most the
// winner's key) cannot win; the others (about e^(3 ln 2) = 8 per batch when every tile has
// the same mass, fewer otherwise) are summed exactly, 4 lanes a tile, in tile_exp2_sum's
// order: the keys are the exhaustive race's, bit for bit, and so is the winner but for the
// order of merges (best_merge decides two keys alike in either order; only three keys within
// ~2^-18 of each other could differ). Only the first of a tile's 4 lanes merges its key: with
// all 4, the warp merge by maximum always found ties and took its shuffle merge (H100, per
// decode-like step: bf16 B = 64, V = 128256 9.0 -> 8.7 us; V = 256000 11.9 -> 11.6). An
// invalid tau = +inf (scale2 = 0) makes the lows NaN, which exclude every tile: finish_row
// returns token 0 for such rows anyway. Tiles whose maximum is NaN, +inf or too large a scaled
// value for the bound's rounding margin take tile_mass, as in sample_kernel's loop. The
// candidates' list uses the stage's pad vectors. Called by every lane of the warp (valid: the
// lane's tile is in the row).
template <typename T>
__device__ __forceinline__ void race_batch_bounded(const uint4 (&tile)[kTile * sizeof(T) / 16], uint4* stage,
                                                   const RowCtx& c, uint32_t noise, int64_t t, bool valid,
                                                   uint32_t* cta_low, RowState& st) {
  static_assert(sizeof(T) == 2, "16-bit tiles: 8 vectors of 8 entries");
  constexpr int kVecs = 8, kLanesPerTile = 4, kTilesPerRound = 32 / kLanesPerTile;
  constexpr int kVecsPerLane = kVecs / kLanesPerTile;
  constexpr float kLog2VectorEntries = 3.f;  // a vector sums to at most 8 of its largest term
  constexpr float kMargin = 0x1p-4f;         // >> the rounding of keys below 2^16 (ulp <= 2^-7)
  using Pair = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
  const int lane = threadIdx.x % 32;
  float vector_max[kVecs], m = -INFINITY;
#pragma unroll
  for (int k = 0; k < kVecs; ++k) {
    const Pair* p = reinterpret_cast<const Pair*>(&tile[k]);
    const Pair r = __hmax2_nan(__hmax2_nan(p[0], p[1]), __hmax2_nan(p[2], p[3]));
    vector_max[k] = fmax_nan(to_float(r.x), to_float(r.y));
    m = fmax_nan(m, vector_max[k]);  // (NaN if an entry is NaN)
  }
  const float neg_log2_e = -fast_log2(exponential_from_bits(noise));
  const bool bounded = valid && m > -INFINITY && fabsf(m * c.scale2) < 0x1p16f;  // (false for NaN)
  float low_frac = 0.f, low = -INFINITY;
  if (bounded) {
    const float base = m * c.scale2, shift = fmaf(m, c.scale2, -base);  // (as in tile_sums)
    float e[kVecs];
#pragma unroll
    for (int k = 0; k < kVecs; ++k) e[k] = fast_exp2(fmaf(vector_max[k], c.scale2, -base));
    low_frac = fast_log2(tree_sum8(e)) - shift + neg_log2_e;
    low = fmaf(m, c.scale2, low_frac);
  } else if (valid && m != -INFINITY) {  // NaN, +inf or a tiny tau (rare): summed now
    float mass_max = -INFINITY, log2_sum = 0.f;
    tile_mass<T, false, false>(tile, stage + lane * (kVecs + 1), c, mass_max, log2_sum, st);
    if (mass_max != -INFINITY) add_tile(st, mass_max, log2_sum, c, noise, t);
  }
  const uint32_t warp_low = __reduce_max_sync(0xffffffffu, to_order_key(low));
  uint32_t seen = 0;
  if (lane == 0) seen = atomicMax(cta_low, warp_low);
  seen = max(warp_low, __shfl_sync(0xffffffffu, seen, 0));
  const bool candidate =
      bounded && fmaf(m, c.scale2, low_frac + kLog2VectorEntries) >= from_order_key(seen) - kMargin;
  const unsigned candidates = __ballot_sync(0xffffffffu, candidate);
  float4* list = reinterpret_cast<float4*>(stage) + kVecs;  // entry r: tile r's pad vector
  if (candidate)
    list[__popc(candidates & ((1u << lane) - 1)) * (kVecs + 1)] = make_float4(m, neg_log2_e, __int_as_float(lane), 0.f);
  __syncwarp();
  const int n = __popc(candidates);
  for (int first = 0; first < n; first += kTilesPerRound) {  // (warp-uniform)
    const int j = first + lane / kLanesPerTile;
    const float4 entry = list[min(j, n - 1) * (kVecs + 1)];  // (groups past the last repeat it, unmerged)
    const int owner = __float_as_int(entry.z);
    const float tile_max = entry.x, base = tile_max * c.scale2, shift = fmaf(tile_max, c.scale2, -base);
    const uint4* v = stage + owner * (kVecs + 1) + (lane % kLanesPerTile) * kVecsPerLane;
    float sum = vector_exp2_sum<T>(v[0], c.scale2, base);
#pragma unroll
    for (int k = 1; k < kVecsPerLane; ++k) sum += vector_exp2_sum<T>(v[k], c.scale2, base);
#pragma unroll
    for (int off = 1; off < kLanesPerTile; off <<= 1)  // (the tile's lanes hold vectors in order)
      sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (j < n && lane % kLanesPerTile == 0)
      best_merge(st.best_key, st.best_idx, TileKey{tile_max, fast_log2(sum) - shift + entry.y}, t - lane + owner,
                 c.scale2);
  }
  __syncwarp();  // (the list is read before the stage's next use)
}

// kCluster: a row's splits form a thread-block cluster and merge in it (see
// finish_or_write_partial); a separate instantiation, so that the other kernel is unchanged.
// kTokensOnly: the host launches this instantiation for calls without log-probs or
// thresholds (the common decode step); both are then compile-time constants and the kernel
// holds only its own paths, half the code. (H100, bf16 V = 128256, per decode-like step:
// B = 16 -0.2 us, fp32 B = 64 -0.5, bf16 B = 64 -0.1.) Only it merges by maximum and
// requests the winning tile early (finish_from_partials).
template <typename T, bool kCluster, bool kTokensOnly, bool kBounded = false>
__global__ void __launch_bounds__(kCluster ? kClusterThreads : kThreads, kCluster ? 1 : 2)
    sample_kernel(SampleArgs a, const float* thresholds, int64_t tiles_per_split) {
  if constexpr (kTokensOnly) {
    a.need_logprobs = false;
    thresholds = nullptr;
  }
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));  // entries per 16-byte vector
  constexpr int kVecs = kTile / kPer;                       // vectors per tile: 16 or 8
  // Per warp: 32 tiles of kVecs + 1 (pad) vectors; kCluster: then the row's partials.
  extern __shared__ uint4 stage_all[];
  // kCluster: after the stages, the row's partials (in CTA 0), then for tokens-only kernels
  // CTA 0's mbarrier that counts them in: an arrival per warp of CTA 0, bytes from the others.
  float4* const cluster_partials = reinterpret_cast<float4*>(stage_all + blockDim.x / 32 * kBatchTiles * (kVecs + 1));
  uint64_t* const cluster_bar = reinterpret_cast<uint64_t*>(cluster_partials + 2 * a.splits * (blockDim.x / 32));
  if (kCluster && kTokensOnly && blockIdx.y == 0 && threadIdx.x == 0)
    push_mbar_init(cluster_bar, blockDim.x / 32, (a.splits - 1) * (blockDim.x / 32) * 2 * sizeof(float4));
  if constexpr (kCluster) cluster_arrive_relaxed();  // (waited for before the partials are stored)
  griddep_wait();                // launched early (PDL): the previous kernel's results
  griddep_launch_dependents();   // let the PDL finish kernel get resident early
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  const T* l = static_cast<const T*>(a.logits) + row * a.ld;
  // The row's inputs are requested first, at an index the compiler cannot prove warp-uniform
  // (it is row), so that they stay in per-thread registers: moved into uniform registers, each
  // was waited for where it was loaded, two round trips before the logits' first load (SASS).
  // The first 16-bit batch is requested next, and only then are the inputs made warp-uniform
  // and used, so their round trip overlaps the batch's. (H200, per decode-like step, bf16
  // V = 128256: B = 1 5.4 -> 5.1 us, B = 16 5.9 -> 5.7, B = 256 19.4 -> 19.3, V = 256000
  // B = 64 10.2 -> 9.8; B = 64 and fp32 B = 64 unchanged, fp32 B = 8 5.2 -> 5.1; the same
  // tokens. fp32 kernels still load their first batch in the loop: issued early, its 16
  // vectors spilled 360-530 bytes.)
  //
  // kSharedInputs (16-bit cluster kernels): one request per CTA instead of one per warp. A
  // row's inputs are a few bytes, so every warp of the grid asked the same few L2 lines for
  // them (at B = 64: 2048 requests per line), and those requests waited in line behind one
  // another: Nsight Compute put 15% of all warp stall samples on the shuffle that waits for
  // tau, and none on the first batch's regroup, whose data had arrived before. Here thread 0
  // requests them, stores them to shared memory after the first batch's loads are issued, and
  // a CTA barrier hands them to the other warps. (H200, per decode-like step, the same tokens:
  // bf16 B = 64, V = 128256 7.85 -> 7.35 us, V = 256000 9.8 -> 9.25, fp16 B = 64 7.8 -> 7.4,
  // B = 64 at tau = 0 8.55 -> 8.15, B = 8 at V = 256000 5.8 -> 5.6, B = 16 -0.07; B = 8 and 32
  // unchanged. Not elsewhere: the same at B = 256, one CTA per row, took 19.2 -> 19.7 us, and
  // float32 cluster kernels, whose first batch is requested after the inputs, did not gain.)
  constexpr bool kSharedInputs = kCluster && sizeof(T) == 2;
  const int64_t input_row = row + (threadIdx.x >= blockDim.x);
  float tau_lane = 0.f;
  uint64_t seed_lane = 0, offset_lane = 0;
  if (!kSharedInputs || threadIdx.x == 0) {
    tau_lane = row_value(a.temperature, input_row);
    seed_lane = row_seed(a, input_row);
    offset_lane = row_offset(a, input_row);
  }
  // kCluster && kTokensOnly: the row's first CTA, whose last warp finishes the row, takes the
  // last range, which may hold fewer batches, and that warp the fewest of its CTA: it then has
  // time for the finish's rehearsal while the others fold (see finish_or_write_partial).
  const int64_t t_begin = (kCluster && kTokensOnly ? a.splits - 1 - split : split) * tiles_per_split;
  const int64_t t_end = min(t_begin + tiles_per_split, ceil_div(a.V, kTile));
  const int64_t e_end = min(a.V, t_end * kTile);
  // kBounded (tokens-only 16-bit calls whose warps hold two batches or more; see sample_aligned_launch):
  // tau > 0 rows race bounded tiles (race_batch_bounded), with cta_low, the CTA's largest low
  // end of a key so far, from -inf (set for every row: its barrier must not wait for tau;
  // kSharedInputs kernels set it at their inputs' barrier, after the first batch's loads).
  static_assert(!kBounded || (kTokensOnly && sizeof(T) == 2), "bounded races: tokens-only 16-bit kernels");
  __shared__ uint32_t cta_low;
  if constexpr (kBounded && !kSharedInputs) {
    if (threadIdx.x == 0) cta_low = to_order_key(-INFINITY);
    __syncthreads();
  }
  uint4* stage = stage_all + warp * kBatchTiles * (kVecs + 1);
  RowState st;
  // A batch's loads: vector i * 32 + lane of the batch starting at tile b0. Split ranges are
  // whole batches, so only a row's last batch takes the tail path.
  auto load_batch = [&](uint4(&q)[kVecs], int64_t b0) {
    const T* p = l + b0 * kTile + lane * kPer;
    if ((b0 + kBatchTiles) * kTile <= e_end) {  // warp-uniform
#pragma unroll
      for (int i = 0; i < kVecs; ++i) q[i] = ldg_vec(p + i * 32 * kPer);
    } else {
#pragma unroll
      for (int i = 0; i < kVecs; ++i) q[i] = ldg_vec_tail(l, b0 * kTile + (i * 32 + lane) * kPer, e_end);
    }
  };
  // 16-bit logits: the next batch's loads are issued before this batch is folded (its 8
  // vectors per lane fit next to the current ones), so a warp's batches do not each wait a
  // full memory latency. (float32 batches are 16 vectors per lane: no room for two.)
  constexpr bool kPrefetch = sizeof(T) == 2;
  const int64_t step = static_cast<int64_t>(nwarps) * kBatchTiles;
  uint4 q[kVecs];
  int64_t b0 = t_begin + warp * kBatchTiles;
  if (kPrefetch && b0 < t_end) load_batch(q, b0);
  if constexpr (kSharedInputs) {
    __shared__ float shared_tau;
    __shared__ uint64_t shared_seed, shared_offset;
    if (threadIdx.x == 0) {
      shared_tau = tau_lane;
      shared_seed = seed_lane;
      shared_offset = offset_lane;
      if constexpr (kBounded) cta_low = to_order_key(-INFINITY);
    }
    __syncthreads();
    tau_lane = shared_tau;
    seed_lane = shared_seed;
    offset_lane = shared_offset;
  }
  // (warp-uniform from here on; the shuffles wait for the inputs)
  const float tau_in = __shfl_sync(0xffffffffu, tau_lane, 0);
  const uint64_t seed = __shfl_sync(0xffffffffu, seed_lane, 0);
  const uint64_t offset = __shfl_sync(0xffffffffu, offset_lane, 0);
  RowCtx c;
  if (!row_ctx_in_pass(a, thresholds, row, tau_in, c)) return;  // (the whole row: every CTA of its cluster)
  const bool bounded = kBounded && !c.greedy;
  // Noise words: a Philox block serves a pair of tiles (see philox_block), so every other
  // batch lanes 0-15 draw the blocks of this batch's 16 pairs and lanes 16-31 those of the
  // warp's next batch (b0 is a multiple of 32): half the Philox work per tile (~75
  // instructions a block), for two shuffles per batch.
  uint32_t noise_even = 0, noise_odd = 0;
  for (bool second = false; b0 < t_end; b0 += step, second = !second) {
    if constexpr (!kPrefetch) load_batch(q, b0);
    if (!second && !c.greedy) {
      const int64_t pair = (lane < 16 ? b0 : b0 + step) / 2 + lane % 16;
      const Uint4 block = philox_block(seed, offset, pair_counter(static_cast<uint64_t>(pair), c.round));
      noise_even = block.x;  // tile_noise_word of tiles 2g and 2g + 1
      noise_odd = block.z;
    }
    // Regroup: vector g = i * 32 + lane of the batch is part g % kVecs of tile g / kVecs. Tiles
    // are padded by one vector, so both the stores and lane-strided reads are bank-conflict
    // free. (kBounded: one address and immediate offsets, as kVecs divides 32, which frees
    // registers race_batch_bounded needs; float32 kernels measured slower so, H100.)
    __syncwarp();  // the previous batch's reads are done
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int g = i * 32 + lane;
      if constexpr (kBounded)
        stage[(lane / kVecs) * (kVecs + 1) + lane % kVecs + i * (32 / kVecs) * (kVecs + 1)] = q[i];
      else
        stage[(g / kVecs) * (kVecs + 1) + g % kVecs] = q[i];
    }
    __syncwarp();
    uint4 tile[kVecs];
#pragma unroll
    for (int k = 0; k < kVecs; ++k) tile[k] = stage[lane * (kVecs + 1) + k];
    const uint4* tile_shared = stage + lane * (kVecs + 1);  // intact until the next batch's regroup
    if (kPrefetch && b0 + step < t_end) load_batch(q, b0 + step);
    const int pair_lane = (second ? 16 : 0) + lane / 2;
    const uint32_t even = __shfl_sync(0xffffffffu, noise_even, pair_lane);
    const uint32_t odd = __shfl_sync(0xffffffffu, noise_odd, pair_lane);
    const int64_t t = b0 + lane;
    if constexpr (kBounded) {
      if (bounded) {
        race_batch_bounded<T>(tile, stage, c, lane % 2 ? odd : even, t, t < t_end, &cta_low, st);
        continue;
      }
    }
    if (t >= t_end) continue;
    float tile_max = -INFINITY, log2_sum = 0.f;
    if (c.greedy) {  // argmax (and the raw log-sum-exp)
      tile_argmax<T>(tile, t, c, st);
      continue;
    } else if (c.threshold == -INFINITY) {
      // (tau = 1 rows reuse the tempered terms as raw ones; !kTokensOnly keeps the tokens-only
      // kernels' code as it was: a branch they never take still changed their SASS)
      if (c.need_logprobs && !kTokensOnly && c.scale2 == kLog2e)
        tile_mass<T, false, true, !kTokensOnly>(tile, tile_shared, c, tile_max, log2_sum, st);
      else if (c.need_logprobs) tile_mass<T, false, true>(tile, tile_shared, c, tile_max, log2_sum, st);
      else tile_mass<T, false, false>(tile, tile_shared, c, tile_max, log2_sum, st);
    } else if (c.need_logprobs) {  // truncated, with log-probs (out of line: see tile_sums_kept_and_raw)
      const TileSums r = tile_sums_kept_and_raw<T>(tile_shared, c.threshold, c.scale2);
      if (r.max == -INFINITY) continue;
      online_merge(st.raw_max, st.raw_sum, r.max, r.raw_sum, 1.f);
      if (!(r.sum > 0.f)) continue;  // nothing kept (the kept maximum's own term is > 0)
      tile_max = r.max;
      log2_sum = fast_log2(r.sum) - r.shift;
    } else {
      tile_mass<T, true, false>(tile, tile_shared, c, tile_max, log2_sum, st);
    }
    if (tile_max == -INFINITY) continue;  // nothing kept in the tile
    add_tile(st, tile_max, log2_sum, c, lane % 2 ? odd : even, t);
  }
  finish_or_write_partial<T, true, kCluster, kTokensOnly>(a, row, split, st, c, seed, offset, cluster_partials,
                                                          stage,  // (the finishing warp's is free by then)
                                                          cluster_bar);
}

template <int kBlock = kThreads>
__device__ float block_sum(float x) {
  __shared__ float part[kBlock / 32];
  __shared__ float total;
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = x;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int w = 0; w < kBlock / 32; ++w) s += part[w];
    total = s;
  }
  __syncthreads();
  const float r = total;
  __syncthreads();
  return r;
}

template <int kBlock = kThreads>
__device__ float block_max(float x) {
  __shared__ float part[kBlock / 32];
  __shared__ float total;
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = x;
  __syncthreads();
  if (threadIdx.x == 0) {
    float m = -INFINITY;
    for (int w = 0; w < kBlock / 32; ++w) m = fmaxf(m, part[w]);
    total = m;
  }
  __syncthreads();
  const float r = total;
  __syncthreads();
  return r;
}

// Reads a row with 16-byte loads (kInFlight in flight per thread: one CTA may be a whole row's
// reader): on_entry(x, valid, index) for the entries before the first 16-byte boundary and
// after the last whole vector (one per thread), on_vector(q, valid, index of its first entry)
// for the whole vectors between. Every thread makes the same number of calls (valid = false
// past the row), so the callbacks may use warp-collective operations. kRolled: the visits of
// each batch's vectors run as a loop (each in q[0], the others moved down a register) rather
// than kInFlight inline copies, so that a warp fetches the visit's code once a batch (see
// truncate_and_draw: where a thread's vectors are one batch, instruction fetch dominated).
template <int kBlock, int kInFlight, bool kRolled = false, typename T, typename OnEntry, typename OnVector>
__device__ __forceinline__ void for_row_parts(const T* l, int64_t V, OnEntry&& on_entry, OnVector&& on_vector) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));
  static_assert(kPer <= kBlock, "the head and tail take one entry per thread");
  const int64_t misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(l) % 16) / static_cast<int64_t>(sizeof(T));
  const int64_t head = min(V, (kPer - misalign) % kPer);
  const int64_t vectors = (V - head) / kPer;
  const int64_t tail = head + vectors * kPer;
  {
    const bool valid = threadIdx.x < head;
    on_entry(valid ? load_logit(l + threadIdx.x) : 0.f, valid, static_cast<int64_t>(threadIdx.x));
  }
  const uint4* body = reinterpret_cast<const uint4*>(l + head);
  for (int64_t base = 0; base < vectors; base += kBlock * kInFlight) {
    uint4 q[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int64_t i = base + u * kBlock + threadIdx.x;
      q[u] = i < vectors ? __ldg(body + i) : make_uint4(0u, 0u, 0u, 0u);
    }
    if constexpr (kRolled) {
#pragma unroll 1
      for (int u = 0; u < kInFlight; ++u) {
        const int64_t i = base + u * kBlock + threadIdx.x;
        on_vector(q[0], i < vectors, head + i * kPer);
#pragma unroll
        for (int w = 0; w + 1 < kInFlight; ++w) q[w] = q[w + 1];
      }
    } else {
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        const int64_t i = base + u * kBlock + threadIdx.x;
        on_vector(q[u], i < vectors, head + i * kPer);
      }
    }
  }
  {
    const bool valid = tail + threadIdx.x < V;
    on_entry(valid ? load_logit(l + tail + threadIdx.x) : 0.f, valid, tail + threadIdx.x);
  }
}

// The entries of a 16-byte vector as floats.
template <typename T>
__device__ __forceinline__ void vector_entries(const uint4& q, float (&x)[16 / sizeof(T)]) {
#pragma unroll
  for (int j = 0; j < static_cast<int>(16 / sizeof(T)); ++j) x[j] = to_float(reinterpret_cast<const T*>(&q)[j]);
}

// Calls f(x, valid, index) for every entry of a row (see for_row_parts).
template <int kBlock = kThreads, int kInFlight = 4, bool kRolled = false, typename T, typename F>
__device__ __forceinline__ void for_row_entries(const T* l, int64_t V, F&& f) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));
  for_row_parts<kBlock, kInFlight, kRolled>(l, V, f, [&](const uint4& q, bool valid, int64_t first) {
#pragma unroll
    for (int j = 0; j < kPer; ++j) f(to_float(reinterpret_cast<const T*>(&q)[j]), valid, first + j);
  });
}

// Radix selection of a truncation threshold: the largest float t with
// measure(t) = sum of weight(x) over the row's entries x >= t at least `target`, which is
// the key of one entry. Three passes over the row (two for 16-bit logits, whose keys' low
// bits are constant) histogram the entries' keys by 11, 11 and 10 bits (2048 bins in shared
// memory), each pass only the entries whose higher bits match the digits chosen so far;
// after a pass, the highest bin whose entries plus all those above it reach the target is
// chosen. Weights are 32-bit integers (counts, or
// masses in fixed point) whose row total fits 32 bits, so the bins are filled with native
// shared atomic adds (a 64-bit add is a compare-and-swap loop, which stalled on the few
// bins that random logits crowd into) and the sums do not depend on the order of the
// adds: the threshold is deterministic. (The bisection this replaces made ~32 passes.)
// Returns -inf when the whole row's measure is below target. NaN entries weigh nothing (a
// comparison never keeps them).
//
// Few rows: a row is read by a thread-block cluster of up to 16 CTAs (sm_90), each over one
// slice of it; after each pass every CTA adds its histogram's nonzero bins to their owners'
// sums in distributed shared memory (integer sums: the same totals, hence the same choices,
// in every CTA), and after one cluster barrier reads the sums it needs.
constexpr int kRadixBins = 2048;
// Up to 8 CTAs a row (the portable cluster size); 16 (non-portable, sm_90) for batches whose
// clusters of 16 all fit on the device at once (row_clusters_that_fit).
constexpr int kPortableRowCtas = 8;
constexpr int kMaxRowCtas = 16;
constexpr int kRadixCache = 4096;  // entries (16 KB) the third radix pass (float32) may read from shared memory
constexpr int kRowInFlight = 4;    // 16-byte loads in flight per thread in truncation_kernel's passes
// Few rows: 1024-thread CTAs (4x the loads in flight); many rows: 256-thread CTAs share the
// SMs (4 per SM at 64 registers).
constexpr int kTruncationThreadsFewRows = 1024;
// ... and 512-thread CTAs (128 registers) when the kernel also draws (draw_in_truncation: a
// tile a lane, which spilled ~500 bytes at the 64 registers of 1024-thread CTAs).
constexpr int kTruncationThreadsDraw = 512;
// Its dynamic shared memory: a tile (and a pad vector) per thread (16-bit: 74 KB, float32: 139 KB).
template <typename T>
constexpr size_t kDrawStageBytes = kTruncationThreadsDraw * (kTile * sizeof(T) / 16 + 1) * sizeof(uint4);
// row_mass's: this CTA's sums, then every CTA's of the row, gathered.
struct RowMassScratch {
  float cta[3];
  float gathered[3 * kMaxRowCtas];
};

template <int kBlock>
struct RadixScratch {
  static_assert(kRadixBins % kBlock == 0 && (kRadixBins / 2) % kBlock == 0, "bins per thread");
  uint32_t hist[kRadixBins];
  // A cluster: this CTA's share of each pass's bins (kRadixBins / ctas, ctas >= 2), summed over
  // the row; zero before a selection's first pass (zero_merged_sums).
  uint32_t merged[3][kRadixBins / 2];
  unsigned long long warp_sums[kBlock / 32];
  unsigned long long above;  // measure of the entries above the chosen bins
  int bin, found;
  RowMassScratch mass;  // the max pass's sums (row_mass)
  // The second pass keeps its matching entries (those that weigh anything) here, so the
  // third pass reads them instead of the row when they fit.
  float cache[kRadixCache];
  int cached;  // entries the second pass matched (may exceed kRadixCache: then unused)
};

// Appends x to the radix cache where keep is set (warp-collective: one shared atomic per
// warp and call).
template <int kBlock>
__device__ __forceinline__ void cache_append(RadixScratch<kBlock>& sh, float x, bool keep) {
  const unsigned ballot = __ballot_sync(0xffffffffu, keep);
  if (ballot == 0) return;
  const int lane = threadIdx.x % 32, leader = __ffs(ballot) - 1;
  int base = 0;
  if (lane == leader) base = atomicAdd(&sh.cached, __popc(ballot));
  base = __shfl_sync(0xffffffffu, base, leader);
  const int slot = base + __popc(ballot & ((1u << lane) - 1));
  if (keep && slot < kRadixCache) sh.cache[slot] = x;
}

// The 32-bit word at `p`'s shared-memory offset in CTA `rank` of the row's cluster.
__device__ __forceinline__ uint32_t load_row_shared(const void* p, int rank, int ctas) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (ctas > 1) {
    uint32_t v;
    asm volatile("ld.shared::cluster.u32 %0, [%1];\n" : "=r"(v) : "r"(cluster_shared_address(p, rank)) : "memory");
    return v;
  }
#endif
  (void)rank;
  (void)ctas;
  return *static_cast<const volatile uint32_t*>(p);
}

// Adds v to the 32-bit word at `p`'s shared-memory offset in CTA `rank` of the row's cluster
// (ctas > 1; sm_90). Relaxed: a cluster barrier (release / acquire) orders it.
__device__ __forceinline__ void add_row_shared(uint32_t* p, int rank, uint32_t v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.relaxed.cluster.shared::cluster.add.u32 [%0], %1;\n" ::"r"(cluster_shared_address(p, rank)), "r"(v)
               : "memory");
#else
  (void)rank;
  atomicAdd(p, v);  // (never reached: clusters are launched on sm_90 only)
#endif
}

// Zeroes this CTA's merged sums for a radix selection's passes (ctas > 1). The caller orders
// it after every CTA's last read of the previous sums and before any CTA's first add (cluster
// barriers).
template <int kBlock>
__device__ __forceinline__ void zero_merged_sums(RadixScratch<kBlock>& sh) {
  uint32_t* const sums = &sh.merged[0][0];
  for (int i = threadIdx.x; i < 3 * (kRadixBins / 2); i += kBlock) sums[i] = 0u;
}

// Adds weights to histogram bins; consecutive entries of a thread often share a bin (coarse
// first digit, masked -inf runs): their weights are combined in a register before one shared
// atomic add.
struct BinAdder {
  uint32_t* hist;
  int bin = -1;
  uint32_t sum = 0;
  __device__ __forceinline__ void add(int b, uint32_t w) {
    if (b != bin) {
      if (sum != 0) atomicAdd(&hist[bin], sum);
      bin = b;
      sum = 0;
    }
    sum += w;
  }
  __device__ __forceinline__ void flush() {
    if (sum != 0) atomicAdd(&hist[bin], sum);
  }
};
constexpr int kFirstDigitBits = 11;  // the first two passes' digits (kRadixBins bins)
constexpr int kLastDigitBits = 32 - 2 * kFirstDigitBits;
static_assert(kRadixBins == 1 << kFirstDigitBits, "a pass histograms its digit in kRadixBins bins");
constexpr int kFirstDigitShift = 32 - kFirstDigitBits;  // the first pass's digit: key >> 21

// x becomes the sum of x over lanes lane .. n - 1 (lanes >= n keep theirs; n a power of two
// up to 32).
__device__ __forceinline__ void suffix_sum_in_warp(unsigned long long& x, int n) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    if (off >= n) break;
    const unsigned long long up = __shfl_down_sync(0xffffffffu, x, off);
    if (lane + off < n) x += up;
  }
}

// first_pass_filled: the caller already filled sh.hist with the first pass's histogram (the
// top-k counts are gathered during the max pass, saving one read of the row). kCache: the
// third pass (float32 rows) reads the second pass's matches from shared memory when they fit
// (top-k: few entries share the k-th largest's top 22 bits; top-p's boundary often has more
// than fit, and collecting them slowed it: H100, fp32 B = 256, V = 128256, 364 -> 497 us;
// caching only the matches that weigh anything, top-p +5…25% at B = 1 … 1024). kRolled: see
// for_row_parts.
template <int kBlock, bool kCache, bool kRolled, typename T, typename Weight, typename Target>
__device__ __forceinline__ float radix_threshold(const T* l, int64_t V, int ctas, RadixScratch<kBlock>& sh,
                                                 Weight&& weight, Target&& target_of,
                                                 bool first_pass_filled = false) {
  constexpr int kMaxPer = kRadixBins / kBlock;  // bins per thread
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint32_t prefix = 0;  // the digits chosen so far
  int prefix_bits = 0;
  unsigned long long above = 0, target = 0;
  // 16-bit logits as floats have their low 13 (fp16) or 16 (bf16) bits zero, so their keys'
  // low 10 bits are all 0 (sign bit set in the key) or all 1: the first two passes' 22 bits
  // decide the threshold, and a third pass would count every match in one bin. (H200, per
  // decode-like step, bf16 V = 128256, the same tokens: top-k 50 at B = 1 29.1 -> 23.5 us,
  // B = 64 48.5 -> 38.5; top-p 0.9 with log-probs B = 1 42.2 -> 35.6, B = 64 77.2 -> 67.9;
  // top-k and top-p with log-probs B = 256 289 -> 235.)
  constexpr int kPasses = sizeof(T) == 2 ? 2 : 3;
#pragma unroll 1
  for (int pass = 0; pass < kPasses; ++pass) {
    const int bits = pass < 2 ? kFirstDigitBits : kLastDigitBits, bins = 1 << bits, shift = 32 - prefix_bits - bits;
    const bool fill = pass > 0 || !first_pass_filled;
    const bool collect = kCache && kPasses == 3 && pass == 1;  // the second pass fills the cache
    const int cached = sh.cached;              // (set by the second pass; read by the third only)
    const bool from_cache = kCache && pass == 2 && cached <= kRadixCache;  // uniform over the CTA
    if (fill)
      for (int i = threadIdx.x; i < bins; i += kBlock) sh.hist[i] = 0;
    if (kCache) __syncthreads();  // every thread has read sh.cached
    if (threadIdx.x == 0) {
      sh.found = 0;
      if (collect) sh.cached = 0;
    }
    __syncthreads();
    if (fill) {
      // Zero weights (masses below the fixed point's resolution) add nothing.
      BinAdder adder{sh.hist};
      auto visit = [&](float x, bool valid, auto collect_tag) {
        const uint32_t key = to_order_key(x);
        const bool match = valid && x == x && (prefix_bits == 0 || (key >> (32 - prefix_bits)) == prefix);
        const int bin = static_cast<int>((key >> shift) & static_cast<uint32_t>(bins - 1));
        if constexpr (decltype(collect_tag)::value) {  // top-k: every lane takes part
          // (Weight first, then one test: top-k B = 1024 -4…6% against testing match twice.)
          const uint32_t w = match ? weight(x) : 0u;
          cache_append(sh, x, w != 0);                 // (warp-collective)
          if (w != 0) adder.add(bin, w);
        } else {
          // An early exit, so that top-p's weight (an exp) is computed for matching entries
          // only: as a select it ran for every entry of every pass (fp32 B = 256 top-p +19%).
          if (!match) return;
          const uint32_t w = weight(x);
          if (w != 0) adder.add(bin, w);
        }
      };
      if (from_cache) {
        for (int i0 = 0; i0 < cached; i0 += kBlock) {
          const int i = i0 + static_cast<int>(threadIdx.x);
          visit(i < cached ? sh.cache[i] : 0.f, i < cached, std::false_type{});
        }
      } else if (collect) {
        for_row_entries<kBlock, kRowInFlight, kRolled>(
            l, V, [&](float x, bool valid, int64_t) { visit(x, valid, std::true_type{}); });
      } else {
        for_row_entries<kBlock, kRowInFlight, kRolled>(
            l, V, [&](float x, bool valid, int64_t) { visit(x, valid, std::false_type{}); });
      }
      adder.flush();
    }
    // This thread's bins [t * per, (t + 1) * per), summed over the row's CTAs.
    const int per = bins / kBlock;
    uint32_t count[kMaxPer];
    unsigned long long mine = 0;
    if (ctas == 1) {
      __syncthreads();
#pragma unroll
      for (int j = 0; j < kMaxPer; ++j) {
        count[j] = j < per ? sh.hist[threadIdx.x * per + j] : 0u;
        mine += count[j];
      }
    } else {
      // Bin b's sum lives in CTA b / share (its owner). Each CTA adds its nonzero bins there
      // (few: the entries crowd into few bins, and later passes count only the matching ones),
      // one cluster barrier, then every CTA reads the sums of all bins from their owners.
      // (Each owner summing its share over the CTAs' histograms by remote loads took a
      // barrier more and 8 remote loads per bin: H200, per decode-like step, top-k B = 1 and
      // 8 -0.6 us, top-p unchanged.)
      // The sums stay until the next selection zeroes them, after a barrier (zero_merged_sums).
      const int share = bins / ctas;
      __syncthreads();  // this CTA's histogram is complete
      for (int i = threadIdx.x; i < bins; i += kBlock) {
        const uint32_t c = sh.hist[i];
        if (c != 0) add_row_shared(&sh.merged[pass][i % share], i / share, c);
      }
      row_barrier(ctas);  // (release / acquire: every CTA's adds are done and visible)
#pragma unroll
      for (int j = 0; j < kMaxPer; ++j) {
        const int b = threadIdx.x * per + j;
        count[j] = j < per ? load_row_shared(&sh.merged[pass][b % share], b / share, ctas) : 0u;
        mine += count[j];
      }
    }
    // Suffix sums over the bins, highest first: over the warp's lanes, then over the warps'
    // sums, which every warp scans for itself with shuffles. (A loop over the 32 warps' sums
    // in every thread took ~1.4 us a pass: H200, top-k, B = 1, fp32 V = 128256.)
    unsigned long long from_here = mine;  // this thread's bins and those of higher lanes
    suffix_sum_in_warp(from_here, 32);
    if (lane == 0) sh.warp_sums[warp] = from_here;
    __syncthreads();
    constexpr int kWarps = kBlock / 32;
    unsigned long long warps_from = lane < kWarps ? sh.warp_sums[lane] : 0ull;  // warps lane, lane + 1, ...
    suffix_sum_in_warp(warps_from, kWarps);
    const unsigned long long total = __shfl_sync(0xffffffffu, warps_from, 0);
    const unsigned long long higher_warps = __shfl_sync(0xffffffffu, warps_from, (warp + 1) % 32);
    if (warp + 1 < kWarps) from_here += higher_warps;
    if (pass == 0) target = target_of(total);
    // The one thread whose bins cross the target picks the bin.
    const unsigned long long before = above + (from_here - mine);
    if (before < target && before + mine >= target) {
      unsigned long long cum = before;
      bool picked = false;
#pragma unroll
      for (int j = kMaxPer - 1; j >= 0; --j) {
        if (j >= per || picked) continue;
        if (cum + count[j] >= target) {
          sh.bin = threadIdx.x * per + j;
          sh.above = cum;
          sh.found = 1;
          picked = true;
        }
        cum += count[j];
      }
    }
    __syncthreads();
    const bool found = sh.found != 0;
    const int bin = sh.bin;
    above = sh.above;
    __syncthreads();  // read before the next pass clears them
    if (!found) return -INFINITY;  // (uniform over the row's CTAs) the row weighs less than the target
    prefix = (prefix << bits) | static_cast<uint32_t>(bin);
    prefix_bits += bits;
  }
  if constexpr (kPasses == 2) {  // fill in the constant low bits (see kPasses)
    constexpr int kChosenBits = 32 - kLastDigitBits;
    const bool non_negative = (prefix >> (kChosenBits - 1)) != 0;  // the key's top bit
    prefix = (prefix << kLastDigitBits) | (non_negative ? 0u : (1u << kLastDigitBits) - 1u);
  }
  return from_order_key(prefix);
}

// exp((x - m) / tau) with the equal case exact (also when m = x = +inf: no inf - inf).
__device__ __forceinline__ float tempered_ratio(float x, float m, float inv_tau) {
  return x == m ? 1.f : __expf((x - m) * inv_tau);
}

// A thread's running maximum and the tempered sum of its entries relative to it, rescaled
// when the maximum grows (one pass); kAbove: also the sum over the entries > pivot.
template <bool kAbove>
struct OnlineMass {
  float max = -INFINITY, sum = 0.f, above = 0.f;
  __device__ __forceinline__ void add(float x, float inv_tau, float pivot = INFINITY) {
    if (!(x > -INFINITY)) return;  // (-inf and NaN weigh nothing)
    if (x > max) {
      const float r = max == -INFINITY ? 0.f : tempered_ratio(max, x, inv_tau);
      sum *= r;
      if constexpr (kAbove) above *= r;
      max = x;
    }
    const float w = tempered_ratio(x, max, inv_tau);
    sum += w;
    if constexpr (kAbove)
      if (x > pivot) above += w;
  }
  // The same for a vector's entries: the maximum once per vector, then one exp per entry and
  // a tree of sums, without add's per-entry branches (~43 instructions an entry, which bound
  // top_p_check_kernel: H200, bf16 B = 64, V = 128256 ~17 us for a 16 MB read). The sums
  // differ from add's by rounding only (within check_margin). Vectors holding NaN (their sum
  // turns NaN) and threads whose maximum is +inf take add, entry by entry.
  template <int n>
  __device__ __forceinline__ void add_all(const float (&x)[n], float inv_tau, float pivot = INFINITY) {
    float top = x[0];
#pragma unroll
    for (int j = 1; j < n; ++j) top = fmaxf(top, x[j]);  // (skips NaN)
    if (top > max) {
      const float r = max == -INFINITY ? 0.f : tempered_ratio(max, top, inv_tau);
      sum *= r;
      if constexpr (kAbove) above *= r;
      max = top;
    }
    if (!(max < INFINITY)) {  // -inf: nothing kept yet (NaN or -inf entries only); +inf: add's ratios
      if (max == INFINITY)
#pragma unroll
        for (int j = 0; j < n; ++j) add(x[j], inv_tau, pivot);
      return;
    }
    const float scale2 = inv_tau * kLog2e;  // (finite: inv_tau <= 2^126)
    float w[n], w_above[n];
#pragma unroll
    for (int j = 0; j < n; ++j) {
      w[j] = fast_exp2((x[j] - max) * scale2);  // (-inf entries: 0; NaN entries: NaN)
      w_above[j] = x[j] > pivot ? w[j] : 0.f;
    }
    const float vector_sum = tree_sum(w);
    if (vector_sum != vector_sum) {  // a NaN entry, which weighs nothing
#pragma unroll
      for (int j = 0; j < n; ++j) add(x[j], inv_tau, pivot);
      return;
    }
    sum += vector_sum;
    if constexpr (kAbove) above += tree_sum(w_above);
  }
};

// The row's OnlineMass from its threads' over the row's `ctas` CTAs (a cluster): block
// reductions, then every CTA gathers the others' (one remote load per CTA and value) and
// merges them in rank order, the same in every CTA. with_sums: false when only the maximum
// is wanted (the sums are then 0). The caller keeps its CTA resident (row_barrier) until no
// other may still read its sh.cta.
template <int kBlock, bool kAbove>
__device__ OnlineMass<kAbove> row_mass(const OnlineMass<kAbove>& mine, float inv_tau, int ctas, bool with_sums,
                                       RowMassScratch& sh) {
  const float cta_max = block_max<kBlock>(mine.max);
  const float r = mine.max == -INFINITY ? 0.f : tempered_ratio(mine.max, cta_max, inv_tau);
  const float cta_sum = with_sums ? block_sum<kBlock>(mine.sum * r) : 0.f;
  const float cta_above = kAbove ? block_sum<kBlock>(mine.above * r) : 0.f;
  if (threadIdx.x == 0) {
    sh.cta[0] = cta_max;
    sh.cta[1] = cta_sum;
    sh.cta[2] = cta_above;
  }
  row_barrier(ctas);
  if (threadIdx.x < 3 * ctas)
    sh.gathered[threadIdx.x] = __uint_as_float(load_row_shared(&sh.cta[threadIdx.x % 3], threadIdx.x / 3, ctas));
  __syncthreads();
  OnlineMass<kAbove> row;
  for (int c = 0; c < ctas; ++c) row.max = fmaxf(row.max, sh.gathered[3 * c]);
  for (int c = 0; c < ctas; ++c) {
    if (sh.gathered[3 * c] == -INFINITY) continue;
    const float scale = tempered_ratio(sh.gathered[3 * c], row.max, inv_tau);
    row.sum += sh.gathered[3 * c + 1] * scale;
    row.above += sh.gathered[3 * c + 2] * scale;
  }
  return row;
}

// The row's token drawn by truncation_kernel itself, once its threshold is known (kDraw:
// tokens-only calls on few rows, see truncate_and_draw): instead of two more launches
// (sample_kernel with the thresholds, then the finish kernel), each of whose start waited for
// the previous kernel to drain, the row's CTAs race their tiles as sample_kernel does for
// thresholded rows (tile_mass, add_tile; tau = 0: tile_argmax), a lane a tile, and CTA 0's
// warp 0 merges the CTAs' winners and draws inside the winning tile (finish_row). The same
// tile keys as sample_kernel's, so the same tokens but for the order of merges (best_merge
// decides two keys alike in either order). Tiles are dealt to CTAs in whole ranges. Each
// thread keeps a copy of its tile in its slot of the kernel's dynamic shared memory
// (kDrawStageBytes<T>) for tile_mass's rare paths, which read their tile from shared memory (a
// global pointer there made the compiler turn their loads into generic ones in every kernel,
// and changed sample_kernel's code). Called by every thread of every CTA of the row (a
// cluster barrier) once every CTA of the cluster has started (it stores to CTA 0's shared
// memory).
template <typename T, int kBlock>
__device__ void draw_in_truncation(const SampleArgs& a, int64_t row, int rank, int ctas, float tau, float threshold,
                                   uint32_t round) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(T)), kVecs = kTile / kPer, kWarps = kBlock / 32;
  extern __shared__ uint4 draw_stage[];  // (kDrawStageBytes<T>)
  uint4* const tile_copy = draw_stage + threadIdx.x * (kVecs + 1);  // (padded: fewer bank conflicts)
  __shared__ float4 warp_best[kWarps];
  __shared__ float4 cta_best[kMaxRowCtas];  // (in CTA 0: each CTA's winner)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* l = static_cast<const T*>(a.logits) + row * a.ld;
  RowCtx c = row_ctx(a, tau);
  c.threshold = threshold;
  c.round = round;
  const uint64_t seed = row_seed(a, row), offset = row_offset(a, row);
  const int64_t tiles = ceil_div(a.V, kTile), per_cta = ceil_div(tiles, ctas);
  const int64_t t_end = min(tiles, (rank + 1) * per_cta);
  RowState st;
  for (int64_t t = rank * per_cta + threadIdx.x; t < t_end; t += kBlock) {
    const int64_t e0 = t * kTile;
    const bool whole = e0 + kTile <= a.V;
    uint4 q[kVecs];
#pragma unroll
    for (int k = 0; k < kVecs; ++k) q[k] = whole ? ldg_vec(l + e0 + k * kPer) : ldg_vec_tail(l, e0 + k * kPer, a.V);
    if (c.greedy) {
      tile_argmax<T>(q, t, c, st);
      continue;
    }
#pragma unroll
    for (int k = 0; k < kVecs; ++k) tile_copy[k] = q[k];
    float tile_max = -INFINITY, log2_sum = 0.f;
    if (c.threshold == -INFINITY) tile_mass<T, false, false>(q, tile_copy, c, tile_max, log2_sum, st);
    else tile_mass<T, true, false>(q, tile_copy, c, tile_max, log2_sum, st);
    if (tile_max == -INFINITY) continue;  // nothing kept in the tile
    add_tile(st, tile_max, log2_sum, c, tile_noise_word(tile_pair_block(seed, offset, t, c.round), t), t);
  }
  if (c.greedy) {  // the winner slot holds the argmax (a key of frac 0), as in finish_or_write_partial
    st.best_key = TileKey{st.arg_val, 0.f};
    st.best_idx = st.arg_idx;
  }
  // The CTA's winner (warps, then warp 0), then the row's (CTA 0's warp 0, over the CTAs').
  auto as_slot = [](const RowState& s) {
    return make_float4(s.best_key.base, s.best_key.frac, __int_as_float(static_cast<int>(s.best_idx)), 0.f);
  };
  auto merge_slots = [&](const float4* slots, int n) {
    st = RowState();
    if (lane < n) {
      const float4 w = slots[lane];
      st.best_key = TileKey{w.x, w.y};
      st.best_idx = __float_as_int(w.z);
    }
    warp_reduce_key<false>(st.best_key, st.best_idx, c.scale2);
  };
  warp_reduce_key<false>(st.best_key, st.best_idx, c.scale2);
  if (lane == 0) warp_best[warp] = as_slot(st);
  __syncthreads();
  if (warp == 0) {
    merge_slots(warp_best, kWarps);
    if (ctas > 1 && lane == 0) store_cluster_shared(&cta_best[rank], 0, as_slot(st));
  }
  if (ctas > 1) {
    row_barrier(ctas);  // (release / acquire: every CTA's winner is in CTA 0)
    if (rank == 0 && warp == 0) merge_slots(cta_best, ctas);
  }
  if (rank == 0 && warp == 0) finish_row<T, true>(a, row, lane, st, c, seed, offset);
}

// The min-p cut (p >= min_p * p_max, i.e. x >= row_max + tau * ln(min_p)) as the smallest float
// at or above that bound (the sum rounded up), so that x >= it exactly where x >= the bound, as
// on the CPU (in double). Rounded to nearest, the sum fell on the logits' own grid where tau is
// small against |row_max| (logits ~1e9, an ulp of 64, at tau ~100), and half the time kept
// every entry of the value just below the bound.
__device__ __forceinline__ float min_p_threshold(float row_max, float tau, float min_p) {
  return __fadd_ru(row_max, tau * logf(min_p));
}

// Grid: B x ctas CTAs; the `ctas` consecutive CTAs of a row (a cluster when ctas > 1) each
// read one slice of it.
// kDraw: the kernel also draws the row's token (draw_in_truncation; the host then launches no
// draw).
// kRolled: the passes over the row visit each batch's vectors in a loop (see for_row_parts and
// truncate_and_draw).
template <typename T, int kBlock, bool kDraw = false, bool kRolled = false>
__global__ void __launch_bounds__(kBlock, kDraw ? 1 : 1024 / kBlock)
    truncation_kernel(SampleArgs a, float* thresholds, int ctas) {
  __shared__ RadixScratch<kBlock> scratch;
  griddep_wait();  // launched early (PDL): the previous kernel's results
  griddep_launch_dependents();
  const int64_t row = blockIdx.x / ctas;
  const int rank = static_cast<int>(blockIdx.x % ctas);
  if (a.pass == kExactRows && row_marks(a)[row] == 0) return;  // (the whole row: every CTA of its cluster)
  const float tau = row_value(a.temperature, row);
  float threshold = -INFINITY;
  if (!valid_truncation(a, row)) {  // token 0 (see valid_truncation)
    if (rank == 0 && threadIdx.x == 0) {
      thresholds[row] = NAN;
      if (kDraw) a.tokens[row] = 0;
    }
    return;
  }
  if (!(tau > 0.f)) {  // (uniform over the row's CTAs)
    if (rank == 0 && threadIdx.x == 0) thresholds[row] = threshold;
    if constexpr (kDraw) {  // tau = 0: the argmax; an invalid tau: token 0 (as finish_row)
      if (tau == 0.f) {
        row_barrier(ctas);  // (every CTA of the cluster has started: the draw stores to CTA 0)
        draw_in_truncation<T, kBlock>(a, row, rank, ctas, tau, threshold, 0u);
      } else if (rank == 0 && threadIdx.x == 0) {
        a.tokens[row] = 0;
      }
    }
    return;
  }
  // This CTA's slice of the row (16-entry multiples: whole 16-byte vectors).
  const int64_t slice = ceil_div(ceil_div(a.V, ctas), 16) * 16;
  const int64_t begin = min(a.V, rank * slice);
  const int64_t len = min(slice, a.V - begin);
  const T* l = static_cast<const T*>(a.logits) + row * a.ld + begin;
  const float inv_tau = inverse_temperature(tau);
  const float top_p = row_top_p(a, row);
  const bool by_mass = top_p < 1.f;
  const int64_t k = row_value(a.top_k, row);  // (0 when not given)
  const bool by_count = k > 0 && k < a.V;
  const bool rejected = a.pass == kExactRows && top_p_by_rejection(tau, top_p);
  if (by_count)
    for (int i = threadIdx.x; i < kRadixBins; i += kBlock) scratch.hist[i] = 0;
  if (threadIdx.x == 0) scratch.cached = 0;  // (read by every radix pass, used by the third)
  // The first selection's merged sums: zeroed here, and a split cluster barrier around the
  // max pass orders that before any CTA's first add.
  if (ctas > 1) zero_merged_sums(scratch);
  __syncthreads();
  if (ctas > 1) cluster_arrive();
  OnlineMass<false> row_sums, mine;
  if (rejected) {  // top_p_check_kernel found both
    const float2 max_and_sum = row_max_and_sum(a)[row];
    row_sums.max = max_and_sum.x;
    row_sums.sum = max_and_sum.y;
  } else {
    // The row's maximum and, for top-p, the tempered softmax's normaliser in the same pass;
    // for top-k, also the first radix pass's counts (every non-NaN entry, -inf included,
    // counts 1).
    // Two instantiations, so that rows without top-k run the plain max pass (a per-entry test
    // of by_count cost top-p ~10% at B = 256: registers, and spills in the float32 kernels).
    auto max_pass = [&](auto count_tag) {
      BinAdder first_digits{scratch.hist};
      auto count = [&](float x, bool valid) {
        if constexpr (decltype(count_tag)::value)
          if (valid && x == x) first_digits.add(static_cast<int>(to_order_key(x) >> kFirstDigitShift), 1u);
      };
      for_row_parts<kBlock, kRowInFlight, kRolled>(
          l, len,
          [&](float x, bool valid, int64_t) {
            count(x, valid);
            if (!valid) return;
            if (by_mass) mine.add(x, inv_tau);
            else mine.max = fmaxf(mine.max, x);  // (skips NaN)
          },
          [&](const uint4& q, bool valid, int64_t) {
            float x[16 / sizeof(T)];
            vector_entries<T>(q, x);
#pragma unroll
            for (float e : x) count(e, valid);
            if (!valid) return;
            if (by_mass) {
              mine.add_all(x, inv_tau);
            } else {
#pragma unroll
              for (float e : x) mine.max = fmaxf(mine.max, e);  // (skips NaN)
            }
          });
      if constexpr (decltype(count_tag)::value) first_digits.flush();
    };
    if (by_count) max_pass(std::true_type{});
    else max_pass(std::false_type{});
  }
  if (ctas > 1) cluster_wait();  // (see zero_merged_sums above)
  // Top-k alone needs neither the row's maximum nor its normaliser: no merge over the CTAs
  // (its barriers took ~2.5 us: H200, B = 1, fp32 V = 128256).
  if (!rejected && (by_mass || row_value(a.min_p, row) > 0.f))
    row_sums = row_mass<kBlock>(mine, inv_tau, ctas, by_mass, scratch.mass);
  const float row_max = row_sums.max;
  if (by_count) {  // the k-th largest entry (ties at it are all kept)
    threshold = radix_threshold<kBlock, true, kRolled>(l, len, ctas, scratch, [](float) { return 1u; },
                                        [k](unsigned long long) { return static_cast<unsigned long long>(k); },
                                        /*first_pass_filled=*/true);
  }
  if (by_mass && row_max != -INFINITY) {
    // The smallest entry of the top-p mass (of the tempered softmax, among the top-k).
    // Masses are probabilities in fixed point with 2^31 = the whole row (rounded to nearest:
    // the kept mass is within ~V * 2^-32 of the exact one; a float32 cumulative sum over a
    // sorted row errs by ~1e-5), so a row's total stays below 2^32.
    const float scale = 2147483648.f / row_sums.sum;
    const float floor_k = threshold;
    auto mass = [&](float x) {
      return x >= floor_k ? __float2uint_rn(tempered_ratio(x, row_max, inv_tau) * scale) : 0u;
    };
    auto share_of_total = [top_p](unsigned long long total) {
      return static_cast<unsigned long long>(ceil(static_cast<double>(top_p) * static_cast<double>(total)));
    };
    if (by_count && ctas > 1) {  // the second selection: its sums zeroed once the first's are read
      row_barrier(ctas);
      zero_merged_sums(scratch);
      row_barrier(ctas);
    }
    threshold = fmaxf(threshold, radix_threshold<kBlock, false, kRolled>(l, len, ctas, scratch, mass, share_of_total));
  }
  const float min_p = row_value(a.min_p, row);  // (0 when not given)
  if (min_p > 0.f) threshold = fmaxf(threshold, min_p_threshold(row_max, tau, min_p));
  if constexpr (!kDraw) {
    if (rank == 0 && threadIdx.x == 0) {
      thresholds[row] = threshold;
      // A row marked by top_p_check_kernel whose first draw lies in this threshold's set keeps
      // it: near the boundary this set decides, not the check's float32 sums (see there).
      if (rejected && load_logit(l - begin + a.tokens[row]) >= threshold) row_marks(a)[row] = 0;
    }
    row_barrier(ctas);  // no CTA leaves while another may still read its shared memory
  } else {
    // The same, then the draw (round 1: a redraw after a rejected first draw), whose cluster
    // barrier keeps the CTAs resident.
    const bool keeps_first_draw = rejected && load_logit(l - begin + a.tokens[row]) >= threshold;
    if (rank == 0 && threadIdx.x == 0) thresholds[row] = threshold;
    if (keeps_first_draw) {
      row_barrier(ctas);
      return;
    }
    draw_in_truncation<T, kBlock>(a, row, rank, ctas, tau, threshold, rejected ? 1u : 0u);
  }
}

// Top-p by rejection, the test of the first draw (see SamplePass): the drawn token j lies in
// the top-p set iff the tempered mass A of the entries strictly above it is below top_p times
// the whole Z (the set holds every entry x >= t, t the largest logit whose entries at or above
// it reach the share). One pass: an online maximum with both sums relative to it. Marks the
// rows that need the threshold (1): rows not drawn yet (top_p_threshold_at_once), and draws
// that are not clearly inside the set, A >= top_p * Z * (1 - check_margin); 0: the first
// draw is the token. The margin covers the rounding of these float32 sums and of the
// threshold's fixed-point masses, so that every draw kept here lies in the threshold's set;
// for the marked rows truncation_kernel finds the threshold and keeps the draw if it lies in
// its set (rare near the boundary), else the row is drawn again from that set. Also stores
// each row's maximum and Z. Launched like truncation_kernel (same grid, clusters).
// (The unused float* keeps truncation_kernel's signature: truncation_launch launches both.)
__device__ __forceinline__ float check_margin(int64_t V, int64_t readers) {
  // Worst cases: the float32 sums A and Z (each thread's V / readers terms, then ~log2(readers)
  // merges: relative error <= n * 2^-24 each), the exps (a few ulps), and the fixed-point
  // masses (each within 2^-32 of the whole: <= V * 2^-32 over A and Z against top_p >= 0.5).
  const float per_thread = static_cast<float>(V / readers + 32);
  return 0x1p-16f + per_thread * 0x1p-23f + static_cast<float>(V) * 0x1p-30f;
}

template <typename T, int kBlock>
__global__ void __launch_bounds__(kBlock, 1024 / kBlock) top_p_check_kernel(SampleArgs a, float*, int ctas) {
  // float32 rows in 256-thread CTAs (many rows): 8 loads in flight per thread, not 4 (H100,
  // graph of 20, top-p 0.9: B = 1024 545 -> 504 us, V = 256000 1051 -> 938; 16-bit rows and
  // the 1024-thread CTAs lost 1-7%).
  constexpr int kInFlight = sizeof(T) == 4 && kBlock == kThreads ? 8 : 4;
  __shared__ RowMassScratch scratch;
  griddep_wait();  // launched early (PDL): the tokens of the first draw
  griddep_launch_dependents();
  const int64_t row = blockIdx.x / ctas;
  const int rank = static_cast<int>(blockIdx.x % ctas);
  const float tau = row_value(a.temperature, row), top_p = row_top_p(a, row);
  if (!top_p_by_rejection(tau, top_p) || !valid_truncation(a, row)) {
    // drawn once for good (tau = 0, top-p off), or not drawn yet, or invalid (to truncation)
    if (rank == 0 && threadIdx.x == 0)
      row_marks(a)[row] = top_p_threshold_at_once(tau, top_p) || !valid_truncation(a, row) ? 1 : 0;
    return;
  }
  const int64_t slice = ceil_div(ceil_div(a.V, ctas), 16) * 16;  // (as truncation_kernel)
  const int64_t begin = min(a.V, rank * slice);
  const int64_t len = min(slice, a.V - begin);
  const T* row_logits = static_cast<const T*>(a.logits) + row * a.ld;
  const float token_logit = load_logit(row_logits + a.tokens[row]);
  const float inv_tau = inverse_temperature(tau);
  OnlineMass<true> mine;
  for_row_parts<kBlock, kInFlight>(
      row_logits + begin, len,
      [&](float x, bool valid, int64_t) {
        if (valid) mine.add(x, inv_tau, token_logit);
      },
      [&](const uint4& q, bool valid, int64_t) {
        float x[16 / sizeof(T)];
        vector_entries<T>(q, x);
        if (valid) mine.add_all(x, inv_tau, token_logit);
      });
  const OnlineMass<true> whole = row_mass<kBlock>(mine, inv_tau, ctas, true, scratch);
  if (rank == 0 && threadIdx.x == 0) {
    // (+inf logits: the sums count the +inf entries only, so only a drawn +inf entry passes.)
    row_marks(a)[row] = whole.above < top_p * whole.sum * (1.f - check_margin(a.V, kBlock * ctas)) ? 0 : 1;
    row_max_and_sum(a)[row] = make_float2(whole.max, whole.sum);
  }
  row_barrier(ctas);  // no CTA leaves while another may still read its shared memory
}

// Launches a sampling kernel, on sm_90+ as a programmatic dependent launch: it gets resident
// while the kernel before it in the stream still runs, and waits (griddep_wait, before any
// global access) until that kernel's results are visible, so the launch latency overlaps the
// previous kernel's tail (the finish kernel's overlaps the main kernel's last CTAs).
// cluster: CTAs form thread-block clusters of that shape (one CTA: none).
template <typename... Params, typename... Args>
cudaError_t launch(const SampleArgs& a, dim3 cluster, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, Args... args) {
  cudaLaunchAttribute attr[2];
  unsigned n = 0;
  if (a.sm90) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster.x * cluster.y * cluster.z > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = cluster.x;
    attr[n].val.clusterDim.y = cluster.y;
    attr[n++].val.clusterDim.z = cluster.z;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = n;
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

// A per-device value (>= 0) that `ask` finds for the current device, asked once per device and
// cached in `known` (0: not asked yet, else the value + 1; devices past the 64th are asked each
// time); -1 when the current device cannot be found.
template <typename Ask>
int per_device(std::atomic<int> (&known)[64], Ask ask) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return -1;
  }
  if (device < 64 && known[device] != 0) return known[device] - 1;
  const int value = ask();
  if (device < 64) known[device] = value + 1;
  return value;
}

// Allows `kernel` `bytes` of dynamic shared memory (an attribute needed above 48 KB).
template <typename Kernel>
cudaError_t set_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// How many clusters of `ctas` CTAs (2, 4, 8 or kMaxRowCtas) of kBlockThreads threads (and
// kSmem bytes of dynamic shared memory) of kKernel the device holds at once (0: none, or no
// such clusters), asked once per kernel, size and device (for 16, which also allows the
// kernel such clusters). Clusters of 4 and 8 of the 1024-thread CTAs fit far fewer than
// 132 / size times on an H200 (30 and 15; 66 of 2, 7 of 16): a cluster's CTAs must share a
// GPC.
template <auto kKernel, int kBlockThreads = kTruncationThreadsFewRows, size_t kSmem = 0>
int row_clusters_that_fit(int ctas) {
  static std::atomic<int> known[4][64] = {};  // (sizes 2, 4, 8, 16)
  const int size_index = ctas == 2 ? 0 : ctas == 4 ? 1 : ctas == 8 ? 2 : 3;
  const int clusters = per_device(known[size_index], [ctas] {
    int n = 0;
    if (set_dynamic_smem(kKernel, kSmem) == cudaSuccess &&
        (ctas <= kPortableRowCtas ||
         cudaFuncSetAttribute(kKernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess)) {
      cudaLaunchAttribute attr;
      attr.id = cudaLaunchAttributeClusterDimension;
      attr.val.clusterDim.x = static_cast<unsigned>(ctas);
      attr.val.clusterDim.y = 1;
      attr.val.clusterDim.z = 1;
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(static_cast<unsigned>(ctas));
      cfg.blockDim = dim3(kBlockThreads);
      cfg.dynamicSmemBytes = kSmem;
      cfg.attrs = &attr;
      cfg.numAttrs = 1;
      if (cudaOccupancyMaxActiveClusters(&n, kKernel, &cfg) != cudaSuccess) n = 0;
    }
    (void)cudaGetLastError();
    return n;
  });
  return clusters < 0 ? 0 : clusters;
}

// Whether truncation_launch gives the rows 1024-thread CTAs (few rows, or the rows the top-p
// check marked).
bool truncation_few_rows(const SampleArgs& a) { return a.B <= a.num_sms || a.pass == kExactRows; }

// Launches `kernel` (truncation_kernel or top_p_check_kernel) with `ctas` CTAs of `threads`
// per row: a cluster when ctas > 1, else (or when no such cluster fits, e.g. on a small MIG
// slice) one CTA per row. smem: dynamic shared memory, which the caller has allowed the kernel
// (set_dynamic_smem).
template <typename Kernel>
cudaError_t launch_truncation_rows(const SampleArgs& a, float* thresholds, cudaStream_t stream, Kernel kernel,
                                   int threads, int ctas, size_t smem = 0) {
  for (int c = ctas; c > 1; c = c > kPortableRowCtas ? kPortableRowCtas : 1) {  // (16, then 8)
    if (launch(a, c, kernel, dim3(static_cast<unsigned>(a.B * c)), dim3(threads), smem, stream, a, thresholds, c) ==
        cudaSuccess)
      return cudaSuccess;
    (void)cudaGetLastError();
  }
  return launch(a, 1, kernel, dim3(static_cast<unsigned>(a.B)), dim3(threads), smem, stream, a, thresholds, 1);
}

// The few-rows plan (truncation_few_rows): on sm_90 up to 8 CTAs of kBlockThreads per row (a
// cluster) while the grid stays within one CTA per SM and the clusters all fit at once (16
// where those do; see row_clusters_that_fit).
template <auto kKernel, int kBlockThreads, size_t kSmem = 0>
int few_rows_ctas(const SampleArgs& a) {
  // kExactRows: usually a few of the rows (those top_p_check_kernel marked), so each gets as
  // many CTAs as keep the grid, mostly CTAs that exit at once, within ~16 waves.
  const int64_t max_grid = a.pass == kExactRows ? 16 * static_cast<int64_t>(a.num_sms) : a.num_sms;
  int ctas = 1;
  // Only sizes whose clusters all fit at once: a second wave costs more than the smaller split
  // (H200, per decode-like step, bf16 V = 128256, the same tokens: top-k 50 at B = 16 in
  // clusters of 4 instead of 8 38.9 -> 25.9 us, B = 32 in clusters of 2 instead of 4 45.0 ->
  // 36.0; top-p 0.9 with log-probs B = 16 58.0 -> 44.0, B = 32 67.3 -> 61.6). Rows marked by
  // the check: most of their clusters exit at once, so not all need to fit.
  while (a.clusters && ctas < kPortableRowCtas && a.B * ctas * 2 <= max_grid &&
         (a.pass == kExactRows || a.B <= row_clusters_that_fit<kKernel, kBlockThreads, kSmem>(ctas * 2)))
    ctas *= 2;
  // Clusters of 16 where every row's fits at once (H200, per decode-like step, B = 1, V =
  // 128256: top-p 0.9 with log-probs fp32 42.0 -> 37.4 us, bf16 47.7 -> 44.2, top-k 50 and
  // top-p fp32 -0.7; B = 8 in 8 such clusters, which did not all fit, lost: top-k 30.6 ->
  // 53.8 us).
  if (ctas == kPortableRowCtas && a.B * kMaxRowCtas * 2 <= max_grid &&
      a.B <= row_clusters_that_fit<kKernel, kBlockThreads, kSmem>(kMaxRowCtas))
    ctas = kMaxRowCtas;
  return ctas;
}

// Launches the truncation kernel (kCheck: top_p_check_kernel, which reads rows the same way):
// few rows get 1024-thread CTAs, several per row (few_rows_ctas); more rows get
// kThreads-thread CTAs, on sm_90 2 per row up to twice as many rows as SMs.
template <typename T, bool kCheck = false>
cudaError_t truncation_launch(const SampleArgs& a, float* thresholds, cudaStream_t stream) {
  if (!truncation_few_rows(a)) {
    // Up to 4 such CTAs share an SM. Up to twice as many rows as SMs left half of those places
    // empty, and each pass was then bound by too few loads in flight: there a row is split
    // over a cluster of 2 CTAs (all resident at once). (H100, graph of 20, top-p 0.9: fp32
    // B = 256, V = 256000 861 -> 530 us, bf16 V = 128256 413 -> 246; top-k B = 256 -32…37%.
    // Clusters of 8, to keep the rows in flight within L2, lost: bf16 B = 1024 top-p 886 ->
    // 1204 us.)
    return launch_truncation_rows(a, thresholds, stream,
                                  kCheck ? top_p_check_kernel<T, kThreads> : truncation_kernel<T, kThreads>, kThreads,
                                  a.clusters && a.B <= 2 * static_cast<int64_t>(a.num_sms) ? 2 : 1);
  }
  constexpr auto kernel = kCheck ? top_p_check_kernel<T, kTruncationThreadsFewRows>
                                 : truncation_kernel<T, kTruncationThreadsFewRows>;
  return launch_truncation_rows(a, thresholds, stream, kernel, kTruncationThreadsFewRows,
                                few_rows_ctas<kernel, kTruncationThreadsFewRows>(a));
}

// log p(token | tau_k) for K temperatures in one pass over the row: each thread keeps the
// largest finite image (finite_logit) of its non-NaN entries with the K tempered sums
// relative to it, rescaled when it grows (at most once per 16-byte vector), and the first
// index of the row's largest entry (for tau = 0); then block reductions. (Two passes, the
// maximum first, then the sums in a loop over all 16 temperature slots an entry, took 750 us
// against 178: H200, bf16 B = 1024, V = 128256, K = 4.) kMaxK: 4 or 16 temperatures at most
// (the loops over them unroll).
template <typename T, int kMaxK>
__global__ void __launch_bounds__(kThreads) temperature_logprobs_kernel(TemperatureLogprobArgs a) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));
  const int64_t row = blockIdx.x;
  const int K = static_cast<int>(a.K);
  const T* l = static_cast<const T*>(a.logits) + row * a.ld;
  float scale2[kMaxK];  // log2(e) / tau; 0 for tau = 0 (and past K): those sums stay unused
#pragma unroll
  for (int k = 0; k < kMaxK; ++k)
    scale2[k] = k < K && a.temperatures[k] > 0.f ? inverse_temperature(a.temperatures[k]) * kLog2e : 0.f;
  float arg_val = -INFINITY;
  int64_t arg_idx = -1;
  float top = -INFINITY;  // this thread's largest finite image so far
  float sums[kMaxK];
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) sums[k] = 0.f;
  auto track_argmax = [&](float x, int64_t v) {  // (entries in increasing index order: the first maximum wins)
    if (x == x && (arg_idx < 0 || x > arg_val)) {  // NaN: never the argmax
      arg_val = x;
      arg_idx = v;
    }
  };
  auto raise_top = [&](float m) {
    if (!(m > top)) return;
    if (top > -INFINITY)
#pragma unroll
      for (int k = 0; k < kMaxK; ++k) sums[k] *= fast_exp2((top - m) * scale2[k]);
    top = m;
  };
  // Adds the n entries' images f (NaN as -inf) once top is at least their maximum.
  auto add_terms = [&](const auto& f) {
    if (top == -INFINITY) return;  // (only -inf so far)
#pragma unroll
    for (int k = 0; k < kMaxK; ++k) {
      if (k >= K) break;
      if (scale2[k] == 0.f) continue;
      constexpr int n = std::extent_v<std::remove_reference_t<decltype(f)>>;
      float e[n];
#pragma unroll
      for (int j = 0; j < n; ++j) e[j] = fast_exp2((f[j] - top) * scale2[k]);
      if constexpr (n == 1) sums[k] += e[0];
      else sums[k] += tree_sum(e);
    }
  };
  auto image = [](float x) { return x == x ? finite_logit(x) : -INFINITY; };
  for_row_parts<kThreads, 4>(
      l, a.V,
      [&](float x, bool valid, int64_t v) {
        if (!valid) return;
        track_argmax(x, v);
        const float f[1] = {image(x)};
        raise_top(f[0]);
        add_terms(f);
      },
      [&](const uint4& q, bool valid, int64_t first) {
        if (!valid) return;
        float x[kPer], f[kPer];
        vector_entries<T>(q, x);
        float m = -INFINITY;
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          track_argmax(x[j], first + j);
          f[j] = image(x[j]);
          m = fmaxf(m, f[j]);
        }
        raise_top(m);
        add_terms(f);
      });
  RowState st;
  st.arg_val = arg_val;
  st.arg_idx = arg_idx;
  st = block_reduce(st, 1.f, 1.f);  // (only the argmax fields are set)
  const int64_t row_arg = st.arg_idx;  // (in warp 0, whose thread 0 writes the outputs)
  const float m = block_max(top);  // the row's largest finite image (-inf: no finite entry)
  const int64_t token = a.tokens[row];
  // (an out-of-range token: NaN; a NaN logit counts as -inf, so its log-prob is -inf)
  const bool in_range = token >= 0 && token < a.V;
  const float token_logit = in_range ? load_logit(l + token) : 0.f;
  const float lt = !in_range ? NAN : token_logit != token_logit ? -INFINITY : finite_logit(token_logit);
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) {
    if (k >= K) break;
    const float share = top > -INFINITY ? sums[k] * fast_exp2((top - m) * scale2[k]) : 0.f;
    const float total = block_sum(share);
    if (threadIdx.x == 0) {
      const float tau = a.temperatures[k];
      // NaN: an invalid tau (not checked on the host) or a row of -inf / NaN (row_arg is then the
      // first non-NaN entry, or -1), as on the CPU.
      a.out[row * a.K + k] = !valid_temperature(tau) || !(m > -INFINITY) ? NAN
                             : tau > 0.f ? (lt - m) / tau - logf(total)
                                         : (token == row_arg ? 0.f : -INFINITY);
    }
  }
}

// Rows of whole 16-byte vectors, as sample_kernel loads them.
bool rows_aligned(DType dtype, const void* logits, int64_t ld) {
  const int64_t row_bytes = ld * static_cast<int64_t>(dtype_size(dtype));
  return row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0;
}

template <typename T, bool kVec>
cudaError_t finish_launch(const SampleArgs& a, const float* thresholds, int warps, cudaStream_t stream) {
  return launch(a, 1, sample_finish_kernel<T, kVec>, dim3(static_cast<unsigned>(a.B)), dim3(32), 0, stream, a,
                thresholds, a.splits * warps);
}

// The tokens-only sample_kernel: 16-bit rows race bounded tiles where a warp holds two batches or
// more (several_batches; with one batch a warp, H100, per decode-like step: bf16 B = 1 5.4 ->
// 6.0 us, B = 8 4.9 -> 5.3).
template <typename T, bool kCluster>
auto tokens_only_kernel(bool several_batches) {
  if constexpr (sizeof(T) == 2)
    if (several_batches) return sample_kernel<T, kCluster, true, true>;
  return sample_kernel<T, kCluster, true>;
}

template <typename T>
cudaError_t sample_aligned_launch(const SampleArgs& a, const float* thresholds, cudaStream_t stream) {
  constexpr int kVecs = kTile * static_cast<int>(sizeof(T)) / 16;
  const int64_t batches = ceil_div(ceil_div(a.V, kTile), kBatchTiles);
  const int64_t per_split = ceil_div(batches, a.splits);  // whole batches (see sample_splits)
  auto warps_up_to = [&](int threads) { return static_cast<int>(per_split < threads / 32 ? per_split : threads / 32); };
  auto smem_for = [&](int warps) { return static_cast<size_t>(warps) * kBatchTiles * (kVecs + 1) * sizeof(uint4); };
  const dim3 grid(static_cast<unsigned>(a.B), static_cast<unsigned>(a.splits));
  const int64_t tiles_per_split = per_split * kBatchTiles;
  const bool tokens_only = !a.need_logprobs && thresholds == nullptr;
  if (a.clusters && use_cluster_merge(a.B, a.splits, a.num_sms)) {  // a row's splits merge in a cluster
    const int cwarps = warps_up_to(a.splits == 2 ? kClusterThreads : kThreads);
    const size_t cluster_smem = smem_for(cwarps) + 2 * sizeof(float4) * static_cast<size_t>(a.splits * cwarps) +
                                (tokens_only ? sizeof(uint64_t) : 0);  // (the mbarrier)
    const auto kernel = tokens_only ? tokens_only_kernel<T, true>(per_split > cwarps) : sample_kernel<T, true, false>;
    // (fp32: 70 KB with 8 warps, 140 KB with 16, + partials)
    const cudaError_t err = set_dynamic_smem(kernel, cluster_smem);
    if (err == cudaSuccess && launch(a, dim3(1, a.splits), kernel, grid, dim3(cwarps * 32), cluster_smem, stream, a,
                                     thresholds, tiles_per_split) == cudaSuccess)
      return cudaSuccess;
    (void)cudaGetLastError();  // no room for such clusters (e.g. a small MIG slice): the finish kernel
  }
  const int warps = warps_up_to(kThreads);  // (the workspace holds 8 warps' partials per split)
  const size_t smem = smem_for(warps);
  const auto kernel = tokens_only ? tokens_only_kernel<T, false>(per_split > warps) : sample_kernel<T, false, false>;
  cudaError_t err = set_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  err = launch(a, 1, kernel, grid, dim3(warps * 32), smem, stream, a, thresholds, tiles_per_split);
  if (err != cudaSuccess || a.splits == 1) return err;  // one split: the CTA drew the token
  return finish_launch<T, true>(a, thresholds, warps, stream);
}

template <typename T, bool kVec>
cudaError_t sample_unaligned_launch(const SampleArgs& a, const float* thresholds, cudaStream_t stream) {
  const int64_t tiles_per_split = ceil_div(ceil_div(a.V, kTile), a.splits);
  const cudaError_t err = launch(a, 1, sample_unaligned_kernel<T, kVec>, dim3(static_cast<unsigned>(a.B), a.splits),
                                 dim3(kThreads), 0, stream, a, thresholds, tiles_per_split);
  if (err != cudaSuccess || a.splits == 1) return err;  // one split: the CTA drew the token
  return finish_launch<T, kVec>(a, thresholds, kThreads / 32, stream);
}

template <typename T>
cudaError_t draw_launch(const SampleArgs& a, const float* thresholds, cudaStream_t stream) {
  if (rows_aligned(a.dtype, a.logits, a.ld)) return sample_aligned_launch<T>(a, thresholds, stream);
  const uintptr_t base = reinterpret_cast<uintptr_t>(a.logits);
  const bool vec = a.ld % 4 == 0 && base % (4 * sizeof(T)) == 0;  // 8-byte loads (16-bit types)
  return vec ? sample_unaligned_launch<T, true>(a, thresholds, stream)
             : sample_unaligned_launch<T, false>(a, thresholds, stream);
}

// The truncation kernel, then the draw. Tokens-only calls with rows aligned as sample_kernel
// reads them, on truncation's few-rows path (float32: see kOneBatchSliceEntries): the
// truncation kernel draws the tokens itself (draw_in_truncation, a lane a tile, in
// kTruncationThreadsDraw-thread CTAs) and no draw is launched where each CTA of a row holds at
// most kMaxDrawTiles tiles, or kMaxMarkedDrawTiles for the rows top_p_check_kernel marked
// (usually few: most CTAs exit at once, and the draw's no-op launch is saved). (H200, per
// decode-like step, bf16 V = 128256, the same tokens: top-k 50 at B = 1 23.4 -> 21.1 us, B = 8
// 23.8 -> 21.3; tokens-only top-p 0.9 B = 8 39.3 -> 37.7, B = 64 53.0 -> 47.1, and B = 8, V =
// 256000, where no row is marked, 17.0 -> 15.2. With ~500 tiles a CTA or more it lost: top-k
// B = 16 25.8 -> 28.3, B = 64 38.4 -> 43.4, as sample_kernel reads such rows faster;
// tokens-only top-p at B = 1024, V = 256000, 2000 tiles a CTA of a marked row, 462 -> 496 us in
// a graph of 20.)
constexpr int64_t kMaxDrawTiles = kTruncationThreadsDraw / 2;
constexpr int64_t kMaxMarkedDrawTiles = 2 * kTruncationThreadsDraw;
// Where each CTA's slice of the row is one batch of loads (kRowInFlight vectors a thread: B <= 8
// at V = 128256), a warp runs each pass's code once, so it waited largely on instruction fetch
// (Nsight Compute, B = 8: 31% of the cycles between issues), and the kRolled kernel, whose
// visits are a loop, draws sooner. (H200, per decode-like step, bf16 V = 128256, the same
// tokens: top-k 50 at B = 1 21.1 -> 18.3 us, B = 4 21.7 -> 18.9, B = 8 21.5 -> 20.5; fp16 B = 8
// 21.7 -> 20.7; tokens-only top-p 0.9 at B = 8 with a marked row level. The 1024-thread
// threshold kernel rolled too gained ~0.5 us at B = 1 and 4 with log-probs but lost where its
// slices are several batches: top-k 50 B = 16 25.7 -> 26.1 us, B = 64 38.2 -> 38.6, top-k 50 +
// top-p 0.9 B = 64 65.1 -> 66.7, top-p with log-probs B = 64 62.9 -> 64.8; both loops in one
// kernel, chosen per call, lost everywhere (larger code, spills: B = 1 18.3 -> 19.4); float32
// rows rolled spilled 40-108 bytes and lost 1.4 us at B = 8, top-p 0.9.)
// (Ordinary passes draw here only with at most kMaxDrawTiles tiles a CTA, one batch; the rows
// top_p_check_kernel marked may have up to four batches a CTA, and where they do they keep the
// unrolled kernel: at V = 128256 above ~260 rows. Marked rows rolled, tokens-only top-p 0.9: B =
// 8 and 64 level.)
// Float32 rows draw here only where a CTA's slice is one batch too (clusters of 16 at V =
// 128256: B <= 4, and rows marked by the check while 16-CTA clusters fit for them all). (H200,
// per decode-like step, fp32 V = 128256, the same tokens: top-k 50 at B = 1 23.5 -> 21.8 us,
// tokens-only top-p 0.9 at B = 1 16.0 -> 13.6. Where the slices are two batches the 512-thread
// passes lost more than the saved draw launch: top-k 50 at B = 8 25.9 -> 26.4, top-p 0.9 at B = 8
// with a marked row 41.2 -> 44.0; at B = 8, V = 256000 with no row marked it gained, 18.9 ->
// 17.3, only by the draw's no-op launch.)
template <typename T>
constexpr int64_t kOneBatchSliceEntries = kTruncationThreadsDraw * kRowInFlight * (16 / sizeof(T));

template <typename T>
cudaError_t truncate_and_draw(const SampleArgs& a, float* thresholds, cudaStream_t stream) {
  if (!a.need_logprobs && truncation_few_rows(a) && rows_aligned(a.dtype, a.logits, a.ld)) {
    constexpr auto kernel = truncation_kernel<T, kTruncationThreadsDraw, true>;
    constexpr size_t smem = kDrawStageBytes<T>;
    if (set_dynamic_smem(kernel, smem) != cudaSuccess) {
      // too little shared memory a CTA (16-bit: sm_86 / sm_89; float32: sm_80 too): the separate draw
      (void)cudaGetLastError();
    } else {
      const int ctas = few_rows_ctas<kernel, kTruncationThreadsDraw, smem>(a);
      const bool one_batch = ceil_div(a.V, ctas) <= kOneBatchSliceEntries<T>;
      if ((sizeof(T) == 2 || one_batch) &&
          ceil_div(ceil_div(a.V, kTile), ctas) <= (a.pass == kExactRows ? kMaxMarkedDrawTiles : kMaxDrawTiles)) {
        auto chosen = kernel;
        if constexpr (sizeof(T) == 2) {  // (float32 rolled spilled: see above)
          // (asking whether its clusters fit also allows the rolled kernel the shared memory and
          // the cluster size: its resources are the same)
          constexpr auto rolled = truncation_kernel<T, kTruncationThreadsDraw, true, true>;
          if (ctas > 1 && one_batch && row_clusters_that_fit<rolled, kTruncationThreadsDraw, smem>(ctas) > 0)
            chosen = rolled;
        }
        return launch_truncation_rows(a, thresholds, stream, chosen, kTruncationThreadsDraw, ctas, smem);
      }
    }
  }
  const cudaError_t err = truncation_launch<T>(a, thresholds, stream);
  return err != cudaSuccess ? err : draw_launch<T>(a, thresholds, stream);
}

template <typename T>
cudaError_t sample_typed(const SampleArgs& a, cudaStream_t stream) {
  if (!a.top_k.given && !a.top_p.given && !a.min_p.given) return draw_launch<T>(a, nullptr, stream);
  float* thresholds = row_thresholds(a);
  if (a.top_k.given || a.min_p.given || a.need_logprobs)  // the threshold for every row, then the draw
    return truncate_and_draw<T>(a, thresholds, stream);
  // Top-p alone: by rejection (see SamplePass).
  SampleArgs first = a, second = a;
  first.pass = kRejectionDraw;
  second.pass = kExactRows;
  cudaError_t err = draw_launch<T>(first, nullptr, stream);
  if (err == cudaSuccess) err = truncation_launch<T, true>(a, thresholds, stream);
  return err != cudaSuccess ? err : truncate_and_draw<T>(second, thresholds, stream);
}

template <typename T>
cudaError_t temperature_logprobs_launch(const TemperatureLogprobArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.B));
  if (a.K <= 4) temperature_logprobs_kernel<T, 4><<<grid, kThreads, 0, stream>>>(a);
  else temperature_logprobs_kernel<T, 16><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

bool sm90_kernels() {
  static std::atomic<int> known[64] = {};
  return per_device(known, [] {
           cudaFuncAttributes attr;
           const cudaError_t err = cudaFuncGetAttributes(&attr, sample_kernel<float, false, false>);
           if (err != cudaSuccess) (void)cudaGetLastError();  // (no code for this device: the launch reports it)
           return err == cudaSuccess && attr.ptxVersion >= 90 ? 1 : 0;  // (sm_90+ code runs only on sm_90+ devices)
         }) == 1;
}

int sample_splits(DType dtype, const void* logits, int64_t ld, int64_t B, int64_t V, int num_sms, bool clusters) {
  if (rows_aligned(dtype, logits, ld)) {
    // Unit of work: a warp batch of 32 tiles. Enough warps for ~16 per SM (64-128 KB of loads
    // in flight) with up to 16 batches per warp: fewer, longer CTAs, so large batches run in
    // fewer waves (H100, graph: bf16 B = 256..1024 5-10% faster than with at most 4, fp32 and
    // B <= 64 unchanged); whole batches per split; small grids get CTAs of fewer warps so
    // that they still cover the SMs (B = 1, V = 128256: 63 one-warp CTAs; B = 64: 4 splits
    // of 8 warps x 2 batches, with clusters 2 of 16 warps x 2; B = 256: one 8-warp CTA per row).
    const int64_t batches = ceil_div(ceil_div(V, kTile), kBatchTiles);
    int64_t rounds = ceil_div(B * batches, 16 * static_cast<int64_t>(num_sms));
    rounds = rounds < 1 ? 1 : (rounds > 16 ? 16 : rounds);
    const int64_t warps_per_row = ceil_div(batches, rounds);
    int64_t warps_per_cta = B * warps_per_row / num_sms;
    warps_per_cta = warps_per_cta < 1 ? 1 : (warps_per_cta > kThreads / 32 ? kThreads / 32 : warps_per_cta);
    int64_t s = ceil_div(warps_per_row, warps_per_cta);
    // A cluster's worth of splits of full CTAs, where that lets the row's CTAs merge in a
    // cluster instead of a finish kernel (B = 8, V = 128256: 8 CTAs of 8 warps instead of
    // 21 of 3): one batch per warp, or two while the grid covers at most half the SMs (H100:
    // V = 256000 B = 8 gained 8.7 -> 7.2 us with two, B = 16 lost 8.8 -> 9.2).
    const int64_t per_warp = 2 * B * kMaxClusterSplits <= num_sms ? 2 : 1;
    if (clusters && s > kMaxClusterSplits && batches <= per_warp * kMaxClusterSplits * (kThreads / 32) &&
        use_cluster_merge(B, kMaxClusterSplits, num_sms))
      s = kMaxClusterSplits;
    // Batches of one to two CTAs per SM (B = 45 .. 66 on 132 SMs): two CTAs of up to 16 warps
    // per row (one CTA per SM) with at most four batches per warp (V <= 262144), merged in a
    // cluster of two (H100, graph of 20: B = 64, V = 128256, bf16 9.7 -> 9.2 us, with
    // log-probs 12.8 -> 12.3; H200, per decode-like step, V = 256000 against four 8-warp
    // splits and the finish kernel: bf16 11.6-11.9 -> 9.8-10.3, fp32 23.7 -> 20.7-20.9).
    // 16-warp CTAs in larger clusters lost (bf16 B = 16, V = 256000 in 8 such CTAs: 8.7 ->
    // 11.9 us; B = 32, V = 128256 in 4: 8.1 -> 11.5), as one CTA per SM leaves fewer places
    // for a cluster.
    if (clusters && num_sms / B == 2 && use_cluster_merge(B, 2, num_sms) && batches <= 2 * 4 * kClusterThreads / 32)
      s = 2;
    s = ceil_div(batches, ceil_div(batches, s));  // no empty splits
    return static_cast<int>(s > 65535 ? 65535 : s);
  }
  // Unaligned fallback: several waves of CTAs (no half-empty last wave), but at least 2048
  // entries per CTA (a warp's 32 lanes own 32 tiles of 64 entries).
  const int64_t by_occupancy = (8 * static_cast<int64_t>(num_sms) + B - 1) / B;
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
    case DType::kFloat32: return temperature_logprobs_launch<float>(a, stream);
    case DType::kBFloat16: return temperature_logprobs_launch<__nv_bfloat16>(a, stream);
    case DType::kFloat16: return temperature_logprobs_launch<__half>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace sampling_cuda
}  // namespace fusedlm
