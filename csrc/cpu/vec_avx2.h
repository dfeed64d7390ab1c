// AVX2 vector types (8 floats, 4 doubles) with the operators and math helpers the formulas
// in common/ use, so that the same formula text compiles to the vector body. Every
// operation is the IEEE operation of the scalar code lane by lane (no FMA contraction),
// so the AVX2 path gives bit-identical results to the scalar path.
#pragma once
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <limits>
#include "common/half.h"
#include "common/math.h"
#include "common/quant.h"
#include "common/state8.h"
#include "common/platform.h"

FASTOPT_ISA_BEGIN

struct F32x8 {
  __m256 v;
  F32x8() = default;
  F32x8(__m256 x) : v(x) {}
  F32x8(float s) : v(_mm256_set1_ps(s)) {}  // broadcast: lets formulas write T(coefficient)
  static F32x8 load(const float* p) { return _mm256_loadu_ps(p); }
  // 8 mask bytes -> all-ones lanes where the byte is nonzero.
  static F32x8 load_keep(const uint8_t* p) {
    const __m256i wide = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(
        _mm256_xor_si256(_mm256_cmpeq_epi32(wide, _mm256_setzero_si256()), _mm256_set1_epi32(-1)));
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  // 16-bit storage (common/half.h): exact widening; narrowing rounds to nearest even and
  // turns every NaN into 0x7FFF, as the scalar conversions do.
  static F32x8 load(const bfloat16* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static F32x8 load(const float16* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  void store(bfloat16* p) const {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_srli_epi32(_mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FFF0000), nan), 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  // Stochastic rounding of elements j .. j+7 of a tensor with rounding key `key`: the
  // random bits of common/rounding.h's rounding_bits, lane by lane.
  void store_stochastic(bfloat16* p, uint32_t key, int64_t j) const {
    const uint32_t lo0 = uint32_t(uint64_t(j)), hi0 = uint32_t(uint64_t(j) >> 32);
    const __m256i lo = _mm256_add_epi32(_mm256_set1_epi32(int32_t(lo0)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    // j + lane's high half is hi0, or hi0 + 1 where the low half wrapped (lo < lo0, unsigned)
    const __m256i bias = _mm256_set1_epi32(INT32_MIN);
    const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(_mm256_set1_epi32(int32_t(lo0)), bias),
                                               _mm256_xor_si256(lo, bias));
    // mix32(hi ^ key) is one of two values: computed on scalars, picked per lane
    const uint32_t inner0 = fastopt::FASTOPT_ISA::mix32(hi0 ^ key);
    const uint32_t inner1 = fastopt::FASTOPT_ISA::mix32((hi0 + 1u) ^ key);
    const __m256i inner = _mm256_blendv_epi8(_mm256_set1_epi32(int32_t(inner0)),
                                             _mm256_set1_epi32(int32_t(inner1)), wrapped);
    const __m256i h = mix32x8(_mm256_xor_si256(lo, inner));
    const __m256i u = _mm256_castps_si256(v);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_srli_epi32(h, 16)), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FFF), nan);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  // common/quant.h's mix32, lane by lane.
  static __m256i mix32x8(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int32_t(0x7feb352dU)));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int32_t(0x846ca68bU)));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  }
  void store(float16* p) const {
    // A NaN becomes the float whose conversion is 0x7FFF (F16C keeps NaN payloads).
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    const __m256 x = _mm256_blendv_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFE000)), nan);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  }
};
struct F64x4 {
  __m256d v;
  F64x4() = default;
  F64x4(__m256d x) : v(x) {}
  F64x4(double s) : v(_mm256_set1_pd(s)) {}
  static F64x4 load(const double* p) { return _mm256_loadu_pd(p); }
  // 4 mask bytes -> all-ones lanes where the byte is nonzero.
  static F64x4 load_keep(const uint8_t* p) {
    int32_t bytes;
    std::memcpy(&bytes, p, 4);
    const __m256i wide = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(bytes));
    return _mm256_castsi256_pd(
        _mm256_xor_si256(_mm256_cmpeq_epi64(wide, _mm256_setzero_si256()), _mm256_set1_epi64x(-1)));
  }
  void store(double* p) const { _mm256_storeu_pd(p, v); }
};

