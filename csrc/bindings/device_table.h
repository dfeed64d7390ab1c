// Turns aligned Python lists of CUDA arrays (PyTorch CUDA tensors, CuPy arrays, anything
// with __cuda_array_interface__ or DLPack) into the launch tables of csrc/cuda, checking
// every array before anything is launched: dtype, device, shape, contiguity, writability,
// alignment and aliasing, with errors naming the argument ("grads[3]: ...").
//
// A DevicePlan can be kept between calls (the optimizer classes keep one): a call then
// compares each list element with the object it saw last time and re-reads only what can
// have changed, so a step over N unchanged arrays does no per-array parsing (PyTorch
// tensors still get their data pointer, size and contiguity re-read: `t.data = ...` can
// move or re-stride them). New grads each step cost one parse each; new params or state
// rebuild the plan. The state arrays are taken to be the optimizer's own: replacing the
// storage of one of them in place (`t.data = ...`) is not seen.
#pragma once
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <algorithm>
#include <optional>
#include <utility>
#include <cstdint>
#include <string>
#include <vector>
#include "bindings/dlpack.h"
#include "bindings/optim_binding.h"
#include "bindings/overlap.h"
#include "common/optim/descriptor.h"
#include "common/state8.h"
#include "cuda/launch_table.h"

namespace fastopt {
namespace bindings {

namespace py = pybind11;
using cuda::DType;

using fastopt::RoleKind;  // the params' element type, or the state type

struct DeviceRoleSpec {
  const char* name;  // the Python argument name, used in error messages
  py::handle list;   // a list of arrays, or None when the call does not use this role
  RoleKind kind;
  bool written;      // written arrays must be writeable and may not overlap anything
};

// Where an array sits in the call, for messages: "grads[3]" (or "grads" for a single array).
inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::f32: return "float32";
    case DType::f64: return "float64";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::i8: return "int8";
    case DType::u8: return "uint8";
    case DType::b8: return "bool";
  }
  return "?";
}

// What the kernels need to know about one array.
struct DeviceArray {
  uintptr_t ptr = 0;
  std::vector<int64_t> shape;
  int64_t size = 1;
  DType dtype = DType::f32;
  int device = -1;          // -1: unknown (an empty array without memory)
  std::vector<int64_t> strides;  // in elements (C order's when the producer gave none)
  bool contiguous = true;   // C-contiguous
  bool dense = true;        // its elements fill one block, in some order of the dimensions
  bool readonly = false;
  bool torch = false;       // a PyTorch tensor: its data pointer can move (t.data = ...)
};

// PyTorch's Tensor type and dtypes, registered by fastopt._arrays when a tensor is first
// met (fastopt never imports torch itself). Tensors are read through data_ptr() & co.,
// not __cuda_array_interface__, which refuses tensors that require grad (parameters).
struct TorchTypes {
  py::object tensor;
  py::object dtypes[cuda::kNumDTypes];  // in DType order
};
inline TorchTypes*& torch_types() {
  static TorchTypes* types = nullptr;  // never destroyed: no Python at exit
  return types;
}

// ---- describing one array ------------------------------------------------------------------

[[noreturn]] inline void host_array_error(const Where& w, const std::string& what) {
  throw py::type_error(w.str() + ": is " + what +
                       ", but this call runs on CUDA arrays; all arrays of one call must be "
                       "on the same device");
}

constexpr const char* kSupported =
    " is not supported (float32, float64, float16, bfloat16, int8, uint8 or bool)";

// kind: 'f' float, 'B' bfloat, 'i' signed, 'u' unsigned integer, 'b' bool.
inline DType dtype_from_bits(const Where& w, char kind, int bits, const std::string& shown) {
  if (kind == 'f' && bits == 32) return DType::f32;
  if (kind == 'f' && bits == 64) return DType::f64;
  if (kind == 'f' && bits == 16) return DType::f16;
  if (kind == 'B' && bits == 16) return DType::bf16;
  if (kind == 'b' && bits == 8) return DType::b8;
  if (kind == 'i' && bits == 8) return DType::i8;
  if (kind == 'u' && bits == 8) return DType::u8;
  throw py::type_error(w.str() + ": dtype " + shown + kSupported);
}

