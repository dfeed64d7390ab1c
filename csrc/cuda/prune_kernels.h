// Entry points of the CUDA magnitude-pruning kernels (prune_kernels.cu): the order and the
// radix select of common/prune.h, so the masks equal the CPU's. The binding builds the
// tables on the host; the launchers copy them into `scratch` (device memory of
// prune_scratch_bytes) and queue every kernel on the stream without waiting for it.
#pragma once
#include <cuda_runtime.h>
#include <cstddef>
#include <cstdint>
#include "cuda/launch_table.h"

namespace fastopt {
namespace cuda {

// One array: its elements and mask (1 byte each), its chunks [first_chunk, first_chunk +
// ceil(size / chunk)) of the call's chunk numbering, and its selection.
struct PruneTensor {
  const void* x;
  uint8_t* mask;
  int64_t size;
  int64_t first_chunk;
  int32_t problem;
};

// One selection: prune k of its `size` elements; its arrays' chunks start at first_chunk.
// prefix and rank are the radix select's state (common/prune.h), updated on the device.
struct PruneProblem {
  int64_t k, size, first_chunk;
  uint64_t prefix;
  int64_t rank;
};

constexpr int64_t kPruneChunk = 4096;  // elements per chunk of the unstructured kernels
constexpr int kPruneThreads = 256;

size_t prune_scratch_bytes(int num_tensors, int num_problems, int64_t chunks);

// Masks of the selections; chunks of kPruneChunk elements.
void prune_magnitude(DType dtype, const PruneTensor* tensors, int num_tensors,
                     const PruneProblem* problems, int num_problems, int64_t chunks,
                     void* scratch, cudaStream_t stream);
// N:M masks: chunks of kPruneThreads groups (kPruneThreads * m elements); every size is a
// multiple of m.
void prune_n_m(DType dtype, const PruneTensor* tensors, int num_tensors, int64_t chunks, int n,
               int m, void* scratch, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastopt
