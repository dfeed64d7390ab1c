// Adadelta (Zeiler 2012), as torch.optim.Adadelta. fp32 bytes per element: 28 (p, v, u
// read+write, g read).
//   g <- -g if maximize; g <- g + wd*p; v <- rho*v + (1-rho)*g^2;
//   d = sqrt(u + eps) / sqrt(v + eps) * g; u <- rho*u + (1-rho)*d^2; p <- p - lr*d;
//   then the L1 step (lr*l1).
#pragma once
#include "common/optim/descriptor.h"

namespace fastopt {

struct Adadelta : Descriptor {
  static constexpr const char* name = "adadelta";
  static constexpr bool takes_step = false;
#define FASTOPT_FIELDS(X) \
  X(double, lr) X(double, rho) X(double, eps) X(double, weight_decay) X(double, l1) \
  X(bool, maximize)
  FASTOPT_DEFINE_HYPER(FASTOPT_FIELDS)
#undef FASTOPT_FIELDS
  enum : int { params, grads, square_avgs, acc_deltas, num_roles };
  static constexpr Role roles[num_roles] = {{"params", RoleKind::param, true, false},
                                            {"grads", RoleKind::grad, false, false},
                                            {"square_avgs", RoleKind::state, true, false, true},
                                            {"acc_deltas", RoleKind::state, true, false, true}};
};

}  // namespace fastopt

FASTOPT_ISA_BEGIN

template <> struct Formula<Adadelta> {
  template <class S> struct Coeffs {
    S lr, rho, one_minus_rho, eps, weight_decay, l1_threshold;
    bool maximize, has_weight_decay, has_l1;
  };
  template <class S> static Coeffs<S> coeffs(const Adadelta::Hyper& h, int64_t /*step*/) {
    return {S(h.lr), S(h.rho), S(1.0 - h.rho), S(h.eps), S(h.weight_decay), S(h.lr * h.l1),
            h.maximize, h.weight_decay != 0.0, h.l1 != 0.0};
  }
  template <class T, class S>
  static FASTOPT_HD void update(T (&x)[Adadelta::num_roles], const Coeffs<S>& c) {
    T& p = x[Adadelta::params];
    T& v = x[Adadelta::square_avgs];
    T& u = x[Adadelta::acc_deltas];
    T g = x[Adadelta::grads];
    if (c.maximize) g = -g;
    if (c.has_weight_decay) g = g + T(c.weight_decay) * p;
    v = T(c.rho) * v + (T(c.one_minus_rho) * g) * g;  // torch's addcmul_ order
    const T delta = vsqrt(u + T(c.eps)) / vsqrt(v + T(c.eps)) * g;
    u = T(c.rho) * u + (T(c.one_minus_rho) * delta) * delta;
    p = p - T(c.lr) * delta;
    if (c.has_l1) p = soft_threshold(p, T(c.l1_threshold));
  }
};

FASTOPT_ISA_END
