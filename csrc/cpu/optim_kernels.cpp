// CPU optimizer steps over lists of tensors, one pass over memory: each element of every
// role a call uses is read once and (if the role is written) written once; the bytes per
// element of each optimizer are in its header, common/optim/<name>.h, with its formula.
// One generic functor serves every optimizer of common/optim/registry.h.
// Compiled once per ISA: FASTOPT_ISA_isa_avx2 gets the 8-float / 4-double vector body,
// FASTOPT_ISA_isa_scalar the plain loop (which the compiler may still vectorize with SSE2).
#include "cpu/optim_kernels.h"
#include <stdexcept>
#include <type_traits>
#include "cpu/multi_tensor.h"

FASTOPT_ISA_BEGIN
using cpu::DType;
using cpu::TensorTable;

// The one functor: load the lanes of every role the call uses, apply the formula, store
// the written roles. P is the storage type of the params and grads (float, double, or a
// 16-bit type), T the math and state type. anchor(i) is the pointer whose alignment the
// vector body follows (the params'). Required roles are always loaded (the test folds
// away); optional ones are used when the call passed their arrays, and loaded unless
// fresh this step. With a grad scale (GradScaler's), the grads are divided by it first.
// Masked (a mask byte per element): where the mask is 0 the param is stored as 0 and
// every other written role as it was loaded (a masked call loads fresh roles too).
template <class Opt, class P, class T, bool Masked> struct StepKernel {
  using F = Formula<Opt>;
  static constexpr int N = Opt::num_roles;
  typename F::template Coeffs<T> c;
  void* const* ptr[N];
  const uint8_t* const* masks;
  bool load[N], store[N];
  bool scale_grads;
  T grad_scale;
  const P* anchor(int i) const { return static_cast<const P*>(ptr[0][i]); }
  // Always inlined: the loop over roles makes it large enough for GCC to keep it out of
  // line otherwise, a call per vector (a quarter more instructions per element).
  template <class L> FASTOPT_HD void operator()(L, int i, int64_t j) const {
    using V = typename L::value;
    V x[N];
    for_each_role<N>([&](auto role_index) {
      constexpr int r = decltype(role_index)::value;
      constexpr Role role = Opt::roles[r];
      using Storage = std::conditional_t<role.kind == RoleKind::state, T, P>;
      x[r] = (!role.optional || load[r]) ? L::load(static_cast<const Storage*>(ptr[r][i]) + j)
                                         : V(T(0));
      if (role.kind == RoleKind::grad && scale_grads) x[r] = x[r] / V(grad_scale);
    });
    if constexpr (Masked) {
      V old[N];
      for (int r = 0; r < N; ++r) old[r] = x[r];
      F::update(x, c);
      const typename L::keep_type keep = L::load_keep(masks[i] + j);
      for_each_role<N>([&](auto role_index) {
        constexpr int r = decltype(role_index)::value;
        if constexpr (Opt::roles[r].written)
          x[r] = L::select(keep, x[r], Opt::roles[r].kind == RoleKind::param ? V(T(0)) : old[r]);
      });
    } else {
      F::update(x, c);
    }
    for_each_role<N>([&](auto role_index) {
      constexpr int r = decltype(role_index)::value;
      constexpr Role role = Opt::roles[r];
      using Storage = std::conditional_t<role.kind == RoleKind::state, T, P>;
      if (role.written && (!role.optional || store[r]))
        L::store(static_cast<Storage*>(ptr[r][i]) + j, x[r]);
    });
  }
};

template <class Opt, class P, class T, bool Masked>
void run_step(const TensorTable& t, const typename Opt::Hyper& h, int64_t step,
              double grad_scale) {
  StepKernel<Opt, P, T, Masked> k{Formula<Opt>::template coeffs<T>(h, step),
                                  {},
                                  reinterpret_cast<const uint8_t* const*>(t.ptrs[cpu::kMaskSlot]),
                                  {},
                                  {},
                                  grad_scale != 1.0,
                                  T(grad_scale)};
  for (int r = 0; r < Opt::num_roles; ++r) {
    k.ptr[r] = t.ptrs[r];
    k.store[r] = t.ptrs[r] != nullptr;
    k.load[r] = k.store[r] && (Masked || !(t.fresh >> r & 1u));
  }
  run_multi_tensor<WideLane<T>, T>(t, k);
}

template <class Opt, class P, class T>
void run_step(const TensorTable& t, const typename Opt::Hyper& h, int64_t step,
              double grad_scale) {
  if (t.ptrs[cpu::kMaskSlot]) run_step<Opt, P, T, true>(t, h, step, grad_scale);
  else run_step<Opt, P, T, false>(t, h, step, grad_scale);
}

// dst += src: the bandwidth ceiling the benchmark compares against (12 B/elem fp32).
template <class T> struct AddKernel {
  T* const* dst;
  T* const* src;
  const T* anchor(int i) const { return dst[i]; }
  template <class L> void operator()(L, int i, int64_t j) const {
    L::store(dst[i] + j, L::load(dst[i] + j) + L::load(src[i] + j));
  }
};

template <class T> void run_add(const TensorTable& t) {
  run_multi_tensor<WideLane<T>, T>(
      t, AddKernel<T>{reinterpret_cast<T* const*>(t.ptrs[0]), reinterpret_cast<T* const*>(t.ptrs[1])});
}

FASTOPT_ISA_END

// Entry points, one set per ISA (declared in cpu/optim_kernels.h).
namespace fastopt {
namespace cpu {
namespace FASTOPT_ISA {

template <class Opt>
void step(const TensorTable& t, DType d, const typename Opt::Hyper& h, int64_t s,
          double grad_scale) {
  using fastopt::FASTOPT_ISA::run_step;
  switch (d) {
    case DType::f32: run_step<Opt, float, float>(t, h, s, grad_scale); break;
    case DType::f64: run_step<Opt, double, double>(t, h, s, grad_scale); break;
    case DType::f16: run_step<Opt, float16, float>(t, h, s, grad_scale); break;
    case DType::bf16: run_step<Opt, bfloat16, float>(t, h, s, grad_scale); break;
    case DType::u8: throw std::invalid_argument("fastopt: optimizer params must be float arrays");
  }
}
#define FASTOPT_INSTANTIATE(Opt) \
  template void step<Opt>(const TensorTable&, DType, const Opt::Hyper&, int64_t, double);
FASTOPT_OPTIMIZERS(FASTOPT_INSTANTIATE)
#undef FASTOPT_INSTANTIATE

void add_inplace(const TensorTable& t, DType d) {
  if (d == DType::f32) fastopt::FASTOPT_ISA::run_add<float>(t);
  else fastopt::FASTOPT_ISA::run_add<double>(t);
}

}  // namespace FASTOPT_ISA
}  // namespace cpu
}  // namespace fastopt
