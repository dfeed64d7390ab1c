// fastopt._cpu: thin pybind11 bindings of the CPU kernels. Each optimizer's step function
// is generated from its descriptor (common/optim/registry.h, bindings/optim_binding.h):
// it receives aligned lists of NumPy arrays and the hyper-parameters (checked against the
// ranges Python registers), checks and unpacks them (array_table.h), releases the GIL and
// runs one multi-tensor call.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include "bindings/adafactor_args.h"
#include "bindings/array_table.h"
#include "bindings/checked_def.h"
#include "bindings/optim_binding.h"
#include "bindings/kernel_args.h"
#include "build_info.h"
#include "common/prune.h"
#include "cpu/dispatch.h"

namespace py = pybind11;
using fastopt::bindings::ArrayTable;
using fastopt::bindings::RoleSpec;
using fastopt::bindings::StepCall;
namespace cpu = fastopt::cpu;

namespace {

template <class Fn>
void run_released(Fn&& fn) {
  py::gil_scoped_release release;
  fn();
}

// One step of optimizer Opt over the call's aligned lists (see bindings/optim_binding.h
// for the arguments): the arrays are checked and tabled, then the kernel runs with the GIL
// released.
template <class Opt>
void step(const fastopt::bindings::CallArgs& args, const typename Opt::Hyper* bound) {
  const StepCall<Opt> call(args, {}, bound);
  std::array<RoleSpec, Opt::num_roles + 2> roles;
  for (int r = 0; r < Opt::num_roles; ++r)
    roles[r] = {Opt::roles[r].name, call.lists[r], Opt::roles[r].written, Opt::roles[r].kind};
  roles[Opt::num_roles] = {"masks", call.masks, false, fastopt::RoleKind::mask};
  roles[Opt::num_roles + 1] = {"master_params", call.masters, true, fastopt::RoleKind::master};
  const ArrayTable arrays(roles, call.listed, call.absmax);
  fastopt::bindings::check_stochastic_dtype(call.options.stochastic && arrays.total() > 0,
                                            arrays.dtype() == cpu::DType::bf16,
                                            cpu::dtype_name(arrays.dtype()));
  if (call.check_only) return;
  cpu::TensorTable table = arrays.table();
  table.fresh = call.fresh;
  run_released([&] {
    cpu::step<Opt>(table, arrays.dtype(), arrays.state_dtype(), call.hyper, call.options);
  });
  arrays.bump_versions();
}

struct Steps {
  static constexpr const char* module_name = "fastopt._cpu";
  template <class Opt>
  static void run(const fastopt::bindings::CallArgs& args, const typename Opt::Hyper* bound) {
    step<Opt>(args, bound);
  }
};

// ---- quantization and Newton: the same arguments as fastopt._cuda's (stream=None here).
// Every size is read once from the arrays the kernel runs on and checked against the
// others (bindings/kernel_args.h) before anything is written. ---------------------------

namespace args = fastopt::bindings::args;
using args::Arg;

void host_only(const py::object& stream) {
  if (!stream.is_none())
    throw py::value_error("stream: only applies to CUDA arrays; this call runs on host arrays");
}

// `obj` as a NumPy array: itself, or its view through the array adapter (a PyTorch CPU
// tensor; an ndarray subclass as a plain ndarray, masked arrays and np.matrix refused;
// `written`: an inference tensor refused outside torch.inference_mode(), as torch does).
// All of a call's arguments are converted before any is described, since the adapter runs
// Python code.
py::object to_ndarray(py::handle obj, const char* name, bool written = false) {
  if (fastopt::bindings::is_plain_ndarray(obj.ptr())) return py::reinterpret_borrow<py::object>(obj);
  if (written) ArrayTable::check_inference_write(obj.ptr(), name);
  const py::object& adapter = ArrayTable::array_adapter();
  py::object view = adapter ? adapter(name, obj) : py::object(py::none());
  if (!py::isinstance<py::array>(view))
    throw py::type_error(std::string(name) + ": expected a numpy.ndarray, got " +
                         Py_TYPE(obj.ptr())->tp_name);
  return view;
}

// The name fastopt gives a NumPy dtype ("float32", "int8", "bfloat16" from ml_dtypes...);
// NumPy's own spelling for the others (">f4" for a big-endian float32).
std::string host_dtype(const py::detail::PyArray_Proxy* a) {
  using py::detail::npy_api;
  constexpr int kNpyHalf = 23, kNpyUserDef = 256;
  const auto* d = py::detail::array_descriptor_proxy(a->descr);
  if (d->byteorder != '>') {
    switch (d->type_num) {
      case npy_api::NPY_FLOAT_: return "float32";
      case npy_api::NPY_DOUBLE_: return "float64";
      case kNpyHalf: return "float16";
      case npy_api::NPY_BYTE_: return "int8";
      case npy_api::NPY_UBYTE_: return "uint8";
      case npy_api::NPY_BOOL_: return "bool";
      default: break;
    }
    static int bfloat16_type_num = -1;  // ml_dtypes' type number, once seen
    if (d->type_num == bfloat16_type_num) return "bfloat16";
    if (d->type_num >= kNpyUserDef &&
        py::handle(a->descr).attr("name").cast<std::string>() == "bfloat16") {
      bfloat16_type_num = d->type_num;
      return "bfloat16";
    }
  }
  return py::str(py::handle(a->descr)).cast<std::string>();
}

// One array argument: the NumPy array (held for the call) and its description. Absent
// (None) optional arguments have no bytes.
struct HostArg {
  py::object array;
  Arg arg;
  bool written = false;
  bool present = false;

