// CUDA int8 quantization: blockwise (absmax per block of consecutive elements; read 4 B
// (2 B for 16-bit input), write 1 B per element + 4 B per block) and affine per tensor or
// per channel, and their inverses (to float32, float16 or bfloat16, rounded to nearest
// even). The formulas are common/quant.h, the ones the CPU
// kernels use, so results agree bit for bit (stochastic rounding included: the uniform
// comes from a counter-based hash of (seed, element index)).
//
// Blockwise layout: a group of threads per quant block -- one warp for blocks up to
// kWarpBlockMax elements, the whole thread block for larger ones -- reduces the absmax
// with shuffles, then quantizes the (cached) block. Lanes stride by the group size, so
// every access is coalesced.
#include <climits>
#include "common/quant.h"
#include "cuda/multi_tensor.cuh"
#include "cuda/quant_kernels.h"

FASTOPT_ISA_BEGIN
namespace {

using cuda::check_launch;
using cuda::float_key;
using cuda::grid_for;
using cuda::to_math;
using cuda::to_storage;

constexpr int kThreads = 256;
constexpr int64_t kWarpBlockMax = 4096;

// Max over the kGroup threads of a group (a warp, or all kThreads of the block).
template <int kGroup>
__device__ float group_max(float v, float* shared) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  if constexpr (kGroup == 32) {
    return v;
  } else {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // the previous block's reads of `shared` are done
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < kGroup / 32 ? shared[lane] : 0.0f;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
      v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
  }
}

// Calls body(b, begin, end, lane) for each quant block b = [begin, end) of this thread's
// group; b is uniform over a group, so a group's shuffles and barriers see all its threads.
template <int kGroup, class Body>
__device__ __forceinline__ void for_each_quant_block(int64_t n, int64_t block, Body&& body) {
  constexpr int kGroups = kThreads / kGroup;
  const int lane = threadIdx.x % kGroup;
  const int64_t blocks = block_count(n, block);
  for (int64_t b = int64_t(blockIdx.x) * kGroups + threadIdx.x / kGroup; b < blocks;
       b += int64_t(gridDim.x) * kGroups) {
    const int64_t begin = b * block;
    body(b, begin, begin + block < n ? begin + block : n, lane);
  }
}

template <int kGroup, class In>
__global__ void __launch_bounds__(kThreads)
quantize_blockwise_kernel(const In* __restrict__ x, int8_t* __restrict__ q,
                          float* __restrict__ absmax, int64_t n, int64_t block,
                          bool stochastic, uint32_t key, unsigned long long* first_bad) {
  __shared__ float shared[kThreads / 32];
  for_each_quant_block<kGroup>(n, block, [&](int64_t b, int64_t begin, int64_t end, int lane) {
    float m = 0.0f;
    int64_t bad = LLONG_MAX;
    for (int64_t e = begin + lane; e < end; e += kGroup) {
      const float v = to_math(x[e]);
      if (!is_finite(v) && e < bad) bad = e;
      m = fmaxf(m, fabsf(v));
    }
    if (bad != LLONG_MAX) {
      atomicMin(first_bad, static_cast<unsigned long long>(bad));
      m = INFINITY;  // (fmaxf drops NaN) the group's max is infinite iff a lane saw one
    }
    m = group_max<kGroup>(m, shared);
    const bool block_bad = m == INFINITY;  // as on the CPU: q 0, absmax NaN
    const float pre = blockwise_prescale(m), factor = blockwise_factor(m, pre);
    for (int64_t e = begin + lane; e < end; e += kGroup) {
      const float v = (to_math(x[e]) * pre) * factor;
      const float r = stochastic ? blockwise_stochastic(v, uniform24(key, uint64_t(e)))
                                 : blockwise_nearest(v);
      q[e] = block_bad ? int8_t(0) : static_cast<int8_t>(static_cast<int>(r));
    }
    if (lane == 0) absmax[b] = block_bad ? NAN : m;
  });
}

