// int8 quantization on the CPU, one pass over the input: affine (per tensor / per channel)
// quantize (read 4 B, write 1 B per float32 element) and dequantize (1 B -> 4 B), the
// min/max observer, and blockwise absmax quantize (4 B in, 1 B + 4 B per block out: each
// block's absmax and quantization run back to back while the block is in L1) and
// dequantize (to float32, or float16/bfloat16 rounded to nearest even: 1 B -> 2 B).
// Formulas: common/quant.h. AVX2 bodies for the nearest-rounding paths
// (32 elements per iteration, packed to bytes with saturating packs), scalar tails and
// scalar stochastic rounding, the same float32 operations either way.
#include <cstdint>
#include <cstring>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "common/quant.h"
#include "cpu/lanes.h"
#include "cpu/quant_kernels.h"
#ifdef FASTOPT_ISA_isa_avx2
#include <immintrin.h>
#endif

FASTOPT_ISA_BEGIN

using cpu::ChannelLayout;
using cpu::InType;
using cpu::OutType;

constexpr int64_t kChunk = 1 << 14;  // elements per scheduling unit (multiple of 32)

// Input loaders: element -> float32, and (AVX2) 8 elements -> __m256.
struct LoadF32 {
  using storage = float;
  static float one(const float* p) { return *p; }
#ifdef FASTOPT_ISA_isa_avx2
  static __m256 eight(const float* p) { return _mm256_loadu_ps(p); }
#endif
};
struct LoadF16 {
  using storage = uint16_t;
  static float one(const uint16_t* p) { return half_to_float(*p); }
#ifdef FASTOPT_ISA_isa_avx2
  static __m256 eight(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
#endif
};
struct LoadBF16 {
  using storage = uint16_t;
  static float one(const uint16_t* p) { return bf16_to_float(*p); }
#ifdef FASTOPT_ISA_isa_avx2
  static __m256 eight(const uint16_t* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
#endif
};

// Calls whose arrays together exceed this write their output with streaming
// (non-temporal) stores: it would not stay in cache anyway, and skipping the
// read-for-ownership of every output line saves read traffic, the bound here.
constexpr int64_t kStreamingBytes = int64_t(32) << 20;
inline bool streaming_for(int64_t bytes_touched) { return bytes_touched > kStreamingBytes; }

#ifdef FASTOPT_ISA_isa_avx2
// 32 bytes to out, streamed when asked and out is 16-byte aligned (NumPy's large arrays
// start 16 bytes into a page, so 32-byte streaming stores would never apply).
inline void store32(void* out, __m256i v, bool streaming) {
  if (streaming && (reinterpret_cast<uintptr_t>(out) & 15) == 0) {
    _mm_stream_si128(static_cast<__m128i*>(out), _mm256_castsi256_si128(v));
    _mm_stream_si128(static_cast<__m128i*>(out) + 1, _mm256_extracti128_si256(v, 1));
  } else {
    _mm256_storeu_si256(static_cast<__m256i*>(out), v);
  }
}
// The read-bound loops (quantize, min/max) prefetch this far ahead: the hardware
// prefetchers alone left blockwise quantize at ~70% of the ceiling on the 2-core Zen 4
// dev VM, ~85% with it (bench/RESULTS.md).
inline void prefetch_ahead(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + 2048, _MM_HINT_T0);
}
#endif
// Streaming stores are weakly ordered: each thread fences its own before the result is
// handed back (the scalar path makes none).
inline void end_streaming(bool streaming) {
#ifdef FASTOPT_ISA_isa_avx2
  if (streaming) _mm_sfence();
#else
  (void)streaming;
#endif
}
// Dequantized-value storers: float32 -> one element, and (AVX2) 8 float32 lanes -> 8
// elements. The 16-bit ones round to nearest even with the lane conversions (cpu/lanes.h:
// common/half.h's scalar ones, cpu/vec_avx2.h's vector ones), which give the same bits.
struct StoreF32 {
  using storage = float;
  static void one(float* p, float v) { *p = v; }
#ifdef FASTOPT_ISA_isa_avx2
  static void eight(float* p, __m256 v, bool streaming) {
    store32(p, _mm256_castps_si256(v), streaming);
  }
#endif
};
template <class Half>
struct StoreHalf {
  using storage = Half;
  static void one(Half* p, float v) { ScalarLane<float>::store(p, v); }
#ifdef FASTOPT_ISA_isa_avx2
  // 16 bytes, streamed when asked and p is 16-byte aligned
  static void eight(Half* p, __m256 v, bool streaming) {
    __m128i bits;
    F32x8(v).store(reinterpret_cast<Half*>(&bits));
    if (streaming && (reinterpret_cast<uintptr_t>(p) & 15) == 0)
      _mm_stream_si128(reinterpret_cast<__m128i*>(p), bits);
    else
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bits);
  }
#endif
};
using StoreF16 = StoreHalf<float16>;
using StoreBF16 = StoreHalf<bfloat16>;

