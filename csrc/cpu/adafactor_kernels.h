// Entry point of the CPU Adafactor step (adafactor_kernels.cpp, compiled once per ISA;
// dispatch.cpp picks one at run time). The formulas are in common/optim/adafactor.h.
#pragma once
#include <cstdint>
#include "common/optim/adafactor.h"
#include "cpu/optim_kernels.h"

namespace fastopt {
namespace cpu {

// One param of an Adafactor step, its param and grad viewed as (batch, rows, cols) in C
// order. A factored param (two or more dimensions) has its row factor, (batch, rows)
// elements, in `row` and its column factor, (batch, cols), in `col`; an unfactored one (a
// vector or 0-d: batch = rows = 1) its full second moment in `variance`, the others null.
// The state is in the math type: float32 for float32 and 16-bit params, float64 for float64.
struct AdafactorParam {
  void* param;
  const void* grad;
  void* row;
  void* col;
  void* variance;
  int64_t batch, rows, cols;
  double step;  // t, the step this call takes (>= 1)
};

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
