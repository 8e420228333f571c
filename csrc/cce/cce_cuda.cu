// Cut Cross-Entropy CUDA kernels (ATen-free).
//
// Forward: each CTA owns 128 rows of e and a contiguous range of vocabulary tiles (a
// "split"; tiles are 256 wide on Hopper, 128 with mma.sync); logit tiles come from the
// tensor-core main loop and are folded, in registers, into a per-row online log-sum-exp
// (base 2), a logit sum and the target logit. Per-split partials [2, splits, N] are merged
// by a small kernel. Extra memory: O(N x splits) floats. On Hopper the forward runs in
// clusters of two CTAs (adjacent row tiles, same split) that multicast each classifier tile
// to both (TMA), halving its L2 -> SM traffic. When a backward follows, the Hopper forward
// also records each row's largest logit per 256-wide tile (tile_max).
//
// Backward, with a filter: target_keep_kernel marks the rows whose target entry the filter
// keeps (by its gradient), and keep_hint_kernel the (128 x 256) tiles that may hold any kept
// entry (from tile_max and the LSE). Then, per vocabulary chunk of `vocab_chunk` entries
// (bounded workspace):
//  1. grad_tile_kernel recomputes the hinted logit tiles (128 x 256 on Hopper), forms
//     g = grad_lse * softmax + grad_sum + grad_target * onehot (x softcap derivative) in
//     float32 and stores it (in the input dtype; on Hopper through shared memory and TMA
//     stores) to the workspace, unless every softmax entry of a block is below filter_eps
//     and it holds no kept target: then the block is marked skipped in tile_mask (as are the
//     tiles the hint rules out). Blocks are the 64 x 64 quadrants of each 128 x 128 tile when
//     the Hopper dE / dC kernels follow, else whole 128 x 128 tiles.
//  2. dE[N, D]  += G[N, chunk] @ C[chunk, D]   (float32 accumulator buffer)
//  3. dC[chunk, D] = G[N, chunk]^T @ E[N, D]   (float32 in registers)
//     (grad_e_kernel / grad_c_kernel on mma.sync; on Hopper grad_ec_wgmma_kernel runs the dE
//     and dC tiles of a chunk in one grid: fewer partly filled waves.) Both loop only over
//     128 x 128 tiles with a kept block (block-sparse; on Hopper each consumer warpgroup also
//     skips the 64-wide steps whose quadrant of its 64 output rows was skipped) and each output
//     tile has exactly one owner CTA. dE of the chunks after the first is added to the buffer (on Hopper by TMA
//     reductions in L2: the CTA does not wait for the old values): one add per entry per
//     launch, launches in chunk order, so the results are deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <type_traits>

#include <cudaTypedefs.h>

#include "../common/convert.cuh"
#include "../common/fast_math.cuh"
#include "../dispatch.h"
#include "filter.h"
#include "tile_mma.cuh"
#include "tile_wgmma.cuh"

namespace fusedlm {
namespace cce_cuda {

bool wgmma_available() {
#if defined(FUSEDLM_HAS_SM90A)
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return major == 9;
#else
  return false;
#endif
}

namespace {

using tile::kK;
using tile::kM;
using tile::kMTiles;
using tile::kN;
using tile::kNTiles;
using tile::kThreads;

static_assert(kTileRows == kM && kTileVocab == kN, "tile sizes must agree");

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ float from_float(float x) { return x; }

// Stores two adjacent values (p is 2-element aligned).
__device__ __forceinline__ void store_pair(__nv_bfloat16* p, float x, float y) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(x, y);
}
__device__ __forceinline__ void store_pair(__half* p, float x, float y) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(x, y);
}
__device__ __forceinline__ void store_pair(float* p, float x, float y) {
  *reinterpret_cast<float2*>(p) = make_float2(x, y);
}

// tanh from one exp2 and one fast division: absolute error a few 1e-8 and a fraction of
// tanhf's code, which the epilogues would inline for every accumulator entry.
__device__ __forceinline__ float tanh_small_code(float x) {
  const float t = exp2f(-2.f * kLog2e * fabsf(x));  // in (0, 1]
  return copysignf(__fdividef(1.f - t, 1.f + t), x);
}

// Row / column of accumulator entry (mt, nt, r) inside the 128x128 tile.
__device__ __forceinline__ int acc_row(int warp_m, int lane, int mt, int r) {
  return warp_m * tile::kWarpM + mt * 16 + lane / 4 + (r >= 2 ? 8 : 0);
}
__device__ __forceinline__ int acc_col(int warp_n, int lane, int nt, int r) {
  return warp_n * tile::kWarpN + nt * 8 + 2 * (lane % 4) + (r & 1);
}

// Grouped rasterisation of a 1-D grid over (row tile, column tile): consecutive CTAs take
// kRowGroup row tiles x all column tiles before moving on, so the CTAs resident at one time
// touch few row blocks of e (which they re-read for every vocabulary tile) and share each
// classifier tile: both stay in L2 instead of streaming from DRAM.
constexpr int kRowGroup = 16;
// Output tiles a gradient-tile CTA recomputes at most (see tiles_per_cta).
constexpr int kMaxTilesPerCta = 8;
__device__ __forceinline__ void grouped_tile(int64_t linear, int64_t row_tiles, int64_t col_tiles,
                                             int64_t& row_tile, int64_t& col_tile,
                                             int row_group = kRowGroup) {
  const int64_t per_group = row_group * col_tiles;
  const int64_t group = linear / per_group, rest = linear % per_group;
  const int64_t left = row_tiles - group * row_group;
  const int64_t rows_here = left < row_group ? left : row_group;
  row_tile = group * row_group + rest % rows_here;
  col_tile = rest / rows_here;
}

// Main-loop policy for "NT" tiles (both operands K-major) on warp-level mma.sync (sm_80+).
// Interface shared with wg::WgmmaNt: the accumulator shape, the row / column of each entry,
// which of kColGroups warps share a row, and run(), which calls done(tile) with the complete
// accumulator of each output tile; after run() returns the accumulator holds the last tile.
template <typename T>
struct SyncNt {
  static constexpr int kMTiles = tile::kMTiles, kNTiles = tile::kNTiles, kColGroups = 4;
  static constexpr int kKStep = tile::kK, kBlockN = tile::kN;
  static constexpr bool kUsesTma = false;
  static constexpr int kClusterSize = 1;
  static constexpr int kThreadsPerCta = kThreads, kMinCtasPerSm = 1;
  static constexpr int kRowGroups = 2;  // warps holding the same columns (warp_m)
  static constexpr int smem_bytes() { return tile::smem_bytes<T, true, true>(); }
  __device__ static bool is_consumer() { return true; }
  __device__ static int consumer_index() { return threadIdx.x; }
  __device__ static float* bias_scratch(char*) { return nullptr; }  // reads global directly
  __device__ static void sync_consumers() { __syncthreads(); }
  __device__ static bool sync_consumers_or(bool p) { return __syncthreads_or(p); }
  __device__ static int row_group() { return threadIdx.x / 128; }
  // The pipeline ends with a barrier, so epilogue reductions may reuse its stages.
  __device__ static float* scratch(char* smem) { return reinterpret_cast<float*>(smem); }
  __device__ static int row(int mt, int r) { return acc_row(threadIdx.x / 128, threadIdx.x % 32, mt, r); }
  __device__ static int col(int nt, int r) { return acc_col((threadIdx.x / 32) % 4, threadIdx.x % 32, nt, r); }
  __device__ static int col_group() { return (threadIdx.x / 32) % 4; }

  template <typename Coords, typename Done>
  __device__ static void run(float (&acc)[kMTiles][kNTiles][4], char* smem, const T* a,
                             int64_t a_rows, int64_t a_row0, const T* b, int64_t b_rows,
                             int64_t D, int n_tiles, int k_steps, Coords&& coords, Done&& done) {
    tile::zero(acc);
    auto load = [&](T* sa, T* sb, int step) {
      int64_t b_row0, k0;
      coords(step, b_row0, k0);
      tile::load_tile<T, true>(sa, a, D, a_row0, k0, a_rows, D);
      tile::load_tile<T, true>(sb, b, D, b_row0, k0, b_rows, D);
    };
    const int steps = n_tiles * k_steps;
    tile::pipeline<T, true, true>(acc, smem, steps, load, [&](int step) {
      if (step % k_steps != k_steps - 1) return;
      done(step / k_steps, acc);
      if (step + 1 < steps) tile::zero(acc);  // the final tile stays readable after run()
    });
  }
};

// Adds the bias to the logits of one output tile. Hopper (TMA) main loops stage the tile's
// bias in shared memory once (per-entry global loads get hoisted into registers by the
// compiler and spill next to a 128 x 256 accumulator); the mma.sync path reads it directly
// (its done() runs while other warps still use the pipeline's shared memory).
template <typename Mainloop, typename T>
struct TileBias {
  const T* bias;   // nullptr: no bias
  float* staged;   // Mainloop::bias_scratch
  int v0, V;
  __device__ void stage() {
    if constexpr (Mainloop::kUsesTma) {
      if (bias == nullptr) return;
      Mainloop::sync_consumers();  // every consumer is done with the previous tile's values
      for (int c = Mainloop::consumer_index(); c < Mainloop::kBlockN; c += 256)  // consumers
        staged[c] = v0 + c < V ? to_float(bias[v0 + c]) : 0.f;
      Mainloop::sync_consumers();
    }
  }
  // Bias of column `col` of the tile (0 when there is none or the column is out of range).
  __device__ float at(int col) const {
    if (bias == nullptr) return 0.f;
    if constexpr (Mainloop::kUsesTma) return staged[col];
    return v0 + col < V ? to_float(bias[v0 + col]) : 0.f;
  }
};

// A logit tile entry: the accumulator plus the bias (kBias), softcapped (kSoftcap).
template <bool kSoftcap, bool kBias, typename Bias>
__device__ __forceinline__ float tile_logit(float acc, const Bias& bias, int col, float cap, float inv_cap) {
  float z = acc;
  if constexpr (kBias) z += bias.at(col);
  if constexpr (kSoftcap) z = cap * tanh_small_code(z * inv_cap);
  return z;
}
// Slope of the softcap at the softcapped logit z: 1 - (z / cap)^2.
__device__ __forceinline__ float softcap_slope(float z, float inv_cap) {
  const float t = z * inv_cap;
  return 1.f - t * t;
}
// Whether a row passes any gradient back (else all its entries' gradients are zero).
__device__ __forceinline__ bool row_has_gradient(float g_lse, float g_target, float g_sum) {
  return g_lse != 0.f || g_target != 0.f || g_sum != 0.f;
}

// Merge two base-2 online log-sum-exp states (max, sum of 2^(x - max)).
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) return;
  s = s * exp2f(m - mx) + s2 * exp2f(m2 - mx);
  m = mx;
}

