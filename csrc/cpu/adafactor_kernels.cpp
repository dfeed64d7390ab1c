// CPU Adafactor step (formulas: common/optim/adafactor.h), param by param, each in passes
// over work units of up to kRowBlock rows x kStrip columns of one matrix of its batch (or
// of several whole matrices, where they are small: kGroup):
//   1. sums: sum(p^2) per unit, sum(g^2) per row strip and per column of a row block
//      (a vector: its second moment updated here, and sum(u^2) per unit);
//   2. the factors: R and C moved toward the means of g^2, and mean(R) per matrix (for
//      small matrices flat over a unit's rows and columns, in vector bodies across
//      matrices; for narrow ones, fewer than kLanes columns, also each element's inverse
//      root, so that passes 3 and 4 run over a unit's elements as one row);
//   3. sum(u^2) per unit (matrices; u with the estimate's inverse root factored: see
//      Factors);
//   4. p <- p * (1 - lr*wd) + coefficient * u (bfloat16 params rounded stochastically where
//      the call asks: common/rounding.h's bits of each element's index). A 16-bit param
//      with a float32 master copy has the copy stepped in its place (its grads loaded as
//      they are) and is written in pass 4 as the result rounded to nearest.
// Sums are float64 in one fixed order: element j of a row strip adds into lane j % kLanes,
// rows in order; the lanes combine pairwise; row strips, row blocks and units combine in
// order (a row's own sum, for a row shorter than kLanes, is taken in column order; a unit
// of narrow matrices counts as one row in pass 3). The scalar and AVX2 paths make the same
// additions and threads share out whole units, so every result is bit-identical across
// paths and thread counts. The scratch (partial sums, factors) is kept between calls by
// the calling thread, at the largest size a param has needed: a step faults in no fresh
// pages.
#include "cpu/adafactor_kernels.h"
#include <algorithm>
#include <type_traits>
#include <vector>
#include "common/half.h"
#include "common/rounding.h"
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