template <int kGroup, class Out>
__global__ void __launch_bounds__(kThreads)
dequantize_blockwise_kernel(const int8_t* __restrict__ q, const float* __restrict__ absmax,
                            Out* __restrict__ x, int64_t n, int64_t block) {
  for_each_quant_block<kGroup>(n, block, [&](int64_t b, int64_t begin, int64_t end, int lane) {
    const float scale = blockwise_scale(absmax[b]);
    for (int64_t e = begin + lane; e < end; e += kGroup)
      x[e] = to_storage<Out>(float(q[e]) * scale);
  });
}

// Per-channel affine layout: element e belongs to channel (e / inner) % channels. A
// grid-stride loop follows its channel with a cursor instead of dividing per element
// (64-bit divisions are called subroutines, whose register needs made the float32 kernel
// spill): two divisions per thread, none for one channel, and in the loop only adds and
// compares. The stride's share (step_*) is divided out once on the host.
struct ChannelLayout {
  int64_t channels, inner;
  int64_t step_channel, step_pos;  // (stride / inner) % channels and stride % inner
};

ChannelLayout channel_layout(int64_t channels, int64_t inner, unsigned grid) {
  const int64_t stride = int64_t(grid) * kThreads;
  // One channel; or no elements, or channels/inner the binding should have refused:
  // never a host division by zero.
  if (channels < 2 || inner < 1) return {1, 1, 0, 0};
  return {channels, inner, (stride / inner) % channels, stride % inner};
}

struct ChannelCursor {
  int64_t channel = 0, pos = 0;  // e = (row * channels + channel) * inner + pos

  __device__ ChannelCursor(int64_t e, const ChannelLayout& l) {
    if (l.channels == 1) return;
    const int64_t row = e / l.inner;
    pos = e - row * l.inner;
    channel = row % l.channels;
  }
  // e += stride: pos + step_pos < 2 * inner and channel + step_channel + 1 < 2 * channels,
  // so one conditional subtraction each wraps them.
  __device__ void advance(const ChannelLayout& l) {
    pos += l.step_pos;
    const int carry = pos >= l.inner;
    if (carry) pos -= l.inner;
    channel += l.step_channel + carry;
    if (channel >= l.channels) channel -= l.channels;
  }
};

// Not unrolled: grids cover up to 2^28 elements with one element per thread, so the loop
// body mostly runs once, and unrolled (x4) it needs 44 registers instead of 32, which
// costs occupancy (5 instead of 8 blocks per SM).
template <class In, class Q>
__global__ void __launch_bounds__(kThreads)
quantize_affine_kernel(const In* __restrict__ x, Q* __restrict__ q, int64_t n,
                       ChannelLayout layout, const float* __restrict__ scales,
                       const float* __restrict__ zero_points, float qmin, float qmax,
                       unsigned long long* first_bad) {
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= n) return;
  int64_t bad = LLONG_MAX;
#pragma unroll 1
  for (ChannelCursor c(e, layout); e < n; e += stride, c.advance(layout)) {
    const float v = to_math(x[e]);
    if (!is_finite(v) && e < bad) bad = e;
    q[e] = static_cast<Q>(static_cast<int>(
        quantize_affine(v, scales[c.channel], zero_points[c.channel], qmin, qmax)));
  }
  if (bad != LLONG_MAX) atomicMin(first_bad, static_cast<unsigned long long>(bad));
}

template <class Q, class Out>
__global__ void __launch_bounds__(kThreads)
dequantize_affine_kernel(const Q* __restrict__ q, Out* __restrict__ x, int64_t n,
                         ChannelLayout layout, const float* __restrict__ scales,
                         const float* __restrict__ zero_points) {
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= n) return;
#pragma unroll 1
  for (ChannelCursor c(e, layout); e < n; e += stride, c.advance(layout))
    x[e] = to_storage<Out>(
        dequantize_affine(float(q[e]), scales[c.channel], zero_points[c.channel]));
}

