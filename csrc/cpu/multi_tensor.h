// The CPU multi-tensor driver: one call walks every element of a list of tensors (each
// role -- param, grad, state -- a list of equally-sized contiguous arrays), split into one
// contiguous share per thread. Elementwise kernels make the result independent of the
// thread count (bit-identical for 1 and N threads).
#pragma once
#include <cstdint>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "common/optim/descriptor.h"
#include "common/platform.h"
#include "cpu/lanes.h"

namespace fastopt {
namespace cpu {

using fastopt::kMaskSlot;
using fastopt::kMasterSlot;
using fastopt::kMaxRoles;
using fastopt::kMaxSlots;

// Pointers of n tensors per role and the prefix sums of their sizes (offsets[n] = total).
// Built by the bindings; it owns nothing.
struct TensorTable {
  int num_tensors = 0;
  const int64_t* offsets = nullptr;     // n + 1 entries
  void* const* ptrs[kMaxSlots] = {};    // ptrs[role][i]; null = not used by the call;
                                        // ptrs[kMaskSlot]: the masks (uint8 per element);
                                        // ptrs[kMasterSlot]: float32 master params
  float* const* absmax[kMaxRoles] = {}; // 8-bit state (common/state8.h): absmax[role][i],
                                        // the block maxima of state role r's tensor i,
                                        // whose ptrs[role][i] are then its codes (uint8)
  unsigned fresh = 0;                   // bit r: role r is written but not read this step
  int num_threads = 1;
};

}  // namespace cpu
}  // namespace fastopt

FASTOPT_ISA_BEGIN

// Below this many elements one thread is faster than waking the others.
constexpr int64_t kParallelMinElements = 1 << 15;

// body(tid, nt) on `threads` OpenMP threads, or called directly when threads <= 1: a
// disabled `omp parallel if (...)` still sets a team up and wakes the pool (~0.4 us of a
// small step's ~3 us).
template <class Body> void parallel_region(int threads, const Body& body) {
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    body(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  body(0, 1);
}

// The contiguous share [begin, end) of items [0, total) of thread tid among nt (OpenMP's
// static schedule).
inline void static_share(int64_t total, int tid, int nt, int64_t& begin, int64_t& end) {
  const int64_t share = (total + nt - 1) / nt;
  begin = tid * share < total ? tid * share : total;
  end = begin + share < total ? begin + share : total;
}

// Apply kernel k to elements [lo, hi) of tensor i (T: the math type of the lanes): scalar
// steps until the param pointer (of its storage type: 16-bit params too)
// is 32-byte aligned (NumPy's large arrays start 16 bytes into a page, and vectors that
// straddle cache lines cost ~25% of the bandwidth), the vector body unrolled twice, single
// vectors, then the scalar tail. Scalar and vector lanes run the same formula, so where
// the split falls does not change any result.
template <class Wide, class T, class Kernel>
FASTOPT_HD void apply_range(const Kernel& k, int i, int64_t lo, int64_t hi) {
  constexpr int W = Wide::width;
  int64_t j = lo;
  if (W > 1) {
    const uintptr_t addr = reinterpret_cast<uintptr_t>(k.anchor(i) + lo);
    int64_t head = int64_t((32 - addr % 32) % 32 / sizeof(*k.anchor(i)));
    for (const int64_t stop = head < hi - lo ? lo + head : hi; j < stop; ++j)
      k(ScalarLane<T>{}, i, j);
    for (; j + 2 * W <= hi; j += 2 * W) {
      k(Wide{}, i, j);
      k(Wide{}, i, j + W);
    }
    for (; j + W <= hi; j += W) k(Wide{}, i, j);
  }
  for (; j < hi; ++j) k(ScalarLane<T>{}, i, j);
}

// Index of the tensor holding global element `pos` (last i with offsets[i] <= pos).
inline int tensor_of(const int64_t* offsets, int n, int64_t pos) {
  int lo = 0, hi = n;  // invariant: offsets[lo] <= pos, answer < hi
  while (hi - lo > 1) {
    const int mid = lo + (hi - lo) / 2;
    if (offsets[mid] <= pos) lo = mid; else hi = mid;
  }
  return lo;
}

template <class Wide, class T, class Kernel>
void run_multi_tensor(const cpu::TensorTable& t, const Kernel& k) {
  const int64_t total = t.offsets[t.num_tensors];
  if (total == 0) return;
  const int threads = total >= kParallelMinElements ? t.num_threads : 1;
  parallel_region(threads, [&](int tid, int nt) {
    // A private copy keeps the coefficients in registers: stores through float* could
    // otherwise alias the kernel's float members, forcing a reload every iteration.
    const Kernel local = k;
    // Shares are multiples of 64 elements so threads never split a cache line.
    const int64_t share = ((total + nt - 1) / nt + 63) / 64 * 64;
    const int64_t begin = tid * share < total ? tid * share : total;
    const int64_t end = begin + share < total ? begin + share : total;
    int64_t pos = begin;
    for (int i = tensor_of(t.offsets, t.num_tensors, pos); pos < end; ++i) {
      const int64_t stop = t.offsets[i + 1] < end ? t.offsets[i + 1] : end;
      apply_range<Wide, T>(local, i, pos - t.offsets[i], stop - t.offsets[i]);
      pos = stop;
    }
  });
}

// The blocked walk (8-bit state, common/state8.h): every tensor is cut into blocks of
// `block` elements (its last one may be shorter) and each thread takes a contiguous range
// of the call's blocks; k.block(i, lo, hi) processes elements [lo, hi) of tensor i.
// Blocks are independent, so the results do not depend on the thread count either.
template <class Kernel>
void run_blocks(const cpu::TensorTable& t, int64_t block, const Kernel& k) {
  const int n = t.num_tensors;
  std::vector<int64_t> first(size_t(n) + 1, 0);  // first[i]: the call's index of i's block 0
  for (int i = 0; i < n; ++i) {
    const int64_t size = t.offsets[i + 1] - t.offsets[i];
    first[size_t(i) + 1] = first[size_t(i)] + size / block + (size % block != 0);
  }
  const int64_t blocks = first[size_t(n)];
  if (blocks == 0) return;
  const int threads = t.offsets[n] >= kParallelMinElements ? t.num_threads : 1;
  parallel_region(threads, [&](int tid, int nt) {
    int64_t begin, end;
    static_share(blocks, tid, nt, begin, end);
    for (int64_t b = begin, i = begin < end ? tensor_of(first.data(), n, b) : 0; b < end; ++b) {
      while (first[size_t(i) + 1] <= b) ++i;
      const int64_t lo = (b - first[size_t(i)]) * block;
      const int64_t size = t.offsets[i + 1] - t.offsets[i];
      k.block(int(i), lo, lo + block < size ? lo + block : size);
    }
  });
}

FASTOPT_ISA_END
