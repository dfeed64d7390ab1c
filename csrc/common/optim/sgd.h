// SGD with momentum, dampening and Nesterov, as torch.optim.SGD. fp32 bytes per element:
// 12 without momentum (p read+write, g read), 20 with (the buffer read+write; at step 1
// it is only written).
//   g <- -g if maximize; g <- g + wd*p; buf <- g at the first step else mu*buf + (1-d)*g;
//   g <- g + mu*buf (Nesterov) or buf; p <- p - lr*g; p <- soft_threshold(p, lr*l1).
#pragma once
#include "common/optim/descriptor.h"

namespace fastopt {

struct Sgd : Descriptor {
  static constexpr const char* name = "sgd";
  static constexpr bool takes_step = true;
#define FASTOPT_FIELDS(X) \
  X(double, lr) X(double, momentum) X(double, dampening) X(double, weight_decay) \
  X(double, l1) X(bool, nesterov) X(bool, maximize)
  FASTOPT_DEFINE_HYPER(FASTOPT_FIELDS)
#undef FASTOPT_FIELDS
  enum : int { params, grads, momentum_buffers, num_roles };
  static constexpr Role roles[num_roles] = {{"params", RoleKind::param, true, false},
                                            {"grads", RoleKind::grad, false, false},
                                            {"momentum_buffers", RoleKind::state, true, true}};
  static bool uses(const Hyper& h, int) { return h.momentum != 0.0; }
  static bool fresh(const Hyper&, int, int64_t step) { return step == 1; }
};

}  // namespace fastopt

FASTOPT_ISA_BEGIN

template <> struct Formula<Sgd> {
  template <class S> struct Coeffs {
    S lr, momentum, one_minus_dampening, weight_decay, l1_threshold;
    bool has_momentum, first_step, nesterov, maximize, has_weight_decay, has_l1;
  };
  template <class S> static Coeffs<S> coeffs(const Sgd::Hyper& h, int64_t step) {
    return {S(h.lr), S(h.momentum), S(1.0 - h.dampening), S(h.weight_decay), S(h.lr * h.l1),
            h.momentum != 0.0, step == 1, h.nesterov, h.maximize, h.weight_decay != 0.0,
            h.l1 != 0.0};
  }
  template <class T, class S>
  static FASTOPT_HD void update(T (&x)[Sgd::num_roles], const Coeffs<S>& c) {
    T& p = x[Sgd::params];
    T& buf = x[Sgd::momentum_buffers];
    T g = x[Sgd::grads];
    if (c.maximize) g = -g;
    if (c.has_weight_decay) g = g + T(c.weight_decay) * p;
    if (c.has_momentum) {
      buf = c.first_step ? g : T(c.momentum) * buf + T(c.one_minus_dampening) * g;
      g = c.nesterov ? g + T(c.momentum) * buf : buf;
    }
    p = p - T(c.lr) * g;
    if (c.has_l1) p = soft_threshold(p, T(c.l1_threshold));
  }
};

FASTOPT_ISA_END
