// CPU Adafactor step (formulas: common/optim/adafactor.h), param by param, each in passes
// over work units of up to kRowBlock rows x kStrip columns of one matrix of its batch (or
// of several whole matrices, where they are small: kGroup):
//   1. sums: sum(p^2) per unit, sum(g^2) per row strip and per column of a row block
//      (a vector: its second moment updated here, and sum(u^2) per unit);
//   2. the factors: R and C moved toward the means of g^2, and mean(R) per matrix;
//   3. sum(u^2) per unit (matrices; u with the estimate's inverse root factored: see
//      InverseRoot);
//   4. p <- p * (1 - lr*wd) + coefficient * u.
// Sums are float64 in one fixed order: element j of a row strip adds into lane j % kLanes,
// rows in order; the lanes combine pairwise; row strips, row blocks and units combine in
// order (a row's own sum, for a row shorter than kLanes, is taken in column order). The scalar and AVX2 paths make the same additions and threads share out whole
// units, so every result is bit-identical across paths and thread counts.
#include "cpu/adafactor_kernels.h"
#include <type_traits>
#include <vector>
#include "common/half.h"
#include "cpu/multi_tensor.h"

FASTOPT_ISA_BEGIN
using cpu::AdafactorParam;
using cpu::DType;

constexpr int kLanes = 16;
// Columns per unit: a multiple of kLanes (a strip's lanes are its columns' lanes), and 16 KB
// of float32 per row, so the hardware prefetcher streams a row over several pages (1024
// columns, one page per row, made the passes ~1.2-2x slower on a 4096 x 4096 matrix).
constexpr int64_t kStrip = 4096;
constexpr int64_t kRowBlock = 32;
constexpr int64_t kGroup = 4096;  // elements a unit of small matrices holds at least

struct SquareLanes {
  double lane[kLanes] = {};
  void add(int64_t j, double x) { lane[j % kLanes] += x * x; }
  double total() const {
    double l[kLanes];
    for (int k = 0; k < kLanes; ++k) l[k] = lane[k];
    for (int half = kLanes / 2; half >= 1; half /= 2)
      for (int k = 0; k < half; ++k) l[k] += l[k + half];
    return l[0];
  }
};

// Pairwise over partials [lo, hi).
inline double pairwise(const double* partial, int64_t lo, int64_t hi) {
  if (hi - lo == 1) return partial[lo];
  const int64_t mid = lo + (hi - lo) / 2;
  return pairwise(partial, lo, mid) + pairwise(partial, mid, hi);
}

#ifdef FASTOPT_ISA_isa_avx2
// Float32 lanes j..j+15 (two vectors) squared in float64 into four accumulators holding
// lanes 0-3, 4-7, 8-11, 12-15.
struct WideSquares {
  F64x4 acc[4];
  explicit WideSquares(const SquareLanes& s) {
    for (int q = 0; q < 4; ++q) acc[q] = F64x4::load(s.lane + 4 * q);
  }
  static void widen(const F32x8& a, F64x4* out) {
    out[0] = F64x4(_mm256_cvtps_pd(_mm256_castps256_ps128(a.v)));
    out[1] = F64x4(_mm256_cvtps_pd(_mm256_extractf128_ps(a.v, 1)));
  }
  // the squares of x0 (lanes 0-7) and x1 (8-15), as float64, into w
  static void squares(const F32x8& x0, const F32x8& x1, F64x4 (&w)[4]) {
    widen(x0, w);
    widen(x1, w + 2);
    for (int q = 0; q < 4; ++q) w[q] = w[q] * w[q];
  }
  void add(const F64x4 (&w)[4]) {
    for (int q = 0; q < 4; ++q) acc[q] = acc[q] + w[q];
  }
  void store(SquareLanes& s) const {
    for (int q = 0; q < 4; ++q) acc[q].store(s.lane + 4 * q);
  }
};
constexpr int64_t kWide = 16;  // elements per step of the vector bodies
#endif

// One param's walk: P its storage type, T the math (and state) type.
template <class P, class T> struct Walk {
  const AdafactorParam& a;
  const AdafactorHyper& h;
  P* p;
  const P* g;
  int64_t blocks;  // row blocks per matrix
  int64_t strips;  // column strips per row
  int64_t group;   // matrices per unit: several where a matrix is smaller than a unit
  int64_t units() const { return (a.batch + group - 1) / group * blocks * strips; }
  bool factored() const { return a.variance == nullptr; }
  // Unit k's first matrix and matrix count, first row, row count, first column, column count.
  void unit(int64_t k, int64_t& b, int64_t& nb, int64_t& r0, int64_t& nr, int64_t& c0,
            int64_t& nc) const {
    b = k / (blocks * strips) * group;
    nb = a.batch - b < group ? a.batch - b : group;
    r0 = (k / strips) % blocks * kRowBlock;
    c0 = k % strips * kStrip;
    nr = a.rows - r0 < kRowBlock ? a.rows - r0 : kRowBlock;
    nc = a.cols - c0 < kStrip ? a.cols - c0 : kStrip;
  }
  int64_t at(int64_t b, int64_t r, int64_t c) const { return (b * a.rows + r) * a.cols + c; }
};

// Whether the AVX2 bodies run for math type T (float32 only: float64 params take the
// scalar path, which makes the same additions).
template <class T> constexpr bool wide() {
#ifdef FASTOPT_ISA_isa_avx2
  return std::is_same_v<T, float>;
#else
  return false;
#endif
}

// Pass 1 over a unit of matrices: sum(p^2) into `ps`, each row strip's sum(g^2) into
// row_part[row * strips + strip], and g^2 added to col_part (per matrix and row block, the
// partial column sums). Rows shorter than kLanes (which no vector body takes) sum in
// column order: a small matrix's row costs no lane tree.
template <class P, class T>
void matrix_sums(const Walk<P, T>& w, int64_t k, SquareLanes& ps, double* row_part, double* col_part) {
  int64_t b0, nb, r0, nr, c0, nc;
  w.unit(k, b0, nb, r0, nr, c0, nc);
  const int64_t rb = k / w.strips % w.blocks;
  for (int64_t b = b0; b < b0 + nb; ++b) {
    double* columns = col_part + (b * w.blocks + rb) * w.a.cols + c0;
    for (int64_t r = r0; r < r0 + nr; ++r) {
      const P* gr = w.g + w.at(b, r, c0);
      const P* pr = w.p + w.at(b, r, c0);
      double& row = row_part[(b * w.a.rows + r) * w.strips + k % w.strips];
      if (nc < kLanes) {
        double sum = 0.0;
        for (int64_t j = 0; j < nc; ++j) {
          const double x = ScalarLane<T>::load(gr + j);
          sum += x * x;
          columns[j] += x * x;
          ps.add(j, ScalarLane<T>::load(pr + j));
        }
        row = sum;
        continue;
      }
      SquareLanes gs;
      int64_t j = 0;
#ifdef FASTOPT_ISA_isa_avx2
      if constexpr (wide<T>()) {
        WideSquares gw(gs), pw(ps);
        for (; j + kWide <= nc; j += kWide) {
          F64x4 sq[4], psq[4];
          WideSquares::squares(F32x8::load(gr + j), F32x8::load(gr + j + 8), sq);
          WideSquares::squares(F32x8::load(pr + j), F32x8::load(pr + j + 8), psq);
          gw.add(sq);
          pw.add(psq);
          for (int q = 0; q < 4; ++q)
            (F64x4::load(columns + j + 4 * q) + sq[q]).store(columns + j + 4 * q);
        }
        gw.store(gs);
        pw.store(ps);
      }
#endif
      for (; j < nc; ++j) {
        const double x = ScalarLane<T>::load(gr + j);
        gs.add(j, x);
        columns[j] += x * x;
        ps.add(j, ScalarLane<T>::load(pr + j));
      }
      row = gs.total();
    }
  }
}

