// Adamax (Kingma & Ba 2015, section 7.1: Adam under the infinity norm), as
// torch.optim.Adamax. fp32 bytes per element: 28 (p, m, u read+write, g read).
//   g <- -g if maximize; g <- g + wd*p; m <- b1*m + (1-b1)*g; u <- max(b2*u, |g| + eps)
//   (NaN from either side kept, as torch.maximum); p <- p - (lr/(1-b1^t)) * m/u; then the
//   L1 step (lr*l1).
#pragma once
#include <cmath>
#include "common/optim/descriptor.h"

namespace fastopt {

struct Adamax : Descriptor {
  static constexpr const char* name = "adamax";
  static constexpr bool takes_step = true;
#define FASTOPT_FIELDS(X) \
  X(double, lr) X(double, beta1) X(double, beta2) X(double, eps) X(double, weight_decay) \
  X(double, l1) X(bool, maximize)
  FASTOPT_DEFINE_HYPER(FASTOPT_FIELDS)
#undef FASTOPT_FIELDS
  enum : int { params, grads, exp_avgs, exp_infs, num_roles };
  static constexpr Role roles[num_roles] = {{"params", RoleKind::param, true, false},
                                            {"grads", RoleKind::grad, false, false},
                                            {"exp_avgs", RoleKind::state, true, false},
                                            {"exp_infs", RoleKind::state, true, false, true}};
};

}  // namespace fastopt

FASTOPT_ISA_BEGIN

template <> struct Formula<Adamax> {
  template <class S> struct Coeffs {
    S beta1, one_minus_beta1, beta2, eps, weight_decay, step_size, l1_threshold;
    bool maximize, has_weight_decay, has_l1;
  };
  template <class S> static Coeffs<S> coeffs(const Adamax::Hyper& h, int64_t step) {
    const double bias_correction1 = 1.0 - std::pow(h.beta1, double(step));
    return {S(h.beta1), S(1.0 - h.beta1), S(h.beta2), S(h.eps), S(h.weight_decay),
            S(h.lr / bias_correction1), S(h.lr * h.l1), h.maximize, h.weight_decay != 0.0,
            h.l1 != 0.0};
  }
  template <class T, class S>
  static FASTOPT_HD void update(T (&x)[Adamax::num_roles], const Coeffs<S>& c) {
    T& p = x[Adamax::params];
    T& m = x[Adamax::exp_avgs];
    T& u = x[Adamax::exp_infs];
    T g = x[Adamax::grads];
    if (c.maximize) g = -g;
    if (c.has_weight_decay) g = g + T(c.weight_decay) * p;
    m = T(c.beta1) * m + T(c.one_minus_beta1) * g;
    u = vmax_nan(T(c.beta2) * u, vabs(g) + T(c.eps));
    p = p - T(c.step_size) * (m / u);
    if (c.has_l1) p = soft_threshold(p, T(c.l1_threshold));
  }
};

FASTOPT_ISA_END
