// Lane types: how a kernel loads, computes on and stores `width` consecutive elements.
// L::value is float/double (ScalarLane) or an AVX2 vector of them; WideLane<T> is the
// widest lane of the ISA this translation unit is compiled for.
#pragma once
#include "common/platform.h"
#ifdef FASTOPT_ISA_isa_avx2
#include "cpu/vec_avx2.h"
#endif

FASTOPT_ISA_BEGIN

template <class T> struct ScalarLane {
  using value = T;
  static constexpr int width = 1;
  static T load(const T* p) { return *p; }
  static void store(T* p, T x) { *p = x; }
};
template <class V, class T, int W> struct VectorLane {
  using value = V;
  static constexpr int width = W;
  static V load(const T* p) { return V::load(p); }
  static void store(T* p, V x) { x.store(p); }
};

#ifdef FASTOPT_ISA_isa_avx2
template <class T> struct WideLane;
template <> struct WideLane<float> : VectorLane<F32x8, float, 8> {};
template <> struct WideLane<double> : VectorLane<F64x4, double, 4> {};
#else
template <class T> struct WideLane : ScalarLane<T> {};
#endif

FASTOPT_ISA_END
