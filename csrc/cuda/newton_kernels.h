// Entry points of the CUDA batched damped Newton kernels (newton_kernels.cu); all pointers
// are device memory, float32 or float64 by `dtype` (f32/f64 only).
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include "cuda/launch_table.h"

namespace fastopt {
namespace cuda {

// Systems larger than this use one thread block each with the factor in `scratch`.
constexpr int64_t kNewtonWarpMaxN = 64;

// Elements of scratch newton_solve needs (0 when n <= kNewtonWarpMaxN).
int64_t newton_scratch_elements(int64_t batch, int64_t n);

// d = (H + damping*I)^-1 g per system; solved[b] = 1 or 0 (a bool array). H is read,
// never written.
void newton_solve(DType dtype, const void* H, const void* g, void* d, uint8_t* solved,
                  int64_t batch, int64_t n, double damping, void* scratch, cudaStream_t stream);
// p <- p - lr*d for the systems with use[b] != 0 (all of them when use is null).
void newton_apply(DType dtype, void* p, const void* d, const uint8_t* use, int64_t batch,
                  int64_t n, double lr, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastopt
