// Argument checks shared by the host and device bindings. The aliasing check: no array a
// call writes may share memory with any other array of the call (read-only inputs may
// alias each other), a sweep over the arrays' byte spans in address order.
#pragma once
#include <pybind11/pybind11.h>
#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace fastopt {
namespace bindings {

// An argument's name for messages, built only when one is raised: "grads[3]" (or "grads"
// for a single array).
struct Where {
  const char* role;
  size_t index;
  bool listed;
  std::string str() const {
    return listed ? std::string(role) + "[" + std::to_string(index) + "]" : std::string(role);
  }
};

// Dense: the nd extents and element strides fill one block of consecutive slots in some
// order of the dimensions (C order, Fortran order, channels_last...): no gaps, no overlap,
// no negative stride. Extents of 1 may have any stride.
inline bool dense_layout(const int64_t* shape, const int64_t* strides, size_t nd) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, extent) of extents > 1
  for (size_t d = 0; d < nd; ++d)
    if (shape[d] != 1) dims.emplace_back(strides[d], shape[d]);
  std::sort(dims.begin(), dims.end());
  int64_t expected = 1;
  for (const auto& [stride, extent] : dims) {
    if (stride != expected) return false;
    expected *= extent;
  }
  return true;
}

struct Span {
  uintptr_t begin, end;
  const char* role;
  size_t index;
  bool written;
};

// Raises ValueError naming both arrays ("grads[2] overlaps params[0]") via where(role, i).
// Sorting is what costs (thousands of arrays per step), so it works on 16-byte keys, and
// when each role's spans already lie in increasing address order (the usual result of
// allocating a list of arrays in a loop) it merges those runs instead of sorting.
using SpanKey = std::pair<uintptr_t, uint32_t>;  // (begin, index into spans)

// The sweep over keys[0, n), sorted by address: the first span overlapping an earlier one
// where either is written, and that earlier one; {nullptr, nullptr} where none does.
inline std::pair<const Span*, const Span*> find_overlap(const std::vector<Span>& spans,
                                                        const SpanKey* keys, size_t n) {
  const Span* reach_any = nullptr;      // earlier span reaching furthest
  const Span* reach_written = nullptr;  // earlier written span reaching furthest
  for (size_t k = 0; k < n; ++k) {
    const Span& s = spans[keys[k].second];
    if (reach_written && s.begin < reach_written->end) return {&s, reach_written};
    if (s.written && reach_any && s.begin < reach_any->end) return {&s, reach_any};
    if (!reach_any || s.end > reach_any->end) reach_any = &s;
    if (s.written && (!reach_written || s.end > reach_written->end)) reach_written = &s;
  }
  return {nullptr, nullptr};
}

template <class Where>
void sweep_spans(const std::vector<Span>& spans, const SpanKey* keys, size_t n, const Where& where) {
  const auto [s, hit] = find_overlap(spans, keys, n);
  if (s)
    throw pybind11::value_error(where(s->role, s->index) + " overlaps " +
                                where(hit->role, hit->index) +
                                " in memory; arrays updated in place must not alias");
}

template <class Where>
void check_no_overlap(const std::vector<Span>& spans, const Where& where) {
  using Key = SpanKey;
  constexpr size_t kFew = 16;  // one array per role: sorted on the stack, nothing allocated
  if (spans.size() <= kFew) {
    Key keys[kFew];
    for (size_t k = 0; k < spans.size(); ++k) {  // insertion sort
      size_t j = k;
      for (; j > 0 && keys[j - 1].first > spans[k].begin; --j) keys[j] = keys[j - 1];
      keys[j] = {spans[k].begin, uint32_t(k)};
    }
    sweep_spans(spans, keys, spans.size(), where);
    return;
  }
  std::vector<Key> keys(spans.size());
  std::vector<size_t> run_starts{0};
  bool runs_sorted = true;
  for (size_t k = 0; k < spans.size(); ++k) {
    keys[k] = {spans[k].begin, uint32_t(k)};
    if (k > 0 && spans[k].role != spans[k - 1].role) run_starts.push_back(k);
    else if (k > 0 && spans[k].begin < spans[k - 1].begin) runs_sorted = false;
  }
  if (runs_sorted) {
    for (size_t r = 1; r < run_starts.size(); ++r) {
      const size_t end = r + 1 < run_starts.size() ? run_starts[r + 1] : keys.size();
      std::inplace_merge(keys.begin(), keys.begin() + run_starts[r], keys.begin() + end);
    }
  } else {
    std::sort(keys.begin(), keys.end());
  }
  sweep_spans(spans, keys.data(), keys.size(), where);
}

}  // namespace bindings
}  // namespace fastopt
