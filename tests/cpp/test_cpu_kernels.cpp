// Kernel-level tests of the ATen-free CPU kernels (run by ctest; no torch needed).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cce/cce_cpu.h"
#include "common/philox.h"
#include "sampling/sampling_cpu.h"

static int failures = 0;
#define EXPECT(cond, ...)                                   \
  do {                                                      \
    if (!(cond)) {                                          \
      ++failures;                                           \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);      \
      std::printf(__VA_ARGS__);                             \
      std::printf("\n");                                    \
    }                                                       \
  } while (0)

static void test_philox_known_answers() {
  // Known-answer vectors of Philox4x32-10 (Random123's kat_vectors).
  using fusedlm::Uint4;
  Uint4 r = fusedlm::philox4x32_10(Uint4{0, 0, 0, 0}, 0);
  EXPECT(r.x == 0x6627e8d5u && r.y == 0xe169c58du && r.z == 0xbc57ac4cu && r.w == 0x9b00dbd8u,
         "philox zero vector: %08x %08x %08x %08x", r.x, r.y, r.z, r.w);
  r = fusedlm::philox4x32_10(Uint4{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
                             (uint64_t(0x299f31d0u) << 32) | 0xa4093822u);
  EXPECT(r.x == 0xd16cfe09u && r.y == 0x94fdccebu && r.z == 0x5001e420u && r.w == 0x24126ea1u,
         "philox pi vector: %08x %08x %08x %08x", r.x, r.y, r.z, r.w);
  // Uniforms stay inside (0, 1) at both ends (the top word used to round to 1: E = 0).
  for (uint32_t bits : {0u, 0xFFu, 0xFFFFFEFFu, 0xFFFFFF00u, 0xFFFFFFFFu}) {
    const float u = fusedlm::bits_to_open_unit(bits);
    EXPECT(u > 0.0f && u < 1.0f && fusedlm::exponential_from_bits(bits) > 0.0f, "open unit of %08x: %.9g", bits, u);
  }
  // The exponential keeps its relative precision at the small end (the large Gumbel noise):
  // -log(1 - w) for w = 0.5 * 2^-32; at the large end it is -log(0.5 * 2^-24).
  const double smallest = fusedlm::exponential_from_bits(0xFFFFFFFFu), largest = fusedlm::exponential_from_bits(0u);
  EXPECT(std::fabs(smallest / std::ldexp(0.5, -32) - 1) < 1e-6, "smallest exponential %.9g", smallest);
  EXPECT(std::fabs(largest - 25 * std::log(2.0)) < 1e-5, "largest exponential %.9g", largest);
}

static void test_forward_matches_direct() {
  const int64_t N = 5, D = 7, V = 11;
  std::mt19937 gen(1);
  std::normal_distribution<double> dist;
  std::vector<double> e(N * D), c(V * D), bias(V);
  for (auto& x : e) x = dist(gen);
  for (auto& x : c) x = dist(gen);
  for (auto& x : bias) x = dist(gen);
  std::vector<int64_t> y = {0, 10, -100, 3, 7};
  std::vector<double> lse(N), tl(N), zs(N);
  const double cap = 2.5;
  fusedlm::cce_cpu::forward_rows<double>(e.data(), c.data(), bias.data(), y.data(), D, V, cap,
                                         -100, 0, N, lse.data(), tl.data(), zs.data());
  for (int64_t i = 0; i < N; ++i) {
    double sum = 0, total = 0, target = 0;
    for (int64_t v = 0; v < V; ++v) {
      double z = bias[v];
      for (int64_t k = 0; k < D; ++k) z += e[i * D + k] * c[v * D + k];
      z = cap * std::tanh(z / cap);
      sum += std::exp(z);
      total += z;
      if (v == y[i]) target = z;
    }
    EXPECT(std::fabs(lse[i] - std::log(sum)) < 1e-12, "lse row %ld", (long)i);
    EXPECT(std::fabs(zs[i] - total) < 1e-12, "logit sum row %ld", (long)i);
    EXPECT(std::fabs(tl[i] - target) < 1e-12, "target logit row %ld", (long)i);
  }
}

static void test_backward_matches_finite_differences() {
  const int64_t N = 3, D = 4, V = 6;
  std::mt19937 gen(2);
  std::normal_distribution<double> dist;
  std::vector<double> e(N * D), c(V * D);
  for (auto& x : e) x = dist(gen);
  for (auto& x : c) x = dist(gen);
  std::vector<int64_t> y = {1, 5, 0};
  // loss = sum_i (lse_i - z_{i,y_i}) => grad_lse = 1, grad_target = -1, grad_sum = 0
  auto loss = [&](const std::vector<double>& ev, const std::vector<double>& cv) {
    std::vector<double> lse(N), tl(N), zs(N);
    fusedlm::cce_cpu::forward_rows<double>(ev.data(), cv.data(), nullptr, y.data(), D, V, 0.0,
                                           -100, 0, N, lse.data(), tl.data(), zs.data());
    double total = 0;
    for (int64_t i = 0; i < N; ++i) total += lse[i] - tl[i];
    return total;
  };
  std::vector<double> lse(N), tl(N), zs(N), ones(N, 1.0), minus(N, -1.0), zeros(N, 0.0);
  fusedlm::cce_cpu::forward_rows<double>(e.data(), c.data(), nullptr, y.data(), D, V, 0.0, -100,
                                         0, N, lse.data(), tl.data(), zs.data());
  std::vector<double> ge(N * D), gc(V * D);
  fusedlm::cce_cpu::backward_e_rows<double>(e.data(), c.data(), nullptr, y.data(), lse.data(),
                                            ones.data(), minus.data(), zeros.data(), D, V, 0.0,
                                            -1.0, 0, N, ge.data());
  fusedlm::cce_cpu::backward_c_rows<double>(e.data(), c.data(), nullptr, y.data(), lse.data(),
                                            ones.data(), minus.data(), zeros.data(), N, D, 0.0,
                                            -1.0, 0, V, gc.data(), nullptr);
  const double h = 1e-6;
  for (int64_t j = 0; j < N * D; ++j) {
    auto ep = e, em = e;
    ep[j] += h;
    em[j] -= h;
    const double fd = (loss(ep, c) - loss(em, c)) / (2 * h);
    EXPECT(std::fabs(fd - ge[j]) < 1e-6, "dE[%ld]: fd %g kernel %g", (long)j, fd, ge[j]);
  }
  for (int64_t j = 0; j < V * D; ++j) {
    auto cp = c, cm = c;
    cp[j] += h;
    cm[j] -= h;
    const double fd = (loss(e, cp) - loss(e, cm)) / (2 * h);
    EXPECT(std::fabs(fd - gc[j]) < 1e-6, "dC[%ld]: fd %g kernel %g", (long)j, fd, gc[j]);
  }
}

static void test_sampling_greedy_and_masked() {
  std::vector<float> l = {0.5f, 3.0f, -INFINITY, 3.0f, 1.0f};
  auto r = fusedlm::sampling_cpu::sample_row(l.data(), 5, 0.0f, 1, 0, 0, 1.0, 0.0);
  EXPECT(r.token == 1, "greedy picks the lowest tied index, got %ld", (long)r.token);
  for (uint64_t seed = 0; seed < 200; ++seed) {
    r = fusedlm::sampling_cpu::sample_row(l.data(), 5, 1.0f, seed, 0, 0, 1.0, 0.0);
    EXPECT(r.token != 2, "drew a -inf entry");
  }
  std::vector<float> masked = {-INFINITY, -INFINITY};
  r = fusedlm::sampling_cpu::sample_row(masked.data(), 2, 1.0f, 3, 0, 0, 1.0, 0.0);
  EXPECT(r.token == 0 && std::isnan(r.logprob), "all -inf row");
}

int main() {
  test_philox_known_answers();
  test_forward_matches_direct();
  test_backward_matches_finite_differences();
  test_sampling_greedy_and_masked();
  if (failures == 0) std::printf("all CPU kernel tests passed\n");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
