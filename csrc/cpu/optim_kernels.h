// Entry points of the CPU optimizer kernels: step<Opt> for every optimizer of the registry.
// optim_kernels.cpp is compiled once per ISA (namespaces isa_scalar and isa_avx2);
// dispatch.cpp picks one at run time.
#pragma once
#include <cstdint>
#include "common/optim/registry.h"
#include "cpu/multi_tensor.h"

namespace fastopt {
namespace cpu {

enum class DType { f32, f64 };

#define FASTOPT_DECLARE_CPU_KERNELS(isa)                                                 \
  namespace isa {                                                                        \
  template <class Opt>                                                                   \
  void step(const TensorTable&, DType, const typename Opt::Hyper&, int64_t step);        \
  void add_inplace(const TensorTable&, DType);                                           \
  }
FASTOPT_DECLARE_CPU_KERNELS(isa_scalar)
FASTOPT_DECLARE_CPU_KERNELS(isa_avx2)
#undef FASTOPT_DECLARE_CPU_KERNELS

}  // namespace cpu
}  // namespace fastopt
