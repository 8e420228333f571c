// Temperature sampling reference kernels for the CPU. ATen-free.
//
// Semantics shared with the CUDA kernel (see python/fusedlm/sampling.py for the user docs):
//  * tau == 0: exact argmax of the logits, lowest index on ties.
//  * tau > 0: the processed distribution is softmax(l / tau) restricted to the entries with
//    l >= threshold, where the threshold combines top-k, top-p and min-p (applied in that
//    order on the tempered distribution; ties at a threshold are all kept). The token is drawn
//    hierarchically and exactly: the row is cut into tiles of kSampleTile entries; tile t gets
//    the key log(sum_{kept v in t} exp(l_v / tau)) + g_t with Gumbel noise g_t, the tile with
//    the largest key wins (Gumbel-max over tile masses), and the token inside it is found by
//    inverse CDF with a uniform u_t. g_t and u_t come from Philox keyed by (seed, offset) with
//    counter t / 2 (one block of four words per pair of tiles), so the same key gives the
//    same token on any batch position. One exp per entry and one random draw per tile,
//    instead of a Gumbel variate per entry.
//  * top-p alone (no top-k, no min-p) with 0.5 <= top_p < 1: by rejection, see
//    top_p_rejection.h (a first draw from the whole distribution, kept if inside the set).
//  * +inf logits count as the largest float (FLT_MAX) in every sum: a row holding any draws
//    uniformly among its +inf entries, log-prob -log(their count).
//  * NaN logits count as -inf. A row whose logits are all -inf (or NaN) returns token 0 and
//    NaN log-probs, as does a row with an invalid value: a negative, NaN or infinite tau,
//    top_k < 0, top_p outside (0, 1], min_p outside [0, 1] (the ops check these where they
//    can: the CPU op raises, CUDA tensors are not read on the host).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "../common/philox.h"
#include "row_values.h"
#include "top_p_rejection.h"

namespace fusedlm {
namespace sampling_cpu {

struct RowResult {
  int64_t token;
  double logprob;      // under the processed (tempered, truncated) distribution
  double raw_logprob;  // under softmax(l), tau = 1, no truncation
};

// Per-row validity and +inf handling: the rules of the CUDA kernels (row_values.h).
using sampling::finite_logit;
using sampling::valid_min_p;
using sampling::valid_temperature;
using sampling::valid_top_k;
using sampling::valid_top_p;

// Index of the largest logit, lowest index on ties; NaN entries are skipped (0 if all are).
inline int64_t row_argmax(const float* l, int64_t V) {
  int64_t argmax = -1;
  for (int64_t v = 0; v < V; ++v)
    if (l[v] == l[v] && (argmax < 0 || l[v] > l[argmax])) argmax = v;
  return argmax < 0 ? 0 : argmax;
}

inline double log_sum_exp(const float* l, int64_t V, double scale, double threshold,
                          double max_value) {
  double sum = 0;
  for (int64_t v = 0; v < V; ++v) {
    if (l[v] >= threshold) sum += std::exp((l[v] - max_value) * scale);
  }
  return std::log(sum);
}

// Smallest logit value still kept after top-k, top-p and min-p (-inf: keep everything).
inline double truncation_threshold(const float* l, int64_t V, double tau, int64_t top_k,
                                   double top_p, double min_p, double max_value) {
  double threshold = -std::numeric_limits<double>::infinity();
  std::vector<float> kept;
  if (top_k > 0 && top_k < V) {
    for (int64_t v = 0; v < V; ++v)
      if (l[v] == l[v]) kept.push_back(l[v]);  // NaN entries are never kept (nor ordered)
    if (top_k < static_cast<int64_t>(kept.size())) {
      std::nth_element(kept.begin(), kept.begin() + (top_k - 1), kept.end(), std::greater<float>());
      threshold = kept[top_k - 1];
    }
  }
  if (top_p < 1.0) {
    kept.clear();
    for (int64_t v = 0; v < V; ++v)
      if (l[v] >= threshold) kept.push_back(l[v]);
    std::sort(kept.begin(), kept.end(), std::greater<float>());
    double total = 0;
    for (float x : kept) total += std::exp((x - max_value) / tau);
    double cumulative = 0;
    for (float x : kept) {
      cumulative += std::exp((x - max_value) / tau);
      if (cumulative >= top_p * total) {
        threshold = std::max<double>(threshold, x);
        break;
      }
    }
  }
  if (min_p > 0) {
    // p_v >= min_p * p_max  <=>  l_v >= max + tau * log(min_p)
    threshold = std::max(threshold, max_value + tau * std::log(min_p));
  }
  return threshold;
}

constexpr int64_t kSampleTile = 64;

// A token of softmax(l / tau) over the entries >= threshold: the row is cut into tiles of
// kSampleTile entries; each tile's key is the log-mass of its kept entries plus one Gumbel
// variate, the largest key wins (Gumbel-max over tile masses), then inverse CDF inside it.
inline int64_t draw_token(const float* l, int64_t V, float tau, uint64_t seed, uint64_t offset, double threshold,
                          uint32_t round) {
  auto kept = [&](int64_t v) { return l[v] >= threshold && l[v] > -INFINITY; };  // (-inf weighs nothing)
  int64_t best_tile = -1;
  double best_frac = 0, best_max = 0, best_sum = 0;
  for (int64_t t = 0; t * kSampleTile < V; ++t) {
    const int64_t v_end = std::min(V, (t + 1) * kSampleTile);
    double m = -INFINITY;
    for (int64_t v = t * kSampleTile; v < v_end; ++v)
      if (kept(v)) m = std::max<double>(m, l[v]);
    if (m == -INFINITY) continue;
    double sum = 0;
    for (int64_t v = t * kSampleTile; v < v_end; ++v)
      if (kept(v)) sum += std::exp((l[v] - m) / tau);
    // The key m / tau + frac, compared as (m - best_max) / tau + (frac - best_frac): a key
    // summed into one double loses the noise next to m / tau when that is huge (logits near
    // FLT_MAX, tiny tau), and equal maxima must race on their noise (as on CUDA).
    const double frac = std::log(sum) + gumbel_from_bits(tile_noise_word(tile_pair_block(seed, offset, t, round), t));
    const double d = m == best_max ? frac - best_frac : (m - best_max) / tau + (frac - best_frac);
    if (best_tile < 0 || d > 0) {
      best_tile = t;
      best_frac = frac;
      best_max = m;
      best_sum = sum;
    }
  }
  if (best_tile < 0) return -1;  // nothing kept
  const double target =
      bits_to_open_unit(tile_uniform_word(tile_pair_block(seed, offset, best_tile, round), best_tile)) * best_sum;
  const int64_t v_end = std::min(V, (best_tile + 1) * kSampleTile);
  int64_t token = -1;
  double cumulative = 0;
  for (int64_t v = best_tile * kSampleTile; v < v_end; ++v) {
    const double w = kept(v) ? std::exp((l[v] - best_max) / tau) : 0.0;
    if (!(w > 0)) continue;  // (an exp that underflowed weighs nothing, as on CUDA)
    token = v;  // the last entry of positive weight if rounding leaves the target unreached
    cumulative += w;
    if (cumulative > target) break;
  }
  return token;
}

// rejection: top-p may be drawn by rejection (see top_p_rejection.h; the op passes whether
// this is a tokens-only call with neither top-k nor min-p given).
inline RowResult sample_row(const float* l, int64_t V, float tau, uint64_t seed, uint64_t offset,
                            int64_t top_k, float top_p, double min_p, bool rejection = false) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const bool valid = valid_temperature(tau) && valid_top_k(top_k) && valid_top_p(top_p) && valid_min_p(min_p);
  const int64_t argmax = row_argmax(l, V);
  const float max_value = l[argmax];
  if (!valid || !(max_value > -std::numeric_limits<float>::infinity())) return {0, nan, nan};  // (all -inf / NaN)
  if (max_value == INFINITY) {  // +inf entries count as FLT_MAX (see the top of this file)
    std::vector<float> finite(l, l + V);
    for (float& x : finite) x = finite_logit(x);
    return sample_row(finite.data(), V, tau, seed, offset, top_k, top_p, min_p, rejection);
  }
  // log-sum-exps relative to the maximum (no term of its size: at FLT_MAX, +inf logits, the
  // difference would round away)
  const double raw_log_sum = log_sum_exp(l, V, 1.0, -INFINITY, max_value);
  if (tau == 0.0f) return {argmax, 0.0, -raw_log_sum};

