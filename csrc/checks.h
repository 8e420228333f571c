// Input validation shared by the CPU and CUDA glue. Errors name the argument and what was
// expected, so a bad call fails with a readable Python exception instead of a crash.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <optional>

#include "cce/tile_max.h"
#include "sampling/row_values.h"

namespace fusedlm {

inline void check_cce_inputs(const at::Tensor& e, const at::Tensor& c, const at::Tensor& targets,
                             const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(e.dim() == 2, "cce: e must be 2-D [N, D], got shape ", e.sizes());
  TORCH_CHECK_VALUE(c.dim() == 2, "cce: c must be 2-D [V, D], got shape ", c.sizes());
  TORCH_CHECK_VALUE(e.size(1) == c.size(1), "cce: e [N, D] and c [V, D] disagree on D: ",
                    e.sizes(), " vs ", c.sizes());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == e.size(0),
                    "cce: targets must be 1-D with N = ", e.size(0), " entries, got shape ",
                    targets.sizes());
  TORCH_CHECK_VALUE(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt,
                    "cce: targets must be int64 or int32, got ", targets.scalar_type());
  TORCH_CHECK_VALUE(e.scalar_type() == c.scalar_type(), "cce: e and c must share a dtype, got ",
                    e.scalar_type(), " and ", c.scalar_type());
  TORCH_CHECK_VALUE(at::isFloatingType(e.scalar_type()), "cce: e must be floating point, got ",
                    e.scalar_type());
  TORCH_CHECK_VALUE(e.device() == c.device() && e.device() == targets.device(),
                    "cce: e, c and targets must be on one device, got ", e.device(), ", ",
                    c.device(), ", ", targets.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == c.size(0),
                      "cce: bias must be 1-D with V = ", c.size(0), " entries, got shape ",
                      bias->sizes());
    TORCH_CHECK_VALUE(bias->scalar_type() == c.scalar_type(), "cce: bias dtype ",
                      bias->scalar_type(), " differs from c dtype ", c.scalar_type());
    TORCH_CHECK_VALUE(bias->device() == c.device(), "cce: bias is on ", bias->device(),
                      " but c is on ", c.device());
  }
}

inline void check_per_row(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must be 1-D with ", n,
                    " entries, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " is on ", t.device(), " but expected ",
                    like.device());
}

// The backward's optional tile-skipping hint: both or neither of the forward's tile_max
// [N, tile_max_cols(V)] and target_logit [N], float32 (float64 accepted on the CPU).
inline void check_tile_max_hint(const std::optional<at::Tensor>& tile_max,
                                const std::optional<at::Tensor>& target_logit, int64_t n,
                                int64_t V, const at::Tensor& like) {
  TORCH_CHECK_VALUE(tile_max.has_value() == target_logit.has_value(),
                    "cce_backward: pass both tile_max and target_logit, or neither");
  if (!tile_max.has_value()) return;
  TORCH_CHECK_VALUE(tile_max->dim() == 2 && tile_max->size(0) == n &&
                        tile_max->size(1) == tile_max_cols(V),
                    "cce_backward: tile_max must be [N, ceil(V / ", kTileMaxWidth, ")] = [", n,
                    ", ", tile_max_cols(V), "], got shape ", tile_max->sizes());
  check_per_row(*target_logit, "cce_backward: target_logit", n, like);
  TORCH_CHECK_VALUE(tile_max->device() == like.device(), "cce_backward: tile_max is on ",
                    tile_max->device(), " but expected ", like.device());
  for (const at::Tensor* t : {&*tile_max, &*target_logit})
    TORCH_CHECK_VALUE(at::isFloatingType(t->scalar_type()),
                      "cce_backward: tile_max and target_logit must be floating point, got ",
                      t->scalar_type());
}

// A per-row parameter of sample is a [B] tensor on the logits' device or a 0-d CPU tensor:
// one value for every row, read on the host and passed to the kernels by value (a number
// costs no device memory and no kernel). A 0-d seed is the batch's seed (derived_row_seed).
inline bool is_host_scalar(const at::Tensor& t) { return t.dim() == 0 && t.device().is_cpu(); }

inline at::Tensor row_param(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t n,
                            const at::Tensor& like) {
  if (!is_host_scalar(t)) check_per_row(t, name, n, like);
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  return t.contiguous();
}

