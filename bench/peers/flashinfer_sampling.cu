// C entry points over FlashInfer's header-only sampling kernels, so that bench/run.py can time
// them next to fusedlm.sample on a machine where the flashinfer-python wheel cannot run (it
// JIT-compiles its modules and fetches files at run time). Built by build_flashinfer.sh from
// the headers of that wheel; nothing of FlashInfer is kept in this repository.
//
// Each function takes raw device pointers and a stream and returns a cudaError_t (0 = ok).
// Probabilities and logits are float32 (FlashInfer's sampling kernels take no 16-bit logits);
// tokens are int32; `valid` (one bool per row, written by the samplers over probabilities) is
// required; `deterministic` is FlashInfer's default (true).
#include <flashinfer/sampling.cuh>

#ifndef FUSEDLM_FLASHINFER_VERSION
#define FUSEDLM_FLASHINFER_VERSION "?"
#endif

using namespace flashinfer;

extern "C" {

// probs = softmax(logits / temperature[row]) (FlashInfer's temperature softmax; its
// workspace holds per-slice partials for small batches).
int fi_softmax(float* logits, float* probs, unsigned batch, unsigned vocab, float* temperature, void* workspace,
               size_t workspace_bytes, bool enable_pdl, cudaStream_t stream) {
  return sampling::OnlineSoftmax<float>(logits, probs, batch, vocab, temperature, 1.f, workspace, workspace_bytes,
                                        enable_pdl, stream);
}

int fi_sampling_from_logits(float* logits, int* out, unsigned batch, unsigned vocab, uint64_t seed, uint64_t offset,
                            cudaStream_t stream) {
  return sampling::SamplingFromLogits<float, int>(logits, out, nullptr, batch, vocab, true, nullptr, seed, nullptr,
                                                  offset, stream);
}

int fi_sampling_from_probs(float* probs, int* out, bool* valid, unsigned batch, unsigned vocab, uint64_t seed, uint64_t offset,
                           cudaStream_t stream) {
  return sampling::SamplingFromProb<float, int>(probs, out, valid, nullptr, batch, vocab, true, nullptr, seed,
                                                nullptr, offset, stream);
}

int fi_top_p_sampling_from_probs(float* probs, int* out, bool* valid, unsigned batch, unsigned vocab, float top_p, uint64_t seed,
                                 uint64_t offset, cudaStream_t stream) {
  return sampling::TopPSamplingFromProb<float, int>(probs, out, valid, nullptr, nullptr, batch, top_p, vocab, true,
                                                    nullptr, seed, nullptr, offset, stream);
}

int fi_top_k_sampling_from_probs(float* probs, int* out, bool* valid, unsigned batch, unsigned vocab, unsigned top_k,
                                 uint64_t seed, uint64_t offset, cudaStream_t stream) {
  return sampling::TopKSamplingFromProb<float, int>(probs, out, valid, nullptr, nullptr, batch, top_k, vocab, true,
                                                    nullptr, seed, nullptr, offset, stream);
}

}  // extern "C"

extern "C" const char* fi_version() { return FUSEDLM_FLASHINFER_VERSION; }
