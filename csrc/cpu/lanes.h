// Lane types: how a kernel loads, computes on and stores `width` consecutive elements.
// L::value is float/double (ScalarLane) or an AVX2 vector of them; WideLane<T> is the
// widest lane of the ISA this translation unit is compiled for.
#pragma once
#include <cstdint>
#include "common/half.h"
#include "common/math.h"
#include "common/platform.h"
#include "common/rounding.h"
#include "common/state8.h"
#ifdef FASTOPT_ISA_isa_avx2
#include "cpu/vec_avx2.h"
#endif

FASTOPT_ISA_BEGIN

// Loads and stores take the storage type: T itself, or for T = float the 16-bit types of
// common/half.h (converted on the way in and out).
template <class T> struct ScalarLane {
  using value = T;
  static constexpr int width = 1;
  static T load(const T* p) { return *p; }
  static void store(T* p, T x) { *p = x; }
  static T load(const bfloat16* p) { return to_float(*p); }
  static T load(const float16* p) { return to_float(*p); }
  static void store(bfloat16* p, T x) { *p = to_bfloat16(x); }
  static void store(float16* p, T x) { *p = to_float16(x); }
  // Stochastic rounding of element j of a tensor with rounding key `key` (T = float).
  static void store_stochastic(bfloat16* p, T x, uint32_t key, int64_t j) {
    p->bits = bfloat16_stochastic(x, rounding_bits(key, j));
  }
  // 8-bit state (T = float), a block at a time: x[j] = the value of code p[j] in a block
  // of this absmax; and p[j] = the code of x[j] in a block of absmax max |x| (NaN if any
  // x is), which store_state8_block returns (canonical), for j < len, with map m.
  static void load_state8_block(const State8Map& m, const uint8_t* p, float absmax, T* x,
                                int64_t len) {
    for (int64_t j = 0; j < len; ++j) x[j] = state8_decode(m, p[j], absmax);
  }
  static float store_state8_block(const State8Map& m, bool is_signed, uint8_t* p, const T* x,
                                  int64_t len) {
    float absmax = 0.0f;
    for (int64_t j = 0; j < len; ++j) absmax = vmax_nan(vabs(x[j]), absmax);
    absmax = state8_canonical_absmax(absmax);
    const float inv = 1.0f / absmax;
    for (int64_t j = 0; j < len; ++j) p[j] = uint8_t(state8_encode(m, is_signed, x[j], inv));
    return absmax;
  }
  // Masked steps: which lanes a mask (one byte per element, 0 = pruned) keeps, and a
  // where keep else b.
  using keep_type = bool;
  static bool load_keep(const uint8_t* p) { return *p != 0; }
  static T select(bool keep, T a, T b) { return keep ? a : b; }
};
template <class V, class T, int W> struct VectorLane {
  using value = V;
  static constexpr int width = W;
  template <class Storage> static V load(const Storage* p) { return V::load(p); }
  template <class Storage> static void store(Storage* p, V x) { x.store(p); }
  static void store_stochastic(bfloat16* p, V x, uint32_t key, int64_t j) {
    x.store_stochastic(p, key, j);
  }
  static void load_state8_block(const State8Map& m, const uint8_t* p, float absmax, T* x,
                                int64_t len) {
    state8_decode_block(m, p, absmax, x, len);
  }
  static float store_state8_block(const State8Map& m, bool is_signed, uint8_t* p, const T* x,
                                  int64_t len) {
    return state8_encode_block(m, is_signed, p, x, len);
  }
  using keep_type = V;  // all-ones lanes where kept
  static V load_keep(const uint8_t* p) { return V::load_keep(p); }
  static V select(V keep, V a, V b) { return vselect(keep, a, b); }
};

#ifdef FASTOPT_ISA_isa_avx2
template <class T> struct WideLane;
template <> struct WideLane<float> : VectorLane<F32x8, float, 8> {};
template <> struct WideLane<double> : VectorLane<F64x4, double, 4> {};
#else
template <class T> struct WideLane : ScalarLane<T> {};
#endif

FASTOPT_ISA_END