// An optional per-row parameter (offset / top_k / top_p / min_p): checked, made contiguous;
// an undefined tensor when absent.
inline at::Tensor optional_per_row(const std::optional<at::Tensor>& t, const char* name,
                                   at::ScalarType dtype, int64_t n, const at::Tensor& like) {
  return t.has_value() ? row_param(*t, name, dtype, n, like) : at::Tensor();
}

inline void check_sample_inputs(const at::Tensor& logits, const at::Tensor& temperature,
                                const at::Tensor& seed) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "sample: logits must be 2-D [B, V], got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) > 0, "sample: logits must have V >= 1 columns");
  const auto dt = logits.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                    "sample: logits must be float32, bfloat16 or float16, got ", dt);
  const int64_t B = logits.size(0);
  row_param(temperature, "sample: temperature", at::kFloat, B, logits);
  // A 0-d seed is the batch's seed; it may also be on the logits' device (read by the kernels:
  // fusedlm.sample passes an int seed so under torch.compile, where a host tensor kept the call
  // out of CUDA graphs).
  if (seed.dim() == 0) {
    TORCH_CHECK_VALUE(seed.device().is_cpu() || seed.device() == logits.device(), "sample: seed is on ",
                      seed.device(), " but expected ", logits.device());
  } else {
    check_per_row(seed, "sample: seed", B, logits);
  }
  TORCH_CHECK_VALUE(seed.scalar_type() == at::kLong, "sample: seed must be ", at::kLong, ", got ",
                    seed.scalar_type());
}

// Per-row values held on the host (CPU tensors, or numbers given to the CUDA op), checked
// there; device tensors are not read (no sync): their invalid rows return token 0 and NaN
// log-probs instead.
inline void check_temperatures_cpu(const at::Tensor& temperature, const char* op) {
  const float* tau = temperature.const_data_ptr<float>();
  for (int64_t b = 0; b < temperature.numel(); ++b) {
    TORCH_CHECK_VALUE(sampling::valid_temperature(tau[b]), op, ": temperature[", b, "] = ", tau[b],
                      " is negative, NaN or infinite; use 0 for greedy decoding");
  }
}

// Offsets held on the host (a device tensor is not read: a negative one is another stream).
inline void check_offsets_cpu(const at::Tensor& offsets) {
  for (int64_t b = 0; offsets.defined() && b < offsets.numel(); ++b) {
    const int64_t o = offsets.const_data_ptr<int64_t>()[b];
    TORCH_CHECK_VALUE(o >= 0, "sample: offset[", b, "] = ", o, " is negative");
  }
}

inline void check_truncation_cpu(const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p) {
  for (int64_t b = 0; top_k.defined() && b < top_k.numel(); ++b) {
    const int64_t k = top_k.const_data_ptr<int64_t>()[b];
    TORCH_CHECK_VALUE(sampling::valid_top_k(k), "sample: top_k[", b, "] = ", k, " is negative (0 = off)");
  }
  for (int64_t b = 0; top_p.defined() && b < top_p.numel(); ++b) {
    const float p = top_p.const_data_ptr<float>()[b];
    TORCH_CHECK_VALUE(sampling::valid_top_p(p), "sample: top_p[", b, "] = ", p, " is outside (0, 1] (1 = off)");
  }
  for (int64_t b = 0; min_p.defined() && b < min_p.numel(); ++b) {
    const float p = min_p.const_data_ptr<float>()[b];
    TORCH_CHECK_VALUE(sampling::valid_min_p(p), "sample: min_p[", b, "] = ", p, " is outside [0, 1] (0 = off)");
  }
}

inline void check_temperature_logprobs_inputs(const at::Tensor& logits, const at::Tensor& tokens,
                                              const at::Tensor& temperatures) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "temperature_logprobs: logits must be [B, V], got ",
                    logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) > 0, "temperature_logprobs: logits must have V >= 1 columns");
  const auto dt = logits.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                    "temperature_logprobs: logits must be float32, bfloat16 or float16, got ", dt);
  check_per_row(tokens, "temperature_logprobs: tokens", logits.size(0), logits);
  TORCH_CHECK_VALUE(tokens.scalar_type() == at::kLong, "temperature_logprobs: tokens must be int64");
  TORCH_CHECK_VALUE(temperatures.dim() == 1 && temperatures.scalar_type() == at::kFloat,
                    "temperature_logprobs: temperatures must be a 1-D float32 tensor");
}

}  // namespace fusedlm