#ifdef FASTOPT_ISA_isa_avx2
// 32 int32 values -> 32 bytes, saturating to int8 or uint8.
inline void store_ints32(void* out, __m256i a, __m256i b, __m256i c, __m256i d, bool unsigned_q,
                         bool streaming) {
  const __m256i ab = _mm256_packs_epi32(a, b);
  const __m256i cd = _mm256_packs_epi32(c, d);
  const __m256i bytes = unsigned_q ? _mm256_packus_epi16(ab, cd) : _mm256_packs_epi16(ab, cd);
  // the packs interleave 128-bit lanes: put the eight 4-byte groups back in order
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  store32(out, _mm256_permutevar8x32_epi32(bytes, order), streaming);
}
// 32 float32 values within the byte range -> 32 bytes (cvtps_epi32 rounds half to even).
inline void store_bytes32(void* out, __m256 a, __m256 b, __m256 c, __m256 d, bool unsigned_q,
                          bool streaming) {
  store_ints32(out, _mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b), _mm256_cvtps_epi32(c),
               _mm256_cvtps_epi32(d), unsigned_q, streaming);
}
inline __m256 clamp8(__m256 v, __m256 lo, __m256 hi) {
  return _mm256_min_ps(_mm256_max_ps(v, lo), hi);
}
// Lanes that are NaN or infinite: x - x is NaN exactly there.
inline __m256 nonfinite8(__m256 x) {
  const __m256 d = _mm256_sub_ps(x, x);
  return _mm256_cmp_ps(d, d, _CMP_UNORD_Q);
}
#endif

template <class Load>
int64_t first_nonfinite(const typename Load::storage* x, int64_t lo, int64_t hi) {
  for (int64_t e = lo; e < hi; ++e)
    if (!is_finite(Load::one(x + e))) return e;
  return -1;
}

inline int64_t min_bad(int64_t a, int64_t b) { return a < 0 ? b : (b < 0 ? a : (a < b ? a : b)); }

// Run body(lo, hi) over items [0, total) in pieces of `unit` items on `threads` threads;
// returns the smallest non-negative index any call returned (-1 if none).
template <class Body>
int64_t parallel_chunks(int64_t total, int64_t unit, int threads, const Body& body) {
  const int64_t chunks = (total + unit - 1) / unit;
  int64_t first = -1;
  if (chunks <= 1 || threads <= 1) {  // no team (see parallel_region)
    for (int64_t c = 0; c < chunks; ++c)
      first = min_bad(first, body(c * unit, c * unit + unit < total ? c * unit + unit : total));
    return first;
  }
#pragma omp parallel num_threads(threads)
  {
    int64_t mine = -1;
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t lo = c * unit, hi = lo + unit < total ? lo + unit : total;
      mine = min_bad(mine, body(lo, hi));
    }
#pragma omp critical(fastopt_first_bad)
    first = min_bad(first, mine);
  }
  return first;
}

