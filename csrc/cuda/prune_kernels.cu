// CUDA magnitude pruning; order, keys and the radix select are common/prune.h's, so the
// masks equal the CPU kernels'. Per radix digit: one histogram kernel (each block counts
// its chunks' digits with shared-memory atomics and adds its non-zero bins to the
// selection's global histogram) and one tiny kernel per selection that picks the bin and
// clears the histogram. Then the mask kernel writes key > threshold (1 B per element) and
// each chunk's count of keys equal to the threshold; a one-block scan numbers those ties
// and a last kernel revisits only the chunks holding ties that are kept. Everything stays
// on the stream: no host round trip. N:M: one thread per group of m.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "common/prune.h"
#include "cuda/multi_tensor.cuh"
#include "cuda/prune_kernels.h"

FASTOPT_ISA_BEGIN
namespace {

using cuda::check_launch;
using cuda::grid_for;
using cuda::kPruneChunk;
using cuda::PruneProblem;
using cuda::PruneTensor;
constexpr int kThreads = cuda::kPruneThreads;
constexpr int kScanThreads = 1024;
constexpr unsigned kHistogramBlocks = 4096;  // each block counts a contiguous run of chunks

// kDigitBits per pass: one pass's histogram fits shared memory.
template <class F>
__device__ __host__ constexpr RadixDigits digits() {
  return {F::bits, kDigitBits};
}

__device__ __forceinline__ int64_t chunks_of(const PruneTensor& t, int64_t chunk) {
  return (t.size + chunk - 1) / chunk;
}

// The tensor holding chunk c (the last with first_chunk <= c: empty tensors own no chunk).
__device__ int tensor_of_chunk(const PruneTensor* tensors, int num_tensors, int64_t c) {
  int lo = 0, hi = num_tensors;
  while (hi - lo > 1) {
    const int mid = lo + (hi - lo) / 2;
    if (tensors[mid].first_chunk <= c) lo = mid; else hi = mid;
  }
  return lo;
}

__device__ __forceinline__ bool selects(const PruneProblem& p) { return p.k > 0 && p.k < p.size; }

template <class F>
__global__ void __launch_bounds__(kThreads)
prune_histogram_kernel(const PruneTensor* __restrict__ tensors, int num_tensors, int64_t chunks,
                       const PruneProblem* __restrict__ problems,
                       unsigned long long* __restrict__ histograms, int pass) {
  using Key = typename F::Key;
  __shared__ unsigned counts[kRadixBins];
  constexpr RadixDigits d = digits<F>();
  const int bins = d.bins(pass);
  const int64_t per_block = (chunks + gridDim.x - 1) / gridDim.x;
  const int64_t c0 = int64_t(blockIdx.x) * per_block;
  const int64_t c1 = c0 + per_block < chunks ? c0 + per_block : chunks;
  for (int b = threadIdx.x; b < bins; b += kThreads) counts[b] = 0;
  __syncthreads();
  auto flush = [&](int problem) {  // block-uniform
    __syncthreads();
    unsigned long long* global = histograms + int64_t(problem) * kRadixBins;
    for (int b = threadIdx.x; b < bins; b += kThreads)
      if (counts[b]) {
        atomicAdd(global + b, static_cast<unsigned long long>(counts[b]));
        counts[b] = 0;
      }
    __syncthreads();
  };
  int current = -1;
  int i = c0 < c1 ? tensor_of_chunk(tensors, num_tensors, c0) : 0;
  for (int64_t c = c0; c < c1; ++c) {
    while (c >= tensors[i].first_chunk + chunks_of(tensors[i], kPruneChunk)) ++i;
    const PruneTensor& t = tensors[i];
    if (t.problem != current) {
      if (current >= 0) flush(current);
      current = t.problem;
    }
    const PruneProblem& p = problems[t.problem];
    if (!selects(p)) continue;
    const RadixState<Key> s{Key(p.prefix), p.rank};
    const auto* x = static_cast<const typename F::Bits*>(t.x);
    const int64_t lo = (c - t.first_chunk) * kPruneChunk;
    const int64_t hi = lo + kPruneChunk < t.size ? lo + kPruneChunk : t.size;
    for (int64_t e = lo + threadIdx.x; e < hi; e += kThreads) {
      const Key key = magnitude_key<F>(x[e]);
      if (in_prefix(key, s, d, pass)) atomicAdd(&counts[digit_of(key, d, pass)], 1u);
    }
  }
  if (current >= 0) flush(current);
}

// One block per selection: choose this pass's bin, then clear the histogram for the next.
template <class F>
__global__ void __launch_bounds__(kThreads)
prune_choose_kernel(PruneProblem* problems, unsigned long long* histograms, int pass) {
  using Key = typename F::Key;
  PruneProblem& p = problems[blockIdx.x];
  unsigned long long* counts = histograms + int64_t(blockIdx.x) * kRadixBins;
  if (!selects(p)) return;
  if (threadIdx.x == 0) {
    RadixState<Key> s{Key(p.prefix), p.rank};
    radix_choose(s, counts, digits<F>(), pass);
    p.prefix = uint64_t(s.prefix);
    p.rank = s.rank;
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kRadixBins; b += kThreads) counts[b] = 0;
}

// mask = key > threshold (or all 1 / all 0 for k = 0 / k = size); ties[c] = keys equal to
// the threshold in chunk c.
template <class F>
__global__ void __launch_bounds__(kThreads)
prune_mask_kernel(const PruneTensor* __restrict__ tensors, int num_tensors, int64_t chunks,
                  const PruneProblem* __restrict__ problems, unsigned long long* __restrict__ ties) {
  using Key = typename F::Key;
  __shared__ unsigned block_ties;
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const PruneTensor& t = tensors[tensor_of_chunk(tensors, num_tensors, c)];
    const PruneProblem& p = problems[t.problem];
    const auto* x = static_cast<const typename F::Bits*>(t.x);
    const int64_t lo = (c - t.first_chunk) * kPruneChunk;
    const int64_t hi = lo + kPruneChunk < t.size ? lo + kPruneChunk : t.size;
    if (threadIdx.x == 0) block_ties = 0;
    __syncthreads();
    unsigned equal = 0;
    if (selects(p)) {
      const Key threshold = Key(p.prefix);
      for (int64_t e = lo + threadIdx.x; e < hi; e += kThreads) {
        const Key key = magnitude_key<F>(x[e]);
        t.mask[e] = key > threshold;
        equal += key == threshold;
      }
    } else {
      const uint8_t keep = p.k == 0;
      for (int64_t e = lo + threadIdx.x; e < hi; e += kThreads) t.mask[e] = keep;
    }
    if (equal) atomicAdd(&block_ties, equal);
    __syncthreads();
    if (threadIdx.x == 0) ties[c] = block_ties;
    __syncthreads();
  }
}