  explicit HostArg(const char* name) : arg{name, "", {}} { arg.size = 0; }
  HostArg(py::object ndarray, const char* name, bool is_written)
      : array(std::move(ndarray)), arg{name, "", {}}, written(is_written), present(true) {
    const auto* a = py::detail::array_proxy(array.ptr());
    arg.dtype = host_dtype(a);
    arg.shape.assign(a->dimensions, a->dimensions + a->nd);
    for (int64_t e : arg.shape) arg.size *= e;
    arg.ptr = reinterpret_cast<uintptr_t>(a->data);
    arg.bytes = arg.size * py::reinterpret_borrow<py::array>(array).itemsize();
  }
  template <class T> T* ptr() const { return arg.data<T>(); }
};

// C-contiguous and aligned, writeable if written (zero-size arrays pass); checked after the
// sizes, so that a wrong shape is named as such.
void expect_layouts(std::initializer_list<const HostArg*> arrays) {
  using py::detail::npy_api;
  for (const HostArg* h : arrays) {
    if (!h->present || h->arg.size == 0) continue;
    const int flags = py::detail::array_proxy(h->array.ptr())->flags;
    const std::string name = h->arg.name;
    if (!(flags & npy_api::NPY_ARRAY_C_CONTIGUOUS_))
      throw py::value_error(name + ": must be C-contiguous");
    if (!(flags & npy_api::NPY_ARRAY_ALIGNED_))
      throw py::value_error(name + ": data is not aligned to its dtype");
    if (h->written && !(flags & npy_api::NPY_ARRAY_WRITEABLE_))
      throw py::value_error(name + ": is read-only but is updated in place");
  }
}

cpu::InType in_type(const Arg& x) {
  args::expect_float_input(x);
  return x.dtype == "float32" ? cpu::InType::f32
         : x.dtype == "float16" ? cpu::InType::f16 : cpu::InType::bf16;
}

// q: int8 or uint8, shaped like `like`. Returns whether it is uint8.
bool quantized(const Arg& q, const Arg& like) {
  args::expect_dtype(q, {"int8", "uint8"}, "int8 or uint8");
  args::expect_same_shape(q, like);
  return q.dtype == "uint8";
}

// A dequantized output: float32, float16 or bfloat16, shaped like q.
cpu::OutType dequantized(const Arg& out, const Arg& q) {
  args::expect_dequantized(out, q);
  return out.dtype == "float32" ? cpu::OutType::f32
         : out.dtype == "float16" ? cpu::OutType::f16 : cpu::OutType::bf16;
}

cpu::DType newton_dtype(const Arg& a) {
  return a.dtype == "float32" ? cpu::DType::f32 : cpu::DType::f64;
}

// q = clamp(rint(x / scale) + zero_point) per channel along axis (None: per tensor).
// Returns x's first non-finite flat index (check_finite), else -1.
int64_t quantize_affine(py::object x, py::object q, py::object scales, py::object zero_points,
                        py::object axis, py::object check_finite_arg, py::object stream) {
  const bool check_finite = fastopt::bindings::scalar_arg<bool>(check_finite_arg, "check_finite");
  host_only(stream);
  x = to_ndarray(x, "x");
  q = to_ndarray(q, "q", true);
  const HostArg ax(x, "x", false), aq(q, "q", true);
  const cpu::InType in = in_type(ax.arg);
  const bool unsigned_q = quantized(aq.arg, ax.arg);
  const args::Channels c = args::channels_of(ax.arg, axis);
  const Arg s = args::channel_params(scales, "scales", c.channels);
  const Arg z = args::channel_params(zero_points, "zero_points", c.channels);
  expect_layouts({&ax, &aq});
  args::expect_disjoint({&aq.arg, &ax.arg, &s, &z}, 1);
  if (ax.arg.size == 0) return -1;
  const cpu::ChannelLayout L{ax.arg.size, c.channels, c.inner};
  int64_t bad = -1;
  run_released([&] {
    cpu::quantize_affine(in, ax.ptr<const void>(), aq.ptr<void>(), unsigned_q, L,
                         s.data<const float>(), z.data<const float>(), &bad);
  });
  return check_finite ? bad : -1;
}

// out = (q - zero_point) * scale in float32, stored as out's float type (float32, float16 or
// bfloat16), per channel along axis (None: per tensor).
void dequantize_affine(py::object q, py::object out, py::object scales, py::object zero_points,
                       py::object axis, py::object stream) {
  host_only(stream);
  q = to_ndarray(q, "q");
  out = to_ndarray(out, "out", true);
  const HostArg aq(q, "q", false), ao(out, "out", true);
  args::expect_dtype(aq.arg, {"int8", "uint8"}, "int8 or uint8");
  const cpu::OutType out_type = dequantized(ao.arg, aq.arg);
  const args::Channels c = args::channels_of(aq.arg, axis);
  const Arg s = args::channel_params(scales, "scales", c.channels);
  const Arg z = args::channel_params(zero_points, "zero_points", c.channels);
  expect_layouts({&aq, &ao});
  args::expect_disjoint({&ao.arg, &aq.arg, &s, &z}, 1);
  if (aq.arg.size == 0) return;
  const cpu::ChannelLayout L{aq.arg.size, c.channels, c.inner};
  const bool unsigned_q = aq.arg.dtype == "uint8";
  run_released([&] {
    cpu::dequantize_affine(aq.ptr<const void>(), unsigned_q, out_type, ao.ptr<void>(), L,
                           s.data<const float>(), z.data<const float>());
  });
}

// (x's first non-finite flat index or -1, mins, maxs): the min and max of the finite
// elements per channel along axis (None: one channel), +inf / -inf for a channel without.
py::tuple minmax(py::object x, py::object axis, py::object stream) {
  host_only(stream);
  x = to_ndarray(x, "x");
  const HostArg ax(x, "x", false);
  const cpu::InType in = in_type(ax.arg);
  const args::Channels c = args::channels_of(ax.arg, axis);
  expect_layouts({&ax});
  py::array_t<float> mins(c.channels), maxs(c.channels);
  float *mn = mins.mutable_data(), *mx = maxs.mutable_data();
  std::fill(mn, mn + c.channels, std::numeric_limits<float>::infinity());
  std::fill(mx, mx + c.channels, -std::numeric_limits<float>::infinity());
  int64_t bad = -1;
  if (ax.arg.size > 0) {
    const cpu::ChannelLayout L{ax.arg.size, c.channels, c.inner};
    run_released([&] { cpu::minmax(in, ax.ptr<const void>(), L, mn, mx, &bad); });
  }
  return py::make_tuple(bad, mins, maxs);
}

// Per block of `block` consecutive elements of x: absmax and q = rint(x * 127/absmax).
// Returns x's first non-finite flat index (check_finite), else -1.
int64_t quantize_blockwise(py::object x, py::object q, py::object absmax, py::object block_arg,
                           py::object stochastic_arg, py::object seed_arg,
                           py::object check_finite_arg, py::object stream) {
  const int64_t block = fastopt::bindings::scalar_arg<int64_t>(block_arg, "block");
  const bool stochastic = fastopt::bindings::scalar_arg<bool>(stochastic_arg, "stochastic");
  const uint64_t seed = fastopt::bindings::scalar_arg<uint64_t>(seed_arg, "seed");
  const bool check_finite = fastopt::bindings::scalar_arg<bool>(check_finite_arg, "check_finite");
  host_only(stream);
  x = to_ndarray(x, "x");
  q = to_ndarray(q, "q", true);
  absmax = to_ndarray(absmax, "absmax", true);
  const HostArg ax(x, "x", false), aq(q, "q", true), am(absmax, "absmax", true);
  const cpu::InType in = in_type(ax.arg);
  args::expect_dtype(aq.arg, {"int8"}, "int8");
  args::expect_same_shape(aq.arg, ax.arg);
  args::expect_absmax(am.arg, ax.arg, block);
  expect_layouts({&ax, &aq, &am});
  args::expect_disjoint({&aq.arg, &am.arg, &ax.arg}, 2);
  const int64_t n = ax.arg.size;
  if (n == 0) return -1;
  int64_t bad = -1;
  run_released([&] {  // the kernel sees min(block, n): b*block + block stays in range
    cpu::quantize_blockwise(in, ax.ptr<const void>(), aq.ptr<int8_t>(), am.ptr<float>(), n,
                            std::min(block, n), stochastic, seed, &bad);
  });
  return check_finite ? bad : -1;
}

// out = q * (absmax / 127) per block of `block` consecutive elements, stored as out's float
// type (float32, float16 or bfloat16).
void dequantize_blockwise(py::object q, py::object absmax, py::object out, py::object block_arg,
                          py::object stream) {
  const int64_t block = fastopt::bindings::scalar_arg<int64_t>(block_arg, "block");
  host_only(stream);
  q = to_ndarray(q, "q");
  absmax = to_ndarray(absmax, "absmax");
  out = to_ndarray(out, "out", true);
  const HostArg aq(q, "q", false), am(absmax, "absmax", false), ao(out, "out", true);
  args::expect_dtype(aq.arg, {"int8"}, "int8");
  args::expect_absmax(am.arg, aq.arg, block);
  const cpu::OutType out_type = dequantized(ao.arg, aq.arg);
  expect_layouts({&aq, &am, &ao});
  args::expect_disjoint({&ao.arg, &aq.arg, &am.arg}, 1);
  const int64_t n = aq.arg.size;
  if (n == 0) return;
  run_released([&] {
    cpu::dequantize_blockwise(aq.ptr<const int8_t>(), am.ptr<const float>(), out_type,
                              ao.ptr<void>(), n, std::min(block, n));
  });
}

// Batched damped Cholesky: d = (H + damping*I)^-1 g and solved[b] for every system.
// params (None, or the array a Newton step will update) is checked with the others
// before anything runs.
void newton_solve(py::object hessians, py::object grads, py::object d, py::object solved,
                  py::object damping_arg, py::object params, py::object stream) {
  const double damping = fastopt::bindings::scalar_arg<double>(damping_arg, "damping");
  fastopt::bindings::kNonNegative.check("damping", damping);
  host_only(stream);
  hessians = to_ndarray(hessians, "hessians");
  grads = to_ndarray(grads, "grads");
  if (!params.is_none()) params = to_ndarray(params, "params", true);
  d = to_ndarray(d, "d", true);
  solved = to_ndarray(solved, "solved", true);
  const HostArg ah(hessians, "hessians", false), ag(grads, "grads", false);
  const HostArg ap = params.is_none() ? HostArg("params") : HostArg(params, "params", true);
  const HostArg ad(d, "d", true), as(solved, "solved", true);
  const args::Systems sys = args::newton_systems(ah.arg, ag.arg, ap.present ? &ap.arg : nullptr);
  args::expect_same_dtype(ad.arg, ah.arg);
  args::expect_same_shape(ad.arg, ag.arg);
  args::expect_flags(as.arg, ag.arg);
  expect_layouts({&ah, &ag, &ap, &ad, &as});
  args::expect_disjoint({&ap.arg, &ad.arg, &as.arg, &ag.arg, &ah.arg}, 3);
  if (sys.batch == 0) return;
  const cpu::DType dt = newton_dtype(ah.arg);
  run_released([&] {
    cpu::newton_solve(dt, ah.ptr<const void>(), ag.ptr<const void>(), ad.ptr<void>(),
                      as.ptr<bool>(), sys.batch, sys.n, damping);
  });
}

// p <- p - lr*d for the systems with use[b] (all when use is None).
void newton_apply(py::object params, py::object d, py::object use, py::object lr_arg,
                  py::object stream) {
  const double lr = fastopt::bindings::scalar_arg<double>(lr_arg, "lr");
  fastopt::bindings::kNonNegative.check("lr", lr);
  host_only(stream);
  params = to_ndarray(params, "params", true);
  d = to_ndarray(d, "d");
  if (!use.is_none()) use = to_ndarray(use, "use");
  const HostArg ap(params, "params", true), ad(d, "d", false);
  const HostArg au = use.is_none() ? HostArg("use") : HostArg(use, "use", false);
  const args::Systems sys = args::newton_update(ap.arg, ad.arg);
  if (au.present) args::expect_flags(au.arg, ap.arg);
  expect_layouts({&ap, &ad, &au});
  args::expect_disjoint({&ap.arg, &ad.arg, &au.arg}, 1);
  if (sys.batch == 0) return;
  const cpu::DType dt = newton_dtype(ap.arg);
  const bool* mask = au.present ? au.ptr<const bool>() : nullptr;
  run_released([&] {
    cpu::newton_apply(dt, ap.ptr<void>(), ad.ptr<const void>(), mask, sys.batch, sys.n, lr);
  });
}

// ---- magnitude pruning -------------------------------------------------------------------

// A list argument of the pruning kernels: each element as a NumPy array with its
// description, named "<role>[i]".
struct HostList {
  std::vector<std::string> names;
  std::vector<HostArg> items;

