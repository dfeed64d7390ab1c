// Exponential moving average in place, average <- beta*average + (1-beta)*sample (Sophia's
// Hessian-diagonal EMA). fp32 bytes per element: 12. Both roles have the params' dtype.
#pragma once
#include "common/optim/descriptor.h"

namespace fastopt {

struct Ema : Descriptor {
  static constexpr const char* name = "ema";
  static constexpr bool takes_step = false;
#define FASTOPT_FIELDS(X) X(double, beta)
  FASTOPT_DEFINE_HYPER(FASTOPT_FIELDS)
#undef FASTOPT_FIELDS
  enum : int { averages, samples, num_roles };
  static constexpr Role roles[num_roles] = {{"averages", RoleKind::param, true, false},
                                            {"samples", RoleKind::grad, false, false}};
};

}  // namespace fastopt

FASTOPT_ISA_BEGIN

template <> struct Formula<Ema> {
  template <class S> struct Coeffs {
    S beta, one_minus_beta;
  };
  template <class S> static Coeffs<S> coeffs(const Ema::Hyper& h, int64_t /*step*/) {
    return {S(h.beta), S(1.0 - h.beta)};
  }
  template <class T, class S>
  static FASTOPT_HD void update(T (&x)[Ema::num_roles], const Coeffs<S>& c) {
    x[Ema::averages] = T(c.beta) * x[Ema::averages] + T(c.one_minus_beta) * x[Ema::samples];
  }
};

FASTOPT_ISA_END
