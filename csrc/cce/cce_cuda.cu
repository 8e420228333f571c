// Cut Cross-Entropy CUDA kernels (ATen-free).
//
// Forward: each CTA owns 128 rows of e and a contiguous range of 128-wide vocabulary tiles
// (a "split"); logit tiles come from the tensor-core main loop and are folded, in
// registers, into a per-row online log-sum-exp (base 2), a logit sum and the target
// logit. Per-split partials [2, splits, N] are merged by a small kernel. Extra memory: O(N
// x splits) floats.
//
// Backward, per vocabulary chunk of `vocab_chunk` entries (bounded workspace):
//  1. grad_tile_kernel recomputes each 128x128 logit tile, forms
//     g = grad_lse * softmax + grad_sum + grad_target * onehot (x softcap derivative) in
//     float32 and stores it (in the input dtype) to the workspace, unless every entry of the
//     tile is below filter_eps and holds no target: then the tile is marked skipped.
//  2. grad_e_kernel:  dE[N, D]  += G[N, chunk] @ C[chunk, D]   (float32 accumulator buffer)
//  3. grad_c_kernel:  dC[chunk, D] = G[N, chunk]^T @ E[N, D]   (float32 in registers)
//     Both loop only over non-skipped tiles (block-sparse) and each output tile has exactly
//     one owner CTA: no atomics, deterministic results.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <type_traits>

#include <cudaTypedefs.h>

#include "../dispatch.h"
#include "tile_mma.cuh"
#include "tile_wgmma.cuh"

namespace fusedlm {
namespace cce_cuda {
namespace {

using tile::kK;
using tile::kM;
using tile::kMTiles;
using tile::kN;
using tile::kNTiles;
using tile::kThreads;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
static_assert(kTileRows == kM && kTileVocab == kN, "tile sizes must agree");

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float(float x) { return x; }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ float from_float(float x) { return x; }

__device__ __forceinline__ float softcapped(float x, float cap) {
  return cap > 0.f ? cap * tanhf(x / cap) : x;
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
__device__ __forceinline__ void grouped_tile(int64_t linear, int64_t row_tiles, int64_t col_tiles,
                                             int64_t& row_tile, int64_t& col_tile) {
  const int64_t per_group = kRowGroup * col_tiles;
  const int64_t group = linear / per_group, rest = linear % per_group;
  const int64_t left = row_tiles - group * kRowGroup;
  const int64_t rows_here = left < kRowGroup ? left : kRowGroup;
  row_tile = group * kRowGroup + rest % rows_here;
  col_tile = rest / rows_here;
}

// Main-loop policy for "NT" tiles (both operands K-major) on warp-level mma.sync (sm_80+).
// Interface shared with wg::WgmmaNt: the accumulator shape, the row / column of each entry,
// which of kColGroups warps share a row, and run(), which calls done(tile) with the complete
// accumulator of each output tile; after run() returns the accumulator holds the last tile.
template <typename T>
struct SyncNt {
  static constexpr int kMTiles = tile::kMTiles, kNTiles = tile::kNTiles, kColGroups = 4;
  static constexpr int kKStep = tile::kK;
  static constexpr bool kUsesTma = false;
  static constexpr int kThreadsPerCta = kThreads;
  static constexpr int kRowGroups = 2;  // warps holding the same columns (warp_m)
  static constexpr int smem_bytes() { return tile::smem_bytes<T, true, true>(); }
  __device__ static bool is_consumer() { return true; }
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
      done(step / k_steps);
      if (step + 1 < steps) tile::zero(acc);  // the final tile stays readable after run()
    });
  }
};

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
    Mainloop::run(acc, smem, maps, a_row0, n_tiles, k_steps, coords, done);
  } else {
    Mainloop::run(acc, smem, a, a_rows, a_row0, b, b_rows, D, n_tiles, k_steps, coords, done);
  }
}

