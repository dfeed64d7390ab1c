// fastopt._cuda: thin pybind11 bindings of the CUDA kernels. Each step function receives
// aligned lists of CUDA arrays and the hyper-parameters (checked against the ranges Python
// registers), checks and tables them (device_table.h, optionally through a cached Plan),
// and launches on the given stream without synchronising. It imports on machines without a GPU or driver;
// device_status() then says why CUDA is not usable.
#include <cuda_runtime.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <exception>
#include <pybind11/stl.h>
#include <algorithm>
#include <cstring>
#include <deque>
#include <string>
#include "bindings/adafactor_args.h"
#include "bindings/checked_def.h"
#include "bindings/device_table.h"
#include "bindings/optim_binding.h"
#include "bindings/kernel_args.h"
#include "bindings/overlap.h"
#include "common/prune.h"
#include "cuda/adafactor_kernels.h"
#include "cuda/clip_kernels.h"
#include "cuda/device_info.h"
#include "cuda/newton_kernels.h"
#include "cuda/optim_kernels.h"
#include "cuda/prune_kernels.h"
#include "cuda/quant_kernels.h"
#include "cuda/scratch.h"
#include "cuda_build_info.h"

namespace py = pybind11;
namespace cuda = fastopt::cuda;
using fastopt::bindings::DeviceArray;
using fastopt::bindings::DevicePlan;

namespace {

// A driver API function, reached through the runtime (the module does not link libcuda);
// null where the driver lacks it.
template <class Fn> Fn driver_function(const char* name) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found{};
  if (cudaGetDriverEntryPointByVersion(name, &fn, 12000, cudaEnableDefault, &found) !=
          cudaSuccess ||
      found != cudaDriverEntryPointSuccess) {
    cudaGetLastError();
    fn = nullptr;
  }
  return reinterpret_cast<Fn>(fn);
}

// Whether the calling thread has a current CUDA context.
bool thread_has_context() {
  using GetCurrent = int (*)(void** context);  // CUresult cuCtxGetCurrent(CUcontext*)
  static const GetCurrent get_current = driver_function<GetCurrent>("cuCtxGetCurrent");
  void* context = nullptr;
  return get_current && get_current(&context) == 0 && context != nullptr;
}

// Whether device `device`'s primary context (the runtime's, torch's and CuPy's) is active.
bool primary_context_active(int device) {
  // CUresult cuDeviceGet(CUdevice*, int ordinal); cuDevicePrimaryCtxGetState(CUdevice,
  // unsigned* flags, int* active)
  using DeviceGet = int (*)(int* handle, int ordinal);
  using GetState = int (*)(int handle, unsigned* flags, int* active);
  static const DeviceGet device_get = driver_function<DeviceGet>("cuDeviceGet");
  static const GetState get_state = driver_function<GetState>("cuDevicePrimaryCtxGetState");
  int handle = 0, active = 0;
  unsigned flags = 0;
  return device_get && get_state && device_get(&handle, device) == 0 &&
         get_state(handle, &flags, &active) == 0 && active != 0;
}

// Makes the arrays' device current for the launch and restores the caller's afterwards, as
// torch's device guard does: where the caller's thread has a context, or the caller's
// device's primary context is active (a new thread's device is 0: in a process using
// device 0, restored; where device 0 was never used, left, since making it current would
// create its context, hundreds of MB, just by restoring it).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (device < 0) return;
    const bool had_context = thread_has_context();
    if (cudaGetDevice(&previous_) != cudaSuccess) {
      cudaGetLastError();
      previous_ = -1;
    }
    if (previous_ == device) return;
    restore_ = previous_ >= 0 && (had_context || primary_context_active(previous_));
    check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (restore_) cudaSetDevice(previous_);
  }
  static void check(cudaError_t err, const char* what) {
    if (err != cudaSuccess) {
      cudaGetLastError();
      throw std::runtime_error(std::string("fastopt: ") + what + " failed: " +
                               cudaGetErrorString(err));
    }
  }

 private:
  int previous_ = -1;
  bool restore_ = false;
};

// 0, 1 (cudaStreamLegacy) and 2 (cudaStreamPerThread) are the special handles; any other
// stream must belong to the arrays' device.
void check_stream_device(intptr_t stream, int device) {
  if (stream == 0 || stream == 1 || stream == 2 || device < 0) return;
  int stream_device = -1;
  const cudaError_t err = cudaStreamGetDevice(reinterpret_cast<cudaStream_t>(stream), &stream_device);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw py::value_error(std::string("stream: not a usable CUDA stream handle (") +
                          cudaGetErrorString(err) + ")");
  }
  if (stream_device != device)
    throw py::value_error("stream: belongs to CUDA device " + std::to_string(stream_device) +
                          " but the arrays are on device " + std::to_string(device));
}

// The table slots of the block maxima of 8-bit state from the call's absmax= (None, or a dict
// {state name: a list of float32 arrays}, one entry per state the call uses): filled into
// `roles`; the plan checks the arrays (bindings/device_table.h). The lists are held in
// `held` for the call (`roles` borrows them: describing an array may run Python code that
// edits the dict). The slots' names live as long as the module: a cached plan keeps them.
template <class Opt, class Roles>
void absmax_specs(const fastopt::bindings::StepCall<Opt>& call, Roles& roles,
                  std::vector<py::object>& held) {
  static const std::array<std::string, Opt::num_roles> names = [] {
    std::array<std::string, Opt::num_roles> out;
    for (int r = 0; r < Opt::num_roles; ++r) out[r] = std::string("absmax['") + Opt::roles[r].name + "']";
    return out;
  }();
  if (call.absmax.is_none()) return;
  std::array<const char*, Opt::num_roles> used{};  // the states this call uses
  for (int r = fastopt::kFirstState; r < Opt::num_roles; ++r)
    if (!call.lists[r].is_none()) used[size_t(r)] = Opt::roles[r].name;
  held.reserve(Opt::num_roles);
  fastopt::bindings::absmax_entries(call.absmax, used.data(), Opt::num_roles, [&](int r, py::handle entry) {
    held.push_back(py::reinterpret_borrow<py::object>(entry));
    roles[fastopt::kAbsmaxSlot + r - fastopt::kFirstState] = {
        names[size_t(r)].c_str(), held.back(), fastopt::RoleKind::absmax, Opt::roles[r].written};
  });
}

DeviceArray call_arg(py::handle obj, const char* name, intptr_t stream, bool written);
int checked_norm_array(const DeviceArray& a, const char* name, const DevicePlan& plan,
                       intptr_t stream, const char* role);

// The CUDA step's own keywords, beside StepCall's (interned once).
struct StepKeywords {
  PyObject* stream;             // an int handle
  PyObject* plan;               // a Plan or None
  PyObject* grad_norm;          // with max_grad_norm: see device_clip
  PyObject* max_grad_norm;
  PyObject* device_grad_scale;  // see device_scaler
  PyObject* found_inf;
  static const StepKeywords& get() {
    using fastopt::bindings::interned_key;
    static const StepKeywords keys{interned_key("stream"),          interned_key("plan"),
                                   interned_key("grad_norm"),       interned_key("max_grad_norm"),
                                   interned_key("device_grad_scale"), interned_key("found_inf")};
    return keys;
  }
};

