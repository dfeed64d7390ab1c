// Turns aligned Python lists of NumPy arrays (one list per role: params, grads, states...)
// into the pointer table the CPU kernels walk, checking everything first so that a bad
// call raises before any memory is touched. Done here, in C++, rather than in Python
// because a step over a thousand tensors must not pay microseconds per array.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <string>
#include <vector>
#include "bindings/overlap.h"
#include "cpu/multi_tensor.h"
#include "cpu/optim_kernels.h"

namespace fastopt {
namespace bindings {

namespace py = pybind11;

struct RoleSpec {
  const char* name;  // the Python argument name, used in error messages
  py::handle list;   // a list of arrays, or None when the call does not use this role
  bool written;      // written arrays must be writeable and may not overlap anything
};

class ArrayTable {
 public:
  // roles[0] (the params) fixes the list length, shapes and dtype the others must match.
  // `listed` says whether the user passed lists (messages then say "grads[3]").
  // Roles: any sequence of RoleSpec (std::array, std::vector).
  template <class Roles>
  ArrayTable(const Roles& roles, bool listed) : listed_(listed) {
    const RoleSpec& ref = *roles.begin();
    if (!py::isinstance<py::list>(ref.list))
      throw py::type_error(std::string(ref.name) + ": expected a list of arrays");
    const size_t n = py::len(ref.list);
    offsets_.assign(n + 1, 0);
    spans_.reserve(n * roles.size());
    keep_.reserve(n * roles.size());
    int r = 0;
    for (const RoleSpec& role : roles) {
      if (!role.list.is_none()) collect_role(role, r, ref, n);
      ++r;
    }
    check_no_overlap(spans_, [this](const char* role, size_t i) { return where(role, i); });
  }

  cpu::TensorTable table() const {
    cpu::TensorTable t;
    t.num_tensors = static_cast<int>(offsets_.size() - 1);
    t.offsets = offsets_.data();
    for (int r = 0; r < cpu::kMaxRoles; ++r)
      t.ptrs[r] = ptrs_[r].empty() ? nullptr : ptrs_[r].data();
    return t;
  }
  cpu::DType dtype() const { return dtype_; }
  int64_t total() const { return offsets_.back(); }

  // The Python callable (name, obj) -> ndarray used for arrays that are not NumPy's.
  static py::object& array_adapter() {
    static py::object* adapter = new py::object();  // never destroyed: no Python at exit
    return *adapter;
  }

 private:
  std::string where(const char* role, size_t i) const {
    return listed_ ? std::string(role) + "[" + std::to_string(i) + "]" : std::string(role);
  }

  static std::string shape_str(const py::detail::PyArray_Proxy* a) {
    std::string s = "(";
    for (int d = 0; d < a->nd; ++d) s += std::to_string(a->dimensions[d]) + (a->nd == 1 ? "," : d + 1 < a->nd ? ", " : "");
    return s + ")";
  }

