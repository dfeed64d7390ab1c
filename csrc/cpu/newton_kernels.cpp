// Batched damped Newton on the CPU: for each of `batch` independent systems,
// d = (H + damping*I)^-1 g by Cholesky (common/cholesky.h), then p <- p - lr*d.
// Phase 1 (solve_batch) factors a private copy of each H (only its lower triangle is read;
// H is never written) and writes d and a solved flag; phase 2 (apply_batch) updates the
// params of the systems chosen. Threads go over the batch, or, for a batch smaller than
// the thread count, over the rows of one large factorisation. Blocked right-looking
// factorisation with 64-wide blocks keeps large n (hundreds to thousands) in cache.
// Bytes per system: n*n read (H) + 3n (g, d) for phase 1; 3n for phase 2.
#include <cstring>
#include <memory>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "common/cholesky.h"
#include "cpu/lanes.h"
#include "cpu/newton_kernels.h"

FASTOPT_ISA_BEGIN

constexpr int64_t kCholeskyBlock = 64;
constexpr int64_t kTrailingTile = 256;  // columns per tile: 64 x 256 doubles = 128 KB (L2)
constexpr int kTrailingChunk = 16;      // outputs held in registers across the k loop

// Trailing update of rows [i0, i1) after block [c0, c0+nb): A[i][j] -= sum_k L[i][k]*L[j][k]
// for c0+nb <= j <= i, with PT = the block's panel transposed (PT[k*m + (j - (c0+nb))]).
// Each output is updated k = 0..nb-1 in order, vectorised across j (AVX2 vectors or
// scalars, same arithmetic per element); 16 outputs stay in registers while k runs, and
// tiles of 256 columns keep PT in L2.
template <class T>
void trailing_update(T* A, int64_t n, int64_t c0, int64_t nb, const T* PT, int64_t i0,
                     int64_t i1) {
  using L = WideLane<T>;
  using V = typename L::value;
  constexpr int W = L::width, kVectors = kTrailingChunk / W;
  const int64_t first = c0 + nb, m = n - first;
  for (int64_t t0 = first; t0 < n; t0 += kTrailingTile) {
    for (int64_t i = i0 > t0 ? i0 : t0; i < i1; ++i) {
      T* row = A + i * n;
      const T* Li = row + c0;
      const int64_t j_end = i + 1 < t0 + kTrailingTile ? i + 1 : t0 + kTrailingTile;
      int64_t j = t0;
      for (; j + kTrailingChunk <= j_end; j += kTrailingChunk) {
        V acc[kVectors];
        for (int v = 0; v < kVectors; ++v) acc[v] = L::load(row + j + v * W);
        for (int64_t k = 0; k < nb; ++k) {
          const V a = V(Li[k]);
          const T* col = PT + k * m + (j - first);
          for (int v = 0; v < kVectors; ++v) acc[v] = acc[v] - a * L::load(col + v * W);
        }
        for (int v = 0; v < kVectors; ++v) L::store(row + j + v * W, acc[v]);
      }
      for (; j < j_end; ++j) {
        T acc = row[j];
        for (int64_t k = 0; k < nb; ++k) acc = acc - Li[k] * PT[k * m + (j - first)];
        row[j] = acc;
      }
    }
  }
}

