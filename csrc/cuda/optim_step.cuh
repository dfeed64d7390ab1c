// CUDA optimizer steps over lists of tensors, one pass over memory, the same bytes per
// element as the CPU kernels (in each optimizer's header, common/optim/<name>.h); 16-bit
// params and grads move 2 B instead of 4 each. One functor serves every optimizer: it
// loads the roles a call uses, runs the optimizer's formula once per element and stores
// the written roles. The formulas are compiled without FMA contraction (--fmad=false), so
// float32/float64 results are bit-identical to the CPU kernels.
//
// Included by one generated translation unit per optimizer (CMakeLists.txt), which calls
// FASTOPT_CUDA_STEP(Opt): the optimizers compile in parallel.
#pragma once
#include <stdexcept>
#include <type_traits>
#include "common/grad_norm.h"
#include "common/optim/registry.h"
#include "common/rounding.h"
#include "common/state8.h"
#include "cuda/multi_tensor.cuh"
#include "cuda/optim_kernels.h"

FASTOPT_ISA_BEGIN
namespace {

// A float scalar in device memory of dtype d (a norm written by the clipping kernels).
__device__ __forceinline__ double device_scalar(const void* p, cuda::DType d) {
  switch (d) {
    case cuda::DType::f64: return *static_cast<const double*>(p);
    case cuda::DType::f16: return double(cuda::to_math(*static_cast<const __half*>(p)));
    case cuda::DType::bf16: return double(cuda::to_math(*static_cast<const __nv_bfloat16*>(p)));
    default: return double(*static_cast<const float*>(p));
  }
}

// P: storage type of params and grads; T: math type; S: the state's storage type (T, or
// bfloat16 for T = float: loaded exactly, stored rounded to nearest even). Bit r of loads / stores:
// the call reads / writes role r (optional roles the options leave unused are neither).
// With a grad scale (GradScaler's, from the host or read from device memory), the grads
// are divided by it as they are loaded; then multiplied by a clip coefficient, from the
// host (grad_clip) or computed from a norm in device memory (grad_norm: clipping without a
// host read, the grads never written). A set found_inf (GradScaler's, in device memory)
// skips the step: nothing is written, as torch's fused optimizers do.
// Stochastic (bfloat16 params): the params are rounded stochastically, keyed by (seed,
// step, tensor, element) as on the CPU (common/rounding.h).
// Masked (a mask byte per element, ptr[kMaskSlot]): where the mask is 0 the param is
// stored as 0 and every other written role as it was loaded (masked calls load them all).
// Master params (16-bit params, ptr[kMasterSlot] set): the param is read from and written
// to its float32 master, and also written rounded to nearest to the params.
template <class Opt, class P, class T, class S> struct StepOp {
  using F = Formula<Opt>;
  static constexpr int N = Opt::num_roles;
  typename F::template Coeffs<T> c;
  unsigned loads, stores;
  bool scale_grads, clip_grads;
  T grad_scale, grad_clip;
  const void* grad_norm;  // null, or the norm the clip coefficient comes from
  cuda::DType grad_norm_dtype;
  double max_grad_norm;
  const float* device_scale;  // null, or GradScaler's scale in device memory
  const float* found_inf;     // null, or GradScaler's flag: != 0 skips the step
  bool masked;
  bool stochastic;
  uint64_t seed;
  int64_t step;
  bool master;
  static constexpr bool kMasterable = !std::is_same_v<P, T>;  // 16-bit params

  // Elements [j, j+W) of tensor `tensor` (its arrays at ptr[slot]): the state roles are
  // read by load_state(role, x) and written by store_state(role, x) (role: an
  // std::integral_constant, x: the role's W values), the others here.
  template <int W, class LoadState, class StoreState>
  __device__ void run(void* const* ptr, int64_t j, int32_t tensor, LoadState&& load_state,
                      StoreState&& store_state) const {
    T x[N][W];
    for_each_role<N>([&](auto role_index) {
      constexpr int r = decltype(role_index)::value;
      constexpr Role role = Opt::roles[r];
      if (!role.optional || (loads >> r & 1u)) {
        if constexpr (role.kind == RoleKind::state) {
          load_state(role_index, x[r]);
        } else if constexpr (kMasterable && role.kind == RoleKind::param) {
          if (master) cuda::load<W>(x[r], static_cast<const float*>(ptr[kMasterSlot]) + j);
          else cuda::load<W>(x[r], static_cast<const P*>(ptr[r]) + j);
        } else {
          cuda::load<W>(x[r], static_cast<const P*>(ptr[r]) + j);
        }
      } else {
#pragma unroll
        for (int w = 0; w < W; ++w) x[r][w] = T(0);
      }
      if constexpr (role.kind == RoleKind::grad) {
        if (scale_grads) {
#pragma unroll
          for (int w = 0; w < W; ++w) x[r][w] = x[r][w] / grad_scale;
        }
        if (device_scale) {
          const T scale = T(*device_scale);
#pragma unroll
          for (int w = 0; w < W; ++w) x[r][w] = x[r][w] / scale;
        }
        if (clip_grads) {
#pragma unroll
          for (int w = 0; w < W; ++w) x[r][w] = x[r][w] * grad_clip;
        }
        if (grad_norm) {  // as clip_grads (clip_kernels.cu) would have scaled them
          const T c = T(clip_coefficient(max_grad_norm, device_scalar(grad_norm, grad_norm_dtype)));
#pragma unroll
          for (int w = 0; w < W; ++w) x[r][w] = x[r][w] * c;
        }
      }
    });
    uint8_t keep[W];
    if (masked) cuda::load_mask<W>(keep, static_cast<const uint8_t*>(ptr[kMaskSlot]) + j);
#pragma unroll
    for (int w = 0; w < W; ++w) {
      T lane[N];
#pragma unroll
      for (int r = 0; r < N; ++r) lane[r] = x[r][w];
      F::update(lane, c);
      if (!masked || keep[w]) {
#pragma unroll
        for (int r = 0; r < N; ++r) x[r][w] = lane[r];
      } else {
        x[0][w] = T(0);  // pruned: the param (roles[0]) is 0, the state as loaded
      }
    }
    for_each_role<N>([&](auto role_index) {
      constexpr int r = decltype(role_index)::value;
      constexpr Role role = Opt::roles[r];
      if (role.written && (!role.optional || (stores >> r & 1u))) {
        if constexpr (role.kind == RoleKind::state) {
          store_state(role_index, x[r]);
        } else if constexpr (std::is_same_v<P, __nv_bfloat16> && role.kind == RoleKind::param) {
          if (stochastic) {
            const uint32_t key = rounding_key(seed, step, tensor);
            uint16_t* out = static_cast<uint16_t*>(ptr[r]) + j;
#pragma unroll
            for (int w = 0; w < W; ++w) out[w] = bfloat16_stochastic(x[r][w], rounding_bits(key, j + w));
          } else {
            cuda::store<W>(static_cast<P*>(ptr[r]) + j, x[r]);
          }
        } else {
          cuda::store<W>(static_cast<P*>(ptr[r]) + j, x[r]);
        }
        if constexpr (kMasterable && role.kind == RoleKind::param)
          if (master) cuda::store<W>(static_cast<float*>(ptr[kMasterSlot]) + j, x[r]);
      }
    });
  }

  // Whether GradScaler found an inf or NaN in the grads: then the step writes nothing.
  __device__ bool skipped() const { return found_inf && *found_inf != 0.0f; }

  // The multi-tensor kernel's functor: the state in arrays of type S.
  template <int W> __device__ void apply(void* const* ptr, int64_t j, int32_t tensor) const {
    if (skipped()) return;
    run<W>(
        ptr, j, tensor,
        [&](auto role_index, T (&v)[W]) {
          cuda::load<W>(v, static_cast<const S*>(ptr[decltype(role_index)::value]) + j);
        },
        [&](auto role_index, const T (&v)[W]) {
          cuda::store<W>(static_cast<S*>(ptr[decltype(role_index)::value]) + j, v);
        });
  }
};

// ---- 8-bit state (common/state8.h) ----------------------------------------------------------
// Each half-warp steps one block of kState8Block elements, as the CPU's Blocked8 does: it
// decodes the block's codes with the block's absmax, runs the step, takes the new absmax
// over the half-warp (shuffles) and encodes. A thread holds 16 elements of the block, 4
// vectors of 4 that the half-warp reads contiguously (element 64 g + 4 lane + w).
constexpr int kState8Lanes = 16;                                            // a half-warp
constexpr int kState8Groups = int(kState8Block) / (kState8Lanes * cuda::kVectorWidth);  // 4
static_assert(cuda::kChunk == cuda::kBlockThreads / kState8Lanes * kState8Block, "a CUDA block: 16 8-bit blocks");

template <class Opt, class P> struct State8StepOp {
  using Step = StepOp<Opt, P, float, float>;
  static constexpr int N = Opt::num_roles;
  Step step;                // coefficients and options; its state hooks are replaced
  State8Map maps[2];        // signed, unsigned (the kernel copies them to shared memory)
  bool is_signed[N];        // per state role: which map

  // The 8-bit block of elements [lo, lo + len) (len <= 256, len = 0 past the tensor's end:
  // the lane still takes part in the shuffles) of tensor `tensor`, lane 0..15.
  __device__ void block(void* const* ptr, int64_t lo, int64_t len, int32_t tensor, bool vector_ok,
                        int lane, const State8Map* smaps) const {
    if (step.skipped()) return;  // the same for every lane: no shuffle is left waiting
    const int64_t b = lo / kState8Block;
    // where this lane's group g of 4 elements starts in the block, and role r's map
    const auto first = [lane](int g) {
      return g * kState8Lanes * cuda::kVectorWidth + lane * cuda::kVectorWidth;
    };
    const auto map_of = [&](int r) -> const State8Map& { return smaps[is_signed[r] ? 0 : 1]; };
    float top[N];                                  // the block's absmax per 8-bit role
    float v[N][kState8Groups][cuda::kVectorWidth] = {};  // this lane's new state values
    for_each_role<N>([&](auto role_index) {
      constexpr int r = decltype(role_index)::value;
      if constexpr (Opt::roles[r].kind == RoleKind::state) {
        top[r] = 0.0f;
        if ((step.loads >> r & 1u) && len > 0)
          top[r] = static_cast<const float*>(ptr[kAbsmaxSlot + r - kFirstState])[b];
      }
    });
#pragma unroll
    for (int g = 0; g < kState8Groups; ++g) {
      const int k = first(g);
      const int64_t j = lo + k;
      if (vector_ok && k + cuda::kVectorWidth <= len) {
        step.template run<cuda::kVectorWidth>(
            ptr, j, tensor,
            [&](auto role_index, float (&x)[cuda::kVectorWidth]) {
              constexpr int r = decltype(role_index)::value;
              const uint32_t codes = *reinterpret_cast<const uint32_t*>(static_cast<const uint8_t*>(ptr[r]) + j);
#pragma unroll
              for (int w = 0; w < cuda::kVectorWidth; ++w)
                x[w] = state8_decode(map_of(r), uint8_t(codes >> (8 * w)), top[r]);
            },
            [&](auto role_index, const float (&x)[cuda::kVectorWidth]) {
              constexpr int r = decltype(role_index)::value;
#pragma unroll
              for (int w = 0; w < cuda::kVectorWidth; ++w) v[r][g][w] = x[w];
            });
      } else {
#pragma unroll
        for (int w = 0; w < cuda::kVectorWidth; ++w) {
          if (k + w >= len) continue;
          step.template run<1>(
              ptr, j + w, tensor,
              [&](auto role_index, float (&x)[1]) {
                constexpr int r = decltype(role_index)::value;
                const uint8_t code = static_cast<const uint8_t*>(ptr[r])[j + w];
                x[0] = state8_decode(map_of(r), code, top[r]);
              },
              [&](auto role_index, const float (&x)[1]) { v[decltype(role_index)::value][g][w] = x[0]; });
        }
      }
    }
    for_each_role<N>([&](auto role_index) {
      constexpr int r = decltype(role_index)::value;
      constexpr Role role = Opt::roles[r];
      if constexpr (role.kind == RoleKind::state && role.written) {
        if (role.optional && !(step.stores >> r & 1u)) return;  // uniform: the call's options
        float m = 0.0f;  // max |v| over the block, NaN if any is NaN (vmax_nan keeps it)
#pragma unroll
        for (int g = 0; g < kState8Groups; ++g)
#pragma unroll
          for (int w = 0; w < cuda::kVectorWidth; ++w)
            if (first(g) + w < len) m = vmax_nan(vabs(v[r][g][w]), m);
#pragma unroll
        for (int offset = kState8Lanes / 2; offset > 0; offset /= 2)
          m = vmax_nan(__shfl_xor_sync(0xffffffffu, m, offset, kState8Lanes), m);
        const float absmax = state8_canonical_absmax(m);
        const float inv = 1.0f / absmax;
        const State8Map& map = map_of(r);
        uint8_t* out = static_cast<uint8_t*>(ptr[r]) + lo;
#pragma unroll
        for (int g = 0; g < kState8Groups; ++g) {
          const int k = first(g);
          if (vector_ok && k + cuda::kVectorWidth <= len) {
            uint32_t codes = 0;
#pragma unroll
            for (int w = 0; w < cuda::kVectorWidth; ++w)
              codes |= uint32_t(state8_encode(map, is_signed[r], v[r][g][w], inv)) << (8 * w);
            *reinterpret_cast<uint32_t*>(out + k) = codes;
          } else {
#pragma unroll
            for (int w = 0; w < cuda::kVectorWidth; ++w)
              if (k + w < len) out[k + w] = uint8_t(state8_encode(map, is_signed[r], v[r][g][w], inv));
          }
        }
        if (lane == 0 && len > 0) static_cast<float*>(ptr[kAbsmaxSlot + r - kFirstState])[b] = absmax;
      }
    });
  }
};

// The walk of 8-bit state steps over the same tables as multi_tensor_kernel: CUDA block x
// takes chunk x (kChunk elements, 16 blocks of 8-bit state), a half-warp per 8-bit block.
template <class Op>
__global__ void __launch_bounds__(cuda::kBlockThreads)
state8_kernel(const __grid_constant__ cuda::LaunchTable table, const __grid_constant__ Op op) {
  __shared__ State8Map maps[2];
  constexpr int words = int(sizeof(maps) / sizeof(uint32_t));
  static_assert(sizeof(maps) % sizeof(uint32_t) == 0, "the maps copy as 32-bit words");
  const uint32_t* from = reinterpret_cast<const uint32_t*>(op.maps);
  uint32_t* to = reinterpret_cast<uint32_t*>(maps);
  for (int k = threadIdx.x; k < words; k += cuda::kBlockThreads) to[k] = from[k];
  __syncthreads();
  const int entry = cuda::table_entry(table);
  void* ptr[kTableSlots];
#pragma unroll
  for (int r = 0; r < kTableSlots; ++r) ptr[r] = table.ptrs[r][entry];
  const int64_t begin = (int64_t(blockIdx.x) - table.block_start[entry]) * cuda::kChunk;
  const int64_t lo = begin + int64_t(threadIdx.x / kState8Lanes) * kState8Block;
  const int64_t len = max(int64_t(0), min(int64_t(kState8Block), table.size[entry] - lo));
  op.block(ptr, lo, len, table.index[entry], table.vector_ok[entry] != 0,
           int(threadIdx.x % kState8Lanes), maps);
}

template <class Opt, class P, class T, class S>
StepOp<Opt, P, T, S> step_op(const typename Opt::Hyper& h, const StepOptions& o,
                             const cuda::StepArrays& a) {
  return {Formula<Opt>::template coeffs<T>(h, o.step),
          a.loads,
          a.stores,
          o.grad_scale != 1.0,
          !(o.grad_clip == 1.0),
          T(o.grad_scale),
          T(o.grad_clip),
          a.grad_norm,
          a.grad_norm_dtype,
          a.max_grad_norm,
          a.grad_scale,
          a.found_inf,
          a.masked,
          o.stochastic,
          o.seed,
          o.step,
          a.master};
}

template <class Opt, class P, class T, class S>
void launch(const cuda::LaunchTables& t, const typename Opt::Hyper& h, const StepOptions& o,
            const cuda::StepArrays& a, cudaStream_t s) {
  cuda::launch_multi_tensor(Opt::name, t, step_op<Opt, P, T, S>(h, o, a), s);
}

// 8-bit state: float math and params of storage type P.
template <class Opt, class P>
void launch_state8(const cuda::LaunchTables& t, const typename Opt::Hyper& h, const StepOptions& o,
                   const cuda::StepArrays& a, cudaStream_t s) {
  using Op = State8StepOp<Opt, P>;
  Op op{step_op<Opt, P, float, float>(h, o, a), {state8_map(true), state8_map(false)}, {}};
  for (int r = 0; r < Opt::num_roles; ++r) op.is_signed[r] = !Opt::roles[r].nonnegative;
  cuda::launch_multi_tensor(Opt::name, t, op, s, state8_kernel<Op>);
}

// Params of storage type P with float math: float32, bfloat16 or 8-bit state.
template <class Opt, class P>
void launch_float(const cuda::LaunchTables& t, cuda::DType state, const typename Opt::Hyper& h,
                  const StepOptions& o, const cuda::StepArrays& a, cudaStream_t s) {
  if (state == cuda::DType::u8)
    launch_state8<Opt, P>(t, h, o, a, s);
  else if (state == cuda::DType::bf16)
    launch<Opt, P, float, __nv_bfloat16>(t, h, o, a, s);
  else
    launch<Opt, P, float, float>(t, h, o, a, s);
}

}  // namespace
FASTOPT_ISA_END

namespace fastopt {
namespace cuda {

template <class Opt>
void step(const LaunchTables& t, DType d, DType state, const typename Opt::Hyper& h,
          const StepOptions& o, const StepArrays& a, cudaStream_t stream) {
  using namespace fastopt::FASTOPT_ISA;
  switch (d) {
    case DType::f32: launch_float<Opt, float>(t, state, h, o, a, stream); break;
    case DType::f64: launch<Opt, double, double, double>(t, h, o, a, stream); break;
    case DType::f16: launch_float<Opt, __half>(t, state, h, o, a, stream); break;
    case DType::bf16: launch_float<Opt, __nv_bfloat16>(t, state, h, o, a, stream); break;
    default: throw std::invalid_argument("fastopt: optimizer params must be float arrays");
  }
}

}  // namespace cuda
}  // namespace fastopt

#define FASTOPT_CUDA_STEP(Opt)                                                              \
  template void fastopt::cuda::step<fastopt::Opt>(                                          \
      const fastopt::cuda::LaunchTables&, fastopt::cuda::DType, fastopt::cuda::DType,        \
      const fastopt::Opt::Hyper&, const fastopt::StepOptions&,                               \
      const fastopt::cuda::StepArrays&, cudaStream_t);
