// Magnitude pruning on the CPU; order, keys and the radix select are common/prune.h's.
// Per problem (the arrays sharing one threshold): one read pass per radix digit (3 for
// float32, 6 for float64, 2 for 16-bit floats; later digits only count the few elements
// still in the running) builds the digit's histogram on every thread, summed after; then
// one pass reads the input and writes the mask (1 B per element) while counting, per
// chunk, the elements whose key equals the threshold. Only when some of those ties are
// kept does a last pass revisit the chunks holding them. Work is cut into fixed chunks of
// positions, so the masks do not depend on the thread count, nor on the ISA (the
// selection is integer work). Problems too small to share are run one per thread.
#include <algorithm>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "common/prune.h"
#include "cpu/multi_tensor.h"
#include "cpu/prune_kernels.h"

FASTOPT_ISA_BEGIN
namespace {

using cpu::PruneTable;

constexpr int64_t kPruneChunk = int64_t(1) << 16;  // positions per scheduling unit

inline int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// The elements of one selection: tensors [t0, t1), positions [begin, end) of the call.
struct Problem {
  int t0, t1;
  int64_t begin, end;
  int64_t k;  // elements to prune
  int64_t chunks(int64_t chunk) const { return (end - begin + chunk - 1) / chunk; }
};

// fn(tensor, lo, hi) for the pieces of chunk c (of `chunk` positions) of problem P, in
// position order; lo and hi count within the tensor.
template <class Fn>
void for_each_piece(const PruneTable& t, const Problem& P, int64_t chunk, int64_t c,
                    const Fn& fn) {
  int64_t pos = P.begin + c * chunk;
  const int64_t end = std::min(pos + chunk, P.end);
  for (int i = P.t0 + tensor_of(t.offsets + P.t0, P.t1 - P.t0, pos); pos < end; ++i) {
    const int64_t stop = std::min(t.offsets[i + 1], end);
    if (stop > pos) fn(i, pos - t.offsets[i], stop - t.offsets[i]);
    pos = stop;
  }
}

template <class F>
const typename F::Bits* input(const PruneTable& t, int i) {
  return static_cast<const typename F::Bits*>(t.x[i]);
}

// counts[b] = the number of elements of P in the running for pass `pass` whose digit is b.
template <class F>
void histogram(const PruneTable& t, const Problem& P, const RadixState<typename F::Key>& s,
               int pass, int threads, std::vector<uint64_t>& per_thread, uint64_t* counts) {
  using Key = typename F::Key;
  const int bins = digit_bins(F::bits, pass), shift = digit_shift(F::bits, pass);
  const int high = digit_high(F::bits, pass);
  const Key digit_mask = Key(bins - 1), prefix = s.prefix >> high;
  const int64_t chunks = P.chunks(kPruneChunk);
  const int nt = int(std::min<int64_t>(threads, chunks));
  per_thread.assign(size_t(nt) * size_t(bins), 0);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    uint64_t* h = per_thread.data() + size_t(thread_index()) * size_t(bins);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c)
      for_each_piece(t, P, kPruneChunk, c, [&](int i, int64_t lo, int64_t hi) {
        const auto* x = input<F>(t, i);
        if (pass == 0) {  // every element is in the running
          for (int64_t e = lo; e < hi; ++e) ++h[magnitude_key<F>(x[e]) >> shift];
        } else {
          for (int64_t e = lo; e < hi; ++e) {
            const Key key = magnitude_key<F>(x[e]);
            if ((key >> high) == prefix) ++h[(key >> shift) & digit_mask];
          }
        }
      });
  }
  for (int b = 0; b < bins; ++b) {
    uint64_t sum = 0;
    for (int k = 0; k < nt; ++k) sum += per_thread[size_t(k) * size_t(bins) + size_t(b)];
    counts[b] = sum;
  }
}

// mask = key > threshold; ties[c] = the number of keys equal to it in chunk c.
template <class F>
void write_masks(const PruneTable& t, const Problem& P, typename F::Key threshold, int threads,
                 std::vector<int64_t>& ties) {
  const int64_t chunks = P.chunks(kPruneChunk);
  ties.assign(size_t(chunks), 0);
  const int nt = int(std::min<int64_t>(threads, chunks));
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t equal = 0;
    for_each_piece(t, P, kPruneChunk, c, [&](int i, int64_t lo, int64_t hi) {
      const auto* x = input<F>(t, i);
      uint8_t* mask = t.masks[i];
      for (int64_t e = lo; e < hi; ++e) {
        const typename F::Key key = magnitude_key<F>(x[e]);
        mask[e] = key > threshold;
        equal += key == threshold;
      }
    });
    ties[size_t(c)] = equal;
  }
}

