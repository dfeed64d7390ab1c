// Entry points of the int8 quantization CPU kernels (quant_kernels.cpp, compiled once per
// ISA). Inputs are contiguous float32, float16 or bfloat16 (`InType`); outputs int8/uint8
// or float32, and dequantized values float32, float16 or bfloat16 (`OutType`). Kernels that read floats report the first non-finite element in
// *first_bad (-1 when all are finite); what they wrote is then to be discarded.
#pragma once
#include <cstdint>

namespace fastopt {
namespace cpu {

enum class InType { f32, f16, bf16 };
using OutType = InType;  // dequantize's output: the same three float types

// Elements are laid out as (outer, channels, inner); element e has channel (e / inner) %
// channels. Per-tensor quantization is channels = 1.
struct ChannelLayout {
  int64_t total, channels, inner;
};

#define FASTOPT_DECLARE_QUANT_KERNELS(isa)                                                    \
  namespace isa {                                                                             \
  void quantize_affine(InType, const void* x, void* q, bool unsigned_q, ChannelLayout,        \
                       const float* scales, const float* zero_points, int64_t* first_bad,     \
                       int threads);                                                          \
  void dequantize_affine(const void* q, bool unsigned_q, OutType, void* x, ChannelLayout,    \
                         const float* scales, const float* zero_points, int threads);         \
  void minmax(InType, const void* x, ChannelLayout, float* mins, float* maxs,                 \
              int64_t* first_bad, int threads);                                               \
  void quantize_blockwise(InType, const void* x, int8_t* q, float* absmax, int64_t n,         \
                          int64_t block, bool stochastic, uint64_t seed, int64_t* first_bad,  \
                          int threads);                                                       \
  void dequantize_blockwise(const int8_t* q, const float* absmax, OutType, void* x, int64_t n, \
                            int64_t block, int threads);                                      \
  }
FASTOPT_DECLARE_QUANT_KERNELS(isa_scalar)
FASTOPT_DECLARE_QUANT_KERNELS(isa_avx2)
#undef FASTOPT_DECLARE_QUANT_KERNELS

}  // namespace cpu
}  // namespace fastopt
