// Hopper (sm_90a) main loop for "NT" tiles (both operands K-major): a 128x128 tile per CTA
// from two consumer warpgroups, each issuing wgmma.mma_async m64n128k16 on shared-memory
// operands in the 128-byte-swizzled layout that TMA writes. Compiled to real code only for
// sm_90a; the host picks it only when the device is sm_90 and the build included sm_90a
// (FUSEDLM_HAS_SM90A).
//
// Accumulator layout (per consumer thread, 64 floats = acc[0][nt][r], nt < 16): the wgmma
// D fragment: row = consumer_warpgroup*64 + warp_in_group*16 + lane/4 + (r >= 2 ? 8 : 0),
//             col = nt*8 + 2*(lane%4) + (r & 1)
#pragma once
#include <cuda.h>
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

constexpr int kM = 128, kN = 128, kK = 64;
constexpr int kTileBytes = kM * kK * 2;  // one operand tile (bf16/fp16), 16 KiB

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

// ---------------------------------------------------------------------------------------
// Warp-specialised main loop: one producer warpgroup whose first thread streams both operand
// tiles with the Tensor Memory Accelerator (cp.async.bulk.tensor, 128B swizzle) into a ring
// of kStages stages guarded by mbarriers; two consumer warpgroups issue wgmma and release
// each stage as soon as the wgmma that read it has retired. No __syncthreads in the loop.

struct TmaMaps {
  CUtensorMap a;  // [rows, D] K-major operand A (box 64 x 128, 128B swizzle)
  CUtensorMap b;  // [rows, D] K-major operand B
};

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(tile::smem_addr(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(tile::smem_addr(bar)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(tile::smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(tile::smem_addr(bar)), "r"(parity)
        : "memory");
  }
}
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar,
                                            int inner, int outer) {
#if FUSEDLM_WGMMA_ENABLED
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(
          tile::smem_addr(dst)),
      "l"(map), "r"(tile::smem_addr(bar)), "r"(inner), "r"(outer)
      : "memory");
#else
  (void)dst; (void)map; (void)bar; (void)inner; (void)outer;
  __trap();
#endif
}

template <typename T, int kStages = 4>
struct TmaWgmmaNt {
  static constexpr int kMTiles = 1, kNTiles = 16, kColGroups = 1, kKStep = kK;
  static constexpr bool kUsesTma = true;
  static constexpr int kThreadsPerCta = 384;  // producer warpgroup + 2 consumer warpgroups
  static constexpr int kRowGroups = 8;        // consumer warps, 16 rows each
  static constexpr int kScratchBytes = 4096;
  static constexpr int smem_bytes() { return kStages * 2 * kTileBytes + 1024 + 1024 + kScratchBytes; }
  __device__ static bool is_consumer() { return threadIdx.x >= 128; }
  __device__ static int row(int, int r) {
    const int warp = threadIdx.x / 32 - 4, lane = threadIdx.x % 32;  // consumer warp 0..7
    return (warp / 4) * 64 + (warp % 4) * 16 + lane / 4 + (r >= 2 ? 8 : 0);
  }
  __device__ static int col(int nt, int r) { return nt * 8 + 2 * (threadIdx.x % 4) + (r & 1); }
  __device__ static int col_group() { return 0; }
  __device__ static int row_group() { return threadIdx.x / 32 - 4; }
  __device__ static char* aligned(char* smem_raw) {
    return reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  }
  // Scratch space for epilogue reductions that never aliases a pipeline stage.
  __device__ static float* scratch(char* smem_raw) {
    return reinterpret_cast<float*>(aligned(smem_raw) + kStages * 2 * kTileBytes + 1024);
  }

  template <typename Coords, typename Done>
  __device__ static void run(float (&acc)[1][16][4], char* smem_raw, const TmaMaps& maps,
                             int64_t a_row0, int n_tiles, int k_steps, Coords&& coords, Done&& done) {
#if FUSEDLM_WGMMA_ENABLED
    char* smem = aligned(smem_raw);
    uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * 2 * kTileBytes);
    uint64_t* empty = full + kStages;
    auto stage_a = [&](int s) { return smem + s * 2 * kTileBytes; };
    auto stage_b = [&](int s) { return smem + s * 2 * kTileBytes + kTileBytes; };
    if (threadIdx.x == 0) {
      for (int s = 0; s < kStages; ++s) {
        mbar_init(&full[s], 1);
        mbar_init(&empty[s], 256);  // every consumer thread releases the stage
      }
      asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    const int steps = n_tiles * k_steps;
    if (!is_consumer()) {
      if (threadIdx.x == 0) {
        for (int step = 0; step < steps; ++step) {
          const int s = step % kStages;
          mbar_wait(&empty[s], ((step / kStages) & 1) ^ 1);
          mbar_expect_tx(&full[s], 2 * kTileBytes);
          int64_t b_row0, k0;
          coords(step, b_row0, k0);
          tma_load_2d(stage_a(s), &maps.a, &full[s], static_cast<int>(k0), static_cast<int>(a_row0));
          tma_load_2d(stage_b(s), &maps.b, &full[s], static_cast<int>(k0), static_cast<int>(b_row0));
        }
      }
      return;
    }
    float(&d)[64] = *reinterpret_cast<float(*)[64]>(&acc[0][0][0]);
    const int consumer_wg = threadIdx.x / 128 - 1;
    for (int t = 0, step = 0; t < n_tiles; ++t) {
      for (int kt = 0; kt < k_steps; ++kt, ++step) {
        const int s = step % kStages;
        mbar_wait(&full[s], (step / kStages) & 1);
        const uint64_t da = sw128_desc(stage_a(s) + consumer_wg * 64 * 128);
        const uint64_t db = sw128_desc(stage_b(s));
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kK / 16; ++kk)
          wgmma_m64n128k16<T>(d, da + 2 * kk, db + 2 * kk, (kt > 0 || kk > 0) ? 1 : 0);
        wgmma_commit();
        wgmma_wait<1>();
        if (kt > 0) mbar_arrive(&empty[(step - 1) % kStages]);  // its wgmma has retired
      }
      wgmma_wait<0>();
      mbar_arrive(&empty[(step - 1) % kStages]);
      done(t);
    }
#else
    (void)acc; (void)smem_raw; (void)maps; (void)a_row0; (void)n_tiles; (void)k_steps;
    (void)coords; (void)done;
    __trap();  // unreachable: the host only selects this path for sm_90a builds on sm_90
#endif
  }
};

}  // namespace wg
}  // namespace fusedlm