// One param's walk: P the type of what is stepped (the param, or its float32 master copy),
// G the grads' (the param's) storage type, T the math (and state) type.
template <class P, class T, class G> struct Walk {
  const AdafactorParam& a;
  const AdafactorHyper& h;
  P* p;
  const G* g;
  int64_t blocks;  // row blocks per matrix
  int64_t strips;  // column strips per row
  int64_t group;   // matrices per unit: several where a matrix is smaller than a unit
  int64_t units() const { return (a.batch + group - 1) / group * blocks * strips; }
  bool factored() const { return a.variance == nullptr; }
  // Whether a unit holds several whole matrices (one row block and strip each).
  bool grouped() const { return factored() && group > 1; }
  // Whether those matrices are narrow (rows shorter than a vector body): passes 3 and 4
  // then take a unit's elements as one row, with each element's inverse root from pass 2.
  bool flat() const { return grouped() && a.cols < kLanes; }
  // Whether they are 1 x 1 (a 1 x 1 conv's): pass 2 then makes the inverse roots at once.
  bool single() const { return grouped() && a.rows == 1 && a.cols == 1; }
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

// The squares of value(lane, j) for j in [0, n) into `s`, element j into lane j % kLanes.
template <class T, class Value> void add_squares(int64_t n, SquareLanes& s, const Value& value) {
  int64_t j = 0;
#ifdef FASTOPT_ISA_isa_avx2
  if constexpr (wide<T>()) {
    WideSquares sw(s);
    for (; j + kWide <= n; j += kWide) {
      F64x4 sq[4];
      WideSquares::squares(value(WideLane<float>{}, j), value(WideLane<float>{}, j + 8), sq);
      sw.add(sq);
    }
    sw.store(s);
  }
#endif
  for (; j < n; ++j) s.add(j, value(ScalarLane<T>{}, j));
}

// Pass 1 over a unit of narrow matrices (Walk::flat): sum(p^2) over its elements as one
// row; each row's sum(g^2) in column order, each column's in row order (1 x 1 matrices:
// g^2 both, in vector bodies that write row_part alone, which FactorPass::single reads).
template <class P, class T, class G>
void narrow_sums(const Walk<P, T, G>& w, int64_t k, SquareLanes& ps, double* row_part, double* col_part) {
  int64_t b0, nb, r0, nr, c0, nc;
  w.unit(k, b0, nb, r0, nr, c0, nc);
  const int64_t rows = w.a.rows, cols = w.a.cols, first = w.at(b0, 0, 0);
  const P* p = w.p + first;
  add_squares<T>(nb * rows * cols, ps, [&](auto lane, int64_t j) { return decltype(lane)::load(p + j); });
  int64_t e = first;
  if (rows == 1 && cols == 1) {
#ifdef FASTOPT_ISA_isa_avx2
    if constexpr (wide<T>())
      for (; e + 8 <= first + nb; e += 8) {
        F64x4 sq[2];
        WideSquares::widen(F32x8::load(w.g + e), sq);
        for (int q = 0; q < 2; ++q) (sq[q] * sq[q]).store(row_part + e + 4 * q);  // (= col_part's)
      }
#endif
  }
  for (int64_t b = e / (rows * cols); b < b0 + nb; ++b) {
    double* columns = col_part + b * cols;
    for (int64_t c = 0; c < cols; ++c) columns[c] = 0.0;
    for (int64_t r = b * rows; r < (b + 1) * rows; ++r) {
      double sum = 0.0;
      for (int64_t c = 0; c < cols; ++c) {
        const double x = ScalarLane<T>::load(w.g + r * cols + c);
        sum += x * x;
        columns[c] += x * x;
      }
      row_part[r] = sum;
    }
  }
}

// Pass 1 over a unit of matrices: sum(p^2) into `ps`, each row strip's sum(g^2) into
// row_part[row * strips + strip], and g^2 added to col_part (per matrix and row block, the
// partial column sums). Rows shorter than kLanes (which no vector body takes) sum in
// column order: a small matrix's row costs no lane tree.
template <class P, class T, class G>
void matrix_sums(const Walk<P, T, G>& w, int64_t k, SquareLanes& ps, double* row_part, double* col_part) {
  if (w.flat()) return narrow_sums(w, k, ps, row_part, col_part);
  int64_t b0, nb, r0, nr, c0, nc;
  w.unit(k, b0, nb, r0, nr, c0, nc);
  const int64_t rb = k / w.strips % w.blocks;
  for (int64_t b = b0; b < b0 + nb; ++b) {
    double* columns = col_part + (b * w.blocks + rb) * w.a.cols + c0;
    std::fill(columns, columns + nc, 0.0);  // (this unit's own: no other adds into it)
    for (int64_t r = r0; r < r0 + nr; ++r) {
      const G* gr = w.g + w.at(b, r, c0);
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
template <class P, class T, class G>
void vector_sums(const Walk<P, T, G>& w, int64_t k, SquareLanes& ps, SquareLanes& us, T weight,
                 T one_minus, bool small, T eps1_squared) {
  const int64_t c0 = k * kStrip;
  const int64_t nc = w.a.cols - c0 < kStrip ? w.a.cols - c0 : kStrip;
  const G* gr = w.g + c0;
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
  std::vector<T> mean;       // m = max(mean(R), eps1) per matrix (grouped units)
  std::vector<T> inverse;    // each element's inverse root (narrow matrices: Walk::flat)
};

// A param's scratch: its factors and partial sums, kept by the calling thread between
// params and calls (grown, never shrunk), so that a step faults in no fresh pages.
template <class T> struct Scratch {
  Factors<T> f;
  std::vector<double> p_part, u_part;  // sum(p^2), sum(u^2) per unit
  std::vector<double> row_part;        // sum(g^2) per row strip
  std::vector<double> col_part;        // sum(g^2) per column of a row block
  std::vector<double> total;           // sum(R) per matrix (grouped units)
};

// v's first n elements (its values are whatever a former param left there).
template <class V> V* first(std::vector<V>& v, int64_t n) {
  if (v.size() < size_t(n)) v.resize(size_t(n));
  return v.data();
}

// The inverse root of the second moment estimate at (row r, element j) of a row of a unit,
// three ways, each its own type so that the loops over a row test no mode: a vector's from
// V; a matrix's factored (see Factors); narrow matrices' as pass 2 left it per element.
template <class T> struct FullRoot {
  const T* v;  // V from the row's first element
  T eps1_squared;
  template <class L> typename L::value at(L, int64_t, int64_t j) const {
    return adafactor_inverse_root(L::load(v + j), typename L::value(eps1_squared));
  }
};
template <class T> struct FactoredRoot {
  const T* scale;  // R_i / m of the matrix's rows
  const T* row_root;
  const T* col;       // C from the row's first column
  const T* col_root;  // from the row's first column
  T eps1_squared, inverse_eps1;
  template <class V> static V of(V scale, V col, V row_root, V col_root, T eps1_squared,
                                 T inverse_eps1) {
    return below(scale * col, V(eps1_squared), V(inverse_eps1), row_root * col_root);
  }
  template <class L> typename L::value at(L, int64_t r, int64_t j) const {
    using V = typename L::value;
    return of(V(scale[r]), L::load(col + j), V(row_root[r]), L::load(col_root + j),
              eps1_squared, inverse_eps1);
  }
};
template <class T> struct GivenRoot {
  const T* inverse;  // from the row's first element
  template <class L> typename L::value at(L, int64_t, int64_t j) const { return L::load(inverse + j); }
};

// Where passes 3 and 4 take a param's inverse roots from.
template <class P, class T, class G> struct Roots {
  const Walk<P, T, G>& w;
  const Factors<T>& f;
  const T* col;  // C
  T eps1_squared, inverse_eps1;
  // The rows of unit k: body(e, r, first, n), e the inverse roots of the row's matrix, r the
  // row in it, `first` the index of its element at the unit's first column, n its length.
  // A unit of narrow matrices is one row of all its elements.
  template <class Body> void rows(int64_t k, const Body& body) const {
    int64_t b0, nb, r0, nr, c0, nc;
    w.unit(k, b0, nb, r0, nr, c0, nc);
    if (!w.factored())
      return body(FullRoot<T>{static_cast<const T*>(w.a.variance) + c0, eps1_squared}, int64_t(0),
                  c0, nc);
    if (w.flat())
      return body(GivenRoot<T>{f.inverse.data() + w.at(b0, 0, 0)}, int64_t(0), w.at(b0, 0, 0),
                  nb * w.a.rows * w.a.cols);
    for (int64_t b = b0; b < b0 + nb; ++b) {
      const FactoredRoot<T> e{f.scale.data() + b * w.a.rows, f.row_root.data() + b * w.a.rows,
                              col + b * w.a.cols + c0, f.col_root.data() + b * w.a.cols + c0,
                              eps1_squared, inverse_eps1};
      for (int64_t r = r0; r < r0 + nr; ++r) body(e, r, w.at(b, r, c0), nc);
    }
  }
};

// body(lane, i) for i in [begin, begin + n): vector lanes where the math type has them.
template <class T, class Body> void flat_loop(int64_t begin, int64_t n, const Body& body) {
  int64_t i = begin;
#ifdef FASTOPT_ISA_isa_avx2
  if constexpr (wide<T>())
    for (; i + 8 <= begin + n; i += 8) body(WideLane<float>{}, i);
#endif
  for (; i < begin + n; ++i) body(ScalarLane<T>{}, i);
}

// T(sum[i] / n) for the lane's elements: float64 quotients, rounded once to T.
template <class L> typename L::value quotient(L, const double* sum, double n) {
  using V = typename L::value;
#ifdef FASTOPT_ISA_isa_avx2
  if constexpr (std::is_same_v<V, F32x8>) {
    const __m256d d = _mm256_set1_pd(n);
    const __m128 lo = _mm256_cvtpd_ps(_mm256_div_pd(_mm256_loadu_pd(sum), d));
    const __m128 hi = _mm256_cvtpd_ps(_mm256_div_pd(_mm256_loadu_pd(sum + 4), d));
    return F32x8(_mm256_set_m128(hi, lo));
  } else
#endif
    return V(sum[0] / n);
}

// Pass 2: R and C moved toward the means of g^2 (pass 1's partial sums), the mean of R per
// matrix, and the inverse roots passes 3 and 4 read.
template <class P, class T, class G> struct FactorPass {
  const Walk<P, T, G>& w;
  T* row;  // R, (batch, rows)
  T* col;  // C, (batch, cols)
  const double* row_part;
  const double* col_part;
  double* total;
  Factors<T>& f;
  T weight, one_minus, eps1, eps1_squared, inverse_eps1;
  bool small;

  // Matrix b, row by row and column by column.
  void matrix(int64_t b) const {
    const int64_t rows = w.a.rows, cols = w.a.cols;
    double row_total = 0.0;
    for (int64_t r = 0; r < rows; ++r) {
      double sum = 0.0;
      for (int64_t t = 0; t < w.strips; ++t) sum += row_part[(b * rows + r) * w.strips + t];
      T& x = row[b * rows + r];
      x = adafactor_lerp(x, T(sum / double(cols)), weight, one_minus, small);
      row_total += double(x);
    }
    for (int64_t c = 0; c < cols; ++c) {
      double sum = 0.0;
      for (int64_t rb = 0; rb < w.blocks; ++rb) sum += col_part[(b * w.blocks + rb) * cols + c];
      T& x = col[b * cols + c];
      x = adafactor_lerp(x, T(sum / double(rows)), weight, one_minus, small);
      f.col_root[size_t(b * cols + c)] = T(1) / vsqrt(x);
    }
    const T mean = vmax_nan(T(row_total / double(rows)), eps1);
    for (int64_t r = b * rows; r < (b + 1) * rows; ++r) {
      f.scale[size_t(r)] = row[r] / mean;
      f.row_root[size_t(r)] = T(1) / vsqrt(f.scale[size_t(r)]);
    }
  }

  // Unit k of whole small matrices (one row strip and block each, so a row's or column's
  // partial sum is its sum): matrix()'s operations, element by element over the unit's rows,
  // then its matrices, then its columns, in vector bodies across matrices.
  void grouped(int64_t k) const {
    int64_t b0, nb, r0, nr, c0, nc;
    w.unit(k, b0, nb, r0, nr, c0, nc);
    if (w.single()) return single(b0, nb);
    const int64_t rows = w.a.rows, cols = w.a.cols;
    T* scale = f.scale.data();
    T* row_root = f.row_root.data();
    T* col_root = f.col_root.data();
    T* mean = f.mean.data();
    flat_loop<T>(b0 * rows, nb * rows, [&](auto lane, int64_t i) {
      using L = decltype(lane);
      using V = typename L::value;
      L::store(row + i, adafactor_lerp(L::load(row + i), quotient(lane, row_part + i, double(cols)),
                                       V(weight), V(one_minus), small));
    });
    for (int64_t b = b0; b < b0 + nb; ++b) {
      double sum = 0.0;
      for (int64_t r = b * rows; r < (b + 1) * rows; ++r) sum += double(row[r]);
      total[b] = sum;
    }
    flat_loop<T>(b0, nb, [&](auto lane, int64_t b) {
      using L = decltype(lane);
      using V = typename L::value;
      L::store(mean + b, vmax_nan(quotient(lane, total + b, double(rows)), V(eps1)));
    });
    flat_loop<T>(b0 * cols, nb * cols, [&](auto lane, int64_t j) {
      using L = decltype(lane);
      using V = typename L::value;
      const V x = adafactor_lerp(L::load(col + j), quotient(lane, col_part + j, double(rows)),
                                 V(weight), V(one_minus), small);
      L::store(col + j, x);
      L::store(col_root + j, V(T(1)) / vsqrt(x));
    });
    auto row_roots = [&](auto lane, int64_t i, auto m) {  // row i's, of a matrix of mean m
      using L = decltype(lane);
      using V = typename L::value;
      const V x = L::load(row + i) / m;
      L::store(scale + i, x);
      L::store(row_root + i, V(T(1)) / vsqrt(x));
    };
    if (rows > 1)  // each row's mean first, in scale (the quotient replaces it below)
      for (int64_t b = b0; b < b0 + nb; ++b)
        std::fill(scale + b * rows, scale + (b + 1) * rows, mean[b]);
    const T* means = rows > 1 ? scale : mean;  // per row
    flat_loop<T>(b0 * rows, nb * rows, [&](auto lane, int64_t i) {
      row_roots(lane, i, decltype(lane)::load(means + i));
    });
    if (!w.flat()) return;
    T* inverse = f.inverse.data();
    for (int64_t b = b0; b < b0 + nb; ++b)
      for (int64_t r = b * rows; r < (b + 1) * rows; ++r)
        for (int64_t c = b * cols; c < (b + 1) * cols; ++c)
          inverse[r * cols + c - b * cols] = FactoredRoot<T>::of(
              scale[r], col[c], row_root[r], col_root[c], eps1_squared, inverse_eps1);
  }

  // Matrices [b0, b0 + nb) of 1 x 1: grouped()'s operations fused per element, g^2 the
  // row's and the column's sum, R the sum of R (so m = max(R, eps1)), straight to the
  // inverse roots (the same values, without the per-row and per-column arrays between).
  void single(int64_t b0, int64_t nb) const {
    T* inverse = f.inverse.data();
    flat_loop<T>(b0, nb, [&](auto lane, int64_t e) {
      using L = decltype(lane);
      using V = typename L::value;
      const V squares = quotient(lane, row_part + e, 1.0);
      const V r = adafactor_lerp(L::load(row + e), squares, V(weight), V(one_minus), small);
      const V c = adafactor_lerp(L::load(col + e), squares, V(weight), V(one_minus), small);
      L::store(row + e, r);
      L::store(col + e, c);
      const V scale = r / vmax_nan(r, V(eps1));
      L::store(inverse + e, FactoredRoot<T>::of(scale, c, V(T(1)) / vsqrt(scale), V(T(1)) / vsqrt(c),
                                                eps1_squared, inverse_eps1));
    });
  }
};

// Pass 3 (matrices): sum(u^2) of a unit into `us`.
template <class P, class T, class G>
void matrix_update_squares(const Walk<P, T, G>& w, int64_t k, const Roots<P, T, G>& roots, SquareLanes& us) {
  roots.rows(k, [&](const auto& e, int64_t r, int64_t first, int64_t nc) {
    const G* gr = w.g + first;
    add_squares<T>(nc, us, [&](auto lane, int64_t j) {
      return decltype(lane)::load(gr + j) * e.at(lane, r, j);
    });
  });
}

// Pass 4: p <- p * decay + coefficient * u over a unit (bfloat16 params rounded
// stochastically with `key` where the call asks for it; a master copy stepped in the
// param's place, the param written as its value rounded to nearest).
template <class P, class T, class G>
void apply_update(const Walk<P, T, G>& w, int64_t k, const Roots<P, T, G>& roots, T decay,
                  T coefficient, uint32_t key) {
  roots.rows(k, [&](const auto& e, int64_t r, int64_t first, int64_t nc) {
    P* pr = w.p + first;
    [[maybe_unused]] G* rounded = static_cast<G*>(w.a.param) + first;
    const G* gr = w.g + first;
    auto update = [&](auto lane, int64_t j) {
      using L = decltype(lane);
      using V = typename L::value;
      V g = L::load(gr + j);
      if (w.h.maximize) g = -g;
      const V u = e.at(lane, r, j) * g;
      const V result = L::load(pr + j) * V(decay) + V(coefficient) * u;
      if constexpr (std::is_same_v<P, bfloat16>)
        if (w.h.stochastic) return L::store_stochastic(pr + j, result, key, first + j);
      L::store(pr + j, result);
      if constexpr (!std::is_same_v<P, G>) L::store(rounded + j, result);
    };
    int64_t j = 0;
#ifdef FASTOPT_ISA_isa_avx2
    if constexpr (wide<T>())
      for (; j + 8 <= nc; j += 8) update(WideLane<float>{}, j);
#endif
    for (; j < nc; ++j) update(ScalarLane<T>{}, j);
  });
}

// Units [0, n) shared out among threads (whole units each), body(unit).
template <class Body> void over_units(int64_t n, int64_t elements, int threads, const Body& body) {
  parallel_region(elements >= kParallelMinElements ? threads : 1, [&](int tid, int nt) {
    int64_t begin, end;
    static_share(n, tid, nt, begin, end);
    for (int64_t k = begin; k < end; ++k) body(k);
  });
}

template <class P, class T, class G>
void step_walk(const AdafactorParam& a, const AdafactorHyper& h, int32_t index, int threads,
               Scratch<T>& s) {
  const int64_t numel = a.batch * a.rows * a.cols;
  if (numel == 0) return;
  const int64_t blocks = (a.rows + kRowBlock - 1) / kRowBlock, strips = (a.cols + kStrip - 1) / kStrip;
  // small matrices (one block and strip each, as a conv kernel's 3 x 3) go kGroup elements
  // or more to a unit, not one unit each
  const int64_t group = blocks == 1 && strips == 1 && a.rows * a.cols < kGroup
                            ? kGroup / (a.rows * a.cols) : 1;
  const Walk<P, T, G> w{a, h, static_cast<P*>(std::is_same_v<P, G> ? a.param : a.master),
                        static_cast<const G*>(a.grad), blocks, strips, group};
  const int64_t units = w.units();
  const AdafactorStep at = AdafactorStep::at(h, a.step, numel);
  const T weight = T(at.weight), one_minus = T(1) - weight;
  const bool small = vabs(weight) < T(0.5);
  const T eps1_squared = T(h.eps1 * h.eps1);
  double* p_part = first(s.p_part, units);
  double* u_part = first(s.u_part, units);
  const T inverse_eps1 = T(1) / vsqrt(eps1_squared);  // (the clamped estimate's inverse root)
  T* col = static_cast<T*>(a.col);
  Factors<T>& f = s.f;
  const Roots<P, T, G> roots{w, f, col, eps1_squared, inverse_eps1};
  if (w.factored()) {
    double* row_part = first(s.row_part, a.batch * a.rows * w.strips);
    double* col_part = first(s.col_part, a.batch * w.blocks * a.cols);
    over_units(units, numel, threads, [&](int64_t k) {
      SquareLanes ps;
      matrix_sums(w, k, ps, row_part, col_part);
      p_part[k] = ps.total();
    });
    if (!w.single()) {
      first(f.scale, a.batch * a.rows);
      first(f.row_root, a.batch * a.rows);
      first(f.col_root, a.batch * a.cols);
    }
    const bool totals = w.grouped() && !w.single();
    const FactorPass<P, T, G> factors{w, static_cast<T*>(a.row), col, row_part, col_part,
                                   totals ? first(s.total, a.batch) : nullptr, f, weight,
                                   one_minus, T(h.eps1), eps1_squared, inverse_eps1, small};
    if (w.grouped()) {
      if (totals) first(f.mean, a.batch);
      if (w.flat()) first(f.inverse, numel);
      over_units(units, numel, threads, [&](int64_t k) { factors.grouped(k); });
    } else {
      over_units(a.batch, numel, threads, [&](int64_t b) { factors.matrix(b); });
    }
    over_units(units, numel, threads, [&](int64_t k) {
      SquareLanes us;
      matrix_update_squares(w, k, roots, us);
      u_part[k] = us.total();
    });
  } else {
    over_units(units, numel, threads, [&](int64_t k) {
      SquareLanes ps, us;
      vector_sums(w, k, ps, us, weight, one_minus, small, eps1_squared);
      p_part[k] = ps.total();
      u_part[k] = us.total();
    });
  }
  const double coefficient = adafactor_coefficient(pairwise(p_part, 0, units), pairwise(u_part, 0, units),
                                                   at.rho, at.root_numel, h.eps2, h.d);
  const T decay = T(1.0 - h.lr * h.weight_decay);
  const uint32_t key = rounding_key(h.seed, int64_t(a.step), index);
  over_units(units, numel, threads, [&](int64_t k) {
    apply_update(w, k, roots, decay, T(coefficient), key);
  });
}

// P the params' storage type: a 16-bit param with a master copy steps the copy (float32)
// with its grads loaded as they are.
template <class P, class T>
void step_all(const AdafactorParam* params, int64_t n, const AdafactorHyper& h, int threads) {
  static thread_local Scratch<T> scratch;
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (!std::is_same_v<P, T>)
      if (params[i].master) {
        step_walk<T, T, P>(params[i], h, int32_t(i), threads, scratch);
        continue;
      }
    step_walk<P, T, P>(params[i], h, int32_t(i), threads, scratch);
  }
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