// Pass 1 over a unit of a vector: sum(p^2) into `ps`; V <- lerp(V, g^2, w); sum(u^2) into `us`.
template <class P, class T>
void vector_sums(const Walk<P, T>& w, int64_t k, SquareLanes& ps, SquareLanes& us, T weight,
                 T one_minus, bool small, T eps1_squared) {
  const int64_t c0 = k * kStrip;
  const int64_t nc = w.a.cols - c0 < kStrip ? w.a.cols - c0 : kStrip;
  const P* gr = w.g + c0;
  const P* pr = w.p + c0;
  T* v = static_cast<T*>(w.a.variance) + c0;
  auto step = [&](auto lane, int64_t j) {
    using L = decltype(lane);
    using V = typename L::value;
    const V g = L::load(gr + j);
    const V moved = adafactor_lerp(L::load(v + j), g * g, V(weight), V(one_minus), small);
    L::store(v + j, moved);
    return g * adafactor_inverse_root(moved, V(eps1_squared));
  };
  int64_t j = 0;
#ifdef FASTOPT_ISA_isa_avx2
  if constexpr (wide<T>()) {
    WideSquares uw(us), pw(ps);
    for (; j + kWide <= nc; j += kWide) {
      F64x4 sq[4];
      WideSquares::squares(step(WideLane<float>{}, j), step(WideLane<float>{}, j + 8), sq);
      uw.add(sq);
      WideSquares::squares(F32x8::load(pr + j), F32x8::load(pr + j + 8), sq);
      pw.add(sq);
    }
    uw.store(us);
    pw.store(ps);
  }
#endif
  for (; j < nc; ++j) {
    us.add(j, step(ScalarLane<T>{}, j));
    ps.add(j, ScalarLane<T>::load(pr + j));
  }
}

// a where v < bound, else b (lane by lane; NaN v takes b).
template <class T> T below(T v, T bound, T a, T b) { return v < bound ? a : b; }
#ifdef FASTOPT_ISA_isa_avx2
inline F32x8 below(F32x8 v, F32x8 bound, F32x8 a, F32x8 b) {
  return _mm256_blendv_ps(b.v, a.v, _mm256_cmp_ps(v.v, bound.v, _CMP_LT_OQ));
}
#endif

// What one matrix's pass 3 and 4 read per row and column (made in pass 2): a matrix's
// 1/sqrt(max(R_i C_j / m, eps1^2)) is taken as (1/sqrt(R_i / m)) (1/sqrt(C_j)), or 1/eps1
// where (R_i / m) C_j < eps1^2: no division or root per element, the estimate's inverse
// root within a few float rounding steps (NaN and inf propagate as in the estimate).
template <class T> struct Factors {
  std::vector<T> scale;      // R_i / m, per row of every matrix
  std::vector<T> row_root;   // 1 / sqrt(R_i / m)
  std::vector<T> col_root;   // 1 / sqrt(C_j), per column of every matrix
};

// The inverse root of the second moment estimate at (row r, column c0 + j) of a unit.
template <class P, class T> struct InverseRoot {
  const T* scale;     // the unit's matrix's rows (factored), else null
  const T* row_root;
  const T* col;       // C from column c0
  const T* col_root;  // from column c0
  const T* v;         // V from c0 (a vector), else null
  T eps1_squared, inverse_eps1;
  template <class L> typename L::value at(L, int64_t r, int64_t j) const {
    using V = typename L::value;
    if (v) return adafactor_inverse_root(L::load(v + j), V(eps1_squared));
    return below(V(scale[r]) * L::load(col + j), V(eps1_squared), V(inverse_eps1),
                 V(row_root[r]) * L::load(col_root + j));
  }
  static InverseRoot of(const Walk<P, T>& w, int64_t b, int64_t c0, const T* col,
                        const Factors<T>& f, T eps1_squared, T inverse_eps1) {
    if (!w.factored())
      return {nullptr, nullptr, nullptr, nullptr, static_cast<const T*>(w.a.variance) + c0,
              eps1_squared, inverse_eps1};
    const int64_t rows = b * w.a.rows, cols = b * w.a.cols + c0;
    return {f.scale.data() + rows, f.row_root.data() + rows, col + cols,
            f.col_root.data() + cols, nullptr, eps1_squared, inverse_eps1};
  }
};

