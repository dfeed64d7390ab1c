// RMSprop (centered, momentum), as torch.optim.RMSprop. fp32 bytes per element: 20, +8 per
// momentum or centered buffer.
//   g <- -g if maximize; g <- g + wd*p; v <- a*v + (1-a)*g^2;
//   centered: gavg <- a*gavg + (1-a)*g, avg = sqrt(v - gavg^2) + eps, else avg = sqrt(v) + eps;
//   momentum: buf <- mu*buf + g/avg, p <- p - lr*buf; else p <- p - lr*(g/avg).
#pragma once
#include "common/optim/descriptor.h"

namespace fastopt {

struct Rmsprop : Descriptor {
  static constexpr const char* name = "rmsprop";
  static constexpr bool takes_step = false;
#define FASTOPT_FIELDS(X) \
  X(double, lr) X(double, alpha) X(double, eps) X(double, weight_decay) X(double, momentum) \
  X(double, l1) X(bool, centered) X(bool, maximize)
  FASTOPT_DEFINE_HYPER(FASTOPT_FIELDS)
#undef FASTOPT_FIELDS
  enum : int { params, grads, square_avgs, momentum_buffers, grad_avgs, num_roles };
  static constexpr Role roles[num_roles] = {{"params", RoleKind::param, true, false},
                                            {"grads", RoleKind::grad, false, false},
                                            {"square_avgs", RoleKind::state, true, false, true},
                                            {"momentum_buffers", RoleKind::state, true, true},
                                            {"grad_avgs", RoleKind::state, true, true}};
  static bool uses(const Hyper& h, int r) {
    return r == momentum_buffers ? h.momentum != 0.0 : h.centered;
  }
};

}  // namespace fastopt

FASTOPT_ISA_BEGIN

template <> struct Formula<Rmsprop> {
  template <class S> struct Coeffs {
    S lr, alpha, one_minus_alpha, eps, weight_decay, momentum, l1_threshold;
    bool centered, has_momentum, maximize, has_weight_decay, has_l1;
  };
  template <class S> static Coeffs<S> coeffs(const Rmsprop::Hyper& h, int64_t /*step*/) {
    return {S(h.lr), S(h.alpha), S(1.0 - h.alpha), S(h.eps), S(h.weight_decay), S(h.momentum),
            S(h.lr * h.l1), h.centered, h.momentum != 0.0, h.maximize, h.weight_decay != 0.0,
            h.l1 != 0.0};
  }
  template <class T, class S>
  static FASTOPT_HD void update(T (&x)[Rmsprop::num_roles], const Coeffs<S>& c) {
    T& p = x[Rmsprop::params];
    T& square_avg = x[Rmsprop::square_avgs];
    T& buf = x[Rmsprop::momentum_buffers];
    T& grad_avg = x[Rmsprop::grad_avgs];
    T g = x[Rmsprop::grads];
    if (c.maximize) g = -g;
    if (c.has_weight_decay) g = g + T(c.weight_decay) * p;
    square_avg = T(c.alpha) * square_avg + (T(c.one_minus_alpha) * g) * g;  // as addcmul_
    T avg;
    if (c.centered) {
      grad_avg = T(c.alpha) * grad_avg + T(c.one_minus_alpha) * g;
      avg = vsqrt(square_avg - grad_avg * grad_avg) + T(c.eps);
    } else {
      avg = vsqrt(square_avg) + T(c.eps);
    }
    if (c.has_momentum) {
      buf = T(c.momentum) * buf + g / avg;
      p = p - T(c.lr) * buf;
    } else {
      p = p - T(c.lr) * (g / avg);
    }
    if (c.has_l1) p = soft_threshold(p, T(c.l1_threshold));
  }
};

FASTOPT_ISA_END
