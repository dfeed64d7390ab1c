// Entry points of the CUDA Adafactor step (adafactor_kernels.cu; formulas in
// common/optim/adafactor.h). All pointers are device memory.
#pragma once
#include <cuda_runtime.h>
#include <cstddef>
#include "common/optim/adafactor.h"
#include "cuda/launch_table.h"

namespace fastopt {
namespace cuda {

// Bytes of device scratch one param's step needs (partial sums, the factors' roots).
size_t adafactor_scratch_bytes(const AdafactorParam& a);

// One param's step (its state updated, then the param), queued on `stream`; `scratch`:
// adafactor_scratch_bytes(a) bytes, free until the step's kernels have run. dtype: the
// param's (f32, f64, f16, bf16); the state is f32, or f64 for f64 params. index: the
// param's place in its call (the key of its stochastic rounding, h.stochastic).
void adafactor_step(DType dtype, const AdafactorParam& a, const AdafactorHyper& h, int32_t index,
                    void* scratch, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastopt
