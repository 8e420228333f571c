// The gradient filter's rule for a row's target entry, shared by the CPU and CUDA kernels
// (ATen- and CUDA-free).
#pragma once

#include "../common/host_device.h"

namespace fusedlm {

// Whether a row's target entry may be skipped by the filter: its gradient
// grad_lse * p + grad_target (before the softcap factor) is below filter_eps * |grad_lse|,
// the bound the filter puts on every other entry (grad_lse * p with p < filter_eps). For
// cross-entropy: |p - 1| < filter_eps, a confidently right token. NaNs are never negligible
// (a NaN loss keeps NaN gradients).
template <typename T>
FUSEDLM_HOST_DEVICE inline bool target_negligible(T grad_lse, T grad_target, T p, T filter_eps) {
  const T g = grad_lse * p + grad_target;
  const T abs_g = g < T(0) ? -g : g, abs_l = grad_lse < T(0) ? -grad_lse : grad_lse;
  return abs_g < filter_eps * abs_l || (grad_lse == T(0) && grad_target == T(0));
}

}  // namespace fusedlm
