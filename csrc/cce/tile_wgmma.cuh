// Hopper (sm_90a) main loop for "NT" tiles (both operands K-major): a 128x128 logit tile per
// CTA from two warpgroups, each issuing wgmma.mma_async m64n128k16 on shared-memory operands
// in the 128-byte-swizzled layout, fed by a cp.async multi-stage pipeline (prefetch distance
// kStages - 2, one wgmma group in flight). Compiled to real code only for sm_90a; the host
// picks it only when the device is sm_90 and the build included sm_90a (FUSEDLM_HAS_SM90A).
//
// Accumulator layout (per thread, 64 floats = acc[0][nt][r], nt < 16): the wgmma D fragment
//   row = warpgroup*64 + warp_in_group*16 + lane/4 + (r >= 2 ? 8 : 0)
//   col = nt*8 + 2*(lane%4) + (r & 1)
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

#include "tile_mma.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FUSEDLM_WGMMA_ENABLED 1
#else
#define FUSEDLM_WGMMA_ENABLED 0
#endif

namespace fusedlm {
namespace wg {

constexpr int kM = 128, kN = 128, kK = 64, kThreads = 256, kStages = 4;
constexpr int kTileBytes = kM * kK * 2;  // one operand tile (bf16/fp16), 16 KiB
constexpr int kSmemBytes = kStages * 2 * kTileBytes + 1024;  // + alignment slack

// Copy a [128 rows][64 cols] K-major tile (cols contiguous in global memory) into the
// 128B-swizzled layout wgmma expects: 16-byte chunk c of row r lands at chunk c ^ (r % 8).
template <typename T>
__device__ __forceinline__ void load_tile_sw128(char* smem, const T* base, int64_t ld,
                                                int64_t row0, int64_t col0, int64_t rows_total,
                                                int64_t cols_total) {
#pragma unroll
  for (int it = 0; it < (kM * 8) / kThreads; ++it) {
    const int i = it * kThreads + threadIdx.x;
    const int r = i / 8, chunk = i % 8;
    const int64_t gr = row0 + r, gc = col0 + chunk * 8;
    const bool valid = gr < rows_total && gc < cols_total;
    const T* src = valid ? base + gr * ld + gc : base;
    tile::cp_async_16(smem + r * 128 + ((chunk ^ (r % 8)) * 16), src, valid);
  }
}

__device__ __forceinline__ uint64_t sw128_desc(const void* smem_tile) {
  const uint32_t addr = tile::smem_addr(smem_tile);
  uint64_t desc = 0;
  desc |= static_cast<uint64_t>((addr & 0x3FFFF) >> 4);  // start address
  desc |= static_cast<uint64_t>(1) << 16;                // leading byte offset (unused, SW128 K-major)
  desc |= static_cast<uint64_t>(1024 >> 4) << 32;        // stride byte offset: 8 rows x 128 B
  desc |= static_cast<uint64_t>(1) << 62;                // 128-byte swizzle
  return desc;
}

template <typename T>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                 int scale_d) {
#if FUSEDLM_WGMMA_ENABLED
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
#else
  (void)d; (void)desc_a; (void)desc_b; (void)scale_d;
  __trap();  // unreachable: the host only selects this path for sm_90a builds on sm_90
#endif
}

__device__ __forceinline__ void wgmma_fence() {
#if FUSEDLM_WGMMA_ENABLED
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if FUSEDLM_WGMMA_ENABLED
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if FUSEDLM_WGMMA_ENABLED
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
__device__ __forceinline__ void fence_proxy_async() {
#if FUSEDLM_WGMMA_ENABLED
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Main-loop policy with the same interface as tile::SyncNt (see cce_cuda.cu).
template <typename T>
struct WgmmaNt {
  static constexpr int kMTiles = 1, kNTiles = 16, kColGroups = 1, kKStep = kK;
  static constexpr int smem_bytes() { return kSmemBytes; }
  __device__ static int row(int, int r) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    return (warp / 4) * 64 + (warp % 4) * 16 + lane / 4 + (r >= 2 ? 8 : 0);
  }
  __device__ static int col(int nt, int r) { return nt * 8 + 2 * (threadIdx.x % 4) + (r & 1); }
  __device__ static int col_group() { return 0; }

  // n_tiles output tiles of k_steps k-steps each; coords(step, b_row0, k0) locates a step's
  // operands; done(tile) runs with the tile's complete accumulator (all wgmma retired).
  // The epilogue sits outside the k-loop so the compiler can keep one wgmma group in flight.
  template <typename Coords, typename Done>
  __device__ static void run(float (&acc)[1][16][4], char* smem_raw, const T* a, int64_t a_rows,
                             int64_t a_row0, const T* b, int64_t b_rows, int64_t D, int n_tiles,
                             int k_steps, Coords&& coords, Done&& done) {
    char* smem = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    auto stage_a = [&](int s) { return smem + s * 2 * kTileBytes; };
    auto stage_b = [&](int s) { return smem + s * 2 * kTileBytes + kTileBytes; };
    const int steps = n_tiles * k_steps;
    auto load = [&](int step) {
      int64_t b_row0, k0;
      coords(step, b_row0, k0);
      const int s = step % kStages;
      load_tile_sw128<T>(stage_a(s), a, D, a_row0, k0, a_rows, D);
      load_tile_sw128<T>(stage_b(s), b, D, b_row0, k0, b_rows, D);
    };
    float(&d)[64] = *reinterpret_cast<float(*)[64]>(&acc[0][0][0]);
    const int warpgroup = threadIdx.x / 128;
#pragma unroll
    for (int s = 0; s < kStages - 2; ++s) {
      if (s < steps) load(s);
      tile::cp_async_commit();
    }
    for (int t = 0, step = 0; t < n_tiles; ++t) {
      for (int kt = 0; kt < k_steps; ++kt, ++step) {
        tile::cp_async_wait<kStages - 3>();
        fence_proxy_async();  // this thread's cp.async writes -> visible to the tensor cores
        __syncthreads();
        if (step + kStages - 2 < steps) load(step + kStages - 2);
        tile::cp_async_commit();
        const int s = step % kStages;
        const uint64_t da = sw128_desc(stage_a(s) + warpgroup * 64 * 128);
        const uint64_t db = sw128_desc(stage_b(s));
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kK / 16; ++kk) {
          // +32 bytes along K inside the swizzled 128-byte rows (descriptor units of 16 B);
          // the tile's first wgmma overwrites the accumulator (scale-d = 0).
          wgmma_m64n128k16<T>(d, da + 2 * kk, db + 2 * kk, (kt > 0 || kk > 0) ? 1 : 0);
        }
        wgmma_commit();
        wgmma_wait<1>();
      }
      wgmma_wait<0>();
      done(t);
    }
    tile::cp_async_wait<0>();
    __syncthreads();
  }
};

}  // namespace wg
}  // namespace fusedlm
