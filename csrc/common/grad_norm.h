// Gradient norm for clipping (torch.nn.utils.clip_grad_norm_): what one element adds to the
// accumulator, how accumulators combine, the norm from the total, and the clip coefficient.
// Compiled for the CPU (scalar and AVX2 lanes) and CUDA alike.
//
// Accumulation is in float64 whatever the grads' type: |g| and g*g are exact there for
// float32/float16/bfloat16 grads (a float32 square needs 48 mantissa bits), so the only
// rounding is in the additions; float64 grads round their squares too. The order of the
// additions is fixed by the kernels (fixed blocks, fixed lanes, fixed combining tree), so a
// result does not depend on the code path or the thread count.
//   norm_type 2: sqrt(sum g^2); 1: sum |g|; inf: max |g|; other p > 0: (sum |g|^p)^(1/p).
//   A NaN anywhere makes the norm NaN (as torch's); an inf makes it inf.
//   coefficient = min(max_norm / (norm + 1e-6), 1), NaN if the norm is NaN (torch.clamp).
#pragma once
#include <cmath>
#include "common/math.h"
#include "common/platform.h"

namespace fastopt {

enum class NormKind : int { l2, l1, inf, p };

// The kind for a norm_type (> 0, validated by the caller).
inline NormKind norm_kind(double norm_type) {
  return norm_type == 2.0 ? NormKind::l2
         : norm_type == 1.0 ? NormKind::l1
         : std::isinf(norm_type) ? NormKind::inf
                                 : NormKind::p;
}

}  // namespace fastopt

FASTOPT_ISA_BEGIN

// One element's term (V: double or a vector of doubles). NormKind::p is scalar only (pow).
template <NormKind K, class V> FASTOPT_HD V norm_term(V x, [[maybe_unused]] double p) {
  if constexpr (K == NormKind::l2) return x * x;
  else if constexpr (K == NormKind::p) return pow(vabs(x), p);
  else return vabs(x);
}

// Two accumulators combined: the max (NaN-propagating) for inf, else the sum.
template <NormKind K, class V> FASTOPT_HD V norm_combine(V a, V b) {
  if constexpr (K == NormKind::inf) return vmax_nan(a, b);
  else return a + b;
}

// The norm from the combined total of every term.
FASTOPT_HD double norm_of_total(NormKind k, double total, double p) {
  return k == NormKind::l2 ? sqrt(total) : k == NormKind::p ? pow(total, 1.0 / p) : total;
}

// The factor the grads are multiplied by: max_norm / (norm + 1e-6) clamped to 1, as torch
// computes it; NaN stays NaN (torch.clamp propagates it), so a NaN grad makes every grad NaN.
FASTOPT_HD double clip_coefficient(double max_norm, double norm) {
  const double c = max_norm / (norm + 1e-6);
  return c < 1.0 || c != c ? c : 1.0;
}

FASTOPT_ISA_END