// Clipping with the norm left on the device (keywords grad_norm, a one-element float array
// on the arrays' device, and max_grad_norm, given together): into `arrays`.
void device_clip(const fastopt::bindings::CallArgs& args, const DevicePlan& plan, intptr_t stream,
                 cuda::StepArrays& arrays) {
  static PyObject* const clip_key = fastopt::bindings::interned_key("grad_clip");
  PyObject* norm_arg = args.keyword(StepKeywords::get().grad_norm);
  PyObject* max_arg = args.keyword(StepKeywords::get().max_grad_norm);
  if (!norm_arg && !max_arg) return;
  if (!norm_arg || !max_arg)
    throw py::type_error(std::string(norm_arg ? "max_grad_norm" : "grad_norm") +
                         ": missing (grad_norm and max_grad_norm are given together)");
  if (args.keyword(clip_key))
    throw py::type_error("grad_clip: excludes grad_norm (a clip coefficient from the host, or "
                         "one from a norm on the device)");
  fastopt::bindings::read_keyword("max_grad_norm", max_arg, arrays.max_grad_norm);
  if (!(arrays.max_grad_norm >= 0.0))
    throw py::value_error("max_grad_norm: must be >= 0, got " + std::to_string(arrays.max_grad_norm));
  const DeviceArray norm = call_arg(py::handle(norm_arg), "grad_norm", stream, false);
  checked_norm_array(norm, "grad_norm", plan, stream, "params");
  arrays.grad_norm = reinterpret_cast<const void*>(norm.ptr);
  arrays.grad_norm_dtype = norm.dtype;
}

// A GradScaler's scalars in device memory (keywords device_grad_scale and found_inf, each
// optional: a one-element float32 array on the arrays' device): into `arrays`.
void device_scaler(const fastopt::bindings::CallArgs& args, const DevicePlan& plan, intptr_t stream,
                   cuda::StepArrays& arrays) {
  static PyObject* const host_scale_key = fastopt::bindings::interned_key("grad_scale");
  const auto scalar = [&](PyObject* obj, const char* name) {
    const DeviceArray a = call_arg(py::handle(obj), name, stream, false);
    checked_norm_array(a, name, plan, stream, "params");
    if (a.dtype != cuda::DType::f32)
      throw py::type_error(std::string(name) + ": dtype " + fastopt::bindings::dtype_name(a.dtype) +
                           " is not float32");
    return reinterpret_cast<const float*>(a.ptr);
  };
  if (PyObject* v = args.keyword(StepKeywords::get().device_grad_scale)) {
    if (args.keyword(host_scale_key))
      throw py::type_error("grad_scale: excludes device_grad_scale (one scale, from the host or "
                           "from device memory)");
    arrays.grad_scale = scalar(v, "device_grad_scale");
  }
  if (PyObject* v = args.keyword(StepKeywords::get().found_inf))
    arrays.found_inf = scalar(v, "found_inf");
}

// One step of optimizer Opt (see bindings/optim_binding.h for the arguments; here also the
// keywords of StepKeywords): the arrays are checked and tabled (in `plan` when given, else
// in a plan for this call only), then the kernel is launched on the arrays' device without
// synchronising.
template <class Opt>
void step(const fastopt::bindings::CallArgs& args, const typename Opt::Hyper* bound) {
  const StepKeywords& keys = StepKeywords::get();
  const fastopt::bindings::StepCall<Opt> call(
      args, {keys.stream, keys.plan, keys.grad_norm, keys.max_grad_norm, keys.device_grad_scale,
             keys.found_inf},
      bound);
  intptr_t stream = 0;
  DevicePlan* cached = nullptr;
  if (PyObject* v = args.keyword(keys.stream)) {
    int64_t handle = 0;
    fastopt::bindings::read_keyword("stream", v, handle);
    if (handle < 0) throw py::value_error("stream: must be a handle >= 0");
    stream = intptr_t(handle);
  }
  PyObject* plan_arg = args.keyword(keys.plan);
  if (plan_arg && plan_arg != Py_None) {
    py::handle given(plan_arg);
    if (!py::isinstance<DevicePlan>(given))
      throw py::type_error("plan: expected a fastopt._cuda.Plan or None");
    cached = given.cast<DevicePlan*>();
  }
  // One spec per table slot: the optimizer's roles, unused slots, the masks, the absmax
  // lists of 8-bit state.
  std::array<fastopt::bindings::DeviceRoleSpec, fastopt::kTableSlots> roles;
  roles.fill({"", py::none(), fastopt::RoleKind::grad, false});
  cuda::StepArrays arrays;
  arrays.masked = !call.masks.is_none();
  arrays.master = !call.masters.is_none();
  for (int r = 0; r < Opt::num_roles; ++r) {
    const fastopt::Role& role = Opt::roles[r];
    roles[r] = {role.name, call.lists[r], role.kind, role.written};
    if (call.lists[r].is_none()) continue;
    if (arrays.masked || !(call.fresh >> r & 1u)) arrays.loads |= 1u << r;
    if (role.written) arrays.stores |= 1u << r;
  }
  roles[fastopt::kMaskSlot] = {"masks", call.masks, fastopt::RoleKind::mask, false};
  roles[fastopt::kMasterSlot] = {"master_params", call.masters, fastopt::RoleKind::master, true};
  // A malformed absmax= dict is reported after the state's type is known, as on the CPU
  // ("only for 8-bit state" first); the slots it could fill are checked by the plan.
  std::vector<py::object> absmax_lists;
  std::exception_ptr absmax_error;
  try {
    absmax_specs<Opt>(call, roles, absmax_lists);
  } catch (const py::builtin_exception&) {
    absmax_error = std::current_exception();
  }
  DevicePlan local;
  DevicePlan& plan = cached ? *cached : local;
  plan.update(roles, call.listed, stream);
  if (plan.has_state8() && call.absmax.is_none())
    throw py::type_error("absmax: required with 8-bit (uint8) state: a dict {state name: "
                         "a list of float32 block maxima}");
  if (plan.has_state() && !plan.has_state8() && !call.absmax.is_none())
    throw py::value_error("absmax: only for 8-bit state (uint8 state arrays)");
  if (absmax_error) std::rethrow_exception(absmax_error);
  device_clip(args, plan, stream, arrays);  // checked for an empty call too
  device_scaler(args, plan, stream, arrays);
  if (plan.tables().empty()) return;  // nothing but zero-size arrays
  check_stream_device(stream, plan.device());
  DeviceGuard guard(plan.device());
  fastopt::bindings::check_stochastic_dtype(call.options.stochastic, plan.dtype() == cuda::DType::bf16,
                                            fastopt::bindings::dtype_name(plan.dtype()));
  if (call.check_only) return;
  cuda::step<Opt>(plan.tables(), plan.dtype(), plan.state_dtype(), call.hyper, call.options,
                  arrays, reinterpret_cast<cudaStream_t>(stream));
}

struct Steps {
  static constexpr const char* module_name = "fastopt._cuda";
  template <class Opt>
  static void run(const fastopt::bindings::CallArgs& args, const typename Opt::Hyper* bound) {
    step<Opt>(args, bound);
  }
};

// ---- quantization and Newton: the same arguments as fastopt._cpu's. Every size is read
// once from the arrays the kernel runs on and checked against the others
// (bindings/kernel_args.h); here also their layout, device, aliasing and the stream. ------

namespace args = fastopt::bindings::args;

