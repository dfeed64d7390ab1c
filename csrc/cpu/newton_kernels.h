// Entry points of the batched Cholesky/Newton CPU kernels (newton_kernels.cpp, compiled
// once per ISA like the optimizer kernels). Arrays are contiguous: H (batch, n, n),
// g, d, p (batch, n).
#pragma once
#include <cstdint>
#include "cpu/optim_kernels.h"

namespace fastopt {
namespace cpu {

#define FASTOPT_DECLARE_NEWTON_KERNELS(isa)                                              \
  namespace isa {                                                                        \
  void newton_solve(DType, const void* H, const void* g, void* d, bool* solved,          \
                    int64_t batch, int64_t n, double damping, int threads);              \
  void newton_apply(DType, void* p, const void* d, const bool* use, int64_t batch,       \
                    int64_t n, double lr, int threads);                                  \
  }
FASTOPT_DECLARE_NEWTON_KERNELS(isa_scalar)
FASTOPT_DECLARE_NEWTON_KERNELS(isa_avx2)
#undef FASTOPT_DECLARE_NEWTON_KERNELS

}  // namespace cpu
}  // namespace fastopt
