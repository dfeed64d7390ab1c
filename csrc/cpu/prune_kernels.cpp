// Magnitude pruning on the CPU; order, keys and the radix select are common/prune.h's.
// Per problem (the arrays sharing one threshold), usually two passes over the input: the
// first builds the histogram of the keys' first digit (16 bits for large problems) on
// every thread, summed after; the second writes every mask (1 B per element) by that
// digit and gathers the elements of the bin holding the threshold, in position order;
// the remaining digits and the ties are then settled on those few alone. When that bin is
// crowded (a few distinct magnitudes), each further digit takes a pass over the input,
// then one pass writes the masks counting, per chunk, the keys equal to the threshold, and
// only the chunks holding ties that are kept are revisited. Work is cut into fixed chunks
// of positions, so the masks do not depend on the thread count, nor on the ISA (the
// selection is integer work).
#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>
#include "common/prune.h"
#include "cpu/multi_tensor.h"
#include "cpu/prune_kernels.h"

FASTOPT_ISA_BEGIN
namespace {

using cpu::PruneTable;

constexpr int64_t kPruneChunk = int64_t(1) << 16;  // positions per scheduling unit

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

// Selections of at least kWideFirstMinElements take a 16-bit first digit (64K bins): the
// bin holding the threshold is then small enough (typically well under 1% of the
// elements) to gather its elements while the masks are written, and finish on them alone.
constexpr int kWideFirstDigitBits = 16;
constexpr int64_t kWideFirstMinElements = int64_t(1) << 18;

// Gathering is chosen while the threshold's bin holds at most n / 8 + kGatherSlack
// elements (12 bytes each: key and mask address); a crowded bin takes the passes instead.
constexpr int64_t kGatherSlack = int64_t(1) << 16;

template <class F>
RadixDigits digits_for(int64_t n) {
  return {F::bits, n >= kWideFirstMinElements ? kWideFirstDigitBits : kDigitBits};
}

// The chunks of P cut into `count` contiguous shares, one task each (whichever thread runs
// it), so that per-share results line up with positions.
struct Shares {
  int64_t chunks;
  int count;
  int64_t begin(int j) const { return chunks * j / count; }
};

Shares shares_of(const Problem& P, int threads) {
  const int64_t chunks = P.chunks(kPruneChunk);
  return {chunks, int(std::min<int64_t>(threads, chunks))};
}

// per_share[j * bins + b] = the number of elements of share j in the running for pass
// `pass` whose digit is b; counts[b] their sum.
template <class F>
void histogram(const PruneTable& t, const Problem& P, const RadixState<typename F::Key>& s,
               const RadixDigits& d, int pass, const Shares& sh,
               std::vector<uint64_t>& per_share, std::vector<uint64_t>& counts) {
  using Key = typename F::Key;
  const int bins = d.bins(pass), shift = d.shift(pass), high = d.high(pass);
  const Key digit_mask = Key(bins - 1), prefix = s.prefix >> high;
  per_share.assign(size_t(sh.count) * size_t(bins), 0);
#pragma omp parallel for schedule(static, 1) num_threads(sh.count) if (sh.count > 1)
  for (int j = 0; j < sh.count; ++j) {
    uint64_t* h = per_share.data() + size_t(j) * size_t(bins);
    for (int64_t c = sh.begin(j); c < sh.begin(j + 1); ++c)
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
  counts.assign(size_t(bins), 0);
  for (int j = 0; j < sh.count; ++j)
    for (int b = 0; b < bins; ++b) counts[size_t(b)] += per_share[size_t(j) * size_t(bins) + size_t(b)];
}

// The elements whose first digit is the threshold's: their keys and mask bytes, in
// position order.
template <class F>
struct Candidates {
  std::vector<typename F::Key> keys;
  std::vector<uint8_t*> masks;
};

// mask = first digit > the threshold's `bin` for every element (so those of the bin are
// pruned for now), gathering the bin's elements; per_share holds pass 0's histogram.
template <class F>
void write_masks_gathering(const PruneTable& t, const Problem& P, const RadixDigits& d, int bin,
                           const Shares& sh, const std::vector<uint64_t>& per_share,
                           Candidates<F>& out) {
  using Key = typename F::Key;
  const int bins = d.bins(0), shift = d.shift(0);
  std::vector<size_t> start(size_t(sh.count) + 1, 0);
  for (int j = 0; j < sh.count; ++j)
    start[size_t(j) + 1] = start[size_t(j)] + per_share[size_t(j) * size_t(bins) + size_t(bin)];
  out.keys.resize(start.back());
  out.masks.resize(start.back());
  const Key b = Key(bin);
#pragma omp parallel for schedule(static, 1) num_threads(sh.count) if (sh.count > 1)
  for (int j = 0; j < sh.count; ++j) {
    size_t at = start[size_t(j)];
    for (int64_t c = sh.begin(j); c < sh.begin(j + 1); ++c)
      for_each_piece(t, P, kPruneChunk, c, [&](int i, int64_t lo, int64_t hi) {
        const auto* x = input<F>(t, i);
        uint8_t* mask = t.masks[i];
        for (int64_t e = lo; e < hi; ++e) {
          const Key key = magnitude_key<F>(x[e]);
          const Key digit = key >> shift;
          mask[e] = digit > b;
          if (digit == b) {
            out.keys[at] = key;
            out.masks[at] = mask + e;
            ++at;
          }
        }
      });
  }
}

// The remaining passes on the candidates alone, then their masks: above the threshold
// kept, below pruned, equal to it kept from ordinal rank + 1 on.
template <class F>
void finish_on_candidates(Candidates<F>& cand, RadixState<typename F::Key>& s,
                          const RadixDigits& d) {
  using Key = typename F::Key;
  std::vector<uint64_t> counts;
  for (int pass = 1; pass < d.passes(); ++pass) {
    counts.assign(size_t(d.bins(pass)), 0);
    for (const Key key : cand.keys)
      if (in_prefix(key, s, d, pass)) ++counts[size_t(digit_of(key, d, pass))];
    radix_choose(s, counts.data(), d, pass);
  }
  const Key threshold = s.prefix;
  const int64_t pruned_ties = s.rank + 1;
  int64_t ordinal = 0;
  for (size_t i = 0; i < cand.keys.size(); ++i) {
    const Key key = cand.keys[i];
    *cand.masks[i] = key == threshold ? ordinal++ >= pruned_ties : key > threshold;
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
  const RadixDigits d = digits_for<F>(n);
  const Shares sh = shares_of(P, threads);
  RadixState<typename F::Key> s = radix_start<typename F::Key>(P.k);
  std::vector<uint64_t> per_share, counts;
  histogram<F>(t, P, s, d, 0, sh, per_share, counts);
  const int bin = radix_choose(s, counts.data(), d, 0);
  if (int64_t(counts[size_t(bin)]) <= n / 8 + kGatherSlack) {  // gather the bin, finish on it
    Candidates<F> cand;
    write_masks_gathering<F>(t, P, d, bin, sh, per_share, cand);
    finish_on_candidates<F>(cand, s, d);
    return;
  }
  // A crowded bin (a few distinct magnitudes): the remaining passes over all elements.
  for (int pass = 1; pass < d.passes(); ++pass) {
    histogram<F>(t, P, s, d, pass, sh, per_share, counts);
    radix_choose(s, counts.data(), d, pass);
  }
  std::vector<int64_t> ties;
  write_masks<F>(t, P, s.prefix, threads, ties);
  keep_later_ties<F>(t, P, s.prefix, s.rank + 1, ties, threads);
}

// Problems holding a large part of the call share all threads, one after the other; the
// others run one per thread, side by side (fewer parallel regions, no idle thread).
template <class F>
void prune_magnitude_t(const PruneTable& t, int threads) {
  const int64_t shared_min =
      std::max<int64_t>(kParallelMinElements, t.offsets[t.num_tensors] / (2 * int64_t(threads)));
  std::vector<Problem> large, small;
  for (int p = 0; p < t.num_problems; ++p) {
    const int t0 = t.problem_start[p], t1 = t.problem_start[p + 1];
    const Problem P{t0, t1, t.offsets[t0], t.offsets[t1], t.prune_counts[p]};
    (P.end - P.begin >= shared_min ? large : small).push_back(P);
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
    case cpu::DType::u8: break; /* 8-bit codes: the binding refuses them */ \
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