  HostList(py::handle obj, const char* role, bool written) {
    if (!py::isinstance<py::list>(obj))
      throw py::type_error(std::string(role) + ": expected a list of arrays, got " +
                           Py_TYPE(obj.ptr())->tp_name);
    const py::list list = fastopt::bindings::list_copy(obj);
    const size_t n = list.size();
    names.reserve(n);  // never reallocated: items keep pointers to the names
    items.reserve(n);
    for (size_t i = 0; i < n; ++i) names.push_back(std::string(role) + "[" + std::to_string(i) + "]");
    for (size_t i = 0; i < n; ++i)
      items.emplace_back(to_ndarray(list[i], names[i].c_str(), written), names[i].c_str(), written);
  }
  size_t size() const { return items.size(); }
};

cpu::DType float_dtype(const Arg& a) {
  args::expect_dtype(a, {"float32", "float64", "float16", "bfloat16"},
                     "float32, float64, float16 or bfloat16 in native byte order");
  return a.dtype == "float32" ? cpu::DType::f32
         : a.dtype == "float64" ? cpu::DType::f64
         : a.dtype == "float16" ? cpu::DType::f16 : cpu::DType::bf16;
}

// The arrays and masks (out) of one pruning call, checked -- one float dtype, a bool or
// uint8 mask per array of its shape, layouts, no mask sharing memory with anything -- and
// tabled for the kernels.
struct PruneCall {
  HostList arrays, masks;
  cpu::DType dtype = cpu::DType::f32;
  std::vector<const void*> x;
  std::vector<uint8_t*> m;
  std::vector<int64_t> offsets{0};

  PruneCall(const py::object& arrays_obj, const py::object& out_obj)
      : arrays(arrays_obj, "arrays", false), masks(out_obj, "out", true) {
    const size_t n = arrays.size();
    if (masks.size() != n)
      throw py::value_error("out: expected " + std::to_string(n) +
                            " arrays (one per entry of arrays), got " + std::to_string(masks.size()));
    std::vector<fastopt::bindings::Span> spans;
    for (size_t i = 0; i < n; ++i) {
      const HostArg &a = arrays.items[i], &mk = masks.items[i];
      const cpu::DType d = float_dtype(a.arg);
      if (i == 0) dtype = d;
      else if (d != dtype)
        throw py::type_error(std::string(a.arg.name) + ": dtype " + a.arg.dtype + " differs from " +
                             "arrays[0]'s " + arrays.items[0].arg.dtype +
                             " (all arrays of one call share a dtype)");
      args::expect_dtype(mk.arg, {"bool", "uint8"}, "bool or uint8");
      args::expect_same_shape(mk.arg, a.arg);
      expect_layouts({&a, &mk});
      for (const HostArg* h : {&a, &mk})
        if (h->arg.bytes > 0)
          spans.push_back({h->arg.ptr, h->arg.ptr + uintptr_t(h->arg.bytes),
                           h == &a ? "arrays" : "out", i, h == &mk});
      x.push_back(a.ptr<const void>());
      m.push_back(mk.ptr<uint8_t>());
      offsets.push_back(offsets.back() + a.arg.size);
    }
    fastopt::bindings::check_no_overlap(spans, [](const char* role, size_t i) {
      return std::string(role) + "[" + std::to_string(i) + "]";
    });
  }