// One array argument of a call, checked for layout.
DeviceArray call_arg(py::handle obj, const char* name, intptr_t stream, bool written) {
  const fastopt::bindings::Where w{name, 0, false};
  DeviceArray a = fastopt::bindings::describe(obj, w, stream);
  fastopt::bindings::check_layout(a, w, written);
  return a;
}

using NamedArray = std::pair<const char*, const DeviceArray*>;

// The call's device (all arrays on one), its stream checked against it; the first
// num_written arrays are outputs and may not overlap anything.
int call_device(const std::vector<NamedArray>& args, size_t num_written, intptr_t stream) {
  int device = -1;
  std::vector<fastopt::bindings::Span> spans;
  size_t k = 0;
  for (const auto& [name, a] : args) {
    if (a->device >= 0 && device >= 0 && a->device != device)
      throw py::value_error(std::string(name) + ": is on CUDA device " + std::to_string(a->device) +
                            " but the other arrays are on device " + std::to_string(device));
    if (a->device >= 0) device = a->device;
    if (a->size > 0)
      spans.push_back({a->ptr, a->ptr + uintptr_t(a->size) * cuda::element_size(a->dtype), name, 0,
                       k < num_written});
    ++k;
  }
  fastopt::bindings::check_no_overlap(spans, [](const char* role, size_t) { return std::string(role); });
  check_stream_device(stream, device);
  return device;
}

// A kernel argument: the CUDA array and its description for the shared size checks.
// Absent (None) optional arguments have no bytes.
struct KernelArg {
  DeviceArray array;
  args::Arg arg;
  bool written = false;
  bool present = false;

  explicit KernelArg(const char* name) : arg{name, "", {}} { arg.size = 0; }
  KernelArg(py::handle obj, const char* name, intptr_t stream, bool is_written)
      : array(fastopt::bindings::describe(obj, {name, 0, false}, stream)),
        arg{name, fastopt::bindings::dtype_name(array.dtype), array.shape},
        written(is_written),
        present(true) {
    arg.size = array.size;
    arg.ptr = array.ptr;
    arg.bytes = array.size * int64_t(cuda::element_size(array.dtype));
  }
  template <class T> T* ptr() const { return reinterpret_cast<T*>(array.ptr); }
};

// The arguments' layouts (C-contiguous, aligned, writeable where written; after the size
// checks, so that a wrong shape is named as such), then the call's device: all arrays on
// one, the stream on it too. Aliasing is args::expect_disjoint's.
int kernel_device(std::initializer_list<const KernelArg*> arrays, intptr_t stream) {
  std::vector<NamedArray> named;
  for (const KernelArg* a : arrays) {
    if (!a->present) continue;
    fastopt::bindings::check_layout(a->array, {a->arg.name, 0, false}, a->written);
    named.emplace_back(a->arg.name, &a->array);
  }
  return call_device(named, 0, stream);
}

// Device memory for one call (the first-bad index, per-channel parameters, a factor),
// freed in stream order after the kernels that use it.
using fastopt::cuda::Scratch;

// The scratch allocator's out-of-memory hook (cuda/scratch.h): fastopt._arrays'
// release_device_caches, which empties torch's and CuPy's caches of unused blocks. Its own
// errors are dropped: the retried allocation's error is the one raised.
void release_device_caches() {
  py::gil_scoped_acquire gil;
  try {
    py::module_::import("fastopt._arrays").attr("release_device_caches")();
  } catch (py::error_already_set&) {
  }
}

// Sets the first-bad slot (the scratch's first 8 bytes) to "none": ~0.
void clear_first_bad(const Scratch& scratch, cudaStream_t s) {
  DeviceGuard::check(cudaMemsetAsync(scratch.at<void>(0), 0xff, 8, s), "cudaMemsetAsync");
}

// Scratch holding first_bad = ~0 and the per-channel scales and zero points (float32).
class AffineScratch : public Scratch {
 public:
  AffineScratch(const float* scales, const float* zero_points, size_t channels, cudaStream_t s)
      : Scratch(8 + 8 * channels, s), channels_(channels) {
    clear_first_bad(*this, s);
    // Through a copy of our own in pageable memory: staged before each call returns, so
    // the caller may change its arrays at once, even page-locked ones (whose copy would
    // otherwise run later, asynchronously).
    const std::vector<float> staged_scales(scales, scales + channels);
    const std::vector<float> staged_zeros(zero_points, zero_points + channels);
    DeviceGuard::check(cudaMemcpyAsync(this->scales(), staged_scales.data(), 4 * channels,
                                       cudaMemcpyHostToDevice, s), "cudaMemcpyAsync");
    DeviceGuard::check(cudaMemcpyAsync(this->zero_points(), staged_zeros.data(), 4 * channels,
                                       cudaMemcpyHostToDevice, s), "cudaMemcpyAsync");
  }
  float* scales() const { return at<float>(8); }
  float* zero_points() const { return at<float>(8 + 4 * channels_); }

 private:
  size_t channels_;
};