// Per-channel min/max of the finite elements. Lanes of a warp read 32 consecutive
// elements; with one channel every thread keeps its min/max across the grid-stride loop
// (one atomic pair per warp at the end); otherwise a warp whose 32 elements share a
// channel reduces them first, and a warp straddling channels updates per element.
template <class In>
__global__ void __launch_bounds__(kThreads)
minmax_kernel(const In* __restrict__ x, int64_t n, int64_t channels, int64_t inner,
              uint32_t* min_keys, uint32_t* max_keys, unsigned long long* first_bad) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / 32);
  int64_t bad = LLONG_MAX;
  float run_min = INFINITY, run_max = -INFINITY;  // the single-channel case
  auto warp_reduce = [](float& mn, float& mx) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, offset));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, offset));
    }
  };
  for (int64_t base = (int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32) * 32; base < n;
       base += warps * 32) {
    const int64_t e = base + lane;
    const bool in = e < n;
    const float v = in ? to_math(x[e]) : 0.0f;
    const bool finite = in && is_finite(v);
    if (in && !finite && e < bad) bad = e;
    float mn = finite ? v : INFINITY, mx = finite ? v : -INFINITY;
    if (channels == 1) {
      run_min = fminf(run_min, mn);
      run_max = fmaxf(run_max, mx);
      continue;
    }
    const int64_t c = ((in ? e : base) / inner) % channels;
    const int64_t c0 = __shfl_sync(0xffffffffu, c, 0);
    if (__all_sync(0xffffffffu, c == c0)) {
      warp_reduce(mn, mx);
      if (lane == 0 && mn <= mx) {
        atomicMin(min_keys + c0, float_key(__float_as_uint(mn)));
        atomicMax(max_keys + c0, float_key(__float_as_uint(mx)));
      }
    } else if (finite) {
      atomicMin(min_keys + c, float_key(__float_as_uint(v)));
      atomicMax(max_keys + c, float_key(__float_as_uint(v)));
    }
  }
  if (channels == 1) {
    warp_reduce(run_min, run_max);
    if (lane == 0 && run_min <= run_max) {
      atomicMin(min_keys, float_key(__float_as_uint(run_min)));
      atomicMax(max_keys, float_key(__float_as_uint(run_max)));
    }
  }
  if (bad != LLONG_MAX) atomicMin(first_bad, static_cast<unsigned long long>(bad));
}

template <class In>
void launch_minmax(const void* x, int64_t n, int64_t channels, int64_t inner,
                   uint32_t* min_keys, uint32_t* max_keys, unsigned long long* first_bad,
                   cudaStream_t s) {
  minmax_kernel<In><<<grid_for(n, kThreads), kThreads, 0, s>>>(
      static_cast<const In*>(x), n, channels, inner, min_keys, max_keys, first_bad);
  check_launch("minmax");
}

template <class In>
void launch_quantize_blockwise(const void* x, int8_t* q, float* absmax, int64_t n, int64_t block,
                               bool stochastic, uint64_t seed, unsigned long long* first_bad,
                               cudaStream_t s) {
  const In* in = static_cast<const In*>(x);
  const int64_t blocks = block_count(n, block);
  const uint32_t key = seed_key(seed);
  if (block <= kWarpBlockMax)
    quantize_blockwise_kernel<32, In><<<grid_for(blocks, kThreads / 32), kThreads, 0, s>>>(
        in, q, absmax, n, block, stochastic, key, first_bad);
  else
    quantize_blockwise_kernel<kThreads, In><<<grid_for(blocks, 1), kThreads, 0, s>>>(
        in, q, absmax, n, block, stochastic, key, first_bad);
  check_launch("quantize_blockwise");
}

template <class In>
void launch_quantize_affine(const void* x, void* q, bool unsigned_q, int64_t n, int64_t channels,
                            int64_t inner, const float* scales, const float* zps,
                            unsigned long long* first_bad, cudaStream_t s) {
  const In* in = static_cast<const In*>(x);
  const unsigned grid = grid_for(n, kThreads);
  const ChannelLayout layout = channel_layout(channels, inner, grid);
  if (unsigned_q)
    quantize_affine_kernel<In, uint8_t><<<grid, kThreads, 0, s>>>(
        in, static_cast<uint8_t*>(q), n, layout, scales, zps, 0.0f, 255.0f, first_bad);
  else
    quantize_affine_kernel<In, int8_t><<<grid, kThreads, 0, s>>>(
        in, static_cast<int8_t*>(q), n, layout, scales, zps, -128.0f, 127.0f, first_bad);
  check_launch("quantize_affine");
}

