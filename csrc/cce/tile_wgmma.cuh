// Hopper (sm_90a) warp-specialised main loop: one producer warpgroup streams operand tiles
// with the Tensor Memory Accelerator (TMA, 128-byte swizzle) into a ring of shared-memory
// stages guarded by mbarriers; two consumer warpgroups issue wgmma.mma_async on them, each
// owning 64 rows of a 128 x kBlockN output tile (kBlockN = 128 or 256). Operands may be
// K-major (forward / logit recompute: e and c both have K = D contiguous) or MN-major (the
// backward GEMMs, which read G, c and e along their rows): wgmma transposes MN-major 16-bit
// operands itself, so nothing is transposed in memory. Register budget: the producer gives
// its registers to the consumers (setmaxnreg 40 / 232) so a 128 x 256 fp32 accumulator fits.
// Compiled to real code only for sm_90a; the host picks it only when the device is sm_90 and
// the build included sm_90a (FUSEDLM_HAS_SM90A).
//
// Accumulator layout (per consumer thread, kBlockN / 2 floats = acc[0][nt][r]): the wgmma
// D fragment: row = consumer_warpgroup*64 + warp_in_group*16 + lane/4 + (r >= 2 ? 8 : 0),
//             col = nt*8 + 2*(lane%4) + (r & 1)
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

#include "tile_mma.cuh"
#include "wgmma_ops.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FUSEDLM_WGMMA_ENABLED 1
#else
#define FUSEDLM_WGMMA_ENABLED 0
#endif

namespace fusedlm {
namespace wg {

constexpr int kM = 128, kK = 64;         // output rows per CTA; K elements per pipeline stage
constexpr int kBoxBytes = 64 * 64 * 2;   // one 64 x 64 16-bit TMA box (MN-major operands)

enum class Major { K, MN };

// wgmma shared-memory descriptor of a 128B-swizzled operand (canonical layouts of the PTX
// ISA). K-major: rows of 64 K-elements (128 B), 8-row groups 1024 B apart (stride offset);
// the leading offset is unused. MN-major: rows of 64 MN-elements, one per k, 8-row groups
// 1024 B apart; consecutive 64-wide MN blocks (separate TMA boxes) kBoxBytes apart (leading
// offset).
template <Major kMajor>
__device__ __forceinline__ uint64_t sw128_desc(const void* smem_tile) {
  const uint32_t addr = tile::smem_addr(smem_tile);
  const uint64_t leading = kMajor == Major::K ? 1 : kBoxBytes >> 4;
  uint64_t desc = 0;
  desc |= static_cast<uint64_t>((addr & 0x3FFFF) >> 4);  // start address
  desc |= leading << 16;                                 // leading byte offset
  desc |= static_cast<uint64_t>(1024 >> 4) << 32;        // stride byte offset
  desc |= static_cast<uint64_t>(1) << 62;                // 128-byte swizzle
  return desc;
}
// Descriptor increment (16-byte units) that moves an operand 16 elements along K.
template <Major kMajor>
constexpr uint64_t kK16Advance = kMajor == Major::K ? 32 >> 4 : (16 * 128) >> 4;

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
// Per-warpgroup register budget (must be executed by all warps of the warpgroup).
template <int kRegs>
__device__ __forceinline__ void release_registers() {
#if FUSEDLM_WGMMA_ENABLED
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}
template <int kRegs>
__device__ __forceinline__ void claim_registers() {
#if FUSEDLM_WGMMA_ENABLED
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}
// Barriers among the 256 consumer threads only (named barrier 1; 0 is __syncthreads).
__device__ __forceinline__ void consumer_sync() {
  asm volatile("bar.sync 1, 256;\n" ::: "memory");
}
// Barrier among the 128 threads of consumer warpgroup wg (named barriers 2 and 3).
__device__ __forceinline__ void warpgroup_sync(int wg) {
  asm volatile("bar.sync %0, 128;\n" ::"r"(2 + wg) : "memory");
}
// OR of pred over the 128 threads of consumer warpgroup wg (its named barrier, 2 or 3).
__device__ __forceinline__ bool warpgroup_sync_or(int wg, bool pred) {
  uint32_t out;
  asm volatile(
      "{\n.reg .pred p, q;\nsetp.ne.u32 p, %1, 0;\nbar.red.or.pred q, %2, 128, p;\n"
      "selp.u32 %0, 1, 0, q;\n}\n"
      : "=r"(out)
      : "r"(static_cast<uint32_t>(pred)), "r"(2 + wg)
      : "memory");
  return out != 0;
}
__device__ __forceinline__ bool consumer_sync_or(bool pred) {
  uint32_t out;
  asm volatile(
      "{\n.reg .pred p, q;\nsetp.ne.u32 p, %1, 0;\nbar.red.or.pred q, 1, 256, p;\n"
      "selp.u32 %0, 1, 0, q;\n}\n"
      : "=r"(out)
      : "r"(static_cast<uint32_t>(pred))
      : "memory");
  return out != 0;
}

struct TmaMaps {
  CUtensorMap a;  // operand A: K-major box 64 x 128, or MN-major box 64 x 64 (128B swizzle)
  CUtensorMap b;  // operand B: K-major box 64 x kBlockN, or MN-major box 64 x 64
  CUtensorMap a_half;  // K-major A in boxes of 64 x 64 (block-sparse steps loading one half)
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

// Loads a K-major box into the same shared-memory offset of every CTA in cta_mask (a 2-CTA
// cluster sharing an operand tile); each destination's mbarrier at `bar`'s offset receives
// the bytes.
__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const CUtensorMap* map, uint64_t* bar,
                                                      int inner, int outer, uint16_t cta_mask) {
#if FUSEDLM_WGMMA_ENABLED
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%3, %4}], [%2], %5;\n" ::"r"(tile::smem_addr(dst)),
      "l"(map), "r"(tile::smem_addr(bar)), "r"(inner), "r"(outer), "h"(cta_mask)
      : "memory");
