// Stochastic rounding of float32 results to bfloat16 (llm.c's approach for bfloat16 params
// kept without a float32 master copy): the 16 bits cut off are compared with 16 random
// bits, so x rounds up to the next bfloat16 value with probability equal to its distance
// from the lower one over the gap. Unbiased: an update smaller than half an ulp, which
// round-to-nearest would drop every step, moves the param on average by its full size.
// The random bits come from a counter-based hash (common/quant.h's mix32) of the seed, the
// step, the tensor's position in the call's list and the element's index in the tensor:
// reproducible, and the same on every CPU path, thread count and the GPU. A NaN becomes
// 0x7FFF, as with round-to-nearest (common/half.h).
#pragma once
#include <cstdint>
#include <cstring>
#include "common/platform.h"
#include "common/quant.h"

FASTOPT_ISA_BEGIN

// The key of tensor `tensor` of a call at step `step` with seed `seed`.
FASTOPT_HD uint32_t rounding_key(uint64_t seed, int64_t step, int32_t tensor) {
  const uint32_t k = mix32(seed_key(seed) ^ seed_key(uint64_t(step)));
  return mix32(k ^ mix32(uint32_t(tensor) + 0x7f4a7c15U));
}

// 32 random bits for element j of the tensor with key `key`.
FASTOPT_HD uint32_t rounding_bits(uint32_t key, int64_t j) { return index_hash(key, uint64_t(j)); }

// x rounded to bfloat16 with the top 16 of `random`'s bits.
FASTOPT_HD uint16_t bfloat16_stochastic(float x, uint32_t random) {
  uint32_t u;
  memcpy(&u, &x, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFF;
  return uint16_t((u + (random >> 16)) >> 16);
}

FASTOPT_ISA_END
