// A 128x128 output tile computed by 8 warps with warp-level tensor-core MMA (sm_80+):
// mma.sync m16n8k16 for bf16/fp16 operands (ldmatrix fragment loads) and m16n8k8 TF32 for
// float32 operands, fed from a multi-stage cp.async shared-memory pipeline.
//
// Operands are tiles of row-major global matrices. An operand is "K-major" when its
// reduction index is the contiguous one (e and c in the forward), else "MN-major".
// The accumulator layout (per thread) is the mma C fragment, identical for both MMA shapes:
//   acc[mt][nt][r]: row = warp_m*64 + mt*16 + lane/4 + (r >= 2 ? 8 : 0)
//                   col = warp_n*32 + nt*8 + 2*(lane%4) + (r & 1)
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace fusedlm {
namespace tile {

constexpr int kM = 128, kN = 128, kK = 32, kThreads = 256;
constexpr int kWarpM = 64, kWarpN = 32, kMTiles = 4, kNTiles = 4;

template <typename T>
struct Traits;
template <>
struct Traits<__nv_bfloat16> {
  static constexpr int kChunk = 8;  // elements per 16-byte cp.async
  static constexpr int kStages = 4;
};
template <>
struct Traits<__half> {
  static constexpr int kChunk = 8;
  static constexpr int kStages = 4;
};
template <>
struct Traits<float> {
  static constexpr int kChunk = 4;
  static constexpr int kStages = 3;
};

// Shared-memory leading dimension of a tile, padded so fragment loads are conflict-free.
template <typename T, bool KMajor>
__host__ __device__ constexpr int smem_ld() {
  return KMajor ? kK + (sizeof(T) == 4 ? 4 : 8) : kM + 8;
}
template <typename T, bool KMajor>
__host__ __device__ constexpr int smem_tile_elems() {
  return KMajor ? kM * smem_ld<T, KMajor>() : kK * smem_ld<T, KMajor>();
}
template <typename T, bool AKMajor, bool BKMajor>
__host__ __device__ constexpr int smem_bytes() {
  return Traits<T>::kStages *
         (smem_tile_elems<T, AKMajor>() + smem_tile_elems<T, BKMajor>()) * (int)sizeof(T);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  // src-size 0 zero-fills the 16 bytes: out-of-range rows/columns read as zeros.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Copy a tile of a row-major matrix (rows x cols, row stride ld, element (r, c) at
// base[r*ld + c]) into shared memory. K-major tile: kM rows x kK cols; MN-major: kK x kM.
// Rows >= rows_total or column chunks >= cols_total are zero-filled (cols_total must be a
// multiple of the chunk size).
template <typename T, bool KMajor>
__device__ __forceinline__ void load_tile(T* smem, const T* base, int64_t ld, int64_t row0,
                                          int64_t col0, int64_t rows_total, int64_t cols_total) {
  constexpr int kChunk = Traits<T>::kChunk;
  constexpr int kRows = KMajor ? kM : kK;
  constexpr int kCols = KMajor ? kK : kM;
  constexpr int kChunksPerRow = kCols / kChunk;
  constexpr int kTotal = kRows * kChunksPerRow;
  constexpr int kLd = smem_ld<T, KMajor>();
  static_assert(kTotal % kThreads == 0, "tile copy must divide evenly among threads");
#pragma unroll
  for (int it = 0; it < kTotal / kThreads; ++it) {
    const int i = it * kThreads + threadIdx.x;
    const int r = i / kChunksPerRow;
    const int cc = (i % kChunksPerRow) * kChunk;
    const int64_t gr = row0 + r, gc = col0 + cc;
    const bool valid = gr < rows_total && gc < cols_total;
    const T* src = valid ? base + gr * ld + gc : base;
    cp_async_16(smem + r * kLd + cc, src, valid);
  }
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4],
                                              const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

// acc += A_tile (kM x kK) * B_tile^T (kK x kN) for one shared-memory stage.
template <typename T, bool AKMajor, bool BKMajor>
__device__ __forceinline__ void mma_stage(float (&acc)[kMTiles][kNTiles][4], const T* sa,
                                          const T* sb, int warp_m, int warp_n, int lane) {
  constexpr int kLdA = smem_ld<T, AKMajor>();
  constexpr int kLdB = smem_ld<T, BKMajor>();
  if constexpr (sizeof(T) == 2) {
#pragma unroll
    for (int kk = 0; kk < kK; kk += 16) {
      uint32_t a[kMTiles][4];
      uint32_t b[kNTiles][2];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        const int m0 = warp_m * kWarpM + mt * 16;
        if constexpr (AKMajor) {
          ldmatrix_x4(a[mt], sa + (m0 + (lane % 16)) * kLdA + kk + (lane / 16) * 8);
        } else {
          ldmatrix_x4_trans(a[mt], sa + (kk + (lane % 8) + (lane / 16) * 8) * kLdA + m0 +
                                       ((lane / 8) % 2) * 8);
        }
      }
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        const int n0 = warp_n * kWarpN + np * 16;
        uint32_t r[4];
        if constexpr (BKMajor) {
          ldmatrix_x4(r, sb + (n0 + (lane % 8) + (lane / 16) * 8) * kLdB + kk +
                             ((lane / 8) % 2) * 8);
        } else {
          ldmatrix_x4_trans(r, sb + (kk + (lane % 8) + ((lane / 8) % 2) * 8) * kLdB + n0 +
                                   (lane / 16) * 8);
        }
        b[2 * np][0] = r[0];
        b[2 * np][1] = r[1];
        b[2 * np + 1][0] = r[2];
        b[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) mma_16816<T>(acc[mt][nt], a[mt], b[nt]);
    }
  } else {
    const int g = lane / 4, t = lane % 4;
    auto at = [&](int m, int k) { return AKMajor ? sa[m * kLdA + k] : sa[k * kLdA + m]; };
    auto bt = [&](int n, int k) { return BKMajor ? sb[n * kLdB + k] : sb[k * kLdB + n]; };
#pragma unroll
    for (int kk = 0; kk < kK; kk += 8) {
      uint32_t a[kMTiles][4];
      uint32_t b[kNTiles][2];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        const int m0 = warp_m * kWarpM + mt * 16 + g;
        a[mt][0] = to_tf32(at(m0, kk + t));
        a[mt][1] = to_tf32(at(m0 + 8, kk + t));
        a[mt][2] = to_tf32(at(m0, kk + t + 4));
        a[mt][3] = to_tf32(at(m0 + 8, kk + t + 4));
      }
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
        const int n0 = warp_n * kWarpN + nt * 8 + g;
        b[nt][0] = to_tf32(bt(n0, kk + t));
        b[nt][1] = to_tf32(bt(n0, kk + t + 4));
      }
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) mma_1688_tf32(acc[mt][nt], a[mt], b[nt]);
    }
  }
}

