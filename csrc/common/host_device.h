// FUSEDLM_HOST_DEVICE: functions shared by the CPU kernels and the CUDA kernels.
#pragma once

#if defined(__CUDACC__)
#define FUSEDLM_HOST_DEVICE __host__ __device__
// Small hot helpers (the sampler's Philox draws) that must inline into the device kernels.
#define FUSEDLM_HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#else
#define FUSEDLM_HOST_DEVICE
#define FUSEDLM_HOST_DEVICE_INLINE inline
#endif
