// fastopt._cuda: thin pybind11 bindings of the CUDA kernels. Each step function receives
// aligned lists of CUDA arrays (hyper-parameters already validated in Python), checks and
// tables them (device_table.h, optionally through a cached Plan), and launches on the
// given stream without synchronising. It imports on machines without a GPU or driver;
// device_status() then says why CUDA is not usable.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <string>
#include "bindings/device_table.h"
#include "cuda/device_info.h"
#include "cuda/optim_kernels.h"
#include "cuda_build_info.h"

namespace py = pybind11;
namespace cuda = fastopt::cuda;
using fastopt::bindings::DevicePlan;
using fastopt::bindings::RoleKind;

namespace {

// Makes the arrays' device current for the launch and restores the caller's afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (device < 0 || cudaGetDevice(&previous_) != cudaSuccess || previous_ == device) return;
    check(cudaSetDevice(device), "cudaSetDevice");
    restore_ = true;
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

py::object used_if(bool used, const py::object& list, const char* name) {
  if (!used) return py::none();
  if (list.is_none())
    throw py::value_error(std::string(name) + ": required by the chosen options, got None");
  return list;
}

// Tables the arrays (in `cached` when given, else in a plan for this call only), then
// launches `kernel(tables, dtype, stream)` on the arrays' device.
template <class Launch>
void run(DevicePlan* cached, std::initializer_list<fastopt::bindings::DeviceRoleSpec> roles,
         bool listed, intptr_t stream, Launch&& kernel) {
  DevicePlan local;
  DevicePlan& plan = cached ? *cached : local;
  plan.update(roles, listed, stream);
  if (plan.tables().empty()) return;  // nothing but zero-size arrays
  check_stream_device(stream, plan.device());
  DeviceGuard guard(plan.device());
  kernel(plan.tables(), plan.dtype(), reinterpret_cast<cudaStream_t>(stream));
}

constexpr RoleKind kParam = RoleKind::param, kGrad = RoleKind::grad, kState = RoleKind::state;

void sgd(py::list params, py::list grads, py::object momentum_buffers, bool listed, double lr,
         double momentum, double dampening, double weight_decay, double l1, bool nesterov,
         bool maximize, int64_t step, intptr_t stream, DevicePlan* plan) {
  const fastopt::SgdHyper h{lr, momentum, dampening, weight_decay, l1, nesterov, maximize};
  run(plan,
      {{"params", params, kParam, true},
       {"grads", grads, kGrad, false},
       {"momentum_buffers", used_if(momentum != 0.0, momentum_buffers, "momentum_buffers"), kState, true}},
      listed, stream,
      [&](const cuda::LaunchTables& t, cuda::DType d, cudaStream_t s) { cuda::sgd(t, d, h, step, s); });
}

void adagrad(py::list params, py::list grads, py::list state_sums, bool listed, double lr,
             double lr_decay, double weight_decay, double eps, double l1, bool maximize,
             int64_t step, intptr_t stream, DevicePlan* plan) {
  const fastopt::AdagradHyper h{lr, lr_decay, weight_decay, eps, l1, maximize};
  run(plan,
      {{"params", params, kParam, true},
       {"grads", grads, kGrad, false},
       {"state_sums", state_sums, kState, true}},
      listed, stream,
      [&](const cuda::LaunchTables& t, cuda::DType d, cudaStream_t s) { cuda::adagrad(t, d, h, step, s); });
}

void rmsprop(py::list params, py::list grads, py::list square_avgs, py::object momentum_buffers,
             py::object grad_avgs, bool listed, double lr, double alpha, double eps,
             double weight_decay, double momentum, double l1, bool centered, bool maximize,
             intptr_t stream, DevicePlan* plan) {
  const fastopt::RmspropHyper h{lr, alpha, eps, weight_decay, momentum, l1, centered, maximize};
  run(plan,
      {{"params", params, kParam, true},
       {"grads", grads, kGrad, false},
       {"square_avgs", square_avgs, kState, true},
       {"momentum_buffers", used_if(momentum != 0.0, momentum_buffers, "momentum_buffers"), kState, true},
       {"grad_avgs", used_if(centered, grad_avgs, "grad_avgs"), kState, true}},
      listed, stream,
      [&](const cuda::LaunchTables& t, cuda::DType d, cudaStream_t s) { cuda::rmsprop(t, d, h, s); });
}

void adam(py::list params, py::list grads, py::list exp_avgs, py::list exp_avg_sqs,
          py::object max_exp_avg_sqs, bool listed, double lr, double beta1, double beta2,
          double eps, double weight_decay, double l1, bool decoupled_weight_decay, bool amsgrad,
          bool maximize, int64_t step, intptr_t stream, DevicePlan* plan) {
  const fastopt::AdamHyper h{lr, beta1, beta2, eps, weight_decay, l1, decoupled_weight_decay,
                             amsgrad, maximize};
  run(plan,
      {{"params", params, kParam, true},
       {"grads", grads, kGrad, false},
       {"exp_avgs", exp_avgs, kState, true},
       {"exp_avg_sqs", exp_avg_sqs, kState, true},
       {"max_exp_avg_sqs", used_if(amsgrad, max_exp_avg_sqs, "max_exp_avg_sqs"), kState, true}},
      listed, stream,
      [&](const cuda::LaunchTables& t, cuda::DType d, cudaStream_t s) { cuda::adam(t, d, h, step, s); });
}

void sophia(py::list params, py::list grads, py::list exp_avgs, py::list hessian_diags,
            bool listed, double lr, double beta1, double rho, double weight_decay, double eps,
            double l1, bool maximize, intptr_t stream, DevicePlan* plan) {
  const fastopt::SophiaHyper h{lr, beta1, rho, weight_decay, eps, l1, maximize};
  run(plan,
      {{"params", params, kParam, true},
       {"grads", grads, kGrad, false},
       {"exp_avgs", exp_avgs, kState, true},
       {"hessian_diags", hessian_diags, kState, false}},
      listed, stream,
      [&](const cuda::LaunchTables& t, cuda::DType d, cudaStream_t s) { cuda::sophia(t, d, h, s); });
}

void ema(py::list averages, py::list samples, bool listed, double beta, intptr_t stream,
         DevicePlan* plan) {
  run(plan, {{"averages", averages, kParam, true}, {"samples", samples, kGrad, false}}, listed,
      stream,
      [&](const cuda::LaunchTables& t, cuda::DType d, cudaStream_t s) { cuda::ema(t, d, beta, s); });
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
  using py::arg;
  py::class_<DevicePlan>(m, "Plan",
                         "The checked launch tables of one optimizer's arrays, kept between "
                         "steps; pass it as plan= to the step functions.")
      .def(py::init<>())
      .def_property_readonly("launches", [](const DevicePlan& p) { return p.tables().size(); },
                             "Kernel launches one step makes")
      .def_property_readonly("num_tensors", &DevicePlan::num_tensors);
  const auto plan = arg("plan").none(true) = py::none();
  m.def("sgd", &sgd, arg("params"), arg("grads"), arg("momentum_buffers"), arg("listed"),
        arg("lr"), arg("momentum"), arg("dampening"), arg("weight_decay"), arg("l1"),
        arg("nesterov"), arg("maximize"), arg("step"), arg("stream"), plan);
  m.def("adagrad", &adagrad, arg("params"), arg("grads"), arg("state_sums"), arg("listed"),
        arg("lr"), arg("lr_decay"), arg("weight_decay"), arg("eps"), arg("l1"),
        arg("maximize"), arg("step"), arg("stream"), plan);
  m.def("rmsprop", &rmsprop, arg("params"), arg("grads"), arg("square_avgs"),
        arg("momentum_buffers"), arg("grad_avgs"), arg("listed"), arg("lr"), arg("alpha"),
        arg("eps"), arg("weight_decay"), arg("momentum"), arg("l1"), arg("centered"),
        arg("maximize"), arg("stream"), plan);
  m.def("adam", &adam, arg("params"), arg("grads"), arg("exp_avgs"), arg("exp_avg_sqs"),
        arg("max_exp_avg_sqs"), arg("listed"), arg("lr"), arg("beta1"), arg("beta2"),
        arg("eps"), arg("weight_decay"), arg("l1"), arg("decoupled_weight_decay"),
        arg("amsgrad"), arg("maximize"), arg("step"), arg("stream"), plan);
  m.def("sophia", &sophia, arg("params"), arg("grads"), arg("exp_avgs"), arg("hessian_diags"),
        arg("listed"), arg("lr"), arg("beta1"), arg("rho"), arg("weight_decay"), arg("eps"),
        arg("l1"), arg("maximize"), arg("stream"), plan);
  m.def("ema", &ema, arg("averages"), arg("samples"), arg("listed"), arg("beta"), arg("stream"),
        plan);
  m.def("set_torch_types", [](py::object tensor, py::object f32, py::object f64, py::object f16,
                              py::object bf16) {
    auto* t = fastopt::bindings::torch_types();
    if (!t) t = fastopt::bindings::torch_types() = new fastopt::bindings::TorchTypes();
    t->tensor = tensor;
    t->dtypes[0] = f32; t->dtypes[1] = f64; t->dtypes[2] = f16; t->dtypes[3] = bf16;
  }, arg("tensor"), arg("float32"), arg("float64"), arg("float16"), arg("bfloat16"),
     "Registers torch.Tensor and its float dtypes (called by fastopt when torch is in use)");
  m.def("device_status", &device_status,
        "Whether a CUDA device is usable, and if not, why (runtime linked statically).");
}