// C-contiguity from element strides (dimensions of extent 1 may have any stride).
inline bool c_contiguous(const std::vector<int64_t>& shape, const int64_t* strides) {
  int64_t expected = 1;
  for (size_t d = shape.size(); d-- > 0;) {
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

// The C-order strides of `shape`, in elements.
inline std::vector<int64_t> c_strides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> strides(shape.size());
  int64_t next = 1;
  for (size_t d = shape.size(); d-- > 0;) {
    strides[d] = next;
    next *= shape[d];
  }
  return strides;
}

// Sets a's strides and the layout flags that follow from them.
inline void set_strides(DeviceArray& a, std::vector<int64_t> strides) {
  a.strides = std::move(strides);
  a.contiguous = c_contiguous(a.shape, a.strides.data());
  a.dense = dense_layout(a.shape.data(), a.strides.data(), a.shape.size());
}

inline void read_shape(DeviceArray& a, py::handle shape) {
  const py::tuple t(py::reinterpret_borrow<py::object>(shape));  // torch.Size, tuple or list
  a.shape.resize(t.size());
  a.size = 1;
  for (size_t d = 0; d < t.size(); ++d) {
    a.shape[d] = t[d].cast<int64_t>();
    a.size *= a.shape[d];
  }
}

// Attribute names as interned strings, created once (pybind's attr("name") would build a
// new string on every access; a step over a thousand tensors makes thousands of these).
inline py::handle interned(const char* name) {
  return PyUnicode_InternFromString(name);  // leaked on purpose: one per call site
}
#define FASTOPT_ATTR(obj, name) (obj).attr([] { static py::handle n = interned(name); return n; }())

// obj.name() through the vectorcall method protocol: no bound method is created, which
// matters for the per-step re-checks of cached tensors (three calls per tensor and step).
inline py::object call_method(py::handle obj, py::handle name) {
  PyObject* result = PyObject_CallMethodNoArgs(obj.ptr(), name.ptr());
  if (!result) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(result);
}
#define FASTOPT_CALL(obj, name) call_method((obj), [] { static py::handle n = interned(name); return n; }())

inline uintptr_t torch_data_ptr(py::handle obj) {
  return FASTOPT_CALL(obj, "data_ptr").cast<uintptr_t>();
}

inline std::vector<int64_t> torch_strides(py::handle obj) {
  const py::tuple t(FASTOPT_CALL(obj, "stride"));
  std::vector<int64_t> strides(t.size());
  for (size_t d = 0; d < t.size(); ++d) strides[d] = t[d].cast<int64_t>();
  return strides;
}

// A tensor seen before still has its memory and layout: `t.data = ...` or resize_() can
// move or shrink it under the same object, and `t.data = t.data.t()` keeps pointer and size
// but changes the order its elements are stepped in.
inline bool torch_unchanged(py::handle obj, uintptr_t ptr, int64_t size,
                            const std::vector<int64_t>& strides) {
  return torch_data_ptr(obj) == ptr && FASTOPT_CALL(obj, "numel").cast<int64_t>() == size &&
         torch_strides(obj) == strides;
}

inline void describe_torch(DeviceArray& a, py::handle obj, const Where& w) {
  const TorchTypes& tt = *torch_types();
  a.device = FASTOPT_ATTR(obj, "get_device")().cast<int>();  // -1 for CPU tensors
  if (a.device < 0)
    host_array_error(w, "a " + py::str(obj.attr("device")).cast<std::string>() + " tensor");
  const py::object dt = FASTOPT_ATTR(obj, "dtype");
  int k = 0;
  while (k < cuda::kNumDTypes && !dt.is(tt.dtypes[k])) ++k;
  if (k == cuda::kNumDTypes)
    throw py::type_error(w.str() + ": dtype " + py::str(dt).cast<std::string>() + kSupported);
  a.dtype = static_cast<DType>(k);
  read_shape(a, FASTOPT_ATTR(obj, "shape"));
  set_strides(a, torch_strides(obj));
  a.ptr = torch_data_ptr(obj);
  a.torch = true;
}

// The device holding ptr, or an error if it is not device memory.
inline int device_of_pointer(uintptr_t ptr, const Where& w) {
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<void*>(ptr));
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw py::value_error(w.str() + ": cannot query its pointer: " + cudaGetErrorString(err));
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    host_array_error(w, "in host memory (its __cuda_array_interface__ pointer is not device memory)");
  return attr.device;
}

