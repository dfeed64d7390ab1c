// Run-time choice of the CPU code path and thread count.
#pragma once
#include <string>
#include "cpu/adafactor_kernels.h"
#include "cpu/clip_kernels.h"
#include "cpu/newton_kernels.h"
#include "cpu/optim_kernels.h"
#include "cpu/prune_kernels.h"
#include "cpu/quant_kernels.h"

namespace fastopt {
namespace cpu {

enum class Isa { scalar, avx2 };

bool cpu_has_avx2();            // AVX2, FMA and F16C, as reported by the CPU
Isa active_isa();
// "scalar", "avx2" or "auto" (the best the CPU supports); throws std::invalid_argument if
// the CPU cannot run the requested path. (The Python package applies FASTOPT_CPU at import.)
void set_isa(const std::string& name);
const char* isa_name(Isa isa);

int num_threads();              // defaults to OpenMP's (OMP_NUM_THREADS, else all cores)
// Throws std::invalid_argument outside [1, 64 per core] (libgomp aborts on absurd counts).
void set_num_threads(int64_t n);

// Optimizer Opt's step with the active ISA and the thread count filled into the table
// (instantiated for every optimizer of common/optim/registry.h).
template <class Opt>
void step(TensorTable t, DType params, DType state, const typename Opt::Hyper&,
          const StepOptions&);
void add_inplace(TensorTable t, DType);

// Gradient clipping (see clip_kernels.h): the norm's total over role 0, and g <- g * c.
double grad_norm_total(TensorTable t, DType, NormKind, double norm_type);
void scale_grads(TensorTable t, DType, double coefficient);

// Adafactor over n params (see adafactor_kernels.h), param by param.
void adafactor_step(DType, const AdafactorParam* params, int64_t n, const AdafactorHyper&);

// Batched damped Cholesky solve and Newton update (see newton_kernels.h).
void newton_solve(DType, const void* H, const void* g, void* d, bool* solved, int64_t batch,
                  int64_t n, double damping);
void newton_apply(DType, void* p, const void* d, const bool* use, int64_t batch, int64_t n,
                  double lr);

// int8 quantization (see quant_kernels.h).
void quantize_affine(InType, const void* x, void* q, bool unsigned_q, ChannelLayout,
                     const float* scales, const float* zero_points, int64_t* first_bad);
void dequantize_affine(const void* q, bool unsigned_q, OutType, void* x, ChannelLayout,
                       const float* scales, const float* zero_points);
void minmax(InType, const void* x, ChannelLayout, float* mins, float* maxs, int64_t* first_bad);
void quantize_blockwise(InType, const void* x, int8_t* q, float* absmax, int64_t n,
                        int64_t block, bool stochastic, uint64_t seed, int64_t* first_bad);
void dequantize_blockwise(const int8_t* q, const float* absmax, OutType, void* x, int64_t n,
                          int64_t block);

// Magnitude pruning masks (see prune_kernels.h).
void prune_magnitude(const PruneTable& t, DType dtype);
void prune_n_m(const PruneTable& t, DType dtype, int n, int m);

}  // namespace cpu
}  // namespace fastopt