// Pass 3 (matrices): sum(u^2) of a unit into `us`.
template <class P, class T, class Roots>
void matrix_update_squares(const Walk<P, T>& w, int64_t k, const Roots& roots, SquareLanes& us) {
  int64_t b0, nb, r0, nr, c0, nc;
  w.unit(k, b0, nb, r0, nr, c0, nc);
  for (int64_t b = b0; b < b0 + nb; ++b) {
   const InverseRoot<P, T> e = roots(b, c0);
   for (int64_t r = r0; r < r0 + nr; ++r) {
    const P* gr = w.g + w.at(b, r, c0);
    auto u = [&](auto lane, int64_t j) {
      using L = decltype(lane);
      return L::load(gr + j) * e.at(lane, r, j);
    };
    int64_t j = 0;
#ifdef FASTOPT_ISA_isa_avx2
    if constexpr (wide<T>()) {
      WideSquares uw(us);
      for (; j + kWide <= nc; j += kWide) {
        F64x4 sq[4];
        WideSquares::squares(u(WideLane<float>{}, j), u(WideLane<float>{}, j + 8), sq);
        uw.add(sq);
      }
      uw.store(us);
    }
#endif
    for (; j < nc; ++j) us.add(j, u(ScalarLane<T>{}, j));
   }
  }
}

// Pass 4: p <- p * decay + coefficient * u over a unit.
template <class P, class T, class Roots>
void apply_update(const Walk<P, T>& w, int64_t k, const Roots& roots, T decay, T coefficient) {
  int64_t b0, nb, r0, nr, c0, nc;
  w.unit(k, b0, nb, r0, nr, c0, nc);
  for (int64_t b = b0; b < b0 + nb; ++b) {
   const InverseRoot<P, T> e = roots(b, c0);
   for (int64_t r = r0; r < r0 + nr; ++r) {
    P* pr = w.p + w.at(b, r, c0);
    const P* gr = w.g + w.at(b, r, c0);
    auto update = [&](auto lane, int64_t j) {
      using L = decltype(lane);
      using V = typename L::value;
      V g = L::load(gr + j);
      if (w.h.maximize) g = -g;
      const V u = e.at(lane, r, j) * g;
      L::store(pr + j, L::load(pr + j) * V(decay) + V(coefficient) * u);
    };
    int64_t j = 0;
#ifdef FASTOPT_ISA_isa_avx2
    if constexpr (wide<T>())
      for (; j + 8 <= nc; j += 8) update(WideLane<float>{}, j);
#endif
    for (; j < nc; ++j) update(ScalarLane<T>{}, j);
   }
  }
}

// Units [0, n) shared out among threads (whole units each), body(unit).
template <class Body> void over_units(int64_t n, int64_t elements, int threads, const Body& body) {
  parallel_region(elements >= kParallelMinElements ? threads : 1, [&](int tid, int nt) {
    int64_t begin, end;
    static_share(n, tid, nt, begin, end);
    for (int64_t k = begin; k < end; ++k) body(k);
  });
}