  void collect_role(const RoleSpec& role, int r, const RoleSpec& ref, size_t n) {
    using py::detail::npy_api;
    if (!py::isinstance<py::list>(role.list))
      throw py::type_error(std::string(role.name) + ": expected a list of arrays");
    const py::list list = py::reinterpret_borrow<py::list>(role.list);
    if (list.size() != n)
      throw py::value_error(std::string(role.name) + ": expected " + std::to_string(n) +
                            " arrays (one per entry of " + ref.name + "), got " +
                            std::to_string(list.size()));
    ptrs_[r].resize(n);
    for (size_t i = 0; i < n; ++i) {
      // The kernel runs with the GIL released: hold every array it touches, so that
      // another thread emptying the caller's list cannot free one under it.
      PyObject* item = PyList_GET_ITEM(list.ptr(), i);
      keep_.push_back(py::isinstance<py::array>(item)
                          ? py::reinterpret_borrow<py::object>(item)
                          : adapt(where(role.name, i), item));
      PyObject* obj = keep_.back().ptr();
      const auto* a = py::detail::array_proxy(obj);
      const auto* descr = py::detail::array_descriptor_proxy(a->descr);
      cpu::DType dt;
      if (descr->type_num == npy_api::NPY_FLOAT_) dt = cpu::DType::f32;
      else if (descr->type_num == npy_api::NPY_DOUBLE_) dt = cpu::DType::f64;
      else
        throw py::type_error(where(role.name, i) + ": dtype " +
                             py::str(py::handle(a->descr)).cast<std::string>() +
                             " is not supported (float32 or float64)");
      if (descr->byteorder == '>')
        throw py::type_error(where(role.name, i) + ": big-endian arrays are not supported");
      if (r == 0 && i == 0) dtype_ = dt;
      else if (dt != dtype_)
        throw py::type_error(where(role.name, i) + ": dtype " +
                             std::string(dt == cpu::DType::f32 ? "float32" : "float64") +
                             " differs from " + where(ref.name, 0) + "'s " +
                             (dtype_ == cpu::DType::f32 ? "float32" : "float64") +
                             " (all arrays of one call share a dtype)");
      int64_t size = 1;
      for (int d = 0; d < a->nd; ++d) size *= a->dimensions[d];
      if (r == 0) {
        ref_arrays_.push_back(obj);
        offsets_[i + 1] = offsets_[i] + size;
      } else {
        const auto* p = py::detail::array_proxy(ref_arrays_[i]);
        bool same = p->nd == a->nd;
        for (int d = 0; same && d < a->nd; ++d) same = p->dimensions[d] == a->dimensions[d];
        if (!same)
          throw py::value_error(where(role.name, i) + ": shape " + shape_str(a) +
                                " does not match " + where(ref.name, i) + "'s shape " +
                                shape_str(p));
      }
      if (size == 0) continue;  // nothing is read or written
      if (!(a->flags & npy_api::NPY_ARRAY_C_CONTIGUOUS_))
        throw py::value_error(where(role.name, i) +
                              ": must be C-contiguous (use numpy.ascontiguousarray, and "
                              "step the contiguous array you keep)");
      if (!(a->flags & npy_api::NPY_ARRAY_ALIGNED_))
        throw py::value_error(where(role.name, i) + ": data is not aligned to its dtype");
      if (role.written && !(a->flags & npy_api::NPY_ARRAY_WRITEABLE_))
        throw py::value_error(where(role.name, i) + ": is read-only but is updated in place");
      ptrs_[r][i] = a->data;
      const uintptr_t begin = reinterpret_cast<uintptr_t>(a->data);
      spans_.push_back({begin, begin + uintptr_t(size) * (dt == cpu::DType::f32 ? 4u : 8u), role.name,
                        i, role.written});
    }
  }

  // Foreign arrays (PyTorch CPU tensors...) go through the Python adapter set by
  // set_array_adapter (fastopt._arrays.to_host_array), which returns a NumPy view of the
  // same memory or raises naming the argument.
  py::object adapt(const std::string& name, PyObject* obj) {
    if (!array_adapter())
      throw py::type_error(name + ": expected a numpy.ndarray, got " + Py_TYPE(obj)->tp_name);
    py::object view = array_adapter()(name, py::handle(obj));
    if (!py::isinstance<py::array>(view))
      throw py::type_error(name + ": expected a numpy.ndarray, got " + Py_TYPE(obj)->tp_name);
    return view;
  }

  std::vector<py::object> keep_;  // every array of the call, views of foreign ones included
  std::vector<PyObject*> ref_arrays_;  // the params, as NumPy arrays
  bool listed_;
  cpu::DType dtype_ = cpu::DType::f32;
  std::vector<int64_t> offsets_;
  std::vector<void*> ptrs_[cpu::kMaxRoles];
  std::vector<Span> spans_;
};

}  // namespace bindings
}  // namespace fastopt