#define FASTOPT_VEC_OPS(V, sfx)                                                            \
  inline V operator+(V a, V b) { return _mm256_add_##sfx(a.v, b.v); }                      \
  inline V operator-(V a, V b) { return _mm256_sub_##sfx(a.v, b.v); }                      \
  inline V operator*(V a, V b) { return _mm256_mul_##sfx(a.v, b.v); }                      \
  inline V operator/(V a, V b) { return _mm256_div_##sfx(a.v, b.v); }                      \
  inline V operator-(V a) { return _mm256_xor_##sfx(a.v, _mm256_set1_##sfx(-0.0)); }       \
  inline V vsqrt(V a) { return _mm256_sqrt_##sfx(a.v); }                                   \
  inline V vabs(V a) { return _mm256_andnot_##sfx(_mm256_set1_##sfx(-0.0), a.v); }         \
  inline V vcopysign(V mag, V sgn) {                                                       \
    const auto sign_bit = _mm256_set1_##sfx(-0.0);                                         \
    return _mm256_or_##sfx(_mm256_andnot_##sfx(sign_bit, mag.v),                           \
                           _mm256_and_##sfx(sign_bit, sgn.v));                             \
  }                                                                                        \
  /* a where a > b or a is NaN, else b: exactly the scalar vmax_nan */                     \
  inline V vmax_nan(V a, V b) {                                                            \
    const auto take_a = _mm256_or_##sfx(_mm256_cmp_##sfx(a.v, b.v, _CMP_GT_OQ),            \
                                        _mm256_cmp_##sfx(a.v, a.v, _CMP_UNORD_Q));         \
    return _mm256_blendv_##sfx(b.v, a.v, take_a);                                          \
  }                                                                                        \
  /* a where a < b or a is NaN, else b: exactly the scalar vmin_nan */                     \
  inline V vmin_nan(V a, V b) {                                                            \
    const auto take_a = _mm256_or_##sfx(_mm256_cmp_##sfx(a.v, b.v, _CMP_LT_OQ),            \
                                        _mm256_cmp_##sfx(a.v, a.v, _CMP_UNORD_Q));         \
    return _mm256_blendv_##sfx(b.v, a.v, take_a);                                          \
  }                                                                                        \
  /* a where keep's lane is all ones, else b */                                            \
  inline V vselect(V keep, V a, V b) { return _mm256_blendv_##sfx(b.v, a.v, keep.v); }     \
  /* 1 where x > 0, -1 where x < 0, else x itself (0 or NaN): the scalar vsign */          \
  inline V vsign(V x) {                                                                    \
    const auto zero = _mm256_setzero_##sfx();                                              \
    const auto pos = _mm256_cmp_##sfx(x.v, zero, _CMP_GT_OQ);                              \
    const auto neg = _mm256_cmp_##sfx(x.v, zero, _CMP_LT_OQ);                              \
    const auto r = _mm256_blendv_##sfx(x.v, _mm256_set1_##sfx(1.0), pos);                  \
    return _mm256_blendv_##sfx(r, _mm256_set1_##sfx(-1.0), neg);                           \
  }                                                                                        \
  /* the scalar by_sign, lane by lane */                                                   \
  inline V by_sign(V x, V positive, V negative, V neither) {                               \
    const auto zero = _mm256_setzero_##sfx();                                              \
    const auto pos = _mm256_cmp_##sfx(x.v, zero, _CMP_GT_OQ);                              \
    const auto neg = _mm256_cmp_##sfx(x.v, zero, _CMP_LT_OQ);                              \
    const auto r = _mm256_blendv_##sfx(neither.v, positive.v, pos);                        \
    return _mm256_blendv_##sfx(r, negative.v, neg);                                        \
  }
FASTOPT_VEC_OPS(F32x8, ps)
FASTOPT_VEC_OPS(F64x4, pd)
#undef FASTOPT_VEC_OPS

// 8-bit state (common/state8.h) over a block buffer, lane by lane as state8_decode /
// state8_encode. The encoder's tables live in a local object so that they stay in
// registers across the block (stores through uint8_t* could alias the map otherwise).
template <bool is_signed> struct State8EncoderX8 {
  __m256 lower[8], scale, offset, top;
  __m256i base, zero_code;
  explicit State8EncoderX8(const State8Map& m) {
    for (int t = 0; t < 8; ++t) lower[t] = _mm256_set1_ps(m.lower[t]);
    scale = _mm256_loadu_ps(m.scale);
    offset = _mm256_loadu_ps(m.offset);
    top = _mm256_loadu_ps(m.top);
    base = _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m.base)),
                            _mm256_set1_epi32(m.first_code));
    zero_code = _mm256_set1_epi32(m.zero_code);
  }
  // The codes of 8 values (one per 32-bit lane) in a block of reciprocal absmax inv.
  __m256i codes(__m256 v, __m256 inv) const {
    const __m256 zero = _mm256_setzero_ps();
    const __m256 negative = is_signed ? _mm256_cmp_ps(v, zero, _CMP_LT_OQ) : zero;
    const __m256 magnitude = is_signed ? _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v) : v;
    const __m256 x = _mm256_mul_ps(magnitude, inv);
    __m256i decade = _mm256_setzero_si256();
    for (int t = 1; t <= 6; ++t)  // each threshold reached adds one (true lanes are -1)
      decade = _mm256_sub_epi32(decade, _mm256_castps_si256(_mm256_cmp_ps(x, lower[t], _CMP_GE_OQ)));
    __m256 k = _mm256_mul_ps(x, _mm256_permutevar8x32_ps(scale, decade));
    k = _mm256_sub_ps(k, _mm256_permutevar8x32_ps(offset, decade));
    k = _mm256_max_ps(k, zero);  // k is never NaN here (NaN x takes the zero code below)
    k = _mm256_min_ps(k, _mm256_permutevar8x32_ps(top, decade));
    __m256i code = _mm256_add_epi32(_mm256_permutevar8x32_epi32(base, decade), _mm256_cvttps_epi32(k));
    if constexpr (is_signed)
      code = _mm256_blendv_epi8(code, _mm256_sub_epi32(_mm256_set1_epi32(254), code),
                                _mm256_castps_si256(negative));
    const __m256 one = _mm256_andnot_ps(negative, _mm256_cmp_ps(x, lower[7], _CMP_GE_OQ));
    code = _mm256_blendv_epi8(code, _mm256_set1_epi32(255), _mm256_castps_si256(one));
    const __m256 small = _mm256_cmp_ps(x, lower[0], _CMP_NGE_UQ);  // NaN too
    return _mm256_blendv_epi8(code, zero_code, _mm256_castps_si256(small));
  }
};

// x[j] = map value of p[j] * absmax, j < len: the value of the code's rank computed as the
// map's table was (common/state8.h), no gather. The rank q (signed: |code - 127|; unsigned:
// code + 1) is 2^e + k; as a float its exponent field is 127 + e, whose low 3 bits pick the
// decade's constants (with first[] and step[] rotated to match), and k = q - 2^e exactly.
// q's that share a slot: zero (masked) and, unsigned, 1.0 (k = 0, first = 1.0, step = 0).
template <bool is_signed>
void state8_decode_block(const State8Map& m, const uint8_t* p, float absmax, float* x, int64_t len) {
  const __m256i slot_to_decade = is_signed ? _mm256_setr_epi32(1, 2, 3, 4, 5, 6, 7, 0)
                                           : _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 first = _mm256_permutevar8x32_ps(_mm256_loadu_ps(m.first), slot_to_decade);
  const __m256 step = _mm256_permutevar8x32_ps(_mm256_loadu_ps(m.step), slot_to_decade);
  const __m256 exponent = _mm256_castsi256_ps(_mm256_set1_epi32(0x7F800000));
  const __m256 scale = _mm256_set1_ps(absmax);
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    const __m256i code = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + j)));
    const __m256i signed_rank = _mm256_sub_epi32(code, _mm256_set1_epi32(is_signed ? 127 : -1));
    const __m256i rank = is_signed ? _mm256_abs_epi32(signed_rank) : signed_rank;
    const __m256 q = _mm256_cvtepi32_ps(rank);
    const __m256 k = _mm256_sub_ps(q, _mm256_and_ps(q, exponent));
    const __m256i slot = _mm256_srli_epi32(_mm256_castps_si256(q), 23);
    __m256 v = _mm256_mul_ps(k, _mm256_permutevar8x32_ps(step, slot));
    v = _mm256_add_ps(_mm256_permutevar8x32_ps(first, slot), v);
    const __m256i zero = _mm256_cmpeq_epi32(code, _mm256_set1_epi32(m.zero_code));
    v = _mm256_andnot_ps(_mm256_castsi256_ps(zero), v);
    if (is_signed)  // codes below 127: the negated value
      v = _mm256_xor_ps(v, _mm256_castsi256_ps(_mm256_and_si256(signed_rank, _mm256_set1_epi32(INT32_MIN))));
    _mm256_storeu_ps(x + j, _mm256_mul_ps(v, scale));
  }
  for (; j < len; ++j) x[j] = state8_decode(m, p[j], absmax);
}
inline void state8_decode_block(const State8Map& m, const uint8_t* p, float absmax, float* x,
                                int64_t len) {
  if (m.zero_code != 0) state8_decode_block<true>(m, p, absmax, x, len);
  else state8_decode_block<false>(m, p, absmax, x, len);
}

