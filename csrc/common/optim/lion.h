// Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"). fp32 bytes per
// element: 20 (p and m read+write, g read).
//   g <- -g if maximize; c = b1*m + (1-b1)*g; p <- p*(1 - lr*wd); p <- p - lr*sign(c)
//   (sign(0) = 0); m <- b2*m + (1-b2)*g; then the L1 step (lr*l1).
#pragma once
#include "common/optim/descriptor.h"

namespace fastopt {

struct Lion : Descriptor {
  static constexpr const char* name = "lion";
  static constexpr bool takes_step = false;
#define FASTOPT_FIELDS(X) \
  X(double, lr) X(double, beta1) X(double, beta2) X(double, weight_decay) X(double, l1) \
  X(bool, maximize)
  FASTOPT_DEFINE_HYPER(FASTOPT_FIELDS)
#undef FASTOPT_FIELDS
  enum : int { params, grads, exp_avgs, num_roles };
  static constexpr Role roles[num_roles] = {{"params", RoleKind::param, true, false},
                                            {"grads", RoleKind::grad, false, false},
                                            {"exp_avgs", RoleKind::state, true, false}};
};

}  // namespace fastopt

FASTOPT_ISA_BEGIN

template <> struct Formula<Lion> {
  template <class S> struct Coeffs {
    S lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay_factor, l1_threshold;
    bool maximize, has_weight_decay, has_l1;
  };
  template <class S> static Coeffs<S> coeffs(const Lion::Hyper& h, int64_t /*step*/) {
    return {S(h.lr), S(h.beta1), S(1.0 - h.beta1), S(h.beta2), S(1.0 - h.beta2),
            S(1.0 - h.lr * h.weight_decay), S(h.lr * h.l1), h.maximize, h.weight_decay != 0.0,
            h.l1 != 0.0};
  }
  template <class T, class S>
  static FASTOPT_HD void update(T (&x)[Lion::num_roles], const Coeffs<S>& c) {
    T& p = x[Lion::params];
    T& m = x[Lion::exp_avgs];
    T g = x[Lion::grads];
    if (c.maximize) g = -g;
    const T direction = T(c.beta1) * m + T(c.one_minus_beta1) * g;
    if (c.has_weight_decay) p = p * T(c.decay_factor);
    p = p - T(c.lr) * vsign(direction);
    m = T(c.beta2) * m + T(c.one_minus_beta2) * g;
    if (c.has_l1) p = soft_threshold(p, T(c.l1_threshold));
  }
};

FASTOPT_ISA_END
