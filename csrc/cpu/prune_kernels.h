// Entry points of the CPU magnitude-pruning kernels (prune_kernels.cpp, compiled once per
// ISA). The binding checks every size before they run.
#pragma once
#include <cstdint>
#include "cpu/optim_kernels.h"

namespace fastopt {
namespace cpu {

// The arrays of one pruning call, all of one float type: tensor i has offsets[i+1] -
// offsets[i] elements at x[i] and a mask of as many bytes at masks[i] (1 = kept, 0 =
// pruned). Problem p is the concatenation of tensors [problem_start[p], problem_start[p+1])
// and prunes prune_counts[p] of its elements, 0 <= count <= its size: one problem over
// every tensor for a global threshold, one per tensor for per-tensor thresholds.
struct PruneTable {
  int num_tensors = 0;
  const void* const* x = nullptr;
  uint8_t* const* masks = nullptr;
  const int64_t* offsets = nullptr;  // num_tensors + 1 prefix sums of the sizes
  int num_problems = 0;
  const int* problem_start = nullptr;  // num_problems + 1 tensor indices
  const int64_t* prune_counts = nullptr;
};

#define FASTOPT_DECLARE_PRUNE_KERNELS(isa)                                                 \
  namespace isa {                                                                          \
  void prune_magnitude(const PruneTable&, DType, int threads);                             \
  /* In each group of m consecutive elements keep the n largest (problems unused; every */ \
  /* tensor's size is a multiple of m). */                                                 \
  void prune_n_m(const PruneTable&, DType, int n, int m, int threads);                     \
  }
FASTOPT_DECLARE_PRUNE_KERNELS(isa_scalar)
FASTOPT_DECLARE_PRUNE_KERNELS(isa_avx2)
#undef FASTOPT_DECLARE_PRUNE_KERNELS

}  // namespace cpu
}  // namespace fastopt
