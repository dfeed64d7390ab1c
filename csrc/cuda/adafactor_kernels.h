// Entry points of the CUDA Adafactor step (adafactor_kernels.cu; formulas in
// common/optim/adafactor.h). All pointers are device memory.
#pragma once
#include <cuda_runtime.h>
#include <cstddef>
#include <vector>
#include "common/optim/adafactor.h"
#include "cuda/launch_table.h"

namespace fastopt {
namespace cuda {

// Bytes of device scratch a call's step needs (partial sums, the factors' roots).
size_t adafactor_scratch_bytes(const std::vector<AdafactorParam>& params);

// One step of a call's params (their state updated, then the params), queued on `stream`;
// `scratch`: adafactor_scratch_bytes(params) bytes, free until the step's kernels have run.
// dtype: the params' (f32, f64, f16, bf16); the state is f32, or f64 for f64 params.
// Param i's stochastic rounding (h.stochastic) is keyed by its place i in the call.
void adafactor_step(DType dtype, const std::vector<AdafactorParam>& params,
                    const AdafactorHyper& h, void* scratch, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastopt
