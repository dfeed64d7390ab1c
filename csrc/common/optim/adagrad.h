// Adagrad, as torch.optim.Adagrad. fp32 bytes per element: 20 (p and sum read+write, g read).
//   clr = lr / (1 + (t-1)*lr_decay); g <- -g if maximize; g <- g + wd*p; sum <- sum + g^2;
//   p <- p - clr * (g / (sqrt(sum) + eps)); the L1 threshold is clr*l1 (the step taken).
#pragma once
#include "common/optim/descriptor.h"

namespace fastopt {

struct Adagrad : Descriptor {
  static constexpr const char* name = "adagrad";
  static constexpr bool takes_step = true;
#define FASTOPT_FIELDS(X) \
  X(double, lr) X(double, lr_decay) X(double, weight_decay) X(double, eps) X(double, l1) \
  X(bool, maximize)
  FASTOPT_DEFINE_HYPER(FASTOPT_FIELDS)
#undef FASTOPT_FIELDS
  enum : int { params, grads, state_sums, num_roles };
  static constexpr Role roles[num_roles] = {{"params", RoleKind::param, true, false},
                                            {"grads", RoleKind::grad, false, false},
                                            {"state_sums", RoleKind::state, true, false, true}};
};

}  // namespace fastopt

FASTOPT_ISA_BEGIN

template <> struct Formula<Adagrad> {
  template <class S> struct Coeffs {
    S clr, eps, weight_decay, l1_threshold;
    bool maximize, has_weight_decay, has_l1;
  };
  template <class S> static Coeffs<S> coeffs(const Adagrad::Hyper& h, int64_t step) {
    const double clr = h.lr / (1.0 + double(step - 1) * h.lr_decay);
    return {S(clr), S(h.eps), S(h.weight_decay), S(clr * h.l1), h.maximize,
            h.weight_decay != 0.0, h.l1 != 0.0};
  }
  template <class T, class S>
  static FASTOPT_HD void update(T (&x)[Adagrad::num_roles], const Coeffs<S>& c) {
    T& p = x[Adagrad::params];
    T& sum = x[Adagrad::state_sums];
    T g = x[Adagrad::grads];
    if (c.maximize) g = -g;
    if (c.has_weight_decay) g = g + T(c.weight_decay) * p;
    sum = sum + g * g;
    p = p - T(c.clr) * (g / (vsqrt(sum) + T(c.eps)));
    if (c.has_l1) p = soft_threshold(p, T(c.l1_threshold));
  }
};

FASTOPT_ISA_END