inline void describe_cai(DeviceArray& a, const py::dict& cai, const Where& w) {
  read_shape(a, cai["shape"]);
  const std::string typestr = cai["typestr"].cast<std::string>();
  if (typestr.size() < 3 || (typestr[0] != '<' && typestr[0] != '=' && typestr[0] != '|') ||
      (typestr[1] != 'f' && typestr[1] != 'i' && typestr[1] != 'u' && typestr[1] != 'b') ||
      typestr.find_first_not_of("0123456789", 2) != std::string::npos)
    throw py::type_error(w.str() + ": dtype " + typestr + kSupported +
                         " (bfloat16 through PyTorch or DLPack)");
  a.dtype = dtype_from_bits(w, typestr[1], 8 * std::stoi(typestr.substr(2)), typestr);
  const py::tuple data = cai["data"];
  a.ptr = data[0].cast<uintptr_t>();
  a.readonly = data[1].cast<bool>();
  if (cai.contains("mask") && !cai["mask"].is_none())
    throw py::type_error(w.str() + ": masked arrays are not supported");
  set_strides(a, c_strides(a.shape));
  if (cai.contains("strides") && !cai["strides"].is_none()) {
    const py::tuple st = cai["strides"];
    std::vector<int64_t> strides(st.size());
    const int64_t item = cuda::element_size(a.dtype);
    bool whole = strides.size() == a.shape.size();
    for (size_t d = 0; whole && d < st.size(); ++d) {
      const int64_t bytes = st[d].cast<int64_t>();
      whole = bytes % item == 0;
      strides[d] = bytes / item;
    }
    if (whole) {
      set_strides(a, std::move(strides));
    } else {  // a stride that is no whole number of elements: neither dense nor contiguous
      a.contiguous = a.dense = false;
    }
  }
  if (a.size > 0) a.device = device_of_pointer(a.ptr, w);
}

inline void describe_dlpack(DeviceArray& a, py::handle obj, const Where& w, intptr_t stream) {
  const py::tuple dev = obj.attr("__dlpack_device__")();
  const int type = dev[0].cast<int>();
  if (type != dlpack::kCUDA && type != dlpack::kCUDAManaged)
    host_array_error(w, "a DLPack array on device type " + std::to_string(type));
  // The consumer names the stream it will use (1 = the legacy default stream).
  const py::object capsule = obj.attr("__dlpack__")(py::arg("stream") = stream ? stream : 1);
  auto* managed = static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  if (!managed) {
    PyErr_Clear();
    throw py::type_error(w.str() + ": __dlpack__ did not return a \"dltensor\" capsule");
  }
  const dlpack::Tensor& t = managed->dl_tensor;
  static const char kinds[] = {'i', 'u', 'f', '?', 'B', '?', 'b'};  // DLPack type codes 0..6
  if (t.dtype.lanes != 1 || t.dtype.code > 6)
    throw py::type_error(w.str() + ": DLPack dtype code " + std::to_string(t.dtype.code) + kSupported);
  a.dtype = dtype_from_bits(w, kinds[t.dtype.code], t.dtype.bits,
                            "code " + std::to_string(t.dtype.code) + " with " +
                            std::to_string(t.dtype.bits) + " bits");
  a.shape.assign(t.shape, t.shape + t.ndim);
  a.size = 1;
  for (int64_t e : a.shape) a.size *= e;
  set_strides(a, t.strides ? std::vector<int64_t>(t.strides, t.strides + t.ndim) : c_strides(a.shape));
  a.ptr = reinterpret_cast<uintptr_t>(t.data) + t.byte_offset;
  a.device = t.device.device_id;
  // The capsule is released here; the memory stays owned by `obj`, which the plan holds.
}