  const double threshold = truncation_threshold(l, V, tau, top_k, top_p, min_p, max_value);
  const bool by_rejection = rejection && sampling::top_p_by_rejection(tau, top_p);
  int64_t token = -1;
  if (by_rejection) {
    const int64_t first = draw_token(l, V, tau, seed, offset, -INFINITY, 0);
    if (first >= 0 && l[first] >= threshold) token = first;
  }
  if (token < 0) token = draw_token(l, V, tau, seed, offset, threshold, by_rejection ? 1 : 0);
  if (token < 0) return {0, nan, nan};  // nothing kept (e.g. +inf logits: NaN sums)
  const double processed_lse = log_sum_exp(l, V, 1.0 / tau, threshold, max_value);
  return {token, (l[token] - max_value) / tau - processed_lse, (l[token] - max_value) - raw_log_sum};
}

// log p(token | tau_k) for K temperatures in one pass over the row (shared max, K sums).
// tau_k == 0 gives 0 when the token is the (lowest-index) argmax and -inf otherwise.
inline void temperature_logprobs_row(const float* l, int64_t V, int64_t token, const float* taus,
                                     int64_t K, double* out) {
  const int64_t argmax = row_argmax(l, V);
  const float max_value = finite_logit(l[argmax]);
  if (!(max_value > -INFINITY)) {  // a row of -inf / NaN: NaN, as sample's log-probs
    for (int64_t k = 0; k < K; ++k) out[k] = std::numeric_limits<double>::quiet_NaN();
    return;
  }
  // A NaN token counts as -inf, as everywhere else: log p = -inf, not NaN.
  const float token_logit = l[token] != l[token] ? -INFINITY : finite_logit(l[token]);
  std::vector<double> sums(K, 0.0);
  for (int64_t v = 0; v < V; ++v) {
    if (l[v] != l[v]) continue;  // NaN counts as -inf
    const double centred = static_cast<double>(finite_logit(l[v])) - max_value;
    for (int64_t k = 0; k < K; ++k)
      if (taus[k] > 0) sums[k] += std::exp(centred / taus[k]);
  }
  for (int64_t k = 0; k < K; ++k) {
    if (!valid_temperature(taus[k])) {
      out[k] = std::numeric_limits<double>::quiet_NaN();  // (the CPU op raises first)
    } else if (taus[k] > 0) {
      out[k] = (static_cast<double>(token_logit) - max_value) / taus[k] - std::log(sums[k]);
    } else {
      out[k] = (token == argmax) ? 0.0 : -std::numeric_limits<double>::infinity();
    }
  }
}

}  // namespace sampling_cpu
}  // namespace fusedlm
