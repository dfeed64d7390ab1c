// The size checks of the quantization and Newton bindings, shared by fastopt._cpu and
// fastopt._cuda so that both take the same arguments and refuse the same calls: every size a
// kernel uses is read once from the arrays it runs on and checked here against the others,
// raising TypeError/ValueError naming the argument before anything is written. Each binding
// describes its arrays (NumPy or CUDA) as an Arg and checks their layout itself.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

namespace fastopt {
namespace bindings {
namespace args {

namespace py = pybind11;

// One array argument: where it is, its dtype's name ("float32", "int8", ...; the producer's
// own spelling for others) and shape.
struct Arg {
  const char* name;
  std::string dtype;
  std::vector<int64_t> shape;
  int64_t size = 1;
  uintptr_t ptr = 0;
  int64_t bytes = 0;  // size * element size
  template <class T> T* data() const { return reinterpret_cast<T*>(ptr); }
};

// As Python prints a tuple: "(5,)", "(5, 4)", "()".
inline std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t d = 0; d < s.size(); ++d)
    out += std::to_string(s[d]) + (s.size() == 1 ? "," : d + 1 < s.size() ? ", " : "");
  return out + ")";
}

// a.dtype is one of `allowed`, else TypeError "<name>: dtype <d> is not supported (<shown>)".
inline void expect_dtype(const Arg& a, std::initializer_list<const char*> allowed,
                         const char* shown) {
  for (const char* d : allowed)
    if (a.dtype == d) return;
  throw py::type_error(std::string(a.name) + ": dtype " + a.dtype + " is not supported (" +
                       shown + ")");
}

// Input to quantize: float32, float16 or bfloat16.
inline void expect_float_input(const Arg& x) {
  expect_dtype(x, {"float32", "float16", "bfloat16"},
               "float32, float16, bfloat16 in native byte order");
}

// "hessians'", "x's": the possessive of an argument's name, for messages.
inline std::string possessive(const std::string& name) {
  return name + (!name.empty() && name.back() == 's' ? "'" : "'s");
}

// a has the dtype of `ref` (TypeError otherwise).
inline void expect_same_dtype(const Arg& a, const Arg& ref) {
  if (a.dtype != ref.dtype)
    throw py::type_error(std::string(a.name) + ": dtype " + a.dtype + " differs from " +
                         possessive(ref.name) + " " + ref.dtype);
}

// a has the shape of `ref` (ValueError otherwise).
inline void expect_same_shape(const Arg& a, const Arg& ref) {
  if (a.shape != ref.shape)
    throw py::value_error(std::string(a.name) + ": shape " + shape_str(a.shape) +
                          " does not match " + possessive(ref.name) + " " +
                          shape_str(ref.shape));
}

// Output of dequantize: float32, float16 or bfloat16, shaped like q.
inline void expect_dequantized(const Arg& out, const Arg& q) {
  expect_dtype(out, {"float32", "float16", "bfloat16"}, "float32, float16 or bfloat16");
  expect_same_shape(out, q);
}

// No written array (the first num_written) shares memory with any other argument.
inline void expect_disjoint(std::initializer_list<const Arg*> arrays, size_t num_written) {
  size_t i = 0;
  for (const Arg* w : arrays) {
    if (i++ == num_written) break;
    if (w->bytes == 0) continue;
    for (const Arg* o : arrays)
      if (o != w && o->bytes > 0 && w->ptr < o->ptr + uintptr_t(o->bytes) &&
          o->ptr < w->ptr + uintptr_t(w->bytes))
        throw py::value_error(std::string(w->name) + ": overlaps " + o->name +
                              " in memory; arrays updated in place must not alias");
  }
}

// Elements are laid out as (outer, channels, inner): per tensor (axis None) one channel,
// else channels = shape[axis] and inner = the product of the later dimensions.
struct Channels {
  int64_t channels, inner;
};

inline Channels channels_of(const Arg& x, py::handle axis) {
  if (axis.is_none()) return {1, std::max<int64_t>(x.size, 1)};
  if (!PyLong_Check(axis.ptr()) || PyBool_Check(axis.ptr()))
    throw py::type_error(std::string("axis: expected None or an integer, got ") +
                         Py_TYPE(axis.ptr())->tp_name);
  int overflow = 0;
  const long long a = PyLong_AsLongLongAndOverflow(axis.ptr(), &overflow);
  if (a == -1 && PyErr_Occurred()) throw py::error_already_set();
  if (overflow || a < 0 || a >= static_cast<long long>(x.shape.size()))
    throw py::value_error("axis: " + py::str(axis).cast<std::string>() + " is out of range for " + x.name +
                          " with " + std::to_string(x.shape.size()) + " dimensions");
  int64_t inner = 1;
  for (size_t d = size_t(a) + 1; d < x.shape.size(); ++d) inner *= x.shape[d];
  return {x.shape[size_t(a)], std::max<int64_t>(inner, 1)};
}

// The per-channel scales or zero points: a host float32 array of `channels` elements,
// C-contiguous and native byte order. The array is held by the caller's argument.
inline Arg channel_params(py::handle obj, const char* name, int64_t channels) {
  using py::detail::npy_api;
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(name) + ": expected a NumPy float32 array, got " +
                         Py_TYPE(obj.ptr())->tp_name);
  const auto* a = py::detail::array_proxy(obj.ptr());
  const auto* descr = py::detail::array_descriptor_proxy(a->descr);
  if (descr->type_num != npy_api::NPY_FLOAT_ || descr->byteorder == '>')
    throw py::type_error(std::string(name) + ": dtype " +
                         py::str(py::handle(a->descr)).cast<std::string>() +
                         " is not supported (native float32)");
  if (a->nd != 1 || a->dimensions[0] != channels)
    throw py::value_error(std::string(name) + ": expected shape (" + std::to_string(channels) +
                          ",), one per channel");
  if (!(a->flags & npy_api::NPY_ARRAY_C_CONTIGUOUS_) || !(a->flags & npy_api::NPY_ARRAY_ALIGNED_))
    throw py::value_error(std::string(name) + ": must be C-contiguous and aligned");
  Arg out{name, "float32", {channels}};
  out.size = channels;
  out.ptr = reinterpret_cast<uintptr_t>(a->data);
  out.bytes = channels * int64_t(sizeof(float));
  return out;
}

