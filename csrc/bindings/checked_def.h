// fastopt::bindings::def: m.def with the arguments bound here, so that a call with a missing,
// unknown, repeated or surplus argument, or one of the wrong type, raises a TypeError saying
// which ("quantize_affine(): missing argument 'zero_points'"). pybind11's dispatcher answers
// such a call with its generic "incompatible function arguments" message, which lists the
// signature and every argument's repr (whole arrays). The step functions parse their own
// arguments (optim_binding.h); this serves every other function of the compiled modules.
//
// def(m, name, fn, extras...): extras are pybind11's own, as m.def takes them: py::arg("x"),
// py::arg("x") = default, py::kw_only(), and a docstring; one py::arg per parameter of fn,
// in order. The arguments are converted by pybind11's casters, as m.def would (a refusal
// names the argument).
#pragma once

#include <pybind11/pybind11.h>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#include "bindings/optim_binding.h"

namespace fastopt::bindings {

namespace py = pybind11;

namespace checked {

// One parameter: its name and its default (null: required).
struct Param {
  std::string name;
  py::object fallback;
};

struct Signature {
  std::string function;
  std::vector<Param> params;
  size_t positional = 0;  // parameters that may be given by position
  std::string doc;

  void add(const py::arg_v& a) { push(a.name, a.value); }
  void add(const py::arg& a) { push(a.name, py::object()); }
  void add(const py::kw_only&) { keyword_only_ = true; }
  void add(const char* text) { doc = text; }

  // "name(a, b, *, c=False)", as help() shows it.
  std::string text() const {
    std::string s = function + "(";
    for (size_t i = 0; i < params.size(); ++i) {
      if (i) s += ", ";
      if (i == positional) s += "*, ";
      s += params[i].name;
      if (params[i].fallback) s += "=" + std::string(py::str(py::repr(params[i].fallback)));
    }
    return s + ")";
  }

  // The call's arguments in parameter order (defaults filled in), or a TypeError.
  std::vector<py::object> bind(const py::args& args, const py::kwargs& kwargs) const {
    if (args.size() > positional)
      throw py::type_error(function + "(): takes " +
                           (positional ? "at most " + std::to_string(positional) : "no") +
                           " positional arguments (" + std::to_string(args.size()) + " given)");
    std::vector<py::object> bound(params.size());
    for (size_t i = 0; i < args.size(); ++i) bound[i] = args[i];
    for (const auto& [key, value] : kwargs) {
      const std::string name = keyword_text(key.ptr());
      size_t i = 0;
      while (i < params.size() && params[i].name != name) ++i;
      if (i == params.size())
        throw py::type_error(function + "(): unexpected keyword '" + name + "'");
      if (bound[i]) throw py::type_error(function + "(): argument '" + name + "' given twice");
      bound[i] = py::reinterpret_borrow<py::object>(value);
    }
    for (size_t i = 0; i < params.size(); ++i) {
      if (bound[i]) continue;
      if (!params[i].fallback)
        throw py::type_error(function + "(): missing argument '" + params[i].name + "'");
      bound[i] = params[i].fallback;
    }
    return bound;
  }

 private:
  bool keyword_only_ = false;

  void push(const char* name, py::object fallback) {
    params.push_back({name, std::move(fallback)});
    if (!keyword_only_) ++positional;
  }
};

// What a parameter of type T takes, for messages ("int", "str", "tuple").
template <class T>
std::string type_name() {
  if constexpr (std::is_same_v<T, bool>) return "bool";
  else if constexpr (std::is_integral_v<T>) return "int";
  else if constexpr (std::is_floating_point_v<T>) return "float";
  else if constexpr (std::is_same_v<T, std::string> || std::is_same_v<T, const char*>) return "str";
  else return py::detail::make_caster<T>::name.text;
}

template <class R, class... A, size_t... K>
py::object call(R (*fn)(A...), const Signature& sig, const std::vector<py::object>& bound,
                std::index_sequence<K...>) {
  // pybind11's casters, loaded in order (the first refused is named), kept alive for the
  // call (a const char* points into its caster)
  std::tuple<py::detail::make_caster<A>...> casters;
  [[maybe_unused]] const auto load = [&](auto& caster, size_t k, const std::string& expected) {
    if (!caster.load(bound[k], true))
      throw py::type_error(sig.function + "(): " + sig.params[k].name + ": expected " + expected +
                           ", got " + Py_TYPE(bound[k].ptr())->tp_name);
  };
  (load(std::get<K>(casters), K, type_name<std::decay_t<A>>()), ...);
  if constexpr (std::is_void_v<R>) {
    fn(py::detail::cast_op<A>(std::move(std::get<K>(casters)))...);
    return py::none();
  } else if constexpr (std::is_base_of_v<py::object, R>) {
    return fn(py::detail::cast_op<A>(std::move(std::get<K>(casters)))...);
  } else {
    return py::cast(fn(py::detail::cast_op<A>(std::move(std::get<K>(casters)))...));
  }
}

}  // namespace checked

template <class R, class... A, class... Extra>
void def(py::module_& m, const char* name, R (*fn)(A...), const Extra&... extra) {
  checked::Signature sig;
  sig.function = name;
  (sig.add(extra), ...);
  if (sig.params.size() != sizeof...(A))
    throw std::logic_error(std::string(name) + ": one py::arg per parameter expected");
  const std::string doc = sig.text() + (sig.doc.empty() ? "" : "\n\n" + sig.doc);
  py::options shown;  // (the signature is the docstring's first line, not "(*args, **kwargs)")
  shown.disable_function_signatures();
  m.def(
      name,
      [fn, sig = std::move(sig)](py::args args, py::kwargs kwargs) {
        return checked::call(fn, sig, sig.bind(args, kwargs), std::index_sequence_for<A...>{});
      },
      doc.c_str());
}

// The same for a captureless lambda.
template <class F, class... Extra>
void def(py::module_& m, const char* name, F fn, const Extra&... extra) {
  def(m, name, +fn, extra...);
}

}  // namespace fastopt::bindings
