// Turns aligned Python lists of host arrays (one list per role: params, grads, states...;
// NumPy arrays, torch CPU tensors, or what the array adapter views as NumPy) into the
// pointer table the CPU kernels walk, checking everything first so that a bad call raises
// before any memory is touched. Done here, in C++, rather than in Python
// because a step over a thousand tensors must not pay microseconds per array.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <algorithm>
#include <deque>
#include <optional>
#include <string>
#include <utility>
#include <vector>
#include "bindings/dlpack.h"
#include "bindings/optim_binding.h"
#include "bindings/overlap.h"
#include "common/optim/descriptor.h"
#include "common/quant.h"
#include "common/state8.h"
#include "cpu/multi_tensor.h"
#include "cpu/optim_kernels.h"

namespace fastopt {
namespace bindings {

namespace py = pybind11;

// Whether obj is a NumPy array of the plain ndarray type. Subclasses go through the array
// adapter: a masked array's mask or np.matrix's semantics would be silently ignored here.
inline bool is_plain_ndarray(PyObject* obj) {
  return Py_TYPE(obj) == reinterpret_cast<PyTypeObject*>(py::detail::npy_api::get().PyArray_Type_);
}

struct RoleSpec {
  const char* name;  // the Python argument name, used in error messages
  py::handle list;   // a list of arrays, or None when the call does not use this role
  bool written;      // written arrays must be writeable and may not overlap anything
  RoleKind kind;     // params/grads share the params' dtype; state is float32 for 16-bit;
                     // masks are bool or uint8 (slot cpu::kMaskSlot of the table); master
                     // params float32 (slot cpu::kMasterSlot)
};

// Attribute names as interned strings, created once per call site.
#define FASTOPT_HOST_ATTR(obj, name) \
  (obj).attr([] { static py::handle n = PyUnicode_InternFromString(name); return n; }())

// obj.name() without making a bound method (a thousand tensors a step make this count).
inline py::object call_method_no_args(py::handle obj, PyObject* name) {
  PyObject* result = PyObject_CallMethodNoArgs(obj.ptr(), name);
  if (!result) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(result);
}
#define FASTOPT_HOST_CALL(obj, name) \
  call_method_no_args((obj), [] { static PyObject* n = PyUnicode_InternFromString(name); return n; }())

class ArrayTable {
 public:
  // roles[0] (the params) fixes the list length, shapes and dtype the others must match.
  // `listed` says whether the user passed lists (messages then say "grads[3]").
  // Roles: any sequence of RoleSpec (std::array, std::vector). `absmax`: None, or for
  // 8-bit state (uint8 state arrays, common/state8.h) a dict {state role name: a list of
  // float32 arrays, tensor i's block maxima: ceil(size / 256) elements}, one entry for
  // every state role the call uses.
  // `shown`: where the lists are a selection of the caller's, the caller's index of each
  // entry (messages and spans() name those).
  template <class Roles>
  ArrayTable(const Roles& roles, bool listed, py::handle absmax = py::none(),
             std::vector<size_t> shown = {})
      : listed_(listed), shown_(std::move(shown)) {
    const RoleSpec& ref = *roles.begin();
    if (!py::isinstance<py::list>(ref.list))
      throw py::type_error(std::string(ref.name) + ": expected a list of arrays");
    const size_t n = py::len(ref.list);
    offsets_.assign(n + 1, 0);
    spans_.reserve(n * roles.size());
    keep_.reserve(n * roles.size());
    params_.reserve(n);
    int r = 0;
    for (const RoleSpec& role : roles) {
      if (!role.list.is_none()) collect_role(role, r, ref, n);
      else if (role.kind == RoleKind::param || role.kind == RoleKind::grad)
        throw py::type_error(std::string(role.name) + ": expected a list of arrays, got None");
      ++r;
    }
    collect_absmax(roles, absmax, n);
    check_no_overlap(spans_, [this](const char* role, size_t i) { return where(role, i); });
  }

