// Macros shared by the CPU and CUDA builds.
#pragma once

// Update formulas are inline functions callable from host code and CUDA kernels.
#if defined(__CUDACC__)
#define FASTOPT_HD __host__ __device__ __forceinline__
#else
#define FASTOPT_HD inline __attribute__((always_inline))
#endif

// Every inline function lives in a per-ISA inline namespace: the same header is compiled
// once per instruction set (scalar, AVX2, CUDA), and distinct namespaces stop the linker
// from merging an AVX2-compiled copy into the scalar path (which would fault on CPUs
// without AVX2). The build defines FASTOPT_ISA per translation unit.
#ifndef FASTOPT_ISA
#define FASTOPT_ISA isa_generic
#endif
#define FASTOPT_ISA_BEGIN namespace fastopt { inline namespace FASTOPT_ISA {
#define FASTOPT_ISA_END } }
