// CUDA Adafactor step (formulas: common/optim/adafactor.h) in the CPU kernel's passes
// (cpu/adafactor_kernels.cpp) over the same work units -- up to kRowBlock rows x kStrip
// columns of one matrix of the batch, one thread block each:
//   1. sums: sum(p^2) per unit, sum(g^2) per row strip and per column of a row block (a
//      vector: its second moment updated here, and sum(u^2) per unit);
//   2. the factors moved toward the means of g^2 (a thread per row, per column), then per
//      matrix mean(R) and the inverse roots of R_i / mean(R) and C_j;
//   3. sum(u^2) per unit (matrices);
//   4. the coefficient from the totals (a block per param), left in device memory;
//   5. p <- p * (1 - lr*wd) + coefficient * u (bfloat16 params rounded stochastically where
//      asked: the CPU's bits for the same result). A 16-bit param with a float32 master
//      copy has the copy stepped in its place and is written as the result rounded.
// Small matrices (at most kSmallSide x kSmallSide: a conv weight's (kh, kw), 1 x 1 or
// 3 x 3 for most) take a thread each instead, kThreads matrices per unit: passes 1-3 in
// one kernel, so a (512, 512, 3, 3) weight is 1024 units, not 262144 blocks of 9 elements.
// A call's params go up to kLaunchParams at a time (a Table, the kernels' argument; fewer
// where their scratch would pass kTableScratch): each pass is one launch over all their
// units (a block finds its param by a binary search over the prefix sums), so a step
// costs about seven launches per table, and the tables share one scratch buffer.
// Sums are float64 in a fixed order (a thread's elements in order, a fixed shuffle tree in
// each warp, the warps in order, the units in order), so a result is the same from run to
// run; it is not the CPU's order, so the two agree to float64 rounding of the sums.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>
#include "common/rounding.h"
#include "cuda/adafactor_kernels.h"
#include "cuda/multi_tensor.cuh"

FASTOPT_ISA_BEGIN
namespace {

constexpr int kThreads = 256;
constexpr int64_t kRowBlock = 32;
constexpr int64_t kStrip = 4096;
constexpr int kColumnsPerThread = int(kStrip / kThreads);
constexpr int64_t kSmallSide = 8;
constexpr int kLaunchParams = 64;
constexpr size_t kTableScratch = size_t(64) << 20;  // bytes a table takes past its first param

// How a param's work is cut into units, one thread block each: `blocks` row blocks x
// `strips` column strips per matrix, or (per_thread: small matrices) kThreads matrices.
struct Units {
  int64_t blocks, strips, count;
  bool per_thread;
  explicit Units(const AdafactorParam& a) {
    blocks = (a.rows + kRowBlock - 1) / kRowBlock;
    strips = (a.cols + kStrip - 1) / kStrip;
    per_thread = a.variance == nullptr && a.rows <= kSmallSide && a.cols <= kSmallSide;
    count = per_thread ? (a.batch + kThreads - 1) / kThreads : a.batch * blocks * strips;
  }
};

// What a param's kernels share: its arrays (p: what is stepped, the param or its float32
// master; rounded: the 16-bit param written from a master), its view as (batch, rows,
// cols), its units, the per-step numbers (host-computed) and where its scratch arrays are.
template <class T> struct Step {
  void* p;
  const void* g;
  void* rounded;
  T *row, *col, *variance;
  int64_t batch, rows, cols, blocks, strips, count;  // count: units (see Units)
  T weight, one_minus, eps1, eps1_squared, inverse_eps1, decay;
  bool small, maximize, factored, per_thread;
  uint32_t key;  // of the stochastic rounding of bfloat16 params (apply<..., true>)
  double rho, root_numel, eps2, d;
  double *row_part, *col_part, *p_part, *u_part, *coefficient;
  T *scale, *row_root, *col_root;
  // A factored param whose matrices take a block per unit (passes 2 and 3 of their own).
  __host__ __device__ bool partial() const { return factored && !per_thread; }
  // Unit k's matrix (not per_thread), first row, row count, first column, column count.
  __device__ void unit(int64_t k, int64_t& b, int64_t& r0, int64_t& nr, int64_t& c0,
                       int64_t& nc) const {
    b = k / (blocks * strips);
    r0 = (k / strips) % blocks * kRowBlock;
    c0 = k % strips * kStrip;
    nr = rows - r0 < kRowBlock ? rows - r0 : kRowBlock;
    nc = cols - c0 < kStrip ? cols - c0 : kStrip;
  }
};

// Up to kLaunchParams params (of one call, one dtype), the argument of each pass's launch:
// their Steps and prefix sums over them of the units (passes 1 and 5) and, of the
// partial() params, of the units (pass 3), rows and columns (pass 2's factors) and
// matrices (pass 2's means). prefix[0] = 0; param i's share is [prefix[i], prefix[i + 1]).
template <class T> struct Table {
  int32_t count;
  int64_t units[kLaunchParams + 1], partial_units[kLaunchParams + 1];
  int64_t rows[kLaunchParams + 1], cols[kLaunchParams + 1], matrices[kLaunchParams + 1];
  Step<T> step[kLaunchParams];
};
static_assert(sizeof(Table<double>) <= 30000, "a kernel argument holds at most 32764 bytes");

// The param holding item k of a prefix sum (the last i < count with prefix[i] <= k; k <
// prefix[count]), so params with no items are passed over.
__device__ int find_param(const int64_t* prefix, int count, int64_t k) {
  int lo = 0, hi = count;  // prefix[lo] <= k < prefix[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (prefix[mid] <= k) lo = mid;
    else hi = mid;
  }
  return lo;
}

