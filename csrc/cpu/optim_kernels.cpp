// CPU optimizer steps over lists of tensors, one pass over memory: each element of every
// role a call uses is read once and (if the role is written) written once; the bytes per
// element of each optimizer are in its header, common/optim/<name>.h, with its formula.
// One generic functor serves every optimizer of common/optim/registry.h.
// Compiled once per ISA: FASTOPT_ISA_isa_avx2 gets the 8-float / 4-double vector body,
// FASTOPT_ISA_isa_scalar the plain loop (which the compiler may still vectorize with SSE2).
#include "cpu/optim_kernels.h"
#include "cpu/multi_tensor.h"

FASTOPT_ISA_BEGIN
using cpu::DType;
using cpu::TensorTable;

// The one functor: load the lanes of every role the call uses, apply the formula, store
// the written roles. anchor(i) is the pointer whose alignment the vector body follows
// (the params'). Required roles are always loaded (the test folds away); optional ones
// are used when the call passed their arrays, and loaded unless fresh this step.
template <class Opt, class T> struct StepKernel {
  using F = Formula<Opt>;
  static constexpr int N = Opt::num_roles;
  typename F::template Coeffs<T> c;
  T* const* ptr[N];
  bool load[N], store[N];
  const T* anchor(int i) const { return ptr[0][i]; }
  template <class L> void operator()(L, int i, int64_t j) const {
    using V = typename L::value;
    V x[N];
    for_each_role<N>([&](auto role_index) {
      constexpr int r = decltype(role_index)::value;
      constexpr Role role = Opt::roles[r];
      x[r] = (!role.optional || load[r]) ? L::load(ptr[r][i] + j) : V(T(0));
    });
    F::update(x, c);
    for_each_role<N>([&](auto role_index) {
      constexpr int r = decltype(role_index)::value;
      constexpr Role role = Opt::roles[r];
      if (role.written && (!role.optional || store[r])) L::store(ptr[r][i] + j, x[r]);
    });
  }
};

template <class Opt, class T>
void run_step(const TensorTable& t, const typename Opt::Hyper& h, int64_t step) {
  StepKernel<Opt, T> k{Formula<Opt>::template coeffs<T>(h, step), {}, {}, {}};
  for (int r = 0; r < Opt::num_roles; ++r) {
    k.ptr[r] = reinterpret_cast<T* const*>(t.ptrs[r]);
    k.store[r] = t.ptrs[r] != nullptr;
    k.load[r] = k.store[r] && !(t.fresh >> r & 1u);
  }
  run_multi_tensor<WideLane<T>, T>(t, k);
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
void step(const TensorTable& t, DType d, const typename Opt::Hyper& h, int64_t s) {
  if (d == DType::f32) fastopt::FASTOPT_ISA::run_step<Opt, float>(t, h, s);
  else fastopt::FASTOPT_ISA::run_step<Opt, double>(t, h, s);
}
#define FASTOPT_INSTANTIATE(Opt) \
  template void step<Opt>(const TensorTable&, DType, const Opt::Hyper&, int64_t);
FASTOPT_OPTIMIZERS(FASTOPT_INSTANTIATE)
#undef FASTOPT_INSTANTIATE

void add_inplace(const TensorTable& t, DType d) {
  if (d == DType::f32) fastopt::FASTOPT_ISA::run_add<float>(t);
  else fastopt::FASTOPT_ISA::run_add<double>(t);
}

}  // namespace FASTOPT_ISA
}  // namespace cpu
}  // namespace fastopt
