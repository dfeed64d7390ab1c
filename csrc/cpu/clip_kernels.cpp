// CPU gradient clipping over lists of tensors (formulas: common/grad_norm.h). Two passes:
// the norm (reads each grad once: 4 B per float32 element) and the scaling (reads and
// writes it: 8 B), skipped by the caller when the coefficient is 1.
//
// The norm's additions follow one fixed tree: each tensor is cut into kNormBlock-element
// blocks; inside a block element j adds into float64 lane j % kNormLanes, the lanes combine
// pairwise, and the block partials combine pairwise in block order. The scalar and AVX2
// paths make the same additions in the same order and threads only share out whole blocks,
// so the total is bit-identical across paths and thread counts.
#include "cpu/clip_kernels.h"
#include <vector>
#include "common/half.h"

FASTOPT_ISA_BEGIN
using cpu::DType;
using cpu::TensorTable;

constexpr int64_t kNormBlock = 4096;
constexpr int kNormLanes = 16;

inline double to_double(float x) { return x; }
inline double to_double(double x) { return x; }
inline double to_double(bfloat16 x) { return to_float(x); }
inline double to_double(float16 x) { return to_float(x); }

template <NormKind K> double combine_lanes(double (&lane)[kNormLanes]) {
  for (int half = kNormLanes / 2; half >= 1; half /= 2)
    for (int l = 0; l < half; ++l) lane[l] = norm_combine<K>(lane[l], lane[l + half]);
  return lane[0];
}

// Elements [j, n) of a block into their lanes, one at a time.
template <NormKind K, class P>
void accumulate_scalar(double (&lane)[kNormLanes], const P* x, int64_t j, int64_t n, double p) {
  for (; j < n; ++j)
    lane[j % kNormLanes] = norm_combine<K>(lane[j % kNormLanes], norm_term<K>(to_double(x[j]), p));
}

#ifdef FASTOPT_ISA_isa_avx2
// 16 consecutive elements as four vectors of doubles: lanes 0-3, 4-7, 8-11, 12-15.
inline void widen(const F32x8& a, F64x4* out) {
  out[0] = F64x4(_mm256_cvtps_pd(_mm256_castps256_ps128(a.v)));
  out[1] = F64x4(_mm256_cvtps_pd(_mm256_extractf128_ps(a.v, 1)));
}
template <class P> void load16(const P* x, F64x4 (&v)[4]) {
  widen(F32x8::load(x), v);
  widen(F32x8::load(x + 8), v + 2);
}
inline void load16(const double* x, F64x4 (&v)[4]) {
  for (int q = 0; q < 4; ++q) v[q] = F64x4::load(x + 4 * q);
}
#endif

// The partial of one block of n <= kNormBlock elements.
template <NormKind K, class P> double block_partial(const P* x, int64_t n, double p) {
  double lane[kNormLanes] = {};
  int64_t j = 0;
#ifdef FASTOPT_ISA_isa_avx2
  if constexpr (K != NormKind::p) {  // pow has no vector form: NormKind::p stays scalar
    F64x4 acc[4] = {F64x4(0.0), F64x4(0.0), F64x4(0.0), F64x4(0.0)};
    for (; j + kNormLanes <= n; j += kNormLanes) {
      F64x4 v[4];
      load16(x + j, v);
      for (int q = 0; q < 4; ++q) acc[q] = norm_combine<K>(acc[q], norm_term<K>(v[q], p));
    }
    for (int q = 0; q < 4; ++q) acc[q].store(lane + 4 * q);
  }
#endif
  accumulate_scalar<K>(lane, x, j, n, p);
  return combine_lanes<K>(lane);
}

// Pairwise over partials [lo, hi), split at the middle.
template <NormKind K> double combine_partials(const double* partial, int64_t lo, int64_t hi) {
  if (hi - lo == 1) return partial[lo];
  const int64_t mid = lo + (hi - lo) / 2;
  return norm_combine<K>(combine_partials<K>(partial, lo, mid), combine_partials<K>(partial, mid, hi));
}

template <NormKind K, class P> double norm_total(const TensorTable& t, double p) {
  const int n = t.num_tensors;
  std::vector<int64_t> first_block(size_t(n) + 1, 0);  // global index of each tensor's first block
  for (int i = 0; i < n; ++i)
    first_block[i + 1] = first_block[i] + (t.offsets[i + 1] - t.offsets[i] + kNormBlock - 1) / kNormBlock;
  const int64_t blocks = first_block[n];
  if (blocks == 0) return 0.0;
  std::vector<double> partial(size_t(blocks), 0.0);
  const int threads = t.offsets[n] >= kParallelMinElements ? t.num_threads : 1;
  parallel_region(threads, [&](int tid, int nt) {
    int64_t begin, end;
    static_share(blocks, tid, nt, begin, end);
    for (int64_t b = begin; b < end; ++b) {
      const int i = tensor_of(first_block.data(), n, b);
      const int64_t start = (b - first_block[i]) * kNormBlock;
      const int64_t size = t.offsets[i + 1] - t.offsets[i];
      const int64_t len = size - start < kNormBlock ? size - start : kNormBlock;
      partial[b] = block_partial<K>(static_cast<const P*>(t.ptrs[0][i]) + start, len, p);
    }
  });
  return combine_partials<K>(partial.data(), 0, blocks);
}

template <class P> double norm_total(const TensorTable& t, NormKind k, double p) {
  switch (k) {
    case NormKind::l2: return norm_total<NormKind::l2, P>(t, p);
    case NormKind::l1: return norm_total<NormKind::l1, P>(t, p);
    case NormKind::inf: return norm_total<NormKind::inf, P>(t, p);
    default: return norm_total<NormKind::p, P>(t, p);
  }
}

// g <- g * coefficient: P the storage type, T the math type.
template <class P, class T> struct ScaleKernel {
  void* const* grads;
  T coefficient;
  const P* anchor(int i) const { return static_cast<const P*>(grads[i]); }
  template <class L> FASTOPT_HD void operator()(L, int i, int64_t j) const {
    P* g = static_cast<P*>(grads[i]) + j;
    L::store(g, L::load(g) * typename L::value(coefficient));
  }
};

template <class P, class T> void run_scale(const TensorTable& t, double coefficient) {
  run_multi_tensor<WideLane<T>, T>(t, ScaleKernel<P, T>{t.ptrs[0], T(coefficient)});
}

FASTOPT_ISA_END

// Entry points, one set per ISA (declared in cpu/clip_kernels.h).
namespace fastopt {
namespace cpu {
namespace FASTOPT_ISA {

double grad_norm_total(const TensorTable& t, DType d, NormKind k, double p) {
  using fastopt::FASTOPT_ISA::norm_total;
  switch (d) {
    case DType::f32: return norm_total<float>(t, k, p);
    case DType::f64: return norm_total<double>(t, k, p);
    case DType::f16: return norm_total<float16>(t, k, p);
    default: return norm_total<bfloat16>(t, k, p);
  }
}

void scale_grads(const TensorTable& t, DType d, double coefficient) {
  using fastopt::FASTOPT_ISA::run_scale;
  switch (d) {
    case DType::f32: run_scale<float, float>(t, coefficient); break;
    case DType::f64: run_scale<double, double>(t, coefficient); break;
    case DType::f16: run_scale<float16, float>(t, coefficient); break;
    case DType::bf16: run_scale<bfloat16, float>(t, coefficient); break;
    case DType::u8: break;  // 8-bit state codes, never grads (the binding refuses them)
  }
}

}  // namespace FASTOPT_ISA
}  // namespace cpu
}  // namespace fastopt