// Blocks of `block` consecutive elements over n elements: block > 0 (ValueError naming
// "block"). Returns ceil(n / block).
inline int64_t block_count(int64_t n, int64_t block) {
  if (block <= 0) throw py::value_error("block: must be > 0, got " + std::to_string(block));
  return n / block + (n % block != 0);
}

// absmax holds one float32 per block of x's (or q's) `n` elements.
inline void expect_absmax(const Arg& absmax, const Arg& data, int64_t block) {
  expect_dtype(absmax, {"float32"}, "float32");
  const int64_t blocks = block_count(data.size, block);
  if (absmax.shape.size() != 1 || absmax.shape[0] != blocks)
    throw py::value_error(std::string(absmax.name) + ": expected shape (" +
                          std::to_string(blocks) + ",) for " + std::to_string(data.size) +
                          " elements in blocks of " + std::to_string(block) + ", got " +
                          shape_str(absmax.shape));
}

// Batched systems: grads (..., n), hessians (..., n, n), params (when given) like grads;
// float32 or float64, one dtype; n >= 1 (the kernels divide by it). Returns {batch, n}.
struct Systems {
  int64_t batch, n;
};

inline Systems newton_systems(const Arg& hessians, const Arg& grads, const Arg* params) {
  for (const Arg* a : {&hessians, &grads, params}) {
    if (!a) continue;
    expect_dtype(*a, {"float32", "float64"}, "float32 or float64");
    expect_same_dtype(*a, hessians);
  }
  if (grads.shape.empty())
    throw py::value_error(std::string(grads.name) + ": expected shape (..., n), got a 0-d array");
  const int64_t n = grads.shape.back();
  if (n < 1)
    throw py::value_error(std::string(grads.name) + ": n = " + grads.name +
                          ".shape[-1] must be >= 1, got shape " + shape_str(grads.shape));
  std::vector<int64_t> want = grads.shape;
  want.push_back(n);
  if (hessians.shape != want)
    throw py::value_error(std::string(hessians.name) + ": expected shape " + shape_str(want) +
                          " for " + grads.name + " of shape " + shape_str(grads.shape) +
                          ", got " + shape_str(hessians.shape));
  if (params) expect_same_shape(*params, grads);
  return {grads.size / n, n};
}