// ---- affine quantize / dequantize -------------------------------------------------------
template <class Load>
int64_t quantize_affine_range(const typename Load::storage* x, uint8_t* q, bool unsigned_q,
                              const ChannelLayout& L, const float* scales, const float* zps,
                              int64_t lo, int64_t hi, bool streaming) {
  const float qmin = unsigned_q ? 0.0f : -128.0f, qmax = unsigned_q ? 255.0f : 127.0f;
  int64_t bad = -1;
  for (int64_t pos = lo; pos < hi;) {  // one segment of constant channel at a time
    const int64_t row = pos / L.inner;
    const int64_t c = row % L.channels;
    const int64_t end = (row + 1) * L.inner < hi ? (row + 1) * L.inner : hi;
    const float scale = scales[c], zp = zps[c];
    int64_t e = pos;
#ifdef FASTOPT_ISA_isa_avx2
    // quantize_affine reordered for speed, same results: clamping x/scale to the integer
    // bounds [qmin - zp, qmax - zp] before rounding equals clamping after (rint is monotone
    // and fixes integers), the conversion rounds half to even, and zp is then added as an
    // integer. Non-finite inputs are flagged by the integer max of |x|'s bit patterns.
    const __m256 vs = _mm256_set1_ps(scale);
    const __m256 vlo = _mm256_set1_ps(qmin - zp), vhi = _mm256_set1_ps(qmax - zp);
    const __m256i vz = _mm256_set1_epi32(int(zp)), magnitude = _mm256_set1_epi32(0x7fffffff);
    __m256i max_bits = _mm256_setzero_si256();
    for (; e + 32 <= end; e += 32) {
      __m256i v[4];
      for (size_t line = 0; line < 32 * sizeof(*x); line += 64)  // each 64-byte line
        prefetch_ahead(reinterpret_cast<const char*>(x + e) + line);
      for (int k = 0; k < 4; ++k) {
        const __m256 xv = Load::eight(x + e + 8 * k);
        max_bits = _mm256_max_epi32(max_bits, _mm256_and_si256(_mm256_castps_si256(xv), magnitude));
        v[k] = _mm256_add_epi32(_mm256_cvtps_epi32(clamp8(_mm256_div_ps(xv, vs), vlo, vhi)), vz);
      }
      store_ints32(q + e, v[0], v[1], v[2], v[3], unsigned_q, streaming);
    }
    if (!_mm256_testz_si256(_mm256_cmpgt_epi32(max_bits, _mm256_set1_epi32(0x7f7fffff)),
                            _mm256_set1_epi32(-1)))
      bad = min_bad(bad, first_nonfinite<Load>(x, pos, e));
#endif
    for (; e < end; ++e) {
      const float xv = Load::one(x + e);
      if (!is_finite(xv)) {  // the call fails; nothing to convert
        bad = min_bad(bad, e);
        continue;
      }
      const float r = quantize_affine(xv, scale, zp, qmin, qmax);
      q[e] = unsigned_q ? uint8_t(int(r)) : uint8_t(int8_t(int(r)));
    }
    pos = end;
  }
  end_streaming(streaming);
  return bad;
}

template <class Load>
int64_t quantize_affine_t(const void* x, void* q, bool unsigned_q, const ChannelLayout& L,
                          const float* scales, const float* zps, int threads) {
  const auto* in = static_cast<const typename Load::storage*>(x);
  auto* out = static_cast<uint8_t*>(q);
  const bool streaming = streaming_for(L.total * int64_t(sizeof(*in) + 1));
  return parallel_chunks(L.total, kChunk, threads, [&](int64_t lo, int64_t hi) {
    return quantize_affine_range<Load>(in, out, unsigned_q, L, scales, zps, lo, hi, streaming);
  });
}

template <class Store>
void dequantize_affine_range(const uint8_t* q, bool unsigned_q, typename Store::storage* x,
                             const ChannelLayout& L, const float* scales, const float* zps,
                             int64_t lo, int64_t hi, bool streaming) {
  for (int64_t pos = lo; pos < hi;) {
    const int64_t row = pos / L.inner;
    const int64_t c = row % L.channels;
    const int64_t end = (row + 1) * L.inner < hi ? (row + 1) * L.inner : hi;
    const float scale = scales[c], zp = zps[c];
    int64_t e = pos;
#ifdef FASTOPT_ISA_isa_avx2
    const __m256 vs = _mm256_set1_ps(scale), vz = _mm256_set1_ps(zp);
    for (; e + 8 <= end; e += 8) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + e));
      const __m256i w = unsigned_q ? _mm256_cvtepu8_epi32(b) : _mm256_cvtepi8_epi32(b);
      Store::eight(x + e, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(w), vz), vs),
                   streaming);
    }
