// A torch-free C entry to the sampling kernels, for A/B builds made on a machine without a GPU
// (see build.sh and ab.py): tokens-only draws, a [B] float32 temperature and a [B] int64 seed
// on the device, as bench/run.py's sampling rows call fusedlm.sample. The build puts the
// variant's csrc/ first on the include path, so this one file compiles any variant of
// sampling/sampling_cuda.cu with its own copies of the headers.
#include "sampling/sampling_cuda.cu"

namespace sc = fusedlm::sampling_cuda;

extern "C" int ab_splits(int dtype, const void* logits, long long B, long long V, long long ld, int num_sms) {
  return sc::sample_splits(static_cast<fusedlm::DType>(dtype), logits, ld, B, V, num_sms, sc::sm90_kernels());
}

extern "C" long long ab_workspace_floats(long long B, int splits) { return sc::sample_workspace_floats(B, splits); }

// The row layout both kinds of arguments share.
template <typename Args>
static void set_rows(Args& a, int dtype, const void* logits, long long B, long long V, long long ld) {
  a.dtype = static_cast<fusedlm::DType>(dtype);
  a.logits = logits;
  a.B = B;
  a.V = V;
  a.ld = ld;
}

// The arguments of a tokens-only draw: a [B] float32 temperature and a [B] int64 seed on the
// device, no truncation (the other parameters keep their "off" values).
static sc::SampleArgs draw_args(int dtype, const void* logits, long long B, long long V, long long ld,
                                const float* tau, const long long* seeds, long long* tokens, float* workspace,
                                int splits, int num_sms) {
  sc::SampleArgs a{};
  set_rows(a, dtype, logits, B, V, ld);
  a.temperature.values = tau;
  a.temperature.given = true;
  a.seed.values = reinterpret_cast<const int64_t*>(seeds);
  a.seed.given = true;
  a.top_p.value = 1.f;
  a.splits = splits;
  a.workspace = workspace;
  a.tokens = reinterpret_cast<int64_t*>(tokens);
  a.need_logprobs = false;
  a.num_sms = num_sms;
  a.sm90 = sc::sm90_kernels();
  a.clusters = a.sm90;
  return a;
}

// dtype: 0 float32, 1 bfloat16, 2 float16 (fusedlm::DType). Returns the cudaError_t.
extern "C" int ab_sample(int dtype, const void* logits, long long B, long long V, long long ld, const float* tau,
                         const long long* seeds, long long* tokens, float* workspace, int splits, int num_sms,
                         void* stream) {
  const sc::SampleArgs a = draw_args(dtype, logits, B, V, ld, tau, seeds, tokens, workspace, splits, num_sms);
  return static_cast<int>(sc::sample(a, static_cast<cudaStream_t>(stream)));
}

// The same with truncation (top_k 0: off; top_p 1: off) and optional log-probs (logprob and
// raw_logprob: [B] float32 on the device, or null when need_logprobs is 0), for the
// truncation cases of ab.py.
extern "C" int ab_sample_truncated(int dtype, const void* logits, long long B, long long V, long long ld,
                                   const float* tau, const long long* seeds, long long* tokens, float* workspace,
                                   int splits, int num_sms, long long top_k, float top_p, int need_logprobs,
                                   float* logprob, float* raw_logprob, void* stream) {
  sc::SampleArgs a = draw_args(dtype, logits, B, V, ld, tau, seeds, tokens, workspace, splits, num_sms);
  a.top_k.value = top_k;
  a.top_k.given = top_k > 0;
  a.top_p.value = top_p;
  a.top_p.given = top_p < 1.f;
  a.logprob = logprob;
  a.raw_logprob = raw_logprob;
  a.need_logprobs = need_logprobs != 0;
  return static_cast<int>(sc::sample(a, static_cast<cudaStream_t>(stream)));
}

// temperature_logprobs (ab.py's LPO cases): out[B, K] = log p(tokens | temps[k]); temps: [K]
// float32 on the device.
extern "C" int ab_temperature_logprobs(int dtype, const void* logits, long long B, long long V, long long ld,
                                       const long long* tokens, const float* temps, long long K, float* out,
                                       void* stream) {
  sc::TemperatureLogprobArgs a{};
  set_rows(a, dtype, logits, B, V, ld);
  a.tokens = reinterpret_cast<const int64_t*>(tokens);
  a.temperatures = temps;
  a.K = K;
  a.out = out;
  return static_cast<int>(sc::temperature_logprobs(a, static_cast<cudaStream_t>(stream)));
}
