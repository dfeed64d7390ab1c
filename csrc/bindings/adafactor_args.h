// The argument checks of the Adafactor bindings, shared by fastopt._cpu and fastopt._cuda so
// that both refuse the same calls with the same messages: the hyper-parameters, the step
// counts, which state a param of a given shape keeps and its shapes, and the view of a
// param as (batch, rows, cols). (The arrays themselves are read and checked by each
// module's own array code.)
#pragma once
#include <pybind11/pybind11.h>
#include <cmath>
#include <limits>
#include <string>
#include <vector>
#include "bindings/optim_binding.h"
#include "bindings/overlap.h"
#include "common/optim/adafactor.h"

namespace fastopt {
namespace bindings {
namespace adafactor {

namespace py = pybind11;

// A real hyper-parameter in [lo, hi], not NaN, else ValueError naming it.
inline double number(py::handle v, const char* name, double lo, double hi, const char* range) {
  const double x = scalar_arg<double>(v, name);
  if (!(x >= lo && x <= hi))
    throw py::value_error(std::string(name) + ": must be " + range + ", got " +
                          py::repr(v).cast<std::string>());
  return x;
}

inline AdafactorHyper hyper(py::handle lr, py::handle beta2_decay, py::handle eps1, py::handle eps2,
                            py::handle d, py::handle weight_decay, py::handle maximize) {
  const double inf = std::numeric_limits<double>::infinity(), big = std::numeric_limits<double>::max();
  AdafactorHyper h{};
  h.lr = number(lr, "lr", 0.0, big, "finite and >= 0");
  h.beta2_decay = number(beta2_decay, "beta2_decay", -big, 0.0, "finite and <= 0");
  h.eps1 = number(eps1, "eps1", 0.0, big, "finite and >= 0");
  h.eps2 = number(eps2, "eps2", 0.0, big, "finite and >= 0");
  h.d = number(d, "d", 1.0, inf, ">= 1");
  h.weight_decay = number(weight_decay, "weight_decay", 0.0, big, "finite and >= 0");
  h.maximize = scalar_arg<bool>(maximize, "maximize");
  return h;
}

// stochastic_seed (None: round to nearest) and master_params (None or a list) into h, as
// the elementwise steps take them: the seed checked, the two exclusive.
inline void rounding(py::handle seed, py::handle master_params, AdafactorHyper& h) {
  if (seed.is_none()) return;
  h.seed = stochastic_seed_arg(seed.ptr());
  h.stochastic = true;
  if (!master_params.is_none()) masters_exclude_stochastic();
}

// steps: a list of n whole numbers in [1, 2**53], the step each param takes.
inline std::vector<double> steps(py::handle list, size_t n) {
  if (!py::isinstance<py::list>(list) || py::len(list) != n)
    throw py::type_error("steps: expected a list of " + std::to_string(n) +
                         " numbers (one per param)");
  std::vector<double> out(n);
  for (size_t i = 0; i < n; ++i) {
    const std::string w = Where{"steps", i, true}.str();
    const double t = scalar_arg<double>(PyList_GET_ITEM(list.ptr(), i), w.c_str());
    if (!(t >= 1.0 && t <= 9007199254740992.0 && t == std::floor(t)))
      throw py::value_error(w + ": must be a whole number in [1, 2**53], got " + std::to_string(t));
    out[i] = t;
  }
  return out;
}

// The three state lists, in the bindings' argument order.
enum State : int { row_vars, col_vars, variances, num_states };
constexpr const char* kStateNames[num_states] = {"row_vars", "col_vars", "variances"};

// Whether a param of this shape keeps state `s` (two or more dimensions: the factors).
inline bool keeps(const std::vector<int64_t>& shape, int s) {
  return (shape.size() >= 2) == (s != variances);
}

// The shape of state `s` of a param of this shape: torch's (..., rows, 1), (..., 1, cols),
// or the param's own.
inline std::vector<int64_t> state_shape(std::vector<int64_t> shape, int s) {
  if (s == row_vars) shape.back() = 1;
  if (s == col_vars) shape[shape.size() - 2] = 1;
  return shape;
}

// Entry i of state list `s`, checked to be None exactly when the param keeps no such state.
inline py::handle entry(py::handle list, int s, size_t i, const std::vector<int64_t>& shape,
                        bool listed) {
  const py::handle item = PyList_GET_ITEM(list.ptr(), i);
  const bool wanted = keeps(shape, s);
  if (wanted == item.is_none())
    throw py::value_error(Where{kStateNames[s], i, listed}.str() +
                          (wanted ? ": required (params of " : ": must be None (params of ") +
                          (s == variances ? "fewer than two" : "two or more") +
                          " dimensions keep this state)");
  return item;
}

// State list `s` checked to be a list of n entries.
inline void check_list(py::handle list, int s, size_t n) {
  if (!py::isinstance<py::list>(list))
    throw py::type_error(std::string(kStateNames[s]) + ": expected a list of arrays and None");
  if (py::len(list) != n)
    throw py::value_error(std::string(kStateNames[s]) + ": expected " + std::to_string(n) +
                          " entries (one per param), got " + std::to_string(py::len(list)));
}

// ValueError: state entry i of list `s` has not the shape its param's state has.
[[noreturn]] inline void wrong_shape(int s, size_t i, const std::vector<int64_t>& param_shape,
                                     bool listed) {
  const std::vector<int64_t> want = state_shape(param_shape, s);
  std::string text = "(";
  for (size_t j = 0; j < want.size(); ++j)
    text += std::to_string(want[j]) + (want.size() == 1 ? "," : j + 1 < want.size() ? ", " : "");
  throw py::value_error(Where{kStateNames[s], i, listed}.str() + ": expected shape " + text +
                        ") for " + Where{"params", i, listed}.str() + "'s Adafactor state");
}

// A param of this shape as the kernels see it (batch, rows, cols), at step t, no pointers.
inline AdafactorParam view(const std::vector<int64_t>& shape, double t) {
  AdafactorParam a{nullptr, nullptr, nullptr, nullptr, nullptr, 1, 1, 1, t, nullptr};
  if (shape.size() >= 2) {
    a.rows = shape[shape.size() - 2];
    a.cols = shape.back();
    for (size_t k = 0; k + 2 < shape.size(); ++k) a.batch *= shape[k];
  } else {
    a.cols = shape.empty() ? 1 : shape[0];
  }
  return a;
}

// ValueError: param i is not in C order.
[[noreturn]] inline void not_c_order(size_t i, bool listed) {
  throw py::value_error(Where{"params", i, listed}.str() +
                        ": must be C-contiguous (Adafactor factors its last two dimensions)");
}

}  // namespace adafactor
}  // namespace bindings
}  // namespace fastopt