// The block's sum of one double per thread, in a fixed order; valid in thread 0.
__device__ double block_sum(double x) {
  __shared__ double warps[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_down_sync(0xffffffffu, x, offset);
  if ((threadIdx.x & 31) == 0) warps[threadIdx.x / 32] = x;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) total += warps[w];
  __syncthreads();  // (warps is reused by the next call)
  return total;
}

template <class P> __device__ double squared(P x) {
  const double v = double(cuda::to_math(x));
  return v * v;
}

// The factored form of 1/sqrt(max(v, eps1^2)) (common/optim/adafactor.h) from R_i /
// mean(R) (scale), C_j and their inverse roots.
template <class T>
__device__ T factored_inverse_root(const Step<T>& s, T scale, T col, T row_root, T col_root) {
  return scale * col < s.eps1_squared ? s.inverse_eps1 : row_root * col_root;
}

// 1/sqrt(max(v, eps1^2)) at (row r, column c) of matrix b of a factored param.
template <class T>
__device__ T matrix_inverse_root(const Step<T>& s, int64_t b, int64_t r, int64_t c) {
  const int64_t i = b * s.rows + r, j = b * s.cols + c;
  return factored_inverse_root(s, s.scale[i], s.col[j], s.row_root[i], s.col_root[j]);
}

// The same of any param (a vector's: of its element c).
template <class T>
__device__ T inverse_root(const Step<T>& s, int64_t b, int64_t r, int64_t c) {
  if (!s.factored) return adafactor_inverse_root(s.variance[c], s.eps1_squared);
  return matrix_inverse_root(s, b, r, c);
}

// ---- the passes over one unit, row, column, matrix or param -----------------------------------
// P: what is stepped (the param or its float32 master), G: the grads' (and params') type.