// before[c] = ties[0] + ... + ties[c - 1] for c in [0, chunks]: one block, each thread a
// run of chunks.
__global__ void __launch_bounds__(kScanThreads)
prune_tie_scan_kernel(const unsigned long long* __restrict__ ties,
                      unsigned long long* __restrict__ before, int64_t chunks) {
  __shared__ unsigned long long partial[kScanThreads];
  const int64_t per = (chunks + kScanThreads - 1) / kScanThreads;
  const int64_t c0 = threadIdx.x * per < chunks ? threadIdx.x * per : chunks;
  const int64_t c1 = c0 + per < chunks ? c0 + per : chunks;
  unsigned long long sum = 0;
  for (int64_t c = c0; c < c1; ++c) sum += ties[c];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int offset = 1; offset < kScanThreads; offset <<= 1) {  // inclusive Hillis-Steele scan
    const unsigned long long add = threadIdx.x >= offset ? partial[threadIdx.x - offset] : 0;
    __syncthreads();
    partial[threadIdx.x] += add;
    __syncthreads();
  }
  unsigned long long run = partial[threadIdx.x] - sum;
  for (int64_t c = c0; c < c1; ++c) {
    before[c] = run;
    run += ties[c];
  }
  if (threadIdx.x == kScanThreads - 1) before[chunks] = partial[threadIdx.x];
}