inline DeviceArray describe(py::handle obj, const Where& w, intptr_t stream) {
  DeviceArray a;
  const TorchTypes* tt = torch_types();
  const int is_tensor = tt ? PyObject_IsInstance(obj.ptr(), tt->tensor.ptr()) : 0;
  if (is_tensor < 0) throw py::error_already_set();
  if (is_tensor) {
    describe_torch(a, obj, w);
    return a;
  }
  // Only a missing attribute means "no interface": an interface that raises is an error.
  PyObject* raw = PyObject_GetAttrString(obj.ptr(), "__cuda_array_interface__");
  if (!raw) {
    if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
      py::error_already_set e;
      throw py::type_error(w.str() + ": its __cuda_array_interface__ failed: " + e.what());
    }
    PyErr_Clear();
  }
  const py::object cai = raw ? py::reinterpret_steal<py::object>(raw) : py::object(py::none());
  if (!cai.is_none()) {
    describe_cai(a, cai, w);
    return a;
  }
  if (py::hasattr(obj, "__array_interface__"))  // NumPy (which has DLPack too)
    host_array_error(w, std::string("a host array (") + Py_TYPE(obj.ptr())->tp_name + ")");
  if (py::hasattr(obj, "__dlpack_device__")) {
    describe_dlpack(a, obj, w, stream);
    return a;
  }
  throw py::type_error(w.str() + ": expected a CUDA array (a PyTorch CUDA tensor, a CuPy array, "
                       "or an object with __cuda_array_interface__ or DLPack), got " +
                       Py_TYPE(obj.ptr())->tp_name);
}

// Aligned to its dtype, and writeable if `written` (zero-size arrays pass); C-contiguous,
// or for an optimizer step (`dense_ok`) dense in any order of the dimensions.
inline void check_layout(const DeviceArray& a, const Where& w, bool written,
                         bool dense_ok = false) {
  if (a.size == 0) return;
  if (dense_ok && !a.dense)
    throw py::value_error(w.str() + ": must be dense (its elements in one block, in any order "
                          "of the dimensions, no gaps or negative strides)");
  if (!dense_ok && !a.contiguous)
    throw py::value_error(w.str() + ": must be C-contiguous");
  if (a.ptr % cuda::element_size(a.dtype) != 0)
    throw py::value_error(w.str() + ": data is not aligned to its dtype");
  if (written && a.readonly)
    throw py::value_error(w.str() + ": is read-only but is updated in place");
}

