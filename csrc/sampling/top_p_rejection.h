// Top-p by rejection: which rows take it (shared by the CPU and CUDA sampling kernels).
//
// On tokens-only calls with top-p alone (no top-k or min-p tensor given) and
// kRejectionMinTopP <= top_p < 1, a row is first drawn from the whole tempered distribution
// (Philox round 0); the draw is kept if it lies in the top-p set, an event of probability
// >= top_p, and is then distributed exactly as a draw from that set. Otherwise the row is drawn
// from the set itself, with round 1 noise (independent of the rejected draw). On CUDA the first
// draw costs one pass over the row and its test one more, instead of the four of the
// threshold's selection. Below kRejectionMinTopP rejections would be frequent: such rows take
// the threshold path at once, with round 0.
#pragma once
#include "../common/host_device.h"

namespace fusedlm {
namespace sampling {

constexpr float kRejectionMinTopP = 0.5f;

// Rows of a call that allows it (tokens only, top-p alone) drawn by rejection.
FUSEDLM_HOST_DEVICE inline bool top_p_by_rejection(float tau, float top_p) {
  return tau > 0.f && top_p >= kRejectionMinTopP && top_p < 1.f;
}

// Rows of such a call that take the threshold at once (top-p too small for rejection).
FUSEDLM_HOST_DEVICE inline bool top_p_threshold_at_once(float tau, float top_p) {
  return tau > 0.f && top_p < kRejectionMinTopP;
}

}  // namespace sampling
}  // namespace fusedlm
