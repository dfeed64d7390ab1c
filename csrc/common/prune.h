// Magnitude pruning: the order of elements and the radix select that finds the threshold,
// one source for the CPU kernels (cpu/prune_kernels.cpp) and the CUDA kernels
// (cuda/prune_kernels.cu), so both prune exactly the same elements.
//
// Order. An element's key is its bit pattern with the sign cleared: for non-negative IEEE
// floats the integer order of the bits is the order of the values (-0 and +0 tie), and
// every NaN is given the one key just above +Inf, so NaN ranks as the largest magnitude
// (as in torch.topk) and NaNs tie with each other. Equal keys are ranked by position: the
// element earlier in the call (list order of the arrays, then flat C-order index) ranks
// lower. Pruning k elements prunes the k lowest ranks, so exactly k are zeroed; that is a
// stable ascending sort by |x| cut after k, computed without sorting.
//
// Selection (unstructured). The key T of rank k-1 (0-based) is found digit by digit from
// the top (RadixDigits): each pass histograms the next digit of the elements whose
// higher digits equal T's so far and picks the bin holding the sought rank. After the last
// pass T is known and `rank` counts the elements with key T ranking below it, so the mask
// is key > T, except that the first rank + 1 elements with key T (in order) are pruned and
// the later ones kept.
//
// N:M. In each group of m consecutive elements the m - n of lowest rank are pruned.
#pragma once
#include <cstdint>
#include "common/platform.h"

FASTOPT_ISA_BEGIN

// Keys of each storage format: Bits is the stored word, Key the integer the order runs on
// (wide enough for bits + 1: the NaN key), inf the key of +-Inf.
struct KeyF32 {
  using Bits = uint32_t;
  using Key = uint32_t;
  static constexpr int bits = 31;
  static constexpr Key inf = 0x7f800000u;
};
struct KeyF64 {
  using Bits = uint64_t;
  using Key = uint64_t;
  static constexpr int bits = 63;
  static constexpr Key inf = 0x7ff0000000000000ull;
};
struct KeyF16 {
  using Bits = uint16_t;
  using Key = uint32_t;
  static constexpr int bits = 15;
  static constexpr Key inf = 0x7c00u;
};
struct KeyBF16 {
  using Bits = uint16_t;
  using Key = uint32_t;
  static constexpr int bits = 15;
  static constexpr Key inf = 0x7f80u;
};

// |x|'s key; NaN (any payload, either sign) -> inf + 1.
template <class F>
FASTOPT_HD typename F::Key magnitude_key(typename F::Bits stored) {
  using Key = typename F::Key;
  const Key magnitude = Key(stored) & ((Key(1) << F::bits) - 1);
  return magnitude > F::inf ? F::inf + 1 : magnitude;
}

// ---- radix select ----------------------------------------------------------------------
constexpr int kDigitBits = 11;
constexpr int kRadixBins = 1 << kDigitBits;  // the most bins of a pass after the first

// The digits, from the top: the first `first_bits` wide (the CPU takes 16 bits for large
// selections, the GPU kDigitBits: its histogram lives in shared memory), the others
// kDigitBits; the last may be narrower. Any schedule selects the same threshold.
struct RadixDigits {
  int key_bits, first_bits;

  FASTOPT_HD int passes() const {
    return key_bits <= first_bits ? 1 : 1 + (key_bits - first_bits + kDigitBits - 1) / kDigitBits;
  }
  // Pass p reads key bits [shift(p), high(p)).
  FASTOPT_HD int high(int pass) const {
    return pass == 0 ? key_bits : key_bits - first_bits - (pass - 1) * kDigitBits;
  }
  FASTOPT_HD int shift(int pass) const {
    const int s = high(pass) - (pass == 0 ? first_bits : kDigitBits);
    return s > 0 ? s : 0;
  }
  FASTOPT_HD int bins(int pass) const { return 1 << (high(pass) - shift(pass)); }
};

// The threshold found so far: the key digits above the current pass (prefix) and the
// 0-based rank sought among the elements sharing them.
template <class Key>
struct RadixState {
  Key prefix;
  int64_t rank;
};

// Whether `key` takes part in pass `pass` (its digits above it equal the prefix).
template <class Key>
FASTOPT_HD bool in_prefix(Key key, const RadixState<Key>& s, const RadixDigits& d, int pass) {
  const int high = d.high(pass);
  return (key >> high) == (s.prefix >> high);
}
template <class Key>
FASTOPT_HD int digit_of(Key key, const RadixDigits& d, int pass) {
  return int((key >> d.shift(pass)) & Key(d.bins(pass) - 1));
}

// One pass's choice: the bin of counts[0 .. bins) holding rank s.rank; its digit joins the
// prefix and the rank becomes the rank within the bin. Returns the bin. (The counts sum to
// more than the rank; the last bin is the answer should they not.)
template <class Key, class Count>
FASTOPT_HD int radix_choose(RadixState<Key>& s, const Count* counts, const RadixDigits& d,
                            int pass) {
  const int bins = d.bins(pass);
  int64_t below = 0;
  int b = 0;
  for (; b < bins - 1; ++b) {
    if (below + int64_t(counts[b]) > s.rank) break;
    below += int64_t(counts[b]);
  }
  s.prefix |= Key(b) << d.shift(pass);
  s.rank -= below;
  return b;
}

// The start of a selection pruning k of n elements (0 < k < n; k = 0 keeps and k = n
// prunes everything without one).
template <class Key>
FASTOPT_HD RadixState<Key> radix_start(int64_t k) {
  return {Key(0), k - 1};
}

// ---- N:M --------------------------------------------------------------------------------
constexpr int kMaxGroup = 64;  // the largest m (the rank is O(m) per element)

// Whether element j of a group of m keys is kept when the `pruned` lowest ranks are pruned.
template <class Key>
FASTOPT_HD bool group_kept(const Key* keys, int m, int j, int pruned) {
  int rank = 0;
  for (int i = 0; i < m; ++i) rank += keys[i] < keys[j] || (keys[i] == keys[j] && i < j);
  return rank >= pruned;
}

FASTOPT_ISA_END
