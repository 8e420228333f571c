// CUDA implementations of the fusedlm ops: validation, workspace allocation and calls into
// the ATen-free launchers declared in dispatch.h. Compiled only in CUDA builds.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>

#include "checks.h"
#include "dispatch.h"

namespace fusedlm {
namespace {

#define FUSEDLM_CUDA_CHECK(expr)                                                         \
  do {                                                                                   \
    const cudaError_t err_ = (expr);                                                     \
    TORCH_CHECK(err_ == cudaSuccess, "fusedlm CUDA error: ", cudaGetErrorString(err_),   \
                " (", #expr, ")");                                                       \
  } while (0)

DType kernel_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK_VALUE(false, op, ": CUDA kernels take float32, bfloat16 or float16, got ",
                        t.scalar_type());
  }
  return DType::kFloat32;
}

// (PyTorch caches the device properties: no driver query per call.)
int num_sms(int device) { return at::cuda::getDeviceProperties(device)->multiProcessorCount; }

// Row-major contiguous, 16-byte aligned, D padded with zeros to the kernels' vector width.
at::Tensor kernel_layout(const at::Tensor& t, int64_t d_pad) {
  const bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  if (t.is_contiguous() && t.size(1) == d_pad && aligned) return t;
  auto out = at::zeros({t.size(0), d_pad}, t.options());
  out.narrow(1, 0, t.size(1)).copy_(t);
  return out;
}

int64_t padded_d(int64_t D, DType dt) {
  const int64_t a = cce_cuda::d_alignment(dt);
  return (D + a - 1) / a * a;
}

void check_cuda_inputs(const at::Tensor& e, const at::Tensor& c, const at::Tensor& targets,
                       const std::optional<at::Tensor>& bias) {
  check_cce_inputs(e, c, targets, bias);
  TORCH_CHECK_VALUE(e.is_cuda(), "cce: expected CUDA tensors");
  // The kernels index the vocabulary with 32-bit integers (and TMA coordinates are 32-bit).
  TORCH_CHECK_VALUE(c.size(0) < (int64_t{1} << 31) - 1024,
                    "cce: vocabularies of 2^31 - 1024 entries or more are not supported on CUDA");
}

// Rows per kernel launch: `limit` (a multiple of the 128-row tile), or fewer when
// FUSEDLM_CCE_ROWS_PER_LAUNCH asks (tests: row blocks without billions of rows).
int64_t rows_per_launch(int64_t limit) {
  const char* env = std::getenv("FUSEDLM_CCE_ROWS_PER_LAUNCH");
  const int64_t asked = env != nullptr ? std::atoll(env) / cce_cuda::kTileRows * cce_cuda::kTileRows : 0;
  return asked > 0 ? std::min(asked, limit) : limit;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cce_forward_cuda(
    const at::Tensor& e, const at::Tensor& c, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, double softcap, int64_t ignore_index,
    bool record_tile_max) {
  check_cuda_inputs(e, c, targets, bias);
  TORCH_CHECK_VALUE(softcap >= 0, "cce: softcap must be >= 0 (0 = off), got ", softcap);
  const c10::cuda::CUDAGuard guard(e.device());
  const DType dt = kernel_dtype(e, "cce_forward");
  const int64_t N = e.size(0), D = e.size(1), V = c.size(0);
  TORCH_CHECK_VALUE(N == 0 || V > 0, "cce: the vocabulary (c) is empty");
  const int64_t d_pad = padded_d(D, dt);
  const at::Tensor e_k = kernel_layout(e, d_pad), c_k = kernel_layout(c, d_pad);
  const at::Tensor y = targets.to(at::kLong).contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const auto f32 = e.options().dtype(at::kFloat);
  auto lse = at::empty({N}, f32), target_logit = at::empty({N}, f32), logit_sum = at::empty({N}, f32);
  auto tile_max = at::empty({record_tile_max ? N : 0, record_tile_max ? tile_max_cols(V) : 0}, f32);
  if (N == 0) return {lse, target_logit, logit_sum, tile_max};
  // Row blocks of at most rows_per_launch rows (pointers offset per block; rows are
  // independent in the forward: only the last bits of a log-sum-exp may differ from one
  // launch's, as the vocabulary splits depend on the rows per launch).
  const int64_t block_rows = rows_per_launch(cce_cuda::kForwardRowsPerLaunch);
  const int64_t tm_cols = tile_max_cols(V);
  const int64_t elem = e_k.element_size();
  for (int64_t r0 = 0; r0 < N; r0 += block_rows) {
    const int64_t rows = std::min(block_rows, N - r0);
    const int splits = cce_cuda::forward_splits(rows, V, dt, num_sms(e.get_device()));
    auto partials = at::empty({2, splits, rows}, f32);
    cce_cuda::ForwardArgs args{dt, static_cast<const char*>(e_k.const_data_ptr()) + r0 * d_pad * elem,
                               c_k.const_data_ptr(), b.defined() ? b.const_data_ptr() : nullptr,
                               y.const_data_ptr<int64_t>() + r0, rows, d_pad, V,
                               static_cast<float>(softcap), ignore_index, splits,
                               partials.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>() + r0,
                               target_logit.mutable_data_ptr<float>() + r0,
                               logit_sum.mutable_data_ptr<float>() + r0,
                               record_tile_max ? tile_max.mutable_data_ptr<float>() + r0 * tm_cols : nullptr};
    FUSEDLM_CUDA_CHECK(cce_cuda::forward(args, c10::cuda::getCurrentCUDAStream()));
  }
  return {lse, target_logit, logit_sum, tile_max};
}

int64_t workspace_budget_bytes() {
  const char* env = std::getenv("FUSEDLM_CCE_WORKSPACE_MB");
  const int64_t mb = env != nullptr ? std::atoll(env) : 128;
  return std::min<int64_t>(mb > 0 ? mb : 128, int64_t{1} << 20) << 20;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cce_backward_cuda(
    const at::Tensor& e, const at::Tensor& c, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, const at::Tensor& lse, const at::Tensor& grad_lse,
    const at::Tensor& grad_target, const at::Tensor& grad_sum, double softcap, double filter_eps,
    bool accum_fp32, const std::optional<at::Tensor>& tile_max,
    const std::optional<at::Tensor>& target_logit, bool need_grad_e, bool need_grad_c,
    bool need_grad_bias) {
  (void)accum_fp32;  // dE always accumulates in float32 on the GPU, dC in float32 registers
  check_cuda_inputs(e, c, targets, bias);
  const int64_t N = e.size(0), D = e.size(1), V = c.size(0);
  for (const auto& [t, name] : {std::pair{&lse, "lse"}, {&grad_lse, "grad_lse"},
                                {&grad_target, "grad_target"}, {&grad_sum, "grad_sum"}}) {
    check_per_row(*t, name, N, e);
  }
  check_tile_max_hint(tile_max, target_logit, N, V, e);
  const bool hint = tile_max.has_value() && filter_eps >= 0;
  const c10::cuda::CUDAGuard guard(e.device());
  const DType dt = kernel_dtype(e, "cce_backward");
  const int64_t d_pad = padded_d(D, dt);
  const at::Tensor e_k = kernel_layout(e, d_pad), c_k = kernel_layout(c, d_pad);
  const at::Tensor y = targets.to(at::kLong).contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  auto as_f32 = [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  const at::Tensor lse_f = as_f32(lse), ga = as_f32(grad_lse), gt = as_f32(grad_target),
                   gs = as_f32(grad_sum);
  const auto f32 = e.options().dtype(at::kFloat);
  // Row blocks of at most block_rows rows: one launch, or (beyond ~780k tokens on Hopper)
  // several. Then dE accumulates in float32 one block at a time (each block's rows are
  // converted into grad_e: N x D x 4 bytes of accumulator would dwarf e itself), and the dC
  // and bias gradients are summed in float32 (dC then carries the rounding of each block's
  // 16-bit partial as well as the final one).
  const int64_t block_rows = rows_per_launch(cce_cuda::backward_rows_per_launch(dt));
  const bool blocks = N > block_rows;
  // Gradients not asked for are empty, and their GEMMs are not run.
  auto grad_e_acc = at::empty({need_grad_e ? std::min(N, block_rows) : 0, d_pad}, f32);
  at::Tensor grad_e = blocks && need_grad_e ? at::empty({N, D}, e.options()) : at::Tensor();
  auto grad_c = at::empty({need_grad_c ? V : 0, d_pad}, c.options());
  const bool bias_grad = bias.has_value() && need_grad_bias;
  auto grad_bias = at::empty({bias_grad ? V : 0}, f32);
  if (N == 0 || V == 0) {
    grad_e_acc.zero_();
    if (grad_e.defined()) grad_e.zero_();
    grad_c.zero_();
    grad_bias.zero_();
  } else {
    const int64_t max_rows = std::min(N, block_rows);
    const int64_t row_tiles = (max_rows + cce_cuda::kTileRows - 1) / cce_cuda::kTileRows;
    const int64_t chunk = cce_cuda::backward_vocab_chunk(max_rows, V, dt, workspace_budget_bytes());
    auto workspace = at::empty({row_tiles * cce_cuda::kTileRows, chunk}, c.options());
    auto mask = at::empty({row_tiles, chunk / cce_cuda::kTileVocab}, e.options().dtype(at::kShort));
    auto bias_partials = bias_grad ? at::empty({row_tiles, chunk}, f32) : at::Tensor();
    const auto bytes = e.options().dtype(at::kByte);
    const bool filtered = filter_eps >= 0;
    auto target_keep = filtered ? at::empty({N}, bytes) : at::Tensor();
    const at::Tensor tile_max_f = hint ? as_f32(*tile_max) : at::Tensor();
    const at::Tensor target_logit_f = hint ? as_f32(*target_logit) : at::Tensor();
    auto keep_hint = hint ? at::empty({row_tiles, tile_max_cols(V)}, bytes) : at::Tensor();
    // Per-block dC / bias gradients and their float32 sums (only with several blocks).
    at::Tensor block_grad_c = grad_c, block_grad_bias = grad_bias, sum_grad_c, sum_grad_bias;
    if (blocks && need_grad_c) sum_grad_c = at::zeros({V, d_pad}, f32);
    if (blocks && bias_grad) sum_grad_bias = at::zeros({V}, f32);
    const int64_t elem = e_k.element_size(), tm_cols = tile_max_cols(V);
    for (int64_t r0 = 0; r0 < N; r0 += block_rows) {
      const int64_t rows = std::min(block_rows, N - r0);
      cce_cuda::BackwardArgs args{
          dt, static_cast<const char*>(e_k.const_data_ptr()) + r0 * d_pad * elem, c_k.const_data_ptr(),
          b.defined() ? b.const_data_ptr() : nullptr, y.const_data_ptr<int64_t>() + r0,
          lse_f.const_data_ptr<float>() + r0, ga.const_data_ptr<float>() + r0,
          gt.const_data_ptr<float>() + r0, gs.const_data_ptr<float>() + r0, rows, d_pad, V,
          static_cast<float>(softcap), static_cast<float>(filter_eps), chunk,
          workspace.mutable_data_ptr(), reinterpret_cast<uint16_t*>(mask.mutable_data_ptr<int16_t>()),
          bias_grad ? bias_partials.mutable_data_ptr<float>() : nullptr,
          bias_grad ? block_grad_bias.mutable_data_ptr<float>() : nullptr,
          need_grad_e ? grad_e_acc.mutable_data_ptr<float>() : nullptr,
          need_grad_c ? block_grad_c.mutable_data_ptr() : nullptr,
          filtered ? target_keep.mutable_data_ptr<uint8_t>() + r0 : nullptr,
          hint ? target_logit_f.const_data_ptr<float>() + r0 : nullptr,
          hint ? tile_max_f.const_data_ptr<float>() + r0 * tm_cols : nullptr,
          hint ? keep_hint.mutable_data_ptr<uint8_t>() : nullptr,
          num_sms(e.get_device())};
      FUSEDLM_CUDA_CHECK(cce_cuda::backward(args, c10::cuda::getCurrentCUDAStream()));
      if (grad_e.defined()) grad_e.narrow(0, r0, rows).copy_(grad_e_acc.narrow(0, 0, rows).narrow(1, 0, D));
      if (sum_grad_c.defined()) sum_grad_c.add_(block_grad_c);
      if (sum_grad_bias.defined()) sum_grad_bias.add_(block_grad_bias);
    }
    if (sum_grad_c.defined()) grad_c = sum_grad_c.to(c.scalar_type());
    if (sum_grad_bias.defined()) grad_bias = sum_grad_bias;
  }
  if (!grad_e.defined())
    grad_e = need_grad_e ? grad_e_acc.narrow(1, 0, D).to(e.scalar_type()).contiguous() : at::empty({0}, e.options());
  if (!need_grad_c)
    grad_c = at::empty({0}, c.options());
  else if (d_pad != D)
    grad_c = grad_c.narrow(1, 0, D).contiguous();
  return {grad_e, grad_c,
          bias.has_value() ? grad_bias.to(bias->scalar_type()) : grad_bias.to(c.scalar_type())};
}

// A per-row parameter for the kernels: its device array, or its one value (a 0-d CPU tensor,
// see row_param); `off` when not given.
template <typename V>
sampling_cuda::RowParam<V> sample_param(const at::Tensor& t, V off) {
  sampling_cuda::RowParam<V> p;
  p.value = off;
  if (!t.defined()) return p;
  p.given = true;
  if (is_host_scalar(t))
    p.value = *t.const_data_ptr<V>();
  else
    p.values = t.const_data_ptr<V>();
  return p;
}

// Values given as numbers are on the host: checked here, with the CPU op's messages (device
// tensors are not read: their invalid rows return token 0 and NaN log-probs).
void check_host_scalars(const at::Tensor& tau, const at::Tensor& top_k, const at::Tensor& top_p,
                        const at::Tensor& min_p, const at::Tensor& offsets) {
  if (is_host_scalar(tau)) check_temperatures_cpu(tau, "sample");
  auto on_host = [](const at::Tensor& t) { return t.defined() && is_host_scalar(t) ? t : at::Tensor(); };
  check_truncation_cpu(on_host(top_k), on_host(top_p), on_host(min_p));
  check_offsets_cpu(on_host(offsets));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_cuda(
    const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& seed,
    const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& top_k,
    const std::optional<at::Tensor>& top_p, const std::optional<at::Tensor>& min_p,
    bool need_logprobs) {
  check_sample_inputs(logits, temperature, seed);
  const c10::cuda::CUDAGuard guard(logits.device());
  const DType dt = kernel_dtype(logits, "sample");
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK_VALUE(V < (int64_t{1} << 31), "sample: at most 2^31 - 1 columns on CUDA, got ", V);
  const at::Tensor l = logits.stride(1) == 1 ? logits : logits.contiguous();
  const at::Tensor k_t = optional_per_row(top_k, "sample: top_k", at::kLong, B, logits);
  const at::Tensor p_t = optional_per_row(top_p, "sample: top_p", at::kFloat, B, logits);
  const at::Tensor mp_t = optional_per_row(min_p, "sample: min_p", at::kFloat, B, logits);
  const at::Tensor tau = temperature.contiguous(), seeds = seed.contiguous();
  const at::Tensor offsets = optional_per_row(offset, "sample: offset", at::kLong, B, logits);
  check_host_scalars(tau, k_t, p_t, mp_t, offsets);
  auto tokens = at::empty({B}, logits.options().dtype(at::kLong));
  // Log-probs only on request (else empty: each allocation costs a few us of host time).
  auto logprob = at::empty({need_logprobs ? B : 0}, logits.options().dtype(at::kFloat));
  auto raw_logprob = at::empty({need_logprobs ? B : 0}, logits.options().dtype(at::kFloat));
  if (B == 0) return {tokens, logprob, raw_logprob};
  const cudaDeviceProp* device = at::cuda::getDeviceProperties(logits.get_device());
  const bool sm90 = sampling_cuda::sm90_kernels();  // (a build without sm_90 code: neither)
  // FUSEDLM_NO_CLUSTERS=1: no thread-block clusters (tests cover both paths with it).
  const bool clusters = sm90 && std::getenv("FUSEDLM_NO_CLUSTERS") == nullptr;
  const int splits = sampling_cuda::sample_splits(dt, l.const_data_ptr(), l.stride(0), B, V,
                                                  device->multiProcessorCount, clusters);
  auto workspace = at::empty({sampling_cuda::sample_workspace_floats(B, splits)}, logits.options().dtype(at::kFloat));
  sampling_cuda::SampleArgs args{dt,
                                 l.const_data_ptr(),
                                 B,
                                 V,
                                 l.stride(0),
                                 sample_param<float>(tau, 0.f),
                                 sample_param<int64_t>(seeds, 0),
                                 sample_param<int64_t>(offsets, 0),
                                 sample_param<int64_t>(k_t, 0),
                                 sample_param<float>(p_t, 1.f),
                                 sample_param<float>(mp_t, 0.f),
                                 splits,
                                 workspace.mutable_data_ptr<float>(),
                                 tokens.mutable_data_ptr<int64_t>(),
                                 logprob.mutable_data_ptr<float>(),
                                 raw_logprob.mutable_data_ptr<float>(),
                                 need_logprobs,
                                 device->multiProcessorCount,
                                 sm90,
                                 clusters};
  args.batch_seed_on_device = seeds.dim() == 0 && !is_host_scalar(seeds);
  FUSEDLM_CUDA_CHECK(sampling_cuda::sample(args, c10::cuda::getCurrentCUDAStream()));
  return {tokens, logprob, raw_logprob};
}

at::Tensor temperature_logprobs_cuda(const at::Tensor& logits, const at::Tensor& tokens,
                                     const at::Tensor& temperatures) {
  check_temperature_logprobs_inputs(logits, tokens, temperatures);
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK_VALUE(temperatures.numel() <= 16,
                    "temperature_logprobs: at most 16 temperatures on CUDA, got ",
                    temperatures.numel());
  TORCH_CHECK_VALUE(V < (int64_t{1} << 31), "temperature_logprobs: at most 2^31 - 1 columns on CUDA, got ", V);
  const c10::cuda::CUDAGuard guard(logits.device());
  const DType dt = kernel_dtype(logits, "temperature_logprobs");
  const at::Tensor l = logits.stride(1) == 1 ? logits : logits.contiguous();
  const at::Tensor y = tokens.contiguous(), taus = temperatures.to(logits.device()).contiguous();
  auto out = at::empty({B, taus.numel()}, logits.options().dtype(at::kFloat));
  sampling_cuda::TemperatureLogprobArgs args{dt, l.const_data_ptr(), B, V, l.stride(0),
                                             y.const_data_ptr<int64_t>(),
                                             taus.const_data_ptr<float>(), taus.numel(),
                                             out.mutable_data_ptr<float>()};
  FUSEDLM_CUDA_CHECK(sampling_cuda::temperature_logprobs(args, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace
}  // namespace fusedlm

TORCH_LIBRARY_IMPL(fusedlm, CUDA, m) {
  m.impl("cce_forward", &fusedlm::cce_forward_cuda);
  m.impl("cce_backward", &fusedlm::cce_backward_cuda);
  m.impl("sample", &fusedlm::sample_cuda);
  m.impl("temperature_logprobs", &fusedlm::temperature_logprobs_cuda);
}