  cpu::TensorTable table() const {
    cpu::TensorTable t;
    t.num_tensors = static_cast<int>(offsets_.size() - 1);
    t.offsets = offsets_.data();
    for (int r = 0; r < cpu::kMaxSlots; ++r)
      t.ptrs[r] = ptrs_[r].empty() ? nullptr : ptrs_[r].data();
    for (int r = 0; r < cpu::kMaxRoles; ++r)
      t.absmax[r] = absmax_[r].empty() ? nullptr : absmax_[r].data();
    return t;
  }
  cpu::DType dtype() const { return dtype_; }
  // Once the kernel has written the call's arrays: the version counters of the torch
  // tensors among them bumped (torch.autograd.graph.increment_version), as torch's own
  // in-place ops bump theirs, so that autograd refuses a backward through a tensor written
  // since a forward saved it. Nothing for NumPy arrays (nor inference tensors).
  void bump_versions() const {
    if (torch_written_.empty()) return;
    const TorchTypes* tt = torch_types();
    if (!tt || tt->increment_version.is_none()) return;
    py::list written(torch_written_.size());
    for (size_t i = 0; i < torch_written_.size(); ++i)
      written[i] = py::reinterpret_borrow<py::object>(torch_written_[i]);
    tt->increment_version(written);
  }
  // The state arrays' type: the params' state type, bfloat16, or u8 for 8-bit state (the
  // first state array decides; the others must match it).
  cpu::DType state_dtype() const { return state_dtype_ ? *state_dtype_ : cpu::state_dtype(dtype_); }
  int64_t total() const { return offsets_.back(); }
  // roles[0]'s array i: its shape, and whether it is in C order.
  std::vector<int64_t> shape(size_t i) const { return params_[i].shape_vector(); }
  bool c_contiguous(size_t i) const { return params_[i].c_contiguous; }
  // The byte spans of the arrays, named by the caller's indices: to check several tables
  // of one call against each other (check_no_overlap).
  std::vector<Span> spans() const {
    std::vector<Span> out = spans_;
    for (Span& s : out) s.index = shown(s.index);
    return out;
  }

  // Appends to `out` where torch tensor `obj` keeps its elements: data pointer, device,
  // dtype, shape and strides, as 64-bit words. Plain tensors (torch.Tensor, nn.Parameter)
  // are read through torch's DLPack exchange table, with no Python call; others through
  // data_ptr(), device, dtype, shape and stride(). fastopt.torch compares these words
  // between steps to see memory replaced in place (t.data = ..., t.set_(...), resize_()).
  // `item_bytes`, where given, gets the element size.
  static void torch_layout(PyObject* obj, const Where& where_, std::vector<int64_t>& out,
                           int64_t* item_bytes = nullptr) {
    const TorchTypes* tt = torch_types();
    const PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(obj));
    if (tt && tt->exchange && (type == tt->tensor.ptr() || type == tt->parameter.ptr())) {
      dlpack::Tensor t;
      if (tt->exchange->dltensor_from_py_object_no_sync(obj, &t) == 0) {
        if (item_bytes) *item_bytes = std::max<int64_t>(1, int64_t(t.dtype.bits) * t.dtype.lanes / 8);
        out.push_back(int64_t(reinterpret_cast<uintptr_t>(t.data) + t.byte_offset));
        out.push_back(int64_t(t.device.device_type) << 32 | uint32_t(t.device.device_id));
        out.push_back(int64_t(t.dtype.code) << 32 | int64_t(t.dtype.bits) << 16 | t.dtype.lanes);
        out.push_back(t.ndim);
        out.insert(out.end(), t.shape, t.shape + t.ndim);
        if (t.strides) {
          out.insert(out.end(), t.strides, t.strides + t.ndim);
        } else {  // C order
          const size_t first = out.size();
          out.resize(first + size_t(t.ndim));
          for (int64_t d = t.ndim - 1, step = 1; d >= 0; step *= t.shape[d], --d)
            out[first + size_t(d)] = step;
        }
        return;
      }
      PyErr_Clear();  // no storage, a negative view...: described below
    }
    const int is_tensor = tt ? PyObject_IsInstance(obj, tt->tensor.ptr()) : 0;
    if (is_tensor < 0) throw py::error_already_set();
    if (!is_tensor)
      throw py::type_error(where_.str() + ": expected a torch tensor, got " + Py_TYPE(obj)->tp_name);
    try {
      torch_layout_by_attributes(py::handle(obj), where_, out);
      if (item_bytes) *item_bytes = FASTOPT_HOST_CALL(py::handle(obj), "element_size").cast<int64_t>();
    } catch (py::error_already_set& e) {  // torch's refusals (no storage, an uninitialized
      // parameter, a sparse tensor's strides...), named
      if (!e.matches(PyExc_RuntimeError) && !e.matches(PyExc_ValueError)) throw;
      throw py::type_error(where_.str() + ": is not a dense tensor with memory (" + e.what() + ")");
    }
  }

  // Whether obj is a torch tensor (false where torch is not imported).
  static bool is_torch_tensor(PyObject* obj) {
    const TorchTypes* tt = torch_types();
    const int is_tensor = tt ? PyObject_IsInstance(obj, tt->tensor.ptr()) : 0;
    if (is_tensor < 0) throw py::error_already_set();
    return is_tensor;
  }

