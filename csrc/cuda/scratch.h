// Device scratch memory for one call (partial sums, first-bad slots, factorisations),
// stream-ordered: taken from the device's default memory pool with cudaMallocAsync and
// given back with cudaFreeAsync after the kernels that use it, with no synchronisation.
//
// That pool is not torch's or CuPy's: their caching allocators may hold most of the device
// in unused cached blocks, and an allocation would then fail although memory is idle. On
// out-of-memory the caches are asked to let their unused blocks go (a hook the Python
// module installs: torch.cuda.empty_cache(), CuPy's pool free_all_blocks()) and the
// allocation is tried once more.
#pragma once
#include <cstddef>
#include <cuda_runtime.h>

namespace fastopt {
namespace cuda {

// Releases the array libraries' cached device memory; may be called with or without the GIL.
using ReleaseCaches = void (*)();
void set_release_caches(ReleaseCaches hook);

// `bytes` (> 0) of device memory on the current device, ordered on `stream`; throws
// std::runtime_error naming `what` when even the retry finds none.
void* scratch_alloc(size_t bytes, cudaStream_t stream, const char* what);

// One call's scratch, freed in stream order when it goes out of scope (also when a launch
// throws); none for 0 bytes.
class Scratch {
 public:
  Scratch(size_t bytes, cudaStream_t stream, const char* what = "scratch") : stream_(stream) {
    if (bytes) ptr_ = scratch_alloc(bytes, stream, what);
  }
  ~Scratch() {
    if (ptr_) cudaFreeAsync(ptr_, stream_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class T> T* at(size_t byte_offset) const {
    return reinterpret_cast<T*>(static_cast<char*>(ptr_) + byte_offset);
  }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

}  // namespace cuda
}  // namespace fastopt