#else
  (void)dst; (void)map; (void)bar; (void)inner; (void)outer; (void)cta_mask;
  __trap();
#endif
}
// Arrives on the mbarrier at `bar`'s shared-memory offset in CTA `cta` of the cluster.
__device__ __forceinline__ void mbar_arrive_cluster(uint64_t* bar, uint32_t cta) {
#if FUSEDLM_WGMMA_ENABLED
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(tile::smem_addr(bar)), "r"(cta));
  // Default (.release.cta) semantics: a .cluster-scope release would add a MEMBAR.GPU per
  // arrival, and the stage's wgmma reads have already retired.
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(remote) : "memory");
#else
  (void)bar; (void)cta;
#endif
}
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t rank = 0;
#if FUSEDLM_WGMMA_ENABLED
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
#endif
  return rank;
}
// Barrier over every thread of every CTA in the cluster.
__device__ __forceinline__ void cluster_sync() {
#if FUSEDLM_WGMMA_ENABLED
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
#endif
}

// ---- Epilogue stores through shared memory (TMA store) ----
// Stores four 8x8 matrices of 16-bit values (stmatrix .x4): lane l gives the shared address of
// row l % 8 of matrix l / 8, and register j holds this lane's two adjacent values of matrix j in
// the mma accumulator layout (row lane / 4, columns 2 * (lane % 4) + {0, 1}).
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
#if FUSEDLM_WGMMA_ENABLED
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r0), "r"(r1),
               "r"(r2), "r"(r3)
               : "memory");
#else
  (void)addr; (void)r0; (void)r1; (void)r2; (void)r3;
#endif
}
// Makes this thread's shared-memory writes visible to the TMA (async proxy).
__device__ __forceinline__ void fence_async_shared() {
#if FUSEDLM_WGMMA_ENABLED
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Stores a box from shared memory to global memory (one bulk group per commit).
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, const void* src, int inner, int outer) {
#if FUSEDLM_WGMMA_ENABLED
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"(map),
               "r"(tile::smem_addr(src)), "r"(inner), "r"(outer)
               : "memory");
#else
  (void)map; (void)src; (void)inner; (void)outer;
#endif
}
// Adds a float32 box from shared memory into global memory: the L2 does the
// read-modify-write of whole lines (out-of-range elements are skipped, as in a store).
__device__ __forceinline__ void tma_reduce_add_2d(const CUtensorMap* map, const void* src, int inner, int outer) {
#if FUSEDLM_WGMMA_ENABLED
  asm volatile("cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"(
                   map),
               "r"(tile::smem_addr(src)), "r"(inner), "r"(outer)
               : "memory");
#else
  (void)map; (void)src; (void)inner; (void)outer;
#endif
}
__device__ __forceinline__ void bulk_commit() {
#if FUSEDLM_WGMMA_ENABLED
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most N committed bulk stores still read their shared-memory source.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
#if FUSEDLM_WGMMA_ENABLED
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
#endif
}
// Waits until every committed bulk store has completed (its global writes done).
__device__ __forceinline__ void bulk_wait_all() {
#if FUSEDLM_WGMMA_ENABLED
  asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
#endif
}

