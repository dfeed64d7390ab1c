// RAdam (Liu et al. 2020, "On the Variance of the Adaptive Learning Rate and Beyond"), as
// torch.optim.RAdam. fp32 bytes per element: 28 (p, m, v read+write, g read).
//   g <- -g if maximize; decoupled: p <- p*(1 - lr*wd), else g <- g + wd*p;
//   m <- b1*m + (1-b1)*g; v <- b2*v + (1-b2)*g^2;
//   rho_inf = 2/(1-b2) - 1, rho_t = rho_inf - 2t*b2^t/(1-b2^t) (host, once per step);
//   rho_t > 5: p <- p - (lr*r_t*sqrt(1-b2^t)/(1-b1^t)) * m/(sqrt(v) + eps), with
//              r_t = sqrt((rho_t-4)(rho_t-2)rho_inf / ((rho_inf-4)(rho_inf-2)rho_t));
//   else:      p <- p - (lr/(1-b1^t)) * m (the variance not yet tractable: momentum SGD);
//   then the L1 step (lr*l1).
#pragma once
#include <cmath>
#include "common/optim/descriptor.h"

namespace fastopt {

struct Radam : Descriptor {
  static constexpr const char* name = "radam";
  static constexpr bool takes_step = true;
#define FASTOPT_FIELDS(X) \
  X(double, lr) X(double, beta1) X(double, beta2) X(double, eps) X(double, weight_decay) \
  X(double, l1) X(bool, decoupled_weight_decay) X(bool, maximize)
  FASTOPT_DEFINE_HYPER(FASTOPT_FIELDS)
#undef FASTOPT_FIELDS
  enum : int { params, grads, exp_avgs, exp_avg_sqs, num_roles };
  static constexpr Role roles[num_roles] = {{"params", RoleKind::param, true, false},
                                            {"grads", RoleKind::grad, false, false},
                                            {"exp_avgs", RoleKind::state, true, false},
                                            {"exp_avg_sqs", RoleKind::state, true, false, true}};
};

}  // namespace fastopt

FASTOPT_ISA_BEGIN

template <> struct Formula<Radam> {
  template <class S> struct Coeffs {
    S beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor,
        step_size, l1_threshold;
    bool rectified, maximize, coupled_weight_decay, decoupled_weight_decay, has_l1;
  };
  template <class S> static Coeffs<S> coeffs(const Radam::Hyper& h, int64_t step) {
    const double t = double(step);
    const double bias_correction1 = 1.0 - std::pow(h.beta1, t);
    const double bias_correction2 = 1.0 - std::pow(h.beta2, t);
    const double rho_inf = 2.0 / (1.0 - h.beta2) - 1.0;
    const double rho_t = rho_inf - 2.0 * t * std::pow(h.beta2, t) / bias_correction2;
    const bool rectified = rho_t > 5.0;
    double step_size = h.lr / bias_correction1;
    if (rectified) {
      const double rect = std::sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf /
                                    ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t));
      step_size *= rect * std::sqrt(bias_correction2);
    }
    const bool has_wd = h.weight_decay != 0.0;
    return {S(h.beta1), S(1.0 - h.beta1), S(h.beta2), S(1.0 - h.beta2), S(h.eps),
            S(h.weight_decay), S(1.0 - h.lr * h.weight_decay), S(step_size), S(h.lr * h.l1),
            rectified, h.maximize, has_wd && !h.decoupled_weight_decay,
            has_wd && h.decoupled_weight_decay, h.l1 != 0.0};
  }
  template <class T, class S>
  static FASTOPT_HD void update(T (&x)[Radam::num_roles], const Coeffs<S>& c) {
    T& p = x[Radam::params];
    T& m = x[Radam::exp_avgs];
    T& v = x[Radam::exp_avg_sqs];
    T g = x[Radam::grads];
    if (c.maximize) g = -g;
    if (c.decoupled_weight_decay) p = p * T(c.decay_factor);
    if (c.coupled_weight_decay) g = g + T(c.weight_decay) * p;
    m = T(c.beta1) * m + T(c.one_minus_beta1) * g;
    v = T(c.beta2) * v + (T(c.one_minus_beta2) * g) * g;  // torch's addcmul_ order
    if (c.rectified) {
      p = p - T(c.step_size) * (m / (vsqrt(v) + T(c.eps)));
    } else {
      p = p - T(c.step_size) * m;
    }
    if (c.has_l1) p = soft_threshold(p, T(c.l1_threshold));
  }
};

FASTOPT_ISA_END