#endif
    for (; e < end; ++e) {
      const float qv = unsigned_q ? float(q[e]) : float(int8_t(q[e]));
      Store::one(x + e, dequantize_affine(qv, scale, zp));
    }
    pos = end;
  }
  end_streaming(streaming);
}

template <class Store>
void dequantize_affine_t(const void* q, bool unsigned_q, void* x, const ChannelLayout& L,
                         const float* scales, const float* zps, int threads) {
  const auto* in = static_cast<const uint8_t*>(q);
  auto* out = static_cast<typename Store::storage*>(x);
  const bool streaming = streaming_for(L.total * int64_t(1 + sizeof(*out)));
  parallel_chunks(L.total, kChunk, threads, [&](int64_t lo, int64_t hi) {
    dequantize_affine_range<Store>(in, unsigned_q, out, L, scales, zps, lo, hi, streaming);
    return int64_t(-1);
  });
}

// ---- min/max observer -------------------------------------------------------------------
// Per channel minimum and maximum. Threads split the channels when there are several,
// otherwise the elements (partial results combined after; min/max are exact in any order).
template <class Load>
int64_t minmax_t(const void* x, const ChannelLayout& L, float* mins, float* maxs, int threads) {
  const auto* in = static_cast<const typename Load::storage*>(x);
  const int64_t per_channel = L.total / L.channels;
  auto scan = [&](int64_t c, int64_t lo, int64_t hi, float& mn, float& mx) -> int64_t {
    // elements lo..hi of channel c (counted within the channel)
    int64_t bad = -1;
    for (int64_t k = lo; k < hi;) {
      const int64_t outer = k / L.inner, within = k % L.inner;
      const int64_t base = (outer * L.channels + c) * L.inner;
      const int64_t stop = (outer + 1) * L.inner < hi ? (outer + 1) * L.inner : hi;
      for (int64_t e = base + within; e < base + within + (stop - k); ++e) {
        const float v = Load::one(in + e);
        if (!is_finite(v)) { bad = min_bad(bad, e); continue; }
        mn = v < mn ? v : mn;
        mx = v > mx ? v : mx;
      }
      k = stop;
    }
    return bad;
  };
  int64_t first = -1;
  if (L.channels > 1) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && L.total >= kChunk)
    for (int64_t c = 0; c < L.channels; ++c) {
      float mn = INFINITY, mx = -INFINITY;
      const int64_t bad = scan(c, 0, per_channel, mn, mx);
      mins[c] = mn;
      maxs[c] = mx;
      if (bad >= 0) {
#pragma omp critical(fastopt_first_bad)
        first = min_bad(first, bad);
      }
    }
    return first;
  }
  float mn = INFINITY, mx = -INFINITY;
  first = parallel_chunks(L.total, kChunk, threads, [&](int64_t lo, int64_t hi) {
    float cmn = INFINITY, cmx = -INFINITY;
    int64_t e = lo, bad = -1;
#ifdef FASTOPT_ISA_isa_avx2
    __m256 vmn = _mm256_set1_ps(INFINITY), vmx = _mm256_set1_ps(-INFINITY);
    for (; e + 8 <= hi; e += 8) {
      const __m256 v = Load::eight(in + e);
      prefetch_ahead(in + e);
      if (_mm256_movemask_ps(nonfinite8(v))) {
        bad = min_bad(bad, first_nonfinite<Load>(in, e, e + 8));
        continue;  // the scalar rescan below is not needed: the call fails anyway
      }
      vmn = _mm256_min_ps(vmn, v);
      vmx = _mm256_max_ps(vmx, v);
    }
    alignas(32) float lanes_mn[8], lanes_mx[8];
    _mm256_store_ps(lanes_mn, vmn);
    _mm256_store_ps(lanes_mx, vmx);
    for (int l = 0; l < 8; ++l) {
      cmn = lanes_mn[l] < cmn ? lanes_mn[l] : cmn;
      cmx = lanes_mx[l] > cmx ? lanes_mx[l] : cmx;
    }
#endif
    for (; e < hi; ++e) {
      const float v = Load::one(in + e);
      if (!is_finite(v)) { bad = min_bad(bad, e); continue; }
      cmn = v < cmn ? v : cmn;
      cmx = v > cmx ? v : cmx;
    }
#pragma omp critical(fastopt_minmax)
    {
      mn = cmn < mn ? cmn : mn;
      mx = cmx > mx ? cmx : mx;
    }
    return bad;
  });
  mins[0] = mn;
  maxs[0] = mx;
  return first;
}