// Runs a main-loop policy: TMA policies take tensor maps, the others raw pointers.
template <typename Mainloop, typename T, typename Acc, typename Coords, typename Done>
__device__ __forceinline__ void run_mainloop(Acc& acc, char* smem, const wg::TmaMaps& maps,
                                             const T* a, int64_t a_rows, int64_t a_row0,
                                             const T* b, int64_t b_rows, int64_t D, int n_tiles,
                                             int k_steps, Coords&& coords, Done&& done) {
  if constexpr (Mainloop::kUsesTma) {
    Mainloop::run(acc, smem, maps, n_tiles, k_steps, [&](int step) {
      int64_t b_row0, k0;
      coords(step, b_row0, k0);
      return wg::StepCoords{a_row0, k0, b_row0, k0};
    }, done);
  } else {
    Mainloop::run(acc, smem, a, a_rows, a_row0, b, b_rows, D, n_tiles, k_steps, coords, done);
  }
}

// Whether a forward main loop can record ForwardArgs::tile_max itself: its tiles must be
// kTileMaxWidth wide with each row's columns in one quad of lanes. (Otherwise the host fills
// tile_max with a huge bound: nothing is skipped early.)
template <typename Mainloop>
constexpr bool kRecordsTileMax = Mainloop::kColGroups == 1 && Mainloop::kBlockN == kTileMaxWidth;

// kSoftcap and kBias are template parameters (not runtime branches per accumulator entry)
// to keep the fully unrolled epilogues small: instruction-cache misses dominate otherwise.
template <typename T, typename Mainloop, bool kSoftcap, bool kBias>
__global__ void __launch_bounds__(Mainloop::kThreadsPerCta, Mainloop::kMinCtasPerSm)
    forward_kernel(ForwardArgs a, int tiles_per_split, const __grid_constant__ wg::TmaMaps maps) {
  extern __shared__ __align__(128) char smem[];
  constexpr int MT = Mainloop::kMTiles, NT = Mainloop::kNTiles, KS = Mainloop::kKStep;
  constexpr int BN = Mainloop::kBlockN;  // vocabulary entries per tile
  const float inv_cap = kSoftcap ? 1.f / a.softcap : 0.f;
  const T* bias = static_cast<const T*>(a.bias);
  int64_t row_tile, split_index;
  if constexpr (Mainloop::kClusterSize == 2) {
    // A cluster (consecutive CTAs) takes two adjacent row tiles of one split: it shares the
    // classifier tiles. With an odd row-tile count the last cluster's second CTA has no rows.
    int64_t pair;
    grouped_tile(blockIdx.x / 2, ((a.N + kM - 1) / kM + 1) / 2, a.splits, pair, split_index, kRowGroup / 2);
    row_tile = 2 * pair + blockIdx.x % 2;
  } else {
    static_assert(Mainloop::kClusterSize == 1, "clusters of 1 or 2 CTAs");
    grouped_tile(blockIdx.x, (a.N + kM - 1) / kM, a.splits, row_tile, split_index);
  }
  const int64_t row0 = row_tile * kM;
  const int split = static_cast<int>(split_index);
  const int64_t vocab_tiles = (a.V + BN - 1) / BN;
  const int64_t vt_begin = static_cast<int64_t>(split) * tiles_per_split;
  const int64_t vt_end = min(vt_begin + tiles_per_split, vocab_tiles);
  const int n_tiles = vt_end > vt_begin ? static_cast<int>(vt_end - vt_begin) : 0;
  const int k_steps = static_cast<int>((a.D + KS - 1) / KS);
  const int lane = threadIdx.x % 32;

  // Each (consumer) thread owns MT x 2 row slots and keeps their running statistics.
  const bool consumer = Mainloop::is_consumer();
  int target[MT][2];  // -1 when the row is out of range or its target is not a class
  float run_max[MT][2], run_sum[MT][2], run_zsum[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = consumer ? row0 + Mainloop::row(mt, 2 * h) : a.N;
      const int64_t y = row < a.N ? a.targets[row] : -1;
      target[mt][h] = (y >= 0 && y < a.V) ? static_cast<int>(y) : -1;
      run_max[mt][h] = -INFINITY;
      run_sum[mt][h] = 0.f;
      run_zsum[mt][h] = 0.f;
    }

  float acc[MT][NT][4];
  auto coords = [&](int step, int64_t& b_row0, int64_t& k0) {
    b_row0 = (vt_begin + step / k_steps) * BN;
    k0 = static_cast<int64_t>(step % k_steps) * KS;
  };
  // The epilogue of one tile, per accumulator entry: (bias,) (softcap,) the logit sum, the
  // range mask, the tile maximum; then one FFMA + ex2 + FADD into the running sum. Column
  // indices are relative to the thread's first column (both main loops put two adjacent
  // columns per 8-wide n-tile in each thread), so the range test compares a register with
  // a constant. Entries past V read as zero (zero-filled operands, zero staged bias), so
  // the logit sum needs no mask.
  auto done = [&](int tile_index, float(&acc)[MT][NT][4]) {
    const int v0 = static_cast<int>((vt_begin + tile_index) * BN);  // V < 2^31 (host check)
    const int V = static_cast<int>(a.V);
    TileBias<Mainloop, T> tile_bias{bias, Mainloop::bias_scratch(smem), v0, V};
    if constexpr (kBias) tile_bias.stage();
    const int first_col = v0 + Mainloop::col(0, 0);
    const int cols_left = V - first_col;  // relative columns c < cols_left are in range
    float thread_tile_max[MT][2];  // over this thread's columns of the row
    bool holds_target = false;     // some row's target is among this thread's columns here
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // Four independent partial maxima / sums: dependency chains of 16, not 64, entries.
        float part_max[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
        float part_zsum[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int q = 0; q < 2; ++q) {  // branch-free per entry, small code
            const int r = 2 * h + q, c = nt * 8 + q, j = (nt & 1) * 2 + q;
            float z = tile_logit<kSoftcap, kBias>(acc[mt][nt][r], tile_bias, Mainloop::col(nt, r), a.softcap,
                                                  inv_cap);
            part_zsum[j] += z;  // 0 past V
            z = c < cols_left ? z : -INFINITY;
            acc[mt][nt][r] = z;  // the logit, for the sum below and the target
            part_max[j] = fmaxf(part_max[j], z);
          }
        }
        run_zsum[mt][h] += (part_zsum[0] + part_zsum[1]) + (part_zsum[2] + part_zsum[3]);
        const float tile_max = fmaxf(fmaxf(part_max[0], part_max[1]), fmaxf(part_max[2], part_max[3]));
        const int t_col = target[mt][h] - first_col;
        holds_target |= t_col >= 0 && t_col < NT * 8 && (t_col & 6) == 0;
        thread_tile_max[mt][h] = tile_max;
        if (tile_max == -INFINITY) continue;
        const float new_max = fmaxf(run_max[mt][h], tile_max * kLog2e);  // base 2
        float part_sum[4] = {run_sum[mt][h] * exp2f(run_max[mt][h] - new_max), 0.f, 0.f, 0.f};
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int q = 0; q < 2; ++q)
            part_sum[(nt & 1) * 2 + q] += fast_exp2(fmaf(acc[mt][nt][2 * h + q], kLog2e, -new_max));
        run_sum[mt][h] = (part_sum[0] + part_sum[1]) + (part_sum[2] + part_sum[3]);
        run_max[mt][h] = new_max;
      }
    }
    if (holds_target) {  // rare (a row's target is in one tile of the row): off the hot path
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int t_col = target[mt][h] - first_col;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int q = 0; q < 2; ++q)
              if (nt * 8 + q == t_col) a.target_logit[row0 + Mainloop::row(mt, 2 * h)] = acc[mt][nt][2 * h + q];
        }
    }
    if constexpr (kRecordsTileMax<Mainloop>) {
      // After the loops (the accumulator is dead): only two more registers live in them.
      if (a.tile_max != nullptr) {  // only when a backward will follow (uniform branch)
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // a quad of lanes holds a row's columns
          float m = fmaxf(thread_tile_max[0][h], __shfl_xor_sync(0xffffffffu, thread_tile_max[0][h], 1));
          m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
          const int64_t row = row0 + Mainloop::row(0, 2 * h);
          if (lane % 4 == 0 && row < a.N) a.tile_max[row * tile_max_cols(a.V) + v0 / BN] = m;
        }
      }
    }
  };
  run_mainloop<Mainloop>(acc, smem, maps, static_cast<const T*>(a.e), a.N, row0,
                         static_cast<const T*>(a.c), a.V, a.D, n_tiles, k_steps, coords, done);
  if (!consumer) return;  // a TMA producer warpgroup is done once it has issued its loads

  // Reduce the 4 lanes that share a row, then the warps that hold other columns of it.
  constexpr int G = Mainloop::kColGroups;
  float* red = Mainloop::scratch(smem);  // [3][G][kM]
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float m = run_max[mt][h], s = run_sum[mt][h], zs = run_zsum[mt][h];
#pragma unroll
      for (int off = 1; off <= 2; off <<= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
        const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
        zs += __shfl_xor_sync(0xffffffffu, zs, off);
        lse_merge(m, s, m2, s2);
      }
      if (lane % 4 == 0) {
        const int r = Mainloop::row(mt, 2 * h);
        const int g = Mainloop::col_group();
        red[(0 * G + g) * kM + r] = m;
        red[(1 * G + g) * kM + r] = s;
        red[(2 * G + g) * kM + r] = zs;
      }
    }
  Mainloop::sync_consumers();
  if (Mainloop::consumer_index() < kM) {
    const int r = Mainloop::consumer_index();
    float m = -INFINITY, s = 0.f, zs = 0.f;
    for (int g = 0; g < G; ++g) {
      lse_merge(m, s, red[(0 * G + g) * kM + r], red[(1 * G + g) * kM + r]);
      zs += red[(2 * G + g) * kM + r];
    }
    const int64_t row = row0 + r;
    if (row < a.N) {
      a.partials[static_cast<int64_t>(split) * a.N + row] =
          m == -INFINITY ? -INFINITY : (m + log2f(s)) * kLn2;
      a.partials[(static_cast<int64_t>(a.splits) + split) * a.N + row] = zs;
    }
  }
}

__global__ void forward_combine_kernel(ForwardArgs a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= a.N) return;
  float m = -INFINITY;
  for (int s = 0; s < a.splits; ++s) m = fmaxf(m, a.partials[static_cast<int64_t>(s) * a.N + row]);
  float sum = 0.f, zs = 0.f;
  for (int s = 0; s < a.splits; ++s) {
    const float part = a.partials[static_cast<int64_t>(s) * a.N + row];
    if (part != -INFINITY) sum += expf(part - m);
    zs += a.partials[(static_cast<int64_t>(a.splits) + s) * a.N + row];
  }
  float lse = m + logf(sum);
  // The tile maxima skip NaN logits (fmaxf), so a row of NaN logits folds to -inf: its
  // logit sum carries the NaN into the log-sum-exp (as torch.logsumexp and the CPU kernel).
  if (zs != zs) lse = NAN;
  const int64_t y = a.targets[row];
  if (y == a.ignore_index) {
    a.target_logit[row] = 0.f;
  } else if (y < 0 || y >= a.V) {
    // Out-of-range target: poison the row (NaN loss) rather than read out of bounds.
    lse = NAN;
    a.target_logit[row] = NAN;
  }
  a.lse[row] = lse;
  a.logit_sum[row] = zs;
}