// Pass 1 over unit k of a partial() param.
template <class P, class T, class G> __device__ void matrix_sums(const Step<T>& s, int64_t k) {
  const P* __restrict__ p = static_cast<const P*>(s.p);
  const G* __restrict__ g = static_cast<const G*>(s.g);
  int64_t b, r0, nr, c0, nc;
  s.unit(k, b, r0, nr, c0, nc);
  double columns[kColumnsPerThread] = {};
  double p_squares = 0.0;
  for (int64_t r = r0; r < r0 + nr; ++r) {
    const int64_t at = (b * s.rows + r) * s.cols + c0;
    double row = 0.0;
#pragma unroll
    for (int q = 0; q < kColumnsPerThread; ++q) {
      const int64_t j = threadIdx.x + int64_t(q) * kThreads;
      if (j < nc) {
        const double sq = squared(g[at + j]);
        row += sq;
        columns[q] += sq;
        p_squares += squared(p[at + j]);
      }
    }
    const double total = block_sum(row);
    if (threadIdx.x == 0) s.row_part[(b * s.rows + r) * s.strips + k % s.strips] = total;
  }
  const int64_t rb = k / s.strips % s.blocks;
#pragma unroll
  for (int q = 0; q < kColumnsPerThread; ++q) {
    const int64_t j = threadIdx.x + int64_t(q) * kThreads;
    if (j < nc) s.col_part[(b * s.blocks + rb) * s.cols + c0 + j] = columns[q];
  }
  const double total = block_sum(p_squares);
  if (threadIdx.x == 0) s.p_part[k] = total;
}

// Passes 1-3 over unit k of small matrices (per_thread), a thread each, matrices
// k * kThreads ...: sum(p^2) and the row and column sums of g^2, the factors moved (as
// row_factor, col_factor), mean(R) and the inverse roots (as matrix_means), then sum(u^2)
// (as update_squares). The arrays are indexed by unrolled loops: registers.
template <class P, class T, class G> __device__ void small_matrices(const Step<T>& s, int64_t k) {
  const P* __restrict__ p = static_cast<const P*>(s.p);
  const G* __restrict__ g = static_cast<const G*>(s.g);
  const int64_t b = k * kThreads + threadIdx.x;
  double p_squares = 0.0, u_squares = 0.0;
  if (b < s.batch) {
    const int64_t first = b * s.rows * s.cols;
    double columns[kSmallSide] = {}, row_total = 0.0;
    T rows[kSmallSide], cols[kSmallSide], col_roots[kSmallSide];
#pragma unroll
    for (int r = 0; r < kSmallSide; ++r) {
      if (r >= s.rows) break;
      double sum = 0.0;
#pragma unroll
      for (int c = 0; c < kSmallSide; ++c) {
        if (c >= s.cols) break;
        const int64_t at = first + r * s.cols + c;
        const double sq = squared(g[at]);
        sum += sq;
        columns[c] += sq;
        p_squares += squared(p[at]);
      }
      T& x = s.row[b * s.rows + r];
      rows[r] = adafactor_lerp(x, T(sum / double(s.cols)), s.weight, s.one_minus, s.small);
      x = rows[r];
      row_total += double(rows[r]);
    }
#pragma unroll
    for (int c = 0; c < kSmallSide; ++c) {
      if (c >= s.cols) break;
      T& x = s.col[b * s.cols + c];
      cols[c] = adafactor_lerp(x, T(columns[c] / double(s.rows)), s.weight, s.one_minus, s.small);
      x = cols[c];
      col_roots[c] = T(1) / vsqrt(cols[c]);
      s.col_root[b * s.cols + c] = col_roots[c];
    }
    const T mean = vmax_nan(T(row_total / double(s.rows)), s.eps1);
#pragma unroll
    for (int r = 0; r < kSmallSide; ++r) {
      if (r >= s.rows) break;
      const T scale = rows[r] / mean, row_root = T(1) / vsqrt(scale);
      s.scale[b * s.rows + r] = scale;
      s.row_root[b * s.rows + r] = row_root;
#pragma unroll
      for (int c = 0; c < kSmallSide; ++c) {
        if (c >= s.cols) break;
        const T u = T(cuda::to_math(g[first + r * s.cols + c])) *
                    factored_inverse_root(s, scale, cols[c], row_root, col_roots[c]);
        u_squares += double(u) * double(u);
      }
    }
  }
  const double p_total = block_sum(p_squares);
  const double u_total = block_sum(u_squares);
  if (threadIdx.x == 0) {
    s.p_part[k] = p_total;
    s.u_part[k] = u_total;
  }
}

