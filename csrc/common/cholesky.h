// Damped Cholesky solve of one symmetric system, (H + damping*I) d = g: the one source of
// truth for the factorisation, used by the CPU kernels (and the CUDA small-n path).
// Row-major, leading dimension ld; only the lower triangle of H is read. Dot products
// accumulate in 8 independent lanes combined in a fixed order, so the result does not
// depend on how the compiler vectorises (scalar and AVX2 builds agree bit for bit).
// float32 systems accumulate in float32. The reference is numpy.linalg.solve.
#pragma once
#include <cmath>
#include <cstdint>
#include "common/math.h"

FASTOPT_ISA_BEGIN

constexpr int kDotLanes = 8;

// sum_k a[k]*b[k], k < len, in kDotLanes interleaved partial sums.
template <class T>
FASTOPT_HD T lane_dot(const T* a, const T* b, int64_t len) {
  if (len < kDotLanes) {  // the same sum without the empty lanes (adding +0 is exact)
    T s = T(0);
    for (int64_t k = 0; k < len; ++k) s = s + a[k] * b[k];
    return s;
  }
  T acc[kDotLanes] = {};
  int64_t k = 0;
  for (; k + kDotLanes <= len; k += kDotLanes)
    for (int l = 0; l < kDotLanes; ++l) acc[l] = acc[l] + a[k + l] * b[k + l];
  // The tail (len - k < kDotLanes) into lanes 0.., indexed by constants so that acc stays
  // in registers on the GPU (a run-time index puts it in local memory).
  for (int l = 0; l < kDotLanes; ++l)
    if (l < len - k) acc[l] = acc[l] + a[k + l] * b[k + l];
  T s = T(0);
  for (int l = 0; l < kDotLanes; ++l) s = s + acc[l];
  return s;
}

// A pivot that cannot be square-rooted: <= 0, NaN or infinite.
template <class T>
FASTOPT_HD bool bad_pivot(T d) { return !(d > T(0)) || d == T(INFINITY); }

// In-place factor A = L L^T of the n x n lower triangle rows [r0, r1) x columns [c0, c0+nb)
// given the columns before c0 already factored and applied: the diagonal block when
// rows == columns (Cholesky-Crout, dot-product form), otherwise the panel below it.
// Returns false on a bad pivot.
template <class T>
FASTOPT_HD bool cholesky_diagonal_block(T* A, int64_t ld, int64_t c0, int64_t nb) {
  for (int64_t j = c0; j < c0 + nb; ++j) {
    T* row_j = A + j * ld;
    const T d = row_j[j] - lane_dot(row_j + c0, row_j + c0, j - c0);
    if (bad_pivot(d)) return false;
    row_j[j] = vsqrt(d);
    for (int64_t i = j + 1; i < c0 + nb; ++i) {
      T* row_i = A + i * ld;
      row_i[j] = (row_i[j] - lane_dot(row_i + c0, row_j + c0, j - c0)) / row_j[j];
    }
  }
  return true;
}

// Row i of the panel below the diagonal block [c0, c0+nb): solve against the block's L.
template <class T>
FASTOPT_HD void cholesky_panel_row(T* A, int64_t ld, int64_t c0, int64_t nb, int64_t i) {
  T* row_i = A + i * ld;
  for (int64_t j = c0; j < c0 + nb; ++j) {
    const T* row_j = A + j * ld;
    row_i[j] = (row_i[j] - lane_dot(row_i + c0, row_j + c0, j - c0)) / row_j[j];
  }
}

// Solve L L^T d = g given the factor in the lower triangle; d may alias g.
template <class T>
FASTOPT_HD void cholesky_substitute(const T* L, int64_t ld, int64_t n, const T* g, T* d) {
  for (int64_t i = 0; i < n; ++i)  // forward: L y = g
    d[i] = (g[i] - lane_dot(L + i * ld, d, i)) / L[i * ld + i];
  for (int64_t i = n - 1; i >= 0; --i) {  // backward: L^T d = y (column access of L)
    T s = d[i];
    for (int64_t k = i + 1; k < n; ++k) s = s - L[k * ld + i] * d[k];
    d[i] = s / L[i * ld + i];
  }
}

FASTOPT_ISA_END