// ---------------------------------------------------------------------------------------
// Backward

struct ChunkInfo {
  int64_t v0;          // first vocabulary entry of the chunk
  int chunk_tiles;     // 128-wide vocabulary tiles in this chunk
  int64_t ws_ld;       // leading dimension of the workspace (= vocab_chunk)
  int row_tiles;
  bool first_chunk;
  int tiles_per_cta;   // output tiles per gradient-tile CTA (consecutive, same rows)
  // The Hopper dE / dC kernels follow: gradient tiles are kept or skipped per 64 x 64
  // quadrant (else per 128 x 128 tile, all of which the mma.sync GEMMs read).
  bool quadrants;
};

// tile_mask entry of a tile kept whole (all four quadrants).
constexpr uint16_t kWholeTile = 0x0303;

// Sets target_keep[row] to 1 where the row's target entry is one the filter keeps: judged
// by its gradient from the forward's target logit (the same value the tiles recompute);
// without that logit, every target with a gradient. (Every row is written.)
__global__ void target_keep_kernel(BackwardArgs a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= a.N) return;
  const float g_l = a.grad_lse[row], g_t = a.grad_target[row], g_s = a.grad_sum[row];
  const int64_t y = a.targets[row];
  bool keep = y >= 0 && y < a.V && row_has_gradient(g_l, g_t, g_s);
  if (keep && a.target_logit != nullptr)
    keep = !target_negligible(g_l, g_t, expf(a.target_logit[row] - a.lse[row]), a.filter_eps);
  a.target_keep[row] = keep;
}

// Marks the (row tile, kTileMaxWidth-wide vocabulary tile) pairs that may hold an entry the
// filter keeps: a kept target (target_keep) or a softmax entry >= filter_eps, bounded with
// the forward's per-row tile maxima by exp(tile_max - lse). The bound is loosened by 1%
// (0.01 in log units; the forward and the recomputation run the same main loop, so their
// logits differ by a few float32 roundings at most) so that the hint never drops a tile the
// exact per-entry test in grad_tile_kernel keeps: with or without the hint, the kept tiles
// and the gradients are the same. (A factor e kept ~99% of the tiles of random logits at
// the Gemma shape against ~6% that hold an entry above the filter.) One CTA of kM threads
// per row tile and kM vocabulary tiles.
__global__ void __launch_bounds__(kM) keep_hint_kernel(BackwardArgs a) {
  __shared__ float threshold[kM];  // per row: a tile may matter if its max logit reaches this
  __shared__ int64_t target_tile[kM];  // per row: the hint tile of its kept target, or -1
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kM;
  {
    const int64_t row = row0 + threadIdx.x;
    float thr = INFINITY;
    int64_t t_tile = -1;
    if (row < a.N) {
      const float g_l = a.grad_lse[row], g_t = a.grad_target[row], g_s = a.grad_sum[row];
      if (row_has_gradient(g_l, g_t, g_s))  // else nothing of the row is kept
        thr = a.lse[row] + logf(a.filter_eps) - 0.01f;  // filter_eps == 0: -inf, all kept
      if (a.target_keep[row]) t_tile = a.targets[row] / kTileMaxWidth;
    }
    threshold[threadIdx.x] = thr;
    target_tile[threadIdx.x] = t_tile;
  }
  __syncthreads();
  const int64_t W = tile_max_cols(a.V);
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kM + threadIdx.x;
  if (w >= W) return;
  bool keep = false;
  const int rows = static_cast<int>(a.N - row0 < kM ? a.N - row0 : kM);
  for (int i = 0; i < rows; ++i)  // coalesced: neighbouring threads read neighbouring tiles
    keep |= !(a.tile_max[(row0 + i) * W + w] < threshold[i]) ||  // NaN (loss or bound): kept
            target_tile[i] == w;
  a.keep_hint[static_cast<int64_t>(blockIdx.y) * W + w] = keep;
}

// Whether the hint lets output tile t (vocabulary entries [v_begin, v_begin + kWidth)) of a
// CTA's range hold a kept entry, for every tile of the range: all flags are loaded before any
// is tested (one memory round trip; a loop of early exits waited for each load in turn).
template <int kWidth, int kMaxTiles>
__device__ __forceinline__ unsigned hinted_tiles(const BackwardArgs& a, int64_t row_tile, int64_t v_first,
                                                 int n_tiles) {
  static_assert(kWidth <= kTileMaxWidth, "a tile spans at most two hint columns");
  const uint8_t* hint = a.keep_hint + row_tile * tile_max_cols(a.V);
  uint8_t flag[kMaxTiles][2];
#pragma unroll
  for (int t = 0; t < kMaxTiles; ++t) {  // predicated loads, no branches between them
    const int64_t v_begin = v_first + static_cast<int64_t>(t) * kWidth;
    const int64_t f0 = v_begin / kTileMaxWidth, f1 = (min(v_begin + kWidth, a.V) - 1) / kTileMaxWidth;
    flag[t][0] = t < n_tiles ? hint[f0] : 0;
    flag[t][1] = t < n_tiles && f1 != f0 ? hint[f1] : 0;
  }
  unsigned keeps = 0;
#pragma unroll
  for (int t = 0; t < kMaxTiles; ++t) keeps |= (flag[t][0] | flag[t][1]) ? 1u << t : 0u;
  return keeps;
}

// Position of the n-th (from 0) set bit of mask.
__device__ __forceinline__ int nth_set_bit(unsigned mask, int n) {
  for (int i = 0; i < n; ++i) mask &= mask - 1;  // clear the lowest set bit
  return __ffs(mask) - 1;
}

// Bytes of shared memory a main loop sets aside for staging output tiles (TMA stores).
template <typename Mainloop>
__host__ __device__ constexpr int staging_bytes() {
  if constexpr (Mainloop::kUsesTma) return Mainloop::kStagingBytes;
  return 0;
}
// One staging buffer of the gradient-tile epilogue: 128 rows x 64 16-bit columns (each warp
// stores its 16 rows of it as one TMA box).
constexpr int kStoreBoxBytes = kM * 64 * 2;

// Two 16-bit values as the register stmatrix takes (the first in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float x, float y) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(x, y);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// Writes columns [64 b, 64 b + 64) of this warp's 16 accumulator rows as 16-bit values into a
// box of 128-byte rows in the 128-byte swizzle the TMA expects (16-byte chunk c of row r at
// chunk c ^ (r % 8)). stmatrix .x4: lane l addresses row l % 8 of matrix l / 8 (matrices: n-tiles
// nt, nt + 1, rows 0-7 and 8-15 of each); `row` is that row's index in the box.
template <typename T, int NT>
__device__ __forceinline__ void stmatrix_box(char* box, int row, const float (&acc)[1][NT][4], int b) {
  const int half = threadIdx.x % 32 / 16;  // this lane's matrix is in n-tile nt + half
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int nt = b * 8 + 2 * j, chunk = 2 * j + half;
    wg::stmatrix_x4(tile::smem_addr(box + row * 128 + ((chunk ^ (row % 8)) << 4)),
                    pack_pair<T>(acc[0][nt][0], acc[0][nt][1]), pack_pair<T>(acc[0][nt][2], acc[0][nt][3]),
                    pack_pair<T>(acc[0][nt + 1][0], acc[0][nt + 1][1]),
                    pack_pair<T>(acc[0][nt + 1][2], acc[0][nt + 1][3]));
  }
}
// The box row stmatrix_box's lane addresses, for a warp whose rows start at box row warp_row0.
__device__ __forceinline__ int stmatrix_row(int warp_row0) {
  const int lane = threadIdx.x % 32;
  return warp_row0 + (lane / 8 % 2) * 8 + lane % 8;
}

