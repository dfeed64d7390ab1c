// Entry points of the CUDA int8 quantization kernels (quant_kernels.cu): the formulas of
// common/quant.h, so results equal the CPU kernels bit for bit (nearest and stochastic).
// Inputs float32, float16 or bfloat16 (`in`); all pointers are device memory. Kernels that
// read floats atomically lower *first_bad (initialised to ~0ull by the caller) to the
// index of a non-finite element, the first such index per lane.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include "common/platform.h"
#include "cuda/launch_table.h"

namespace fastopt {
namespace cuda {

// Blocks of `block` consecutive elements: absmax per block and q = rint(x * 127/absmax).
void quantize_blockwise(DType in, const void* x, int8_t* q, float* absmax, int64_t n,
                        int64_t block, bool stochastic, uint64_t seed,
                        unsigned long long* first_bad, cudaStream_t stream);
// x: float32, float16 or bfloat16 (`out`, rounded to nearest even), as all dequantizers.
void dequantize_blockwise(const int8_t* q, const float* absmax, DType out, void* x, int64_t n,
                          int64_t block, cudaStream_t stream);
// Affine, element e in channel (e / inner) % channels (per tensor: channels = 1).
void quantize_affine(DType in, const void* x, void* q, bool unsigned_q, int64_t n,
                     int64_t channels, int64_t inner, const float* scales,
                     const float* zero_points, unsigned long long* first_bad,
                     cudaStream_t stream);
void dequantize_affine(const void* q, bool unsigned_q, DType out, void* x, int64_t n,
                       int64_t channels, int64_t inner, const float* scales,
                       const float* zero_points, cudaStream_t stream);
// Min and max of the finite elements per channel, as order-preserving uint32 keys (see
// float_key): min_keys / max_keys start at float_key(+inf) / float_key(-inf).
void minmax(DType in, const void* x, int64_t n, int64_t channels, int64_t inner,
            uint32_t* min_keys, uint32_t* max_keys, unsigned long long* first_bad,
            cudaStream_t stream);

// Unsigned keys ordered like the floats they encode (-0 below +0), so that integer
// atomicMin/atomicMax compute float min/max.
// Used by the minmax kernel and, to seed and decode its results, by the binding.
FASTOPT_HD uint32_t float_key(uint32_t bits) { return bits & 0x80000000u ? ~bits : bits | 0x80000000u; }
FASTOPT_HD uint32_t key_float_bits(uint32_t key) { return key & 0x80000000u ? key & 0x7fffffffu : ~key; }

}  // namespace cuda
}  // namespace fastopt
