// Queries the CUDA runtime (linked statically; libcuda is loaded lazily, so this runs on
// machines without a driver and reports the runtime's error instead of failing to load).
#include <cuda_runtime.h>
#include "cuda/device_info.h"

namespace fastopt {
namespace cuda {

DeviceStatus device_status() {
  DeviceStatus s;
  cudaRuntimeGetVersion(&s.runtime_version);
  if (cudaDriverGetVersion(&s.driver_version) != cudaSuccess) s.driver_version = 0;
  const cudaError_t err = cudaGetDeviceCount(&s.device_count);
  if (err != cudaSuccess) {
    s.device_count = 0;
    s.reason = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return s;
  }
  if (s.device_count == 0) s.reason = "no CUDA device found";
  for (int d = 0; d < s.device_count; ++d) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, d) != cudaSuccess) continue;
    s.device_names.push_back(std::string(prop.name) + " (sm_" + std::to_string(prop.major) +
                             std::to_string(prop.minor) + ")");
  }
  return s;
}

}  // namespace cuda
}  // namespace fastopt