template <typename T, typename Mainloop, bool kSoftcap, bool kBias>
__global__ void __launch_bounds__(Mainloop::kThreadsPerCta, Mainloop::kMinCtasPerSm)
    grad_tile_kernel(BackwardArgs a, ChunkInfo ck, const __grid_constant__ wg::TmaMaps maps,
                     const __grid_constant__ CUtensorMap g_store) {
  extern __shared__ __align__(128) char smem[];
  // Staged: the tile of g goes through shared memory and TMA stores (see the epilogue).
  constexpr bool kStaged = staging_bytes<Mainloop>() >= 2 * kStoreBoxBytes;
  constexpr int MT = Mainloop::kMTiles, NT = Mainloop::kNTiles, KS = Mainloop::kKStep;
  const T* bias = static_cast<const T*>(a.bias);
  const float inv_cap = kSoftcap ? 1.f / a.softcap : 0.f;
  // Output tiles are BN wide: kHalves 128-wide vocabulary tiles (the workspace's and
  // tile_mask's tiles). Skips are decided per 64 x 64 quadrant of a 128 x 128 tile where the
  // Hopper dE / dC kernels follow (ck.quadrants: each consumer warpgroup votes on its own 64
  // rows and each 64-column unit), else per 128 x 128 tile. A thread keeps a flag per unit:
  // 64 columns (8 n-tiles) with the Hopper main loop, 128 with mma.sync.
  constexpr int BN = Mainloop::kBlockN, kHalves = BN / kN;
  constexpr int kUnits = Mainloop::kUsesTma ? BN / 64 : kHalves, kNtPerUnit = NT / kUnits;
  // Each CTA owns one row tile and tiles_per_cta consecutive output tiles of the chunk.
  const int wide_tiles = (ck.chunk_tiles + kHalves - 1) / kHalves;
  const int col_groups = (wide_tiles + ck.tiles_per_cta - 1) / ck.tiles_per_cta;
  int64_t row_tile, col_group;
  grouped_tile(blockIdx.x, ck.row_tiles, col_groups, row_tile, col_group);
  const int64_t row0 = row_tile * kM;
  const int first = static_cast<int>(col_group) * ck.tiles_per_cta;  // in output tiles
  const int jt0 = first * kHalves;                                   // in 128-wide tiles
  const int n_range = min(ck.tiles_per_cta, wide_tiles - first);     // <= kMaxTilesPerCta
  // The tiles of the range to recompute (bit t: output tile t). With the forward's hint, the
  // others cannot hold an entry the filter keeps: they are marked skipped without the GEMM.
  unsigned todo = (1u << n_range) - 1;
  if (a.keep_hint != nullptr) {
    todo = hinted_tiles<BN, kMaxTilesPerCta>(a, row_tile, ck.v0 + static_cast<int64_t>(jt0) * kN, n_range);
    for (int t = 0; t < n_range; ++t) {
      if (todo & (1u << t)) continue;
      const int jt = jt0 + t * kHalves;
      for (int hf = 0; hf < kHalves; ++hf)
        if (threadIdx.x == 0 && jt + hf < ck.chunk_tiles)
          a.tile_mask[static_cast<int64_t>(row_tile) * ck.chunk_tiles + jt + hf] = 0;
    }
  }
  const int n_tiles = __popc(todo);
  if (n_tiles == 0) return;  // (the whole CTA)
  const int k_steps = static_cast<int>((a.D + KS - 1) / KS);
  const int lane = threadIdx.x % 32;

  // Per-row inputs of this thread's rows, the same for all the CTA's tiles: loaded once.
  const bool consumer = Mainloop::is_consumer();
  float lse2[MT][2], g_lse[MT][2], g_tgt[MT][2], g_sum[MT][2];
  int target[MT][2];  // -1 when the row is out of range or its target is not a class
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = consumer ? row0 + Mainloop::row(mt, 2 * h) : a.N;
      const bool valid = row < a.N;
      lse2[mt][h] = valid ? a.lse[row] * kLog2e : 0.f;
      g_lse[mt][h] = valid ? a.grad_lse[row] : 0.f;
      g_tgt[mt][h] = valid ? a.grad_target[row] : 0.f;
      g_sum[mt][h] = valid ? a.grad_sum[row] : 0.f;
      const int64_t y = valid ? a.targets[row] : -1;
      target[mt][h] = (y >= 0 && y < a.V) ? static_cast<int>(y) : -1;
    }
  // Rows without a gradient (ignored targets, padding) keep no entry: a CTA with none but
  // those marks its tiles skipped without recomputing them.
  bool any_gradient = false;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) any_gradient |= row_has_gradient(g_lse[mt][h], g_tgt[mt][h], g_sum[mt][h]);
  if (!__syncthreads_or(any_gradient)) {
    for (int t = threadIdx.x; t < n_range * kHalves; t += blockDim.x)
      if (jt0 + t < ck.chunk_tiles) a.tile_mask[static_cast<int64_t>(row_tile) * ck.chunk_tiles + jt0 + t] = 0;
    return;
  }

  float acc[MT][NT][4];
  auto coords = [&](int step, int64_t& b_row0, int64_t& k0) {
    b_row0 = ck.v0 + static_cast<int64_t>(jt0 + nth_set_bit(todo, step / k_steps) * kHalves) * kN;
    k0 = static_cast<int64_t>(step % k_steps) * KS;
  };
  unsigned pending = todo;  // the consumers' tiles still to come
  int stored_boxes = 0;     // TMA store boxes issued so far (staged epilogue)
  // Without a filter (exact mode; no target mask then) every tile half in the chunk is kept:
  // no consumer-wide vote per tile, so the two consumer warpgroups are never made to wait for
  // each other in the epilogue (with the per-warp stores below).
  const bool vote_per_tile = a.filter_eps >= 0.f;
  // Runs on the consumer threads once tile t's accumulator is complete. (With TMA it runs
  // inside the main loop so that the accumulator is never live in the producer warpgroup.)
  auto epilogue = [&](int t, float(&acc)[MT][NT][4]) {
    (void)t;  // tiles come in order: the lowest bit of `pending` left is this one
    const int jt = jt0 + (__ffs(pending) - 1) * kHalves;  // its first 128-wide tile
    pending &= pending - 1;
    const int v0 = static_cast<int>(ck.v0) + jt * kN;  // V < 2^31 (host check)
    const int V = static_cast<int>(a.V);
    TileBias<Mainloop, T> tile_bias{bias, Mainloop::bias_scratch(smem), v0, V};
    // (The bias scratch shares the staging buffers: every warp's stores of the last tile must
    // have read them; stage() starts with a consumer barrier.)
    if constexpr (kStaged && kBias)
      if (lane == 0) wg::bulk_wait_read<0>();
    if constexpr (kBias) tile_bias.stage();
    // Relative column c = nt * 8 + q of this thread is vocabulary entry first_col + c.
    const int first_col = v0 + Mainloop::col(0, 0);
    const int cols_left = V - first_col;  // c < cols_left: in range
    unsigned keep = 0;  // bit u: unit u of this thread's rows is kept (one register)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float g_l = g_lse[mt][h], g_t = g_tgt[mt][h], g_s = g_sum[mt][h];
        const bool has_grad = row_has_gradient(g_l, g_t, g_s);
        const int t_col = target[mt][h] - first_col;
        const bool holds_target = t_col >= 0 && t_col < NT * 8 && (t_col & 6) == 0;
        if (has_grad && !holds_target && cols_left >= NT * 8) {
          // The common row: every column in range, no target entry among them. Per entry
          // one FFMA + ex2 for p, one FFMA for g and one max for the keep test (the
          // general loop below needs ~3x the instructions).
          float p_max[kUnits];
#pragma unroll
          for (int u = 0; u < kUnits; ++u) p_max[u] = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int q = 0; q < 2; ++q) {
              const int r = 2 * h + q;
              const float z = tile_logit<kSoftcap, kBias>(acc[mt][nt][r], tile_bias, Mainloop::col(nt, r),
                                                          a.softcap, inv_cap);
              const float p = fast_exp2(fmaf(z, kLog2e, -lse2[mt][h]));
              p_max[nt / kNtPerUnit] = fmaxf(p_max[nt / kNtPerUnit], p);
              float g = fmaf(g_l, p, g_s);
              if constexpr (kSoftcap) g *= softcap_slope(z, inv_cap);
              acc[mt][nt][r] = g;
            }
          }
#pragma unroll
          for (int u = 0; u < kUnits; ++u)
            // (fmaxf skips NaN: a NaN or +inf logit makes the row's log-sum-exp NaN or inf and
            // its softmax NaN: such a row is kept whole.)
            keep |= static_cast<unsigned>(a.filter_eps < 0.f || p_max[u] >= a.filter_eps ||
                                          !(fabsf(lse2[mt][h]) < INFINITY)) << u;
          continue;
        }
        // Rows with a target entry here, columns past V or no gradient: entry by entry. The
        // target entry is judged by its gradient (target_keep, read only for these rows), the
        // others by their softmax as above. (Any thread of the row may mark the target's unit:
        // the votes OR over the rows' threads.)
        const int t_rel = target[mt][h] - v0;  // the target's column in the tile
        if (a.target_keep != nullptr && t_rel >= 0 && t_rel < BN && a.target_keep[row0 + Mainloop::row(mt, 2 * h)])
          keep |= 1u << (t_rel / (BN / kUnits));
        float p_max[kUnits];
#pragma unroll
        for (int u = 0; u < kUnits; ++u) p_max[u] = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const int r = 2 * h + q;
            const int v = v0 + Mainloop::col(nt, r);  // 32-bit: smaller epilogue code
            const bool live = has_grad && v < V;  // branch-free per entry (selects)
            const float z = tile_logit<kSoftcap, kBias>(acc[mt][nt][r], tile_bias, Mainloop::col(nt, r),
                                                        a.softcap, inv_cap);
            const float p = fast_exp2(fmaf(z, kLog2e, -lse2[mt][h]));
            const bool is_target = v == target[mt][h];
            float g = g_l * p + g_s + (is_target ? g_t : 0.f);
            if constexpr (kSoftcap) g *= softcap_slope(z, inv_cap);
            p_max[nt / kNtPerUnit] = fmaxf(p_max[nt / kNtPerUnit], live && !is_target ? p : -INFINITY);
            acc[mt][nt][r] = live ? g : 0.f;
          }
        }
#pragma unroll
        for (int u = 0; u < kUnits; ++u)
          keep |= static_cast<unsigned>(a.filter_eps < 0.f || p_max[u] >= a.filter_eps ||
                                        (has_grad && !(fabsf(lse2[mt][h]) < INFINITY))) << u;
      }
    }
#pragma unroll
    for (int hf = 0; hf < kHalves; ++hf) {
      // A half past the chunk's end (odd tile count) belongs to no one: never written.
      const bool in_range = jt + hf < ck.chunk_tiles;
      uint16_t* mask = a.tile_mask + static_cast<int64_t>(row_tile) * ck.chunk_tiles + jt + hf;
      constexpr int kPer = kUnits / kHalves;  // units per half: 2 (Hopper) or 1
      constexpr unsigned kHalfBits = (1u << kPer) - 1;
      unsigned bits = keep >> (kPer * hf) & kHalfBits;
      if (!vote_per_tile) {
        bits = kHalfBits;
      } else if (kPer == 2 && ck.quadrants) {  // this warpgroup's 64 rows, per 64 columns
        const int wg_index = Mainloop::consumer_index() / 128;
        bits = (wg::warpgroup_sync_or(wg_index, bits & 1) ? 1u : 0u) | (wg::warpgroup_sync_or(wg_index, bits & 2) ? 2u : 0u);
      } else {
        bits = Mainloop::sync_consumers_or(bits != 0) ? kHalfBits : 0u;
      }
      if (!in_range) bits = 0;
      keep = (keep & ~(kHalfBits << (kPer * hf))) | bits << (kPer * hf);
      if (in_range && kPer == 2 && ck.quadrants && Mainloop::consumer_index() % 128 == 0)  // its byte
        reinterpret_cast<uint8_t*>(mask)[Mainloop::consumer_index() / 128] = static_cast<uint8_t>(bits);
      else if (in_range && !(kPer == 2 && ck.quadrants) && Mainloop::consumer_index() == 0)
        *mask = bits != 0 ? kWholeTile : 0;
    }
    // (The warpgroups' quadrant votes differ; the bias sums below synchronise all consumers.)
    bool any_kept = keep != 0;
    if (kBias && vote_per_tile && ck.quadrants) any_kept = Mainloop::sync_consumers_or(any_kept);
    if (!any_kept) return;  // (from the epilogue)

    if (kBias && a.bias_partials != nullptr) {  // (compiled only where a bias exists)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int r = 0; r < 4; ++r)  // skipped halves contribute nothing to the bias
            if (!(keep >> (nt / kNtPerUnit) & 1)) acc[mt][nt][r] = 0.f;
      // Column sums of g over this tile's rows (float32, fixed order: deterministic).
      constexpr int kRowGroups = Mainloop::kRowGroups;  // warps holding the same columns
      float* red = Mainloop::scratch(smem);              // [kRowGroups][BN]
      const int row_group = Mainloop::row_group();
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          float sum = 0.f;
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) sum += acc[mt][nt][q] + acc[mt][nt][2 + q];
          for (int off = 4; off < 32; off <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
          if (lane < 4) red[row_group * BN + Mainloop::col(nt, q)] = sum;
        }
      Mainloop::sync_consumers();
      const int j = Mainloop::consumer_index();
      if (j < BN && jt + j / kN < ck.chunk_tiles) {
        float total = 0.f;
        for (int g = 0; g < kRowGroups; ++g) total += red[g * BN + j];
        a.bias_partials[static_cast<int64_t>(row_tile) * ck.ws_ld + static_cast<int64_t>(jt) * kN +
                        j] = total;
      }
    }
    // Stores last: the accumulator dies as it is stored (keeping it live for the bias sums
    // after the stores spilled at 128 x 256).
    if constexpr (kStaged) {
      // Each kept 64-column box of the tile (128 rows, 16 KB) is written to one of two staging
      // buffers by stmatrix, in the 128-byte swizzle the TMA expects (16-byte chunk c of row r
      // at chunk c ^ (r % 8)). Each warp stores its own 16 rows (2 KB) with one TMA issued by
      // its lane 0, after that lane has waited until its store from two boxes ago (the same
      // rows of this buffer) has read them: no consumer-wide barrier. (Plain stores of the
      // bf16 pairs took ~17% of the kernel's warp stall samples at the Gemma shape, H100.)
      char* staging = reinterpret_cast<char*>(Mainloop::scratch(smem));
      // The bias scratch (staged bias values, column-sum reductions) shares the first buffer:
      // every consumer must be done with it.
      if constexpr (kBias) Mainloop::sync_consumers();
      const int warp_row0 = Mainloop::row_group() * 16;
      const int row = stmatrix_row(warp_row0);
#pragma unroll
      for (int b = 0; b < BN / 64; ++b) {
        if (!(keep >> (b * kUnits * 64 / BN) & 1)) continue;
        char* buf = staging + (stored_boxes & 1) * kStoreBoxBytes;
        if (lane == 0) wg::bulk_wait_read<1>();
        __syncwarp();
        stmatrix_box<T>(buf, row, acc, b);
        wg::fence_async_shared();
        __syncwarp();
        if (lane == 0) {
          wg::tma_store_2d(&g_store, buf + warp_row0 * 128, jt * kN + b * 64, static_cast<int>(row0) + warp_row0);
          wg::bulk_commit();
        }
        ++stored_boxes;
      }
      return;
    }
    T* ws = static_cast<T*>(a.grad_workspace);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // entries 2h, 2h+1 are adjacent columns of one row
        // One base pointer per row; the columns of n-tile nt are nt * 8 further.
        T* out = ws + (row0 + Mainloop::row(mt, 2 * h)) * ck.ws_ld + static_cast<int64_t>(jt) * kN +
                 Mainloop::col(0, 2 * h);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
          if (keep >> (nt / kNtPerUnit) & 1) store_pair(out + nt * 8, acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
      }
  };
  if constexpr (Mainloop::kUsesTma) {
    run_mainloop<Mainloop>(acc, smem, maps, static_cast<const T*>(a.e), a.N, row0,
                           static_cast<const T*>(a.c), a.V, a.D, n_tiles, k_steps, coords,
                           epilogue);
    // The staging buffers must outlive the stores' reads (and the workspace be written).
    if constexpr (kStaged)
      if (consumer && lane == 0) wg::bulk_wait_all();
  } else {  // the epilogue's reductions reuse the pipeline's shared memory: one tile per CTA
    run_mainloop<Mainloop>(acc, smem, maps, static_cast<const T*>(a.e), a.N, row0,
                           static_cast<const T*>(a.c), a.V, a.D, 1, k_steps, coords,
                           [](int, float(&)[MT][NT][4]) {});
    epilogue(0, acc);
  }
}

// An entry of collect_active's list: the tile index (low 24 bits) and its kept quadrants
// (bit 2 h + q above them: rows 64 h.., columns 64 q..).
constexpr int kQuadrantShift = 24;
__device__ __forceinline__ int active_index(int entry) { return entry & ((1 << kQuadrantShift) - 1); }
__device__ __forceinline__ bool quadrant_kept(int entry, int h, int q) {
  return (entry >> (kQuadrantShift + 2 * h + q)) & 1;
}

// Collects the tiles i in [0, count) with a kept quadrant (mask[i * stride] != 0) into list,
// in ascending order, as active_index / quadrant_kept entries; returns how many, and in
// `whole` whether every one of them is kept whole (all four quadrants). Every thread
// of the CTA (a multiple of 32, at most 1024) reads one flag per round: one memory round trip
// per blockDim.x flags, where a single thread's loop waited for one every 4 flags (tens of
// microseconds per CTA for 128 row tiles).
__device__ int collect_active(const uint16_t* mask, int64_t stride, int count, int* list, bool& whole) {
  __shared__ int warp_counts[32];  // set entries of the warp's round; bit 16: one not whole
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  int n = 0;
  whole = true;
  for (int i0 = 0; i0 < count; i0 += blockDim.x) {
    const int i = i0 + threadIdx.x;
    const unsigned m = i < count ? mask[static_cast<int64_t>(i) * stride] : 0u;
    const bool active = m != 0;
    const unsigned ballot = __ballot_sync(0xffffffffu, active);
    const bool partial = __any_sync(0xffffffffu, active && m != kWholeTile);
    if (lane == 0) warp_counts[warp] = __popc(ballot) | (partial ? 1 << 16 : 0);
    __syncthreads();
    int before = n, round = 0;  // set entries of earlier warps; all warps of the round
    for (int w = 0; w < warps; ++w) {
      const int count_w = warp_counts[w] & 0xffff;
      before += w < warp ? count_w : 0;
      round += count_w;
      whole &= warp_counts[w] < (1 << 16);
    }
    const int quadrants = (m & 3) | (m >> 6 & 12);  // bits 8 h + q -> 2 h + q
    if (active) list[before + __popc(ballot & ((1u << lane) - 1))] = i | quadrants << kQuadrantShift;
    n += round;
    __syncthreads();  // the list is complete and warp_counts may be reused
  }
  return n;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) grad_e_kernel(BackwardArgs a, ChunkInfo ck) {
  extern __shared__ __align__(128) char smem[];
  constexpr int kPipe = tile::smem_bytes<T, true, false>();
  int* active = reinterpret_cast<int*>(smem + kPipe);
  const int row_tile = blockIdx.x;
  const int64_t row0 = static_cast<int64_t>(row_tile) * kM;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kN;
  bool whole;  // (this kernel reads whole tiles)
  const int n_active = collect_active(a.tile_mask + static_cast<int64_t>(row_tile) * ck.chunk_tiles,
                                      1, ck.chunk_tiles, active, whole);
  const T* ws = static_cast<const T*>(a.grad_workspace);
  const T* c = static_cast<const T*>(a.c);
  const int64_t ws_rows = static_cast<int64_t>(ck.row_tiles) * kM;
  constexpr int kStepsPerTile = kN / kK;
  float acc[kMTiles][kNTiles][4];
  tile::zero(acc);
  auto load = [&](T* sa, T* sb, int step) {
    const int64_t k0 = static_cast<int64_t>(active_index(active[step / kStepsPerTile])) * kN +
                       (step % kStepsPerTile) * kK;  // vocabulary offset inside the chunk
    tile::load_tile<T, true>(sa, ws, ck.ws_ld, row0, k0, ws_rows, ck.ws_ld);
    tile::load_tile<T, false>(sb, c, a.D, ck.v0 + k0, d0, a.V, a.D);
  };
  tile::pipeline<T, true, false>(acc, smem, n_active * kStepsPerTile, load, [](int) {});
  if (n_active == 0 && !ck.first_chunk) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = warp / 4, warp_n = warp % 4;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int64_t row = row0 + acc_row(warp_m, lane, mt, r);
        const int64_t d = d0 + acc_col(warp_n, lane, nt, r);
        if (row < a.N && d < a.D) {
          float* out = a.grad_e_acc + row * a.D + d;
          *out = ck.first_chunk ? acc[mt][nt][r] : *out + acc[mt][nt][r];
        }
      }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) grad_c_kernel(BackwardArgs a, ChunkInfo ck) {
  extern __shared__ __align__(128) char smem[];
  constexpr int kPipe = tile::smem_bytes<T, false, false>();
  int* active = reinterpret_cast<int*>(smem + kPipe);
  const int jt = blockIdx.x;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kN;
  bool whole;  // (this kernel reads whole tiles)
  const int n_active = collect_active(a.tile_mask + jt, ck.chunk_tiles, ck.row_tiles, active, whole);
  const T* ws = static_cast<const T*>(a.grad_workspace);
  const T* e = static_cast<const T*>(a.e);
  const int64_t ws_rows = static_cast<int64_t>(ck.row_tiles) * kM;
  constexpr int kStepsPerTile = kM / kK;
  float acc[kMTiles][kNTiles][4];
  tile::zero(acc);
  auto load = [&](T* sa, T* sb, int step) {
    const int64_t i0 = static_cast<int64_t>(active_index(active[step / kStepsPerTile])) * kM +
                       (step % kStepsPerTile) * kK;  // token offset (reduction index)
    tile::load_tile<T, false>(sa, ws, ck.ws_ld, i0, static_cast<int64_t>(jt) * kN, ws_rows,
                              ck.ws_ld);
    tile::load_tile<T, false>(sb, e, a.D, i0, d0, a.N, a.D);
  };
  tile::pipeline<T, false, false>(acc, smem, n_active * kStepsPerTile, load, [](int) {});
  T* grad_c = static_cast<T*>(a.grad_c);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = warp / 4, warp_n = warp % 4;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int64_t v = ck.v0 + static_cast<int64_t>(jt) * kN + acc_row(warp_m, lane, mt, r);
        const int64_t d = d0 + acc_col(warp_n, lane, nt, r);
        if (v < a.V && d < a.D) grad_c[v * a.D + d] = from_float<T>(acc[mt][nt][r]);
      }
}

// Epilogues of the Hopper dE / dC tiles: the finished 128 x kBlockN tile goes through the
// pipeline's shared memory (idle once both consumer warpgroups' wgmmas have retired) and leaves
// by TMA, each warpgroup's 64 rows as boxes of 128-byte rows (128-byte swizzle) issued by its
// first thread: dE as TMA reductions (whole lines added at the L2), dC as TMA stores. (Per-thread
// 8-byte reductions and 4-byte stores made the grid 4-7% slower, H100, exact, results
// bit-identical.) Boxes wholly past rows / cols are not issued; partial ones are clipped.
constexpr int kEpilogueBoxBytes = 64 * 128;  // 64 rows x 128 bytes

// (Only for grids of one tile per CTA: with more, the producer would already be loading the
// next tile into these stages.)
template <typename Gemm>
__device__ __forceinline__ char* epilogue_staging(char* smem_raw) {
  static_assert(2 * Gemm::kBlockN * 64 * 4 <= Gemm::kPipelineBytes, "staging fits in the pipeline stages");
  Gemm::sync_consumers();  // both warpgroups' last wgmmas have read their stages
  const int wg = Gemm::consumer_index() / 128;
  return Gemm::aligned(smem_raw) + wg * (Gemm::kBlockN * 64 * 4);  // room for 64 float32 rows
}

