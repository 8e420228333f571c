// Op schemas (defined once) and the CPU implementations of every fusedlm op.
// The CUDA implementations live in ops_cuda.cpp and are compiled only in CUDA builds.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>

#include "cce/cce_cpu.h"
#include "checks.h"
#include "sampling/sampling_cpu.h"

#ifdef FUSEDLM_WITH_CUDA
#include "dispatch.h"
#endif

// fusedlm._C.hopper_paths() -> (sampling, cce): whether the current CUDA device runs this
// build's Hopper paths: the sampler's clusters and programmatic launches (a build with sm_90
// code), CCE's wgmma main loops (a build with sm_90a code). (False, False) in CPU builds and on
// other GPUs.
static PyObject* py_hopper_paths(PyObject*, PyObject*) {
  bool sampling = false, cce = false;
#ifdef FUSEDLM_WITH_CUDA
  sampling = fusedlm::sampling_cuda::sm90_kernels();
  cce = fusedlm::cce_cuda::wgmma_available();
#endif
  return Py_BuildValue("(NN)", PyBool_FromLong(sampling), PyBool_FromLong(cce));
}

extern "C" PyObject* PyInit__C(void) {
  // The ops live in the dispatcher; the Python module holds one diagnostic (hopper_paths).
  static PyMethodDef methods[] = {
      {"hopper_paths", py_hopper_paths, METH_NOARGS, "(sampling, cce): this build's Hopper paths on the current device"},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}

namespace fusedlm {
namespace {

// CPU math runs in float64 for float64 inputs and float32 otherwise.
at::ScalarType cpu_compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_targets_in_range(const at::Tensor& targets, int64_t V, int64_t ignore_index) {
  const int64_t* y = targets.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < targets.numel(); ++i) {
    TORCH_CHECK_INDEX(y[i] == ignore_index || (y[i] >= 0 && y[i] < V), "cce: targets[", i,
                      "] = ", y[i], " is outside [0, V=", V, ") and is not ignore_index (",
                      ignore_index, ")");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cce_forward_cpu(
    const at::Tensor& e, const at::Tensor& c, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, double softcap, int64_t ignore_index,
    bool record_tile_max) {
  check_cce_inputs(e, c, targets, bias);
  TORCH_CHECK_VALUE(softcap >= 0, "cce: softcap must be >= 0 (0 = off), got ", softcap);
  const auto ct = cpu_compute_type(e);
  const at::Tensor e_c = e.to(ct).contiguous(), c_c = c.to(ct).contiguous();
  const at::Tensor y = targets.to(at::kLong).contiguous();
  const at::Tensor b_c = bias.has_value() ? bias->to(ct).contiguous() : at::Tensor();
  const int64_t N = e.size(0), D = e.size(1), V = c.size(0);
  check_targets_in_range(y, V, ignore_index);
  auto lse = at::empty({N}, e.options().dtype(ct));
  auto target_logit = at::empty({N}, e.options().dtype(ct));
  auto logit_sum = at::empty({N}, e.options().dtype(ct));
  auto tile_max = at::empty({record_tile_max ? N : 0, record_tile_max ? tile_max_cols(V) : 0},
                            e.options().dtype(ct));
  if (N > 0) {
    TORCH_CHECK_VALUE(V > 0, "cce: the vocabulary (c) is empty");
  }
  AT_DISPATCH_FLOATING_TYPES(ct, "cce_forward_cpu", [&] {
    const scalar_t* b_ptr = bias.has_value() ? b_c.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      cce_cpu::forward_rows<scalar_t>(
          e_c.const_data_ptr<scalar_t>(), c_c.const_data_ptr<scalar_t>(), b_ptr,
          y.const_data_ptr<int64_t>(), D, V, static_cast<scalar_t>(softcap), ignore_index, begin,
          end, lse.mutable_data_ptr<scalar_t>(), target_logit.mutable_data_ptr<scalar_t>(),
          logit_sum.mutable_data_ptr<scalar_t>(),
          record_tile_max ? tile_max.mutable_data_ptr<scalar_t>() : nullptr);
    });
  });
  return {lse, target_logit, logit_sum, tile_max};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cce_backward_cpu(
    const at::Tensor& e, const at::Tensor& c, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, const at::Tensor& lse, const at::Tensor& grad_lse,
    const at::Tensor& grad_target, const at::Tensor& grad_sum, double softcap, double filter_eps,
    bool accum_fp32, const std::optional<at::Tensor>& tile_max,
    const std::optional<at::Tensor>& target_logit, bool need_grad_e, bool need_grad_c,
    bool need_grad_bias) {
  (void)accum_fp32;  // the CPU always accumulates in float32 (float64 for float64 inputs)
  check_cce_inputs(e, c, targets, bias);
  const int64_t N = e.size(0), D = e.size(1), V = c.size(0);
  for (const auto& [t, name] : {std::pair{&lse, "lse"}, {&grad_lse, "grad_lse"},
                                {&grad_target, "grad_target"}, {&grad_sum, "grad_sum"}}) {
    check_per_row(*t, name, N, e);
  }
  // The tile-skipping hint only speeds up the CUDA kernels; checked here all the same.
  check_tile_max_hint(tile_max, target_logit, N, V, e);
  const auto ct = cpu_compute_type(e);
  const at::Tensor e_c = e.to(ct).contiguous(), c_c = c.to(ct).contiguous();
  const at::Tensor b_c = bias.has_value() ? bias->to(ct).contiguous() : at::Tensor();
  const at::Tensor y = targets.to(at::kLong).contiguous();
  const at::Tensor lse_c = lse.to(ct).contiguous(), ga = grad_lse.to(ct).contiguous(),
                   gt = grad_target.to(ct).contiguous(), gs = grad_sum.to(ct).contiguous();
  // Gradients not asked for are empty and never computed.
  auto grad_e = need_grad_e ? at::empty({N, D}, e.options().dtype(ct)) : at::empty({0}, e.options());
  auto grad_c = need_grad_c ? at::empty({V, D}, e.options().dtype(ct)) : at::empty({0}, c.options());
  const bool bias_grad = bias.has_value() && need_grad_bias;
  auto grad_bias = at::empty({bias_grad ? V : 0}, e.options().dtype(ct));
  AT_DISPATCH_FLOATING_TYPES(ct, "cce_backward_cpu", [&] {
    const auto eps = static_cast<scalar_t>(filter_eps);
    const auto cap = static_cast<scalar_t>(softcap);
    const scalar_t* b_ptr = bias.has_value() ? b_c.const_data_ptr<scalar_t>() : nullptr;
    if (need_grad_e) at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      cce_cpu::backward_e_rows<scalar_t>(
          e_c.const_data_ptr<scalar_t>(), c_c.const_data_ptr<scalar_t>(), b_ptr,
          y.const_data_ptr<int64_t>(), lse_c.const_data_ptr<scalar_t>(),
          ga.const_data_ptr<scalar_t>(), gt.const_data_ptr<scalar_t>(),
          gs.const_data_ptr<scalar_t>(), D, V, cap, eps, begin, end,
          grad_e.mutable_data_ptr<scalar_t>());
    });
    if (need_grad_c || bias_grad) at::parallel_for(0, V, 1, [&](int64_t begin, int64_t end) {
      cce_cpu::backward_c_rows<scalar_t>(
          e_c.const_data_ptr<scalar_t>(), c_c.const_data_ptr<scalar_t>(), b_ptr,
          y.const_data_ptr<int64_t>(), lse_c.const_data_ptr<scalar_t>(),
          ga.const_data_ptr<scalar_t>(), gt.const_data_ptr<scalar_t>(),
          gs.const_data_ptr<scalar_t>(), N, D, cap, eps, begin, end,
          need_grad_c ? grad_c.mutable_data_ptr<scalar_t>() : nullptr,
          bias_grad ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr);
    });
  });
  return {grad_e.to(e.scalar_type()), grad_c.to(c.scalar_type()),
          bias.has_value() ? grad_bias.to(bias->scalar_type()) : grad_bias.to(c.scalar_type())};
}

// A per-row parameter given as one value (a 0-d CPU tensor, see row_param) as B entries for
// the CPU kernel; a batch seed as each row's seed derived from it.
at::Tensor rows_cpu(const at::Tensor& t, int64_t B) {
  return t.defined() && is_host_scalar(t) ? t.expand({B}).contiguous() : t;
}
at::Tensor row_seeds_cpu(const at::Tensor& seed, int64_t B) {
  if (!is_host_scalar(seed)) return seed.contiguous();
  at::Tensor seeds = at::empty({B}, seed.options());
  const auto base = static_cast<uint64_t>(*seed.const_data_ptr<int64_t>());
  for (int64_t b = 0; b < B; ++b)
    seeds.mutable_data_ptr<int64_t>()[b] = static_cast<int64_t>(sampling::derived_row_seed(base, b));
  return seeds;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_cpu(
    const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& seed,
    const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& top_k,
    const std::optional<at::Tensor>& top_p, const std::optional<at::Tensor>& min_p,
    bool need_logprobs) {
  check_sample_inputs(logits, temperature, seed);
  const int64_t B = logits.size(0), V = logits.size(1);
  const at::Tensor l = logits.to(at::kFloat).contiguous();
  const at::Tensor tau = rows_cpu(temperature.contiguous(), B);
  check_temperatures_cpu(tau, "sample");
  const at::Tensor seeds = row_seeds_cpu(seed, B);
  const at::Tensor offsets = rows_cpu(optional_per_row(offset, "sample: offset", at::kLong, B, logits), B);
  const at::Tensor k_t = rows_cpu(optional_per_row(top_k, "sample: top_k", at::kLong, B, logits), B);
  const at::Tensor p_t = rows_cpu(optional_per_row(top_p, "sample: top_p", at::kFloat, B, logits), B);
  const at::Tensor mp_t = rows_cpu(optional_per_row(min_p, "sample: min_p", at::kFloat, B, logits), B);
  check_truncation_cpu(k_t, p_t, mp_t);
  check_offsets_cpu(offsets);
  auto tokens = at::empty({B}, logits.options().dtype(at::kLong));
  // Log-probs only on request (else empty: two allocations less per call).
  auto logprob = at::empty({need_logprobs ? B : 0}, logits.options().dtype(at::kFloat));
  auto raw_logprob = at::empty({need_logprobs ? B : 0}, logits.options().dtype(at::kFloat));
  // Top-p by rejection for tokens-only calls with top-p alone (as on CUDA; see sampling_cpu.h).
  const bool rejection = p_t.defined() && !k_t.defined() && !mp_t.defined() && !need_logprobs;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t k = k_t.defined() ? k_t.const_data_ptr<int64_t>()[b] : 0;
      const float p = p_t.defined() ? p_t.const_data_ptr<float>()[b] : 1.f;
      const double mp = mp_t.defined() ? mp_t.const_data_ptr<float>()[b] : 0.0;
      const auto r = sampling_cpu::sample_row(
          l.const_data_ptr<float>() + b * V, V, tau.const_data_ptr<float>()[b],
          static_cast<uint64_t>(seeds.const_data_ptr<int64_t>()[b]),
          offsets.defined() ? static_cast<uint64_t>(offsets.const_data_ptr<int64_t>()[b]) : 0, k,
          p, mp, rejection);
      tokens.mutable_data_ptr<int64_t>()[b] = r.token;
      if (!need_logprobs) continue;
      logprob.mutable_data_ptr<float>()[b] = static_cast<float>(r.logprob);
      raw_logprob.mutable_data_ptr<float>()[b] = static_cast<float>(r.raw_logprob);
    }
  });
  return {tokens, logprob, raw_logprob};
}

at::Tensor temperature_logprobs_cpu(const at::Tensor& logits, const at::Tensor& tokens,
                                    const at::Tensor& temperatures) {
  check_temperature_logprobs_inputs(logits, tokens, temperatures);
  const int64_t B = logits.size(0), V = logits.size(1);
  const at::Tensor l = logits.to(at::kFloat).contiguous(), y = tokens.contiguous();
  const at::Tensor taus = temperatures.contiguous();
  check_temperatures_cpu(taus, "temperature_logprobs");
  const int64_t K = taus.numel();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t t = y.const_data_ptr<int64_t>()[b];
    TORCH_CHECK_INDEX(t >= 0 && t < V, "temperature_logprobs: tokens[", b, "] = ", t,
                      " is outside [0, ", V, ")");
  }
  auto out = at::empty({B, K}, logits.options().dtype(at::kDouble));
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      sampling_cpu::temperature_logprobs_row(l.const_data_ptr<float>() + b * V, V,
                                             y.const_data_ptr<int64_t>()[b],
                                             taus.const_data_ptr<float>(), K,
                                             out.mutable_data_ptr<double>() + b * K);
    }
  });
  return out.to(at::kFloat);
}

}  // namespace
}  // namespace fusedlm

TORCH_LIBRARY(fusedlm, m) {
  m.def(
      "cce_forward(Tensor e, Tensor c, Tensor targets, Tensor? bias, float softcap, "
      "int ignore_index, bool record_tile_max=False) -> (Tensor lse, Tensor target_logit, "
      "Tensor logit_sum, Tensor tile_max)");
  m.def(
      "cce_backward(Tensor e, Tensor c, Tensor targets, Tensor? bias, Tensor lse, "
      "Tensor grad_lse, Tensor grad_target, Tensor grad_sum, float softcap, float filter_eps, "
      "bool accum_fp32, Tensor? tile_max=None, Tensor? target_logit=None, bool need_grad_e=True, "
      "bool need_grad_c=True, bool need_grad_bias=True) -> (Tensor grad_e, Tensor grad_c, Tensor grad_bias)");
  // (a gradient not needed, or the bias's without a bias, is empty)
  m.def(
      "sample(Tensor logits, Tensor temperature, Tensor seed, Tensor? offset, Tensor? top_k, "
      "Tensor? top_p, Tensor? min_p, bool need_logprobs=True) -> (Tensor tokens, Tensor logprob, "
      "Tensor raw_logprob)");  // logprob, raw_logprob: [B] if need_logprobs, else empty
  // Per-row parameters: [B] tensors on the logits' device, or 0-d CPU tensors holding one value
  // for every row (no kernel to fill a tensor); a 0-d seed is the batch's, each row's seed
  // derived from it (sampling/row_values.h: derived_row_seed), and may also be on the logits'
  // device (fusedlm.sample under torch.compile).
  m.def("temperature_logprobs(Tensor logits, Tensor tokens, Tensor temperatures) -> Tensor");
}

TORCH_LIBRARY_IMPL(fusedlm, CPU, m) {
  m.impl("cce_forward", &fusedlm::cce_forward_cpu);
  m.impl("cce_backward", &fusedlm::cce_backward_cpu);
  m.impl("sample", &fusedlm::sample_cpu);
  m.impl("temperature_logprobs", &fusedlm::temperature_logprobs_cpu);
}