// Pass 1 over unit k (kStrip elements) of a vector: sum(p^2), V <- lerp(V, g^2, w), sum(u^2).
template <class P, class T, class G> __device__ void vector_sums(const Step<T>& s, int64_t k) {
  const P* __restrict__ p = static_cast<const P*>(s.p);
  const G* __restrict__ g = static_cast<const G*>(s.g);
  const int64_t c0 = k * kStrip, end = s.cols - c0 < kStrip ? s.cols : c0 + kStrip;
  double p_squares = 0.0, u_squares = 0.0;
  for (int64_t j = c0 + threadIdx.x; j < end; j += kThreads) {
    const T x = T(cuda::to_math(g[j]));
    const T v = adafactor_lerp(s.variance[j], x * x, s.weight, s.one_minus, s.small);
    s.variance[j] = v;
    const T u = x * adafactor_inverse_root(v, s.eps1_squared);
    u_squares += double(u) * double(u);
    p_squares += squared(p[j]);
  }
  const double p_total = block_sum(p_squares);
  const double u_total = block_sum(u_squares);
  if (threadIdx.x == 0) {
    s.p_part[k] = p_total;
    s.u_part[k] = u_total;
  }
}

// Pass 2a: row factor i (of batch * rows) of a partial() param.
template <class T> __device__ void row_factor(const Step<T>& s, int64_t i) {
  double sum = 0.0;
  for (int64_t t = 0; t < s.strips; ++t) sum += s.row_part[i * s.strips + t];
  s.row[i] = adafactor_lerp(s.row[i], T(sum / double(s.cols)), s.weight, s.one_minus, s.small);
}

// Pass 2b: column factor i (of batch * cols) of a partial() param, and its inverse root.
template <class T> __device__ void col_factor(const Step<T>& s, int64_t i) {
  const int64_t b = i / s.cols, c = i % s.cols;
  double sum = 0.0;
  for (int64_t rb = 0; rb < s.blocks; ++rb) sum += s.col_part[(b * s.blocks + rb) * s.cols + c];
  const T x = adafactor_lerp(s.col[i], T(sum / double(s.rows)), s.weight, s.one_minus, s.small);
  s.col[i] = x;
  s.col_root[i] = T(1) / vsqrt(x);
}

// Pass 2c (a block): matrix b's mean(R), and its rows' R_i / mean and inverse roots.
template <class T> __device__ void matrix_means(const Step<T>& s, int64_t b) {
  __shared__ T mean;
  double sum = 0.0;
  for (int64_t r = threadIdx.x; r < s.rows; r += kThreads) sum += double(s.row[b * s.rows + r]);
  const double total = block_sum(sum);
  if (threadIdx.x == 0) mean = vmax_nan(T(total / double(s.rows)), s.eps1);
  __syncthreads();
  for (int64_t r = threadIdx.x; r < s.rows; r += kThreads) {
    const T x = s.row[b * s.rows + r] / mean;
    s.scale[b * s.rows + r] = x;
    s.row_root[b * s.rows + r] = T(1) / vsqrt(x);
  }
  __syncthreads();  // (mean is rewritten for the next matrix)
}

// Pass 3: sum(u^2) over unit k of a partial() param.
template <class T, class G> __device__ void update_squares(const Step<T>& s, int64_t k) {
  const G* __restrict__ g = static_cast<const G*>(s.g);
  int64_t b, r0, nr, c0, nc;
  s.unit(k, b, r0, nr, c0, nc);
  double u_squares = 0.0;
  for (int64_t r = r0; r < r0 + nr; ++r)
    for (int64_t j = threadIdx.x; j < nc; j += kThreads) {
      const T u = T(cuda::to_math(g[(b * s.rows + r) * s.cols + c0 + j])) *
                  matrix_inverse_root(s, b, r, c0 + j);
      u_squares += double(u) * double(u);
    }
  const double total = block_sum(u_squares);
  if (threadIdx.x == 0) s.u_part[k] = total;
}