// Loads one stage of an operand: kRows (M or N) x 64 (K) elements. K-major: a single box at
// (k0, mn0); MN-major: kRows / 64 boxes of 64 MN x 64 K at (mn0 + 64 i, k0).
template <Major kMajor, int kRows>
__device__ __forceinline__ void load_operand(char* dst, const CUtensorMap* map, uint64_t* bar,
                                             int64_t mn0, int64_t k0) {
  if constexpr (kMajor == Major::K) {
    tma_load_2d(dst, map, bar, static_cast<int>(k0), static_cast<int>(mn0));
  } else {
#pragma unroll
    for (int i = 0; i < kRows / 64; ++i)
      tma_load_2d(dst + i * kBoxBytes, map, bar, static_cast<int>(mn0 + 64 * i), static_cast<int>(k0));
  }
}
// Loads the 64-row (MN) halves set in `halves` of a 128-row A stage (both layouts place half
// i kBoxBytes i into the stage; K-major: `map` has boxes of 64 rows).
template <Major kMajor>
__device__ __forceinline__ void load_a_halves(char* dst, const CUtensorMap* map, uint64_t* bar, int64_t mn0,
                                              int64_t k0, int halves) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (!(halves >> i & 1)) continue;
    if constexpr (kMajor == Major::K)
      tma_load_2d(dst + i * kBoxBytes, map, bar, static_cast<int>(k0), static_cast<int>(mn0 + 64 * i));
    else
      tma_load_2d(dst + i * kBoxBytes, map, bar, static_cast<int>(mn0 + 64 * i), static_cast<int>(k0));
  }
}

// Where step `step` of the main loop reads its operands (element coordinates).
struct StepCoords {
  int64_t a_mn, a_k, b_mn, b_k;
};
// run()'s block sparsity (`a_halves`): by default both halves of A are used at every step.
struct BothHalves {
  __device__ int operator()(int) const { return 3; }
};

// kCluster = 2: the kernel runs in clusters of two CTAs that own adjacent row tiles and walk
// the same B tiles (same n_tiles, k_steps and B coordinates); each CTA loads half of every B
// stage and multicasts it to both, halving the L2 -> SM traffic of B (K-major B only). A
// stage is refilled once the consumers of both CTAs have released it.
// kStagingBytes > 0: the epilogue scratch is at least that large (and 1024-byte aligned), for
// output tiles staged in shared memory and stored by TMA.
template <typename T, int kTileN, int kStages, Major kMajorA = Major::K, Major kMajorB = Major::K,
          int kCluster = 1, int kStaging = 0>
struct TmaWgmma {
  static_assert(kCluster == 1 || (kCluster == 2 && kMajorB == Major::K), "B multicast: K-major B");
  static constexpr int kClusterSize = kCluster;
  static constexpr int kBBoxRows = kTileN / kCluster;  // rows of B per TMA box
  // One CTA per SM; of its 65536 registers the producer keeps 40 per thread, consumers 232.
  static constexpr int kMinCtasPerSm = 1;
  static constexpr int kProducerRegs = 40, kConsumerRegs = 232;
  static_assert(kTileN == 128 || kTileN == 256, "wgmma tile width");
  static constexpr int kBlockM = kM, kBlockN = kTileN;
  static constexpr int kMTiles = 1, kNTiles = kBlockN / 8, kColGroups = 1, kKStep = kK;
  static constexpr bool kUsesTma = true;
  static constexpr int kThreadsPerCta = 384;  // producer warpgroup + 2 consumer warpgroups
  static constexpr int kConsumerThreads = 256;
  static constexpr int kRowGroups = 8;        // consumer warps, 16 rows each
  static constexpr int kABytes = kM * kK * 2, kBBytes = kBlockN * kK * 2;
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kPipelineBytes = kStages * kStageBytes;  // the stages, from aligned(smem_raw)
  // Epilogue scratch: reductions [kRowGroups][kBlockN] floats, then one tile's bias values;
  // or (sharing the space) the staging buffers of TMA stores.
  static constexpr int kStagingBytes = kStaging;
  static constexpr int kScratchBytes = (kRowGroups + 1) * kBlockN * 4 > kStaging ? (kRowGroups + 1) * kBlockN * 4 : kStaging;
  __host__ __device__ static constexpr int smem_bytes() {
    return kPipelineBytes + 1024 + 1024 + kScratchBytes;
  }
  static_assert(smem_bytes() <= 227 * 1024, "shared memory per CTA");