  cpu::PruneTable table() const {
    cpu::PruneTable t;
    t.num_tensors = int(x.size());
    t.x = x.data();
    t.masks = m.data();
    t.offsets = offsets.data();
    return t;
  }
};

// Masks keeping all but prune_counts[p] elements of selection p, those of smallest |x|
// (ties: the earlier pruned first). One count: a threshold over all arrays; one per array:
// a threshold per array.
void prune_magnitude(py::object arrays, py::object out, py::object prune_counts,
                     py::object stream) {
  host_only(stream);
  const PruneCall call(arrays, out);
  std::vector<int64_t> sizes, counts;
  for (const HostArg& a : call.arrays.items) sizes.push_back(a.arg.size);
  std::vector<int> starts = args::prune_problems(prune_counts, sizes, counts);
  if (call.offsets.back() == 0) return;
  cpu::PruneTable t = call.table();
  t.num_problems = int(counts.size());
  t.problem_start = starts.data();
  t.prune_counts = counts.data();
  run_released([&] { cpu::prune_magnitude(t, call.dtype); });
}

// Masks keeping the n largest |x| of each group of m consecutive elements along the last
// axis (ties: the earlier pruned first).
void prune_n_m(py::object arrays, py::object out, py::object n_obj, py::object m_obj,
               py::object stream) {
  host_only(stream);
  const int64_t n = args::int_arg(n_obj, "n"), m = args::int_arg(m_obj, "m");
  const PruneCall call(arrays, out);
  std::vector<const Arg*> described;
  for (const HostArg& a : call.arrays.items) described.push_back(&a.arg);
  args::expect_n_m(described, n, m, fastopt::kMaxGroup);
  if (call.offsets.back() == 0) return;
  const cpu::PruneTable t = call.table();
  run_released([&] { cpu::prune_n_m(t, call.dtype, int(n), int(m)); });
}

void add_inplace(py::object dst, py::object src) {
  const py::list dst_list(py::make_tuple(dst)), src_list(py::make_tuple(src));
  const std::array<RoleSpec, 2> roles{{{"dst", dst_list, true, fastopt::RoleKind::param},
                                       {"src", src_list, false, fastopt::RoleKind::grad}}};
  const ArrayTable arrays(roles, false);
  if (arrays.dtype() != cpu::DType::f32 && arrays.dtype() != cpu::DType::f64)
    throw py::type_error("dst: add_inplace takes float32 or float64 arrays");
  run_released([&] { cpu::add_inplace(arrays.table(), arrays.dtype()); });
}

// Gradient clipping (cpu/clip_kernels.h): the total of the norm terms of one list of grads
// of one dtype (sum |g|^p; max |g| for an infinite norm_type), and g <- g * coefficient.
// fastopt/clip.py combines the totals of several dtypes, takes the root and the coefficient.
// `writeable`: the grads are checked as for scale_grads (writeable, no overlaps), since the
// caller scales them next and must not have scaled some when a later one is refused.
double grad_norm_total(py::object grads, py::object listed_arg, py::object norm_type_arg,
                       py::object writeable_arg) {
  bool listed = false, writeable = false;
  double norm_type = 0.0;
  fastopt::bindings::read_keyword("listed", listed_arg.ptr(), listed);
  fastopt::bindings::read_keyword("writeable", writeable_arg.ptr(), writeable);
  fastopt::bindings::read_keyword("norm_type", norm_type_arg.ptr(), norm_type);
  if (!(norm_type > 0.0))
    throw py::value_error("norm_type: must be > 0 (or inf), got " + std::to_string(norm_type));
  const std::array<RoleSpec, 1> roles{{{"grads", grads, writeable, fastopt::RoleKind::param}}};
  const ArrayTable arrays(roles, listed);
  double total = 0.0;
  const fastopt::NormKind kind = fastopt::norm_kind(norm_type);
  run_released([&] { total = cpu::grad_norm_total(arrays.table(), arrays.dtype(), kind, norm_type); });
  return total;
}

void scale_grads(py::object grads, py::object listed_arg, py::object coefficient_arg) {
  bool listed = false;
  double coefficient = 0.0;
  fastopt::bindings::read_keyword("listed", listed_arg.ptr(), listed);
  fastopt::bindings::read_keyword("coefficient", coefficient_arg.ptr(), coefficient);
  const std::array<RoleSpec, 1> roles{{{"grads", grads, true, fastopt::RoleKind::param}}};
  const ArrayTable arrays(roles, listed);
  run_released([&] { cpu::scale_grads(arrays.table(), arrays.dtype(), coefficient); });
  arrays.bump_versions();
}

// ---- Adafactor ---------------------------------------------------------------------------

// Adafactor (cpu/adafactor_kernels.h) over one list of params of one dtype, with their
// grads. row_vars, col_vars and variances are lists aligned with params, None where a
// param has no such state: a param of two or more dimensions has a row factor shaped
// (..., rows, 1) and a column factor (..., 1, cols) (torch's shapes); a vector or 0-d
// param its second moment, shaped like it. All in C order, in the state type (float32 for
// float32 and 16-bit params, float64 for float64). steps: the step t >= 1 each param takes.
// stochastic_seed: bfloat16 params rounded stochastically (common/optim/adafactor.h).
// master_params: float32 copies of 16-bit params, stepped in their place (the params
// written as them rounded to nearest).
// Everything is checked before anything is written (bindings/adafactor_args.h); with
// check_only, nothing more is done.
void adafactor_step(py::object params, py::object grads, py::object row_vars, py::object col_vars,
                    py::object variances, py::object steps, py::object lr, py::object beta2_decay,
                    py::object eps1, py::object eps2, py::object d, py::object weight_decay,
                    py::object maximize, py::object listed_arg, py::object check_only,
                    py::object stochastic_seed, py::object master_params) {
  namespace af = fastopt::bindings::adafactor;
  using fastopt::bindings::Where;
  const bool listed = fastopt::bindings::scalar_arg<bool>(listed_arg, "listed");
  fastopt::AdafactorHyper h = af::hyper(lr, beta2_decay, eps1, eps2, d, weight_decay, maximize);
  af::rounding(stochastic_seed, master_params, h);
  for (py::object* list : {&params, &grads, &row_vars, &col_vars, &variances, &steps, &master_params})
    *list = fastopt::bindings::list_copy(*list);
  const std::array<RoleSpec, 3> roles{
      {{"params", params, true, fastopt::RoleKind::param},
       {"grads", grads, false, fastopt::RoleKind::grad},
       {"master_params", master_params, true, fastopt::RoleKind::master}}};
  const ArrayTable main(roles, listed);
  fastopt::bindings::check_stochastic_dtype(h.stochastic && main.total() > 0,
                                            main.dtype() == cpu::DType::bf16,
                                            cpu::dtype_name(main.dtype()));
  const size_t n = py::len(params);
  const cpu::DType state = cpu::state_dtype(main.dtype());
  // Each state list's arrays (None where a param has none) as one table, named by the
  // params' indices, checked against the params' shapes.
  const py::handle lists[af::num_states] = {row_vars, col_vars, variances};
  std::unique_ptr<ArrayTable> tables[af::num_states];
  std::vector<size_t> index[af::num_states];
  for (int k = 0; k < af::num_states; ++k) {
    af::check_list(lists[k], k, n);
    py::list chosen;
    for (size_t i = 0; i < n; ++i) {
      const py::handle item = af::entry(lists[k], k, i, main.shape(i), listed);
      if (item.is_none()) continue;
      chosen.append(item);
      index[k].push_back(i);
    }
    const auto state_table = [&](const py::list& items, std::vector<size_t> shown) {
      const std::array<RoleSpec, 1> one{{{af::kStateNames[k], items, true, fastopt::RoleKind::param}}};
      const size_t first = shown.empty() ? 0 : shown.front();
      auto t = std::make_unique<ArrayTable>(one, listed, py::none(), std::move(shown));
      if (!items.empty() && t->dtype() != state)
        throw py::type_error(Where{af::kStateNames[k], first, listed}.str() +
                             ": dtype " + cpu::dtype_name(t->dtype()) + " is not the state type " +
                             cpu::dtype_name(state) + " (float32 for float32 and 16-bit params, "
                             "float64 for float64)");
      return t;
    };
    try {
      tables[k] = state_table(chosen, index[k]);
    } catch (const py::type_error&) {  // the first entry's own dtype is named first when wrong
      if (chosen.size() > 1) {
        py::list first;
        first.append(chosen[0]);
        state_table(first, {index[k][0]});
      }
      throw;
    }
    const ArrayTable& t = *tables[k];
    for (size_t j = 0; j < index[k].size(); ++j) {
      const size_t i = index[k][j];
      if (t.shape(j) != af::state_shape(main.shape(i), k)) af::wrong_shape(k, i, main.shape(i), listed);
      if (!t.c_contiguous(j))
        throw py::value_error(Where{af::kStateNames[k], i, listed}.str() + ": must be C-contiguous");
    }
  }
  std::vector<fastopt::bindings::Span> spans = main.spans();
  for (const auto& t : tables) {
    const std::vector<fastopt::bindings::Span> more = t->spans();
    spans.insert(spans.end(), more.begin(), more.end());
  }
  fastopt::bindings::check_no_overlap(
      spans, [&](const char* role, size_t i) { return Where{role, i, listed}.str(); });
  const std::vector<double> counts = af::steps(steps, n);
  std::vector<cpu::AdafactorParam> work(n);
  const cpu::TensorTable tm = main.table();
  size_t next[af::num_states] = {};
  for (size_t i = 0; i < n; ++i) {
    const std::vector<int64_t> shape = main.shape(i);
    cpu::AdafactorParam& a = work[i];
    a = af::view(shape, counts[i]);
    if (a.batch * a.rows * a.cols > 0 && !main.c_contiguous(i)) af::not_c_order(i, listed);
    a.param = tm.ptrs[0][i];
    a.grad = tm.ptrs[1][i];
    if (!master_params.is_none()) a.master = tm.ptrs[cpu::kMasterSlot][i];
    void** state_ptr[af::num_states] = {&a.row, &a.col, &a.variance};
    for (int k = 0; k < af::num_states; ++k)
      if (af::keeps(shape, k)) *state_ptr[k] = tables[k]->table().ptrs[0][next[k]++];
  }
  if (fastopt::bindings::scalar_arg<bool>(check_only, "check_only")) return;
  const cpu::DType dtype = main.dtype();
  run_released([&] { cpu::adafactor_step(dtype, work.data(), int64_t(n), h); });
  main.bump_versions();
  for (const auto& t : tables) t->bump_versions();
}

// An optimizer class's params checked as its steps will check them (dtype, dense layout,
// alignment, writeable, no overlaps), at its construction; nothing is run.
void check_params(py::object params, py::object listed) {
  const std::array<RoleSpec, 1> roles{
      {{"params", params, true, fastopt::RoleKind::param}}};
  const ArrayTable arrays(roles, fastopt::bindings::scalar_arg<bool>(listed, "listed"));
}

// Where each torch tensor of the list keeps its elements (ArrayTable::torch_layout), as
// bytes: equal bytes, the same memory laid out the same way.
py::bytes tensor_layouts(py::handle tensors) {
  if (!PyList_Check(tensors.ptr()))
    throw py::type_error(std::string("tensors: expected a list of torch tensors, got ") +
                         Py_TYPE(tensors.ptr())->tp_name);
  std::vector<int64_t> words;
  words.reserve(size_t(PyList_GET_SIZE(tensors.ptr())) * 6);
  // (the size read again and the item held at each step: reading a tensor subclass may run
  // Python code that changes the list)
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(tensors.ptr()); ++i) {
    const py::object item = py::reinterpret_borrow<py::object>(PyList_GET_ITEM(tensors.ptr(), i));
    ArrayTable::torch_layout(item.ptr(), {"tensors", size_t(i), true}, words);
  }
  return py::bytes(reinterpret_cast<const char*>(words.data()), words.size() * sizeof(int64_t));
}

