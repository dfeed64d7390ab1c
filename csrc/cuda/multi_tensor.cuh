// The CUDA multi-tensor launcher (apex style): one kernel template walks every tensor of a
// LaunchTable and applies an optimizer functor to vectors of kVectorWidth elements, or to
// single elements where a tensor's pointers are not aligned for vector access (slices
// starting at an odd element) and at each tensor's tail. Indices are 64-bit.
//
// A functor Op has `template <int W> __device__ void apply(void* const* ptr, int64_t j)`
// that loads elements [j, j+W) of each role it uses (ptr[role]), runs the formula of
// common/optim_formulas.h once per element, and stores them.
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

// Four 16-bit values in one 8-byte access.
template <class H2> struct alignas(8) Pair16x2 { H2 lo, hi; };

__device__ __forceinline__ void load4(float (&v)[4], const float* s) {
  const float4 x = *reinterpret_cast<const float4*>(s);
  v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
}
__device__ __forceinline__ void load4(double (&v)[4], const double* s) {
  const double2 a = reinterpret_cast<const double2*>(s)[0];
  const double2 b = reinterpret_cast<const double2*>(s)[1];
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}
__device__ __forceinline__ void load4(float (&v)[4], const __half* s) {
  const Pair16x2<__half2> x = *reinterpret_cast<const Pair16x2<__half2>*>(s);
  const float2 a = __half22float2(x.lo), b = __half22float2(x.hi);
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}
__device__ __forceinline__ void load4(float (&v)[4], const __nv_bfloat16* s) {
  const Pair16x2<__nv_bfloat162> x = *reinterpret_cast<const Pair16x2<__nv_bfloat162>*>(s);
  const float2 a = __bfloat1622float2(x.lo), b = __bfloat1622float2(x.hi);
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}

__device__ __forceinline__ void store4(float* d, const float (&v)[4]) {
  *reinterpret_cast<float4*>(d) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store4(double* d, const double (&v)[4]) {
  reinterpret_cast<double2*>(d)[0] = make_double2(v[0], v[1]);
  reinterpret_cast<double2*>(d)[1] = make_double2(v[2], v[3]);
}
__device__ __forceinline__ void store4(__half* d, const float (&v)[4]) {
  *reinterpret_cast<Pair16x2<__half2>*>(d) = {__floats2half2_rn(v[0], v[1]),
                                              __floats2half2_rn(v[2], v[3])};
}
__device__ __forceinline__ void store4(__nv_bfloat16* d, const float (&v)[4]) {
  *reinterpret_cast<Pair16x2<__nv_bfloat162>*>(d) = {__floats2bfloat162_rn(v[0], v[1]),
                                                     __floats2bfloat162_rn(v[2], v[3])};
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

// ---- the kernel ----------------------------------------------------------------------------
template <class Op>
__global__ void __launch_bounds__(kBlockThreads)
multi_tensor_kernel(const __grid_constant__ LaunchTable table, const Op op) {
  // This block's tensor: the last i with block_start[i] <= blockIdx.x (uniform per block).
  const int64_t block = blockIdx.x;
  int lo = 0, hi = table.num_tensors;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (table.block_start[mid] <= block) lo = mid; else hi = mid;
  }
  void* ptr[kMaxRoles];
#pragma unroll
  for (int r = 0; r < kMaxRoles; ++r) ptr[r] = table.ptrs[r][lo];
  const int64_t begin = (block - table.block_start[lo]) * kChunk;
  const int64_t end = min(begin + kChunk, table.size[lo]);
  if (table.vector_ok[lo]) {
    constexpr int64_t stride = int64_t(kBlockThreads) * kVectorWidth;
    for (int64_t j = begin + int64_t(threadIdx.x) * kVectorWidth; j < end; j += stride) {
      if (j + kVectorWidth <= end) {
        op.template apply<kVectorWidth>(ptr, j);
      } else {
        for (int64_t k = j; k < end; ++k) op.template apply<1>(ptr, k);
      }
    }
  } else {
    for (int64_t j = begin + threadIdx.x; j < end; j += kBlockThreads) op.template apply<1>(ptr, j);
  }
}

// Raises the error of the launch just made, if any, naming the kernel.
inline void check_launch(const char* name) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fastopt: CUDA kernel ") + name + " failed: " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

// Launches the kernel once per table on `stream`.
template <class Op>
void launch_multi_tensor(const char* name, const LaunchTables& tables, const Op& op,
                         cudaStream_t stream) {
  for (const LaunchTable& t : tables) {
    const int64_t blocks = t.block_start[t.num_tensors];
    if (blocks == 0) continue;
    multi_tensor_kernel<Op><<<static_cast<unsigned>(blocks), kBlockThreads, 0, stream>>>(t, op);
    check_launch(name);
  }
}

}  // namespace cuda
}  // namespace fastopt
