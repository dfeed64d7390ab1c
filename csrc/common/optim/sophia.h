// Sophia (clipped diagonal Newton, Liu et al. 2023). fp32 bytes per element: 24 (p and m
// read+write, g and h read).
//   g <- -g if maximize; m <- b1*m + (1-b1)*g; p <- p*(1 - lr*wd);
//   p <- p - lr * sign(m) * min(|m| / max(rho*h, eps), 1); then the L1 step (lr*l1).
// h is the caller's EMA of a Hessian-diagonal estimate (common/optim/ema.h), read only.
#pragma once
#include "common/optim/descriptor.h"

namespace fastopt {

struct Sophia : Descriptor {
  static constexpr const char* name = "sophia";
  static constexpr bool takes_step = false;
#define FASTOPT_FIELDS(X) \
  X(double, lr) X(double, beta1) X(double, rho) X(double, weight_decay) X(double, eps) \
  X(double, l1) X(bool, maximize)
  FASTOPT_DEFINE_HYPER(FASTOPT_FIELDS)
#undef FASTOPT_FIELDS
  enum : int { params, grads, exp_avgs, hessian_diags, num_roles };
  static constexpr Role roles[num_roles] = {{"params", RoleKind::param, true, false},
                                            {"grads", RoleKind::grad, false, false},
                                            {"exp_avgs", RoleKind::state, true, false},
                                            {"hessian_diags", RoleKind::state, false, false}};
};

}  // namespace fastopt

FASTOPT_ISA_BEGIN

template <> struct Formula<Sophia> {
  template <class S> struct Coeffs {
    S lr, beta1, one_minus_beta1, rho, eps, decay_factor, l1_threshold;
    bool maximize, has_weight_decay, has_l1;
  };
  template <class S> static Coeffs<S> coeffs(const Sophia::Hyper& h, int64_t /*step*/) {
    return {S(h.lr), S(h.beta1), S(1.0 - h.beta1), S(h.rho), S(h.eps),
            S(1.0 - h.lr * h.weight_decay), S(h.lr * h.l1), h.maximize, h.weight_decay != 0.0,
            h.l1 != 0.0};
  }
  template <class T, class S>
  static FASTOPT_HD void update(T (&x)[Sophia::num_roles], const Coeffs<S>& c) {
    T& p = x[Sophia::params];
    T& m = x[Sophia::exp_avgs];
    const T h = x[Sophia::hessian_diags];
    T g = x[Sophia::grads];
    if (c.maximize) g = -g;
    m = T(c.beta1) * m + T(c.one_minus_beta1) * g;
    if (c.has_weight_decay) p = p * T(c.decay_factor);
    const T ratio = vmin_nan(vabs(m) / vmax_nan(T(c.rho) * h, T(c.eps)), T(1));
    p = p - T(c.lr) * (vsign(m) * ratio);
    if (c.has_l1) p = soft_threshold(p, T(c.l1_threshold));
  }
};

FASTOPT_ISA_END
