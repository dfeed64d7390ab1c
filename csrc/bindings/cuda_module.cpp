// fastopt._cuda: the CUDA half of fastopt. It imports on machines without a GPU or driver;
// device_status() then says why CUDA is not usable.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include "cuda/device_info.h"
#include "cuda_build_info.h"

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fastopt CUDA kernels";
  m.def("device_status", [] {
    const fastopt::cuda::DeviceStatus s = fastopt::cuda::device_status();
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
  }, "Whether a CUDA device is usable, and if not, why (runtime linked statically).");
}