template <class P, class T>
void step_param(const AdafactorParam& a, const AdafactorHyper& h, int threads) {
  const int64_t numel = a.batch * a.rows * a.cols;
  if (numel == 0) return;
  const int64_t blocks = (a.rows + kRowBlock - 1) / kRowBlock, strips = (a.cols + kStrip - 1) / kStrip;
  // small matrices (one block and strip each, as a conv kernel's 3 x 3) go kGroup elements
  // or more to a unit, not one unit each
  const int64_t group = blocks == 1 && strips == 1 && a.rows * a.cols < kGroup
                            ? kGroup / (a.rows * a.cols) : 1;
  const Walk<P, T> w{a, h, static_cast<P*>(a.param), static_cast<const P*>(a.grad), blocks, strips,
                     group};
  const int64_t units = w.units();
  const AdafactorStep s = AdafactorStep::at(h, a.step, numel);
  const T weight = T(s.weight), one_minus = T(1) - weight;
  const bool small = vabs(weight) < T(0.5);
  const T eps1_squared = T(h.eps1 * h.eps1);
  std::vector<double> p_part(size_t(units), 0.0), u_part(size_t(units), 0.0);
  const T inverse_eps1 = T(1) / vsqrt(eps1_squared);  // (the clamped estimate's inverse root)
  T* row = static_cast<T*>(a.row);
  T* col = static_cast<T*>(a.col);
  Factors<T> f;
  auto roots = [&](int64_t b, int64_t c0) {  // matrix b's, from column c0
    return InverseRoot<P, T>::of(w, b, c0, col, f, eps1_squared, inverse_eps1);
  };
  if (w.factored()) {
    std::vector<double> row_part(size_t(a.batch * a.rows * w.strips), 0.0);
    std::vector<double> col_part(size_t(a.batch * w.blocks * a.cols), 0.0);
    over_units(units, numel, threads, [&](int64_t k) {
      SquareLanes ps;
      matrix_sums(w, k, ps, row_part.data(), col_part.data());
      p_part[size_t(k)] = ps.total();
    });
    // 2. the factors, their means and inverse roots, matrix by matrix
    f.scale.resize(size_t(a.batch * a.rows));
    f.row_root.resize(size_t(a.batch * a.rows));
    f.col_root.resize(size_t(a.batch * a.cols));
    over_units(a.batch, numel, threads, [&](int64_t b) {
      double row_total = 0.0;
      for (int64_t r = 0; r < a.rows; ++r) {
        double sum = 0.0;
        for (int64_t t = 0; t < w.strips; ++t) sum += row_part[size_t((b * a.rows + r) * w.strips + t)];
        T& x = row[b * a.rows + r];
        x = adafactor_lerp(x, T(sum / double(a.cols)), weight, one_minus, small);
        row_total += double(x);
      }
      for (int64_t c = 0; c < a.cols; ++c) {
        double sum = 0.0;
        for (int64_t rb = 0; rb < w.blocks; ++rb) sum += col_part[size_t((b * w.blocks + rb) * a.cols + c)];
        T& x = col[b * a.cols + c];
        x = adafactor_lerp(x, T(sum / double(a.rows)), weight, one_minus, small);
        f.col_root[size_t(b * a.cols + c)] = T(1) / vsqrt(x);
      }
      const T mean = vmax_nan(T(row_total / double(a.rows)), T(h.eps1));
      for (int64_t r = b * a.rows; r < (b + 1) * a.rows; ++r) {
        f.scale[size_t(r)] = row[r] / mean;
        f.row_root[size_t(r)] = T(1) / vsqrt(f.scale[size_t(r)]);
      }
    });
    // 3. sum(u^2)
    over_units(units, numel, threads, [&](int64_t k) {
      SquareLanes us;
      matrix_update_squares(w, k, roots, us);
      u_part[size_t(k)] = us.total();
    });
  } else {
    over_units(units, numel, threads, [&](int64_t k) {
      SquareLanes ps, us;
      vector_sums(w, k, ps, us, weight, one_minus, small, eps1_squared);
      p_part[size_t(k)] = ps.total();
      u_part[size_t(k)] = us.total();
    });
  }
  const double coefficient =
      adafactor_coefficient(pairwise(p_part.data(), 0, units), pairwise(u_part.data(), 0, units),
                            s.rho, s.root_numel, h.eps2, h.d);
  const T decay = T(1.0 - h.lr * h.weight_decay);
  over_units(units, numel, threads, [&](int64_t k) {
    apply_update(w, k, roots, decay, T(coefficient));
  });
}

template <class P, class T>
void step_all(const AdafactorParam* params, int64_t n, const AdafactorHyper& h, int threads) {
  for (int64_t i = 0; i < n; ++i) step_param<P, T>(params[i], h, threads);
}

FASTOPT_ISA_END

namespace fastopt {
namespace cpu {
namespace FASTOPT_ISA {

void adafactor_step(DType d, const AdafactorParam* params, int64_t n, const AdafactorHyper& h,
                    int threads) {
  using fastopt::FASTOPT_ISA::step_all;
  switch (d) {
    case DType::f32: step_all<float, float>(params, n, h, threads); break;
    case DType::f64: step_all<double, double>(params, n, h, threads); break;
    case DType::f16: step_all<float16, float>(params, n, h, threads); break;
    case DType::bf16: step_all<bfloat16, float>(params, n, h, threads); break;
    case DType::u8: break;  // never params (the binding refuses them)
  }
}

}  // namespace FASTOPT_ISA
}  // namespace cpu
}  // namespace fastopt
