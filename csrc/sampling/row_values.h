// Per-row rules shared by the CPU and CUDA sampling kernels (and the CPU op's checks).
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>

#include "../common/host_device.h"

namespace fusedlm {
namespace sampling {

// The per-row values a row needs to be drawn. A row with any other value returns token 0 and
// NaN log-probs (the CPU op raises instead, naming the value; CUDA tensors are not read on
// the host).
FUSEDLM_HOST_DEVICE inline bool valid_temperature(float tau) { return tau >= 0.0f && tau < INFINITY; }  // (false for NaN)
FUSEDLM_HOST_DEVICE inline bool valid_top_k(int64_t k) { return k >= 0; }
FUSEDLM_HOST_DEVICE inline bool valid_top_p(float p) { return p > 0.0f && p <= 1.0f; }
FUSEDLM_HOST_DEVICE inline bool valid_min_p(float p) { return p >= 0.0f && p <= 1.0f; }

// The seed of row `row` of a batch drawn with one seed (an int given to fusedlm.sample):
// distinct streams per row, so that identical rows do not draw identical tokens; 62 bits, as
// the seeds fusedlm.sample draws from torch's generator.
FUSEDLM_HOST_DEVICE inline uint64_t derived_row_seed(uint64_t seed, int64_t row) {
  return (static_cast<uint64_t>(row) * 0x5851F42D4C957F2DULL + seed) & ((uint64_t{1} << 62) - 1);
}

// A logit as it enters sums: +inf counts as the largest float, so a row holding any draws
// uniformly among its +inf entries (log-prob -log(their count)) instead of forming NaN sums.
// (NaN stays NaN.)
FUSEDLM_HOST_DEVICE inline float finite_logit(float x) { return x == INFINITY ? FLT_MAX : x; }

}  // namespace sampling
}  // namespace fusedlm
