// Entry points of the CUDA gradient-clipping kernels (clip_kernels.cu; formulas in
// common/grad_norm.h). Both launch on `stream` without synchronising and throw
// std::runtime_error naming the kernel if a launch fails.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include "common/grad_norm.h"
#include "cuda/launch_table.h"

namespace fastopt {
namespace cuda {

// The norm of the tensors of role 0 of `tables` (dtype d) into out[0] (of out_dtype, a float
// type): one pass writing a float64 partial per block, then one block combining them.
void grad_norm(const LaunchTables& tables, DType d, NormKind kind, double norm_type, void* out,
               DType out_dtype, cudaStream_t stream);

// g <- g * min(max_norm / (norm[0] + 1e-6), 1) over role 0 of `tables`, the norm read from
// device memory (of norm_dtype); blocks whose coefficient is 1 read and write nothing.
void clip_grads(const LaunchTables& tables, DType d, const void* norm, DType norm_dtype,
                double max_norm, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastopt
