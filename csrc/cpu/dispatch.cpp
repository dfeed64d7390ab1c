#include "cpu/dispatch.h"
#include <atomic>
#include <stdexcept>
#include <string>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastopt {
namespace cpu {
namespace {

std::atomic<int> g_num_threads{0};  // 0 = not yet initialised

Isa best_isa() { return cpu_has_avx2() ? Isa::avx2 : Isa::scalar; }

std::atomic<Isa> g_isa{best_isa()};

}  // namespace

bool cpu_has_avx2() {
#ifdef FASTOPT_HAVE_AVX2  // the AVX2 kernels are built only on x86-64 (CMakeLists.txt)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

Isa active_isa() { return g_isa.load(std::memory_order_relaxed); }

const char* isa_name(Isa isa) { return isa == Isa::avx2 ? "avx2" : "scalar"; }

void set_isa(const std::string& name) {
  if (name == "auto") {
    g_isa = best_isa();
  } else if (name == "scalar") {
    g_isa = Isa::scalar;
  } else if (name == "avx2") {
    if (!cpu_has_avx2()) throw std::invalid_argument("this CPU does not support AVX2+FMA");
    g_isa = Isa::avx2;
  } else {
    throw std::invalid_argument("unknown CPU path '" + name + "' (scalar, avx2 or auto)");
  }
}

int num_threads() {
  int n = g_num_threads.load(std::memory_order_relaxed);
  if (n > 0) return n;
#ifdef _OPENMP
  n = omp_get_max_threads();
#else
  n = 1;
#endif
  g_num_threads = n;
  return n;
}

void set_num_threads(int64_t n) {
#ifdef _OPENMP
  const int64_t most = 64 * int64_t(omp_get_num_procs());  // more is a mistake: libgomp aborts
#else
  const int64_t most = 1;
#endif
  if (n < 1 || n > most)
    throw std::invalid_argument("number of threads must be in [1, " + std::to_string(most) +
                                "], got " + std::to_string(n));
  g_num_threads = int(n);
}

// Calls fn of the active ISA.
#ifdef FASTOPT_HAVE_AVX2
#define FASTOPT_ISA_CALL(fn, ...) \
  (active_isa() == Isa::avx2 ? isa_avx2::fn(__VA_ARGS__) : isa_scalar::fn(__VA_ARGS__))
#else  // set_isa refuses "avx2" here (cpu_has_avx2() is false), so the scalar path is the only one
#define FASTOPT_ISA_CALL(fn, ...) isa_scalar::fn(__VA_ARGS__)
#endif

// Optimizer kernels take the thread count in their table.
template <class Opt>
void step(TensorTable t, DType d, DType state, const typename Opt::Hyper& h,
          const StepOptions& o) {
  t.num_threads = num_threads();
  FASTOPT_ISA_CALL(step<Opt>, t, d, state, h, o);
}
#define FASTOPT_INSTANTIATE(Opt) \
  template void step<Opt>(TensorTable, DType, DType, const Opt::Hyper&, const StepOptions&);
FASTOPT_OPTIMIZERS(FASTOPT_INSTANTIATE)
#undef FASTOPT_INSTANTIATE

void add_inplace(TensorTable t, DType d) {
  t.num_threads = num_threads();
  FASTOPT_ISA_CALL(add_inplace, t, d);
}

double grad_norm_total(TensorTable t, DType d, NormKind k, double norm_type) {
  t.num_threads = num_threads();
  return FASTOPT_ISA_CALL(grad_norm_total, t, d, k, norm_type);
}
void scale_grads(TensorTable t, DType d, double coefficient) {
  t.num_threads = num_threads();
  FASTOPT_ISA_CALL(scale_grads, t, d, coefficient);
}

void adafactor_step(DType d, const AdafactorParam* params, int64_t n, const AdafactorHyper& h) {
  FASTOPT_ISA_CALL(adafactor_step, d, params, n, h, num_threads());
}

void newton_solve(DType dt, const void* H, const void* g, void* d, bool* solved, int64_t batch,
                  int64_t n, double damping) {
  FASTOPT_ISA_CALL(newton_solve, dt, H, g, d, solved, batch, n, damping, num_threads());
}
void newton_apply(DType dt, void* p, const void* d, const bool* use, int64_t batch, int64_t n,
                  double lr) {
  FASTOPT_ISA_CALL(newton_apply, dt, p, d, use, batch, n, lr, num_threads());
}

void quantize_affine(InType in, const void* x, void* q, bool unsigned_q, ChannelLayout L,
                     const float* scales, const float* zero_points, int64_t* first_bad) {
  FASTOPT_ISA_CALL(quantize_affine, in, x, q, unsigned_q, L, scales, zero_points, first_bad,
                   num_threads());
}
void dequantize_affine(const void* q, bool unsigned_q, OutType out, void* x, ChannelLayout L,
                       const float* scales, const float* zero_points) {
  FASTOPT_ISA_CALL(dequantize_affine, q, unsigned_q, out, x, L, scales, zero_points,
                   num_threads());
}
void minmax(InType in, const void* x, ChannelLayout L, float* mins, float* maxs,
            int64_t* first_bad) {
  FASTOPT_ISA_CALL(minmax, in, x, L, mins, maxs, first_bad, num_threads());
}
void quantize_blockwise(InType in, const void* x, int8_t* q, float* absmax, int64_t n,
                        int64_t block, bool stochastic, uint64_t seed, int64_t* first_bad) {
  FASTOPT_ISA_CALL(quantize_blockwise, in, x, q, absmax, n, block, stochastic, seed, first_bad,
                   num_threads());
}
void dequantize_blockwise(const int8_t* q, const float* absmax, OutType out, void* x, int64_t n,
                          int64_t block) {
  FASTOPT_ISA_CALL(dequantize_blockwise, q, absmax, out, x, n, block, num_threads());
}

void prune_magnitude(const PruneTable& t, DType dtype) {
  FASTOPT_ISA_CALL(prune_magnitude, t, dtype, num_threads());
}
void prune_n_m(const PruneTable& t, DType dtype, int n, int m) {
  FASTOPT_ISA_CALL(prune_n_m, t, dtype, n, m, num_threads());
}

}  // namespace cpu
}  // namespace fastopt