template <typename T, typename Mainloop>
__global__ void __launch_bounds__(Mainloop::kThreadsPerCta)
    forward_kernel(ForwardArgs a, int tiles_per_split, const __grid_constant__ wg::TmaMaps maps) {
  extern __shared__ __align__(128) char smem[];
  constexpr int MT = Mainloop::kMTiles, NT = Mainloop::kNTiles, KS = Mainloop::kKStep;
  const T* bias = static_cast<const T*>(a.bias);
  int64_t row_tile, split_index;
  grouped_tile(blockIdx.x, (a.N + kM - 1) / kM, a.splits, row_tile, split_index);
  const int64_t row0 = row_tile * kM;
  const int split = static_cast<int>(split_index);
  const int64_t vocab_tiles = (a.V + kN - 1) / kN;
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
    b_row0 = (vt_begin + step / k_steps) * kN;
    k0 = static_cast<int64_t>(step % k_steps) * KS;
  };
  auto done = [&](int tile_index) {
    const int64_t v0 = (vt_begin + tile_index) * kN;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const int r = 2 * h + q;
            const int64_t v = v0 + Mainloop::col(nt, r);
            float z = -INFINITY;
            if (v < a.V) {
              z = acc[mt][nt][r];
              if (bias != nullptr) z += to_float(bias[v]);
              z = softcapped(z, a.softcap);
              run_zsum[mt][h] += z;
              if (v == target[mt][h]) a.target_logit[row0 + Mainloop::row(mt, r)] = z;
            }
            acc[mt][nt][r] = z * kLog2e;  // reuse the register: logit in base-2 units
            tile_max = fmaxf(tile_max, acc[mt][nt][r]);
          }
        }
        if (tile_max == -INFINITY) continue;
        const float new_max = fmaxf(run_max[mt][h], tile_max);
        float s = run_sum[mt][h] * exp2f(run_max[mt][h] - new_max);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int q = 0; q < 2; ++q) s += exp2f(acc[mt][nt][2 * h + q] - new_max);
        run_sum[mt][h] = s;
        run_max[mt][h] = new_max;
      }
    }
  };
  run_mainloop<Mainloop>(acc, smem, maps, static_cast<const T*>(a.e), a.N, row0,
                         static_cast<const T*>(a.c), a.V, a.D, n_tiles, k_steps, coords, done);

  // Reduce the 4 lanes that share a row, then the warps that hold other columns of it.
  constexpr int G = Mainloop::kColGroups;
  float* red = Mainloop::scratch(smem);  // [3][G][kM]
#pragma unroll
  for (int mt = 0; mt < MT && consumer; ++mt)
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
  __syncthreads();
  if (threadIdx.x < kM) {
    const int r = threadIdx.x;
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
};

