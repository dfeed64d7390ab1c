// The parts of an optimizer binding that _cpu and _cuda share, generated from the
// optimizer's descriptor (common/optim/<name>.h): reading the call's arguments and
// describing the optimizer to Python.
//
// A step binding is called as  name(<one list per role, in roles[] order>, listed,
// **keywords), the keywords being every Hyper field by its name, `step` when the optimizer
// takes it, optionally `grad_scale` (the grads are divided by it as they are loaded: a
// GradScaler's scale, unscaled inside the one pass), `grad_clip` (then multiplied by it: a
// clip coefficient in [0, 1], or NaN) and `masks` (None, or a list of one
// bool/uint8 array per param, shaped like it: where 0, the param is set to 0 and no state
// changes), `stochastic_seed` (bfloat16 params rounded stochastically with this seed,
// common/rounding.h) and `absmax` (8-bit state, common/state8.h: {state name: a list of
// float32 block maxima per tensor}, the state lists then holding uint8 codes), and what
// the module adds (the CUDA
// module: stream, plan). Every argument is
// checked here, so a direct call with a missing, unknown or mistyped argument raises a
// TypeError/ValueError naming it (Python has validated the ranges already).
#pragma once
#include <pybind11/pybind11.h>
#include <array>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>
#include "common/optim/registry.h"

