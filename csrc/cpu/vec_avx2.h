// AVX2 vector types (8 floats, 4 doubles) with the operators and math helpers the formulas
// in common/ use, so that the same formula text compiles to the vector body. Every
// operation is the IEEE operation of the scalar code lane by lane (no FMA contraction),
// so the AVX2 path gives bit-identical results to the scalar path.
#pragma once
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include "common/half.h"
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
  // 8-bit state (common/state8.h), lane by lane as state8_decode / state8_encode.
  static F32x8 load_state8(const State8Map& m, const uint8_t* p, float absmax) {
    const __m256i codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm256_mul_ps(_mm256_i32gather_ps(m.value, codes, 4), _mm256_set1_ps(absmax));
  }
  void store_state8(const State8Map& m, bool is_signed, uint8_t* p, float inv) const {
    const __m256 zero = _mm256_setzero_ps();
    const __m256 negative = is_signed ? _mm256_cmp_ps(v, zero, _CMP_LT_OQ) : zero;
    const __m256 magnitude = is_signed ? _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v) : v;
    const __m256 x = _mm256_mul_ps(magnitude, _mm256_set1_ps(inv));
    __m256i decade = _mm256_setzero_si256();
    for (int t = 1; t <= 6; ++t)  // each threshold reached adds one (true lanes are -1)
      decade = _mm256_sub_epi32(
          decade, _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_set1_ps(m.lower[t]), _CMP_GE_OQ)));
    __m256 k = _mm256_mul_ps(x, _mm256_permutevar8x32_ps(_mm256_loadu_ps(m.scale), decade));
    k = _mm256_sub_ps(k, _mm256_permutevar8x32_ps(_mm256_loadu_ps(m.offset), decade));
    k = _mm256_max_ps(k, zero);  // k is never NaN here (NaN x takes the zero code below)
    k = _mm256_min_ps(k, _mm256_permutevar8x32_ps(_mm256_loadu_ps(m.top), decade));
    const __m256i base = _mm256_permutevar8x32_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m.base)), decade);
    __m256i code = _mm256_add_epi32(_mm256_add_epi32(_mm256_set1_epi32(m.first_code), base),
                                    _mm256_cvttps_epi32(k));
    code = _mm256_blendv_epi8(code, _mm256_sub_epi32(_mm256_set1_epi32(254), code),
                              _mm256_castps_si256(negative));
    const __m256 one = _mm256_andnot_ps(negative, _mm256_cmp_ps(x, _mm256_set1_ps(m.lower[7]), _CMP_GE_OQ));
    code = _mm256_blendv_epi8(code, _mm256_set1_epi32(255), _mm256_castps_si256(one));
    const __m256 small = _mm256_cmp_ps(x, _mm256_set1_ps(m.lower[0]), _CMP_NGE_UQ);  // NaN too
    code = _mm256_blendv_epi8(code, _mm256_set1_epi32(m.zero_code), _mm256_castps_si256(small));
    // the low byte of each lane: 4 bytes per 128-bit half, then the halves side by side
    const __m256i bytes = _mm256_shuffle_epi8(
        code, _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                               0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1));
    const __m128i packed = _mm_unpacklo_epi32(_mm256_castsi256_si128(bytes),
                                              _mm256_extracti128_si256(bytes, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), packed);
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
  }
FASTOPT_VEC_OPS(F32x8, ps)
FASTOPT_VEC_OPS(F64x4, pd)
#undef FASTOPT_VEC_OPS

FASTOPT_ISA_END