__device__ __forceinline__ void zero(float (&acc)[kMTiles][kNTiles][4]) {
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mt][nt][r] = 0.f;
}

// Pipelined main loop over `steps` (k-steps of kK), possibly spanning several output
// tiles: load(stage_ptrs, step) issues the cp.async copies of one step, done(step) is
// called after the MMA of each step (it runs the epilogue when an output tile completes).
template <typename T, bool AKMajor, bool BKMajor, typename LoadFn, typename DoneFn>
__device__ __forceinline__ void pipeline(float (&acc)[kMTiles][kNTiles][4], char* smem,
                                         int steps, LoadFn&& load, DoneFn&& done) {
  constexpr int kStages = Traits<T>::kStages;
  constexpr int kA = smem_tile_elems<T, AKMajor>();
  constexpr int kB = smem_tile_elems<T, BKMajor>();
  T* base = reinterpret_cast<T*>(smem);
  auto stage_a = [&](int s) { return base + s * (kA + kB); };
  auto stage_b = [&](int s) { return base + s * (kA + kB) + kA; };
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = warp / 4, warp_n = warp % 4;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) load(stage_a(s), stage_b(s), s);
    cp_async_commit();
  }
  for (int step = 0; step < steps; ++step) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage `step` visible; everyone is done with stage step-1
    const int next = step + kStages - 1;
    if (next < steps) load(stage_a(next % kStages), stage_b(next % kStages), next);
    cp_async_commit();
    mma_stage<T, AKMajor, BKMajor>(acc, stage_a(step % kStages), stage_b(step % kStages),
                                   warp_m, warp_n, lane);
    done(step);
  }
  cp_async_wait<0>();
  __syncthreads();  // shared memory may be reused after the loop
}

}  // namespace tile
}  // namespace fusedlm
