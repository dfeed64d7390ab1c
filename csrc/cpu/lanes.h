// Lane types: how a kernel loads, computes on and stores `width` consecutive elements.
// L::value is float/double (ScalarLane) or an AVX2 vector of them; WideLane<T> is the
// widest lane of the ISA this translation unit is compiled for.
#pragma once
#include <cstdint>
#include "common/half.h"
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
  // 8-bit state (T = float): the value of code *p in a block of this absmax, and the code
  // of x in a block of reciprocal absmax inv, with map m.
  static T load_state8(const State8Map& m, const uint8_t* p, float absmax) {
    return state8_decode(m, *p, absmax);
  }
  static void store_state8(const State8Map& m, bool is_signed, uint8_t* p, T x, float inv) {
    *p = uint8_t(state8_encode(m, is_signed, x, inv));
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
  static V load_state8(const State8Map& m, const uint8_t* p, float absmax) {
    return V::load_state8(m, p, absmax);
  }
  static void store_state8(const State8Map& m, bool is_signed, uint8_t* p, V x, float inv) {
    x.store_state8(m, is_signed, p, inv);
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
