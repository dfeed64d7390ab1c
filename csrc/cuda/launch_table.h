// The multi-tensor launch table: everything one launch of an elementwise optimizer kernel
// needs to find its data. Each block processes kChunk consecutive elements of one tensor;
// block_start is the prefix sum of blocks per tensor, so a block finds its tensor with a
// block-uniform binary search. The table travels as the kernel's argument
// (__grid_constant__; CUDA 12.1+ allows 32 KB of parameters), so a step needs no
// host-to-device copy and no device buffer whose lifetime would be tied to a stream.
// A call over more than kLaunchTensors tensors uses one launch per kLaunchTensors.
// Plain C++: the bindings build tables, csrc/cuda/*.cu launch them.
#pragma once
#include <cstdint>
#include <vector>
#include "common/optim/descriptor.h"

namespace fastopt {
namespace cuda {

// Element types of device arrays. Optimizer params and grads are one of the four float
// types; their state is float32 for float16/bfloat16 params (the math runs in float32
// registers) and the params' type otherwise, or bfloat16, or uint8 codes (8-bit state).
// int8/uint8 are quantized data; a masked step's masks are bool or uint8.
enum class DType { f32, f64, f16, bf16, i8, u8, b8 };
constexpr int kNumDTypes = 7;
inline bool is_float(DType d) { return d != DType::i8 && d != DType::u8 && d != DType::b8; }

constexpr int kBlockThreads = 256;
constexpr int kVectorWidth = 4;        // elements per thread access: 16 B of float32
constexpr int64_t kChunk = 4096;       // elements per block (a 1M tensor: 256 blocks)
constexpr int kLaunchTensors = 256;    // tensors per launch (the table is ~25 KB)

struct LaunchTable {
  int32_t num_tensors = 0;
  uint8_t vector_ok[kLaunchTensors];   // every pointer of the tensor allows vector access
  int64_t block_start[kLaunchTensors + 1];
  int64_t size[kLaunchTensors];        // elements
  int32_t index[kLaunchTensors];       // the tensor's position in the call's list
  // per role, then the masks (kMaskSlot), the master params (kMasterSlot), then the block
  // maxima of 8-bit state roles
  void* ptrs[kTableSlots][kLaunchTensors];
};
// With the 8-bit state step's functor (its two maps, 2.5 KB) the kernel's arguments stay
// under the 32764 bytes CUDA allows.
static_assert(sizeof(LaunchTable) <= 26624, "a kernel argument holds at most 32764 bytes");

using LaunchTables = std::vector<LaunchTable>;

inline int element_size(DType d) {
  return d == DType::f64 ? 8 : d == DType::f32 ? 4 : is_float(d) ? 2 : 1;
}
// The state arrays' type for params of type d.
inline DType state_dtype(DType d) { return d == DType::f64 ? DType::f64 : DType::f32; }
// Whether state of type `state` may go with params of type d: the state type above, or
// for any params but float64 bfloat16 (state_dtype="bfloat16") or uint8 (8-bit state).
inline bool state_dtype_ok(DType d, DType state) {
  return state == state_dtype(d) || ((state == DType::bf16 || state == DType::u8) && d != DType::f64);
}
// Alignment a pointer to elements of `bytes` each needs for the vector path (loads and
// stores of kVectorWidth elements, 16 B at most per access).
inline uintptr_t vector_alignment(int bytes) {
  return bytes * kVectorWidth < 16 ? uintptr_t(bytes) * kVectorWidth : 16;
}

}  // namespace cuda
}  // namespace fastopt
