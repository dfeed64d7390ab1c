// Adafactor (Shazeer & Stern 2018), as torch.optim.Adafactor: the second moment of a
// param of two or more dimensions is kept factored over its last two, as one row factor
// R (..., rows) and one column factor C (..., cols) per matrix; a vector (or 0-d) param
// keeps a full second moment V. Per param, at step t (counted from 1):
//   g <- -g if maximize;  w = t^beta2_decay;  rho = min(lr, 1/sqrt(t))
//   alpha = max(eps2, ||p|| / sqrt(numel)) * rho            (p before the weight decay)
//   matrix: R <- lerp(R, mean over cols of g^2, w);  C <- lerp(C, mean over rows of g^2, w)
//           v_ij = R_i * C_j / max(mean(R), eps1)
//   vector: V <- lerp(V, g^2, w);  v = V
//   u = g / sqrt(max(v, eps1^2));  denom = max(1, ||u|| / (sqrt(numel) * d))
//   p <- p * (1 - lr*wd) - (alpha / denom) * u
// eps1 defaults to the machine epsilon of the params' dtype (torch's None). The kernels
// take a matrix's 1/sqrt(max(v_ij, eps1^2)) as (1/sqrt(R_i/mean(R))) (1/sqrt(C_j)), or
// 1/eps1 where (R_i/mean(R)) C_j < eps1^2: no division or root per element, the same
// within float rounding. The two norms make it three passes over a matrix (p and g read;
// g read; p and g read, p written: 24 B per float32 element) and two over a vector (32 B,
// V read and written once each). Shared by the CPU and CUDA kernels.
#pragma once
#include <cmath>
#include <cstdint>
#include "common/math.h"
#include "common/platform.h"

namespace fastopt {

// What every param of one call shares (a param group's hyper-parameters). `stochastic`:
// bfloat16 params are written rounded stochastically (common/rounding.h), param i of the
// call, at its step t, with the bits of rounding_key(seed, t, i).
struct AdafactorHyper {
  double lr, beta2_decay, eps1, eps2, d, weight_decay;
  bool maximize;
  bool stochastic;
  uint64_t seed;
};

// One param of an Adafactor step, its param and grad viewed as (batch, rows, cols) in C
// order. A factored param (two or more dimensions) has its row factor, (batch, rows)
// elements, in `row` and its column factor, (batch, cols), in `col`; an unfactored one (a
// vector or 0-d: batch = rows = 1) its full second moment in `variance`, the others null.
// The state is in the math type: float32 for float32 and 16-bit params, float64 for float64.
// Pointers are host or device memory, as the kernel that takes it.
struct AdafactorParam {
  void* param;
  const void* grad;
  void* row;
  void* col;
  void* variance;
  int64_t batch, rows, cols;
  double step;   // t, the step this call takes (>= 1)
  void* master;  // a 16-bit param's float32 master copy (stepped in its place), or null
};

// One param's per-step numbers that depend on t alone, computed on the host in float64 (as
// torch computes them from Python floats).
struct AdafactorStep {
  double weight;      // w = t^beta2_decay: how far the second moment moves toward g^2
  double rho;         // min(lr, 1/sqrt(t))
  double root_numel;  // numel^0.5 (Python's int ** 0.5)
  static AdafactorStep at(const AdafactorHyper& h, double t, int64_t numel) {
    const double r = 1.0 / std::pow(t, 0.5);
    return {std::pow(t, h.beta2_decay), r < h.lr ? r : h.lr, std::pow(double(numel), 0.5)};
  }
};

}  // namespace fastopt

FASTOPT_ISA_BEGIN

// torch.lerp(x, y, w): x + w*(y - x) where |w| < 0.5, else y - (y - x)*(1 - w); `small`
// (|w| < 0.5) is decided once per param on the host.
template <class T> FASTOPT_HD T adafactor_lerp(T x, T y, T w, T one_minus_w, bool small) {
  return small ? x + w * (y - x) : y - (y - x) * one_minus_w;
}

// The factor u is added with, from the sums of squares of p (before its weight decay) and
// of u: -alpha / max(1, rms(u) / d), alpha = max(eps2, rms(p)) * rho, with Python's max
// (a NaN rms gives eps2, and 1).
FASTOPT_HD double adafactor_coefficient(double p_squares, double u_squares, double rho,
                                        double root_numel, double eps2, double d) {
  const double rms = sqrt(p_squares) / root_numel;
  const double alpha = (rms > eps2 ? rms : eps2) * rho;
  const double ratio = sqrt(u_squares) / (root_numel * d);
  return -alpha / (ratio > 1.0 ? ratio : 1.0);
}

// 1 / sqrt(max(v, eps1^2)), torch's clamp_(min=eps1*eps1).rsqrt_() (NaN kept).
template <class T> FASTOPT_HD T adafactor_inverse_root(T v, T eps1_squared) {
  return T(1) / vsqrt(vmax_nan(v, eps1_squared));
}

FASTOPT_ISA_END