// ---- blockwise ----------------------------------------------------------------------------
inline int64_t blocks_per_chunk(int64_t block) { return block >= kChunk ? 1 : kChunk / block; }

template <class Load>
int64_t quantize_block(const typename Load::storage* x, int8_t* q, float* absmax_out,
                       int64_t b0, int64_t b1, bool stochastic, uint32_t key,
                       [[maybe_unused]] bool streaming) {
  float amax = 0.0f;
  int64_t e = b0;
  bool bad = false;
#ifdef FASTOPT_ISA_isa_avx2
  // max |x| on the bit patterns: for sign-cleared floats integer order is float order, and
  // NaN and Inf patterns (>= 0x7f800000) exceed every finite one, so one integer max per
  // vector finds the absmax and flags non-finite input at once.
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
  __m256i vmax = _mm256_setzero_si256();
  for (; e + 8 <= b1; e += 8) {
    const __m256i bits = _mm256_castps_si256(Load::eight(x + e));
    vmax = _mm256_max_epi32(vmax, _mm256_and_si256(bits, magnitude));
    prefetch_ahead(x + e);
  }
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), vmax);
  int32_t max_bits = 0;
  for (int l = 0; l < 8; ++l) max_bits = lanes[l] > max_bits ? lanes[l] : max_bits;
  bad = max_bits >= 0x7f800000;
  std::memcpy(&amax, &max_bits, 4);
#endif
  for (; e < b1; ++e) {
    const float v = Load::one(x + e);
    bad = bad || !is_finite(v);
    const float a = fabsf(v);
    amax = a > amax ? a : amax;
  }
  if (bad) {  // the call fails, or (check_finite=False) the block reads as unusable
    std::memset(q + b0, 0, size_t(b1 - b0));
    *absmax_out = NAN;
    return first_nonfinite<Load>(x, b0, b1);
  }
  *absmax_out = amax;
  const float pre = blockwise_prescale(amax), factor = blockwise_factor(amax, pre);
  e = b0;
  if (stochastic) {
    for (; e < b1; ++e)
      q[e] = int8_t(int(blockwise_stochastic((Load::one(x + e) * pre) * factor,
                                             uniform24(key, uint64_t(e)))));
    return -1;
  }
#ifdef FASTOPT_ISA_isa_avx2
  // blockwise_nearest without the explicit rint and clamp: the conversion rounds half to
  // even (the default MXCSR mode), and |(x * pre) * factor| <= 127 * (1 + 2^-22) < 127.5
  // (the prescale keeps the factor finite), so the clamp to [-127, 127] can never bind.
  // Same results as the scalar formula.
  const __m256 vf = _mm256_set1_ps(factor), vpre = _mm256_set1_ps(pre);
  auto scaled = [&](int64_t at) { return _mm256_mul_ps(_mm256_mul_ps(Load::eight(x + at), vpre), vf); };
  for (; e + 32 <= b1; e += 32)
    store_bytes32(q + e, scaled(e), scaled(e + 8), scaled(e + 16), scaled(e + 24), false,
                  streaming);
#endif
  for (; e < b1; ++e) q[e] = int8_t(int(blockwise_nearest((Load::one(x + e) * pre) * factor)));
  return -1;
}

template <class Load>
int64_t quantize_blockwise_t(const void* x, int8_t* q, float* absmax, int64_t n, int64_t block,
                             bool stochastic, uint64_t seed, int threads) {
  const auto* in = static_cast<const typename Load::storage*>(x);
  const int64_t blocks = block_count(n, block);
  const uint32_t key = seed_key(seed);
  const bool streaming = streaming_for(n * int64_t(sizeof(*in) + 1));
  return parallel_chunks(blocks, blocks_per_chunk(block), threads, [&](int64_t blo, int64_t bhi) {
    int64_t bad = -1;
    for (int64_t b = blo; b < bhi; ++b) {  // past a bad block too (check_finite=False)
      const int64_t b0 = b * block, b1 = b0 + block < n ? b0 + block : n;
      bad = min_bad(bad, quantize_block<Load>(in, q, absmax + b, b0, b1, stochastic, key,
                                              streaming));
    }
    end_streaming(streaming);
    return bad;
  });
}