// Issues the warpgroup's staged boxes (box b: columns col0 + b * box_cols) once all of its
// threads have written them; `reduce`: float32 adds instead of stores.
template <int kBoxes>
__device__ __forceinline__ void issue_staged_boxes(const CUtensorMap* map, const char* staging, int64_t row0,
                                                   int64_t col0, int box_cols, int64_t rows, int64_t cols,
                                                   bool reduce) {
  wg::fence_async_shared();
  const int wg = (threadIdx.x - 128) / 128;  // consumer warpgroup (threads 128-383)
  wg::warpgroup_sync(wg);
  const int64_t first_row = row0 + 64 * wg;
  if (threadIdx.x % 128 != 0 || first_row >= rows) return;
#pragma unroll
  for (int b = 0; b < kBoxes; ++b) {
    const int64_t x = col0 + static_cast<int64_t>(b) * box_cols;
    if (x >= cols) break;
    const char* box = staging + b * kEpilogueBoxBytes;
    if (reduce) wg::tma_reduce_add_2d(map, box, static_cast<int>(x), static_cast<int>(first_row));
    else wg::tma_store_2d(map, box, static_cast<int>(x), static_cast<int>(first_row));
  }
  wg::bulk_commit();
  wg::bulk_wait_read<0>();  // the CTA's shared memory must outlive the reads
}

// dE: float32 boxes of 64 rows x 32 columns, added to grad_e_acc (stored for the first chunk).
template <typename Gemm>
__device__ __forceinline__ void write_tile_f32(char* smem_raw, const float (&acc)[1][Gemm::kNTiles][4],
                                               const CUtensorMap* map, int64_t row0, int64_t col0,
                                               int64_t rows, int64_t cols, bool add) {
  char* staging = epilogue_staging<Gemm>(smem_raw);
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int nt = 0; nt < Gemm::kNTiles; ++nt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // Columns nt * 8 + 2 (lane % 4) + {0, 1}: box nt / 4, byte 32 (nt % 4) + 8 (lane % 4).
      const int row = Gemm::row(0, 2 * h) % 64, chunk = (nt % 4) * 2 + (lane % 4) / 2;
      float2* dst = reinterpret_cast<float2*>(staging + (nt / 4) * kEpilogueBoxBytes + row * 128 +
                                              ((chunk ^ (row % 8)) << 4) + (lane & 1) * 8);
      *dst = make_float2(acc[0][nt][2 * h], acc[0][nt][2 * h + 1]);
    }
  issue_staged_boxes<Gemm::kBlockN / 32>(map, staging, row0, col0, 32, rows, cols, add);
}

// dC: 16-bit boxes of 64 rows x 64 columns, stored to grad_c.
template <typename T, typename Gemm>
__device__ __forceinline__ void write_tile_16(char* smem_raw, const float (&acc)[1][Gemm::kNTiles][4],
                                              const CUtensorMap* map, int64_t row0, int64_t col0,
                                              int64_t rows, int64_t cols) {
  char* staging = epilogue_staging<Gemm>(smem_raw);
  const int row = stmatrix_row((Gemm::row_group() % 4) * 16);
#pragma unroll
  for (int b = 0; b < Gemm::kBlockN / 64; ++b) stmatrix_box<T>(staging + b * kEpilogueBoxBytes, row, acc, b);
  issue_staged_boxes<Gemm::kBlockN / 64>(map, staging, row0, col0, 64, rows, cols, false);
}

// The main loop of a dE / dC tile over the collected 128 x 128 tiles of G, two k steps (64
// wide) each. Step sub of a tile covers its quadrant column sub (dE: K = vocabulary, the
// consumer warpgroups own the quadrant rows) or its quadrant row sub (dC: K = tokens, the
// warpgroups own the quadrant columns). Unless every tile is kept whole, each warpgroup
// multiplies only its kept quadrants and only their halves of G are loaded (B whole).
template <typename Gemm, bool kStepIsColumn, typename Coords, typename Done>
__device__ __forceinline__ void run_quadrant_sparse(float (&acc)[1][Gemm::kNTiles][4], char* smem,
                                                    const wg::TmaMaps& maps, const int* active, int n_active,
                                                    bool whole, Coords&& coords, Done&& done) {
  if (whole) {
    Gemm::run(acc, smem, maps, 1, 2 * n_active, coords, done);
    return;
  }
  Gemm::run(acc, smem, maps, 1, 2 * n_active, coords, done, [active](int step) {
    const int entry = active[step / 2], sub = step % 2;
    return kStepIsColumn ? quadrant_kept(entry, 0, sub) | quadrant_kept(entry, 1, sub) << 1
                         : quadrant_kept(entry, sub, 0) | quadrant_kept(entry, sub, 1) << 1;
  });
}

// Hopper versions of the two backward GEMMs on the warp-specialised TMA + wgmma main loop,
// 128 x 256 output tiles. G, c and e are read along their rows (MN-major for wgmma), so no
// operand is transposed in memory. Same block sparsity and single ownership as above.
//   dE[N, D] (+)= G[N, chunk] @ C[chunk, D]:  A = G (K-major), B = C chunk (MN-major)
// (Device functions: grad_ec_wgmma_kernel runs the dE and dC tiles of a chunk in one grid.)
template <typename T, typename Gemm>
__device__ __forceinline__ void grad_e_wgmma_tile(const BackwardArgs& a, const ChunkInfo& ck, const wg::TmaMaps& maps,
                                                  const CUtensorMap* out, char* smem, int d_tile, int row_tile) {
  int* active = reinterpret_cast<int*>(smem + Gemm::smem_bytes());
  const int64_t d0 = static_cast<int64_t>(d_tile) * Gemm::kBlockN;
  const int64_t row0 = static_cast<int64_t>(row_tile) * kM;
  bool whole;
  const int n_active = collect_active(a.tile_mask + static_cast<int64_t>(row_tile) * ck.chunk_tiles,
                                      1, ck.chunk_tiles, active, whole);
  if (n_active == 0 && !ck.first_chunk) return;
  static_assert(kN == 2 * wg::kK, "two k steps per 128-wide vocabulary tile");
  float acc[1][Gemm::kNTiles][4];  // written by the consumers in run()
  run_quadrant_sparse<Gemm, true>(acc, smem, maps, active, n_active, whole, [&](int step) {
    const int64_t k0 = static_cast<int64_t>(active_index(active[step / 2])) * kN +
                       (step % 2) * wg::kK;  // vocabulary offset inside the chunk
    return wg::StepCoords{row0, k0, d0, ck.v0 + k0};
  }, [&](int, float(&acc)[1][Gemm::kNTiles][4]) {  // epilogue on the consumers
    write_tile_f32<Gemm>(smem, acc, out, row0, d0, a.N, a.D, !ck.first_chunk);
  });
}

//   dC[chunk, D] = G[N, chunk]^T @ E[N, D]:  A = G^T (MN-major), B = E (MN-major)
template <typename T, typename Gemm>
__device__ __forceinline__ void grad_c_wgmma_tile(const BackwardArgs& a, const ChunkInfo& ck, const wg::TmaMaps& maps,
                                                  const CUtensorMap* out, char* smem, int d_tile, int jt) {
  int* active = reinterpret_cast<int*>(smem + Gemm::smem_bytes());
  const int64_t d0 = static_cast<int64_t>(d_tile) * Gemm::kBlockN;
  bool whole;
  const int n_active = collect_active(a.tile_mask + jt, ck.chunk_tiles, ck.row_tiles, active, whole);
  static_assert(kM == 2 * wg::kK, "two k steps per 128-row token tile");
  float acc[1][Gemm::kNTiles][4];  // written by the consumers in run()
  const int64_t j0 = static_cast<int64_t>(jt) * kN;  // vocabulary offset inside the chunk
  run_quadrant_sparse<Gemm, false>(acc, smem, maps, active, n_active, whole, [&](int step) {
    const int64_t t0 = static_cast<int64_t>(active_index(active[step / 2])) * kM +
                       (step % 2) * wg::kK;  // token offset (reduction index)
    return wg::StepCoords{j0, t0, d0, t0};
  }, [&](int, float(&acc)[1][Gemm::kNTiles][4]) {  // epilogue on the consumers
    write_tile_16<T, Gemm>(smem, acc, out, ck.v0 + j0, d0, a.V, a.D);
  });
}

// One grid for both GEMMs of a chunk (they only read G): the dC tiles first (at the small
// benchmark shape their reduction over all tokens is the longer one), then the dE tiles, D
// tiles varying fastest (L2 reuse of the G rows / columns). Two grids of 4.4 waves each at
// the Gemma shape ran 5 + 5 waves; one grid runs 9.
template <typename T, typename GemmE, typename GemmC>
__global__ void __launch_bounds__(GemmE::kThreadsPerCta, 1)
    grad_ec_wgmma_kernel(BackwardArgs a, ChunkInfo ck, const __grid_constant__ wg::TmaMaps maps_e,
                         const __grid_constant__ wg::TmaMaps maps_c, const __grid_constant__ CUtensorMap out_e,
                         const __grid_constant__ CUtensorMap out_c, int d_tiles) {
  static_assert(GemmE::kThreadsPerCta == GemmC::kThreadsPerCta, "one block size");
  extern __shared__ __align__(128) char smem[];
  const int c_ctas = a.grad_c != nullptr ? d_tiles * ck.chunk_tiles : 0;  // (none: dC not needed)
  const int b = static_cast<int>(blockIdx.x);
  // Wide D (more than 12 tiles): groups of 8 D tiles x all outer tiles, D fastest, so that a
  // wave of ~132 CTAs reads ~16 outer slabs and 8 D slabs instead of ~8 and all of them.
  // (Llama-3 shape, H100: DRAM reads per chunk 1.57 -> 1.32 GB; as fast at locked clocks, the
  // tensor pipe 93% busy either way, but 2-4% faster at the power limit.)
  const int group = d_tiles > 12 ? 8 : d_tiles;
  int64_t d_tile, outer;
  if (b < c_ctas) {
    grouped_tile(b, d_tiles, ck.chunk_tiles, d_tile, outer, group);
    grad_c_wgmma_tile<T, GemmC>(a, ck, maps_c, &out_c, smem, static_cast<int>(d_tile), static_cast<int>(outer));
  } else {
    grouped_tile(b - c_ctas, d_tiles, ck.row_tiles, d_tile, outer, group);
    grad_e_wgmma_tile<T, GemmE>(a, ck, maps_e, &out_e, smem, static_cast<int>(d_tile), static_cast<int>(outer));
  }
}

__global__ void bias_reduce_kernel(BackwardArgs a, ChunkInfo ck, int64_t chunk_len) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= chunk_len) return;
  float s = 0.f;
  for (int rt = 0; rt < ck.row_tiles; ++rt) s += a.bias_partials[rt * ck.ws_ld + j];
  a.grad_bias[ck.v0 + j] = s;
}

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