// Exclusive sum over the block (kThreads threads); `warp_sums` holds kThreads / 32.
__device__ unsigned block_exclusive_sum(unsigned v, unsigned* warp_sums) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  unsigned x = v;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const unsigned y = __shfl_up_sync(0xffffffffu, x, offset);
    if (lane >= offset) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    unsigned w = lane < kThreads / 32 ? warp_sums[lane] : 0;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const unsigned y = __shfl_up_sync(0xffffffffu, w, offset);
      if (lane >= offset) w += y;
    }
    if (lane < kThreads / 32) warp_sums[lane] = w;
  }
  __syncthreads();
  const unsigned result = x - v + (warp > 0 ? warp_sums[warp - 1] : 0);
  __syncthreads();  // warp_sums is reused by the next call
  return result;
}

// The mask kernel pruned every tie; keep those from ordinal rank + 1 on (per selection, in
// position order). Each thread numbers a run of kPruneChunk / kThreads elements.
template <class F>
__global__ void __launch_bounds__(kThreads)
prune_keep_later_ties_kernel(const PruneTensor* __restrict__ tensors, int num_tensors,
                             int64_t chunks, const PruneProblem* __restrict__ problems,
                             const unsigned long long* __restrict__ ties,
                             const unsigned long long* __restrict__ before) {
  using Key = typename F::Key;
  constexpr int64_t kRun = kPruneChunk / kThreads;
  __shared__ unsigned warp_sums[kThreads / 32];
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const PruneTensor& t = tensors[tensor_of_chunk(tensors, num_tensors, c)];
    const PruneProblem& p = problems[t.problem];
    if (!selects(p) || ties[c] == 0) continue;
    const unsigned long long pruned_ties = static_cast<unsigned long long>(p.rank) + 1;
    const unsigned long long base = before[c] - before[p.first_chunk];
    if (base + ties[c] <= pruned_ties) continue;  // every tie here is pruned
    const Key threshold = Key(p.prefix);
    const auto* x = static_cast<const typename F::Bits*>(t.x);
    const int64_t lo = (c - t.first_chunk) * kPruneChunk + threadIdx.x * kRun;
    const int64_t hi = lo + kRun < t.size ? lo + kRun : t.size;
    unsigned mine = 0;
    for (int64_t e = lo; e < hi; ++e) mine += magnitude_key<F>(x[e]) == threshold;
    unsigned long long ordinal = base + block_exclusive_sum(mine, warp_sums);
    for (int64_t e = lo; e < hi; ++e)
      if (magnitude_key<F>(x[e]) == threshold) t.mask[e] = ordinal++ >= pruned_ties;
  }
}

// One thread per group of m: chunk c holds kThreads groups of its tensor.
template <class F>
__global__ void __launch_bounds__(kThreads)
prune_n_m_kernel(const PruneTensor* __restrict__ tensors, int num_tensors, int64_t chunks, int n,
                 int m) {
  using Key = typename F::Key;
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const PruneTensor& t = tensors[tensor_of_chunk(tensors, num_tensors, c)];
    const int64_t first = ((c - t.first_chunk) * kThreads + threadIdx.x) * m;
    if (first >= t.size) continue;
    const auto* x = static_cast<const typename F::Bits*>(t.x);
    Key keys[kMaxGroup];
    for (int j = 0; j < m; ++j) keys[j] = magnitude_key<F>(x[first + j]);
    for (int j = 0; j < m; ++j) t.mask[first + j] = group_kept(keys, m, j, m - n);
  }
}

// The scratch: the tensor and selection tables, a histogram per selection, ties and
// their running sums per chunk, each 16-byte aligned.
struct ScratchLayout {
  size_t tensors, problems, histograms, ties, before, total;
  ScratchLayout(int num_tensors, int num_problems, int64_t chunks) {
    auto up = [](size_t b) { return (b + 15) / 16 * 16; };
    tensors = 0;
    problems = up(tensors + sizeof(PruneTensor) * size_t(num_tensors));
    histograms = up(problems + sizeof(PruneProblem) * size_t(num_problems));
    ties = up(histograms + 8 * size_t(kRadixBins) * size_t(num_problems));
    before = up(ties + 8 * size_t(chunks));
    total = up(before + 8 * (size_t(chunks) + 1));
  }
};

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("fastopt: ") + what + " failed: " + cudaGetErrorString(err));
  }
}

void upload(void* dst, const void* src, size_t bytes, cudaStream_t s) {
  // From pageable memory: staged before the call returns, no wait for the stream.
  if (bytes) check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, s), "cudaMemcpyAsync");
}