  // torch_layout for the tensors the exchange table does not describe, through Python.
  static void torch_layout_by_attributes(py::handle t, const Where& where_, std::vector<int64_t>& out) {
    const TorchTypes* tt = torch_types();
    const py::object layout = FASTOPT_HOST_ATTR(t, "layout");
    const bool nested = FASTOPT_HOST_ATTR(t, "is_nested").ptr() == Py_True;
    if (nested || !layout.is(tt->strided))
      throw py::type_error(where_.str() + ": " +
                           (nested ? std::string("nested") : py::str(layout).cast<std::string>()) +
                           " tensors are not supported (dense torch.strided tensors only)");
    const py::object data = FASTOPT_HOST_CALL(t, "data_ptr");
    out.push_back(int64_t(reinterpret_cast<uintptr_t>(PyLong_AsVoidPtr(data.ptr()))));
    // The device and dtype objects' identities: torch keeps one object per dtype, and a
    // device compares by value (its hash), so both are stable while the tensor's are.
    out.push_back(int64_t(py::hash(FASTOPT_HOST_ATTR(t, "device"))));
    out.push_back(int64_t(reinterpret_cast<uintptr_t>(FASTOPT_HOST_ATTR(t, "dtype").ptr())));
    const py::object shape = FASTOPT_HOST_ATTR(t, "shape");
    const py::object strides = FASTOPT_HOST_CALL(t, "stride");
    if (!PyTuple_Check(shape.ptr()) || !PyTuple_Check(strides.ptr()))
      throw py::type_error(where_.str() + ": its shape and stride() are not tuples");
    const Py_ssize_t nd = PyTuple_GET_SIZE(shape.ptr());
    out.push_back(nd);
    for (Py_ssize_t d = 0; d < nd; ++d) out.push_back(PyLong_AsLongLong(PyTuple_GET_ITEM(shape.ptr(), d)));
    for (Py_ssize_t d = 0; d < PyTuple_GET_SIZE(strides.ptr()); ++d)
      out.push_back(PyLong_AsLongLong(PyTuple_GET_ITEM(strides.ptr(), d)));
    if (PyErr_Occurred()) throw py::error_already_set();
  }

  // ValueError for a torch inference tensor to be written outside torch.inference_mode(),
  // which torch refuses too (anything else passes).
  static void check_inference_write(PyObject* obj, const std::string& name) {
    const TorchTypes* tt = torch_types();
    if (!tt) return;
    const int is_tensor = PyObject_IsInstance(obj, tt->tensor.ptr());
    if (is_tensor < 0) throw py::error_already_set();
    if (is_tensor && call_true(tt->is_inference, obj) && !tt->inference_mode_enabled().cast<bool>())
      throw py::value_error(name + ": is an inference tensor, which cannot be updated in place "
                            "outside torch.inference_mode()");
  }

  // The Python callable (name, obj) -> ndarray used for arrays that are not NumPy's.
  static py::object& array_adapter() {
    static py::object* adapter = new py::object();  // never destroyed: no Python at exit
    return *adapter;
  }

 private:
  size_t shown(size_t i) const { return shown_.empty() ? i : shown_[i]; }
  std::string where(const char* role, size_t i) const {
    return listed_ ? std::string(role) + "[" + std::to_string(shown(i)) + "]" : std::string(role);
  }

  // What the kernel needs to know about one array, from a NumPy array or a torch CPU tensor.
  // Shapes and strides are held inline (no allocation per array: a step may have
  // thousands); arrays of more than kInlineDims dimensions spill to the heap.
  static constexpr int kInlineDims = 8;
  struct HostArray {
    void* data = nullptr;
    cpu::DType dtype = cpu::DType::f32;
    int nd = 0;
    int64_t size = 1;
    bool writeable = true, aligned = true, c_contiguous = false;
    int64_t inline_dims[2 * kInlineDims];
    std::vector<int64_t> heap_dims;
    void resize(int n) {
      nd = n;
      if (n > kInlineDims) heap_dims.assign(2 * size_t(n), 0);
    }
    int64_t* shape() { return nd > kInlineDims ? heap_dims.data() : inline_dims; }
    int64_t* strides() { return shape() + nd; }  // in elements
    const int64_t* shape() const { return nd > kInlineDims ? heap_dims.data() : inline_dims; }
    const int64_t* strides() const { return shape() + nd; }
    std::vector<int64_t> shape_vector() const { return {shape(), shape() + nd}; }
  };

  // Whether a's strides are C order's (extents of 1 may have any stride; a zero-size array
  // is, whatever its strides, as NumPy and torch say).
  static bool c_order(const HostArray& a) {
    if (a.size == 0) return true;
    const int64_t* dims = a.shape();
    const int64_t* steps = a.strides();
    for (int64_t d = a.nd - 1, expected = 1; d >= 0; expected *= dims[d], --d)
      if (dims[d] != 1 && steps[d] != expected) return false;
    return true;
  }

  static std::string shape_str(const HostArray& a) { return shape_str(a.shape_vector()); }
  static std::string shape_str(const std::vector<int64_t>& shape) {
    std::string s = "(";
    for (size_t d = 0; d < shape.size(); ++d)
      s += std::to_string(shape[d]) + (shape.size() == 1 ? "," : d + 1 < shape.size() ? ", " : "");
    return s + ")";
  }

  [[noreturn]] static void unsupported(const Where& where, const std::string& dtype,
                                       bool state = false) {
    throw py::type_error(where.str() + ": dtype " + dtype + " is not supported (float32, float64, " +
                         (state ? "float16, bfloat16, or uint8 for 8-bit state)" : "float16 or bfloat16)"));
  }