// Factor the damped lower triangle of H into A (ld = n) and solve for d, with scratch PT
// of kCholeskyBlock*n elements. With row_threads > 1 the panel and trailing updates of
// each block are split over threads (one large system); otherwise all runs on the caller.
template <class T>
bool solve_one(const T* H, const T* g, T* d, T* A, T* PT, int64_t n, T damping,
               int row_threads) {
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(A + i * n, H + i * n, sizeof(T) * size_t(i + 1));
    A[i * n + i] = A[i * n + i] + damping;
  }
  for (int64_t c0 = 0; c0 < n; c0 += kCholeskyBlock) {
    const int64_t nb = n - c0 < kCholeskyBlock ? n - c0 : kCholeskyBlock;
    if (!cholesky_diagonal_block(A, n, c0, nb)) return false;
    const int64_t first = c0 + nb, m = n - first;
    if (m == 0) break;
    auto panel = [&](int64_t i) {
      cholesky_panel_row(A, n, c0, nb, i);
      for (int64_t k = 0; k < nb; ++k) PT[k * m + (i - first)] = A[i * n + c0 + k];
    };
    if (row_threads > 1) {  // (a disabled `omp parallel if` still costs a team setup)
#pragma omp parallel num_threads(row_threads)
      {
#pragma omp for schedule(static)
        for (int64_t i = first; i < n; ++i) panel(i);
        // Row i costs ~i: 16-row dynamic chunks balance the triangle.
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = first; i < n; i += 16)
          trailing_update(A, n, c0, nb, PT, i, i + 16 < n ? i + 16 : n);
      }
    } else {
      for (int64_t i = first; i < n; ++i) panel(i);
      trailing_update(A, n, c0, nb, PT, first, n);
    }
  }
  cholesky_substitute(A, n, n, g, d);
  return true;
}

template <class T>
void solve_batch_t(const T* H, const T* g, T* d, bool* solved, int64_t batch, int64_t n,
                   double damping, int threads) {
  const bool over_batch = batch >= threads || threads == 1;
  const int teams = over_batch ? threads : 1;
  // Scratch per thread (the damped factor, and the transposed panel of a blocked
  // factorisation), allocated here: std::bad_alloc must not be thrown inside an OpenMP
  // region (it would terminate the process instead of reaching Python as MemoryError).
  const size_t factor_size = size_t(n) * size_t(n);
  const size_t panel_size = n > kCholeskyBlock ? size_t(kCholeskyBlock) * size_t(n) : 1;
  std::unique_ptr<T[]> scratch(new T[size_t(teams) * (factor_size + panel_size)]);
#pragma omp parallel num_threads(teams) if (teams > 1)
  {
#ifdef _OPENMP
    T* A = scratch.get() + size_t(omp_get_thread_num()) * (factor_size + panel_size);
#else
    T* A = scratch.get();
#endif
    T* PT = A + factor_size;
#pragma omp for schedule(dynamic, 8)
    for (int64_t b = 0; b < batch; ++b) {
      solved[b] = solve_one(H + b * n * n, g + b * n, d + b * n, A, PT, n, T(damping),
                            !over_batch && n >= 2 * kCholeskyBlock ? threads : 1);
    }
  }
}

// p <- p - lr*d for the systems with use[b] (all of them when use is null).
template <class T>
void apply_batch_t(T* p, const T* d, const bool* use, int64_t batch, int64_t n, double lr,
                   int threads) {
  const T step = T(lr);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && batch * n >= (1 << 15))
  for (int64_t b = 0; b < batch; ++b) {
    if (use && !use[b]) continue;
    for (int64_t k = 0; k < n; ++k) p[b * n + k] = p[b * n + k] - step * d[b * n + k];
  }
}

FASTOPT_ISA_END

namespace fastopt {
namespace cpu {
namespace FASTOPT_ISA {

void newton_solve(DType dt, const void* H, const void* g, void* d, bool* solved, int64_t batch,
                  int64_t n, double damping, int threads) {
  if (dt == DType::f32)
    fastopt::FASTOPT_ISA::solve_batch_t(static_cast<const float*>(H), static_cast<const float*>(g),
                                        static_cast<float*>(d), solved, batch, n, damping, threads);
  else
    fastopt::FASTOPT_ISA::solve_batch_t(static_cast<const double*>(H), static_cast<const double*>(g),
                                        static_cast<double*>(d), solved, batch, n, damping, threads);
}

void newton_apply(DType dt, void* p, const void* d, const bool* use, int64_t batch, int64_t n,
                  double lr, int threads) {
  if (dt == DType::f32)
    fastopt::FASTOPT_ISA::apply_batch_t(static_cast<float*>(p), static_cast<const float*>(d), use,
                                        batch, n, lr, threads);
  else
    fastopt::FASTOPT_ISA::apply_batch_t(static_cast<double*>(p), static_cast<const double*>(d), use,
                                        batch, n, lr, threads);
}

}  // namespace FASTOPT_ISA
}  // namespace cpu
}  // namespace fastopt
