// CUDA batched damped Newton: for each system, d = (H + damping*I)^-1 g by Cholesky
// (common/cholesky.h: the CPU's functions and summation order), then, in a second kernel,
// p <- p - lr*d for the systems chosen (all, or those that solved).
//
// n <= 64: one warp per system, the damped lower triangle in shared memory. The
// Cholesky-Crout columns are computed in the CPU's order: for column j every lane
// computes the pivot (the same value), lane 0 stores its square root, then the lanes
// compute the rows below it in parallel, each with the same lane_dot as the CPU; the
// triangular solves run on lane 0. So results equal the CPU's bit for bit.
// n > 64: one thread block per system, the factor in global scratch, the same column
// scheme (the CPU blocks its factorisation there, so the last bits may differ).
// Bytes per system: n*n*4 (float32) read + 3n for the solve; 3n for the update.
#include "common/cholesky.h"
#include "cuda/multi_tensor.cuh"
#include "cuda/newton_kernels.h"

FASTOPT_ISA_BEGIN
namespace {

using cuda::check_launch;
using cuda::grid_for;

constexpr int kBlockThreadsLarge = 256;
constexpr int kMaxWarpsPerBlock = 8;
constexpr int64_t kSharedBudget = 48 * 1024;  // dynamic shared memory without opt-in

template <int kGroup>
__device__ __forceinline__ void group_sync() {
  if constexpr (kGroup == 32) __syncwarp();
  else __syncthreads();
}

// The damped lower triangle of H into A (ld n), by the kGroup threads of a group.
template <class T, int kGroup>
__device__ void load_damped(const T* H, T* A, int64_t n, T damping, int lane) {
  for (int64_t e = lane; e < n * n; e += kGroup) {
    const int64_t i = e / n, j = e - i * n;
    if (j <= i) A[e] = i == j ? H[e] + damping : H[e];
  }
  group_sync<kGroup>();
}

// A = L L^T in place (lower triangle), Crout by columns as cholesky_diagonal_block(A, n,
// 0, n), rows of each column split over the group. False (for the whole group) on a bad
// pivot: every thread computes the pivot, from the same values, so all agree.
template <class T, int kGroup>
__device__ bool factor(T* A, int64_t n, int lane) {
  for (int64_t j = 0; j < n; ++j) {
    T* row_j = A + j * n;
    const T d = row_j[j] - lane_dot(row_j, row_j, j);
    if (bad_pivot(d)) return false;
    group_sync<kGroup>();  // everyone has read row_j[j]
    if (lane == 0) row_j[j] = vsqrt(d);
    group_sync<kGroup>();
    for (int64_t i = j + 1 + lane; i < n; i += kGroup) {
      T* row_i = A + i * n;
      row_i[j] = (row_i[j] - lane_dot(row_i, row_j, j)) / row_j[j];
    }
    group_sync<kGroup>();
  }
  return true;
}

template <class T, int kGroup>
__device__ void solve_system(const T* H, const T* g, T* d, uint8_t* solved, T* A, int64_t n,
                             T damping, int lane) {
  load_damped<T, kGroup>(H, A, n, damping, lane);
  const bool ok = factor<T, kGroup>(A, n, lane);
  if (lane == 0) {
    if (ok) cholesky_substitute(A, n, n, g, d);
    *solved = ok ? 1 : 0;
  }
  group_sync<kGroup>();  // A is reused by the group's next system
}

template <class T>
__global__ void newton_solve_warp_kernel(const T* __restrict__ H, const T* __restrict__ g,
                                         T* __restrict__ d, uint8_t* __restrict__ solved,
                                         int64_t batch, int64_t n, T damping) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  T* A = reinterpret_cast<T*>(shared_bytes) + int64_t(warp) * n * n;
  for (int64_t b = int64_t(blockIdx.x) * warps + warp; b < batch; b += int64_t(gridDim.x) * warps)
    solve_system<T, 32>(H + b * n * n, g + b * n, d + b * n, solved + b, A, n, damping, lane);
}

template <class T>
__global__ void __launch_bounds__(kBlockThreadsLarge)
newton_solve_block_kernel(const T* __restrict__ H, const T* __restrict__ g, T* __restrict__ d,
                          uint8_t* __restrict__ solved, int64_t batch, int64_t n, T damping,
                          T* __restrict__ scratch) {
  T* A = scratch + int64_t(blockIdx.x) * n * n;
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x)
    solve_system<T, kBlockThreadsLarge>(H + b * n * n, g + b * n, d + b * n, solved + b, A, n,
                                        damping, threadIdx.x);
}

template <class T>
__global__ void newton_apply_kernel(T* __restrict__ p, const T* __restrict__ d,
                                    const uint8_t* __restrict__ use, int64_t batch, int64_t n,
                                    T lr) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < batch * n;
       e += int64_t(gridDim.x) * blockDim.x)
    if (!use || use[e / n]) p[e] = p[e] - lr * d[e];
}

int64_t large_grid(int64_t batch) { return batch < 264 ? batch : 264; }  // 2 per H100 SM

template <class T>
void solve(const void* H, const void* g, void* d, uint8_t* solved, int64_t batch, int64_t n,
           double damping, void* scratch, cudaStream_t s) {
  const T* h = static_cast<const T*>(H);
  const T* gg = static_cast<const T*>(g);
  T* dd = static_cast<T*>(d);
  if (batch == 0) return;
  if (n <= cuda::kNewtonWarpMaxN) {
    const int64_t bytes = n * n * int64_t(sizeof(T));
    const int64_t fit = kSharedBudget / bytes;
    const int warps = int(fit < 1 ? 1 : fit < kMaxWarpsPerBlock ? fit : kMaxWarpsPerBlock);
    newton_solve_warp_kernel<T><<<grid_for(batch, warps), 32 * warps, size_t(warps * bytes), s>>>(
        h, gg, dd, solved, batch, n, T(damping));
  } else {
    newton_solve_block_kernel<T><<<unsigned(large_grid(batch)), kBlockThreadsLarge, 0, s>>>(
        h, gg, dd, solved, batch, n, T(damping), static_cast<T*>(scratch));
  }
  check_launch("newton_solve");
}

template <class T>
void apply(void* p, const void* d, const uint8_t* use, int64_t batch, int64_t n, double lr,
           cudaStream_t s) {
  if (batch == 0) return;
  newton_apply_kernel<T><<<grid_for(batch * n, 256), 256, 0, s>>>(
      static_cast<T*>(p), static_cast<const T*>(d), use, batch, n, T(lr));
  check_launch("newton_apply");
}

}  // namespace
FASTOPT_ISA_END

namespace fastopt {
namespace cuda {

int64_t newton_scratch_elements(int64_t batch, int64_t n) {
  return n <= kNewtonWarpMaxN ? 0 : large_grid(batch) * n * n;
}

void newton_solve(DType dtype, const void* H, const void* g, void* d, uint8_t* solved,
                  int64_t batch, int64_t n, double damping, void* scratch, cudaStream_t s) {
  if (dtype == DType::f64) solve<double>(H, g, d, solved, batch, n, damping, scratch, s);
  else solve<float>(H, g, d, solved, batch, n, damping, scratch, s);
}

void newton_apply(DType dtype, void* p, const void* d, const uint8_t* use, int64_t batch,
                  int64_t n, double lr, cudaStream_t s) {
  if (dtype == DType::f64) apply<double>(p, d, use, batch, n, lr, s);
  else apply<float>(p, d, use, batch, n, lr, s);
}

}  // namespace cuda
}  // namespace fastopt