namespace fastopt {
namespace bindings {

namespace py = pybind11;

inline const char* kind_name(RoleKind k) {
  return k == RoleKind::param   ? "param"
         : k == RoleKind::grad  ? "grad"
         : k == RoleKind::state ? "state"
                                : "mask";
}

// A keyword's value as a double: a Python float or int (not bool), finite or not.
inline void read_keyword(const char* name, PyObject* v, double& out) {
  if (PyFloat_Check(v)) {
    out = PyFloat_AS_DOUBLE(v);
    return;
  }
  if (PyLong_Check(v) && !PyBool_Check(v)) {
    out = PyLong_AsDouble(v);
    if (out == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      throw py::value_error(std::string(name) + ": out of the float range");
    }
    return;
  }
  throw py::type_error(std::string(name) + ": expected a real number, got " +
                       Py_TYPE(v)->tp_name);
}

inline void read_keyword(const char* name, PyObject* v, bool& out) {
  if (!PyBool_Check(v))
    throw py::type_error(std::string(name) + ": expected a bool, got " + Py_TYPE(v)->tp_name);
  out = v == Py_True;
}

inline void read_keyword(const char* name, PyObject* v, int64_t& out) {
  if (!PyLong_Check(v) || PyBool_Check(v))
    throw py::type_error(std::string(name) + ": expected an integer, got " + Py_TYPE(v)->tp_name);
  int overflow = 0;
  const long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
  if (overflow || (x == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    throw py::value_error(std::string(name) + ": out of the 64-bit integer range");
  }
  out = x;
}

inline void read_keyword(const char* name, PyObject* v, uint64_t& out) {
  if (!PyLong_Check(v) || PyBool_Check(v))
    throw py::type_error(std::string(name) + ": expected an integer, got " + Py_TYPE(v)->tp_name);
  const unsigned long long x = PyLong_AsUnsignedLongLong(v);
  if (x == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error(std::string(name) + ": out of the unsigned 64-bit integer range");
  }
  out = x;
}

// A scalar argument of a binding that takes py::object (not pybind11's typed casters, whose
// "incompatible function arguments" names no argument and prints every array given), read
// with read_keyword's checks: TypeError/ValueError naming it.
template <class T> T scalar_arg(py::handle v, const char* name) {
  T out{};
  read_keyword(name, v.ptr(), out);
  return out;
}

// Interned names, created once per call site (lookups by identity are then cheap).
inline PyObject* interned_key(const char* name) { return PyUnicode_InternFromString(name); }

// The keyword `name` of kw (nullptr when absent).
inline PyObject* keyword(PyObject* kw, PyObject* name) {
  PyObject* v = kw ? PyDict_GetItemWithError(kw, name) : nullptr;
  if (!v && PyErr_Occurred()) throw py::error_already_set();
  return v;
}

// The arguments of one step call of optimizer Opt: its role lists (None for an optional
// role the options do not use), `listed`, the hyper-parameters and the step count.
template <class Opt> struct StepCall {
  std::array<py::object, Opt::num_roles> lists;
  bool listed = false;
  typename Opt::Hyper hyper{};
  StepOptions options;  // step, grad_scale, stochastic rounding
  py::object masks = py::none();  // a list of masks, or None: an unmasked step
  py::object absmax = py::none();  // 8-bit state: {state name: list of block maxima}
  unsigned fresh = 0;       // bit r: role r is written but not read at this step

  // `extras`: the module's own keywords, read by the caller (they only count here).
  StepCall(const py::args& args, const py::kwargs& kwargs,
           std::initializer_list<const char*> extras) {
    constexpr size_t n = Opt::num_roles;
    if (args.size() != n + 1) {
      std::string names;
      for (const Role& r : Opt::roles) names += std::string(r.name) + ", ";
      throw py::type_error(std::string(Opt::name) + "(): expected " + std::to_string(n + 1) +
                           " positional arguments (" + names + "listed), got " +
                           std::to_string(args.size()));
    }
    PyObject* kw = kwargs.ptr();
    size_t found = 0;
    const std::vector<PyObject*>& keys = field_keys();
    Opt::for_each_field(hyper, [&](const char* name, auto& field) {
      PyObject* v = keyword(kw, keys[found]);
      if (!v) throw py::type_error(std::string(Opt::name) + "(): missing keyword '" + name + "'");
      read_keyword(name, v, field);
      ++found;
    });
    if (Opt::takes_step) {
      static PyObject* step_key = interned_key("step");
      PyObject* v = keyword(kw, step_key);
      if (!v) throw py::type_error(std::string(Opt::name) + "(): missing keyword 'step'");
      read_keyword("step", v, options.step);
      if (options.step < 1)
        throw py::value_error("step: must be >= 1, got " + std::to_string(options.step));
      ++found;
    }
    static PyObject* scale_key = interned_key("grad_scale");
    if (PyObject* v = keyword(kw, scale_key)) {
      read_keyword("grad_scale", v, options.grad_scale);
      if (!(options.grad_scale > 0.0) || options.grad_scale == HUGE_VAL)
        throw py::value_error("grad_scale: must be finite and > 0, got " +
                              std::to_string(options.grad_scale));
      ++found;
    }
    static PyObject* clip_key = interned_key("grad_clip");
    if (PyObject* v = keyword(kw, clip_key)) {
      read_keyword("grad_clip", v, options.grad_clip);
      if (!(options.grad_clip >= 0.0 && options.grad_clip <= 1.0) && options.grad_clip == options.grad_clip)
        throw py::value_error("grad_clip: must be in [0, 1] or NaN, got " +
                              std::to_string(options.grad_clip));
      ++found;
    }
    static PyObject* seed_key = interned_key("stochastic_seed");
    if (PyObject* v = keyword(kw, seed_key)) {
      if (!PyLong_Check(v) || PyBool_Check(v))
        throw py::type_error(std::string("stochastic_seed: expected an integer, got ") +
                             Py_TYPE(v)->tp_name);
      options.seed = PyLong_AsUnsignedLongLong(v);
      if (options.seed == static_cast<uint64_t>(-1) && PyErr_Occurred()) {
        PyErr_Clear();
        throw py::value_error("stochastic_seed: must be in [0, 2**64)");
      }
      options.stochastic = true;
      ++found;
    }
    static PyObject* masks_key = interned_key("masks");
    if (PyObject* v = keyword(kw, masks_key)) {
      masks = py::reinterpret_borrow<py::object>(v);
      ++found;
    }
    static PyObject* absmax_key = interned_key("absmax");
    if (PyObject* v = keyword(kw, absmax_key)) {
      absmax = py::reinterpret_borrow<py::object>(v);
      ++found;
    }
    for (const char* extra : extras)
      if (kwargs.contains(extra)) ++found;
    if (kwargs && size_t(PyDict_Size(kw)) != found) {
      for (auto item : kwargs)
        if (!known(py::str(item.first).cast<std::string>(), extras))
          throw py::type_error(std::string(Opt::name) + "(): unexpected keyword '" +
                               py::str(item.first).cast<std::string>() + "'");
    }
    PyObject* flag = args[n].ptr();
    if (!PyBool_Check(flag))
      throw py::type_error(std::string("listed: expected a bool, got ") + Py_TYPE(flag)->tp_name);
    listed = flag == Py_True;
    for (size_t r = 0; r < n; ++r) {
      const Role& role = Opt::roles[r];
      py::object list = args[r];
      if (role.optional && !Opt::uses(hyper, int(r))) {
        list = py::none();  // the options do not use it: not even looked at
      } else if (list.is_none()) {
        if (role.optional)
          throw py::value_error(std::string(role.name) +
                                ": required by the chosen options, got None");
        throw py::type_error(std::string(role.name) + ": expected a list of arrays, got None");
      }
      if (role.written && Opt::fresh(hyper, int(r), options.step)) fresh |= 1u << r;
      lists[r] = std::move(list);
    }
  }

 private:
  // The hyper fields' names as interned strings, in field order (made once per optimizer).
  static const std::vector<PyObject*>& field_keys() {
    static const std::vector<PyObject*> keys = [] {
      std::vector<PyObject*> k;
      typename Opt::Hyper h{};
      Opt::for_each_field(h, [&](const char* name, auto&) { k.push_back(interned_key(name)); });
      return k;
    }();
    return keys;
  }
  static bool known(const std::string& name, std::initializer_list<const char*> extras) {
    bool hit = (Opt::takes_step && name == "step") || name == "grad_scale" || name == "masks" ||
               name == "stochastic_seed" || name == "grad_clip" || name == "absmax";
    typename Opt::Hyper h{};
    Opt::for_each_field(h, [&](const char* field, auto&) { hit = hit || name == field; });
    for (const char* extra : extras) hit = hit || name == extra;
    return hit;
  }
};

// {name: {"roles": [(name, kind, written, optional)], "hyper": [field names],
// "takes_step": bool}} for every optimizer of the registry (fastopt/_specs.py is checked
// against it by the tests).
inline py::dict describe_optimizers() {
  py::dict all;
  for_each_optimizer([&](auto tag) {
    using Opt = decltype(tag);
    py::list roles, hyper;
    for (const Role& r : Opt::roles)
      roles.append(py::make_tuple(r.name, kind_name(r.kind), r.written, r.optional));
    py::list nonnegative;
    for (const Role& r : Opt::roles)
      if (r.nonnegative) nonnegative.append(r.name);
    typename Opt::Hyper h{};
    Opt::for_each_field(h, [&](const char* name, auto&) { hyper.append(name); });
    py::dict d;
    d["roles"] = roles;
    d["hyper"] = hyper;
    d["takes_step"] = Opt::takes_step;
    d["nonnegative"] = nonnegative;
    all[Opt::name] = d;
  });
  return all;
}

}  // namespace bindings
}  // namespace fastopt
