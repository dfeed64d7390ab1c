// ASGD (averaged SGD: Polyak and Juditsky 1992; the decaying step of Bottou 2012), as
// torch.optim.ASGD. fp32 bytes per element: 20 (p, ax read+write, g read).
//   g <- -g if maximize; g <- g + wd*p; p <- p*(1 - lambd*eta); p <- p - eta*g;
//   mu != 1: ax <- ax + (p - ax)*mu, else ax <- p (the running average starts after t0).
// eta and mu are hyper-parameters that are state: torch.optim.ASGD keeps them per param
// (state["eta"], state["mu"]) and sets them after each step t from lr, lambd, alpha, t0:
// eta = lr/(1 + lambd*lr*t)^alpha, mu = 1/max(1, t - t0); a step takes the values the step
// before left (lr and 1 at the first). The callers carry them (python/fastopt/_specs.py:
// Carried); lr, alpha and t0 serve only there.
#pragma once
#include "common/optim/descriptor.h"

namespace fastopt {

struct Asgd : Descriptor {
  static constexpr const char* name = "asgd";
  static constexpr bool takes_step = true;  // (read by the callers, for eta and mu)
#define FASTOPT_FIELDS(X) \
  X(double, lr) X(double, lambd) X(double, alpha) X(double, t0) X(double, weight_decay) \
  X(double, eta) X(double, mu) X(bool, maximize)
  FASTOPT_DEFINE_HYPER(FASTOPT_FIELDS)
#undef FASTOPT_FIELDS
  enum : int { params, grads, axs, num_roles };
  static constexpr Role roles[num_roles] = {{"params", RoleKind::param, true, false},
                                            {"grads", RoleKind::grad, false, false},
                                            {"axs", RoleKind::state, true, false}};
};

}  // namespace fastopt

FASTOPT_ISA_BEGIN

template <> struct Formula<Asgd> {
  template <class S> struct Coeffs {
    S weight_decay, decay_factor, eta, mu;
    bool maximize, has_wd, average;
  };
  template <class S> static Coeffs<S> coeffs(const Asgd::Hyper& h, int64_t) {
    return {S(h.weight_decay), S(1.0 - h.lambd * h.eta), S(h.eta), S(h.mu),
            h.maximize,        h.weight_decay != 0.0,     h.mu != 1.0};
  }
  template <class T, class S>
  static FASTOPT_HD void update(T (&x)[Asgd::num_roles], const Coeffs<S>& c) {
    T& p = x[Asgd::params];
    T& ax = x[Asgd::axs];
    T g = x[Asgd::grads];
    if (c.maximize) g = -g;
    if (c.has_wd) g = g + T(c.weight_decay) * p;
    p = p * T(c.decay_factor);
    p = p - T(c.eta) * g;
    ax = c.average ? ax + (p - ax) * T(c.mu) : p;
  }
};

FASTOPT_ISA_END
