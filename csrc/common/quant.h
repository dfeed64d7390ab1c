// int8 quantization formulas: the one source of truth for the CPU kernels (scalar loop,
// AVX2 body's tail) and the CUDA kernels. All arithmetic is float32; the NumPy twin in
// python/fastopt/reference.py performs the same float32 operations, so results are exact.
//
//   affine:     q = clamp(rint(x / scale) + zero_point, qmin, qmax)    (round half to even)
//               x = (q - zero_point) * scale
//   blockwise:  absmax = max |x| over the block; s = 2^64 if absmax < 2^-64 else 1
//               (an exact rescaling that keeps 127/absmax finite for tiny blocks);
//               f = absmax > 0 ? 127 / (absmax * s) : 0;  v = (x * s) * f;
//               q = rint(v) or, stochastic, floor(v) + (u < v - floor(v)), u in [0, 1),
//               clamped to [-127, 127];  x = q * (absmax / 127)
//   stochastic: u = 24-bit uniform from a counter-based hash of (seed, element index), so
//               CPU and GPU agree for the same seed.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include "common/platform.h"

FASTOPT_ISA_BEGIN

FASTOPT_HD float vrint(float x) { return rintf(x); }  // default rounding: half to even
FASTOPT_HD float vfloor(float x) { return floorf(x); }
FASTOPT_HD float vclamp(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }
FASTOPT_HD bool is_finite(float x) { return x - x == 0.0f; }  // false for NaN and +-Inf

FASTOPT_HD float quantize_affine(float x, float scale, float zero_point, float qmin,
                                 float qmax) {
  return vclamp(vrint(x / scale) + zero_point, qmin, qmax);
}
FASTOPT_HD float dequantize_affine(float q, float scale, float zero_point) {
  return (q - zero_point) * scale;
}

// Quant blocks of `block` elements covering n (the last one may be partial); no overflow
// for any block >= 1.
FASTOPT_HD int64_t block_count(int64_t n, int64_t block) { return n / block + (n % block != 0); }

FASTOPT_HD float blockwise_prescale(float absmax) { return absmax < 0x1p-64f ? 0x1p64f : 1.0f; }
FASTOPT_HD float blockwise_factor(float absmax, float prescale) {
  return absmax > 0.0f ? 127.0f / (absmax * prescale) : 0.0f;
}
FASTOPT_HD float blockwise_nearest(float v) { return vclamp(vrint(v), -127.0f, 127.0f); }
// Rounds up with probability frac(v): unbiased, and exact values stay exact (computing
// floor(v + u) instead would round v + u up to the next integer when u is within half an
// ulp of 1).
FASTOPT_HD float blockwise_stochastic(float v, float u) {
  const float down = vfloor(v);
  return vclamp(down + (u < v - down ? 1.0f : 0.0f), -127.0f, 127.0f);
}
FASTOPT_HD float blockwise_scale(float absmax) { return absmax / 127.0f; }

// Counter-based uniform in [0, 1) with 24 random bits: a 32-bit avalanche mix
// ("lowbias32") of the element index's halves keyed by the seed.
FASTOPT_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}
FASTOPT_HD uint32_t seed_key(uint64_t seed) {
  return mix32(uint32_t(seed) ^ mix32(uint32_t(seed >> 32) + 0x9e3779b9U));
}
// 32 random bits for element `index` under `key`.
FASTOPT_HD uint32_t index_hash(uint32_t key, uint64_t index) {
  return mix32(uint32_t(index) ^ mix32(uint32_t(index >> 32) ^ key));
}
FASTOPT_HD float uniform24(uint32_t key, uint64_t index) {
  return float(index_hash(key, index) >> 8) * (1.0f / 16777216.0f);
}

// float16 / bfloat16 storage to float32 (exact).
FASTOPT_HD float bf16_to_float(uint16_t b) {
  const uint32_t bits = uint32_t(b) << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}
FASTOPT_HD float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (mant << 13);  // Inf / NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);  // normal: rebias 15 -> 127
  } else if (mant == 0) {
    bits = sign;  // +-0
  } else {  // subnormal half: normalise
    exp = 113u;
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

FASTOPT_ISA_END
