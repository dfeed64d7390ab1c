// Adam / AdamW (amsgrad), as torch.optim.Adam / AdamW. fp32 bytes per element: 28 (p, m, v
// read+write, g read), +8 with amsgrad.
//   AdamW: p <- p*(1 - lr*wd); Adam: g <- g + wd*p. m <- b1*m + (1-b1)*g;
//   v <- b2*v + (1-b2)*g^2; amsgrad: vmax <- max(vmax, v), used in place of v;
//   p <- p - (lr/(1-b1^t)) * (m / (sqrt(v)/sqrt(1-b2^t) + eps)); then the L1 step (lr*l1).
#pragma once
#include <cmath>
#include "common/optim/descriptor.h"

namespace fastopt {

struct Adam : Descriptor {
  static constexpr const char* name = "adam";
  static constexpr bool takes_step = true;
#define FASTOPT_FIELDS(X) \
  X(double, lr) X(double, beta1) X(double, beta2) X(double, eps) X(double, weight_decay) \
  X(double, l1) X(bool, decoupled_weight_decay) X(bool, amsgrad) X(bool, maximize)
  FASTOPT_DEFINE_HYPER(FASTOPT_FIELDS)
#undef FASTOPT_FIELDS
  enum : int { params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, num_roles };
  static constexpr Role roles[num_roles] = {{"params", RoleKind::param, true, false},
                                            {"grads", RoleKind::grad, false, false},
                                            {"exp_avgs", RoleKind::state, true, false},
                                            {"exp_avg_sqs", RoleKind::state, true, false, true},
                                            {"max_exp_avg_sqs", RoleKind::state, true, true, true}};
  static bool uses(const Hyper& h, int) { return h.amsgrad; }
};

}  // namespace fastopt

FASTOPT_ISA_BEGIN

template <> struct Formula<Adam> {
  template <class S> struct Coeffs {
    S beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor,
        step_size, bias_correction2_sqrt, l1_threshold;
    bool amsgrad, maximize, coupled_weight_decay, decoupled_weight_decay, has_l1;
  };
  template <class S> static Coeffs<S> coeffs(const Adam::Hyper& h, int64_t step) {
    const double t = double(step);
    const double bias_correction1 = 1.0 - std::pow(h.beta1, t);
    const double bias_correction2 = 1.0 - std::pow(h.beta2, t);
    const bool has_wd = h.weight_decay != 0.0;
    return {S(h.beta1), S(1.0 - h.beta1), S(h.beta2), S(1.0 - h.beta2), S(h.eps),
            S(h.weight_decay), S(1.0 - h.lr * h.weight_decay), S(h.lr / bias_correction1),
            S(std::sqrt(bias_correction2)), S(h.lr * h.l1), h.amsgrad, h.maximize,
            has_wd && !h.decoupled_weight_decay, has_wd && h.decoupled_weight_decay,
            h.l1 != 0.0};
  }
  template <class T, class S>
  static FASTOPT_HD void update(T (&x)[Adam::num_roles], const Coeffs<S>& c) {
    T& p = x[Adam::params];
    T& m = x[Adam::exp_avgs];
    T& v = x[Adam::exp_avg_sqs];
    T& vmax = x[Adam::max_exp_avg_sqs];
    T g = x[Adam::grads];
    if (c.maximize) g = -g;
    if (c.decoupled_weight_decay) p = p * T(c.decay_factor);
    if (c.coupled_weight_decay) g = g + T(c.weight_decay) * p;
    m = T(c.beta1) * m + T(c.one_minus_beta1) * g;
    v = T(c.beta2) * v + (T(c.one_minus_beta2) * g) * g;  // torch's addcmul_ order
    T second = v;
    if (c.amsgrad) {
      vmax = vmax_nan(vmax, v);
      second = vmax;
    }
    const T denom = vsqrt(second) / T(c.bias_correction2_sqrt) + T(c.eps);
    p = p - T(c.step_size) * (m / denom);
    if (c.has_l1) p = soft_threshold(p, T(c.l1_threshold));
  }
};

FASTOPT_ISA_END
