// Rprop (Riedmiller and Braun 1993), as torch.optim.Rprop: each element keeps its own step
// size, grown where the grad kept its sign and shrunk where it flipped. fp32 bytes per
// element: 28 (p, prev, step size read+write, g read).
//   g <- -g if maximize; s = g * prev;
//   s > 0: size <- min(max(size*etaplus, size_min), size_max);
//   s < 0: size <- min(max(size*etaminus, size_min), size_max), g <- 0 (no step, and no
//          sign change remembered, for the next step);
//   s = 0 or NaN: size unchanged (clamped);
//   p <- p - sign(g)*size; prev <- g.
// sign is torch's: 0 for a NaN (numpy's sign gives NaN). So a NaN grad, or an inf one
// against a prev of 0, leaves its param and step size as they were, as in torch.
// Step sizes start at lr (the state's initial value; the step itself never reads lr).
#pragma once
#include "common/optim/descriptor.h"

namespace fastopt {

struct Rprop : Descriptor {
  static constexpr const char* name = "rprop";
  static constexpr bool takes_step = false;
#define FASTOPT_FIELDS(X) \
  X(double, lr) X(double, etaminus) X(double, etaplus) X(double, step_size_min) \
  X(double, step_size_max) X(bool, maximize)
  FASTOPT_DEFINE_HYPER(FASTOPT_FIELDS)
#undef FASTOPT_FIELDS
  enum : int { params, grads, prevs, step_sizes, num_roles };
  static constexpr Role roles[num_roles] = {{"params", RoleKind::param, true, false},
                                            {"grads", RoleKind::grad, false, false},
                                            {"prevs", RoleKind::state, true, false},
                                            {"step_sizes", RoleKind::state, true, false, true}};
};

}  // namespace fastopt

FASTOPT_ISA_BEGIN

template <> struct Formula<Rprop> {
  template <class S> struct Coeffs {
    S etaminus, etaplus, step_size_min, step_size_max;
    bool maximize;
  };
  template <class S> static Coeffs<S> coeffs(const Rprop::Hyper& h, int64_t /*step*/) {
    return {S(h.etaminus), S(h.etaplus), S(h.step_size_min), S(h.step_size_max), h.maximize};
  }
  template <class T, class S>
  static FASTOPT_HD void update(T (&x)[Rprop::num_roles], const Coeffs<S>& c) {
    T& p = x[Rprop::params];
    T& prev = x[Rprop::prevs];
    T& size = x[Rprop::step_sizes];
    T g = x[Rprop::grads];
    if (c.maximize) g = -g;
    const T s = g * prev;  // the product, as torch: one that underflows to 0 counts as 0
    const T factor = by_sign(s, T(c.etaplus), T(c.etaminus), T(1));
    size = vmin_nan(vmax_nan(size * factor, T(c.step_size_min)), T(c.step_size_max));
    g = by_sign(s, g, T(0), g);
    p = p - by_sign(g, T(1), T(-1), T(0)) * size;  // torch.sign: 0 for 0 and NaN
    prev = g;
  }
};

FASTOPT_ISA_END