template <class F>
void launch_prune(const PruneTensor* tensors, int num_tensors, const PruneProblem* problems,
                  int num_problems, int64_t chunks, void* scratch, cudaStream_t s) {
  const ScratchLayout L(num_tensors, num_problems, chunks);
  char* base = static_cast<char*>(scratch);
  auto* d_tensors = reinterpret_cast<PruneTensor*>(base + L.tensors);
  auto* d_problems = reinterpret_cast<PruneProblem*>(base + L.problems);
  auto* histograms = reinterpret_cast<unsigned long long*>(base + L.histograms);
  auto* ties = reinterpret_cast<unsigned long long*>(base + L.ties);
  auto* before = reinterpret_cast<unsigned long long*>(base + L.before);
  upload(d_tensors, tensors, sizeof(PruneTensor) * size_t(num_tensors), s);
  upload(d_problems, problems, sizeof(PruneProblem) * size_t(num_problems), s);
  check(cudaMemsetAsync(histograms, 0, L.ties - L.histograms, s), "cudaMemsetAsync");
  const unsigned histogram_grid =
      unsigned(chunks < int64_t(kHistogramBlocks) ? (chunks > 0 ? chunks : 1) : kHistogramBlocks);
  for (int pass = 0; pass < digits<F>().passes(); ++pass) {
    prune_histogram_kernel<F><<<histogram_grid, kThreads, 0, s>>>(
        d_tensors, num_tensors, chunks, d_problems, histograms, pass);
    check_launch("prune_histogram");
    prune_choose_kernel<F><<<unsigned(num_problems), kThreads, 0, s>>>(d_problems, histograms, pass);
    check_launch("prune_choose");
  }
  const unsigned grid = grid_for(chunks, 1);
  prune_mask_kernel<F><<<grid, kThreads, 0, s>>>(d_tensors, num_tensors, chunks, d_problems, ties);
  check_launch("prune_mask");
  prune_tie_scan_kernel<<<1, kScanThreads, 0, s>>>(ties, before, chunks);
  check_launch("prune_tie_scan");
  prune_keep_later_ties_kernel<F><<<grid, kThreads, 0, s>>>(d_tensors, num_tensors, chunks,
                                                            d_problems, ties, before);
  check_launch("prune_keep_later_ties");
}

template <class F>
void launch_n_m(const PruneTensor* tensors, int num_tensors, int64_t chunks, int n, int m,
                void* scratch, cudaStream_t s) {
  auto* d_tensors = static_cast<PruneTensor*>(scratch);
  upload(d_tensors, tensors, sizeof(PruneTensor) * size_t(num_tensors), s);
  prune_n_m_kernel<F><<<grid_for(chunks, 1), kThreads, 0, s>>>(d_tensors, num_tensors, chunks, n, m);
  check_launch("prune_n_m");
}

#define FASTOPT_BY_KEY(dtype, fn, ...)                    \
  switch (dtype) {                                        \
    case cuda::DType::f64: fn<KeyF64>(__VA_ARGS__); break;  \
    case cuda::DType::f16: fn<KeyF16>(__VA_ARGS__); break;  \
    case cuda::DType::bf16: fn<KeyBF16>(__VA_ARGS__); break; \
    default: fn<KeyF32>(__VA_ARGS__); break;              \
  }

}  // namespace
FASTOPT_ISA_END

namespace fastopt {
namespace cuda {

size_t prune_scratch_bytes(int num_tensors, int num_problems, int64_t chunks) {
  return ScratchLayout(num_tensors, num_problems, chunks).total;
}

void prune_magnitude(DType dtype, const PruneTensor* tensors, int num_tensors,
                     const PruneProblem* problems, int num_problems, int64_t chunks,
                     void* scratch, cudaStream_t s) {
  FASTOPT_BY_KEY(dtype, launch_prune, tensors, num_tensors, problems, num_problems, chunks,
                 scratch, s);
}

void prune_n_m(DType dtype, const PruneTensor* tensors, int num_tensors, int64_t chunks, int n,
               int m, void* scratch, cudaStream_t s) {
  FASTOPT_BY_KEY(dtype, launch_n_m, tensors, num_tensors, chunks, n, m, scratch, s);
}

}  // namespace cuda
}  // namespace fastopt