// write_masks pruned every tie; the ties from ordinal `pruned_ties` on are kept.
template <class F>
void keep_later_ties(const PruneTable& t, const Problem& P, typename F::Key threshold,
                     int64_t pruned_ties, const std::vector<int64_t>& ties, int threads) {
  std::vector<std::pair<int64_t, int64_t>> todo;  // (chunk, ties before it)
  int64_t seen = 0;
  for (size_t c = 0; c < ties.size(); ++c) {
    if (ties[c] > 0 && seen + ties[c] > pruned_ties) todo.emplace_back(int64_t(c), seen);
    seen += ties[c];
  }
  const int64_t count = int64_t(todo.size());
  const int nt = int(std::min<int64_t>(threads, count));
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t j = 0; j < count; ++j) {
    int64_t ordinal = todo[size_t(j)].second;
    for_each_piece(t, P, kPruneChunk, todo[size_t(j)].first, [&](int i, int64_t lo, int64_t hi) {
      const auto* x = input<F>(t, i);
      uint8_t* mask = t.masks[i];
      for (int64_t e = lo; e < hi; ++e)
        if (magnitude_key<F>(x[e]) == threshold) mask[e] = ordinal++ >= pruned_ties;
    });
  }
}

void fill_masks(const PruneTable& t, const Problem& P, uint8_t value, int threads) {
  const int64_t chunks = P.chunks(kPruneChunk);
  const int nt = int(std::min<int64_t>(threads, chunks));
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t c = 0; c < chunks; ++c)
    for_each_piece(t, P, kPruneChunk, c, [&](int i, int64_t lo, int64_t hi) {
      std::memset(t.masks[i] + lo, value, size_t(hi - lo));
    });
}

template <class F>
void prune_problem(const PruneTable& t, const Problem& P, int threads) {
  const int64_t n = P.end - P.begin;
  if (n == 0) return;
  if (P.k == 0 || P.k == n) {  // nothing to select
    fill_masks(t, P, P.k == 0, threads);
    return;
  }
  RadixState<typename F::Key> s = radix_start<typename F::Key>(P.k);
  std::vector<uint64_t> per_thread;
  uint64_t counts[kRadixBins];
  for (int pass = 0; pass < radix_passes(F::bits); ++pass) {
    histogram<F>(t, P, s, pass, threads, per_thread, counts);
    radix_choose(s, counts, F::bits, pass);
  }
  std::vector<int64_t> ties;
  write_masks<F>(t, P, s.prefix, threads, ties);
  keep_later_ties<F>(t, P, s.prefix, s.rank + 1, ties, threads);
}

template <class F>
void prune_magnitude_t(const PruneTable& t, int threads) {
  std::vector<Problem> large, small;
  for (int p = 0; p < t.num_problems; ++p) {
    const int t0 = t.problem_start[p], t1 = t.problem_start[p + 1];
    const Problem P{t0, t1, t.offsets[t0], t.offsets[t1], t.prune_counts[p]};
    (P.end - P.begin >= kParallelMinElements ? large : small).push_back(P);
  }
  for (const Problem& P : large) prune_problem<F>(t, P, threads);
  const int64_t count = int64_t(small.size());
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (threads > 1 && count > 1)
  for (int64_t j = 0; j < count; ++j) prune_problem<F>(t, small[size_t(j)], 1);
}

template <class F>
void prune_n_m_t(const PruneTable& t, int n, int m, int threads) {
  const int64_t total = t.offsets[t.num_tensors];
  // Chunks of whole groups; tensors hold whole groups, so every piece starts a group.
  const int64_t chunk = m * std::max<int64_t>(1, kPruneChunk / m);
  const Problem all{0, t.num_tensors, 0, total, 0};
  const int64_t chunks = all.chunks(chunk);
  const int nt = total >= kParallelMinElements ? int(std::min<int64_t>(threads, chunks)) : 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t c = 0; c < chunks; ++c)
    for_each_piece(t, all, chunk, c, [&](int i, int64_t lo, int64_t hi) {
      const auto* x = input<F>(t, i);
      uint8_t* mask = t.masks[i];
      typename F::Key keys[kMaxGroup];
      for (int64_t g = lo; g + m <= hi; g += m) {
        for (int j = 0; j < m; ++j) keys[j] = magnitude_key<F>(x[g + j]);
        for (int j = 0; j < m; ++j) mask[g + j] = group_kept(keys, m, j, m - n);
      }
    });
}

#define FASTOPT_BY_KEY(dtype, fn, ...)                                      \
  switch (dtype) {                                                          \
    case cpu::DType::f32: fn<KeyF32>(__VA_ARGS__); break;                   \
    case cpu::DType::f64: fn<KeyF64>(__VA_ARGS__); break;                   \
    case cpu::DType::f16: fn<KeyF16>(__VA_ARGS__); break;                   \
    case cpu::DType::bf16: fn<KeyBF16>(__VA_ARGS__); break;                 \
  }

}  // namespace
FASTOPT_ISA_END

namespace fastopt {
namespace cpu {
namespace FASTOPT_ISA {
namespace impl = fastopt::FASTOPT_ISA;

void prune_magnitude(const PruneTable& t, DType dtype, int threads) {
  FASTOPT_BY_KEY(dtype, impl::prune_magnitude_t, t, threads);
}

void prune_n_m(const PruneTable& t, DType dtype, int n, int m, int threads) {
  FASTOPT_BY_KEY(dtype, impl::prune_n_m_t, t, n, m, threads);
}

}  // namespace FASTOPT_ISA
}  // namespace cpu
}  // namespace fastopt
