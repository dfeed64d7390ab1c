// The update formulas of the first-order optimizers: the one source of truth, used by the
// scalar CPU loop, the AVX2 body (T = an 8-float / 4-double vector type with the same
// operators and math helpers) and its tail, and the CUDA kernels. torch.optim semantics;
// the float64 NumPy twin of every function is in python/fastopt/reference.py.
//
// T is the value type (float, double, or a SIMD vector of them); S the scalar type of the
// coefficients. Flags in the coefficient structs are uniform over a call, so the branches
// below are perfectly predicted and the compiler hoists them out of vector loops.
#pragma once
#include <cmath>
#include <cstdint>
#include "common/math.h"
#include "common/optim_params.h"

FASTOPT_ISA_BEGIN

// ---- SGD (momentum, dampening, Nesterov) ------------------------------------------------
// g <- -g if maximize; g <- g + wd*p; buf <- g at the first step else mu*buf + (1-d)*g;
// g <- g + mu*buf (Nesterov) or buf; p <- p - lr*g; p <- soft_threshold(p, lr*l1).
template <class S>
inline SgdCoeffs<S> sgd_coeffs(const SgdHyper& h, int64_t step) {
  return {S(h.lr), S(h.momentum), S(1.0 - h.dampening), S(h.weight_decay), S(h.lr * h.l1),
          h.momentum != 0.0, step == 1, h.nesterov, h.maximize, h.weight_decay != 0.0,
          h.l1 != 0.0};
}

template <class T, class S>
FASTOPT_HD void sgd_update(T& p, T g, T& buf, const SgdCoeffs<S>& c) {
  if (c.maximize) g = -g;
  if (c.has_weight_decay) g = g + T(c.weight_decay) * p;
  if (c.has_momentum) {
    buf = c.first_step ? g : T(c.momentum) * buf + T(c.one_minus_dampening) * g;
    g = c.nesterov ? g + T(c.momentum) * buf : buf;
  }
  p = p - T(c.lr) * g;
  if (c.has_l1) p = soft_threshold(p, T(c.l1_threshold));
}

// ---- Adagrad ------------------------------------------------------------------------------
// clr = lr / (1 + (t-1)*lr_decay); sum <- sum + g^2; p <- p - clr * (g / (sqrt(sum) + eps));
// the L1 threshold is clr*l1 (the step size actually taken).
template <class S>
inline AdagradCoeffs<S> adagrad_coeffs(const AdagradHyper& h, int64_t step) {
  const double clr = h.lr / (1.0 + double(step - 1) * h.lr_decay);
  return {S(clr), S(h.eps), S(h.weight_decay), S(clr * h.l1), h.maximize,
          h.weight_decay != 0.0, h.l1 != 0.0};
}

template <class T, class S>
FASTOPT_HD void adagrad_update(T& p, T g, T& sum, const AdagradCoeffs<S>& c) {
  if (c.maximize) g = -g;
  if (c.has_weight_decay) g = g + T(c.weight_decay) * p;
  sum = sum + g * g;
  p = p - T(c.clr) * (g / (vsqrt(sum) + T(c.eps)));
  if (c.has_l1) p = soft_threshold(p, T(c.l1_threshold));
}

// ---- RMSprop (centered, momentum) ---------------------------------------------------------
// v <- a*v + (1-a)*g^2; centered: gavg <- a*gavg + (1-a)*g, avg = sqrt(v - gavg^2) + eps,
// else avg = sqrt(v) + eps; momentum: buf <- mu*buf + g/avg, p <- p - lr*buf;
// else p <- p - lr*(g/avg).
template <class S>
inline RmspropCoeffs<S> rmsprop_coeffs(const RmspropHyper& h) {
  return {S(h.lr), S(h.alpha), S(1.0 - h.alpha), S(h.eps), S(h.weight_decay), S(h.momentum),
          S(h.lr * h.l1), h.centered, h.momentum != 0.0, h.maximize, h.weight_decay != 0.0,
          h.l1 != 0.0};
}

template <class T, class S>
FASTOPT_HD void rmsprop_update(T& p, T g, T& square_avg, T& buf, T& grad_avg,
                               const RmspropCoeffs<S>& c) {
  if (c.maximize) g = -g;
  if (c.has_weight_decay) g = g + T(c.weight_decay) * p;
  square_avg = T(c.alpha) * square_avg + T(c.one_minus_alpha) * (g * g);
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

// ---- Adam / AdamW (amsgrad) -----------------------------------------------------------------
// AdamW: p <- p*(1 - lr*wd); Adam: g <- g + wd*p. m <- b1*m + (1-b1)*g; v <- b2*v + (1-b2)*g^2;
// amsgrad: vmax <- max(vmax, v), used in place of v;
// p <- p - (lr/(1-b1^t)) * (m / (sqrt(v)/sqrt(1-b2^t) + eps)).
template <class S>
inline AdamCoeffs<S> adam_coeffs(const AdamHyper& h, int64_t step) {
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
FASTOPT_HD void adam_update(T& p, T g, T& m, T& v, T& vmax, const AdamCoeffs<S>& c) {
  if (c.maximize) g = -g;
  if (c.decoupled_weight_decay) p = p * T(c.decay_factor);
  if (c.coupled_weight_decay) g = g + T(c.weight_decay) * p;
  m = T(c.beta1) * m + T(c.one_minus_beta1) * g;
  v = T(c.beta2) * v + T(c.one_minus_beta2) * (g * g);
  T second = v;
  if (c.amsgrad) {
    vmax = vmax_nan(vmax, v);
    second = vmax;
  }
  const T denom = vsqrt(second) / T(c.bias_correction2_sqrt) + T(c.eps);
  p = p - T(c.step_size) * (m / denom);
  if (c.has_l1) p = soft_threshold(p, T(c.l1_threshold));
}

// ---- Sophia (clipped diagonal Newton) ------------------------------------------------------
// g <- -g if maximize; m <- b1*m + (1-b1)*g; p <- p*(1 - lr*wd);
// p <- p - lr * sign(m) * min(|m| / max(rho*h, eps), 1). h is the caller's EMA of a
// Hessian-diagonal estimate (ema_update below), read only; then the L1 step (lr*l1).
template <class S>
inline SophiaCoeffs<S> sophia_coeffs(const SophiaHyper& h) {
  return {S(h.lr), S(h.beta1), S(1.0 - h.beta1), S(h.rho), S(h.eps),
          S(1.0 - h.lr * h.weight_decay), S(h.lr * h.l1), h.maximize, h.weight_decay != 0.0,
          h.l1 != 0.0};
}

template <class T, class S>
FASTOPT_HD void sophia_update(T& p, T g, T& m, T h, const SophiaCoeffs<S>& c) {
  if (c.maximize) g = -g;
  m = T(c.beta1) * m + T(c.one_minus_beta1) * g;
  if (c.has_weight_decay) p = p * T(c.decay_factor);
  const T ratio = vmin_nan(vabs(m) / vmax_nan(T(c.rho) * h, T(c.eps)), T(1));
  p = p - T(c.lr) * (vsign(m) * ratio);
  if (c.has_l1) p = soft_threshold(p, T(c.l1_threshold));
}

template <class T, class S>
FASTOPT_HD void ema_update(T& x, T y, const EmaCoeffs<S>& c) {
  x = T(c.beta) * x + T(c.one_minus_beta) * y;
}

FASTOPT_ISA_END
