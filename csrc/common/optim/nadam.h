// NAdam (Dozat 2016, "Incorporating Nesterov Momentum into Adam"), as torch.optim.NAdam.
// fp32 bytes per element: 28 (p, m, v read+write, g read).
//   g <- -g if maximize; decoupled: p <- p*(1 - lr*wd), else g <- g + wd*p;
//   mu_t = b1*(1 - 0.5*0.96^(t*momentum_decay)) (host, once per step; mu_{t+1} likewise);
//   m <- b1*m + (1-b1)*g; v <- b2*v + (1-b2)*g^2; denom = sqrt(v/(1-b2^t)) + eps;
//   p <- p + (-lr*(1-mu_t)/(1-P_t))*g/denom;  p <- p + (-lr*mu_{t+1}/(1-P_t*mu_{t+1}))*m/denom;
//   then the L1 step (lr*l1).
// P_t = mu_1*...*mu_t is the hyper-parameter mu_product: the product through this step,
// which torch.optim.NAdam keeps per param as state["mu_product"] (float32, multiplied by
// mu_t at each step); the callers carry it (python/fastopt/reference.py: nadam_mu_product).
// The two updates of p are torch's two addcdiv_ calls, in torch's order: (c*x)/denom.
#pragma once
#include <cmath>
#include "common/optim/descriptor.h"

namespace fastopt {

struct Nadam : Descriptor {
  static constexpr const char* name = "nadam";
  static constexpr bool takes_step = true;
#define FASTOPT_FIELDS(X) \
  X(double, lr) X(double, beta1) X(double, beta2) X(double, eps) X(double, weight_decay) \
  X(double, momentum_decay) X(double, mu_product) X(double, l1) X(bool, decoupled_weight_decay) \
  X(bool, maximize)
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

template <> struct Formula<Nadam> {
  template <class S> struct Coeffs {
    S beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor,
        bias_correction2, grad_step, avg_step, l1_threshold;
    bool maximize, coupled_weight_decay, decoupled_weight_decay, has_l1;
  };
  template <class S> static Coeffs<S> coeffs(const Nadam::Hyper& h, int64_t step) {
    const double t = double(step);
    const double mu = h.beta1 * (1.0 - 0.5 * std::pow(0.96, t * h.momentum_decay));
    const double mu_next = h.beta1 * (1.0 - 0.5 * std::pow(0.96, (t + 1.0) * h.momentum_decay));
    const double grad_step = -h.lr * (1.0 - mu) / (1.0 - h.mu_product);
    const double avg_step = (-h.lr * mu_next) / (1.0 - h.mu_product * mu_next);
    const bool has_wd = h.weight_decay != 0.0;
    return {S(h.beta1), S(1.0 - h.beta1), S(h.beta2), S(1.0 - h.beta2), S(h.eps),
            S(h.weight_decay), S(1.0 - h.lr * h.weight_decay),
            S(1.0 - std::pow(h.beta2, t)), S(grad_step), S(avg_step), S(h.lr * h.l1),
            h.maximize, has_wd && !h.decoupled_weight_decay,
            has_wd && h.decoupled_weight_decay, h.l1 != 0.0};
  }
  template <class T, class S>
  static FASTOPT_HD void update(T (&x)[Nadam::num_roles], const Coeffs<S>& c) {
    T& p = x[Nadam::params];
    T& m = x[Nadam::exp_avgs];
    T& v = x[Nadam::exp_avg_sqs];
    T g = x[Nadam::grads];
    if (c.maximize) g = -g;
    if (c.decoupled_weight_decay) p = p * T(c.decay_factor);
    if (c.coupled_weight_decay) g = g + T(c.weight_decay) * p;
    m = T(c.beta1) * m + T(c.one_minus_beta1) * g;
    v = T(c.beta2) * v + (T(c.one_minus_beta2) * g) * g;  // torch's addcmul_ order
    const T denom = vsqrt(v / T(c.bias_correction2)) + T(c.eps);
    p = p + (T(c.grad_step) * g) / denom;
    p = p + (T(c.avg_step) * m) / denom;
    if (c.has_l1) p = soft_threshold(p, T(c.l1_threshold));
  }
};

FASTOPT_ISA_END
