// The CUDA multi-tensor launcher (apex style): one kernel template walks every tensor of a
// LaunchTable and applies an optimizer functor to vectors of kVectorWidth elements, or to
// single elements where a tensor's pointers are not aligned for vector access (slices
// starting at an odd element) and at each tensor's tail. Indices are 64-bit.
//
// A functor Op has `template <int W> __device__ void apply(void* const* ptr, int64_t j,
// int32_t tensor)` that loads elements [j, j+W) of each role it uses (ptr[role]) of the
// tensor at position `tensor` of the call's list, runs its formula once per element, and
// stores them.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdexcept>
#include <string>
#include "cuda/launch_table.h"

namespace fastopt {
namespace cuda {

// ---- loads and stores: storage type P <-> math type T (float for 16-bit storage) --------
__device__ __forceinline__ float to_math(float x) { return x; }
__device__ __forceinline__ double to_math(double x) { return x; }
__device__ __forceinline__ float to_math(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_math(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class P> __device__ __forceinline__ P to_storage(float x);
template <> __device__ __forceinline__ float to_storage<float>(float x) { return x; }
template <> __device__ __forceinline__ __half to_storage<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 to_storage<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <class P> __device__ __forceinline__ P to_storage(double x) { return x; }

// Vector accesses. The stores are written as PTX: built from C++ the compiler splits
// some of them into 32-bit stores (seen in the sm_90 SASS of SGD and Adam), which costs
// bandwidth. 16-bit values travel four at a time as one 8-byte access.
__device__ __forceinline__ void load4(float (&v)[4], const float* s) {
  const float4 x = *reinterpret_cast<const float4*>(s);
  v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
}
__device__ __forceinline__ void load4(double (&v)[4], const double* s) {
  const double2 a = reinterpret_cast<const double2*>(s)[0];
  const double2 b = reinterpret_cast<const double2*>(s)[1];
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}
__device__ __forceinline__ uint2 load_8_bytes(const void* s) {
  uint2 x;
  asm volatile("ld.global.v2.u32 {%0, %1}, [%2];" : "=r"(x.x), "=r"(x.y) : "l"(s));
  return x;
}
__device__ __forceinline__ void store_8_bytes(void* d, uint32_t lo, uint32_t hi) {
  asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(d), "r"(lo), "r"(hi) : "memory");
}
template <class H2>
__device__ __forceinline__ H2 as_pair(uint32_t bits) {
  H2 h;
  memcpy(&h, &bits, 4);
  return h;
}
template <class H2>
__device__ __forceinline__ uint32_t bits_of(H2 h) {
  uint32_t bits;
  memcpy(&bits, &h, 4);
  return bits;
}
__device__ __forceinline__ void load4(float (&v)[4], const __half* s) {
  const uint2 x = load_8_bytes(s);
  const float2 a = __half22float2(as_pair<__half2>(x.x)), b = __half22float2(as_pair<__half2>(x.y));
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}
__device__ __forceinline__ void load4(float (&v)[4], const __nv_bfloat16* s) {
  const uint2 x = load_8_bytes(s);
  const float2 a = __bfloat1622float2(as_pair<__nv_bfloat162>(x.x));
  const float2 b = __bfloat1622float2(as_pair<__nv_bfloat162>(x.y));
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}

__device__ __forceinline__ void store4(float* d, const float (&v)[4]) {
  asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(d), "f"(v[0]), "f"(v[1]),
               "f"(v[2]), "f"(v[3]) : "memory");
}
__device__ __forceinline__ void store4(double* d, const double (&v)[4]) {
  asm volatile("st.global.v2.f64 [%0], {%1, %2};" ::"l"(d), "d"(v[0]), "d"(v[1]) : "memory");
  asm volatile("st.global.v2.f64 [%0], {%1, %2};" ::"l"(d + 2), "d"(v[2]), "d"(v[3]) : "memory");
}
__device__ __forceinline__ void store4(__half* d, const float (&v)[4]) {
  store_8_bytes(d, bits_of(__floats2half2_rn(v[0], v[1])), bits_of(__floats2half2_rn(v[2], v[3])));
}
__device__ __forceinline__ void store4(__nv_bfloat16* d, const float (&v)[4]) {
  store_8_bytes(d, bits_of(__floats2bfloat162_rn(v[0], v[1])),
                bits_of(__floats2bfloat162_rn(v[2], v[3])));
}

template <int W, class T, class P>
__device__ __forceinline__ void load(T (&v)[W], const P* s) {
  if constexpr (W == 4) load4(v, s);
  else v[0] = to_math(*s);
}
template <int W, class T, class P>
__device__ __forceinline__ void store(P* d, const T (&v)[W]) {
  if constexpr (W == 4) store4(d, v);
  else *d = to_storage<P>(v[0]);
}

// A masked step's mask bytes (the vector path reads 4 at once: vector_ok tensors have them
// 4-byte aligned).
template <int W>
__device__ __forceinline__ void load_mask(uint8_t (&m)[W], const uint8_t* s) {
  if constexpr (W == 4) {
    const uint32_t x = *reinterpret_cast<const uint32_t*>(s);
#pragma unroll
    for (int w = 0; w < 4; ++w) m[w] = uint8_t(x >> (8 * w));
  } else {
    m[0] = *s;
  }
}

// ---- the kernels ---------------------------------------------------------------------------
// This CUDA block's tensor in the table: the last i with block_start[i] <= blockIdx.x
// (uniform per block).
__device__ __forceinline__ int table_entry(const LaunchTable& table) {
  const int64_t block = blockIdx.x;
  int lo = 0, hi = table.num_tensors;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (table.block_start[mid] <= block) lo = mid; else hi = mid;
  }
  return lo;
}

template <class Op>
__global__ void __launch_bounds__(kBlockThreads)
multi_tensor_kernel(const __grid_constant__ LaunchTable table, const Op op) {
  const int lo = table_entry(table);
  void* ptr[kMaxSlots];
#pragma unroll
  for (int r = 0; r < kMaxSlots; ++r) ptr[r] = table.ptrs[r][lo];
  const int32_t tensor = table.index[lo];
  const int64_t begin = (int64_t(blockIdx.x) - table.block_start[lo]) * kChunk;
  const int64_t end = min(begin + kChunk, table.size[lo]);
  if (table.vector_ok[lo]) {
    constexpr int64_t stride = int64_t(kBlockThreads) * kVectorWidth;
    for (int64_t j = begin + int64_t(threadIdx.x) * kVectorWidth; j < end; j += stride) {
      if (j + kVectorWidth <= end) {
        op.template apply<kVectorWidth>(ptr, j, tensor);
      } else {
        for (int64_t k = j; k < end; ++k) op.template apply<1>(ptr, k, tensor);
      }
    }
  } else {
    for (int64_t j = begin + threadIdx.x; j < end; j += kBlockThreads)
      op.template apply<1>(ptr, j, tensor);
  }
}

// Raises the error of the launch just made, if any, naming the kernel.
inline void check_launch(const char* name) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fastopt: CUDA kernel ") + name + " failed: " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

// Blocks for `work_items` at `per_block` each: at least 1, at most 2^20 (kernels using it
// loop grid-stride beyond that).
inline unsigned grid_for(int64_t work_items, int64_t per_block) {
  constexpr int64_t kMaxGrid = int64_t(1) << 20;
  const int64_t blocks = (work_items + per_block - 1) / per_block;
  return unsigned(blocks < 1 ? 1 : blocks < kMaxGrid ? blocks : kMaxGrid);
}

// Launches `kernel` (multi_tensor_kernel<Op> or another walk of the same tables) once per
// table on `stream`.
template <class Op>
void launch_multi_tensor(const char* name, const LaunchTables& tables, const Op& op,
                         cudaStream_t stream,
                         void (*kernel)(const LaunchTable, const Op) = multi_tensor_kernel<Op>) {
  for (const LaunchTable& t : tables) {
    const int64_t blocks = t.block_start[t.num_tensors];
    if (blocks == 0) continue;
    kernel<<<static_cast<unsigned>(blocks), kBlockThreads, 0, stream>>>(t, op);
    check_launch(name);
  }
}

}  // namespace cuda
}  // namespace fastopt
