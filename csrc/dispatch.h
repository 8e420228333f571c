// The one dispatch header: ATen-free entry points of the CUDA kernels (raw pointers, sizes,
// stream). The glue (ops_cuda.cpp) and standalone tests include only this file.
#pragma once
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "cce/tile_max.h"

namespace fusedlm {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline size_t dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

namespace cce_cuda {

// Tile sizes shared by every CCE kernel (rows of e x vocabulary entries).
constexpr int kTileRows = 128;
constexpr int kTileVocab = 128;
// Number of kTileVocab-wide vocabulary tiles (columns of tile_mask).
FUSEDLM_HOST_DEVICE inline int64_t tile_cols(int64_t V) { return (V + kTileVocab - 1) / kTileVocab; }
// Inputs must have D a multiple of this many elements (the glue pads otherwise).
inline int64_t d_alignment(DType t) { return t == DType::kFloat32 ? 4 : 8; }

struct ForwardArgs {
  DType dtype;
  const void* e;          // [N, D]
  const void* c;          // [V, D]
  const void* bias;       // [V] or nullptr
  const int64_t* targets; // [N]
  int64_t N, D, V;
  float softcap;          // 0 = off
  int64_t ignore_index;
  int splits;             // vocabulary splits (see forward_splits)
  float* partials;        // [2, splits, N] workspace
  float* lse;             // [N]
  float* target_logit;    // [N]
  float* logit_sum;       // [N]
  // [N, tile_max_cols(V)] or nullptr: for each row and kTileMaxWidth-wide vocabulary tile an
  // upper bound on the largest logit (exact on the Hopper path, FLT_MAX-like elsewhere). The
  // backward uses it to skip whole tiles without recomputing them.
  float* tile_max;
};

int forward_splits(int64_t N, int64_t V, DType dtype, int num_sms);
// Rows (a multiple of kTileRows) one forward launch may take: the Hopper main loop's TMA row
// coordinates are 32-bit. Callers split larger N into row blocks.
constexpr int64_t kForwardRowsPerLaunch = int64_t{1} << 30;
cudaError_t forward(const ForwardArgs& args, cudaStream_t stream);

struct BackwardArgs {
  DType dtype;
  const void* e;
  const void* c;
  const void* bias;  // or nullptr
  const int64_t* targets;
  const float* lse;
  const float* grad_lse;
  const float* grad_target;
  const float* grad_sum;
  int64_t N, D, V;
  float softcap;
  float filter_eps;        // < 0: exact
  int64_t vocab_chunk;     // multiple of kTileVocab (see backward_vocab_chunk)
  void* grad_workspace;    // [roundup(N, kTileRows), vocab_chunk] of dtype
  // [ceil(N / kTileRows), vocab_chunk / kTileVocab]: bit 8 h + q of a tile's entry says that
  // its 64 x 64 quadrant (rows 64 h.., columns 64 q..) holds gradient values (was kept).
  uint16_t* tile_mask;
  float* bias_partials;    // [ceil(N / kTileRows), vocab_chunk] or nullptr when no bias
  float* grad_bias;        // [V] float32 or nullptr
  float* grad_e_acc;       // [N, D] float32, or nullptr: dE not needed (its GEMM is skipped)
  void* grad_c;            // [V, D] of dtype, or nullptr: dC not needed (its GEMM is skipped)
  // With filter_eps >= 0: [N] bytes of workspace, 1 where the row's target entry is one the
  // filter keeps (judged from target_logit, the forward's, when given; else every target
  // with a gradient counts).
  uint8_t* target_keep;
  const float* target_logit;  // [N] or nullptr
  // Optional: the forward's tile_max and a [ceil(N / kTileRows), tile_max_cols(V)] byte
  // workspace for the tiles that may hold an entry above the filter (the others are never
  // recomputed).
  const float* tile_max;
  uint8_t* keep_hint;
  int num_sms;  // the device's multiprocessors
};

int64_t backward_vocab_chunk(int64_t N, int64_t V, DType dtype, int64_t budget_bytes);
// Rows (a multiple of kTileRows) one backward launch may take on the current device (see
// cce_cuda.cu): ~780k on Hopper for 16-bit inputs. Callers split larger N into row blocks.
int64_t backward_rows_per_launch(DType dtype);
cudaError_t backward(const BackwardArgs& args, cudaStream_t stream);
// Whether the current device runs the Hopper wgmma main loops: an sm_90 device and a build
// with sm_90a code (FUSEDLM_HAS_SM90A).
bool wgmma_available();

}  // namespace cce_cuda

namespace sampling_cuda {

// A per-row parameter of sample(): a [B] array on the device, or (values == nullptr) one
// value for every row, passed by value (a number given to fusedlm.sample costs no device
// memory and no kernel). A parameter not given holds its "off" value.
template <typename V>
struct RowParam {
  const V* values = nullptr;
  V value{};
  bool given = false;
};

struct SampleArgs {
  DType dtype;
  const void* logits;  // [B, V], row stride ld
  int64_t B, V, ld;
  RowParam<float> temperature;
  RowParam<int64_t> seed;    // one value: the batch's seed, each row's derived from it (derived_row_seed)
  RowParam<int64_t> offset;  // off: 0
  RowParam<int64_t> top_k;   // off: 0
  RowParam<float> top_p;     // off: 1
  RowParam<float> min_p;     // off: 0
  int splits;                // vocabulary splits per row (see sample_splits)
  float* workspace;          // sample_workspace_floats(B, splits) floats
  int64_t* tokens;           // [B]
  float* logprob;            // [B]; written only if need_logprobs
  float* raw_logprob;        // [B]; written only if need_logprobs
  bool need_logprobs;        // false: skip the two log-sum-exps (tokens only)
  int num_sms;               // the device's multiprocessors
  bool sm90;                 // sm_90+ device and kernels (sm90_kernels): programmatic dependent launches
  bool clusters;             // thread-block clusters (sm_90+; off with FUSEDLM_NO_CLUSTERS=1)
  int pass = 0;              // (internal: which rows a launch draws; sample() sets it)
  // seed.values points to the batch's one seed on the device (a 0-d tensor, as fusedlm.sample
  // passes an int seed under torch.compile); the rows derive theirs from it.
  bool batch_seed_on_device = false;
};

// Workspace floats per (row, split): a partial of 8 floats for each of up to 8 warps.
constexpr int kSampleSplitFloats = 64;
// Then per row (top-k / top-p / min-p): its threshold, its top-p-by-rejection mark, and the
// maximum and normaliser of its check.
constexpr int kSampleRowFloats = 4;
inline int64_t sample_workspace_floats(int64_t B, int splits) {
  return B * (splits * kSampleSplitFloats + kSampleRowFloats);
}
// Whether the current device runs the sampling kernels compiled for sm_90+ (with programmatic
// dependent launches and clusters; SampleArgs::sm90). A build without sm_90 code (e.g.
// TORCH_CUDA_ARCH_LIST=8.0+PTX) runs its sm_80 PTX on Hopper, which has neither: launched with
// clusters, its rows' splits merged one CTA's partials with stale shared memory (H100: 53% of
// B = 64 and 88% of B = 8 tokens wrong), and a PDL launch would not wait for its input.
bool sm90_kernels();
// The split plan depends on whether the rows are 16-byte aligned (see sampling_cuda.cu).
// clusters: a row's splits may merge in a thread-block cluster (SampleArgs::clusters).
int sample_splits(DType dtype, const void* logits, int64_t ld, int64_t B, int64_t V, int num_sms, bool clusters);
cudaError_t sample(const SampleArgs& args, cudaStream_t stream);

struct TemperatureLogprobArgs {
  DType dtype;
  const void* logits;
  int64_t B, V, ld;
  const int64_t* tokens;
  const float* temperatures;  // [K]
  int64_t K;
  float* out;  // [B, K]
};

cudaError_t temperature_logprobs(const TemperatureLogprobArgs& args, cudaStream_t stream);

}  // namespace sampling_cuda
}  // namespace fusedlm
