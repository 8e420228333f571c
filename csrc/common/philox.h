// Philox4x32-10 counter-based RNG (Salmon et al., SC'11), usable on host and device.
// Shared by the CPU and CUDA sampling kernels so that both draw the same noise for the
// same (seed, offset, counter): a row's token never depends on its batch position.
#pragma once
#include <cstdint>
#include <cstring>

#include "host_device.h"

namespace fusedlm {

struct Uint4 {
  uint32_t x, y, z, w;
};

FUSEDLM_HOST_DEVICE_INLINE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

// Ten rounds of Philox4x32 on `counter` with a 64-bit key.
FUSEDLM_HOST_DEVICE_INLINE Uint4 philox4x32_10(Uint4 counter, uint64_t key64) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  uint32_t k0 = static_cast<uint32_t>(key64), k1 = static_cast<uint32_t>(key64 >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kMul0, counter.x, &hi0);
    const uint32_t lo1 = mulhilo32(kMul1, counter.z, &hi1);
    counter = Uint4{hi1 ^ counter.y ^ k0, lo1, hi0 ^ counter.w ^ k1, lo0};
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return counter;
}

// Four random words for counter `group` of a row keyed by (seed, offset). The sampler uses
// one call per pair of 64-entry tiles 2g, 2g + 1 (group g): per tile a noise word (the
// Gumbel variate of its key) and a uniform word (the draw inside it): see tile_pair_block.
FUSEDLM_HOST_DEVICE_INLINE Uint4 philox_block(uint64_t seed, uint64_t offset, uint64_t group) {
  const Uint4 counter{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                      static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)};
  return philox4x32_10(counter, seed);
}

// Counter of tile pair `pair` in draw `round`: top-p by rejection (sampling_cpu.h) draws a
// row up to twice; round 1 takes the counters' high words (pairs stay below 2^32 for any
// vocabulary under 2^38 entries), so round 0 is every other draw's stream.
FUSEDLM_HOST_DEVICE_INLINE uint64_t pair_counter(uint64_t pair, uint32_t round) { return pair | (static_cast<uint64_t>(round) << 32); }

// The block of tile t's pair, and tile t's words in it.
FUSEDLM_HOST_DEVICE_INLINE Uint4 tile_pair_block(uint64_t seed, uint64_t offset, uint64_t t, uint32_t round = 0) {
  return philox_block(seed, offset, pair_counter(t / 2, round));
}
FUSEDLM_HOST_DEVICE_INLINE uint32_t tile_noise_word(const Uint4& block, uint64_t t) { return t % 2 ? block.z : block.x; }
FUSEDLM_HOST_DEVICE_INLINE uint32_t tile_uniform_word(const Uint4& block, uint64_t t) { return t % 2 ? block.w : block.y; }

FUSEDLM_HOST_DEVICE_INLINE float bits_to_open_unit(uint32_t bits) {
  // (bits >> 8) in [0, 2^24); +0.5 keeps the result inside (0, 1), but k + 0.5 rounds to even
  // for k >= 2^23, to 2^24 for the top k: that one (1 in 2^24 words) takes the largest float
  // below 1 instead. (At u = 1 the exponential -log(u) was 0: an infinite tile key, whichever
  // tile drew it won, and an inverse-CDF target past the tile's mass.)
  const float u = (static_cast<float>(bits >> 8) + 0.5f) * (1.0f / 16777216.0f);
  return u < 1.0f ? u : 0x1.fffffep-1f;
}

}  // namespace fusedlm

namespace fusedlm {
// The float whose bits are b (host and device).
FUSEDLM_HOST_DEVICE_INLINE float float_from_bits(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}

// Standard exponential noise -log(u) of a 32-bit word, with accurate logf on both host and
// device (CPU and CUDA agree to float rounding): u = bits_to_open_unit(bits) (24 bits), but
// near u = 1 (w = 1 - u < 2^-5) the series of -log1p(-w) in w = (~bits + 0.5) * 2^-32, so that
// E keeps its relative precision down to w = 2^-33: small E is the large Gumbel noise that lets
// a low-mass tile win (up to ~22.9 nats here; -log(u) of 24 bits stopped at 16.6, so tiles
// 15-19 nats below the best were drawn 2-100% too rarely, and those 19.5 below never). Both
// forms, then a select (no divergent branch on the tile's path); w from the complement's bits
// through the mantissa of 2^23 + x (exact parts). Cost, H100, graph of 20 (the series on every
// tile's path): bf16 V = 128256 B = 64 8.82 -> 8.98 us, V = 256000 12.94 -> 13.45, fp32 B = 64
// 10.82 -> 11.06, B = 1 / 8 +0.05; a branch, or int-to-float conversions, measured the same.
FUSEDLM_HOST_DEVICE_INLINE float exponential_from_bits(uint32_t bits) {
  const uint32_t c = ~bits;  // < 2^27 where the series is used
  const float hi = float_from_bits(0x4B000000u | (c >> 4)) - 8388608.0f, lo = float_from_bits(0x4B000000u | (c & 15u)) - 8388608.0f;
  const float w = hi * 0x1p-28f + (lo + 0.5f) * 0x1p-32f;
  const float series = w * (1.0f + w * (0.5f + w * (1.0f / 3 + w * (0.25f + w * (0.2f + w * (1.0f / 6))))));
  const float log_form = -logf(bits_to_open_unit(bits));
  return bits >= 0xF8000000u ? series : log_form;  // (the series to w^6 / 6: next term < 2^-30 w)
}

// Standard Gumbel noise -log(-log(u)).
FUSEDLM_HOST_DEVICE_INLINE float gumbel_from_bits(uint32_t bits) { return -logf(exponential_from_bits(bits)); }
}  // namespace fusedlm