// Pass 4 (a block): a param's totals over its units, and the coefficient u is added with.
template <class T> __device__ void coefficient(const Step<T>& s) {
  double p_squares = 0.0, u_squares = 0.0;
  for (int64_t k = threadIdx.x; k < s.count; k += kThreads) {
    p_squares += s.p_part[k];
    u_squares += s.u_part[k];
  }
  const double p_total = block_sum(p_squares);
  const double u_total = block_sum(u_squares);
  if (threadIdx.x == 0)
    *s.coefficient = adafactor_coefficient(p_total, u_total, s.rho, s.root_numel, s.eps2, s.d);
}

// Pass 5 at element `at` (row r, column c of matrix b): p <- p * decay + coefficient * u
// (Stochastic: bfloat16 p rounded stochastically; P a float32 master of G params: the
// params written as the result rounded to nearest).
template <class P, class T, class G, bool Stochastic>
__device__ void apply_one(const Step<T>& s, T coefficient, int64_t at, int64_t b, int64_t r,
                          int64_t c) {
  P* __restrict__ p = static_cast<P*>(s.p);
  T x = T(cuda::to_math(static_cast<const G*>(s.g)[at]));
  if (s.maximize) x = -x;
  const T u = inverse_root(s, b, r, c) * x;
  const T result = T(cuda::to_math(p[at])) * s.decay + coefficient * u;
  if constexpr (Stochastic)
    p[at] = __ushort_as_bfloat16(bfloat16_stochastic(result, rounding_bits(s.key, at)));
  else
    p[at] = cuda::to_storage<P>(result);
  if constexpr (!std::is_same_v<P, G>) static_cast<G*>(s.rounded)[at] = cuda::to_storage<G>(result);
}

// Pass 5 over unit k: its rows, its threads across the columns; or (per_thread) its
// kThreads small matrices, contiguous, its threads across their elements.
template <class P, class T, class G, bool Stochastic>
__device__ void apply(const Step<T>& s, int64_t k) {
  const T coefficient = T(*s.coefficient);
  if (s.per_thread) {
    const uint32_t size = uint32_t(s.rows * s.cols), cols = uint32_t(s.cols);  // <= 64
    const int64_t first = k * kThreads;
    const int64_t last = first + kThreads < s.batch ? first + kThreads : s.batch;
    const uint32_t count = uint32_t(last - first) * size;
    for (uint32_t e = threadIdx.x; e < count; e += kThreads)
      apply_one<P, T, G, Stochastic>(s, coefficient, first * size + e, first + e / size,
                                     e % size / cols, e % cols);
    return;
  }
  int64_t b, r0, nr, c0, nc;
  s.unit(k, b, r0, nr, c0, nc);
  for (int64_t r = r0; r < r0 + nr; ++r)
    for (int64_t j = threadIdx.x; j < nc; j += kThreads)
      apply_one<P, T, G, Stochastic>(s, coefficient, (b * s.rows + r) * s.cols + c0 + j, b, r,
                                     c0 + j);
}

// ---- the launches: each over every param of a Table ------------------------------------------

// Pass 1 (and 2-3 of small matrices), a block per unit.
template <class P, class T, class G>
__global__ void __launch_bounds__(kThreads) sums_kernel(const __grid_constant__ Table<T> t) {
  for (int64_t k = blockIdx.x; k < t.units[t.count]; k += gridDim.x) {
    const int i = find_param(t.units, t.count, k);
    const Step<T>& s = t.step[i];
    if (s.per_thread) small_matrices<P, T, G>(s, k - t.units[i]);
    else if (s.factored) matrix_sums<P, T, G>(s, k - t.units[i]);
    else vector_sums<P, T, G>(s, k - t.units[i]);
  }
}

