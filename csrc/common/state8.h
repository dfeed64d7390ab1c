// 8-bit blockwise optimizer state (state_dtype="int8"), after Dettmers et al. 2022, "8-bit
// Optimizers via Block-wise Quantization": a state tensor is split into blocks of 256
// elements; each block keeps a float32 absmax and one byte per element, the index of the
// nearest value of a 256-entry dynamic quantization map scaled by that absmax. So a state
// costs 1 + 4/256 bytes per element instead of 4.
//
// The dynamic maps: seven decades 10^-6 .. 10^0; decade d holds the midpoints of B_d equal
// bins of [0.1, 1] * 10^(d-6) (B_d = 2^d for the signed map, 2^(d+1) for the unsigned one),
// plus 0 and 1.0; the signed map mirrors its positive values (127 of each sign, no -1.0).
// Midpoint k of decade d is the float32 first[d] + float(k) * step[d] (first: the midpoint
// of bin 0, step: the bin width, each rounded to float32; a product then a sum, not fused),
// within 1.5 float32 ulp of its exact value: so the AVX2 path decodes a code arithmetically
// (its decade from the exponent of its rank) to the bits of the table.
// A map is sorted, so a code is its value's rank: signed: 0 = most negative, 127 = zero,
// 255 = 1.0; unsigned: 0 = zero, 255 = 1.0. Signed maps serve first moments and momentum,
// unsigned ones second moments (they are never negative).
//
// Encoding is arithmetic (no search), in float32 operations that every path (scalar, AVX2,
// CUDA, and python/fastopt/reference.py) performs identically: x = |s| * (1 / absmax); the
// decade is the number of decade thresholds x reaches; within a decade the nearest midpoint
// is the bin holding x, k = floor(x * scale_d - offset_d) clamped to [0, B_d - 1]. It is
// the nearest map value except within float32 rounding of the midway points. NaN encodes
// as zero; a block with a NaN or Inf value has a non-finite absmax and so decodes to NaN.
#pragma once
#include <cstdint>
#include <cstring>
#include "common/platform.h"

namespace fastopt {

constexpr int64_t kState8Block = 256;      // elements per absmax
constexpr int64_t kState8MinElements = 4096;  // smaller tensors keep float32 state (Python)

// One map with the constants of its encoder (all float32, computed in double on the host).
struct State8Map {
  float value[256];     // code -> value in [-1, 1], ascending
  float lower[8];       // lower[d]: the least x of decade d (d = 1..6); lower[0]: of any
                        // nonzero code; lower[7]: of the code for 1.0
  float scale[8];       // per decade: B_d / (0.9 * 10^(d-6))
  float offset[8];      // per decade: B_d / 9
  float top[8];         // per decade: B_d - 1 (the last bin, as a float)
  int32_t base[8];      // per decade: the positive-side rank of its first value (2^d - 1 or
                        // 2^(d+1) - 2 counting from the first nonzero value)
  float first[8];       // per decade: its first value (bin 0's midpoint); [7]: 1.0
  float step[8];        // per decade: the distance of its values (the bin width); [7]: 0
  int32_t zero_code;    // 127 signed, 0 unsigned
  int32_t first_code;   // the code of the smallest positive value: 128 signed, 1 unsigned
};

// Both maps, built once (state8.cpp); the CUDA module copies them to the device.
const State8Map& state8_map(bool is_signed);

}  // namespace fastopt

FASTOPT_ISA_BEGIN

// The code of state value s in a block whose reciprocal absmax is inv (1 / absmax, float32).
FASTOPT_HD int32_t state8_encode(const State8Map& m, bool is_signed, float s, float inv) {
  const bool negative = is_signed && s < 0.0f;
  const float x = (negative ? -s : s) * inv;
  if (!(x >= m.lower[0])) return m.zero_code;  // zero, tiny, NaN (and negative if unsigned)
  if (!negative && x >= m.lower[7]) return 255;
  int d = 0;
  for (int t = 1; t <= 6; ++t) d += x >= m.lower[t] ? 1 : 0;
  float k = x * m.scale[d];
  k = k - m.offset[d];
  k = k < 0.0f ? 0.0f : k;
  k = k > m.top[d] ? m.top[d] : k;
  const int32_t positive = m.first_code + m.base[d] + int32_t(k);  // int() floors k >= 0
  return negative ? 254 - positive : positive;
}

FASTOPT_HD float state8_decode(const State8Map& m, uint8_t code, float absmax) {
  return m.value[code] * absmax;
}

// The absmax a block stores: every NaN the same, so every path stores the same bits.
FASTOPT_HD float state8_canonical_absmax(float absmax) {
  const uint32_t quiet_nan = 0x7FC00000u;
  float nan;
  memcpy(&nan, &quiet_nan, 4);
  return absmax == absmax ? absmax : nan;
}

FASTOPT_ISA_END
