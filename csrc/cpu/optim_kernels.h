// Entry points of the CPU optimizer kernels: step<Opt> for every optimizer of the registry.
// cpu/optim_step.h instantiates step<Opt> once per optimizer and ISA (namespaces isa_scalar
// and isa_avx2, one generated translation unit each); dispatch.cpp picks one at run time.
#pragma once
#include <cstdint>
#include "common/optim/registry.h"
#include "cpu/multi_tensor.h"

namespace fastopt {
namespace cpu {

// Element types of host arrays: optimizer params and grads may be any of the float types,
// their state is float32 for float16/bfloat16 params (the math runs in float32) and the
// params' type otherwise, or bfloat16 for any params but float64 (state_dtype="bfloat16":
// loaded exactly, the math in float32, stored rounded to nearest even), or u8 for any
// params but float64 (state_dtype="int8": 8-bit blockwise state, common/state8.h); u8 is
// also a masked step's masks (bool or uint8 bytes). Quantization and Newton use f32/f64 only.
enum class DType { f32, f64, f16, bf16, u8 };
inline DType state_dtype(DType d) { return d == DType::f64 ? DType::f64 : DType::f32; }
inline bool state_dtype_ok(DType params, DType state) {
  return state == state_dtype(params) ||
         ((state == DType::bf16 || state == DType::u8) && params != DType::f64);
}
inline int element_size(DType d) {
  return d == DType::f64 ? 8 : d == DType::f32 ? 4 : d == DType::u8 ? 1 : 2;
}
inline const char* dtype_name(DType d) {
  return d == DType::f32   ? "float32"
         : d == DType::f64 ? "float64"
         : d == DType::f16 ? "float16"
         : d == DType::u8  ? "uint8"
                           : "bfloat16";
}

#define FASTOPT_DECLARE_CPU_KERNELS(isa)                                                 \
  namespace isa {                                                                        \
  template <class Opt>                                                                   \
  void step(const TensorTable&, DType params, DType state, const typename Opt::Hyper&,   \
            const StepOptions&);                                                         \
  void add_inplace(const TensorTable&, DType);                                           \
  }
FASTOPT_DECLARE_CPU_KERNELS(isa_scalar)
FASTOPT_DECLARE_CPU_KERNELS(isa_avx2)
#undef FASTOPT_DECLARE_CPU_KERNELS

}  // namespace cpu
}  // namespace fastopt
