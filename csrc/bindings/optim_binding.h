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
// common/rounding.h), `absmax` (8-bit state, common/state8.h: {state name: a list of
// float32 block maxima per tensor}, the state lists then holding uint8 codes) and
// `master_params` (16-bit params: a list of float32 masters, shaped and laid out like
// them, stepped in their place; the params get them rounded to nearest), `check_only`
// (True: the call's checks, raising as the step would, and nothing run: a step made of
// several calls checks them all before the first runs), and what the module adds (the
// CUDA module: stream, plan). Every argument is
// checked here, so a direct call with a missing, unknown or mistyped argument raises a
// TypeError/ValueError naming it, a real hyper-parameter outside the range fastopt/_specs.py
// gives it included (see Range). The step
// functions, and bind_step (a step with its hyper-parameters read once), are registered
// by StepBindings below and called through vectorcall.
#pragma once
#include <pybind11/pybind11.h>
#include <array>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <memory>
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

// The entries of a step's absmax= (8-bit state: {state name: a list of float32 block
// maxima per param}), matched to the state roles the call uses: names[r] is role r's name
// when the call uses it as a state, else null. Calls take(r, entry) in role order;
// refuses a non-dict, a missing entry and an entry for a state the call does not use,
// naming it. Shared by _cpu and _cuda, which check the entries' arrays.
template <class Take>
void absmax_entries(py::handle absmax, const char* const* names, int num_roles, Take&& take) {
  if (!py::isinstance<py::dict>(absmax))
    throw py::type_error(std::string("absmax: expected a dict {state name: list of arrays}, got ") +
                         Py_TYPE(absmax.ptr())->tp_name);
  const py::dict given = py::reinterpret_borrow<py::dict>(absmax);
  size_t used = 0;
  for (int r = 0; r < num_roles; ++r) {
    if (!names[r]) continue;
    ++used;
    const py::str key(names[r]);
    if (!given.contains(key))
      throw py::value_error(std::string("absmax: no entry for '") + names[r] + "'");
    take(r, given[key]);
  }
  if (given.size() == used) return;
  for (auto item : given) {
    bool known = false;
    for (int r = 0; r < num_roles; ++r)
      known = known || (names[r] && py::str(item.first).equal(py::str(names[r])));
    if (!known)
      throw py::value_error("absmax: unexpected entry " + py::repr(item.first).cast<std::string>() +
                            " (not a state this call uses)");
  }
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

// stochastic_seed: an integer in [0, 2**64), the seed of the stochastic rounding of
// bfloat16 params, else TypeError/ValueError naming it.
inline uint64_t stochastic_seed_arg(PyObject* v) {
  if (!PyLong_Check(v) || PyBool_Check(v))
    throw py::type_error(std::string("stochastic_seed: expected an integer, got ") +
                         Py_TYPE(v)->tp_name);
  const uint64_t seed = PyLong_AsUnsignedLongLong(v);
  if (seed == static_cast<uint64_t>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error("stochastic_seed: must be in [0, 2**64)");
  }
  return seed;
}

// ValueError where a call with stochastic rounding has params (any elements) of another
// dtype than bfloat16, `dtype` their name.
inline void check_stochastic_dtype(bool stochastic, bool bfloat16, const std::string& dtype) {
  if (stochastic && !bfloat16)
    throw py::value_error("rounding: 'stochastic' (stochastic_seed) applies to bfloat16 params, "
                          "these are " + dtype);
}

// A master param's dtype (TypeError unless float32, `dtype` its name) and the params' it
// goes with (ValueError unless float16 or bfloat16), named `where` and `params_where`.
inline void check_master_dtype(bool float32, const std::string& dtype, bool sixteen_bit,
                               const std::string& params_dtype, const std::string& where,
                               const std::string& params_where) {
  if (!float32)
    throw py::type_error(where + ": dtype " + dtype + " is not float32 (master params are float32)");
  if (!sixteen_bit)
    throw py::value_error(where + ": master params are for float16 or bfloat16 params; " +
                          params_where + " is " + params_dtype);
}

// ValueError: master params given with stochastic rounding.
[[noreturn]] inline void masters_exclude_stochastic() {
  throw py::value_error("master_params: excludes stochastic rounding (stochastic_seed): "
                        "the params are the masters rounded to nearest");
}

// A scalar argument of a binding that takes py::object (not pybind11's typed casters, whose
// "incompatible function arguments" names no argument and prints every array given), read
// with read_keyword's checks: TypeError/ValueError naming it.
template <class T> T scalar_arg(py::handle v, const char* name) {
  T out{};
  read_keyword(name, v.ptr(), out);
  return out;
}

// A private copy of a list argument (a list, else returned as it is): the bindings read
// the copy, because reading an item may run Python code (a tensor subclass's
// __torch_function__, an adapter, a DLPack producer) that changes the caller's list.
inline py::object list_copy(py::handle list) {
  if (!PyList_Check(list.ptr())) return py::reinterpret_borrow<py::object>(list);
  PyObject* copy = PyList_GetSlice(list.ptr(), 0, PyList_GET_SIZE(list.ptr()));
  if (!copy) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(copy);
}

// Interned names, created once per call site (lookups by identity are then cheap).
inline PyObject* interned_key(const char* name) { return PyUnicode_InternFromString(name); }

// A keyword's name for messages: its UTF-8, lone surrogates written as \udc80.
inline std::string keyword_text(PyObject* name) {
  py::object bytes = py::reinterpret_steal<py::object>(
      PyUnicode_AsEncodedString(name, "utf-8", "backslashreplace"));
  if (!bytes) throw py::error_already_set();
  return PyBytes_AS_STRING(bytes.ptr());
}

// A call's arguments as CPython's vectorcall passes them (METH_FASTCALL | METH_KEYWORDS):
// args[0, nargs) positional, then one value per name in kwnames (a tuple, or null). The
// step bindings take them so (see add_step): no argument tuple, keyword dict or pybind11
// dispatch is built per call (~0.6 us of a small step).
struct CallArgs {
  PyObject* const* args = nullptr;
  size_t nargs = 0;
  PyObject* kwnames = nullptr;

  size_t num_keywords() const { return kwnames ? size_t(PyTuple_GET_SIZE(kwnames)) : 0; }
  PyObject* keyword_name(size_t k) const { return PyTuple_GET_ITEM(kwnames, Py_ssize_t(k)); }
  // The value of keyword `name` (an interned str), nullptr when absent: names are compared
  // by identity (Python interns the names of a call and of most dicts: two interned
  // strings are equal only if identical), and by value only when not interned.
  PyObject* keyword(PyObject* name) const {
    const size_t n = num_keywords();
    for (size_t k = 0; k < n; ++k)
      if (keyword_name(k) == name) return args[nargs + k];
    for (size_t k = 0; k < n; ++k) {
      if (PyUnicode_CHECK_INTERNED(keyword_name(k))) continue;
      const int same = PyObject_RichCompareBool(keyword_name(k), name, Py_EQ);
      if (same < 0) throw py::error_already_set();
      if (same) return args[nargs + k];
    }
    return nullptr;
  }
};

// A real hyper-parameter's interval, as fastopt/_specs.py declares it (registered at import
// through set_hyper_ranges): the step bindings refuse a value outside it, or not finite,
// as the Python API does, also when they are called directly.
struct Range {
  bool set = false;
  double lo = -std::numeric_limits<double>::infinity();
  double hi = std::numeric_limits<double>::infinity();
  bool lo_open = false, hi_open = false;

  // ValueError naming `name` unless x is finite and in the interval (Python's messages).
  void check(const char* name, double x) const {
    if (!set) return;
    const auto repr = [](double v) { return py::repr(py::float_(v)).cast<std::string>(); };
    if (!std::isfinite(x))
      throw py::value_error(std::string(name) + ": must be finite, got " + repr(x));
    if (!(lo_open ? x > lo : x >= lo) || !(hi_open ? x < hi : x <= hi))
      throw py::value_error(std::string(name) + ": must be in " + (lo_open ? "(" : "[") +
                            repr(lo) + ", " + repr(hi) + (hi_open ? ")" : "]") + ", got " +
                            repr(x));
  }
};

// [0, inf): the Newton bindings' damping and lr, as fastopt/newton.py checks them.
inline const Range kNonNegative{true, 0.0};

// The arguments of one step call of optimizer Opt: its role lists (None for an optional
// role the options do not use), `listed`, the hyper-parameters and the step count.
template <class Opt> struct StepCall {
  std::array<py::object, Opt::num_roles> lists;
  bool listed = false;
  typename Opt::Hyper hyper{};
  StepOptions options;  // step, grad_scale, stochastic rounding
  py::object masks = py::none();  // a list of masks, or None: an unmasked step
  py::object absmax = py::none();  // 8-bit state: {state name: list of block maxima}
  py::object masters = py::none();  // master_params: a list of float32 arrays, or None
  unsigned fresh = 0;       // bit r: role r is written but not read at this step
  bool check_only = false;  // check_only=True: every check of the call, then no step

  // `extras`: the module's own keywords (interned names), read by the caller. `bound`: the
  // hyper-parameters of a bound step (bind_step), which the call then must not give.
  StepCall(const CallArgs& args, std::initializer_list<PyObject*> extras,
           const typename Opt::Hyper* bound = nullptr) {
    constexpr size_t n = Opt::num_roles;
    if (args.nargs != n + 1) {
      std::string names;
      for (const Role& r : Opt::roles) names += std::string(r.name) + ", ";
      throw py::type_error(std::string(Opt::name) + "(): expected " + std::to_string(n + 1) +
                           " positional arguments (" + names + "listed), got " +
                           std::to_string(args.nargs));
    }
    size_t found = 0;
    if (bound)
      hyper = *bound;
    else
      found = read_hyper(args, hyper);
    if (Opt::takes_step) {
      static PyObject* step_key = interned_key("step");
      PyObject* v = args.keyword(step_key);
      if (!v) throw py::type_error(std::string(Opt::name) + "(): missing keyword 'step'");
      read_keyword("step", v, options.step);
      if (options.step < 1)
        throw py::value_error("step: must be >= 1, got " + std::to_string(options.step));
      ++found;
    }
    static PyObject* scale_key = interned_key("grad_scale");
    if (PyObject* v = args.keyword(scale_key)) {
      read_keyword("grad_scale", v, options.grad_scale);
      if (!(options.grad_scale > 0.0) || options.grad_scale == HUGE_VAL)
        throw py::value_error("grad_scale: must be finite and > 0, got " +
                              std::to_string(options.grad_scale));
      ++found;
    }
    static PyObject* clip_key = interned_key("grad_clip");
    if (PyObject* v = args.keyword(clip_key)) {
      read_keyword("grad_clip", v, options.grad_clip);
      if (!(options.grad_clip >= 0.0 && options.grad_clip <= 1.0) && options.grad_clip == options.grad_clip)
        throw py::value_error("grad_clip: must be in [0, 1] or NaN, got " +
                              std::to_string(options.grad_clip));
      ++found;
    }
    static PyObject* seed_key = interned_key("stochastic_seed");
    if (PyObject* v = args.keyword(seed_key)) {
      options.seed = stochastic_seed_arg(v);
      options.stochastic = true;
      ++found;
    }
    static PyObject* masks_key = interned_key("masks");
    if (PyObject* v = args.keyword(masks_key)) {
      masks = py::reinterpret_borrow<py::object>(v);
      ++found;
    }
    static PyObject* absmax_key = interned_key("absmax");
    if (PyObject* v = args.keyword(absmax_key)) {
      absmax = py::reinterpret_borrow<py::object>(v);
      ++found;
    }
    static PyObject* masters_key = interned_key("master_params");
    if (PyObject* v = args.keyword(masters_key)) {
      if (v != Py_None) {
        masters = py::reinterpret_borrow<py::object>(v);
        if (options.stochastic) masters_exclude_stochastic();
      }
      ++found;
    }
    static PyObject* check_key = interned_key("check_only");
    if (PyObject* v = args.keyword(check_key)) {
      if (!PyBool_Check(v))
        throw py::type_error(std::string("check_only: expected a bool, got ") + Py_TYPE(v)->tp_name);
      check_only = v == Py_True;
      ++found;
    }
    for (PyObject* extra : extras)
      if (args.keyword(extra)) ++found;
    if (args.num_keywords() != found) {  // an unknown keyword, or one given twice
      for (size_t k = 0; k < args.num_keywords(); ++k) {
        const std::string name = keyword_text(args.keyword_name(k));
        if (!known(name, extras, bound == nullptr))
          throw py::type_error(std::string(Opt::name) + "(): unexpected keyword '" + name + "'");
      }
      for (size_t k = 1; k < args.num_keywords(); ++k)  // equal names (str subclasses)
        for (size_t i = 0; i < k; ++i) {
          const int same = PyObject_RichCompareBool(args.keyword_name(i), args.keyword_name(k), Py_EQ);
          if (same < 0) throw py::error_already_set();
          if (same)
            throw py::type_error(std::string(Opt::name) + "(): keyword '" +
                                 keyword_text(args.keyword_name(k)) + "' given twice");
        }
    }
    PyObject* flag = args.args[n];
    if (!PyBool_Check(flag))
      throw py::type_error(std::string("listed: expected a bool, got ") + Py_TYPE(flag)->tp_name);
    listed = flag == Py_True;
    for (size_t r = 0; r < n; ++r) {
      const Role& role = Opt::roles[r];
      py::object list = py::reinterpret_borrow<py::object>(args.args[r]);
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

  // Reads every hyper field from its keyword into `hyper`, each real one checked against
  // its range; returns how many were read.
  static size_t read_hyper(const CallArgs& args, typename Opt::Hyper& hyper) {
    size_t found = 0;
    const std::vector<PyObject*>& keys = field_keys();
    Opt::for_each_field(hyper, [&](const char* name, auto& field) {
      PyObject* v = args.keyword(keys[found]);
      if (!v) throw py::type_error(std::string(Opt::name) + "(): missing keyword '" + name + "'");
      read_keyword(name, v, field);
      if constexpr (std::is_same_v<std::decay_t<decltype(field)>, double>)
        ranges()[found].check(name, field);
      ++found;
    });
    return found;
  }

  // The ranges of the hyper fields, in field order (unset until registered).
  static std::vector<Range>& ranges() {
    static std::vector<Range> r(field_keys().size());
    return r;
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
  static bool known(const std::string& name, std::initializer_list<PyObject*> extras,
                    bool hyper_keywords) {
    bool hit = (Opt::takes_step && name == "step") || name == "grad_scale" || name == "masks" ||
               name == "stochastic_seed" || name == "grad_clip" || name == "absmax" ||
               name == "master_params" || name == "check_only";
    typename Opt::Hyper h{};
    if (hyper_keywords)
      Opt::for_each_field(h, [&](const char* field, auto&) { hit = hit || name == field; });
    for (PyObject* extra : extras) hit = hit || name == PyUnicode_AsUTF8(extra);
    return hit;
  }
};

// Runs fn(args) for a vectorcall; a C++ exception becomes the Python exception pybind11
// would raise for it.
template <class Fn>
PyObject* run_vectorcall(PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames, Fn&& fn) {
  try {
    py::object out = fn(CallArgs{args, size_t(PyVectorcall_NARGS(nargs)), kwnames});
    return out.release().ptr();
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (...) {
    py::detail::try_translate_exceptions();
  }
  return nullptr;
}

// The step bindings of a module: Steps::run<Opt>(args, bound) runs one step of Opt
// (bound: the hyper-parameters of a bound step, else null: read from the keywords), and
// Steps::module_name is the module's name. add_step_bindings registers, called through
// vectorcall (no argument tuple, keyword dict or pybind11 dispatch per call: ~0.6 us of a
// small step):
//   <name>(<role lists>, listed, **keywords)   one step (the keywords at the top)
//   bind_step(name, **hyper)                    that optimizer's step with its hyper-
//     parameters read once: a function taking <name>'s other arguments (the functional
//     steps keep one per distinct set of validated values). The hyper-parameters live in
//     a capsule, the function's `self`.
template <class Steps> struct StepBindings {
  template <class Opt> static PyObject* step(PyObject*, PyObject* const* args, Py_ssize_t nargs,
                                             PyObject* kwnames) {
    return run_vectorcall(args, nargs, kwnames, [](const CallArgs& a) {
      Steps::template run<Opt>(a, nullptr);
      return py::none();
    });
  }

  template <class Opt> static PyObject* bound(PyObject* self, PyObject* const* args,
                                              Py_ssize_t nargs, PyObject* kwnames) {
    return run_vectorcall(args, nargs, kwnames, [self](const CallArgs& a) {
      const void* hyper = PyCapsule_GetPointer(self, "fastopt.Hyper");
      if (!hyper) throw py::error_already_set();
      Steps::template run<Opt>(a, static_cast<const typename Opt::Hyper*>(hyper));
      return py::none();
    });
  }

  template <class Opt> static py::object bind(const CallArgs& a) {
    using Hyper = typename Opt::Hyper;
    auto hyper = std::make_unique<Hyper>();
    if (a.num_keywords() != StepCall<Opt>::read_hyper(a, *hyper))
      throw py::type_error(std::string("bind_step(): takes '") + Opt::name +
                           "' and its hyper-parameters as keywords, nothing else");
    py::capsule holder(hyper.get(), "fastopt.Hyper", [](PyObject* c) {
      delete static_cast<Hyper*>(PyCapsule_GetPointer(c, "fastopt.Hyper"));
    });
    hyper.release();
    static PyMethodDef def = {Opt::name, function(&bound<Opt>), METH_FASTCALL | METH_KEYWORDS,
                              doc<Opt, true>()};
    return steal(PyCFunction_NewEx(&def, holder.ptr(), py::str(Steps::module_name).ptr()));
  }

  static PyObject* bind_step(PyObject*, PyObject* const* args, Py_ssize_t nargs,
                             PyObject* kwnames) {
    return run_vectorcall(args, nargs, kwnames, [](const CallArgs& a) {
      if (a.nargs != 1 || !PyUnicode_Check(a.args[0]))
        throw py::type_error("bind_step(): expected the optimizer's name (str) and keywords");
      const std::string name = keyword_text(a.args[0]);  // (\udc80 names no optimizer)
      py::object out;
      for_each_optimizer([&](auto tag) {
        using Opt = decltype(tag);
        if (name == Opt::name) out = bind<Opt>(a);
      });
      if (!out) throw py::value_error("bind_step(): name: no optimizer '" + name + "'");
      return out;
    });
  }

  static void add(py::module_& m) {
    for_each_optimizer([&](auto tag) {
      using Opt = decltype(tag);
      static PyMethodDef def = {Opt::name, function(&step<Opt>), METH_FASTCALL | METH_KEYWORDS,
                                doc<Opt, false>()};
      m.add_object(Opt::name, steal(PyCFunction_NewEx(&def, nullptr, m.attr("__name__").ptr())));
    });
    static PyMethodDef def = {"bind_step", function(&bind_step), METH_FASTCALL | METH_KEYWORDS,
                              "bind_step(name, **hyper)\nOptimizer `name`'s step function with "
                              "its hyper-parameters read once"};
    m.add_object("bind_step", steal(PyCFunction_NewEx(&def, nullptr, m.attr("__name__").ptr())));
  }

 private:
  // A step function's docstring: its signature line (as pybind11 writes one), then what it is.
  template <class Opt, bool Bound> static const char* doc() {
    static const std::string text =
        std::string(Opt::name) + "(*args, **kwargs)\nOne step of " + Opt::name +
        (Bound ? " with its hyper-parameters bound (bind_step)" : "") +
        ": (<role lists>, listed, **keywords); see optimizers()";
    return text.c_str();
  }
  using Fast = PyObject* (*)(PyObject*, PyObject* const*, Py_ssize_t, PyObject*);
  static PyCFunction function(Fast f) {
    return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(f));
  }
  static py::object steal(PyObject* fn) {
    if (!fn) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(fn);
  }
};

// set_hyper_ranges(optimizer, {field: (lo, hi, lo_open, hi_open)}): the ranges its step
// binding checks (see Range); a field or optimizer the registry does not have is refused.
inline void set_hyper_ranges(const std::string& optimizer, const py::dict& given) {
  bool known = false;
  for_each_optimizer([&](auto tag) {
    using Opt = decltype(tag);
    if (optimizer != Opt::name) return;
    known = true;
    std::vector<Range> ranges(StepCall<Opt>::ranges().size());
    size_t matched = 0, i = 0;
    typename Opt::Hyper h{};
    Opt::for_each_field(h, [&](const char* name, auto& field) {
      if (given.contains(name)) {
        if constexpr (!std::is_same_v<std::decay_t<decltype(field)>, double>)
          throw py::value_error(std::string("ranges: ") + name + " of " + optimizer + " is not real");
        const py::tuple t = given[name].cast<py::tuple>();
        if (t.size() != 4) throw py::value_error(std::string("ranges: ") + name + ": expected 4 values");
        ranges[i] = {true, t[0].cast<double>(), t[1].cast<double>(), t[2].cast<bool>(),
                     t[3].cast<bool>()};
        ++matched;
      }
      ++i;
    });
    if (matched != given.size())
      throw py::value_error("ranges: names a field " + optimizer + " does not have");
    StepCall<Opt>::ranges() = std::move(ranges);
  });
  if (!known) throw py::value_error("optimizer: no optimizer named " + optimizer);
}

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
