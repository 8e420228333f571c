// Small device math helpers shared by the CUDA kernels.
#pragma once

namespace fusedlm {

constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

// 2^x in one MUFU instruction. (exp2f adds a range fix-up for results below 2^-126; those
// only ever feed sums of exponentials, where they vanish, or softmax entries far below any
// filter threshold.)
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// log2(x) in one MUFU instruction: absolute error ~2^-22 for normal x (subnormals flush to 0).
__device__ __forceinline__ float fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// max(a, b), NaN if either is NaN (fmaxf returns the other operand).
__device__ __forceinline__ float fmax_nan(float a, float b) {
  float y;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
  return y;
}

}  // namespace fusedlm
