// CPU optimizer steps: SGD, Adagrad, RMSprop, Adam/AdamW over lists of tensors, one pass
// over memory (each param, grad and state element read once, state and param written once):
//   SGD-momentum 20 B/elem (fp32; 12 without momentum), Adagrad 20, RMSprop 20 (+8 per
//   momentum or centered buffer),
//   Adam 28 (+8 amsgrad), Sophia 24, EMA 12. Formulas: common/optim_formulas.h.
// Compiled once per ISA: FASTOPT_ISA_isa_avx2 gets the 8-float / 4-double vector body,
// FASTOPT_ISA_isa_scalar the plain loop (which the compiler may still vectorize with SSE2).
#include "cpu/optim_kernels.h"
#include "common/optim_formulas.h"
#include "cpu/multi_tensor.h"

FASTOPT_ISA_BEGIN
using cpu::TensorTable;
using cpu::DType;

template <class T> T* const* role(const TensorTable& t, int r) {
  return reinterpret_cast<T* const*>(t.ptrs[r]);
}

// One functor per optimizer: load the lanes a role list holds, apply the formula, store.
// anchor(i) is the pointer whose alignment the vector body follows (the param's).
template <class T> struct SgdKernel {
  SgdCoeffs<T> c;
  T* const* param; T* const* grad; T* const* momentum;
  const T* anchor(int i) const { return param[i]; }
  template <class L> void operator()(L, int i, int64_t j) const {
    using V = typename L::value;
    V p = L::load(param[i] + j), buf = V(T(0));
    if (c.has_momentum && !c.first_step) buf = L::load(momentum[i] + j);
    sgd_update(p, L::load(grad[i] + j), buf, c);
    L::store(param[i] + j, p);
    if (c.has_momentum) L::store(momentum[i] + j, buf);
  }
};

template <class T> struct AdagradKernel {
  AdagradCoeffs<T> c;
  T* const* param; T* const* grad; T* const* sum;
  const T* anchor(int i) const { return param[i]; }
  template <class L> void operator()(L, int i, int64_t j) const {
    using V = typename L::value;
    V p = L::load(param[i] + j), s = L::load(sum[i] + j);
    adagrad_update(p, L::load(grad[i] + j), s, c);
    L::store(param[i] + j, p);
    L::store(sum[i] + j, s);
  }
};

template <class T> struct RmspropKernel {
  RmspropCoeffs<T> c;
  T* const* param; T* const* grad; T* const* square_avg; T* const* momentum;
  T* const* grad_avg;
  const T* anchor(int i) const { return param[i]; }
  template <class L> void operator()(L, int i, int64_t j) const {
    using V = typename L::value;
    V p = L::load(param[i] + j), v = L::load(square_avg[i] + j), buf = V(T(0)),
      gavg = V(T(0));
    if (c.has_momentum) buf = L::load(momentum[i] + j);
    if (c.centered) gavg = L::load(grad_avg[i] + j);
    rmsprop_update(p, L::load(grad[i] + j), v, buf, gavg, c);
    L::store(param[i] + j, p);
    L::store(square_avg[i] + j, v);
    if (c.has_momentum) L::store(momentum[i] + j, buf);
    if (c.centered) L::store(grad_avg[i] + j, gavg);
  }
};

template <class T> struct AdamKernel {
  AdamCoeffs<T> c;
  T* const* param; T* const* grad; T* const* exp_avg; T* const* exp_avg_sq;
  T* const* max_exp_avg_sq;
  const T* anchor(int i) const { return param[i]; }
  template <class L> void operator()(L, int i, int64_t j) const {
    using V = typename L::value;
    V p = L::load(param[i] + j), m = L::load(exp_avg[i] + j), v = L::load(exp_avg_sq[i] + j);
    V vmax = c.amsgrad ? L::load(max_exp_avg_sq[i] + j) : v;
    adam_update(p, L::load(grad[i] + j), m, v, vmax, c);
    L::store(param[i] + j, p);
    L::store(exp_avg[i] + j, m);
    L::store(exp_avg_sq[i] + j, v);
    if (c.amsgrad) L::store(max_exp_avg_sq[i] + j, vmax);
  }
};

template <class T> struct SophiaKernel {
  SophiaCoeffs<T> c;
  T* const* param; T* const* grad; T* const* exp_avg; T* const* hessian;
  const T* anchor(int i) const { return param[i]; }
  template <class L> void operator()(L, int i, int64_t j) const {
    using V = typename L::value;
    V p = L::load(param[i] + j), m = L::load(exp_avg[i] + j);
    sophia_update(p, L::load(grad[i] + j), m, L::load(hessian[i] + j), c);
    L::store(param[i] + j, p);
    L::store(exp_avg[i] + j, m);
  }
};

template <class T> struct EmaKernel {
  EmaCoeffs<T> c;
  T* const* average; T* const* sample;
  const T* anchor(int i) const { return average[i]; }
  template <class L> void operator()(L, int i, int64_t j) const {
    using V = typename L::value;
    V x = L::load(average[i] + j);
    ema_update(x, L::load(sample[i] + j), c);
    L::store(average[i] + j, x);
  }
};

