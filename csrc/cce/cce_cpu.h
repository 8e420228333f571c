// Cut Cross-Entropy reference kernels for the CPU. ATen-free: raw pointers and sizes.
// Each function handles a contiguous range of rows (or vocabulary entries) so the caller
// can parallelise over ranges. Nothing of size N x V is ever allocated: logits are
// recomputed one dot product at a time and folded into an online log-sum-exp.
//
// Layout: e[N, D] and c[V, D] row-major contiguous, bias[V] or nullptr, targets[N] int64.
// Logit z[i, v] = cap * tanh((e_i . c_v + bias_v) / cap) when softcap > 0, else the raw value.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include "filter.h"
#include "tile_max.h"

namespace fusedlm {
namespace cce_cpu {

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  // Eight independent partial sums let the compiler vectorise without -ffast-math.
  T part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    for (int j = 0; j < 8; ++j) part[j] += a[k + j] * b[k + j];
  }
  T acc = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; k < n; ++k) acc += a[k] * b[k];
  return acc;
}

template <typename T>
inline T logit(const T* e_row, const T* c, const T* bias, int64_t v, int64_t D, T softcap) {
  T z = dot(e_row, c + v * D, D);
  if (bias != nullptr) z += bias[v];
  if (softcap > 0) z = softcap * std::tanh(z / softcap);
  return z;
}

// Forward for rows [row_begin, row_end): lse[i] = log sum_v exp(z[i, v]),
// target_logit[i] = z[i, targets[i]] (0 for ignored rows), logit_sum[i] = sum_v z[i, v].
template <typename T>
void forward_rows(const T* e, const T* c, const T* bias, const int64_t* targets, int64_t D,
                  int64_t V, T softcap, int64_t ignore_index, int64_t row_begin, int64_t row_end,
                  T* lse, T* target_logit, T* logit_sum, T* tile_max = nullptr) {
  for (int64_t i = row_begin; i < row_end; ++i) {
    const T* e_row = e + i * D;
    T running_max = -std::numeric_limits<T>::infinity();
    // Sums in double: in float32, once the running sum holds the row's maximum (~1) every
    // term below half an ulp of it (logits ~16.6 under the max) rounded away, and a peaked
    // row at V = 128256 lost its whole tail (loss 0 instead of 0.0036).
    double running_sum = 0;  // sum of exp(z - running_max)
    double total = 0;
    for (int64_t v = 0; v < V; ++v) {
      const T z = logit(e_row, c, bias, v, D, softcap);
      if (tile_max != nullptr) {  // [N, tile_max_cols(V)]: each row's largest logit per tile
        T& m = tile_max[i * tile_max_cols(V) + v / kTileMaxWidth];
        m = (v % kTileMaxWidth == 0 || z > m) ? z : m;
      }
      total += z;
      if (z > running_max) {
        running_sum = running_sum * static_cast<double>(std::exp(running_max - z)) + 1.0;
        running_max = z;
      } else if (z != -std::numeric_limits<T>::infinity()) {  // (-inf weighs 0; before any
        running_sum += static_cast<double>(std::exp(z - running_max));  // finite logit, -inf - -inf is NaN)
      }
    }
    lse[i] = static_cast<T>(static_cast<double>(running_max) + std::log(running_sum));
    logit_sum[i] = static_cast<T>(total);
    const int64_t y = targets[i];
    target_logit[i] = (y == ignore_index) ? T(0) : logit(e_row, c, bias, y, D, softcap);
  }
}

// d loss / d z[i, v] = grad_lse[i] * softmax[i, v] + grad_target[i] * [v == y_i] + grad_sum[i],
// times the softcap derivative. With filter_eps >= 0 (CCE's gradient filtering), entries
// whose softmax is below filter_eps are skipped, and the target entry when its gradient is
// that small (target_negligible). NaNs are never skipped.
template <typename T>
inline T logit_grad(T z, T lse_i, T grad_lse_i, T grad_target_i, T grad_sum_i, bool is_target,
                    T softcap, T filter_eps) {
  const T p = std::exp(z - lse_i);
  if (filter_eps >= 0 && (is_target ? target_negligible(grad_lse_i, grad_target_i, p, filter_eps)
                                    : p < filter_eps))
    return T(0);
  T g = grad_lse_i * p + grad_sum_i;
  if (is_target) g += grad_target_i;
  if (softcap > 0) {
    const T t = z / softcap;
    g *= T(1) - t * t;
  }
  return g;
}

template <typename T>
inline bool row_has_gradient(T a, T b, T s) {
  return a != T(0) || b != T(0) || s != T(0);
}

// grad_e rows [row_begin, row_end) (written, not accumulated).
template <typename T>
void backward_e_rows(const T* e, const T* c, const T* bias, const int64_t* targets, const T* lse,
                     const T* grad_lse, const T* grad_target, const T* grad_sum, int64_t D,
                     int64_t V, T softcap, T filter_eps, int64_t row_begin, int64_t row_end,
                     T* grad_e) {
  for (int64_t i = row_begin; i < row_end; ++i) {
    T* out = grad_e + i * D;
    for (int64_t k = 0; k < D; ++k) out[k] = 0;
    if (!row_has_gradient(grad_lse[i], grad_target[i], grad_sum[i])) continue;
    const T* e_row = e + i * D;
    for (int64_t v = 0; v < V; ++v) {
      const T z = logit(e_row, c, bias, v, D, softcap);
      const T g = logit_grad(z, lse[i], grad_lse[i], grad_target[i], grad_sum[i],
                             targets[i] == v, softcap, filter_eps);
      if (g == T(0)) continue;
      const T* c_row = c + v * D;
      for (int64_t k = 0; k < D; ++k) out[k] += g * c_row[k];
    }
  }
}

// grad_c rows (vocabulary entries) [v_begin, v_end) and grad_bias for them, each when non-null.
template <typename T>
void backward_c_rows(const T* e, const T* c, const T* bias, const int64_t* targets, const T* lse,
                     const T* grad_lse, const T* grad_target, const T* grad_sum, int64_t N,
                     int64_t D, T softcap, T filter_eps, int64_t v_begin, int64_t v_end,
                     T* grad_c, T* grad_bias) {
  for (int64_t v = v_begin; v < v_end; ++v) {
    T* out = grad_c != nullptr ? grad_c + v * D : nullptr;
    for (int64_t k = 0; out != nullptr && k < D; ++k) out[k] = 0;
    T bias_acc = 0;
    for (int64_t i = 0; i < N; ++i) {
      if (!row_has_gradient(grad_lse[i], grad_target[i], grad_sum[i])) continue;
      const T* e_row = e + i * D;
      const T z = logit(e_row, c, bias, v, D, softcap);
      const T g = logit_grad(z, lse[i], grad_lse[i], grad_target[i], grad_sum[i],
                             targets[i] == v, softcap, filter_eps);
      if (g == T(0)) continue;
      bias_acc += g;
      for (int64_t k = 0; out != nullptr && k < D; ++k) out[k] += g * e_row[k];
    }
    if (grad_bias != nullptr) grad_bias[v] = bias_acc;
  }
}

}  // namespace cce_cpu
}  // namespace fusedlm