// ---- the plan ------------------------------------------------------------------------------
class DevicePlan {
 public:
  // Checks the call's arrays and makes tables() describe them; on error raises and leaves
  // the plan as it was. `stream` is passed to DLPack producers. Roles: a sequence of
  // DeviceRoleSpec (std::array), params first.
  template <class Roles>
  void update(const Roles& given, bool listed, intptr_t stream) {
    Roles roles = given;  // reading the lists' copies (list_copy)
    std::vector<py::object> copies;
    copies.reserve(roles.size());
    for (DeviceRoleSpec& role : roles) {
      copies.push_back(list_copy(role.list));
      role.list = copies.back();
    }
    if (!same_structure(roles)) {
      build(roles, listed, stream);
      return;
    }
    // Elements that are not the objects seen last time (or tensors whose memory moved).
    std::vector<std::pair<int, size_t>> changed;
    bool rebuild = false;
    int r = 0;
    for (const DeviceRoleSpec& role : roles) {
      if (!role.list.is_none()) {
        PyObject* list = role.list.ptr();
        std::vector<Entry>& entries = entries_[r];
        for (size_t i = 0; i < entries.size(); ++i) {
          PyObject* item = PyList_GET_ITEM(list, i);
          const Entry& e = entries[i];
          // The written state arrays are the optimizer's own, held by the plan: only the
          // caller's arrays (params, grads; read-only state such as Sophia's Hessian,
          // held weakly) can have had their storage replaced.
          const bool own = role.written && (role.kind == RoleKind::state || role.kind == RoleKind::absmax);
          if (e.is(item) && (!e.torch || own || torch_unchanged(item, e.ptr, e.size, e.strides)))
            continue;
          if (r == 0 || role.written) rebuild = true;
          changed.emplace_back(r, i);
        }
      }
      ++r;
    }
    if (rebuild) build(roles, listed, stream);
    else if (!changed.empty()) refresh_inputs(roles, changed, listed, stream);
  }

  const cuda::LaunchTables& tables() const { return tables_; }
  // The array the call writes that the bytes [begin, end) overlap, or null.
  const Span* written_overlap(uintptr_t begin, uintptr_t end) const {
    // written_ is sorted and disjoint: the first span ending after begin is the only candidate.
    auto it = std::lower_bound(written_.begin(), written_.end(), begin,
                               [](const Span& s, uintptr_t p) { return s.end <= p; });
    return it != written_.end() && it->begin < end ? &*it : nullptr;
  }
  DType dtype() const { return dtype_; }
  // The state arrays' type: the params' state type, or bfloat16 when the state is.
  DType state_dtype() const { return state_dtype_ ? *state_dtype_ : cuda::state_dtype(dtype_); }
  int device() const { return device_; }
  // Whether the call has state arrays, and whether they are 8-bit (uint8 codes).
  bool has_state() const { return state_dtype_.has_value(); }
  bool has_state8() const { return state_dtype_ == DType::u8; }
  size_t num_tensors() const { return sizes_.size(); }

 private:
  // What the plan remembers of one array: the object (written arrays: held, they are the
  // caller's params or the optimizer's own state) or a weak reference to it (read-only
  // inputs: holding last step's grads would keep a whole gradient copy alive through the
  // next forward and backward), its data pointer, element count and strides.
  struct Entry {
    py::object ref;       // the object, a weakref to it, or None (no weakref support)
    bool weak = false;
    uintptr_t ptr = 0;
    int64_t size = 0;
    std::vector<int64_t> strides;
    bool torch = false;

    static Entry make(py::handle obj, bool written, const DeviceArray& a) {
      Entry e{py::none(), !written, a.ptr, a.size, a.strides, a.torch};
      if (written) {
        e.ref = py::reinterpret_borrow<py::object>(obj);
      } else {
        PyObject* w = PyWeakref_NewRef(obj.ptr(), nullptr);
        if (w) e.ref = py::reinterpret_steal<py::object>(w);
        else PyErr_Clear();  // not weak-referenceable: described again on every call
      }
      return e;
    }
    // Whether `item` is the object remembered (alive, so its identity is unambiguous).
    bool is(PyObject* item) const {
      if (!weak) return item == ref.ptr();
      if (ref.is_none()) return false;
#if PY_VERSION_HEX >= 0x030D0000
      PyObject* obj = nullptr;
      const int alive = PyWeakref_GetRef(ref.ptr(), &obj);
      if (alive < 0) PyErr_Clear();
      if (alive <= 0) return false;
      Py_DECREF(obj);  // only the identity is compared
      return item == obj;
#else
      return item == PyWeakref_GetObject(ref.ptr());  // borrowed; None once dead
#endif
    }
  };

