// FUSEDLM_HOST_DEVICE: functions shared by the CPU kernels and the CUDA kernels.
#pragma once

#if defined(__CUDACC__)
#define FUSEDLM_HOST_DEVICE __host__ __device__
#else
#define FUSEDLM_HOST_DEVICE
#endif
