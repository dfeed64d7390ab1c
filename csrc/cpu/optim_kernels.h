// Entry points of the CPU optimizer kernels. optim_kernels.cpp is compiled once per ISA
// (namespaces isa_scalar and isa_avx2); dispatch.cpp picks one at run time.
#pragma once
#include <cstdint>
#include "common/optim_params.h"
#include "cpu/multi_tensor.h"

namespace fastopt {
namespace cpu {

enum class DType { f32, f64 };

#define FASTOPT_DECLARE_CPU_KERNELS(isa)                                            \
  namespace isa {                                                                   \
  void sgd(const TensorTable&, DType, const SgdHyper&, int64_t step);               \
  void adagrad(const TensorTable&, DType, const AdagradHyper&, int64_t step);       \
  void rmsprop(const TensorTable&, DType, const RmspropHyper&);                     \
  void adam(const TensorTable&, DType, const AdamHyper&, int64_t step);             \
  void sophia(const TensorTable&, DType, const SophiaHyper&);                       \
  void ema(const TensorTable&, DType, double beta);                                 \
  void add_inplace(const TensorTable&, DType);                                      \
  }
FASTOPT_DECLARE_CPU_KERNELS(isa_scalar)
FASTOPT_DECLARE_CPU_KERNELS(isa_avx2)
#undef FASTOPT_DECLARE_CPU_KERNELS

}  // namespace cpu
}  // namespace fastopt