// The update p <- p - lr*d: params (..., n) and the steps d of its dtype and shape.
inline Systems newton_update(const Arg& params, const Arg& d) {
  expect_dtype(params, {"float32", "float64"}, "float32 or float64");
  expect_same_dtype(d, params);
  expect_same_shape(d, params);
  if (params.shape.empty() || params.shape.back() < 1)
    throw py::value_error(std::string(params.name) + ": expected shape (..., n) with n >= 1, "
                          "got " + shape_str(params.shape));
  return {params.size / params.shape.back(), params.shape.back()};
}

// A bool flag per system (solved, use): shape vectors.shape[:-1].
inline void expect_flags(const Arg& flags, const Arg& vectors) {
  expect_dtype(flags, {"bool"}, "bool");
  const std::vector<int64_t> want(vectors.shape.begin(), vectors.shape.end() - 1);
  if (flags.shape != want)
    throw py::value_error(std::string(flags.name) + ": expected shape " + shape_str(want) +
                          " (one per system of " + vectors.name + "), got " +
                          shape_str(flags.shape));
}

// ---- magnitude pruning ---------------------------------------------------------------------

// An int given as a Python int (not a bool), else TypeError naming it.
inline int64_t int_arg(py::handle obj, const std::string& name) {
  if (!PyLong_Check(obj.ptr()) || PyBool_Check(obj.ptr()))
    throw py::type_error(name + ": expected an int, got " + Py_TYPE(obj.ptr())->tp_name);
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(obj.ptr(), &overflow);
  if (overflow) throw py::value_error(name + ": out of the int64 range");
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  return v;
}

// The selections of a pruning call over arrays of `sizes` elements: prune_counts is a list
// of one count (one threshold over all arrays) or one per array, each in [0, the elements
// it covers]. Fills `counts`; returns each selection's first array (counts.size() + 1
// entries, the last = sizes.size()).
inline std::vector<int> prune_problems(py::handle prune_counts, const std::vector<int64_t>& sizes,
                                       std::vector<int64_t>& counts) {
  if (!py::isinstance<py::list>(prune_counts))
    throw py::type_error(std::string("prune_counts: expected a list of ints, got ") +
                         Py_TYPE(prune_counts.ptr())->tp_name);
  const py::list list = py::reinterpret_borrow<py::list>(prune_counts);
  counts.clear();
  for (size_t p = 0; p < list.size(); ++p)
    counts.push_back(int_arg(list[p], "prune_counts[" + std::to_string(p) + "]"));
  const size_t n = sizes.size();
  const bool global = counts.size() == 1;
  if (!global && counts.size() != n)
    throw py::value_error("prune_counts: expected 1 count (a global threshold) or " +
                          std::to_string(n) + " (one per array), got " + std::to_string(counts.size()));
  std::vector<int> starts{0};
  for (size_t p = 0; p < counts.size(); ++p) {
    starts.push_back(global ? int(n) : int(p + 1));
    int64_t covered = 0;
    for (int i = starts[p]; i < starts[p + 1]; ++i) covered += sizes[size_t(i)];
    if (counts[p] < 0 || counts[p] > covered)
      throw py::value_error("prune_counts[" + std::to_string(p) + "]: " + std::to_string(counts[p]) +
                            " is outside [0, " + std::to_string(covered) +
                            "], the number of elements it covers");
  }
  return starts;
}

// N:M groups: 1 <= m <= max_group, 0 <= n <= m, and every array's last dimension a
// multiple of m (so groups never straddle rows or arrays).
inline void expect_n_m(const std::vector<const Arg*>& arrays, int64_t n, int64_t m, int max_group) {
  if (m < 1 || m > max_group)
    throw py::value_error("m: must be in [1, " + std::to_string(max_group) + "], got " +
                          std::to_string(m));
  if (n < 0 || n > m)
    throw py::value_error("n: must be in [0, m] = [0, " + std::to_string(m) + "], got " +
                          std::to_string(n));
  for (const Arg* a : arrays)
    if (a->shape.empty() || a->shape.back() % m != 0)
      throw py::value_error(std::string(a->name) + ": the last dimension of shape " +
                            shape_str(a->shape) + " must be a multiple of m = " + std::to_string(m));
}

}  // namespace args
}  // namespace bindings
}  // namespace fastopt