// Pass 2a and 2b of partial() params: a thread per row factor, and per column factor.
template <class T>
__global__ void __launch_bounds__(kThreads) factors_kernel(const __grid_constant__ Table<T> t) {
  const int64_t first = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * kThreads, rows = t.rows[t.count];
  for (int64_t k = first; k < rows; k += stride) {
    const int i = find_param(t.rows, t.count, k);
    row_factor(t.step[i], k - t.rows[i]);
  }
  for (int64_t k = first; k < t.cols[t.count]; k += stride) {
    const int i = find_param(t.cols, t.count, k);
    col_factor(t.step[i], k - t.cols[i]);
  }
}

// Pass 2c of partial() params, a block per matrix.
template <class T>
__global__ void __launch_bounds__(kThreads) means_kernel(const __grid_constant__ Table<T> t) {
  for (int64_t m = blockIdx.x; m < t.matrices[t.count]; m += gridDim.x) {
    const int i = find_param(t.matrices, t.count, m);
    matrix_means(t.step[i], m - t.matrices[i]);
  }
}

// Pass 3 of partial() params, a block per unit.
template <class T, class G>
__global__ void __launch_bounds__(kThreads)
update_squares_kernel(const __grid_constant__ Table<T> t) {
  for (int64_t k = blockIdx.x; k < t.partial_units[t.count]; k += gridDim.x) {
    const int i = find_param(t.partial_units, t.count, k);
    update_squares<T, G>(t.step[i], k - t.partial_units[i]);
  }
}

// Pass 4, a block per param.
template <class T>
__global__ void __launch_bounds__(kThreads) coefficient_kernel(const __grid_constant__ Table<T> t) {
  for (int i = blockIdx.x; i < t.count; i += gridDim.x) coefficient(t.step[i]);
}

// Pass 5, a block per unit (Stochastic: an instance of its own, so that the round-to-nearest
// one keeps its registers).
template <class P, class T, class G, bool Stochastic>
__global__ void __launch_bounds__(kThreads) apply_kernel(const __grid_constant__ Table<T> t) {
  for (int64_t k = blockIdx.x; k < t.units[t.count]; k += gridDim.x) {
    const int i = find_param(t.units, t.count, k);
    apply<P, T, G, Stochastic>(t.step[i], k - t.units[i]);
  }
}

// ---- the host side ------------------------------------------------------------------------

// A param's scratch arrays, in order, 8-byte aligned, from its first byte.
struct Layout {
  size_t row_part, col_part, p_part, u_part, coefficient, scale, row_root, col_root, bytes;
  Layout(const AdafactorParam& a, size_t math_bytes) {
    const Units units(a);
    const bool factored = a.variance == nullptr, partial = factored && !units.per_thread;
    size_t at = 0;
    auto take = [&](int64_t count, size_t size) {
      const size_t here = at;
      at += (size_t(count) * size + 7) / 8 * 8;
      return here;
    };
    row_part = take(partial ? a.batch * a.rows * units.strips : 0, 8);
    col_part = take(partial ? a.batch * units.blocks * a.cols : 0, 8);
    p_part = take(units.count, 8);
    u_part = take(units.count, 8);
    coefficient = take(1, 8);
    scale = take(factored ? a.batch * a.rows : 0, math_bytes);
    row_root = take(factored ? a.batch * a.rows : 0, math_bytes);
    col_root = take(factored ? a.batch * a.cols : 0, math_bytes);
    bytes = at;
  }
};

