// 16-bit floating-point storage on the CPU: bfloat16 and IEEE float16 values are held as
// their bits and converted to float32 for the math, as the CUDA kernels do. Conversions to
// 16 bits round to nearest even, and every NaN becomes 0x7FFF (what CUDA's
// __float2bfloat16_rn / __float2half_rn give), so the scalar path, the AVX2 path
// (cpu/vec_avx2.h) and the GPU store the same bits.
#pragma once
#include <cstdint>
#include <cstring>
#include "common/platform.h"

namespace fastopt {

struct bfloat16 {
  uint16_t bits;
};
struct float16 {
  uint16_t bits;
};

}  // namespace fastopt

FASTOPT_ISA_BEGIN

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float to_float(bfloat16 h) { return float_of(uint32_t(h.bits) << 16); }

inline bfloat16 to_bfloat16(float f) {
  const uint32_t u = bits_of(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return {0x7FFF};
  return {uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}

// Exact: every float16 value is a float32 value (subnormals included).
inline float to_float(float16 h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1Fu;
  const uint32_t mantissa = h.bits & 0x3FFu;
  if (exponent == 0x1F)  // Inf, or NaN made quiet (as the F16C instruction does)
    return float_of(sign | 0x7F800000u | (mantissa << 13) | (mantissa ? 0x400000u : 0u));
  if (exponent != 0) return float_of(sign | ((exponent + 112) << 23) | (mantissa << 13));
  // Zero or subnormal: mantissa * 2^-24, exact in float32.
  const float magnitude = float(mantissa) * float_of(0x33800000u);  // 2^-24
  return float_of(sign | bits_of(magnitude));
}

// Round to nearest even: the float32 mantissa is cut to 10 bits (13 fewer; more for
// results that are float16 subnormals), adding half an ulp minus one plus the kept lsb.
inline float16 to_float16(float f) {
  const uint32_t u = bits_of(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return {0x7FFF};                       // NaN
  if (a >= 0x477FF000u) return {uint16_t(sign | 0x7C00u)};    // rounds to >= 2^16: Inf
  if (a >= 0x38800000u) {                                     // normal float16 (>= 2^-14)
    const uint32_t rounded = a + 0xFFFu + ((a >> 13) & 1u);
    return {uint16_t(sign | ((rounded - 0x38000000u) >> 13))};
  }
  if (a < 0x33000000u) return {sign};                         // below half the least subnormal
  // Subnormal result: shift the full mantissa (with its implicit bit) into 2^-24 units.
  const uint32_t exponent = a >> 23;                          // 102 .. 112
  const uint32_t mantissa = (a & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126 - exponent;                      // 14 .. 24
  const uint32_t half = 1u << (shift - 1);
  const uint32_t kept = mantissa >> shift;
  const uint32_t rest = mantissa & ((1u << shift) - 1);
  const uint32_t up = rest > half || (rest == half && (kept & 1u));
  return {uint16_t(sign | (kept + up))};
}

FASTOPT_ISA_END
