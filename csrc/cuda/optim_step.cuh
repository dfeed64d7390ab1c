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
#include "common/optim/registry.h"
#include "common/rounding.h"
#include "cuda/multi_tensor.cuh"
#include "cuda/optim_kernels.h"

FASTOPT_ISA_BEGIN
namespace {

// P: storage type of params and grads; T: math type; S: the state's storage type (T, or
// bfloat16 for T = float: loaded exactly, stored rounded to nearest even). Bit r of loads / stores:
// the call reads / writes role r (optional roles the options leave unused are neither).
// With a grad scale (GradScaler's), the grads are divided by it as they are loaded.
// Stochastic (bfloat16 params): the params are rounded stochastically, keyed by (seed,
// step, tensor, element) as on the CPU (common/rounding.h).
// Masked (a mask byte per element, ptr[kMaskSlot]): where the mask is 0 the param is
// stored as 0 and every other written role as it was loaded (masked calls load them all).
template <class Opt, class P, class T, class S> struct StepOp {
  using F = Formula<Opt>;
  static constexpr int N = Opt::num_roles;
  typename F::template Coeffs<T> c;
  unsigned loads, stores;
  bool scale_grads, clip_grads;
  T grad_scale, grad_clip;
  bool masked;
  bool stochastic;
  uint64_t seed;
  int64_t step;

  template <int W> __device__ void apply(void* const* ptr, int64_t j, int32_t tensor) const {
    T x[N][W];
    for_each_role<N>([&](auto role_index) {
      constexpr int r = decltype(role_index)::value;
      constexpr Role role = Opt::roles[r];
      if (!role.optional || (loads >> r & 1u)) {
        if constexpr (role.kind == RoleKind::state)
          cuda::load<W>(x[r], static_cast<const S*>(ptr[r]) + j);
        else
          cuda::load<W>(x[r], static_cast<const P*>(ptr[r]) + j);
      } else {
#pragma unroll
        for (int w = 0; w < W; ++w) x[r][w] = T(0);
      }
      if constexpr (role.kind == RoleKind::grad) {
        if (scale_grads) {
#pragma unroll
          for (int w = 0; w < W; ++w) x[r][w] = x[r][w] / grad_scale;
        }
        if (clip_grads) {
#pragma unroll
          for (int w = 0; w < W; ++w) x[r][w] = x[r][w] * grad_clip;
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
          cuda::store<W>(static_cast<S*>(ptr[r]) + j, x[r]);
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
      }
    });
  }
};

template <class Opt, class P, class T, class S>
void launch(const cuda::LaunchTables& t, const typename Opt::Hyper& h, const StepOptions& o,
            unsigned loads, unsigned stores, bool masked, cudaStream_t s) {
  const StepOp<Opt, P, T, S> op{Formula<Opt>::template coeffs<T>(h, o.step),
                                loads,
                                stores,
                                o.grad_scale != 1.0,
                                !(o.grad_clip == 1.0),
                                T(o.grad_scale),
                                T(o.grad_clip),
                                masked,
                                o.stochastic,
                                o.seed,
                                o.step};
  cuda::launch_multi_tensor(Opt::name, t, op, s);
}

// Params of storage type P with float math: float32 or bfloat16 state.
template <class Opt, class P>
void launch_float(const cuda::LaunchTables& t, cuda::DType state, const typename Opt::Hyper& h,
                  const StepOptions& o, unsigned loads, unsigned stores, bool masked,
                  cudaStream_t s) {
  if (state == cuda::DType::bf16)
    launch<Opt, P, float, __nv_bfloat16>(t, h, o, loads, stores, masked, s);
  else
    launch<Opt, P, float, float>(t, h, o, loads, stores, masked, s);
}

}  // namespace
FASTOPT_ISA_END

namespace fastopt {
namespace cuda {

template <class Opt>
void step(const LaunchTables& t, DType d, DType state, const typename Opt::Hyper& h,
          const StepOptions& o, unsigned loads, unsigned stores, bool masked,
          cudaStream_t stream) {
  using namespace fastopt::FASTOPT_ISA;
  switch (d) {
    case DType::f32: launch_float<Opt, float>(t, state, h, o, loads, stores, masked, stream); break;
    case DType::f64:
      launch<Opt, double, double, double>(t, h, o, loads, stores, masked, stream);
      break;
    case DType::f16: launch_float<Opt, __half>(t, state, h, o, loads, stores, masked, stream); break;
    case DType::bf16:
      launch_float<Opt, __nv_bfloat16>(t, state, h, o, loads, stores, masked, stream);
      break;
    default: throw std::invalid_argument("fastopt: optimizer params must be float arrays");
  }
}

}  // namespace cuda
}  // namespace fastopt

#define FASTOPT_CUDA_STEP(Opt)                                                              \
  template void fastopt::cuda::step<fastopt::Opt>(                                          \
      const fastopt::cuda::LaunchTables&, fastopt::cuda::DType, fastopt::cuda::DType,        \
      const fastopt::Opt::Hyper&, const fastopt::StepOptions&, unsigned, unsigned, bool,     \
      cudaStream_t);
