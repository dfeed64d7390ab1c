// Entry point of the CPU Adafactor step (adafactor_kernels.cpp, compiled once per ISA;
// dispatch.cpp picks one at run time). The formulas are in common/optim/adafactor.h.
#pragma once
#include <cstdint>
#include "common/optim/adafactor.h"
#include "cpu/optim_kernels.h"

namespace fastopt {
namespace cpu {

using fastopt::AdafactorParam;  // (common/optim/adafactor.h)

#define FASTOPT_DECLARE_ADAFACTOR_KERNELS(isa)                                          \
  namespace isa {                                                                       \
  void adafactor_step(DType params, const AdafactorParam*, int64_t n,                   \
                      const AdafactorHyper&, int threads);                              \
  }
FASTOPT_DECLARE_ADAFACTOR_KERNELS(isa_scalar)
FASTOPT_DECLARE_ADAFACTOR_KERNELS(isa_avx2)
#undef FASTOPT_DECLARE_ADAFACTOR_KERNELS

}  // namespace cpu
}  // namespace fastopt