template <typename T, typename Mainloop>
__global__ void __launch_bounds__(Mainloop::kThreadsPerCta)
    grad_tile_kernel(BackwardArgs a, ChunkInfo ck, const __grid_constant__ wg::TmaMaps maps) {
  extern __shared__ __align__(128) char smem[];
  constexpr int MT = Mainloop::kMTiles, NT = Mainloop::kNTiles, KS = Mainloop::kKStep;
  const T* bias = static_cast<const T*>(a.bias);
  int64_t row_tile, jt;
  grouped_tile(blockIdx.x, ck.row_tiles, ck.chunk_tiles, row_tile, jt);
  const int64_t row0 = row_tile * kM;
  const int64_t v0 = ck.v0 + static_cast<int64_t>(jt) * kN;
  const int k_steps = static_cast<int>((a.D + KS - 1) / KS);
  const int lane = threadIdx.x % 32;

  float acc[MT][NT][4];
  auto coords = [&](int step, int64_t& b_row0, int64_t& k0) {
    b_row0 = v0;
    k0 = static_cast<int64_t>(step) * KS;
  };
  run_mainloop<Mainloop>(acc, smem, maps, static_cast<const T*>(a.e), a.N, row0,
                         static_cast<const T*>(a.c), a.V, a.D, 1, k_steps, coords, [](int) {});
  {
    const bool consumer = Mainloop::is_consumer();
    bool keep = false;
#pragma unroll
    for (int mt = 0; mt < MT && consumer; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = row0 + Mainloop::row(mt, 2 * h);
        float lse2 = 0.f, g_lse = 0.f, g_tgt = 0.f, g_sum = 0.f;
        int64_t y = -1;
        if (row < a.N) {
          lse2 = a.lse[row] * kLog2e;
          g_lse = a.grad_lse[row];
          g_tgt = a.grad_target[row];
          g_sum = a.grad_sum[row];
          y = a.targets[row];
        }
        const bool has_grad = g_lse != 0.f || g_tgt != 0.f || g_sum != 0.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const int r = 2 * h + q;
            const int64_t v = v0 + Mainloop::col(nt, r);
            float g = 0.f;
            if (has_grad && v < a.V) {
              float z = acc[mt][nt][r];
              if (bias != nullptr) z += to_float(bias[v]);
              z = softcapped(z, a.softcap);
              const float p = exp2f(z * kLog2e - lse2);
              const bool is_target = v == y;
              g = g_lse * p + g_sum + (is_target ? g_tgt : 0.f);
              if (a.softcap > 0.f) {
                const float t = z / a.softcap;
                g *= 1.f - t * t;
              }
              keep |= a.filter_eps < 0.f || p >= a.filter_eps || is_target;
            }
            acc[mt][nt][r] = g;
          }
        }
      }
    }
    keep = __syncthreads_or(keep);
    if (threadIdx.x == 0) a.tile_mask[static_cast<int64_t>(row_tile) * ck.chunk_tiles + jt] = keep;
    if (!keep) return;

    T* ws = static_cast<T*>(a.grad_workspace);
    if (consumer)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int64_t row = row0 + Mainloop::row(mt, r);
          const int64_t col = static_cast<int64_t>(jt) * kN + Mainloop::col(nt, r);
          ws[row * ck.ws_ld + col] = from_float<T>(acc[mt][nt][r]);
        }

    if (a.bias_partials != nullptr) {
      // Column sums of g over this tile's rows (float32, fixed order: deterministic).
      constexpr int kRowGroups = Mainloop::kRowGroups;  // warps holding the same columns
      float* red = Mainloop::scratch(smem);              // [kRowGroups][kN]
      const int row_group = Mainloop::row_group();
#pragma unroll
      for (int nt = 0; nt < NT && consumer; ++nt)
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          float sum = 0.f;
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) sum += acc[mt][nt][q] + acc[mt][nt][2 + q];
          for (int off = 4; off < 32; off <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
          if (lane < 4) red[row_group * kN + Mainloop::col(nt, q)] = sum;
        }
      __syncthreads();
      if (threadIdx.x < kN) {
        float total = 0.f;
        for (int g = 0; g < kRowGroups; ++g) total += red[g * kN + threadIdx.x];
        a.bias_partials[static_cast<int64_t>(row_tile) * ck.ws_ld + static_cast<int64_t>(jt) * kN +
                        threadIdx.x] = total;
      }
    }
  }
}

