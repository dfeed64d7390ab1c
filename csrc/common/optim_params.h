// Hyper-parameters of the first-order optimizers, shared by the CPU and CUDA builds.
// A *Hyper struct is what the user passed (validated in Python, in double); the matching
// *Coeffs<S> struct is what one step's formula consumes, precomputed once per call in the
// element type S (bias corrections, decayed learning rates, ...).
#pragma once
#include <cstdint>

namespace fastopt {

// Roles: the index of each array list of a call in the multi-tensor tables (CPU
// TensorTable::ptrs, CUDA LaunchTable::ptrs); unused optional roles are null.
enum SgdRole { kSgdParam, kSgdGrad, kSgdMomentum };
enum AdagradRole { kAdagradParam, kAdagradGrad, kAdagradSum };
enum RmspropRole { kRmsParam, kRmsGrad, kRmsSquareAvg, kRmsMomentum, kRmsGradAvg };
enum AdamRole { kAdamParam, kAdamGrad, kAdamExpAvg, kAdamExpAvgSq, kAdamMaxExpAvgSq };
enum SophiaRole { kSophiaParam, kSophiaGrad, kSophiaExpAvg, kSophiaHessian };
enum EmaRole { kEmaAverage, kEmaSample };
enum AddRole { kAddDst, kAddSrc };
constexpr int kMaxRoles = 5;

struct SgdHyper {
  double lr, momentum, dampening, weight_decay, l1;
  bool nesterov, maximize;
};
template <class S> struct SgdCoeffs {
  S lr, momentum, one_minus_dampening, weight_decay, l1_threshold;
  bool has_momentum, first_step, nesterov, maximize, has_weight_decay, has_l1;
};

struct AdagradHyper {
  double lr, lr_decay, weight_decay, eps, l1;
  bool maximize;
};
template <class S> struct AdagradCoeffs {
  S clr, eps, weight_decay, l1_threshold;
  bool maximize, has_weight_decay, has_l1;
};

struct RmspropHyper {
  double lr, alpha, eps, weight_decay, momentum, l1;
  bool centered, maximize;
};
template <class S> struct RmspropCoeffs {
  S lr, alpha, one_minus_alpha, eps, weight_decay, momentum, l1_threshold;
  bool centered, has_momentum, maximize, has_weight_decay, has_l1;
};

struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay, l1;
  bool decoupled_weight_decay, amsgrad, maximize;
};
template <class S> struct AdamCoeffs {
  S beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor,
      step_size, bias_correction2_sqrt, l1_threshold;
  bool amsgrad, maximize, coupled_weight_decay, decoupled_weight_decay, has_l1;
};

struct SophiaHyper {
  double lr, beta1, rho, weight_decay, eps, l1;
  bool maximize;
};
template <class S> struct SophiaCoeffs {
  S lr, beta1, one_minus_beta1, rho, eps, decay_factor, l1_threshold;
  bool maximize, has_weight_decay, has_l1;
};

// Exponential moving average x <- beta*x + (1-beta)*y (Sophia's Hessian-diagonal EMA).
template <class S> struct EmaCoeffs {
  S beta, one_minus_beta;
};

}  // namespace fastopt