  [[noreturn]] static void not_a_mask(const Where& where, const std::string& dtype) {
    throw py::type_error(where.str() + ": dtype " + dtype + " is not a mask's (bool or uint8)");
  }

  // Fills h (reused: no allocation per array) from NumPy array obj (a mask: bool/uint8).
  void describe_numpy(HostArray& h, PyObject* obj, const Where& where_, bool mask,
                      bool state = false) const {
    using py::detail::npy_api;
    const auto* a = py::detail::array_proxy(obj);
    const auto* descr = py::detail::array_descriptor_proxy(a->descr);
    h.size = 1;
    h.writeable = h.aligned = true;
    h.c_contiguous = false;
    if (mask) {
      if (descr->type_num != npy_api::NPY_BOOL_ && descr->type_num != npy_api::NPY_UBYTE_)
        not_a_mask(where_, py::str(py::handle(a->descr)).cast<std::string>());
      h.dtype = cpu::DType::u8;
    } else if (descr->type_num == npy_api::NPY_FLOAT_) h.dtype = cpu::DType::f32;
    else if (descr->type_num == npy_api::NPY_DOUBLE_) h.dtype = cpu::DType::f64;
    else if (descr->type_num == kNpyHalf) h.dtype = cpu::DType::f16;
    else if (is_numpy_bfloat16(descr->typeobj)) h.dtype = cpu::DType::bf16;
    else if (state && descr->type_num == npy_api::NPY_UBYTE_) h.dtype = cpu::DType::u8;
    else unsupported(where_, py::str(py::handle(a->descr)).cast<std::string>(), state);
    if (descr->byteorder == '>')
      throw py::type_error(where_.str() + ": big-endian arrays are not supported");
    h.data = a->data;
    h.resize(a->nd);
    int64_t* shape = h.shape();
    int64_t* strides = h.strides();
    const int64_t item = cpu::element_size(h.dtype);
    for (int d = 0; d < a->nd; ++d) {
      shape[d] = a->dimensions[d];
      h.size *= shape[d];
      // a stride that is no multiple of the item size can never be dense: mark it -1
      strides[d] = a->strides[d] % item == 0 ? a->strides[d] / item : -1;
    }
    h.c_contiguous = a->flags & npy_api::NPY_ARRAY_C_CONTIGUOUS_;
    h.writeable = a->flags & npy_api::NPY_ARRAY_WRITEABLE_;
    h.aligned = a->flags & npy_api::NPY_ARRAY_ALIGNED_;
  }