// Param `index` of the call as its kernels see it (P: what is stepped, G: the params'
// type), its scratch from `base`.
template <class P, class T, class G>
Step<T> step_of(const AdafactorParam& a, const AdafactorHyper& h, int32_t index, char* base) {
  const Layout layout(a, sizeof(T));
  const Units units(a);
  const AdafactorStep at = AdafactorStep::at(h, a.step, a.batch * a.rows * a.cols);
  Step<T> s;
  s.p = std::is_same_v<P, G> ? a.param : a.master;
  s.g = a.grad;
  s.rounded = a.param;
  s.row = static_cast<T*>(a.row);
  s.col = static_cast<T*>(a.col);
  s.variance = static_cast<T*>(a.variance);
  s.batch = a.batch;
  s.rows = a.rows;
  s.cols = a.cols;
  s.blocks = units.blocks;
  s.strips = units.strips;
  s.count = units.count;
  s.per_thread = units.per_thread;
  s.weight = T(at.weight);
  s.one_minus = T(1) - s.weight;
  s.small = (s.weight < T(0) ? -s.weight : s.weight) < T(0.5);
  s.eps1 = T(h.eps1);
  s.eps1_squared = T(h.eps1 * h.eps1);
  s.inverse_eps1 = T(1) / T(std::sqrt(s.eps1_squared));
  s.decay = T(1.0 - h.lr * h.weight_decay);
  s.maximize = h.maximize;
  s.key = rounding_key(h.seed, int64_t(a.step), index);
  s.factored = a.variance == nullptr;
  s.rho = at.rho;
  s.root_numel = at.root_numel;
  s.eps2 = h.eps2;
  s.d = h.d;
  s.row_part = reinterpret_cast<double*>(base + layout.row_part);
  s.col_part = reinterpret_cast<double*>(base + layout.col_part);
  s.p_part = reinterpret_cast<double*>(base + layout.p_part);
  s.u_part = reinterpret_cast<double*>(base + layout.u_part);
  s.coefficient = reinterpret_cast<double*>(base + layout.coefficient);
  s.scale = reinterpret_cast<T*>(base + layout.scale);
  s.row_root = reinterpret_cast<T*>(base + layout.row_root);
  s.col_root = reinterpret_cast<T*>(base + layout.col_root);
  return s;
}

// Adds step s to table t (count < kLaunchParams), with its prefix sums.
template <class T> void add_step(Table<T>& t, const Step<T>& s) {
  const int i = t.count++;
  const bool partial = s.partial();
  t.step[i] = s;
  t.units[i + 1] = t.units[i] + s.count;
  t.partial_units[i + 1] = t.partial_units[i] + (partial ? s.count : 0);
  t.rows[i + 1] = t.rows[i] + (partial ? s.batch * s.rows : 0);
  t.cols[i + 1] = t.cols[i] + (partial ? s.batch * s.cols : 0);
  t.matrices[i + 1] = t.matrices[i] + (partial ? s.batch : 0);
}

// The passes over one table's params, queued on `stream`.
template <class P, class T, class G>
void launch(const Table<T>& t, bool stochastic, cudaStream_t stream) {
  const unsigned unit_grid = cuda::grid_for(t.units[t.count], 1);
  sums_kernel<P, T, G><<<unit_grid, kThreads, 0, stream>>>(t);
  cuda::check_launch("adafactor (sums)");
  if (t.partial_units[t.count] > 0) {
    const int64_t factors = std::max(t.rows[t.count], t.cols[t.count]);
    factors_kernel<T><<<cuda::grid_for(factors, kThreads), kThreads, 0, stream>>>(t);
    cuda::check_launch("adafactor (factors)");
    means_kernel<T><<<cuda::grid_for(t.matrices[t.count], 1), kThreads, 0, stream>>>(t);
    cuda::check_launch("adafactor (means)");
    update_squares_kernel<T, G>
        <<<cuda::grid_for(t.partial_units[t.count], 1), kThreads, 0, stream>>>(t);
    cuda::check_launch("adafactor (update norm)");
  }
  coefficient_kernel<T><<<unsigned(t.count), kThreads, 0, stream>>>(t);
  cuda::check_launch("adafactor (coefficient)");
  if constexpr (std::is_same_v<P, __nv_bfloat16>)
    if (stochastic) {
      apply_kernel<P, T, G, true><<<unit_grid, kThreads, 0, stream>>>(t);
      cuda::check_launch("adafactor (update)");
      return;
    }
  apply_kernel<P, T, G, false><<<unit_grid, kThreads, 0, stream>>>(t);
  cuda::check_launch("adafactor (update)");
}