template <class Store>
void dequantize_blockwise_range(const int8_t* q, const float* absmax,
                                typename Store::storage* x, int64_t block, int64_t n,
                                int64_t blo, int64_t bhi, bool streaming) {
  for (int64_t b = blo; b < bhi; ++b) {
    const int64_t b0 = b * block, b1 = b0 + block < n ? b0 + block : n;
    const float scale = blockwise_scale(absmax[b]);
    int64_t e = b0;
#ifdef FASTOPT_ISA_isa_avx2
    const __m256 vs = _mm256_set1_ps(scale);
    for (; e + 8 <= b1; e += 8) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + e));
      Store::eight(x + e, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), vs),
                   streaming);
    }
#endif
    for (; e < b1; ++e) Store::one(x + e, float(q[e]) * scale);
  }
  end_streaming(streaming);
}

template <class Store>
void dequantize_blockwise_t(const int8_t* q, const float* absmax, void* x, int64_t n,
                            int64_t block, int threads) {
  auto* out = static_cast<typename Store::storage*>(x);
  const bool streaming = streaming_for(n * int64_t(1 + sizeof(*out)));
  parallel_chunks(block_count(n, block), blocks_per_chunk(block), threads,
                  [&](int64_t blo, int64_t bhi) {
                    dequantize_blockwise_range<Store>(q, absmax, out, block, n, blo, bhi,
                                                      streaming);
                    return int64_t(-1);
                  });
}

#define FASTOPT_BY_INTYPE(in, fn, ...)                           \
  ((in) == InType::f32    ? fn<LoadF32>(__VA_ARGS__)              \
   : (in) == InType::f16 ? fn<LoadF16>(__VA_ARGS__)               \
                         : fn<LoadBF16>(__VA_ARGS__))
#define FASTOPT_BY_OUTTYPE(out, fn, ...)                         \
  ((out) == OutType::f32    ? fn<StoreF32>(__VA_ARGS__)           \
   : (out) == OutType::f16 ? fn<StoreF16>(__VA_ARGS__)            \
                           : fn<StoreBF16>(__VA_ARGS__))

FASTOPT_ISA_END

namespace fastopt {
namespace cpu {
namespace FASTOPT_ISA {
namespace impl = fastopt::FASTOPT_ISA;

void quantize_affine(InType in, const void* x, void* q, bool unsigned_q, ChannelLayout L,
                     const float* scales, const float* zero_points, int64_t* first_bad,
                     int threads) {
  *first_bad = FASTOPT_BY_INTYPE(in, impl::quantize_affine_t, x, q, unsigned_q, L, scales,
                                 zero_points, threads);
}

void dequantize_affine(const void* q, bool unsigned_q, OutType out, void* x, ChannelLayout L,
                       const float* scales, const float* zero_points, int threads) {
  FASTOPT_BY_OUTTYPE(out, impl::dequantize_affine_t, q, unsigned_q, x, L, scales, zero_points,
                     threads);
}

void minmax(InType in, const void* x, ChannelLayout L, float* mins, float* maxs,
            int64_t* first_bad, int threads) {
  *first_bad = FASTOPT_BY_INTYPE(in, impl::minmax_t, x, L, mins, maxs, threads);
}

void quantize_blockwise(InType in, const void* x, int8_t* q, float* absmax, int64_t n,
                        int64_t block, bool stochastic, uint64_t seed, int64_t* first_bad,
                        int threads) {
  *first_bad = FASTOPT_BY_INTYPE(in, impl::quantize_blockwise_t, x, q, absmax, n, block,
                                 stochastic, seed, threads);
}

void dequantize_blockwise(const int8_t* q, const float* absmax, OutType out, void* x, int64_t n,
                          int64_t block, int threads) {
  FASTOPT_BY_OUTTYPE(out, impl::dequantize_blockwise_t, q, absmax, x, n, block, threads);
}

}  // namespace FASTOPT_ISA
}  // namespace cpu
}  // namespace fastopt