  // A torch CPU tensor, read through its attributes (fastopt never imports torch; the
  // types are taken from the torch module the caller imported). Other devices, sparse
  // layouts and negative views are left to the adapter's messages or refused here.
  void describe_torch(HostArray& h, PyObject* obj, const Where& where_, bool written,
                      bool mask, bool state = false) const {
    const TorchTypes& tt = *torch_types();
    py::handle t(obj);
    h.size = 1;
    h.writeable = h.aligned = true;
    h.c_contiguous = false;
    const py::object dtype = FASTOPT_HOST_ATTR(t, "dtype");
    if (mask) {
      if (!dtype.is(tt.bool_) && !dtype.is(tt.uint8))
        not_a_mask(where_, py::str(dtype).cast<std::string>());
      h.dtype = cpu::DType::u8;
    } else {
      int k = 0;
      while (k < 4 && !dtype.is(tt.dtypes[k])) ++k;
      if (k < 4) h.dtype = static_cast<cpu::DType>(k);
      else if (state && dtype.is(tt.uint8)) h.dtype = cpu::DType::u8;
      else unsupported(where_, py::str(dtype).cast<std::string>(), state);
    }
    const py::object layout = FASTOPT_HOST_ATTR(t, "layout");
    if (!layout.is(tt.strided))
      throw py::type_error(where_.str() + ": " + py::str(layout).cast<std::string>() +
                           " tensors are not supported (dense torch.strided tensors only)");
    if (FASTOPT_HOST_CALL(t, "is_neg").ptr() == Py_True)
      throw py::value_error(where_.str() + ": is a negative view; call .resolve_neg() first");
    if (written) check_inference_write(obj, where_.str());
    const py::object shape = FASTOPT_HOST_ATTR(t, "shape");
    const py::object strides = FASTOPT_HOST_CALL(t, "stride");
    // (a subclass may answer anything: a torch.Size and a tuple of as many strides)
    if (!PyTuple_Check(shape.ptr()) || !PyTuple_Check(strides.ptr()) ||
        PyTuple_GET_SIZE(shape.ptr()) != PyTuple_GET_SIZE(strides.ptr()))
      throw py::type_error(where_.str() + ": its shape and stride() are not tuples of one "
                           "entry per dimension");
    const Py_ssize_t nd = PyTuple_GET_SIZE(shape.ptr());
    h.resize(int(nd));
    int64_t* dims = h.shape();
    int64_t* steps = h.strides();
    for (Py_ssize_t d = 0; d < nd; ++d) {
      dims[d] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape.ptr(), d));
      steps[d] = PyLong_AsLongLong(PyTuple_GET_ITEM(strides.ptr(), d));
      h.size *= dims[d];
    }
    h.c_contiguous = c_order(h);
    if (PyErr_Occurred()) throw py::error_already_set();
    h.data = reinterpret_cast<void*>(PyLong_AsVoidPtr(FASTOPT_HOST_CALL(t, "data_ptr").ptr()));
    h.aligned = reinterpret_cast<uintptr_t>(h.data) % cpu::element_size(h.dtype) == 0;
  }

  // The fast way to describe a plain torch CPU tensor (torch.Tensor or nn.Parameter, not a
  // subclass, which may answer differently): torch's DLPack exchange table, no Python call
  // but is_neg() (and is_inference() for written ones). False, and nothing set, where it
  // does not apply or the tensor is one describe_torch refuses or explains (another device,
  // dtype or layout, a negative view, an inference tensor to write): that path then runs.
  bool describe_torch_exchange(HostArray& h, PyObject* obj, bool written, bool mask) const {
    const TorchTypes* tt = torch_types();
    if (!tt || !tt->exchange) return false;
    const PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(obj));
    if (type != tt->tensor.ptr() && type != tt->parameter.ptr()) return false;
    dlpack::Tensor t;
    if (tt->exchange->dltensor_from_py_object_no_sync(obj, &t) != 0) {
      PyErr_Clear();  // no storage, a sparse layout...: describe_torch says why
      return false;
    }
    if (t.device.device_type != dlpack::kCPU || t.dtype.lanes != 1) return false;
    cpu::DType dtype;
    if (mask) {
      if (t.dtype.bits != 8 || (t.dtype.code != dlpack::kBool && t.dtype.code != dlpack::kUInt))
        return false;
      dtype = cpu::DType::u8;
    } else if (t.dtype.code == dlpack::kFloat && t.dtype.bits == 32) dtype = cpu::DType::f32;
    else if (t.dtype.code == dlpack::kFloat && t.dtype.bits == 64) dtype = cpu::DType::f64;
    else if (t.dtype.code == dlpack::kFloat && t.dtype.bits == 16) dtype = cpu::DType::f16;
    else if (t.dtype.code == dlpack::kBfloat && t.dtype.bits == 16) dtype = cpu::DType::bf16;
    else return false;
    if (call_true(tt->is_neg, obj) || (written && call_true(tt->is_inference, obj))) return false;
    h.dtype = dtype;
    h.data = static_cast<char*>(t.data) + t.byte_offset;
    h.size = 1;
    h.writeable = true;
    h.resize(t.ndim);
    int64_t* dims = h.shape();
    int64_t* steps = h.strides();
    for (int d = t.ndim - 1, expected = 1; d >= 0; --d) {
      dims[d] = t.shape[d];
      steps[d] = t.strides ? t.strides[d] : expected;  // no strides: C order
      expected *= dims[d];
      h.size *= dims[d];
    }
    h.c_contiguous = c_order(h);
    h.aligned = reinterpret_cast<uintptr_t>(h.data) % cpu::element_size(h.dtype) == 0;
    return true;
  }

  // method(obj) is True, for a method descriptor of torch.Tensor taking no argument.
  static bool call_true(const py::object& method, PyObject* obj) {
    PyObject* result = PyObject_Vectorcall(method.ptr(), &obj, 1, nullptr);
    if (!result) throw py::error_already_set();
    Py_DECREF(result);
    return result == Py_True;
  }

  // Dense in some order of the dimensions (overlap.h's dense_layout; C order at once).
  static bool dense(const HostArray& h) {
    return h.c_contiguous || dense_layout(h.shape(), h.strides(), size_t(h.nd));
  }

  // Whether b walks its elements in the same order as a (strides equal where extent > 1).
  static bool same_order(const HostArray& a, const HostArray& b) {
    if (a.c_contiguous && b.c_contiguous) return true;
    for (int d = 0; d < a.nd; ++d)
      if (a.shape()[d] != 1 && a.strides()[d] != b.strides()[d]) return false;
    return true;
  }

  // Item i of a list argument, `list`, which becomes the list's copy (list_copy) at the
  // first item that is not a NumPy array: reading the others may run Python code (a tensor
  // subclass's __torch_function__, an adapter, a TorchFunctionMode) that changes the
  // caller's list; reading NumPy arrays runs none, and copies nothing.
  // `numpy`: whether the item is a (plain) NumPy array.
  static PyObject* item_of(py::list& list, bool& copied, size_t i, bool& numpy) {
    PyObject* item = PyList_GET_ITEM(list.ptr(), i);
    numpy = is_plain_ndarray(item);
    if (!numpy && !copied) {
      list = list_copy(list);
      copied = true;
    }
    return item;
  }

  static bool same_shape(const HostArray& a, const HostArray& b) {
    return a.nd == b.nd && std::equal(a.shape(), a.shape() + a.nd, b.shape());
  }

  void collect_role(const RoleSpec& role, int r, const RoleSpec& ref, size_t n) {
    if (!py::isinstance<py::list>(role.list))
      throw py::type_error(std::string(role.name) + ": expected a list of arrays");
    py::list list = py::reinterpret_borrow<py::list>(role.list);
    bool copied = false;
    if (list.size() != n)
      throw py::value_error(std::string(role.name) + ": expected " + std::to_string(n) +
                            " arrays (one per entry of " + ref.name + "), got " +
                            std::to_string(list.size()));
    const bool mask = role.kind == RoleKind::mask;
    const bool master = role.kind == RoleKind::master;
    std::vector<void*>& ptrs = ptrs_[mask ? cpu::kMaskSlot : master ? cpu::kMasterSlot : r];
    ptrs.resize(n);
    for (size_t i = 0; i < n; ++i) {
      // The kernel runs with the GIL released: hold every array it touches, so that
      // another thread emptying the caller's list cannot free one under it.
      bool numpy;
      PyObject* item = item_of(list, copied, i, numpy);
      const Where w{role.name, shown(i), listed_};
      HostArray& a = r == 0 ? params_.emplace_back() : scratch_;
      const bool state = role.kind == RoleKind::state;
      const bool exchanged = !numpy && describe_torch_exchange(a, item, role.written, mask);
      const bool tensor = !numpy && !exchanged && is_torch_tensor(item, w);
      keep_.push_back(numpy || exchanged || tensor ? py::reinterpret_borrow<py::object>(item)
                                                   : adapt(w.str(), item));
      if ((exchanged || tensor) && role.written) torch_written_.push_back(item);
      if (tensor) describe_torch(a, item, w, role.written, mask, state);
      else if (!exchanged) describe_numpy(a, keep_.back().ptr(), w, mask, state);
      if (r == 0 && i == 0) {
        dtype_ = a.dtype;
      } else if (master) {
        check_master_dtype(a.dtype == cpu::DType::f32, cpu::dtype_name(a.dtype),
                           dtype_ == cpu::DType::f16 || dtype_ == cpu::DType::bf16,
                           cpu::dtype_name(dtype_), w.str(), where(ref.name, 0));
      } else if (!mask) {
        if (role.kind == RoleKind::state && !state_dtype_ && cpu::state_dtype_ok(dtype_, a.dtype))
          state_dtype_ = a.dtype;
        const cpu::DType want = role.kind == RoleKind::state ? state_dtype() : dtype_;
        if (a.dtype != want)
          throw py::type_error(
              w.str() + ": dtype " + cpu::dtype_name(a.dtype) + " differs from " +
              (role.kind == RoleKind::state
                   ? std::string("the state type ") + cpu::dtype_name(want) +
                         " (state is float32 for 16-bit params, else the params' dtype; or "
                         "bfloat16 or uint8 (8-bit), for every state array, with float32 or "
                         "16-bit params)"
                   : where(ref.name, 0) + "'s " + cpu::dtype_name(want) +
                         " (all arrays of one call share a dtype)"));
      }
      if (r == 0) {
        offsets_[i + 1] = offsets_[i] + a.size;
      } else {
        const HostArray& p = params_[i];
        if (!same_shape(a, p))
          throw py::value_error(w.str() + ": shape " + shape_str(a) + " does not match " +
                                where(ref.name, i) + "'s shape " + shape_str(p));
      }
      if (a.size > 0) {
        if (!dense(a))
          throw py::value_error(w.str() + ": must be dense (its elements in one block, in any order "
                                "of the dimensions, no gaps or negative strides)");
        if (r > 0 && !same_order(params_[i], a))
          throw py::value_error(w.str() + ": its strides differ from " + where(ref.name, i) +
                                "'s (the arrays of one entry must lay out their elements in "
                                "the same order)");
        if (!a.aligned)
          throw py::value_error(w.str() + ": data is not aligned to its dtype");
        if (role.written && !a.writeable)
          throw py::value_error(w.str() + ": is read-only but is updated in place");
        const uintptr_t begin = reinterpret_cast<uintptr_t>(a.data);
        spans_.push_back({begin, begin + uintptr_t(a.size) * cpu::element_size(a.dtype),
                          role.name, i, role.written});
      }
      ptrs[i] = a.size > 0 ? a.data : nullptr;
    }
  }

  // The block maxima of 8-bit state (see the constructor): checked like the roles' arrays,
  // their sizes against the params'. Refused unless the state is 8-bit.
  template <class Roles> void collect_absmax(const Roles& roles, py::handle absmax, size_t n) {
    const bool state8 = state_dtype_ && *state_dtype_ == cpu::DType::u8;
    if (absmax.is_none()) {
      if (state8)
        throw py::type_error("absmax: required with 8-bit (uint8) state: a dict {state name: "
                             "a list of float32 block maxima}");
      return;
    }
    if (state_dtype_ && !state8)  // (no state array at all: an empty call, checked as one)
      throw py::value_error("absmax: only for 8-bit state (uint8 state arrays)");
    std::vector<const char*> names(roles.size(), nullptr);  // the states this call uses
    int r = 0;
    for (const RoleSpec& role : roles) {
      if (role.kind == RoleKind::state && !role.list.is_none()) names[size_t(r)] = role.name;
      ++r;
    }
    absmax_entries(absmax, names.data(), int(names.size()), [&](int slot, py::handle entry) {
      names_.push_back(std::string("absmax['") + names[size_t(slot)] + "']");
      collect_absmax_list(entry, slot, names_.back().c_str(), roles[size_t(slot)].written, n);
    });
  }

  void collect_absmax_list(py::handle list, int r, const char* name, bool written, size_t n) {
    if (!py::isinstance<py::list>(list))
      throw py::type_error(std::string(name) + ": expected a list of arrays");
    if (py::len(list) != n)
      throw py::value_error(std::string(name) + ": expected " + std::to_string(n) +
                            " arrays (one per param), got " + std::to_string(py::len(list)));
    absmax_[r].resize(n);
    py::list items = py::reinterpret_borrow<py::list>(list);
    bool copied = false;
    for (size_t i = 0; i < n; ++i) {
      bool numpy;
      PyObject* item = item_of(items, copied, i, numpy);
      const Where w{name, shown(i), listed_};
      const bool tensor = !numpy && is_torch_tensor(item, w);
      keep_.push_back(numpy || tensor ? py::reinterpret_borrow<py::object>(item)
                                      : adapt(w.str(), item));
      if (tensor && written) torch_written_.push_back(item);
      HostArray& a = scratch_;
      if (tensor) describe_torch(a, item, w, written, false);
      else describe_numpy(a, keep_.back().ptr(), w, false);
      const int64_t blocks = block_count(offsets_[i + 1] - offsets_[i], kState8Block);
      if (a.dtype != cpu::DType::f32)
        throw py::type_error(w.str() + ": dtype " + cpu::dtype_name(a.dtype) + " is not float32");
      if (a.size != blocks)
        throw py::value_error(w.str() + ": has " + std::to_string(a.size) + " elements; " +
                              where("params", i) + "'s " + std::to_string(offsets_[i + 1] - offsets_[i]) +
                              " need " + std::to_string(blocks) + " (one per block of 256)");
      if (a.size > 0) {
        if (!dense(a))
          throw py::value_error(w.str() + ": must be dense (its elements in one block, in any order "
                                "of the dimensions, no gaps or negative strides)");
        if (!a.aligned) throw py::value_error(w.str() + ": data is not aligned to its dtype");
        if (written && !a.writeable)
          throw py::value_error(w.str() + ": is read-only but is updated in place");
        const uintptr_t begin = reinterpret_cast<uintptr_t>(a.data);
        spans_.push_back({begin, begin + uintptr_t(a.size) * 4, name, i, written});
      }
      absmax_[r][i] = a.size > 0 ? static_cast<float*>(a.data) : nullptr;
    }
  }

  // Foreign arrays other than torch CPU tensors go through the Python adapter set by
  // set_array_adapter (fastopt._arrays.to_host_array), which returns a NumPy view of the
  // same memory or raises naming the argument (a CUDA array in a host call, say).
  py::object adapt(const std::string& name, PyObject* obj) {
    if (!array_adapter())
      throw py::type_error(name + ": expected a numpy.ndarray, got " + Py_TYPE(obj)->tp_name);
    py::object view = array_adapter()(name, py::handle(obj));
    if (!py::isinstance<py::array>(view))
      throw py::type_error(name + ": expected a numpy.ndarray, got " + Py_TYPE(obj)->tp_name);
    return view;
  }

  // torch.Tensor and the dtypes the kernels take (float32, float64, float16, bfloat16, in
  // cpu::DType order), from the torch module once the caller has imported it.
  struct TorchTypes {
    py::object tensor, strided;
    py::object dtypes[4];
    py::object bool_, uint8;  // a mask's dtypes
    py::object inference_mode_enabled;  // torch.is_inference_mode_enabled
    py::object parameter;  // torch.nn.Parameter (None if absent)
    py::object is_neg, is_inference;  // torch.Tensor's methods, called unbound
    const dlpack::ExchangeApi* exchange;  // torch.Tensor.__dlpack_c_exchange_api__, or null
    py::object increment_version;  // torch.autograd.graph.increment_version (None if absent)
  };
  static const TorchTypes* torch_types() {
    static TorchTypes* types = nullptr;  // never destroyed: no Python at exit
    if (types) return types;
    PyObject* torch = PyImport_GetModule(py::str("torch").ptr());  // only if already imported
    if (!torch) {
      PyErr_Clear();
      return nullptr;
    }
    const py::object m = py::reinterpret_steal<py::object>(torch);
    if (!py::hasattr(m, "bfloat16")) return nullptr;  // torch is still being imported
    const py::object tensor = m.attr("Tensor");
    const py::object nn = py::getattr(m, "nn", py::none());
    types = new TorchTypes{tensor, m.attr("strided"),
                           {m.attr("float32"), m.attr("float64"), m.attr("float16"), m.attr("bfloat16")},
                           m.attr("bool"), m.attr("uint8"), m.attr("is_inference_mode_enabled"),
                           nn.is_none() ? py::none() : py::getattr(nn, "Parameter", py::none()),
                           tensor.attr("is_neg"), tensor.attr("is_inference"),
                           exchange_api(tensor), increment_version(m)};
    return types;
  }
  // torch.autograd.graph.increment_version (it takes a list since torch 2.1) -- the C
  // function it wraps, torch._C._increment_version, where torch has it (a third of the
  // wrapper's cost) -- or None.
  static py::object increment_version(const py::object& torch) {
    const py::object c = py::getattr(torch, "_C", py::none());
    const py::object direct =
        c.is_none() ? py::object(py::none()) : py::getattr(c, "_increment_version", py::none());
    if (!direct.is_none()) return direct;
    const py::object autograd = py::getattr(torch, "autograd", py::none());
    const py::object graph =
        autograd.is_none() ? py::object(py::none()) : py::getattr(autograd, "graph", py::none());
    return graph.is_none() ? py::object(py::none())
                           : py::getattr(graph, "increment_version", py::none());
  }
  // torch's DLPack exchange table (a capsule; an int in the first torch versions that had
  // one), if its major version is the one this ABI describes.
  static const dlpack::ExchangeApi* exchange_api(const py::object& tensor) {
    const py::object api = py::getattr(tensor, "__dlpack_c_exchange_api__", py::none());
    const void* ptr = nullptr;
    if (PyCapsule_CheckExact(api.ptr()))
      ptr = PyCapsule_GetPointer(api.ptr(), "dlpack_exchange_api");
    else if (PyLong_Check(api.ptr()))
      ptr = PyLong_AsVoidPtr(api.ptr());
    if (PyErr_Occurred()) {
      PyErr_Clear();
      return nullptr;
    }
    const auto* table = static_cast<const dlpack::ExchangeApi*>(ptr);
    if (!table || table->header.version.major != dlpack::kMajorVersion ||
        !table->dltensor_from_py_object_no_sync)
      return nullptr;
    return table;
  }
  // Whether obj is a torch tensor whose data is in host memory (tensors on a GPU are left
  // to the adapter, which says why they cannot run here; meta tensors are refused).
  static bool is_torch_tensor(PyObject* obj, const Where& where_) {
    const TorchTypes* tt = torch_types();
    if (!tt) return false;
    const int is_tensor = PyObject_IsInstance(obj, tt->tensor.ptr());
    if (is_tensor < 0) throw py::error_already_set();
    if (!is_tensor) return false;
    const py::handle t(obj);
    if (FASTOPT_HOST_ATTR(t, "is_cpu").cast<bool>()) return true;
    if (FASTOPT_HOST_ATTR(t, "is_meta").cast<bool>())
      throw py::type_error(where_.str() + ": is a meta tensor, which has no data to update");
    return false;
  }

  static constexpr int kNpyHalf = 23;  // NPY_HALF

  // Whether a NumPy dtype's scalar type is ml_dtypes' bfloat16 (NumPy has no bfloat16 of
  // its own; the type is looked up once ml_dtypes has been imported by the caller).
  static bool is_numpy_bfloat16(PyObject* scalar_type) {
    static PyObject* bfloat16 = nullptr;  // never released: no Python at exit
    if (!bfloat16) {
      PyObject* m = PyImport_GetModule(py::str("ml_dtypes").ptr());
      if (!m) {
        PyErr_Clear();
        return false;
      }
      bfloat16 = PyObject_GetAttrString(m, "bfloat16");
      Py_DECREF(m);
      if (!bfloat16) {
        PyErr_Clear();
        return false;
      }
    }
    return scalar_type == bfloat16;
  }

  std::vector<py::object> keep_;  // every array of the call, views of foreign ones included
  std::vector<PyObject*> torch_written_;  // the torch tensors the call writes (held in keep_)
  std::vector<HostArray> params_;    // the params' descriptions
  HostArray scratch_;                // the description of the current non-param array
  bool listed_;
  std::vector<size_t> shown_;  // the caller's index of each entry (empty: the same)
  cpu::DType dtype_ = cpu::DType::f32;
  std::optional<cpu::DType> state_dtype_;  // set by the first state array
  std::vector<int64_t> offsets_;
  std::vector<void*> ptrs_[cpu::kMaxSlots];
  std::vector<float*> absmax_[cpu::kMaxRoles];  // 8-bit state: absmax_[role][i]
  std::deque<std::string> names_;                // the absmax lists' names ("absmax['exp_avgs']")
  std::vector<Span> spans_;
};

}  // namespace bindings
}  // namespace fastopt
