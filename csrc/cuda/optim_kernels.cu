// CUDA optimizer steps over lists of tensors, one pass over memory, the same bytes per
// element as the CPU kernels (cpu/optim_kernels.cpp): AdamW fp32 28 B, SGD-momentum 20,
// Adagrad 20, RMSprop 20 (+8 per momentum or centered buffer), Sophia 24, EMA 12; 16-bit
// params and grads move 2 B instead of 4 each. The formulas are common/optim_formulas.h,
// compiled without FMA contraction (--fmad=false), so float32/float64 results are
// bit-identical to the CPU kernels.
#include "common/optim_formulas.h"
#include "cuda/multi_tensor.cuh"
#include "cuda/optim_kernels.h"

FASTOPT_ISA_BEGIN
namespace {

using cuda::load;
using cuda::store;

// P: storage type of params and grads; T: math and state type.
template <class P> __device__ __forceinline__ P* as(void* const* ptr, int role) {
  return static_cast<P*>(ptr[role]);
}

template <class P, class T> struct SgdOp {
  SgdCoeffs<T> c;
  template <int W> __device__ void apply(void* const* ptr, int64_t j) const {
    T p[W], g[W], buf[W] = {};
    load<W>(p, as<P>(ptr, kSgdParam) + j);
    load<W>(g, as<const P>(ptr, kSgdGrad) + j);
    if (c.has_momentum && !c.first_step) load<W>(buf, as<T>(ptr, kSgdMomentum) + j);
#pragma unroll
    for (int w = 0; w < W; ++w) sgd_update(p[w], g[w], buf[w], c);
    store<W>(as<P>(ptr, kSgdParam) + j, p);
    if (c.has_momentum) store<W>(as<T>(ptr, kSgdMomentum) + j, buf);
  }
};

template <class P, class T> struct AdagradOp {
  AdagradCoeffs<T> c;
  template <int W> __device__ void apply(void* const* ptr, int64_t j) const {
    T p[W], g[W], sum[W];
    load<W>(p, as<P>(ptr, kAdagradParam) + j);
    load<W>(g, as<const P>(ptr, kAdagradGrad) + j);
    load<W>(sum, as<T>(ptr, kAdagradSum) + j);
#pragma unroll
    for (int w = 0; w < W; ++w) adagrad_update(p[w], g[w], sum[w], c);
    store<W>(as<P>(ptr, kAdagradParam) + j, p);
    store<W>(as<T>(ptr, kAdagradSum) + j, sum);
  }
};

template <class P, class T> struct RmspropOp {
  RmspropCoeffs<T> c;
  template <int W> __device__ void apply(void* const* ptr, int64_t j) const {
    T p[W], g[W], v[W], buf[W] = {}, gavg[W] = {};
    load<W>(p, as<P>(ptr, kRmsParam) + j);
    load<W>(g, as<const P>(ptr, kRmsGrad) + j);
    load<W>(v, as<T>(ptr, kRmsSquareAvg) + j);
    if (c.has_momentum) load<W>(buf, as<T>(ptr, kRmsMomentum) + j);
    if (c.centered) load<W>(gavg, as<T>(ptr, kRmsGradAvg) + j);
#pragma unroll
    for (int w = 0; w < W; ++w) rmsprop_update(p[w], g[w], v[w], buf[w], gavg[w], c);
    store<W>(as<P>(ptr, kRmsParam) + j, p);
    store<W>(as<T>(ptr, kRmsSquareAvg) + j, v);
    if (c.has_momentum) store<W>(as<T>(ptr, kRmsMomentum) + j, buf);
    if (c.centered) store<W>(as<T>(ptr, kRmsGradAvg) + j, gavg);
  }
};

template <class P, class T> struct AdamOp {
  AdamCoeffs<T> c;
  template <int W> __device__ void apply(void* const* ptr, int64_t j) const {
    T p[W], g[W], m[W], v[W], vmax[W] = {};
    load<W>(p, as<P>(ptr, kAdamParam) + j);
    load<W>(g, as<const P>(ptr, kAdamGrad) + j);
    load<W>(m, as<T>(ptr, kAdamExpAvg) + j);
    load<W>(v, as<T>(ptr, kAdamExpAvgSq) + j);
    if (c.amsgrad) load<W>(vmax, as<T>(ptr, kAdamMaxExpAvgSq) + j);
#pragma unroll
    for (int w = 0; w < W; ++w) adam_update(p[w], g[w], m[w], v[w], vmax[w], c);
    store<W>(as<P>(ptr, kAdamParam) + j, p);
    store<W>(as<T>(ptr, kAdamExpAvg) + j, m);
    store<W>(as<T>(ptr, kAdamExpAvgSq) + j, v);
    if (c.amsgrad) store<W>(as<T>(ptr, kAdamMaxExpAvgSq) + j, vmax);
  }
};

template <class P, class T> struct SophiaOp {
  SophiaCoeffs<T> c;
  template <int W> __device__ void apply(void* const* ptr, int64_t j) const {
    T p[W], g[W], m[W], h[W];
    load<W>(p, as<P>(ptr, kSophiaParam) + j);
    load<W>(g, as<const P>(ptr, kSophiaGrad) + j);
    load<W>(m, as<T>(ptr, kSophiaExpAvg) + j);
    load<W>(h, as<const T>(ptr, kSophiaHessian) + j);
#pragma unroll
    for (int w = 0; w < W; ++w) sophia_update(p[w], g[w], m[w], h[w], c);
    store<W>(as<P>(ptr, kSophiaParam) + j, p);
    store<W>(as<T>(ptr, kSophiaExpAvg) + j, m);
  }
};

// average <- beta*average + (1-beta)*sample; both of the call's element type.
template <class P, class T> struct EmaOp {
  EmaCoeffs<T> c;
  template <int W> __device__ void apply(void* const* ptr, int64_t j) const {
    T x[W], y[W];
    load<W>(x, as<P>(ptr, kEmaAverage) + j);
    load<W>(y, as<const P>(ptr, kEmaSample) + j);
#pragma unroll
    for (int w = 0; w < W; ++w) ema_update(x[w], y[w], c);
    store<W>(as<P>(ptr, kEmaAverage) + j, x);
  }
};

// Calls fn<P, T>() for the params' storage type P and math type T.
template <template <class, class> class Fn, class... Args>
void by_dtype(cuda::DType d, Args&&... args) {
  switch (d) {
    case cuda::DType::f32: Fn<float, float>::run(args...); break;
    case cuda::DType::f64: Fn<double, double>::run(args...); break;
    case cuda::DType::f16: Fn<__half, float>::run(args...); break;
    case cuda::DType::bf16: Fn<__nv_bfloat16, float>::run(args...); break;
    default: throw std::invalid_argument("fastopt: optimizer params must be float arrays");
  }
}

template <class P, class T> struct RunSgd {
  static void run(const cuda::LaunchTables& t, const SgdHyper& h, int64_t step, cudaStream_t s) {
    cuda::launch_multi_tensor("sgd", t, SgdOp<P, T>{sgd_coeffs<T>(h, step)}, s);
  }
};
template <class P, class T> struct RunAdagrad {
  static void run(const cuda::LaunchTables& t, const AdagradHyper& h, int64_t step, cudaStream_t s) {
    cuda::launch_multi_tensor("adagrad", t, AdagradOp<P, T>{adagrad_coeffs<T>(h, step)}, s);
  }
};
template <class P, class T> struct RunRmsprop {
  static void run(const cuda::LaunchTables& t, const RmspropHyper& h, cudaStream_t s) {
    cuda::launch_multi_tensor("rmsprop", t, RmspropOp<P, T>{rmsprop_coeffs<T>(h)}, s);
  }
};
template <class P, class T> struct RunAdam {
  static void run(const cuda::LaunchTables& t, const AdamHyper& h, int64_t step, cudaStream_t s) {
    cuda::launch_multi_tensor("adam", t, AdamOp<P, T>{adam_coeffs<T>(h, step)}, s);
  }
};
template <class P, class T> struct RunSophia {
  static void run(const cuda::LaunchTables& t, const SophiaHyper& h, cudaStream_t s) {
    cuda::launch_multi_tensor("sophia", t, SophiaOp<P, T>{sophia_coeffs<T>(h)}, s);
  }
};
template <class P, class T> struct RunEma {
  static void run(const cuda::LaunchTables& t, double beta, cudaStream_t s) {
    cuda::launch_multi_tensor("ema", t, EmaOp<P, T>{{T(beta), T(1.0 - beta)}}, s);
  }
};

}  // namespace
FASTOPT_ISA_END

namespace fastopt {
namespace cuda {

void sgd(const LaunchTables& t, DType d, const SgdHyper& h, int64_t step, cudaStream_t s) {
  by_dtype<RunSgd>(d, t, h, step, s);
}
void adagrad(const LaunchTables& t, DType d, const AdagradHyper& h, int64_t step, cudaStream_t s) {
  by_dtype<RunAdagrad>(d, t, h, step, s);
}
void rmsprop(const LaunchTables& t, DType d, const RmspropHyper& h, cudaStream_t s) {
  by_dtype<RunRmsprop>(d, t, h, s);
}
void adam(const LaunchTables& t, DType d, const AdamHyper& h, int64_t step, cudaStream_t s) {
  by_dtype<RunAdam>(d, t, h, step, s);
}
void sophia(const LaunchTables& t, DType d, const SophiaHyper& h, cudaStream_t s) {
  by_dtype<RunSophia>(d, t, h, s);
}
void ema(const LaunchTables& t, DType d, double beta, cudaStream_t s) {
  by_dtype<RunEma>(d, t, beta, s);
}

}  // namespace cuda
}  // namespace fastopt
