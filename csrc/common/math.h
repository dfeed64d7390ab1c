// Scalar math helpers with the NaN semantics of the NumPy reference. The AVX2 vector types
// in cpu/vec_avx2.h overload the same names with the same semantics lane by lane.
#pragma once
#include <cmath>
#include "common/platform.h"

FASTOPT_ISA_BEGIN

FASTOPT_HD float vsqrt(float x) { return sqrtf(x); }
FASTOPT_HD double vsqrt(double x) { return sqrt(x); }
FASTOPT_HD float vabs(float x) { return fabsf(x); }
FASTOPT_HD double vabs(double x) { return fabs(x); }
FASTOPT_HD float vcopysign(float mag, float sgn) { return copysignf(mag, sgn); }
FASTOPT_HD double vcopysign(double mag, double sgn) { return copysign(mag, sgn); }

// max that propagates NaN from either side, like numpy.maximum / torch.maximum:
// a if a > b or a is NaN, else b.
template <class T>
FASTOPT_HD T vmax_nan(T a, T b) { return (a > b || a != a) ? a : b; }

// min that propagates NaN from either side, like numpy.minimum.
template <class T>
FASTOPT_HD T vmin_nan(T a, T b) { return (a < b || a != a) ? a : b; }

// sign(x) as numpy.sign: -1, 0 or 1, NaN for NaN (0 and NaN come back as they are).
template <class T>
FASTOPT_HD T vsign(T x) { return x > T(0) ? T(1) : x < T(0) ? T(-1) : x; }

// positive where x > 0, negative where x < 0, else neither (x is 0 or NaN).
template <class T>
FASTOPT_HD T by_sign(T x, T positive, T negative, T neither) {
  return x > T(0) ? positive : x < T(0) ? negative : neither;
}

// Proximal step of the L1 penalty: sign(p) * max(|p| - t, 0). NaN stays NaN.
template <class T>
FASTOPT_HD T soft_threshold(T p, T t) { return vcopysign(vmax_nan(vabs(p) - t, T(0)), p); }

FASTOPT_ISA_END