  template <class Roles>
  bool same_structure(const Roles& roles) const {
    if (!built_ || roles.size() != num_roles_) return false;
    int r = 0;
    for (const DeviceRoleSpec& role : roles) {
      const bool used = !role.list.is_none();
      if (used != used_[r]) return false;
      if (used && (!PyList_Check(role.list.ptr()) ||
                   size_t(PyList_GET_SIZE(role.list.ptr())) != sizes_.size()))
        return false;
      ++r;
    }
    return true;
  }

  // A mask may be bool or uint8: one byte either way (u8 stands for both).
  DType expected_dtype(RoleKind kind) const {
    switch (kind) {
      case RoleKind::state: return state_dtype();
      case RoleKind::mask: return DType::u8;
      case RoleKind::master:
      case RoleKind::absmax: return DType::f32;
      default: return dtype_;
    }
  }

  // Describes the array and checks it against the params (index i of role `role`).
  DeviceArray checked(py::handle obj, const DeviceRoleSpec& role, int r, size_t i, bool listed,
                      intptr_t stream, bool* first) {
    const Where w{role.name, i, listed};
    DeviceArray a = describe(obj, w, stream);
    if (*first) {
      // params[0] fixes the call's dtype; the device is the first one seen.
      if (!cuda::is_float(a.dtype))
        throw py::type_error(w.str() + ": dtype " + dtype_name(a.dtype) +
                             " is not supported (float32, float64, float16 or bfloat16)");
      dtype_ = a.dtype;
      *first = false;
    } else if (role.kind == RoleKind::state && !state_dtype_ && cuda::state_dtype_ok(dtype_, a.dtype)) {
      state_dtype_ = a.dtype;  // the first state array decides (float32/own type or bfloat16)
    } else if (role.kind == RoleKind::mask) {
      if (a.dtype != DType::b8 && a.dtype != DType::u8)
        throw py::type_error(w.str() + ": dtype " + dtype_name(a.dtype) +
                             " is not a mask's (bool or uint8)");
    } else if (role.kind == RoleKind::absmax) {
      if (a.dtype != DType::f32)
        throw py::type_error(w.str() + ": dtype " + dtype_name(a.dtype) + " is not float32");
    } else if (role.kind == RoleKind::master) {
      check_master_dtype(a.dtype == DType::f32, dtype_name(a.dtype),
                         dtype_ == DType::f16 || dtype_ == DType::bf16, dtype_name(dtype_), w.str(),
                         Where{"params", 0, listed}.str());
    } else if (a.dtype != expected_dtype(role.kind)) {
      throw py::type_error(w.str() + ": dtype " + dtype_name(a.dtype) + " differs from the " +
                           (role.kind == RoleKind::state ? "state type " : "params' ") +
                           dtype_name(expected_dtype(role.kind)) +
                           (role.kind == RoleKind::state
                                ? " (state is float32 for 16-bit params, else the params' dtype; "
                                  "or bfloat16 or uint8 (8-bit), for every state array, with "
                                  "float32 or 16-bit params)"
                                : " (all arrays of one call share a dtype)"));
    }
    if (a.device >= 0) {
      if (device_ < 0) device_ = a.device;
      else if (a.device != device_)
        throw py::value_error(w.str() + ": is on CUDA device " + std::to_string(a.device) +
                              " but the call's other arrays are on device " +
                              std::to_string(device_));
    }
    if (r == 0) return a;
    const Where params_at{"params", i, listed};
    if (role.kind == RoleKind::absmax) {  // one float32 per block of 8-bit state
      const int64_t blocks = (sizes_[i] + kState8Block - 1) / kState8Block;
      if (a.size != blocks)
        throw py::value_error(w.str() + ": has " + std::to_string(a.size) + " elements; " +
                              params_at.str() + "'s " + std::to_string(sizes_[i]) + " need " +
                              std::to_string(blocks) + " (one per block of 256)");
      check_layout(a, w, role.written, /*dense_ok=*/true);
      return a;
    }
    if (a.shape != shapes_[i])
      throw py::value_error(w.str() + ": shape " + shape_str(a.shape) + " does not match " +
                            params_at.str() + "'s shape " + shape_str(shapes_[i]));
    check_layout(a, w, role.written, /*dense_ok=*/true);
    if (a.size > 0)
      for (size_t d = 0; d < a.shape.size(); ++d)
        if (a.shape[d] != 1 && a.strides[d] != strides_[i][d])
          throw py::value_error(w.str() + ": its strides differ from " + params_at.str() +
                                "'s (the arrays of one entry must lay out their elements in "
                                "the same order)");
    return a;
  }