#define FUSEDLM_RETURN_IF_ERROR(expr)      \
  do {                                     \
    const cudaError_t err_ = (expr);       \
    if (err_ != cudaSuccess) return err_;  \
  } while (0)

// Hopper main loops: 128 x 256 output tiles, 4 stages, everywhere. (Forward at the Gemma
// shape on an H100: 14.6 ms against 17.9 for 128 x 128 tiles with 6 stages and two k steps
// of wgmmas in flight.) The forward runs in 2-CTA clusters sharing the classifier tiles:
// 2-6% faster than single CTAs in A/B runs (H100, bench/NOTES.md).
template <typename T>
using HopperForward = wg::TmaWgmma<T, 256, 4, wg::Major::K, wg::Major::K, 2>;

// The gradient-tile kernel uses 128 x 256 tiles too, deciding skips per 128-wide half:
// 16.4 ms against 19.8 for 128 x 128 tiles at the Gemma shape (H100). Its tiles of g leave
// through two TMA store staging buffers (the bias scratch shares them): 226 KB in all.
template <typename T>
using HopperGradTile = wg::TmaWgmma<T, 256, 4, wg::Major::K, wg::Major::K, 1, 2 * kStoreBoxBytes>;

template <typename T>
using HopperGradE = wg::TmaWgmma<T, 256, 4, wg::Major::K, wg::Major::MN>;
template <typename T>
using HopperGradC = wg::TmaWgmma<T, 256, 4, wg::Major::MN, wg::Major::MN>;

// The Hopper wgmma main loop: only for 16-bit inputs where it is available (wgmma_available);
// FUSEDLM_DISABLE_WGMMA=1 forces the mma.sync path (for A/B tests).
bool use_wgmma(DType dtype) {
  if (dtype == DType::kFloat32) return false;
  const char* off = std::getenv("FUSEDLM_DISABLE_WGMMA");
  if (off != nullptr && off[0] == '1') return false;
  return wgmma_available();
}

// TMA descriptor of a row-major [rows, cols] 16-bit (or float32) matrix, read or written in
// boxes of box_rows x 128 bytes (64 or 32 columns) with the 128-byte swizzle wgmma expects;
// out-of-range elements read as zeros and are never written.
cudaError_t make_tma_map(CUtensorMap* map, DType dtype, const void* ptr, int64_t rows, int64_t cols,
                         int box_rows) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  if (encode == nullptr) {
    cudaDriverEntryPointQueryResult found;
    void* fn = nullptr;
    FUSEDLM_RETURN_IF_ERROR(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                             cudaEnableDefault, &found));
    if (found != cudaDriverEntryPointSuccess || fn == nullptr) return cudaErrorNotSupported;
    encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const int elem_bytes = dtype_size(dtype);
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * elem_bytes};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(128 / elem_bytes), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUtensorMapDataType type = dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                   : dtype == DType::kFloat16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                              : CU_TENSOR_MAP_DATA_TYPE_FLOAT32;
  const CUresult r = encode(
      map, type, 2, const_cast<void*>(ptr), dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// Maps of the "NT" main loops (forward, gradient tiles): e and c, both K-major.
template <typename Mainloop>
cudaError_t make_maps(wg::TmaMaps* maps, DType dtype, const void* e, int64_t N, const void* c,
                      int64_t V, int64_t D) {
  *maps = wg::TmaMaps{};
  if constexpr (Mainloop::kUsesTma) {
    FUSEDLM_RETURN_IF_ERROR(make_tma_map(&maps->a, dtype, e, N, D, Mainloop::kBlockM));
    FUSEDLM_RETURN_IF_ERROR(make_tma_map(&maps->b, dtype, c, V, D, Mainloop::kBBoxRows));
  }
  return cudaSuccess;
}

template <typename T, typename Mainloop>
cudaError_t launch_forward(const ForwardArgs& a, cudaStream_t stream) {
  const int64_t row_tiles = (a.N + kM - 1) / kM;
  const int64_t vocab_tiles = (a.V + Mainloop::kBlockN - 1) / Mainloop::kBlockN;
  const int tiles_per_split = static_cast<int>((vocab_tiles + a.splits - 1) / a.splits);
  constexpr int smem = Mainloop::smem_bytes();
  wg::TmaMaps maps;
  FUSEDLM_RETURN_IF_ERROR(make_maps<Mainloop>(&maps, a.dtype, a.e, a.N, a.c, a.V, a.D));
  const bool softcap = a.softcap > 0.f, has_bias = a.bias != nullptr;
  auto kernel = softcap ? (has_bias ? forward_kernel<T, Mainloop, true, true> : forward_kernel<T, Mainloop, true, false>)
                        : (has_bias ? forward_kernel<T, Mainloop, false, true> : forward_kernel<T, Mainloop, false, false>);
  FUSEDLM_RETURN_IF_ERROR(allow_smem(kernel, smem));
  if (a.tile_max != nullptr && !kRecordsTileMax<Mainloop>) {
    // Bytes 0x7f make every float 3.39e38: a bound that never lets a tile be skipped early.
    FUSEDLM_RETURN_IF_ERROR(cudaMemsetAsync(
        a.tile_max, 0x7f, sizeof(float) * static_cast<size_t>(a.N * tile_max_cols(a.V)), stream));
  }
  constexpr int cluster = Mainloop::kClusterSize;
  const int64_t grid_rows = (row_tiles + cluster - 1) / cluster * cluster;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(grid_rows * a.splits));
  cfg.blockDim = dim3(Mainloop::kThreadsPerCta);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = cluster > 1 ? 1 : 0;  // clusters exist from sm_90 on
  FUSEDLM_RETURN_IF_ERROR(cudaLaunchKernelEx(&cfg, kernel, a, tiles_per_split, maps));
  forward_combine_kernel<<<static_cast<unsigned>((a.N + 255) / 256), 256, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t forward_typed(const ForwardArgs& a, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    if (use_wgmma(a.dtype)) return launch_forward<T, HopperForward<T>>(a, stream);
  }
  return launch_forward<T, SyncNt<T>>(a, stream);
}

// Largest dynamic shared memory a CTA of `kernel` may use: the device's opt-in limit (227 KiB
// on sm_90, 163 KiB on sm_80) less the kernel's static shared memory.
template <typename Kernel>
int max_dynamic_smem(Kernel kernel) {
  int device = 0, bytes = 0;
  cudaFuncAttributes attr{};
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    return 0;
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) return 0;
  return bytes - static_cast<int>(attr.sharedSizeBytes);
}

// Output tiles per gradient-tile CTA (one CTA per SM is resident): as many as keep the
// grid's last wave at least 90% full, so the pipeline fill and each tile's epilogue overlap
// the next tile's loads instead of a new CTA's start.
int tiles_per_cta(int row_tiles, int out_tiles, int sms) {
  for (int per_cta = kMaxTilesPerCta; per_cta > 1; --per_cta) {
    const int64_t ctas = static_cast<int64_t>(row_tiles) * ((out_tiles + per_cta - 1) / per_cta);
    const int64_t waves = (ctas + sms - 1) / sms;
    const double useful = static_cast<double>(row_tiles) * out_tiles;
    if (useful / (static_cast<double>(waves) * sms * per_cta) >= 0.9) return per_cta;
  }
  return 1;
}