// dst += src: the bandwidth ceiling the benchmark compares against (12 B/elem fp32).
template <class T> struct AddKernel {
  T* const* dst; T* const* src;
  const T* anchor(int i) const { return dst[i]; }
  template <class L> void operator()(L, int i, int64_t j) const {
    L::store(dst[i] + j, L::load(dst[i] + j) + L::load(src[i] + j));
  }
};

template <class T> void run_sgd(const TensorTable& t, const SgdHyper& h, int64_t step) {
  SgdKernel<T> k{sgd_coeffs<T>(h, step), role<T>(t, kSgdParam), role<T>(t, kSgdGrad),
                 role<T>(t, kSgdMomentum)};
  run_multi_tensor<WideLane<T>, T>(t, k);
}
template <class T> void run_adagrad(const TensorTable& t, const AdagradHyper& h, int64_t step) {
  AdagradKernel<T> k{adagrad_coeffs<T>(h, step), role<T>(t, kAdagradParam),
                     role<T>(t, kAdagradGrad), role<T>(t, kAdagradSum)};
  run_multi_tensor<WideLane<T>, T>(t, k);
}
template <class T> void run_rmsprop(const TensorTable& t, const RmspropHyper& h) {
  RmspropKernel<T> k{rmsprop_coeffs<T>(h), role<T>(t, kRmsParam), role<T>(t, kRmsGrad),
                     role<T>(t, kRmsSquareAvg), role<T>(t, kRmsMomentum),
                     role<T>(t, kRmsGradAvg)};
  run_multi_tensor<WideLane<T>, T>(t, k);
}
template <class T> void run_adam(const TensorTable& t, const AdamHyper& h, int64_t step) {
  AdamKernel<T> k{adam_coeffs<T>(h, step), role<T>(t, kAdamParam), role<T>(t, kAdamGrad),
                  role<T>(t, kAdamExpAvg), role<T>(t, kAdamExpAvgSq),
                  role<T>(t, kAdamMaxExpAvgSq)};
  run_multi_tensor<WideLane<T>, T>(t, k);
}
template <class T> void run_sophia(const TensorTable& t, const SophiaHyper& h) {
  SophiaKernel<T> k{sophia_coeffs<T>(h), role<T>(t, kSophiaParam),
                    role<T>(t, kSophiaGrad), role<T>(t, kSophiaExpAvg),
                    role<T>(t, kSophiaHessian)};
  run_multi_tensor<WideLane<T>, T>(t, k);
}
template <class T> void run_ema(const TensorTable& t, double beta) {
  EmaKernel<T> k{{T(beta), T(1.0 - beta)}, role<T>(t, kEmaAverage),
                 role<T>(t, kEmaSample)};
  run_multi_tensor<WideLane<T>, T>(t, k);
}
template <class T> void run_add(const TensorTable& t) {
  run_multi_tensor<WideLane<T>, T>(t, AddKernel<T>{role<T>(t, kAddDst), role<T>(t, kAddSrc)});
}

#define FASTOPT_BY_DTYPE(dtype, fn, ...) \
  ((dtype) == DType::f32 ? fn<float>(__VA_ARGS__) : fn<double>(__VA_ARGS__))

FASTOPT_ISA_END

// Entry points, one set per ISA (declared in cpu/optim_kernels.h).
namespace fastopt {
namespace cpu {
namespace FASTOPT_ISA {
using fastopt::FASTOPT_ISA::run_sgd;
using fastopt::FASTOPT_ISA::run_adagrad;
using fastopt::FASTOPT_ISA::run_rmsprop;
using fastopt::FASTOPT_ISA::run_adam;
using fastopt::FASTOPT_ISA::run_add;
using fastopt::FASTOPT_ISA::run_ema;
using fastopt::FASTOPT_ISA::run_sophia;

void sgd(const TensorTable& t, DType d, const SgdHyper& h, int64_t step) {
  FASTOPT_BY_DTYPE(d, run_sgd, t, h, step);
}
void adagrad(const TensorTable& t, DType d, const AdagradHyper& h, int64_t step) {
  FASTOPT_BY_DTYPE(d, run_adagrad, t, h, step);
}
void rmsprop(const TensorTable& t, DType d, const RmspropHyper& h) {
  FASTOPT_BY_DTYPE(d, run_rmsprop, t, h);
}
void adam(const TensorTable& t, DType d, const AdamHyper& h, int64_t step) {
  FASTOPT_BY_DTYPE(d, run_adam, t, h, step);
}
void sophia(const TensorTable& t, DType d, const SophiaHyper& h) {
  FASTOPT_BY_DTYPE(d, run_sophia, t, h);
}
void ema(const TensorTable& t, DType d, double beta) { FASTOPT_BY_DTYPE(d, run_ema, t, beta); }
void add_inplace(const TensorTable& t, DType d) { FASTOPT_BY_DTYPE(d, run_add, t); }

}  // namespace FASTOPT_ISA
}  // namespace cpu
}  // namespace fastopt