  static std::string shape_str(const std::vector<int64_t>& s) {
    std::string out = "(";
    for (size_t d = 0; d < s.size(); ++d)
      out += std::to_string(s[d]) + (s.size() == 1 ? "," : d + 1 < s.size() ? ", " : "");
    return out + ")";
  }

  // Everything from scratch: describe and check every array, the aliasing sweep, tables.
  template <class Roles>
  void build(const Roles& roles, bool listed, intptr_t stream) {
    DevicePlan next;
    next.num_roles_ = roles.size();
    const DeviceRoleSpec& ref = *roles.begin();
    if (!PyList_Check(ref.list.ptr()))
      throw py::type_error(std::string(ref.name) + ": expected a list of arrays");
    const size_t n = size_t(PyList_GET_SIZE(ref.list.ptr()));
    std::vector<Span> spans;
    bool first = true;
    int r = 0;
    for (const DeviceRoleSpec& role : roles) {
      next.used_[r] = !role.list.is_none();
      next.kind_[r] = role.kind;
      if (next.used_[r]) {
        if (!PyList_Check(role.list.ptr()))
          throw py::type_error(std::string(role.name) + ": expected a list of arrays");
        const size_t len = size_t(PyList_GET_SIZE(role.list.ptr()));
        if (len != n)
          throw py::value_error(std::string(role.name) + ": expected " + std::to_string(n) +
                                " arrays (one per entry of " + ref.name + "), got " +
                                std::to_string(len));
        next.entries_[r].resize(n);
        for (size_t i = 0; i < n; ++i) {
          py::handle item = PyList_GET_ITEM(role.list.ptr(), i);
          const DeviceArray a = next.checked(item, role, r, i, listed, stream, &first);
          if (r == 0) {
            check_layout(a, Where{role.name, i, listed}, role.written, /*dense_ok=*/true);
            next.shapes_.push_back(a.shape);
            next.strides_.push_back(a.strides);
            next.sizes_.push_back(a.size);
          }
          next.entries_[r][i] = Entry::make(item, role.written, a);
          if (a.size > 0) {
            const uintptr_t bytes = uintptr_t(a.size) * cuda::element_size(a.dtype);
            spans.push_back({a.ptr, a.ptr + bytes, role.name, i, role.written});
          }
        }
      }
      ++r;
    }
    check_no_overlap(spans, [listed](const char* role, size_t i) { return Where{role, i, listed}.str(); });
    for (const Span& s : spans)
      if (s.written) next.written_.push_back(s);
    std::sort(next.written_.begin(), next.written_.end(),
              [](const Span& a, const Span& b) { return a.begin < b.begin; });
    next.make_tables();
    next.built_ = true;
    *this = std::move(next);
  }