// The byte span [begin, end) of an array's elements, from its base address, shape, byte
// strides (any sign) and item size; false for a zero-size array, which holds no memory.
bool byte_span(uintptr_t base, const int64_t* shape, const int64_t* byte_strides, int64_t nd,
               int64_t item, fastopt::bindings::Span& span) {
  int64_t lo = 0, hi = item;
  for (int64_t d = 0; d < nd; ++d) {
    if (shape[d] == 0) return false;
    const int64_t reach = (shape[d] - 1) * byte_strides[d];
    (reach < 0 ? lo : hi) += reach;
  }
  span.begin = base + uintptr_t(lo);
  span.end = base + uintptr_t(hi);
  return true;
}

// Where `obj` keeps its elements: a NumPy array, a torch tensor (any device), an array with
// __cuda_array_interface__ (CuPy, Numba) or with __dlpack__; false for a zero-size one.
bool array_span(py::handle obj, size_t i, fastopt::bindings::Span& span) {
  const fastopt::bindings::Where where{"arrays", i, true};
  if (py::detail::npy_api::get().PyArray_Check_(obj.ptr())) {
    const auto* a = py::detail::array_proxy(obj.ptr());
    const int64_t item = py::reinterpret_borrow<py::array>(obj).itemsize();
    std::vector<int64_t> shape(a->dimensions, a->dimensions + a->nd);
    std::vector<int64_t> strides(a->strides, a->strides + a->nd);
    return byte_span(reinterpret_cast<uintptr_t>(a->data), shape.data(), strides.data(), a->nd,
                     item, span);
  }
  if (ArrayTable::is_torch_tensor(obj.ptr())) {  // words: pointer, device, dtype, nd, shape, strides
    std::vector<int64_t> words;
    int64_t item = 1;
    ArrayTable::torch_layout(obj.ptr(), where, words, &item);
    const int64_t nd = words[3];
    std::vector<int64_t> strides(words.begin() + 4 + nd, words.begin() + 4 + 2 * nd);
    for (int64_t& stride : strides) stride *= item;
    return byte_span(uintptr_t(words[0]), words.data() + 4, strides.data(), nd, item, span);
  }
  if (!py::hasattr(obj, "__cuda_array_interface__")) {
    if (!py::hasattr(obj, "__dlpack__"))
      throw py::type_error(where.str() + ": expected an array, got " + Py_TYPE(obj.ptr())->tp_name);
    // Through a DLPack capsule, read and left unconsumed: its destructor frees it.
    py::object capsule;
    try {
      capsule = obj.attr("__dlpack__")();
    } catch (py::error_already_set& e) {  // (BufferError: the protocol's "cannot export")
      throw py::type_error(where.str() + ": its __dlpack__() refused: " + e.what());
    }
    auto* managed = static_cast<fastopt::bindings::dlpack::ManagedTensor*>(
        PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
    if (!managed) {
      PyErr_Clear();
      throw py::type_error(where.str() + ": its __dlpack__() gave no DLPack capsule");
    }
    const auto& t = managed->dl_tensor;
    const int64_t item = std::max<int64_t>(1, int64_t(t.dtype.bits) * t.dtype.lanes / 8);
    std::vector<int64_t> strides(size_t(std::max(t.ndim, 0)));
    for (int64_t d = t.ndim - 1, step = 1; d >= 0; step *= t.shape[d], --d)
      strides[size_t(d)] = (t.strides ? t.strides[d] : step) * item;  // no strides: C order
    return byte_span(reinterpret_cast<uintptr_t>(t.data) + t.byte_offset, t.shape,
                     strides.data(), t.ndim, item, span);
  }
  try {  // (a producer's dict: its shape, strides, typestr and data, as the protocol has them)
    const py::dict cai = obj.attr("__cuda_array_interface__");
    const auto shape = cai["shape"].cast<std::vector<int64_t>>();
    const std::string typestr = cai["typestr"].cast<std::string>();
    const int64_t item = typestr.size() > 2 ? std::stoll(typestr.substr(2)) : 0;
    if (item <= 0) throw py::value_error("bad typestr");
    std::vector<int64_t> strides(shape.size());
    if (cai.contains("strides") && !cai["strides"].is_none()) {
      strides = cai["strides"].cast<std::vector<int64_t>>();
      if (strides.size() != shape.size()) throw py::value_error("strides");
    } else {  // C order
      int64_t step = item;
      for (size_t d = shape.size(); d-- > 0;) {
        strides[d] = step;
        step *= shape[d];
      }
    }
    const uintptr_t base = py::tuple(cai["data"])[0].cast<uintptr_t>();
    return byte_span(base, shape.data(), strides.data(), int64_t(shape.size()), item, span);
  } catch (const std::exception&) {  // a missing key, a wrong type, a number out of range
    throw py::type_error(where.str() + ": its __cuda_array_interface__ is not a valid one");
  }
}

// The byte spans of a list of arrays (array_span), with each array's index and flag from
// `written` (a list of bools, one per array): checked and read as first_overlap takes them.
std::vector<fastopt::bindings::Span> list_spans(py::handle arrays, py::handle written) {
  if (!PyList_Check(arrays.ptr()))
    throw py::type_error(std::string("arrays: expected a list, got ") + Py_TYPE(arrays.ptr())->tp_name);
  if (!PyList_Check(written.ptr()))
    throw py::type_error(std::string("written: expected a list, got ") + Py_TYPE(written.ptr())->tp_name);
  const Py_ssize_t n = PyList_GET_SIZE(arrays.ptr());
  if (PyList_GET_SIZE(written.ptr()) != n)
    throw py::value_error("written: expected one bool per array");
  std::vector<fastopt::bindings::Span> spans;
  spans.reserve(size_t(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    // (each item held: describing a tensor subclass may run Python code that edits the list)
    const py::object item = py::reinterpret_borrow<py::object>(PyList_GET_ITEM(arrays.ptr(), i));
    const py::object flag =
        py::reinterpret_borrow<py::object>(PyList_GET_ITEM(written.ptr(), i));
    if (!PyBool_Check(flag.ptr()))
      throw py::type_error("written[" + std::to_string(i) + "]: expected a bool, got " +
                           Py_TYPE(flag.ptr())->tp_name);
    fastopt::bindings::Span span{0, 0, "arrays", size_t(i), flag.ptr() == Py_True};
    if (array_span(item, size_t(i), span)) spans.push_back(span);
    if (PyList_GET_SIZE(arrays.ptr()) != n || PyList_GET_SIZE(written.ptr()) != n)
      throw py::value_error("arrays: changed while being read");
  }
  return spans;
}

// Spans as memory_spans returns them: 32-byte records (begin, end, index, written),
// in address order.
struct SpanRecord {
  uint64_t begin, end, index, written;
};

// The spans of `arrays` (with `written`, as first_overlap takes them) as bytes for
// first_overlap's `known`: arrays whose memory a caller keeps between calls are described
// once, not at every call.
py::bytes memory_spans(py::handle arrays, py::handle written) {
  std::vector<fastopt::bindings::Span> spans = list_spans(arrays, written);
  std::sort(spans.begin(), spans.end(),
            [](const auto& a, const auto& b) { return a.begin < b.begin; });
  std::vector<SpanRecord> records(spans.size());
  for (size_t k = 0; k < spans.size(); ++k)
    records[k] = {spans[k].begin, spans[k].end, spans[k].index, spans[k].written ? 1u : 0u};
  return py::bytes(reinterpret_cast<const char*>(records.data()),
                   records.size() * sizeof(SpanRecord));
}

// The aliasing check across the kernel calls of one step (each call checks its own
// arrays): the first pair (i, j), i < j, of arrays sharing memory where either is written,
// else None. `arrays` and `written`: lists, a bool per array; `known`: memory_spans of more
// arrays, numbered from len(arrays) on. The caller names them.
py::object first_overlap(py::handle arrays, py::handle written, py::handle known) {
  std::vector<fastopt::bindings::Span> spans = list_spans(arrays, written);
  const size_t fresh = spans.size(), n = size_t(PyList_GET_SIZE(arrays.ptr()));
  if (!known.is_none()) {
    if (!PyBytes_Check(known.ptr()))
      throw py::type_error(std::string("known: expected bytes from memory_spans, got ") +
                           Py_TYPE(known.ptr())->tp_name);
    const Py_ssize_t bytes = PyBytes_GET_SIZE(known.ptr());
    if (bytes % Py_ssize_t(sizeof(SpanRecord)))
      throw py::value_error("known: not a list of memory_spans records");
    const size_t count = size_t(bytes) / sizeof(SpanRecord);
    std::vector<SpanRecord> records(count);
    std::memcpy(records.data(), PyBytes_AS_STRING(known.ptr()), size_t(bytes));
    for (size_t k = 0; k < count; ++k) {
      const SpanRecord& r = records[k];
      if (r.end < r.begin || (k && r.begin < records[k - 1].begin))
        throw py::value_error("known: not a list of memory_spans records");
      spans.push_back({uintptr_t(r.begin), uintptr_t(r.end), "known", size_t(n + r.index),
                       r.written != 0});
    }
  }
  // the new spans sorted, merged with the known ones (already in address order)
  std::vector<fastopt::bindings::SpanKey> keys(spans.size());
  for (size_t k = 0; k < spans.size(); ++k) keys[k] = {spans[k].begin, uint32_t(k)};
  std::sort(keys.begin(), keys.begin() + ptrdiff_t(fresh));
  std::inplace_merge(keys.begin(), keys.begin() + ptrdiff_t(fresh), keys.end());
  const auto [s, hit] = fastopt::bindings::find_overlap(spans, keys.data(), keys.size());
  if (!s) return py::none();
  return py::make_tuple(std::min(s->index, hit->index), std::max(s->index, hit->index));
}

py::dict build_info() {
  py::dict d;
  d["version"] = FASTOPT_VERSION;
  d["compiler"] = FASTOPT_CXX_COMPILER;
#ifdef FASTOPT_OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
#ifdef FASTOPT_HAVE_AVX2
  d["cpu_paths"] = py::make_tuple("scalar", "avx2");
#else
  d["cpu_paths"] = py::make_tuple("scalar");
#endif
  d["cpu_has_avx2_fma"] = cpu::cpu_has_avx2();
  return d;
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "fastopt CPU kernels (scalar and AVX2 paths, OpenMP threads)";
  using fastopt::bindings::def;
  using py::arg;
  fastopt::bindings::StepBindings<Steps>::add(m);
  def(m, "set_hyper_ranges", &fastopt::bindings::set_hyper_ranges, arg("optimizer"), arg("ranges"),
        "The ranges the step bindings check each real hyper-parameter against "
        "({name: (lo, hi, lo_open, hi_open)}, from fastopt/_specs.py at import)");
  def(m, "optimizers", &fastopt::bindings::describe_optimizers,
        "Each optimizer's array roles, hyper-parameter names and whether it takes step");
  def(
      m, "state8_map",
      [](py::object is_signed) {
        const fastopt::State8Map& map = fastopt::state8_map(fastopt::bindings::scalar_arg<bool>(is_signed, "signed"));
        return py::array_t<float>(256, map.value);
      },
      arg("signed"), "The 256 values of 8-bit state's dynamic map (common/state8.h)");
  // Quantization and Newton: the same arguments as in fastopt._cuda.
  const auto host_stream = arg("stream").none(true) = py::none();
  def(m, "quantize_affine", &quantize_affine, arg("x"), arg("q"), arg("scales"),
        arg("zero_points"), arg("axis").none(true), arg("check_finite"),
        host_stream);
  def(m, "dequantize_affine", &dequantize_affine, arg("q"), arg("out"), arg("scales"),
        arg("zero_points"), arg("axis").none(true), host_stream);
  def(m, "minmax", &minmax, arg("x"), arg("axis").none(true), host_stream);
  def(m, "quantize_blockwise", &quantize_blockwise, arg("x"), arg("q"), arg("absmax"),
        arg("block"), arg("stochastic"), arg("seed"), arg("check_finite"), host_stream);
  def(m, "dequantize_blockwise", &dequantize_blockwise, arg("q"), arg("absmax"), arg("out"),
        arg("block"), host_stream);
  def(m, "newton_solve", &newton_solve, arg("hessians"), arg("grads"), arg("d"), arg("solved"),
        arg("damping"), arg("params").none(true) = py::none(), host_stream);
  def(m, "newton_apply", &newton_apply, arg("params"), arg("d"), arg("use").none(true),
        arg("lr"), host_stream);
  def(m, "prune_magnitude", &prune_magnitude, arg("arrays"), arg("out"), arg("prune_counts"),
        host_stream);
  def(m, "prune_n_m", &prune_n_m, arg("arrays"), arg("out"), arg("n"), arg("m"), host_stream);
  def(m, "add_inplace", &add_inplace, arg("dst"), arg("src"),
        "dst += src with all threads: the bandwidth ceiling of the benchmark");
  def(m, "grad_norm_total", &grad_norm_total, arg("grads"), arg("listed"), arg("norm_type"),
        arg("writeable"), "Sum of |g|^norm_type over a list of grads of one dtype (max |g| for inf)");
  def(m, "scale_grads", &scale_grads, arg("grads"), arg("listed"), arg("coefficient"),
        "g <- g * coefficient in place, over a list of grads of one dtype");
  def(m, "adafactor_step", &adafactor_step, arg("params"), arg("grads"), arg("row_vars"),
        arg("col_vars"), arg("variances"), arg("steps"), arg("lr"), arg("beta2_decay"),
        arg("eps1"), arg("eps2"), arg("d"), arg("weight_decay"), arg("maximize"), arg("listed"),
        py::kw_only(), arg("check_only") = false, arg("stochastic_seed") = py::none(),
        arg("master_params") = py::none(),
        "Adafactor over a list of params of one dtype (see fastopt.adafactor_); check_only: "
        "every check, nothing run; stochastic_seed: bfloat16 params rounded stochastically; "
        "master_params: float32 copies of 16-bit params stepped in their place");
  def(m, "tensor_layouts", &tensor_layouts, arg("tensors"),
        "Where each torch tensor keeps its elements (pointer, device, dtype, shape, strides), "
        "as bytes to compare");
  def(m, "first_overlap", &first_overlap, arg("arrays"), arg("written"),
        arg("known").none(true) = py::none(),
        "The first pair (i, j) of the arrays sharing memory where either is written "
        "(written: a bool per array; known: memory_spans of more, numbered after them), "
        "else None; NumPy, torch (any device), CUDA arrays");
  def(m, "memory_spans", &memory_spans, arg("arrays"), arg("written"),
        "The arrays' byte spans, as first_overlap's known= takes them");
  def(m, "check_params", &check_params, arg("params"), arg("listed"),
        "Checks an optimizer's params as its steps will (raises naming the bad one)");
  def(m, "set_cpu_path", [](py::object path) {
    if (!PyUnicode_Check(path.ptr()))
      throw py::type_error(std::string("path: expected a str, got ") + Py_TYPE(path.ptr())->tp_name);
    try {
      cpu::set_isa(path.cast<std::string>());
    } catch (const std::invalid_argument& e) {
      throw py::value_error(std::string("path: ") + e.what());
    }
  }, arg("path"));
  def(m, "get_cpu_path", [] { return std::string(cpu::isa_name(cpu::active_isa())); });
  def(m, "set_num_threads", [](py::object n) {
    try {
      cpu::set_num_threads(fastopt::bindings::scalar_arg<int64_t>(n, "n"));
    } catch (const std::invalid_argument& e) {
      throw py::value_error(std::string("n: ") + e.what());
    }
  }, arg("n"));
  def(m, "get_num_threads", &cpu::num_threads);
  def(m, "build_info", &build_info);
  def(m, "set_array_adapter",
        [](py::object fn) {
          if (!PyCallable_Check(fn.ptr()))
            throw py::type_error(std::string("adapter: expected a callable, got ") +
                                 Py_TYPE(fn.ptr())->tp_name);
          ArrayTable::array_adapter() = fn;
        },
        arg("adapter"), "Callable (name, obj) -> numpy view, for arrays that are not ndarrays");
}