// Runs the backward for one vocabulary chunk after another. Mainloop recomputes the logit
// tiles; kWgmmaGemms selects the Hopper dE / dC kernels (else the mma.sync ones).
template <typename T, typename Mainloop, bool kWgmmaGemms>
cudaError_t backward_typed(const BackwardArgs& args, cudaStream_t stream) {
  BackwardArgs a = args;
  const bool hint = a.filter_eps >= 0.f && a.tile_max != nullptr && a.keep_hint != nullptr &&
                    a.target_keep != nullptr;
  if (!hint) a.keep_hint = nullptr;
  using GemmE = HopperGradE<T>;
  using GemmC = HopperGradC<T>;
  const int row_tiles = static_cast<int>((a.N + kM - 1) / kM);
  const unsigned d_tiles = static_cast<unsigned>((a.D + kN - 1) / kN);
  const unsigned d_tiles_wide = static_cast<unsigned>((a.D + GemmE::kBlockN - 1) / GemmE::kBlockN);
  constexpr int smem_tile = Mainloop::smem_bytes();
  const int max_tiles = static_cast<int>(a.vocab_chunk / kN);
  // Shared memory of the dE / dC kernels: pipeline + the list of active tiles.
  const int smem_e = (kWgmmaGemms ? GemmE::smem_bytes() : tile::smem_bytes<T, true, false>()) + 4 * max_tiles;
  const int smem_c = (kWgmmaGemms ? GemmC::smem_bytes() : tile::smem_bytes<T, false, false>()) + 4 * row_tiles;
  const int smem_ec = std::max(smem_e, smem_c);
  const bool has_bias = a.bias != nullptr;
  auto tile_kernel = a.softcap > 0.f
                         ? (has_bias ? grad_tile_kernel<T, Mainloop, true, true> : grad_tile_kernel<T, Mainloop, true, false>)
                         : (has_bias ? grad_tile_kernel<T, Mainloop, false, true> : grad_tile_kernel<T, Mainloop, false, false>);
  FUSEDLM_RETURN_IF_ERROR(allow_smem(tile_kernel, smem_tile));
  const int sms = a.num_sms > 0 ? a.num_sms : 1;
  wg::TmaMaps maps, maps_e{}, maps_c{};
  CUtensorMap out_e{}, out_c{};  // where the Hopper dE / dC epilogues write
  FUSEDLM_RETURN_IF_ERROR(make_maps<Mainloop>(&maps, a.dtype, a.e, a.N, a.c, a.V, a.D));
  // The workspace: the staged epilogue stores g in boxes of 64 columns x 16 rows (one warp's),
  // the dE GEMM reads it as its A operand in boxes of 64 x 128 (64 x 64: single halves).
  const int64_t ws_rows = static_cast<int64_t>(row_tiles) * kM;
  CUtensorMap g_store{};
  if constexpr (staging_bytes<Mainloop>() > 0)
    FUSEDLM_RETURN_IF_ERROR(make_tma_map(&g_store, a.dtype, a.grad_workspace, ws_rows, a.vocab_chunk, 16));
  // dE and dC are each optional (a frozen classifier needs no dC, frozen hidden states no dE):
  // a gradient not asked for gets no GEMM.
  const bool need_e = a.grad_e_acc != nullptr, need_c = a.grad_c != nullptr;
  if constexpr (kWgmmaGemms) {
    if (need_e) {
      FUSEDLM_RETURN_IF_ERROR(make_tma_map(&maps_e.a, a.dtype, a.grad_workspace, ws_rows, a.vocab_chunk, kM));
      FUSEDLM_RETURN_IF_ERROR(make_tma_map(&maps_e.a_half, a.dtype, a.grad_workspace, ws_rows, a.vocab_chunk, 64));
      FUSEDLM_RETURN_IF_ERROR(make_tma_map(&maps_e.b, a.dtype, a.c, a.V, a.D, 64));
      FUSEDLM_RETURN_IF_ERROR(make_tma_map(&out_e, DType::kFloat32, a.grad_e_acc, a.N, a.D, 64));
    }
    if (need_c) {
      FUSEDLM_RETURN_IF_ERROR(make_tma_map(&maps_c.a, a.dtype, a.grad_workspace, ws_rows, a.vocab_chunk, 64));
      FUSEDLM_RETURN_IF_ERROR(make_tma_map(&maps_c.b, a.dtype, a.e, a.N, a.D, 64));
      FUSEDLM_RETURN_IF_ERROR(make_tma_map(&out_c, a.dtype, a.grad_c, a.V, a.D, 64));
    }
    FUSEDLM_RETURN_IF_ERROR(allow_smem(grad_ec_wgmma_kernel<T, GemmE, GemmC>, smem_ec));
  } else {
    FUSEDLM_RETURN_IF_ERROR(allow_smem(grad_e_kernel<T>, smem_e));
    FUSEDLM_RETURN_IF_ERROR(allow_smem(grad_c_kernel<T>, smem_c));
  }
  if (a.target_keep != nullptr && a.filter_eps >= 0.f) {
    target_keep_kernel<<<static_cast<unsigned>((a.N + 255) / 256), 256, 0, stream>>>(a);
    FUSEDLM_RETURN_IF_ERROR(cudaGetLastError());
  } else {
    a.target_keep = nullptr;
  }
  if (hint) {
    const unsigned blocks_w = static_cast<unsigned>((tile_max_cols(a.V) + kM - 1) / kM);
    keep_hint_kernel<<<dim3(blocks_w, static_cast<unsigned>(row_tiles)), kM, 0, stream>>>(a);
    FUSEDLM_RETURN_IF_ERROR(cudaGetLastError());
  }
  for (int64_t v0 = 0; v0 < a.V; v0 += a.vocab_chunk) {
    const int64_t chunk_len = std::min(a.vocab_chunk, a.V - v0);
    const int chunk_tiles = static_cast<int>((chunk_len + kN - 1) / kN);
    constexpr int kHalves = Mainloop::kBlockN / kN;
    const int wide_tiles = (chunk_tiles + kHalves - 1) / kHalves;  // gradient-tile outputs
    const int per_cta = Mainloop::kUsesTma ? tiles_per_cta(row_tiles, wide_tiles, sms) : 1;
    ChunkInfo ck{v0, chunk_tiles, a.vocab_chunk, row_tiles, v0 == 0, per_cta, kWgmmaGemms};
    const int col_groups = (wide_tiles + per_cta - 1) / per_cta;
    if (a.bias_partials != nullptr) {
      FUSEDLM_RETURN_IF_ERROR(cudaMemsetAsync(
          a.bias_partials, 0, sizeof(float) * static_cast<size_t>(row_tiles) * a.vocab_chunk,
          stream));
    }
    tile_kernel<<<static_cast<unsigned>(row_tiles * col_groups),
                                    Mainloop::kThreadsPerCta, smem_tile, stream>>>(a, ck, maps, g_store);
    FUSEDLM_RETURN_IF_ERROR(cudaGetLastError());
    if constexpr (kWgmmaGemms) {
      const unsigned ctas = d_tiles_wide * static_cast<unsigned>((need_c ? ck.chunk_tiles : 0) + (need_e ? row_tiles : 0));
      if (ctas > 0) {
        grad_ec_wgmma_kernel<T, GemmE, GemmC><<<ctas, GemmE::kThreadsPerCta, smem_ec, stream>>>(
            a, ck, maps_e, maps_c, out_e, out_c, static_cast<int>(d_tiles_wide));
        FUSEDLM_RETURN_IF_ERROR(cudaGetLastError());
      }
    } else {
      if (need_e) {
        grad_e_kernel<T><<<dim3(row_tiles, d_tiles), kThreads, smem_e, stream>>>(a, ck);
        FUSEDLM_RETURN_IF_ERROR(cudaGetLastError());
      }
      if (need_c) {
        grad_c_kernel<T><<<dim3(ck.chunk_tiles, d_tiles), kThreads, smem_c, stream>>>(a, ck);
        FUSEDLM_RETURN_IF_ERROR(cudaGetLastError());
      }
    }
    if (a.bias_partials != nullptr) {
      bias_reduce_kernel<<<static_cast<unsigned>((chunk_len + 255) / 256), 256, 0, stream>>>(
          a, ck, chunk_len);
      FUSEDLM_RETURN_IF_ERROR(cudaGetLastError());
    }
  }
  return cudaSuccess;
}

// FUSEDLM_CCE_MMA_SYNC_GEMMS=1: the Hopper gradient tiles with the mma.sync dE / dC GEMMs
// (for tests).
bool mma_sync_gemms_forced() {
  const char* force = std::getenv("FUSEDLM_CCE_MMA_SYNC_GEMMS");
  return force != nullptr && force[0] == '1';
}

// Row tiles whose active-tile lists (4 bytes a row tile) fit in the shared memory next to
// the pipeline of the Hopper dE / dC GEMMs, or of the mma.sync ones (a smaller pipeline).
template <typename T>
int64_t wgmma_gemm_row_tiles() {
  return (max_dynamic_smem(grad_ec_wgmma_kernel<T, HopperGradE<T>, HopperGradC<T>>) - HopperGradC<T>::smem_bytes()) / 4;
}
template <typename T>
int64_t mma_sync_gemm_row_tiles() {
  return (max_dynamic_smem(grad_c_kernel<T>) - tile::smem_bytes<T, false, false>()) / 4;
}

template <typename T>
cudaError_t backward_dispatch(const BackwardArgs& a, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    if (use_wgmma(a.dtype)) {
      // Beyond ~780k tokens the token list no longer fits next to the wgmma GEMMs' pipeline
      // and the mma.sync GEMMs would run; the glue splits such calls into row blocks
      // (backward_rows_per_launch).
      const int64_t row_tiles = (a.N + kM - 1) / kM;
      if (!mma_sync_gemms_forced() && row_tiles <= wgmma_gemm_row_tiles<T>())
        return backward_typed<T, HopperGradTile<T>, true>(a, stream);
      return backward_typed<T, HopperGradTile<T>, false>(a, stream);
    }
  }
  return backward_typed<T, SyncNt<T>, false>(a, stream);
}

// Row tiles one backward launch can take: those of the dE / dC GEMMs backward_dispatch picks
// (on Hopper the wgmma ones: the mma.sync ones would take ~6x more rows but run slower), at
// most 65535 (the hint kernel has row tiles as gridDim.y).
template <typename T>
int64_t backward_row_tiles_per_launch(DType dtype) {
  int64_t row_tiles = mma_sync_gemm_row_tiles<T>();
  if constexpr (!std::is_same_v<T, float>) {
    if (use_wgmma(dtype) && !mma_sync_gemms_forced()) row_tiles = wgmma_gemm_row_tiles<T>();
  }
  return std::max<int64_t>(1, std::min<int64_t>(row_tiles, 65535));
}

}  // namespace

int64_t backward_rows_per_launch(DType dtype) {
  switch (dtype) {
    case DType::kBFloat16: return backward_row_tiles_per_launch<__nv_bfloat16>(dtype) * kM;
    case DType::kFloat16: return backward_row_tiles_per_launch<__half>(dtype) * kM;
    case DType::kFloat32: return backward_row_tiles_per_launch<float>(dtype) * kM;
  }
  return kM;
}

int forward_splits(int64_t N, int64_t V, DType dtype, int num_sms) {
  const int64_t tile_width = use_wgmma(dtype) ? HopperForward<__half>::kBlockN : SyncNt<float>::kBlockN;
  const int64_t cluster = use_wgmma(dtype) ? HopperForward<__half>::kClusterSize : 1;
  // Rows padded to whole clusters: the grid has row_tiles x splits CTAs.
  const int64_t row_tiles = std::max<int64_t>(cluster, ((N + kM - 1) / kM + cluster - 1) / cluster * cluster);
  const int64_t vocab_tiles = std::max<int64_t>(1, (V + tile_width - 1) / tile_width);
  const int64_t sms = std::max(num_sms, 1);
  // One CTA per SM is resident (the main loops use most of the shared memory). Pick the
  // split count whose grid wastes the least of the last wave and of the vocabulary tiles
  // left unbalanced between splits, among those with at least ~4 waves of CTAs.
  const int64_t lo = std::min(vocab_tiles, std::max<int64_t>(1, (4 * sms + row_tiles - 1) / row_tiles));
  const int64_t hi = std::min({vocab_tiles, 4 * lo, int64_t{65535}});
  int64_t best = lo;
  double best_eff = -1;
  for (int64_t s = lo; s <= hi; ++s) {
    const int64_t per_split = (vocab_tiles + s - 1) / s;
    const int64_t splits = (vocab_tiles + per_split - 1) / per_split;  // no empty splits
    const int64_t ctas = row_tiles * splits;
    const double waves = static_cast<double>((ctas + sms - 1) / sms);
    const double eff = (static_cast<double>(ctas) / sms / waves) *
                       (static_cast<double>(vocab_tiles) / (splits * per_split));
    if (eff > best_eff + 1e-9) {
      best_eff = eff;
      best = splits;
    }
  }
  return static_cast<int>(best);
}

int64_t backward_vocab_chunk(int64_t N, int64_t V, DType dtype, int64_t budget_bytes) {
  const int64_t rows = std::max<int64_t>(1, (N + kM - 1) / kM) * kM;
  int64_t chunk = budget_bytes / (rows * static_cast<int64_t>(dtype_size(dtype)));
  chunk = (chunk / kN) * kN;
  const int64_t v_pad = ((V + kN - 1) / kN) * kN;
  // At most 32768 entries per chunk keeps the grad_e kernel's tile list in shared memory.
  return std::max<int64_t>(kN, std::min({chunk, v_pad, int64_t{32768}}));
}

cudaError_t forward(const ForwardArgs& a, cudaStream_t stream) {
  if (a.N == 0) return cudaSuccess;
  switch (a.dtype) {
    case DType::kBFloat16: return forward_typed<__nv_bfloat16>(a, stream);
    case DType::kFloat16: return forward_typed<__half>(a, stream);
    case DType::kFloat32: return forward_typed<float>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t backward(const BackwardArgs& a, cudaStream_t stream) {
  if (a.N == 0 || a.V == 0) return cudaSuccess;
  switch (a.dtype) {
    case DType::kBFloat16: return backward_dispatch<__nv_bfloat16>(a, stream);
    case DType::kFloat16: return backward_dispatch<__half>(a, stream);
    case DType::kFloat32: return backward_dispatch<float>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cce_cuda
}  // namespace fusedlm