// The call's params cut into tables: ranges [first, last) of them holding at most
// kLaunchParams params with elements and, past the first of those, at most kTableScratch
// bytes of scratch (float64 layouts: room for float32 math too). The tables run one after
// the other on one stream, so they share one scratch buffer: the largest table's.
struct Tables {
  std::vector<std::pair<size_t, size_t>> ranges;
  size_t scratch_bytes = 0;
  explicit Tables(const std::vector<AdafactorParam>& params) {
    size_t first = 0, bytes = 0;
    int count = 0;
    for (size_t i = 0; i < params.size(); ++i) {
      const AdafactorParam& a = params[i];
      if (a.batch * a.rows * a.cols == 0) continue;
      const size_t more = Layout(a, sizeof(double)).bytes;
      if (count == kLaunchParams || (count > 0 && bytes + more > kTableScratch)) {
        ranges.emplace_back(first, i);
        first = i;
        bytes = count = 0;
      }
      bytes += more;
      ++count;
      scratch_bytes = std::max(scratch_bytes, bytes);
    }
    if (count > 0) ranges.emplace_back(first, params.size());
  }
};

// Every param with elements, table by table (Tables); P, T, G as step_of's.
template <class P, class T, class G>
void run(const std::vector<AdafactorParam>& params, const AdafactorHyper& h, void* scratch,
         cudaStream_t stream) {
  for (const auto& [first, last] : Tables(params).ranges) {
    char* base = static_cast<char*>(scratch);
    Table<T> t;
    t.count = 0;
    t.units[0] = t.partial_units[0] = t.rows[0] = t.cols[0] = t.matrices[0] = 0;
    for (size_t i = first; i < last; ++i) {
      const AdafactorParam& a = params[i];
      if (a.batch * a.rows * a.cols == 0) continue;
      add_step(t, step_of<P, T, G>(a, h, int32_t(i), base));
      base += Layout(a, sizeof(T)).bytes;
    }
    launch<P, T, G>(t, h.stochastic, stream);
  }
}

}  // namespace
FASTOPT_ISA_END

namespace fastopt {
namespace cuda {

size_t adafactor_scratch_bytes(const std::vector<AdafactorParam>& params) {
  return fastopt::FASTOPT_ISA::Tables(params).scratch_bytes;
}

void adafactor_step(DType dtype, const std::vector<AdafactorParam>& params,
                    const AdafactorHyper& h, void* scratch, cudaStream_t stream) {
  using fastopt::FASTOPT_ISA::run;
  bool master = false;  // (a call's params all have masters, or none)
  for (const AdafactorParam& a : params) master = master || a.master != nullptr;
  switch (dtype) {
    case DType::f32: run<float, float, float>(params, h, scratch, stream); break;
    case DType::f64: run<double, double, double>(params, h, scratch, stream); break;
    case DType::f16:
      if (master) run<float, float, __half>(params, h, scratch, stream);
      else run<__half, float, __half>(params, h, scratch, stream);
      break;
    case DType::bf16:
      if (master) run<float, float, __nv_bfloat16>(params, h, scratch, stream);
      else run<__nv_bfloat16, float, __nv_bfloat16>(params, h, scratch, stream);
      break;
    default:
      throw std::invalid_argument(
          "adafactor_step: params must be float32, float64, float16 or bfloat16");
  }
}

}  // namespace cuda
}  // namespace fastopt