template <class Out>
void launch_dequantize_blockwise(const int8_t* q, const float* absmax, void* x, int64_t n,
                                 int64_t block, cudaStream_t s) {
  Out* out = static_cast<Out*>(x);
  const int64_t blocks = block_count(n, block);
  if (block <= kWarpBlockMax)
    dequantize_blockwise_kernel<32, Out><<<grid_for(blocks, kThreads / 32), kThreads, 0, s>>>(
        q, absmax, out, n, block);
  else
    dequantize_blockwise_kernel<kThreads, Out><<<grid_for(blocks, 1), kThreads, 0, s>>>(
        q, absmax, out, n, block);
  check_launch("dequantize_blockwise");
}

template <class Out>
void launch_dequantize_affine(const void* q, bool unsigned_q, void* x, int64_t n,
                              int64_t channels, int64_t inner, const float* scales,
                              const float* zps, cudaStream_t s) {
  Out* out = static_cast<Out*>(x);
  const unsigned grid = grid_for(n, kThreads);
  const ChannelLayout layout = channel_layout(channels, inner, grid);
  if (unsigned_q)
    dequantize_affine_kernel<uint8_t, Out><<<grid, kThreads, 0, s>>>(
        static_cast<const uint8_t*>(q), out, n, layout, scales, zps);
  else
    dequantize_affine_kernel<int8_t, Out><<<grid, kThreads, 0, s>>>(
        static_cast<const int8_t*>(q), out, n, layout, scales, zps);
  check_launch("dequantize_affine");
}

// Calls fn<In> for the float input (or output) type.
#define FASTOPT_BY_INPUT(in, fn, ...)                                        \
  switch (in) {                                                              \
    case cuda::DType::f16: fn<__half>(__VA_ARGS__); break;                   \
    case cuda::DType::bf16: fn<__nv_bfloat16>(__VA_ARGS__); break;           \
    default: fn<float>(__VA_ARGS__); break;                                  \
  }

}  // namespace
FASTOPT_ISA_END

namespace fastopt {
namespace cuda {

void quantize_blockwise(DType in, const void* x, int8_t* q, float* absmax, int64_t n,
                        int64_t block, bool stochastic, uint64_t seed,
                        unsigned long long* first_bad, cudaStream_t s) {
  FASTOPT_BY_INPUT(in, launch_quantize_blockwise, x, q, absmax, n, block, stochastic, seed,
                   first_bad, s);
}

void dequantize_blockwise(const int8_t* q, const float* absmax, DType out, void* x, int64_t n,
                          int64_t block, cudaStream_t s) {
  FASTOPT_BY_INPUT(out, launch_dequantize_blockwise, q, absmax, x, n, block, s);
}

void quantize_affine(DType in, const void* x, void* q, bool unsigned_q, int64_t n,
                     int64_t channels, int64_t inner, const float* scales,
                     const float* zero_points, unsigned long long* first_bad, cudaStream_t s) {
  FASTOPT_BY_INPUT(in, launch_quantize_affine, x, q, unsigned_q, n, channels, inner, scales,
                   zero_points, first_bad, s);
}

void minmax(DType in, const void* x, int64_t n, int64_t channels, int64_t inner,
            uint32_t* min_keys, uint32_t* max_keys, unsigned long long* first_bad,
            cudaStream_t s) {
  FASTOPT_BY_INPUT(in, launch_minmax, x, n, channels, inner, min_keys, max_keys, first_bad, s);
}

void dequantize_affine(const void* q, bool unsigned_q, DType out, void* x, int64_t n,
                       int64_t channels, int64_t inner, const float* scales,
                       const float* zero_points, cudaStream_t s) {
  FASTOPT_BY_INPUT(out, launch_dequantize_affine, q, unsigned_q, x, n, channels, inner, scales,
                   zero_points, s);
}

}  // namespace cuda
}  // namespace fastopt
