// The parts of the DLPack ABI (dlpack.h, major version 1) the bindings read: the tensor
// description, the unversioned capsule "dltensor" (CUDA arrays), and the C exchange table a
// framework sets on its tensor type as `__dlpack_c_exchange_api__` (torch >= 2.10), whose
// dltensor_from_py_object_no_sync describes a tensor without any Python call.
#pragma once
#include <cstdint>

namespace fastopt {
namespace bindings {
namespace dlpack {

struct Device { int32_t device_type, device_id; };
struct DataType { uint8_t code, bits; uint16_t lanes; };
struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor*);
};
constexpr int kCPU = 1, kCUDA = 2, kCUDAHost = 3, kCUDAManaged = 13;
constexpr uint8_t kInt = 0, kUInt = 1, kFloat = 2, kBfloat = 4, kBool = 6;

// The exchange table (DLPackExchangeAPI); only the major version fixes its layout.
struct Version { uint32_t major, minor; };
struct ExchangeApiHeader {
  Version version;
  ExchangeApiHeader* prev_api;
};
struct ExchangeApi {
  ExchangeApiHeader header;
  void* managed_tensor_allocator;
  void* managed_tensor_from_py_object_no_sync;
  void* managed_tensor_to_py_object_no_sync;
  // Fills `out` (non-owning: valid while the object lives); 0, or -1 with a Python error set.
  int (*dltensor_from_py_object_no_sync)(void* py_object, Tensor* out);
  void* current_work_stream;
};
constexpr uint32_t kMajorVersion = 1;

}  // namespace dlpack
}  // namespace bindings
}  // namespace fastopt