// Copies the first-bad slot -- and `more_bytes` from the scratch after it into `more` (the
// min/max keys) -- to the host and returns the first non-finite index, or -1. A copy into
// pageable memory waits for the stream's work, so the GIL is released for the copies and
// the wait alike.
int64_t first_bad(const Scratch& scratch, cudaStream_t s, void* more = nullptr,
                  size_t more_bytes = 0) {
  unsigned long long bad = 0;
  {
    py::gil_scoped_release release;
    if (more_bytes)
      DeviceGuard::check(cudaMemcpyAsync(more, scratch.at<void>(8), more_bytes,
                                         cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync");
    DeviceGuard::check(cudaMemcpyAsync(&bad, scratch.at<void>(0), 8, cudaMemcpyDeviceToHost, s),
                       "cudaMemcpyAsync");
    DeviceGuard::check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
  }
  return bad == ~0ull ? -1 : static_cast<int64_t>(bad);
}

// Per block of `block` consecutive elements of x: absmax and q = rint(x * 127/absmax).
// Returns x's first non-finite flat index with check_finite (waiting for the stream),
// else -1 at once.
int64_t quantize_blockwise(py::object x, py::object q, py::object absmax, py::object block_arg,
                           py::object stochastic_arg, py::object seed_arg,
                           py::object check_finite_arg, intptr_t stream) {
  const int64_t block = fastopt::bindings::scalar_arg<int64_t>(block_arg, "block");
  const bool stochastic = fastopt::bindings::scalar_arg<bool>(stochastic_arg, "stochastic");
  const uint64_t seed = fastopt::bindings::scalar_arg<uint64_t>(seed_arg, "seed");
  const bool check_finite = fastopt::bindings::scalar_arg<bool>(check_finite_arg, "check_finite");
  const KernelArg ax(x, "x", stream, false), aq(q, "q", stream, true),
      am(absmax, "absmax", stream, true);
  args::expect_float_input(ax.arg);
  args::expect_dtype(aq.arg, {"int8"}, "int8");
  args::expect_same_shape(aq.arg, ax.arg);
  args::expect_absmax(am.arg, ax.arg, block);
  DeviceGuard guard(kernel_device({&ax, &aq, &am}, stream));
  args::expect_disjoint({&aq.arg, &am.arg, &ax.arg}, 2);
  const int64_t n = ax.arg.size;
  if (n == 0) return -1;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  Scratch scratch(8, s);
  clear_first_bad(scratch, s);
  cuda::quantize_blockwise(ax.array.dtype, ax.ptr<const void>(), aq.ptr<int8_t>(),
                           am.ptr<float>(), n, std::min(block, n), stochastic, seed,
                           scratch.at<unsigned long long>(0), s);
  return check_finite ? first_bad(scratch, s) : -1;
}

// out = q * (absmax / 127) per block of `block` consecutive elements, stored as out's float
// type (float32, float16 or bfloat16).
void dequantize_blockwise(py::object q, py::object absmax, py::object out, py::object block_arg,
                          intptr_t stream) {
  const int64_t block = fastopt::bindings::scalar_arg<int64_t>(block_arg, "block");
  const KernelArg aq(q, "q", stream, false), am(absmax, "absmax", stream, false),
      ao(out, "out", stream, true);
  args::expect_dtype(aq.arg, {"int8"}, "int8");
  args::expect_absmax(am.arg, aq.arg, block);
  args::expect_dequantized(ao.arg, aq.arg);
  DeviceGuard guard(kernel_device({&aq, &am, &ao}, stream));
  args::expect_disjoint({&ao.arg, &aq.arg, &am.arg}, 1);
  const int64_t n = aq.arg.size;
  if (n == 0) return;
  cuda::dequantize_blockwise(aq.ptr<const int8_t>(), am.ptr<const float>(), ao.array.dtype,
                             ao.ptr<void>(), n, std::min(block, n),
                             reinterpret_cast<cudaStream_t>(stream));
}

// q = clamp(rint(x / scale) + zero_point) per channel along axis (None: per tensor).
// Returns x's first non-finite flat index with check_finite (waiting for the stream),
// else -1 at once.
int64_t quantize_affine(py::object x, py::object q, py::object scales, py::object zero_points,
                        py::object axis, py::object check_finite_arg, intptr_t stream) {
  const bool check_finite = fastopt::bindings::scalar_arg<bool>(check_finite_arg, "check_finite");
  const KernelArg ax(x, "x", stream, false), aq(q, "q", stream, true);
  args::expect_float_input(ax.arg);
  args::expect_dtype(aq.arg, {"int8", "uint8"}, "int8 or uint8");
  args::expect_same_shape(aq.arg, ax.arg);
  const args::Channels c = args::channels_of(ax.arg, axis);
  const args::Arg sp = args::channel_params(scales, "scales", c.channels);
  const args::Arg zp = args::channel_params(zero_points, "zero_points", c.channels);
  DeviceGuard guard(kernel_device({&ax, &aq}, stream));
  args::expect_disjoint({&aq.arg, &ax.arg}, 1);
  if (ax.arg.size == 0) return -1;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const AffineScratch scratch(sp.data<const float>(), zp.data<const float>(), size_t(c.channels), s);
  cuda::quantize_affine(ax.array.dtype, ax.ptr<const void>(), aq.ptr<void>(),
                        aq.array.dtype == cuda::DType::u8, ax.arg.size, c.channels, c.inner,
                        scratch.scales(), scratch.zero_points(),
                        scratch.at<unsigned long long>(0), s);
  return check_finite ? first_bad(scratch, s) : -1;
}

// out = (q - zero_point) * scale in float32, stored as out's float type (float32, float16 or
// bfloat16), per channel along axis (None: per tensor).
void dequantize_affine(py::object q, py::object out, py::object scales, py::object zero_points,
                       py::object axis, intptr_t stream) {
  const KernelArg aq(q, "q", stream, false), ao(out, "out", stream, true);
  args::expect_dtype(aq.arg, {"int8", "uint8"}, "int8 or uint8");
  args::expect_dequantized(ao.arg, aq.arg);
  const args::Channels c = args::channels_of(aq.arg, axis);
  const args::Arg sp = args::channel_params(scales, "scales", c.channels);
  const args::Arg zp = args::channel_params(zero_points, "zero_points", c.channels);
  DeviceGuard guard(kernel_device({&aq, &ao}, stream));
  args::expect_disjoint({&ao.arg, &aq.arg}, 1);
  if (aq.arg.size == 0) return;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const AffineScratch scratch(sp.data<const float>(), zp.data<const float>(), size_t(c.channels), s);
  cuda::dequantize_affine(aq.ptr<const void>(), aq.array.dtype == cuda::DType::u8,
                          ao.array.dtype, ao.ptr<void>(), aq.arg.size, c.channels, c.inner,
                          scratch.scales(), scratch.zero_points(), s);
}

// Min/max observer: (x's first non-finite flat index or -1, mins, maxs) per channel along
// axis (None: one channel) of the finite elements (+inf / -inf for a channel without any),
// waiting for the stream.
py::tuple minmax(py::object x, py::object axis, intptr_t stream) {
  const KernelArg ax(x, "x", stream, false);
  args::expect_float_input(ax.arg);
  const args::Channels ch = args::channels_of(ax.arg, axis);
  DeviceGuard guard(kernel_device({&ax}, stream));
  const size_t c = size_t(ch.channels);
  const uint32_t inf_bits = 0x7f800000u, minus_inf_bits = 0xff800000u;
  std::vector<uint32_t> keys(2 * c);
  std::fill(keys.begin(), keys.begin() + c, cuda::float_key(inf_bits));
  std::fill(keys.begin() + c, keys.end(), cuda::float_key(minus_inf_bits));
  int64_t bad = -1;
  if (ax.arg.size > 0) {
    const auto s = reinterpret_cast<cudaStream_t>(stream);
    Scratch scratch(8 + 8 * c, s);
    clear_first_bad(scratch, s);
    DeviceGuard::check(cudaMemcpyAsync(scratch.at<void>(8), keys.data(), 8 * c,
                                       cudaMemcpyHostToDevice, s), "cudaMemcpyAsync");
    cuda::minmax(ax.array.dtype, ax.ptr<const void>(), ax.arg.size, ch.channels, ch.inner,
                 scratch.at<uint32_t>(8), scratch.at<uint32_t>(8 + 4 * c),
                 scratch.at<unsigned long long>(0), s);
    bad = first_bad(scratch, s, keys.data(), 8 * c);  // waits for the stream
  }
  py::array_t<float> mins(ch.channels), maxs(ch.channels);
  for (size_t k = 0; k < c; ++k) {
    const uint32_t lo = cuda::key_float_bits(keys[k]), hi = cuda::key_float_bits(keys[c + k]);
    std::memcpy(mins.mutable_data() + k, &lo, 4);
    std::memcpy(maxs.mutable_data() + k, &hi, 4);
  }
  return py::make_tuple(bad, mins, maxs);
}

// Batched damped Newton, phase 1: d = (H + damping*I)^-1 g and the solved flags (a bool
// array) of every system. params (None, or the array a Newton step will update) is
// checked with the others before anything is launched.
void newton_solve(py::object hessians, py::object grads, py::object d, py::object solved,
                  py::object damping_arg, py::object params, intptr_t stream) {
  const double damping = fastopt::bindings::scalar_arg<double>(damping_arg, "damping");
  fastopt::bindings::kNonNegative.check("damping", damping);
  const KernelArg ah(hessians, "hessians", stream, false), ag(grads, "grads", stream, false);
  const KernelArg ap =
      params.is_none() ? KernelArg("params") : KernelArg(params, "params", stream, true);
  const KernelArg ad(d, "d", stream, true), as(solved, "solved", stream, true);
  const args::Systems sys = args::newton_systems(ah.arg, ag.arg, ap.present ? &ap.arg : nullptr);
  args::expect_same_dtype(ad.arg, ah.arg);
  args::expect_same_shape(ad.arg, ag.arg);
  args::expect_flags(as.arg, ag.arg);
  DeviceGuard guard(kernel_device({&ah, &ag, &ap, &ad, &as}, stream));
  args::expect_disjoint({&ap.arg, &ad.arg, &as.arg, &ag.arg, &ah.arg}, 3);
  if (sys.batch == 0) return;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  Scratch scratch(size_t(cuda::newton_scratch_elements(sys.batch, sys.n)) *
                      cuda::element_size(ah.array.dtype), s);
  cuda::newton_solve(ah.array.dtype, ah.ptr<const void>(), ag.ptr<const void>(), ad.ptr<void>(),
                     as.ptr<uint8_t>(), sys.batch, sys.n, damping, scratch.at<void>(0), s);
}

// Phase 2: p <- p - lr*d for the systems with use[b] (all when use is None).
void newton_apply(py::object params, py::object d, py::object use, py::object lr_arg, intptr_t stream) {
  const double lr = fastopt::bindings::scalar_arg<double>(lr_arg, "lr");
  fastopt::bindings::kNonNegative.check("lr", lr);
  const KernelArg ap(params, "params", stream, true), ad(d, "d", stream, false);
  const KernelArg au = use.is_none() ? KernelArg("use") : KernelArg(use, "use", stream, false);
  const args::Systems sys = args::newton_update(ap.arg, ad.arg);
  if (!use.is_none()) args::expect_flags(au.arg, ap.arg);
  DeviceGuard guard(kernel_device({&ap, &ad, &au}, stream));
  args::expect_disjoint({&ap.arg, &ad.arg, &au.arg}, 1);
  if (sys.batch == 0) return;
  cuda::newton_apply(ap.array.dtype, ap.ptr<void>(), ad.ptr<const void>(),
                     use.is_none() ? nullptr : au.ptr<const uint8_t>(), sys.batch, sys.n, lr,
                     reinterpret_cast<cudaStream_t>(stream));
}

// ---- magnitude pruning -------------------------------------------------------------------

// The arrays and masks (out) of one pruning call, checked as on the CPU -- one float dtype,
// a bool or uint8 mask per array of its shape, layouts, one device (the stream's), no mask
// sharing memory with anything -- and their table, in chunks of `chunk` elements.
struct DevicePruneCall {
  std::vector<std::string> names;
  std::vector<KernelArg> arrays, masks;
  cuda::DType dtype = cuda::DType::f32;
  int device = -1;

  DevicePruneCall(const py::object& arrays_obj, const py::object& out_obj, intptr_t stream) {
    const py::list a = as_list(arrays_obj, "arrays"), o = as_list(out_obj, "out");
    const size_t n = a.size();
    if (o.size() != n)
      throw py::value_error("out: expected " + std::to_string(n) +
                            " arrays (one per entry of arrays), got " + std::to_string(o.size()));
    names.reserve(2 * n);  // never reallocated: the arguments keep pointers to the names
    for (size_t i = 0; i < n; ++i) names.push_back("arrays[" + std::to_string(i) + "]");
    for (size_t i = 0; i < n; ++i) names.push_back("out[" + std::to_string(i) + "]");
    arrays.reserve(n);
    masks.reserve(n);
    std::vector<NamedArray> named;
    for (size_t i = 0; i < n; ++i) {
      arrays.emplace_back(a[i], names[i].c_str(), stream, false);
      masks.emplace_back(o[i], names[n + i].c_str(), stream, true);
      const KernelArg &x = arrays.back(), &m = masks.back();
      args::expect_dtype(x.arg, {"float32", "float64", "float16", "bfloat16"},
                         "float32, float64, float16 or bfloat16");
      if (i == 0) dtype = x.array.dtype;
      else args::expect_same_dtype(x.arg, arrays[0].arg);
      args::expect_dtype(m.arg, {"bool", "uint8"}, "bool or uint8");
      args::expect_same_shape(m.arg, x.arg);
    }
    for (size_t i = 0; i < n; ++i) {
      fastopt::bindings::check_layout(masks[i].array, {masks[i].arg.name, 0, false}, true);
      named.emplace_back(masks[i].arg.name, &masks[i].array);
    }
    for (size_t i = 0; i < n; ++i) {
      fastopt::bindings::check_layout(arrays[i].array, {arrays[i].arg.name, 0, false}, false);
      named.emplace_back(arrays[i].arg.name, &arrays[i].array);
    }
    device = call_device(named, n, stream);
  }

  static py::list as_list(const py::object& obj, const char* name) {
    if (!py::isinstance<py::list>(obj))
      throw py::type_error(std::string(name) + ": expected a list of arrays, got " +
                           Py_TYPE(obj.ptr())->tp_name);
    return py::reinterpret_borrow<py::list>(obj);
  }

  std::vector<int64_t> sizes() const {
    std::vector<int64_t> s;
    for (const KernelArg& a : arrays) s.push_back(a.arg.size);
    return s;
  }

  // The tensor table; tensors [starts[p], starts[p+1]) belong to selection p. Sets chunks.
  std::vector<cuda::PruneTensor> table(int64_t chunk, const std::vector<int>& starts,
                                       int64_t& chunks) const {
    std::vector<cuda::PruneTensor> t;
    chunks = 0;
    for (size_t p = 0; p + 1 < starts.size(); ++p)
      for (int i = starts[p]; i < starts[p + 1]; ++i) {
        const KernelArg &x = arrays[size_t(i)], &m = masks[size_t(i)];
        t.push_back({x.ptr<const void>(), m.ptr<uint8_t>(), x.arg.size, chunks, int32_t(p)});
        chunks += (x.arg.size + chunk - 1) / chunk;
      }
    return t;
  }
};

// Masks keeping all but prune_counts[p] elements of selection p, those of smallest |x|
// (ties: the earlier pruned first); one count: a threshold over all arrays, one per array:
// a threshold each. Queued on the stream, no wait.
void prune_magnitude(py::object arrays, py::object out, py::object prune_counts, intptr_t stream) {
  const DevicePruneCall call(arrays, out, stream);
  const std::vector<int64_t> sizes = call.sizes();
  std::vector<int64_t> counts;
  const std::vector<int> starts = args::prune_problems(prune_counts, sizes, counts);
  int64_t chunks = 0;
  const std::vector<cuda::PruneTensor> tensors = call.table(cuda::kPruneChunk, starts, chunks);
  if (chunks == 0) return;
  std::vector<cuda::PruneProblem> problems;
  for (size_t p = 0; p < counts.size(); ++p) {
    int64_t size = 0;
    for (int i = starts[p]; i < starts[p + 1]; ++i) size += sizes[size_t(i)];
    const int64_t first_chunk = starts[p] < int(tensors.size()) ? tensors[size_t(starts[p])].first_chunk : chunks;
    problems.push_back({counts[p], size, first_chunk, 0, counts[p] - 1});
  }
  DeviceGuard guard(call.device);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  Scratch scratch(cuda::prune_scratch_bytes(int(tensors.size()), int(problems.size()), chunks), s);
  cuda::prune_magnitude(call.dtype, tensors.data(), int(tensors.size()), problems.data(),
                        int(problems.size()), chunks, scratch.at<void>(0), s);
}

// Masks keeping the n largest |x| of each group of m consecutive elements along the last
// axis (ties: the earlier pruned first). Queued on the stream, no wait.
void prune_n_m(py::object arrays, py::object out, py::object n_obj, py::object m_obj,
               intptr_t stream) {
  const int64_t n = args::int_arg(n_obj, "n"), m = args::int_arg(m_obj, "m");
  const DevicePruneCall call(arrays, out, stream);
  std::vector<const args::Arg*> described;
  for (const KernelArg& a : call.arrays) described.push_back(&a.arg);
  args::expect_n_m(described, n, m, fastopt::kMaxGroup);
  int64_t chunks = 0;
  const std::vector<cuda::PruneTensor> tensors =
      call.table(cuda::kPruneThreads * m, {0, int(call.arrays.size())}, chunks);
  if (chunks == 0) return;
  DeviceGuard guard(call.device);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  Scratch scratch(sizeof(cuda::PruneTensor) * tensors.size(), s);
  cuda::prune_n_m(call.dtype, tensors.data(), int(tensors.size()), chunks, int(n), int(m),
                  scratch.at<void>(0), s);
}

// Adafactor over one list of CUDA params of one dtype (cuda/adafactor_kernels.h), with the
// CPU binding's arguments and checks (bindings/adafactor_args.h): every array checked
// (dtype, shape, C order, one device, no overlaps) before any kernel is queued; then the
// passes over all the params on the stream (up to 64 params a launch), with one scratch.
// No wait. check_only: the checks alone.
void adafactor_step(py::object params, py::object grads, py::object row_vars, py::object col_vars,
                    py::object variances, py::object steps, py::object lr, py::object beta2_decay,
                    py::object eps1, py::object eps2, py::object d, py::object weight_decay,
                    py::object maximize, py::object listed_arg, intptr_t stream,
                    py::object check_only, py::object stochastic_seed, py::object master_params) {
  namespace af = fastopt::bindings::adafactor;
  using fastopt::bindings::Where;
  const bool listed = fastopt::bindings::scalar_arg<bool>(listed_arg, "listed");
  fastopt::AdafactorHyper h = af::hyper(lr, beta2_decay, eps1, eps2, d, weight_decay, maximize);
  af::rounding(stochastic_seed, master_params, h);
  for (py::object* list : {&params, &grads, &row_vars, &col_vars, &variances, &steps, &master_params})
    *list = fastopt::bindings::list_copy(*list);
  if (!py::isinstance<py::list>(params)) throw py::type_error("params: expected a list of arrays");
  const size_t n = py::len(params);
  if (!py::isinstance<py::list>(grads)) throw py::type_error("grads: expected a list of arrays");
  if (py::len(grads) != n)
    throw py::value_error("grads: expected " + std::to_string(n) +
                          " arrays (one per entry of params), got " + std::to_string(py::len(grads)));
  const py::handle lists[af::num_states] = {row_vars, col_vars, variances};
  for (int k = 0; k < af::num_states; ++k) af::check_list(lists[k], k, n);
  const bool masters = !master_params.is_none();
  if (masters && !py::isinstance<py::list>(master_params))
    throw py::type_error("master_params: expected a list of arrays");
  if (masters && py::len(master_params) != n)
    throw py::value_error("master_params: expected " + std::to_string(n) +
                          " arrays (one per entry of params), got " +
                          std::to_string(py::len(master_params)));
  const std::vector<double> counts = af::steps(steps, n);
  // Every array described and checked; names and arrays kept at stable addresses for the
  // device and overlap check (written arrays first).
  std::deque<std::string> names;
  std::deque<DeviceArray> arrays;
  std::vector<NamedArray> written, read;
  std::vector<fastopt::AdafactorParam> work(n);
  cuda::DType dtype = cuda::DType::f32;
  const auto take = [&](py::handle obj, const Where& w, bool is_written) -> const DeviceArray& {
    names.push_back(w.str());
    arrays.push_back(fastopt::bindings::describe(obj, w, stream));
    (is_written ? written : read).emplace_back(names.back().c_str(), &arrays.back());
    return arrays.back();
  };
  // ValueError unless array a (named w) is shaped as param p (named wp).
  const auto same_shape = [](const DeviceArray& a, const Where& w, const DeviceArray& p,
                             const Where& wp) {
    if (a.shape != p.shape)
      throw py::value_error(w.str() + ": shape " + args::shape_str(a.shape) + " does not match " +
                            wp.str() + "'s shape " + args::shape_str(p.shape));
  };
  for (size_t i = 0; i < n; ++i) {
    const Where wp{"params", i, listed}, wg{"grads", i, listed};
    const DeviceArray& p = take(PyList_GET_ITEM(params.ptr(), i), wp, true);
    if (p.dtype != cuda::DType::f32 && p.dtype != cuda::DType::f64 &&
        p.dtype != cuda::DType::f16 && p.dtype != cuda::DType::bf16)
      throw py::type_error(wp.str() + ": dtype " + fastopt::bindings::dtype_name(p.dtype) +
                           " is not supported (float32, float64, float16 or bfloat16)");
    if (i == 0) dtype = p.dtype;
    if (p.dtype != dtype)
      throw py::type_error(wp.str() + ": dtype " + fastopt::bindings::dtype_name(p.dtype) +
                           " differs from " + Where{"params", 0, listed}.str() + "'s " +
                           fastopt::bindings::dtype_name(dtype) + " (all arrays of one call share a dtype)");
    if (p.size > 0 && !p.contiguous) af::not_c_order(i, listed);
    fastopt::bindings::check_layout(p, wp, true);
    const DeviceArray& g = take(PyList_GET_ITEM(grads.ptr(), i), wg, false);
    if (g.dtype != p.dtype)
      throw py::type_error(wg.str() + ": dtype " + fastopt::bindings::dtype_name(g.dtype) +
                           " differs from " + wp.str() + "'s " + fastopt::bindings::dtype_name(p.dtype));
    same_shape(g, wg, p, wp);
    fastopt::bindings::check_layout(g, wg, false);
    fastopt::AdafactorParam& a = work[i];
    a = af::view(p.shape, counts[i]);
    a.param = reinterpret_cast<void*>(p.ptr);
    a.grad = reinterpret_cast<const void*>(g.ptr);
    if (masters) {
      const Where wm{"master_params", i, listed};
      const DeviceArray& m = take(PyList_GET_ITEM(master_params.ptr(), i), wm, true);
      fastopt::bindings::check_master_dtype(
          m.dtype == cuda::DType::f32, fastopt::bindings::dtype_name(m.dtype),
          p.dtype == cuda::DType::f16 || p.dtype == cuda::DType::bf16,
          fastopt::bindings::dtype_name(p.dtype), wm.str(), wp.str());
      same_shape(m, wm, p, wp);
      fastopt::bindings::check_layout(m, wm, true);  // (C order too)
      a.master = reinterpret_cast<void*>(m.ptr);
    }
    void** state_ptr[af::num_states] = {&a.row, &a.col, &a.variance};
    const cuda::DType state = dtype == cuda::DType::f64 ? cuda::DType::f64 : cuda::DType::f32;
    for (int k = 0; k < af::num_states; ++k) {
      const py::handle item = af::entry(lists[k], k, i, p.shape, listed);
      if (item.is_none()) continue;
      const Where ws{af::kStateNames[k], i, listed};
      const DeviceArray& st = take(item, ws, true);
      if (st.dtype != state)
        throw py::type_error(ws.str() + ": dtype " + fastopt::bindings::dtype_name(st.dtype) +
                             " is not the state type " + fastopt::bindings::dtype_name(state) +
                             " (float32 for float32 and 16-bit params, float64 for float64)");
      if (st.shape != af::state_shape(p.shape, k)) af::wrong_shape(k, i, p.shape, listed);
      fastopt::bindings::check_layout(st, ws, true);
      *state_ptr[k] = reinterpret_cast<void*>(st.ptr);
    }
  }
  bool any = false;
  for (const fastopt::AdafactorParam& a : work) any = any || a.batch * a.rows * a.cols > 0;
  fastopt::bindings::check_stochastic_dtype(h.stochastic && any, dtype == cuda::DType::bf16,
                                            fastopt::bindings::dtype_name(dtype));
  const size_t num_written = written.size();
  written.insert(written.end(), read.begin(), read.end());
  const int device = call_device(written, num_written, stream);
  if (device < 0 || fastopt::bindings::scalar_arg<bool>(check_only, "check_only"))
    return;  // (no array with memory: nothing to step)
  DeviceGuard guard(device);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  Scratch scratch(cuda::adafactor_scratch_bytes(work), s);
  cuda::adafactor_step(dtype, work, h, scratch.at<void>(0), s);
}

// dst <- src (same size in bytes), device to device on the stream.
void copy(py::object dst, py::object src, intptr_t stream) {
  const DeviceArray ad = call_arg(dst, "out", stream, true), as = call_arg(src, "src", stream, false);
  DeviceGuard guard(call_device({{"out", &ad}, {"src", &as}}, 1, stream));
  const size_t bytes = size_t(ad.size) * cuda::element_size(ad.dtype);
  if (bytes != size_t(as.size) * cuda::element_size(as.dtype))
    throw py::value_error("out: size differs from the result's");
  if (bytes)
    DeviceGuard::check(cudaMemcpyAsync(reinterpret_cast<void*>(ad.ptr), reinterpret_cast<const void*>(as.ptr),
                                       bytes, cudaMemcpyDeviceToDevice,
                                       reinterpret_cast<cudaStream_t>(stream)), "cudaMemcpyAsync");
}

// Checks that `written` arrays are laid out for writing and overlap nothing, all arrays on
// one device (before a call that will write them, e.g. out=).
void check_arrays(std::vector<std::pair<std::string, py::object>> written,
                  std::vector<std::pair<std::string, py::object>> read, intptr_t stream) {
  std::vector<DeviceArray> arrays;
  arrays.reserve(written.size() + read.size());
  for (const auto& [name, obj] : written) arrays.push_back(call_arg(obj, name.c_str(), stream, true));
  for (const auto& [name, obj] : read) arrays.push_back(call_arg(obj, name.c_str(), stream, false));
  std::vector<NamedArray> named;
  for (size_t k = 0; k < arrays.size(); ++k)
    named.emplace_back(k < written.size() ? written[k].first.c_str()
                                          : read[k - written.size()].first.c_str(),
                       &arrays[k]);
  call_device(named, written.size(), stream);
}

// ---- gradient clipping (cuda/clip_kernels.h): a list of grads of one dtype, and a
// one-element float array on their device holding the norm (written by grad_norm, read by
// clip_grads). Neither synchronises. --------------------------------------------------------

// The norm array checked: a float dtype, one element, on the device of the plan's arrays
// (or the call's, when every array is empty), overlapping no array of its role 0 (`role`:
// the grads of a clipping call, the params of a step) nor any other the call writes (a
// step's state, master params). Returns the device.
int checked_norm_array(const DeviceArray& a, const char* name, const DevicePlan& plan,
                       intptr_t stream, const char* role) {
  if (!cuda::is_float(a.dtype))
    throw py::type_error(std::string(name) + ": dtype " + fastopt::bindings::dtype_name(a.dtype) +
                         " is not supported (float32, float64, float16 or bfloat16)");
  if (a.size != 1)
    throw py::value_error(std::string(name) + ": expected one element, got " + std::to_string(a.size));
  const int device = plan.device() >= 0 ? plan.device() : a.device;
  if (a.device >= 0 && a.device != device)
    throw py::value_error(std::string(name) + ": is on CUDA device " + std::to_string(a.device) +
                          " but " + role + " are on device " + std::to_string(device));
  const uintptr_t end = a.ptr + uintptr_t(cuda::element_size(a.dtype));
  const uintptr_t bytes = uintptr_t(cuda::element_size(plan.dtype()));
  for (const cuda::LaunchTable& t : plan.tables())
    for (int k = 0; k < t.num_tensors; ++k) {
      const uintptr_t begin = reinterpret_cast<uintptr_t>(t.ptrs[0][k]);
      if (a.ptr < begin + uintptr_t(t.size[k]) * bytes && begin < end)
        throw py::value_error(std::string(name) + ": overlaps one of " + role + " in memory");
    }
  if (const fastopt::bindings::Span* s = plan.written_overlap(a.ptr, end))
    throw py::value_error(std::string(name) + ": overlaps one of " + s->role + " in memory");
  check_stream_device(stream, device);
  return device;
}

struct ClipCall {
  bool listed = false;
  double value = 0.0;  // norm_type or max_norm
  DevicePlan plan;
  DeviceArray norm;
  int device = -1;

  ClipCall(const py::object& grads, const py::object& listed_arg, const char* value_name,
           const py::object& value_arg, const py::object& norm_array, intptr_t stream,
           bool grads_written) {
    fastopt::bindings::read_keyword("listed", listed_arg.ptr(), listed);
    fastopt::bindings::read_keyword(value_name, value_arg.ptr(), value);
    const std::array<fastopt::bindings::DeviceRoleSpec, 1> roles{
        {{"grads", grads, fastopt::RoleKind::param, grads_written}}};
    plan.update(roles, listed, stream);
    norm = call_arg(norm_array, grads_written ? "norm" : "out", stream, !grads_written);
    device = checked_norm_array(norm, grads_written ? "norm" : "out", plan, stream, "grads");
  }
};

// out[0] <- the norm of order norm_type of all grads together.
void grad_norm(py::object grads, py::object listed, py::object out, py::object norm_type,
               intptr_t stream) {
  const ClipCall call(grads, listed, "norm_type", norm_type, out, stream, false);
  if (!(call.value > 0.0))
    throw py::value_error("norm_type: must be > 0 (or inf), got " + std::to_string(call.value));
  DeviceGuard guard(call.device);
  cuda::grad_norm(call.plan.tables(), call.plan.dtype(), fastopt::norm_kind(call.value), call.value,
                  reinterpret_cast<void*>(call.norm.ptr), call.norm.dtype,
                  reinterpret_cast<cudaStream_t>(stream));
}

// g <- g * min(max_norm / (norm[0] + 1e-6), 1) for every grad, norm read on the device.
void clip_grads(py::object grads, py::object listed, py::object norm, py::object max_norm,
                intptr_t stream) {
  const ClipCall call(grads, listed, "max_norm", max_norm, norm, stream, true);
  if (call.plan.tables().empty()) return;
  DeviceGuard guard(call.device);
  cuda::clip_grads(call.plan.tables(), call.plan.dtype(), reinterpret_cast<const void*>(call.norm.ptr),
                   call.norm.dtype, call.value, reinterpret_cast<cudaStream_t>(stream));
}

// (dtype name, shape, device) of a CUDA array, for the checks in Python.
py::tuple describe(py::object obj, const char* name, intptr_t stream) {
  const DeviceArray a = fastopt::bindings::describe(obj, {name, 0, false}, stream);
  py::tuple shape(a.shape.size());
  for (size_t d = 0; d < a.shape.size(); ++d) shape[d] = py::int_(a.shape[d]);
  return py::make_tuple(fastopt::bindings::dtype_name(a.dtype), shape, a.device);
}

py::dict device_status() {
  const cuda::DeviceStatus s = cuda::device_status();
  py::dict d;
  d["usable"] = s.device_count > 0;
  d["device_count"] = s.device_count;
  d["reason"] = s.reason;
  d["runtime_version"] = s.runtime_version;
  d["driver_version"] = s.driver_version;
  d["devices"] = py::cast(s.device_names);
  d["architectures"] = FASTOPT_CUDA_ARCHS;
  d["compiler"] = FASTOPT_CUDA_COMPILER;
  return d;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fastopt CUDA kernels (multi-tensor launches on the caller's stream)";
  fastopt::cuda::set_release_caches(&release_device_caches);
  using fastopt::bindings::def;
  using py::arg;
  py::class_<DevicePlan>(m, "Plan",
                         "The checked launch tables of one optimizer's arrays, kept between "
                         "steps; pass it as plan= to the step functions.")
      .def(py::init<>())
      .def_property_readonly("launches", [](const DevicePlan& p) { return p.tables().size(); },
                             "Kernel launches one step makes")
      .def_property_readonly("num_tensors", &DevicePlan::num_tensors);
  fastopt::bindings::StepBindings<Steps>::add(m);
  def(m, "set_hyper_ranges", &fastopt::bindings::set_hyper_ranges, arg("optimizer"), arg("ranges"),
        "The ranges the step bindings check each real hyper-parameter against "
        "({name: (lo, hi, lo_open, hi_open)}, from fastopt/_specs.py at import)");
  def(m, "optimizers", &fastopt::bindings::describe_optimizers,
        "Each optimizer's array roles, hyper-parameter names and whether it takes step");
  // Quantization and Newton: the same arguments as in fastopt._cpu.
  def(m, "quantize_blockwise", &quantize_blockwise, arg("x"), arg("q"), arg("absmax"),
        arg("block"), arg("stochastic"), arg("seed"), arg("check_finite"), arg("stream"),
        "Returns the first non-finite index of x, or -1 (with check_finite: waits for the "
        "stream; without: -1 at once)");
  def(m, "dequantize_blockwise", &dequantize_blockwise, arg("q"), arg("absmax"), arg("out"),
        arg("block"), arg("stream"));
  def(m, "quantize_affine", &quantize_affine, arg("x"), arg("q"), arg("scales"),
        arg("zero_points"), arg("axis").none(true), arg("check_finite"), arg("stream"),
        "Returns the first non-finite index of x, or -1 (with check_finite: waits for the "
        "stream; without: -1 at once)");
  def(m, "dequantize_affine", &dequantize_affine, arg("q"), arg("out"), arg("scales"),
        arg("zero_points"), arg("axis").none(true), arg("stream"));
  def(m, "minmax", &minmax, arg("x"), arg("axis").none(true), arg("stream"),
        "(first non-finite index or -1, mins, maxs) per channel; waits for the stream");
  def(m, "newton_solve", &newton_solve, arg("hessians"), arg("grads"), arg("d"), arg("solved"),
        arg("damping"), arg("params").none(true), arg("stream"));
  def(m, "newton_apply", &newton_apply, arg("params"), arg("d"), arg("use").none(true),
        arg("lr"), arg("stream"));
  def(m, "adafactor_step", &adafactor_step, arg("params"), arg("grads"), arg("row_vars"),
        arg("col_vars"), arg("variances"), arg("steps"), arg("lr"), arg("beta2_decay"),
        arg("eps1"), arg("eps2"), arg("d"), arg("weight_decay"), arg("maximize"), arg("listed"),
        arg("stream"), py::kw_only(), arg("check_only") = false, arg("stochastic_seed") = py::none(),
        arg("master_params") = py::none(),
        "Adafactor over a list of params of one dtype (see fastopt.adafactor_); check_only: "
        "every check, nothing queued; stochastic_seed: bfloat16 params rounded stochastically; "
        "master_params: float32 copies of 16-bit params stepped in their place");
  def(m, "grad_norm", &grad_norm, arg("grads"), arg("listed"), arg("out"), arg("norm_type"),
        arg("stream"), "out[0] <- the norm of order norm_type of all grads (one dtype) together");
  def(m, "clip_grads", &clip_grads, arg("grads"), arg("listed"), arg("norm"), arg("max_norm"),
        arg("stream"), "grads *= min(max_norm / (norm[0] + 1e-6), 1), norm read on the device");
  def(m, "prune_magnitude", &prune_magnitude, arg("arrays"), arg("out"), arg("prune_counts"),
        arg("stream"), "Queues the masks' kernels on the stream (no wait)");
  def(m, "prune_n_m", &prune_n_m, arg("arrays"), arg("out"), arg("n"), arg("m"), arg("stream"),
        "Queues the N:M masks' kernel on the stream (no wait)");
  def(m, "check_arrays", &check_arrays, arg("written"), arg("read"), arg("stream"),
        "Layout, device and aliasing checks of (name, array) pairs before writing `written`");
  def(m, "copy", &copy, arg("dst"), arg("src"), arg("stream"));
  def(m, "describe", &describe, arg("obj"), arg("name"), arg("stream") = 0,
        "(dtype, shape, device) of a CUDA array; raises naming `name` if it is not one");
  def(m, "set_torch_types", [](py::object tensor, py::tuple dtypes) {
    if (dtypes.size() != cuda::kNumDTypes) throw py::value_error("dtypes: expected 7 dtypes");
    auto*& t = fastopt::bindings::torch_types();
    if (!t) t = new fastopt::bindings::TorchTypes();
    t->tensor = tensor;
    for (int k = 0; k < cuda::kNumDTypes; ++k) t->dtypes[k] = dtypes[k];
  }, arg("tensor"), arg("dtypes"),
     "Registers torch.Tensor and its dtypes float32, float64, float16, bfloat16, int8, "
     "uint8, bool (called by fastopt when torch is in use)");
  def(m, "synchronize", [](py::object like, intptr_t stream) {
    // on like's device: a legacy or per-thread default stream handle means that device's
    const DeviceArray a = fastopt::bindings::describe(like, {"like", 0, false}, stream);
    DeviceGuard device(a.device);
    py::gil_scoped_release release;
    DeviceGuard::check(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream)),
                       "cudaStreamSynchronize");
  }, arg("like"), arg("stream"),
     "Waits for the work queued on a stream of CUDA array `like`'s device (the GIL released)");
  def(m, "device_status", &device_status,
        "Whether a CUDA device is usable, and if not, why (runtime linked statically).");
}
