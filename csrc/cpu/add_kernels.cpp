// dst += src over lists of tensors: the bandwidth ceiling the benchmark compares the
// optimizer steps against (12 B/elem fp32). Compiled once per ISA, as the steps.
#include "cpu/multi_tensor.h"
#include "cpu/optim_kernels.h"

FASTOPT_ISA_BEGIN
using cpu::TensorTable;

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

namespace fastopt {
namespace cpu {
namespace FASTOPT_ISA {

void add_inplace(const TensorTable& t, DType d) {
  if (d == DType::f32) fastopt::FASTOPT_ISA::run_add<float>(t);
  else fastopt::FASTOPT_ISA::run_add<double>(t);
}

}  // namespace FASTOPT_ISA
}  // namespace cpu
}  // namespace fastopt