  // Only read-only inputs (grads, samples) changed: check the new ones against the params
  // and against the written arrays, then patch their pointers into the tables.
  template <class Roles>
  void refresh_inputs(const Roles& roles,
                      const std::vector<std::pair<int, size_t>>& changed, bool listed,
                      intptr_t stream) {
    std::vector<Entry> fresh;
    fresh.reserve(changed.size());
    bool first = false;
    for (const auto& [r, i] : changed) {
      const DeviceRoleSpec& role = roles.begin()[r];
      py::handle item = PyList_GET_ITEM(role.list.ptr(), i);
      const DeviceArray a = checked(item, role, r, i, listed, stream, &first);
      if (a.size > 0)
        if (const Span* s = written_overlap(a.ptr, a.ptr + uintptr_t(a.size) * cuda::element_size(a.dtype)))
          throw py::value_error(Where{role.name, i, listed}.str() + " overlaps " +
                                Where{s->role, s->index, listed}.str() +
                                " in memory; arrays updated in place must not alias");
      fresh.push_back(Entry::make(item, role.written, a));
    }
    for (size_t k = 0; k < changed.size(); ++k) {
      const auto [r, i] = changed[k];
      entries_[r][i] = std::move(fresh[k]);
      const auto [t, slot] = slots_[i];
      if (t >= 0) {
        tables_[t].ptrs[r][slot] = reinterpret_cast<void*>(entries_[r][i].ptr);
        tables_[t].vector_ok[slot] = vector_ok(i);
      }
    }
  }

  bool vector_ok(size_t i) const {
    for (int r = 0; r < kTableSlots; ++r) {
      if (!used_[r] || kind_[r] == RoleKind::absmax) continue;  // absmax: read one at a time
      const DType d = expected_dtype(kind_[r]);
      if (entries_[r][i].ptr % cuda::vector_alignment(cuda::element_size(d)) != 0) return false;
    }
    return true;
  }

  void make_tables() {
    tables_.clear();
    slots_.assign(sizes_.size(), {-1, -1});
    for (size_t i = 0; i < sizes_.size(); ++i) {
      if (sizes_[i] == 0) continue;  // nothing to do: no blocks
      if (tables_.empty() || tables_.back().num_tensors == cuda::kLaunchTensors ||
          tables_.back().block_start[tables_.back().num_tensors] + blocks_of(sizes_[i]) > kMaxBlocks) {
        tables_.emplace_back();
        tables_.back().block_start[0] = 0;
      }
      cuda::LaunchTable& t = tables_.back();
      const int k = t.num_tensors++;
      t.size[k] = sizes_[i];
      t.index[k] = int32_t(i);
      t.block_start[k + 1] = t.block_start[k] + blocks_of(sizes_[i]);
      for (int q = 0; q < kTableSlots; ++q)
        t.ptrs[q][k] = used_[q] ? reinterpret_cast<void*>(entries_[q][i].ptr) : nullptr;
      slots_[i] = {int(tables_.size() - 1), k};
    }
    for (size_t i = 0; i < sizes_.size(); ++i)
      if (slots_[i].first >= 0) tables_[slots_[i].first].vector_ok[slots_[i].second] = vector_ok(i);
  }

  static int64_t blocks_of(int64_t size) { return (size + cuda::kChunk - 1) / cuda::kChunk; }
  static constexpr int64_t kMaxBlocks = (int64_t(1) << 31) - 1;  // grid x limit

  bool built_ = false;
  size_t num_roles_ = 0;
  bool used_[kTableSlots] = {};  // per table slot (the roles' position in the specs)
  RoleKind kind_[kTableSlots] = {};
  std::vector<Entry> entries_[kTableSlots];
  std::vector<std::vector<int64_t>> shapes_;   // of the params
  std::vector<std::vector<int64_t>> strides_;  // of the params
  std::vector<int64_t> sizes_;
  std::vector<Span> written_;                  // sorted by address, disjoint
  std::vector<std::pair<int, int>> slots_;     // tensor -> (table, index), -1 when empty
  cuda::LaunchTables tables_;
  DType dtype_ = DType::f32;
  std::optional<DType> state_dtype_;  // set by the first state array
  int device_ = -1;
};

}  // namespace bindings
}  // namespace fastopt
