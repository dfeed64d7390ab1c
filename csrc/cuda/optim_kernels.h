// Entry points of the CUDA optimizer kernels (csrc/cuda/optim_kernels.cu). Each launches
// the multi-tensor kernel once per table on `stream` (never synchronising) and throws
// std::runtime_error naming the kernel if a launch fails. `dtype` is the params' type.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include "common/optim_params.h"
#include "cuda/launch_table.h"

namespace fastopt {
namespace cuda {

void sgd(const LaunchTables&, DType, const SgdHyper&, int64_t step, cudaStream_t);
void adagrad(const LaunchTables&, DType, const AdagradHyper&, int64_t step, cudaStream_t);
void rmsprop(const LaunchTables&, DType, const RmspropHyper&, cudaStream_t);
void adam(const LaunchTables&, DType, const AdamHyper&, int64_t step, cudaStream_t);
void sophia(const LaunchTables&, DType, const SophiaHyper&, cudaStream_t);
void ema(const LaunchTables&, DType, double beta, cudaStream_t);

}  // namespace cuda
}  // namespace fastopt