// max |x[j]|, j < len, NaN if any x is NaN, canonical (state8_canonical_absmax).
inline float state8_block_absmax(const float* x, int64_t len) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  __m256 top = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {  // max_ps keeps top where x is NaN; nan records it
    const __m256 v = _mm256_loadu_ps(x + j);
    top = _mm256_max_ps(_mm256_andnot_ps(sign_bit, v), top);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top);
  float absmax = 0.0f;
  for (int w = 0; w < 8; ++w) absmax = vmax_nan(lanes[w], absmax);
  for (; j < len; ++j) absmax = vmax_nan(vabs(x[j]), absmax);
  if (_mm256_movemask_ps(nan)) absmax = std::numeric_limits<float>::quiet_NaN();
  return state8_canonical_absmax(absmax);
}

// p[j] = code of x[j], j < len, in a block of absmax max |x| (NaN if any x is NaN), which
// it returns (state8_block_absmax).
template <bool is_signed>
float state8_encode_block(const State8Map& m, uint8_t* p, const float* x, int64_t len) {
  const float absmax = state8_block_absmax(x, len);
  const float inv_scalar = 1.0f / absmax;
  const __m256 inv = _mm256_set1_ps(inv_scalar);
  int64_t j = 0;
  const State8EncoderX8<is_signed> enc(m);
  for (; j + 32 <= len; j += 32) {  // 4 x 8 codes packed to 32 bytes, then put in order
    const __m256i lo = _mm256_packus_epi32(enc.codes(_mm256_loadu_ps(x + j), inv),
                                           enc.codes(_mm256_loadu_ps(x + j + 8), inv));
    const __m256i hi = _mm256_packus_epi32(enc.codes(_mm256_loadu_ps(x + j + 16), inv),
                                           enc.codes(_mm256_loadu_ps(x + j + 24), inv));
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(lo, hi),
                                                      _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), bytes);
  }
  for (; j + 8 <= len; j += 8) {
    const __m256i c = enc.codes(_mm256_loadu_ps(x + j), inv);
    const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p + j), _mm_packus_epi16(words, words));
  }
  for (; j < len; ++j) p[j] = uint8_t(state8_encode(m, is_signed, x[j], inv_scalar));
  return absmax;
}
inline float state8_encode_block(const State8Map& m, bool is_signed, uint8_t* p, const float* x,
                                 int64_t len) {
  return is_signed ? state8_encode_block<true>(m, p, x, len) : state8_encode_block<false>(m, p, x, len);
}

FASTOPT_ISA_END
