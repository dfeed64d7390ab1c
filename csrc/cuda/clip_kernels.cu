// CUDA gradient clipping over lists of tensors (formulas: common/grad_norm.h), on the
// multi-tensor launch tables of the optimizer steps (cuda/launch_table.h). The norm is one
// pass reading every grad (each block of kChunk elements writes a float64 partial) and a
// one-block kernel that combines the partials and writes the norm to device memory; the
// scaling pass reads the norm from there, so nothing waits for the host.
//
// The additions follow a fixed tree -- thread t of a block takes the vectors at
// begin + 4t + 1024k in order (the same elements whether the tensor allows vector access or
// not), the block's threads combine pairwise in shared memory, the finishing block does
// the same over the partials -- so a result is the same from run to run. It is not the CPU's
// tree (cpu/clip_kernels.cpp): the two agree to float64 rounding, not bit for bit.
#include <type_traits>
#include "cuda/clip_kernels.h"
#include "cuda/multi_tensor.cuh"
#include "cuda/scratch.h"

FASTOPT_ISA_BEGIN
namespace {

using cuda::DType;
using cuda::kBlockThreads;
using cuda::kChunk;
using cuda::kVectorWidth;
using cuda::LaunchTable;

template <class P> using MathOf = std::conditional_t<std::is_same_v<P, double>, double, float>;

// Pairwise over the block's threads, in shared memory; the result in thread 0's return.
template <NormKind K> __device__ double combine_block(double acc) {
  __shared__ double s[kBlockThreads];
  s[threadIdx.x] = acc;
  __syncthreads();
  for (int half = kBlockThreads / 2; half > 0; half /= 2) {
    if (int(threadIdx.x) < half) s[threadIdx.x] = norm_combine<K>(s[threadIdx.x], s[threadIdx.x + half]);
    __syncthreads();
  }
  return s[0];
}

template <NormKind K, class P>
__global__ void __launch_bounds__(kBlockThreads)
norm_partials_kernel(const __grid_constant__ LaunchTable table, double p, double* partial) {
  const int lo = table_entry(table);
  const P* x = static_cast<const P*>(table.ptrs[0][lo]);
  const int64_t begin = (int64_t(blockIdx.x) - table.block_start[lo]) * kChunk;
  const int64_t end = min(begin + kChunk, table.size[lo]);
  const bool vector_ok = table.vector_ok[lo];
  double acc = 0.0;  // the identity of both the sum and the max of |g|
  constexpr int64_t stride = int64_t(kBlockThreads) * kVectorWidth;
  for (int64_t j = begin + int64_t(threadIdx.x) * kVectorWidth; j < end; j += stride) {
    if (vector_ok && j + kVectorWidth <= end) {
      MathOf<P> v[kVectorWidth];
      cuda::load<kVectorWidth>(v, x + j);
#pragma unroll
      for (int w = 0; w < kVectorWidth; ++w) acc = norm_combine<K>(acc, norm_term<K>(double(v[w]), p));
    } else {
      for (int64_t k = j; k < j + kVectorWidth && k < end; ++k)
        acc = norm_combine<K>(acc, norm_term<K>(double(cuda::to_math(x[k])), p));
    }
  }
  const double total = combine_block<K>(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

template <class O> __device__ void store_norm(O* out, double norm) {
  if constexpr (std::is_same_v<O, double>) *out = norm;
  else if constexpr (std::is_same_v<O, float>) *out = float(norm);
  else *out = cuda::to_storage<O>(float(norm));
}

template <NormKind K, class O>
__global__ void __launch_bounds__(kBlockThreads)
norm_finish_kernel(const double* partial, int64_t n, double p, O* out) {
  double acc = 0.0;
  for (int64_t b = threadIdx.x; b < n; b += kBlockThreads) acc = norm_combine<K>(acc, partial[b]);
  const double total = combine_block<K>(acc);
  if (threadIdx.x == 0) store_norm(out, norm_of_total(K, total, p));
}

// g <- g * coefficient, the coefficient from the norm in device memory.
template <class P, class N> struct ClipOp {
  const N* norm;
  double max_norm;
  template <int W> __device__ void apply(void* const* ptr, int64_t j, int32_t /*tensor*/) const {
    const double c = clip_coefficient(max_norm, double(cuda::to_math(*norm)));
    if (c == 1.0) return;
    using T = MathOf<P>;
    T v[W];
    cuda::load<W>(v, static_cast<const P*>(ptr[0]) + j);
#pragma unroll
    for (int w = 0; w < W; ++w) v[w] = v[w] * T(c);
    cuda::store<W>(static_cast<P*>(ptr[0]) + j, v);
  }
};

template <NormKind K, class P, class O>
void run_norm(const cuda::LaunchTables& tables, double p, O* out, cudaStream_t stream) {
  int64_t blocks = 0;
  for (const LaunchTable& t : tables) blocks += t.block_start[t.num_tensors];
  // stream-ordered: freed after the kernels below, no synchronisation
  const cuda::Scratch scratch(size_t(blocks) * sizeof(double), stream, "grad_norm partials");
  double* const partial = scratch.at<double>(0);
  int64_t base = 0;
  for (const LaunchTable& t : tables) {
    const int64_t n = t.block_start[t.num_tensors];
    if (n == 0) continue;
    norm_partials_kernel<K, P><<<unsigned(n), kBlockThreads, 0, stream>>>(t, p, partial + base);
    cuda::check_launch("grad_norm");
    base += n;
  }
  norm_finish_kernel<K, O><<<1, kBlockThreads, 0, stream>>>(partial, blocks, p, out);
  cuda::check_launch("grad_norm (finish)");
}

// Calls f(T{}) for the CUDA type of float dtype d.
template <class F> void with_float_type(DType d, F&& f) {
  switch (d) {
    case DType::f32: f(float{}); break;
    case DType::f64: f(double{}); break;
    case DType::f16: f(__half{}); break;
    case DType::bf16: f(__nv_bfloat16{}); break;
    default: throw std::invalid_argument("fastopt: clipping takes float arrays");
  }
}

}  // namespace
FASTOPT_ISA_END

namespace fastopt {
namespace cuda {

void grad_norm(const LaunchTables& tables, DType d, NormKind kind, double norm_type, void* out,
               DType out_dtype, cudaStream_t stream) {
  using namespace fastopt::FASTOPT_ISA;
  with_float_type(d, [&](auto grad) {
    with_float_type(out_dtype, [&](auto result) {
      using P = decltype(grad);
      using O = decltype(result);
      O* o = static_cast<O*>(out);
      switch (kind) {
        case NormKind::l2: run_norm<NormKind::l2, P>(tables, norm_type, o, stream); break;
        case NormKind::l1: run_norm<NormKind::l1, P>(tables, norm_type, o, stream); break;
        case NormKind::inf: run_norm<NormKind::inf, P>(tables, norm_type, o, stream); break;
        case NormKind::p: run_norm<NormKind::p, P>(tables, norm_type, o, stream); break;
      }
    });
  });
}

void clip_grads(const LaunchTables& tables, DType d, const void* norm, DType norm_dtype,
                double max_norm, cudaStream_t stream) {
  using namespace fastopt::FASTOPT_ISA;
  with_float_type(d, [&](auto grad) {
    with_float_type(norm_dtype, [&](auto n) {
      using P = decltype(grad);
      using N = decltype(n);
      launch_multi_tensor("clip_grads", tables, ClipOp<P, N>{static_cast<const N*>(norm), max_norm},
                          stream);
    });
  });
}

}  // namespace cuda
}  // namespace fastopt