  __device__ static bool is_consumer() { return threadIdx.x >= 128; }
  __device__ static int consumer_index() { return threadIdx.x - 128; }
  __device__ static void sync_consumers() { consumer_sync(); }
  __device__ static bool sync_consumers_or(bool p) { return consumer_sync_or(p); }
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
    return reinterpret_cast<float*>(aligned(smem_raw) + kPipelineBytes + 1024);
  }
  __device__ static float* bias_scratch(char* smem_raw) {
    return scratch(smem_raw) + kRowGroups * kBlockN;
  }

  // A consumer warp frees a stage: in a cluster, for the producers of every CTA (each
  // wrote part of it).
  __device__ static void release(uint64_t* empty_bar) {
    if constexpr (kCluster > 1) {
#pragma unroll
      for (uint32_t cta = 0; cta < kCluster; ++cta) mbar_arrive_cluster(empty_bar, cta);
    } else {
      mbar_arrive(empty_bar);
    }
  }

  // Runs n_tiles output tiles of k_steps stages each; coords(step) says where step reads.
  // Block-sparse GEMMs pass a_halves(step): bit w set if consumer warpgroup w multiplies the
  // step (its 64 rows of A are used, and only those halves are loaded); steps with neither
  // take no stage. (A warpgroup never reads the half it does not multiply; K-major A is then
  // loaded through maps.a_half.)
  // The producer warpgroup returns as soon as it has issued every load: callers must not
  // use __syncthreads afterwards (sync_consumers is the consumer-only barrier). Consumers
  // call done(tile, acc) with the finished accumulator of each tile. The accumulator is
  // only written by consumers: initialising it before run() would keep it live in the
  // producer, whose register budget is too small for it. (Overlapping the epilogue with the
  // next tile's first wgmmas through a second accumulator made ptxas serialise the wgmmas:
  // C7518.)
  template <typename Coords, typename Done, typename AHalves = BothHalves>
  __device__ static void run(float (&acc)[1][kNTiles][4], char* smem_raw, const TmaMaps& maps,
                             int n_tiles, int k_steps, Coords&& coords, Done&& done,
                             AHalves&& a_halves = BothHalves{}) {
#if FUSEDLM_WGMMA_ENABLED
    constexpr bool kDense = std::is_same_v<std::decay_t<AHalves>, BothHalves>;
    static_assert(kDense || kCluster == 1, "block-sparse steps: the CTAs of a cluster fill the same stages");
    char* smem = aligned(smem_raw);
    uint64_t* full = reinterpret_cast<uint64_t*>(smem + kPipelineBytes);
    uint64_t* empty = full + kStages;
    auto stage_a = [&](int s) { return smem + s * kStageBytes; };
    auto stage_b = [&](int s) { return smem + s * kStageBytes + kABytes; };
    if (threadIdx.x == 0) {
      for (int s = 0; s < kStages; ++s) {
        mbar_init(&full[s], 1);
        mbar_init(&empty[s], kCluster * kConsumerThreads / 32);  // one arrival per consumer warp
      }
      asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    // The peer CTA's loads and arrivals target these barriers: all must be initialised first.
    if constexpr (kCluster > 1) cluster_sync(); else __syncthreads();
    const uint32_t rank = kCluster > 1 ? cluster_rank() : 0;
    const int steps = n_tiles * k_steps;
    if (!is_consumer()) {
      release_registers<kProducerRegs>();
      if (threadIdx.x == 0) {
        for (int step = 0, filled = 0; step < steps; ++step) {
          const int halves = a_halves(step);
          if (!kDense && halves == 0) continue;
          const int it = kDense ? step : filled++;  // stages filled before this one
          const int s = it % kStages;
          mbar_wait(&empty[s], ((it / kStages) & 1) ^ 1);
          const StepCoords c = coords(step);
          if constexpr (kDense) {
            mbar_expect_tx(&full[s], kStageBytes);  // both halves of B land in every CTA
            load_operand<kMajorA, kM>(stage_a(s), &maps.a, &full[s], c.a_mn, c.a_k);
          } else {
            mbar_expect_tx(&full[s], kBBytes + __popc(halves) * (kABytes / 2));
            load_a_halves<kMajorA>(stage_a(s), kMajorA == Major::K ? &maps.a_half : &maps.a, &full[s], c.a_mn,
                                   c.a_k, halves);
          }
          if constexpr (kCluster > 1) {
            constexpr int kHalfBytes = kBBoxRows * kK * 2;
            tma_load_2d_multicast(stage_b(s) + rank * kHalfBytes, &maps.b, &full[s], static_cast<int>(c.b_k),
                                  static_cast<int>(c.b_mn + rank * kBBoxRows), (1u << kCluster) - 1);
          } else {
            load_operand<kMajorB, kBlockN>(stage_b(s), &maps.b, &full[s], c.b_mn, c.b_k);
          }
        }
      }
      // No CTA may exit while its peer can still arrive on its barriers.
      if constexpr (kCluster > 1) {
        __syncwarp();
        cluster_sync();
      }
      return;
    }
    claim_registers<kConsumerRegs>();
    float(&d)[kBlockN / 2] = *reinterpret_cast<float(*)[kBlockN / 2]>(&acc[0][0][0]);
    const int consumer_wg = threadIdx.x / 128 - 1;
    const bool warp_leader = threadIdx.x % 32 == 0;
    constexpr int kTransA = kMajorA == Major::MN, kTransB = kMajorB == Major::MN;
    // Issues stage s's wgmmas and waits until those of the step before have retired.
    auto multiply = [&](int s, bool accumulate) {
      // Both layouts place this warpgroup's 64 rows of A 8 KiB into the stage.
      const uint64_t da = sw128_desc<kMajorA>(stage_a(s) + consumer_wg * kBoxBytes);
      const uint64_t db = sw128_desc<kMajorB>(stage_b(s));
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kK / 16; ++kk)
        Wgmma<T, kBlockN, kTransA, kTransB>::run(d, da + kk * kK16Advance<kMajorA>,
                                                 db + kk * kK16Advance<kMajorB>, (accumulate || kk > 0) ? 1 : 0);
      wgmma_commit();
      wgmma_wait<1>();
    };
    if constexpr (kDense) {
      if (k_steps == 0) {  // otherwise the first wgmma of a tile overwrites (scale_d = 0)
#pragma unroll
        for (int i = 0; i < kBlockN / 2; ++i) d[i] = 0.f;
      }
    }
    int it = 0;  // (block-sparse) stages consumed so far
    for (int t = 0, step = 0; t < n_tiles; ++t) {
      if constexpr (kDense) {
        for (int kt = 0; kt < k_steps; ++kt, ++step) {
          const int s = step % kStages;
          mbar_wait(&full[s], (step / kStages) & 1);
          multiply(s, kt > 0);
          // The wgmmas of the previous step have retired: release its stage (one arrival
          // per warp).
          if (kt >= 1) {
            __syncwarp();
            if (warp_leader) release(&empty[(step - 1) % kStages]);
          }
        }
        wgmma_wait<0>();
        __syncwarp();
        if (k_steps >= 1 && warp_leader) release(&empty[(step - 1) % kStages]);
      } else {
        // A taken step's stage is released once the next taken step's wgmmas are issued and
        // the earlier ones have retired; a loaded step not taken, as soon as it has landed
        // (the producer must not refill a stage still being written). (The wgmmas are not
        // under a branch of their own: ptxas serialised them there, C7520.)
        int kt = 0, held = -1;  // next step of the tile; the taken stage not yet released
        bool started = false;   // the tile's first wgmma overwrites the accumulator
        while (true) {
          for (; kt < k_steps && !(a_halves(step + kt) >> consumer_wg & 1); ++kt) {
            if (a_halves(step + kt) == 0) continue;
            if (held >= 0) {  // (else its stage could be the one the producer waits to refill)
              wgmma_wait<0>();
              __syncwarp();
              if (warp_leader) release(&empty[held % kStages]);
              held = -1;
            }
            const int s = it % kStages;
            mbar_wait(&full[s], (it / kStages) & 1);
            __syncwarp();
            if (warp_leader) release(&empty[s]);
            ++it;
          }
          if (kt == k_steps) break;
          const int s = it % kStages;
          mbar_wait(&full[s], (it / kStages) & 1);
          multiply(s, started);
          if (held >= 0) {
            __syncwarp();
            if (warp_leader) release(&empty[held % kStages]);
          }
          held = it++;
          started = true;
          ++kt;
        }
        wgmma_wait<0>();
        __syncwarp();
        if (held >= 0 && warp_leader) release(&empty[held % kStages]);
        if (!started) {  // no step taken: the tile is zero
#pragma unroll
          for (int i = 0; i < kBlockN / 2; ++i) d[i] = 0.f;
        }
        step += k_steps;
      }
      done(t, acc);
    }
    if constexpr (kCluster > 1) cluster_sync();
#else
    (void)acc; (void)smem_raw; (void)maps; (void)n_tiles; (void)k_steps; (void)coords; (void)done; (void)a_halves;
    __trap();  // unreachable: the host only selects this path for sm_90a builds on sm_90
#endif
  }
};

}  // namespace wg
}  // namespace fusedlm
