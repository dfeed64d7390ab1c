#include "cuda/scratch.h"

#include <atomic>
#include <stdexcept>
#include <string>

namespace fastopt {
namespace cuda {
namespace {
std::atomic<ReleaseCaches> release_caches{nullptr};
}  // namespace

void set_release_caches(ReleaseCaches hook) { release_caches.store(hook); }

void* scratch_alloc(size_t bytes, cudaStream_t stream, const char* what) {
  void* ptr = nullptr;
  cudaError_t err = cudaMallocAsync(&ptr, bytes, stream);
  if (err == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // (not sticky; cleared so that the retry starts clean)
    if (const ReleaseCaches hook = release_caches.load()) {
      hook();
      err = cudaMallocAsync(&ptr, bytes, stream);
    }
  }
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("fastopt: cudaMallocAsync (") + what + ", " +
                             std::to_string(bytes) + " bytes) failed: " + cudaGetErrorName(err) +
                             ": " + cudaGetErrorString(err));
  }
  return ptr;
}

}  // namespace cuda
}  // namespace fastopt
