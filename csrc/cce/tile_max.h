// Granularity of the per-row tile maxima the CCE forward can record for the backward
// (shared by the CPU and CUDA implementations; ATen- and CUDA-free).
#pragma once
#include <cstdint>

#include "../common/host_device.h"

namespace fusedlm {

// Width of the vocabulary tiles whose per-row maximum logit the forward records: the Hopper
// forward's tile width.
constexpr int kTileMaxWidth = 256;
FUSEDLM_HOST_DEVICE inline int64_t tile_max_cols(int64_t V) { return (V + kTileMaxWidth - 1) / kTileMaxWidth; }

}  // namespace fusedlm
