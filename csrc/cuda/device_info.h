// What the CUDA runtime can see: devices, driver and runtime versions, or why none is usable.
#pragma once
#include <string>
#include <vector>

namespace fastopt {
namespace cuda {

struct DeviceStatus {
  int device_count = 0;
  std::string reason;                // empty when usable
  int runtime_version = 0;           // e.g. 13000
  int driver_version = 0;            // 0 when no driver is installed
  std::vector<std::string> device_names;  // "NVIDIA H100 80GB HBM3 (sm_90)"
};

DeviceStatus device_status();

}  // namespace cuda
}  // namespace fastopt