// Collect the indices i in [0, count) with mask[i * stride] != 0 into list; returns how many.
__device__ int collect_active(const uint8_t* mask, int64_t stride, int count, int* list) {
  __shared__ int total;
  if (threadIdx.x == 0) {
    int n = 0;
    for (int i = 0; i < count; ++i)
      if (mask[static_cast<int64_t>(i) * stride]) list[n++] = i;
    total = n;
  }
  __syncthreads();
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) grad_e_kernel(BackwardArgs a, ChunkInfo ck) {
  extern __shared__ __align__(128) char smem[];
  constexpr int kPipe = tile::smem_bytes<T, true, false>();
  int* active = reinterpret_cast<int*>(smem + kPipe);
  const int row_tile = blockIdx.x;
  const int64_t row0 = static_cast<int64_t>(row_tile) * kM;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kN;
  const int n_active = collect_active(a.tile_mask + static_cast<int64_t>(row_tile) * ck.chunk_tiles,
                                      1, ck.chunk_tiles, active);
  const T* ws = static_cast<const T*>(a.grad_workspace);
  const T* c = static_cast<const T*>(a.c);
  const int64_t ws_rows = static_cast<int64_t>(ck.row_tiles) * kM;
  constexpr int kStepsPerTile = kN / kK;
  float acc[kMTiles][kNTiles][4];
  tile::zero(acc);
  auto load = [&](T* sa, T* sb, int step) {
    const int64_t k0 = static_cast<int64_t>(active[step / kStepsPerTile]) * kN +
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
  const int n_active = collect_active(a.tile_mask + jt, ck.chunk_tiles, ck.row_tiles, active);
  const T* ws = static_cast<const T*>(a.grad_workspace);
  const T* e = static_cast<const T*>(a.e);
  const int64_t ws_rows = static_cast<int64_t>(ck.row_tiles) * kM;
  constexpr int kStepsPerTile = kM / kK;
  float acc[kMTiles][kNTiles][4];
  tile::zero(acc);
  auto load = [&](T* sa, T* sb, int step) {
    const int64_t i0 = static_cast<int64_t>(active[step / kStepsPerTile]) * kM +
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

template <typename T>
using HopperNt = wg::TmaWgmmaNt<T, 5>;

// The Hopper wgmma main loop: only for 16-bit inputs on an sm_90 device, in builds that
// compiled sm_90a code; FUSEDLM_DISABLE_WGMMA=1 forces the mma.sync path (for A/B tests).
bool use_wgmma(DType dtype) {
#if defined(FUSEDLM_HAS_SM90A)
  if (dtype == DType::kFloat32) return false;
  const char* off = std::getenv("FUSEDLM_DISABLE_WGMMA");
  if (off != nullptr && off[0] == '1') return false;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  return major == 9;
#else
  (void)dtype;
  return false;
#endif
}

// TMA descriptor of a row-major [rows, D] 16-bit matrix, read in 128-row x 64-column boxes
// with the 128-byte swizzle wgmma expects; rows / columns past the end read as zeros.
cudaError_t make_tma_map(CUtensorMap* map, DType dtype, const void* ptr, int64_t rows, int64_t D) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  if (encode == nullptr) {
    cudaDriverEntryPointQueryResult found;
    void* fn = nullptr;
    FUSEDLM_RETURN_IF_ERROR(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                             cudaEnableDefault, &found));
    if (found != cudaDriverEntryPointSuccess || fn == nullptr) return cudaErrorNotSupported;
    encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(D), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(D) * 2};
  const cuuint32_t box[2] = {wg::kK, wg::kM};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r = encode(
      map, dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
      2, const_cast<void*>(ptr), dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

template <typename Mainloop>
cudaError_t make_maps(wg::TmaMaps* maps, DType dtype, const void* e, int64_t N, const void* c,
                      int64_t V, int64_t D) {
  *maps = wg::TmaMaps{};
  if constexpr (Mainloop::kUsesTma) {
    FUSEDLM_RETURN_IF_ERROR(make_tma_map(&maps->a, dtype, e, N, D));
    FUSEDLM_RETURN_IF_ERROR(make_tma_map(&maps->b, dtype, c, V, D));
  }
  return cudaSuccess;
}

template <typename T, typename Mainloop>
cudaError_t launch_forward(const ForwardArgs& a, cudaStream_t stream) {
  const int64_t row_tiles = (a.N + kM - 1) / kM;
  const int64_t vocab_tiles = (a.V + kN - 1) / kN;
  const int tiles_per_split = static_cast<int>((vocab_tiles + a.splits - 1) / a.splits);
  constexpr int smem = Mainloop::smem_bytes();
  wg::TmaMaps maps;
  FUSEDLM_RETURN_IF_ERROR(make_maps<Mainloop>(&maps, a.dtype, a.e, a.N, a.c, a.V, a.D));
  FUSEDLM_RETURN_IF_ERROR(allow_smem(forward_kernel<T, Mainloop>, smem));
  forward_kernel<T, Mainloop>
      <<<static_cast<unsigned>(row_tiles * a.splits), Mainloop::kThreadsPerCta, smem, stream>>>(
          a, tiles_per_split, maps);
  FUSEDLM_RETURN_IF_ERROR(cudaGetLastError());
  forward_combine_kernel<<<static_cast<unsigned>((a.N + 255) / 256), 256, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t forward_typed(const ForwardArgs& a, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    if (use_wgmma(a.dtype)) return launch_forward<T, HopperNt<T>>(a, stream);
  }
  return launch_forward<T, SyncNt<T>>(a, stream);
}

template <typename T, typename Mainloop>
cudaError_t backward_typed(const BackwardArgs& a, cudaStream_t stream) {
  const int row_tiles = static_cast<int>((a.N + kM - 1) / kM);
  const unsigned d_tiles = static_cast<unsigned>((a.D + kN - 1) / kN);
  constexpr int smem_tile = Mainloop::smem_bytes();
  constexpr int smem_e = tile::smem_bytes<T, true, false>();
  constexpr int smem_c = tile::smem_bytes<T, false, false>();
  const int max_tiles = static_cast<int>(a.vocab_chunk / kN);
  FUSEDLM_RETURN_IF_ERROR(allow_smem(grad_tile_kernel<T, Mainloop>, smem_tile));
  wg::TmaMaps maps;
  FUSEDLM_RETURN_IF_ERROR(make_maps<Mainloop>(&maps, a.dtype, a.e, a.N, a.c, a.V, a.D));
  FUSEDLM_RETURN_IF_ERROR(allow_smem(grad_e_kernel<T>, smem_e + 4 * max_tiles));
  FUSEDLM_RETURN_IF_ERROR(allow_smem(grad_c_kernel<T>, smem_c + 4 * row_tiles));
  for (int64_t v0 = 0; v0 < a.V; v0 += a.vocab_chunk) {
    const int64_t chunk_len = std::min(a.vocab_chunk, a.V - v0);
    ChunkInfo ck{v0, static_cast<int>((chunk_len + kN - 1) / kN), a.vocab_chunk, row_tiles,
                 v0 == 0};
    if (a.bias_partials != nullptr) {
      FUSEDLM_RETURN_IF_ERROR(cudaMemsetAsync(
          a.bias_partials, 0, sizeof(float) * static_cast<size_t>(row_tiles) * a.vocab_chunk,
          stream));
    }
    grad_tile_kernel<T, Mainloop><<<static_cast<unsigned>(row_tiles * ck.chunk_tiles),
                                    Mainloop::kThreadsPerCta, smem_tile, stream>>>(a, ck, maps);
    FUSEDLM_RETURN_IF_ERROR(cudaGetLastError());
    grad_e_kernel<T><<<dim3(row_tiles, d_tiles), kThreads, smem_e + 4 * ck.chunk_tiles, stream>>>(
        a, ck);
    FUSEDLM_RETURN_IF_ERROR(cudaGetLastError());
    grad_c_kernel<T><<<dim3(ck.chunk_tiles, d_tiles), kThreads, smem_c + 4 * row_tiles, stream>>>(
        a, ck);
    FUSEDLM_RETURN_IF_ERROR(cudaGetLastError());
    if (a.bias_partials != nullptr) {
      bias_reduce_kernel<<<static_cast<unsigned>((chunk_len + 255) / 256), 256, 0, stream>>>(
          a, ck, chunk_len);
      FUSEDLM_RETURN_IF_ERROR(cudaGetLastError());
    }
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t backward_dispatch(const BackwardArgs& a, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    if (use_wgmma(a.dtype)) return backward_typed<T, HopperNt<T>>(a, stream);
  }
  return backward_typed<T, SyncNt<T>>(a, stream);
}

}  // namespace

int forward_splits(int64_t N, int64_t V, int num_sms) {
  const int64_t row_tiles = std::max<int64_t>(1, (N + kM - 1) / kM);
  const int64_t vocab_tiles = std::max<int64_t>(1, (V + kN - 1) / kN);
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
