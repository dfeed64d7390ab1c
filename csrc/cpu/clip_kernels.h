// Entry points of the CPU gradient-clipping kernels (clip_kernels.cpp, compiled once per ISA;
// dispatch.cpp picks one at run time). See common/grad_norm.h for the formulas.
#pragma once
#include <cstdint>
#include "common/grad_norm.h"
#include "cpu/multi_tensor.h"
#include "cpu/optim_kernels.h"

namespace fastopt {
namespace cpu {

// grad_norm_total: the combined total of every element's term over the tensors of role 0
// (the sum of |g|^p, or the max of |g| for NormKind::inf), bit-identical for every path
// and thread count. scale_grads: g <- g * coefficient (in the math type: float32 for 16-bit
// grads), in place.
#define FASTOPT_DECLARE_CLIP_KERNELS(isa)                                                  \
  namespace isa {                                                                          \
  double grad_norm_total(const TensorTable&, DType, NormKind, double norm_type);           \
  void scale_grads(const TensorTable&, DType, double coefficient);                         \
  }
FASTOPT_DECLARE_CLIP_KERNELS(isa_scalar)
FASTOPT_DECLARE_CLIP_KERNELS(isa_avx2)
#undef FASTOPT_DECLARE_CLIP_KERNELS

}  // namespace cpu
}  // namespace fastopt
