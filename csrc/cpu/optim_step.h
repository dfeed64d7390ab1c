// CPU optimizer steps over lists of tensors, one pass over memory: each element of every
// role a call uses is read once and (if the role is written) written once; the bytes per
// element of each optimizer are in its header, common/optim/<name>.h, with its formula.
// One generic functor serves every optimizer of common/optim/registry.h.
// Included once per optimizer and ISA: CMakeLists.txt generates a source per registry
// entry holding FASTOPT_CPU_STEP(Name) and compiles it per ISA (FASTOPT_ISA_isa_avx2 gets
// the 8-float / 4-double vector body, FASTOPT_ISA_isa_scalar the plain loop, which the
// compiler may still vectorize with SSE2), so the optimizers compile in parallel.
#pragma once
#include "cpu/optim_kernels.h"
#include <stdexcept>
#include <type_traits>
#include <vector>
#include "cpu/multi_tensor.h"

FASTOPT_ISA_BEGIN
using cpu::DType;
using cpu::TensorTable;

// The one functor: load the lanes of every role the call uses, apply the formula, store
// the written roles. P is the storage type of the params and grads (float, double, or a
// 16-bit type), T the math type, S the state's storage type (T, or bfloat16 for T = float).
// anchor(i) is the pointer whose alignment the
// vector body follows (the params'). Required roles are always loaded (the test folds
// away); optional ones are used when the call passed their arrays, and loaded unless
// fresh this step. With a grad scale (GradScaler's), the grads are divided by it first;
// with a clip coefficient (max_grad_norm), multiplied by it next, as clip_grad_norm_ does.
// Masked (a mask byte per element): where the mask is 0 the param is stored as 0 and
// every other written role as it was loaded (a masked call loads fresh roles too).
// Stochastic (bfloat16 params): the params are rounded stochastically (common/rounding.h)
// with the key of their tensor, keys[i].
// Blocked (8-bit state, run by Blocked8 below, S = float): the state roles are read from and
// written to the block's float buffers, element j of the tensor at buf[r][j - block_start].
// Master params (16-bit params, `masters` set): the param is read from and written to its
// float32 master, and also written rounded to nearest to the params.
template <class Opt, class P, class T, class S, bool Masked, bool Stochastic, bool Blocked = false>
struct StepKernel {
  using Optimizer = Opt;
  using F = Formula<Opt>;
  static constexpr int N = Opt::num_roles;
  static_assert(!Stochastic || std::is_same_v<P, bfloat16>, "stochastic rounding: bfloat16 params");
  typename F::template Coeffs<T> c;
  void* const* ptr[N];
  const uint8_t* const* masks;
  const uint32_t* keys;
  bool load[N], store[N];
  bool scale_grads, clip_grads;
  T grad_scale, grad_clip;
  float* buf[N] = {};
  int64_t block_start = 0;
  float* const* masters = nullptr;  // master params, or null
  static constexpr bool kMasterable = !std::is_same_v<P, T>;  // 16-bit params
  const P* anchor(int i) const { return static_cast<const P*>(ptr[0][i]); }
  // Where element j of role r's tensor i is read and written.
  template <int r, class Storage> Storage* at(int i, int64_t j) const {
    if constexpr (Blocked && Opt::roles[r].kind == RoleKind::state) return buf[r] + (j - block_start);
    else return static_cast<Storage*>(ptr[r][i]) + j;
  }
  // Always inlined: the loop over roles makes it large enough for GCC to keep it out of
  // line otherwise, a call per vector (a quarter more instructions per element).
  template <class L> FASTOPT_HD void operator()(L, int i, int64_t j) const {
    using V = typename L::value;
    V x[N];
    for_each_role<N>([&](auto role_index) {
      constexpr int r = decltype(role_index)::value;
      constexpr Role role = Opt::roles[r];
      using Storage = std::conditional_t<role.kind == RoleKind::state, S, P>;
      if constexpr (kMasterable && role.kind == RoleKind::param)
        x[r] = masters ? L::load(masters[i] + j) : L::load(at<r, const Storage>(i, j));
      else
        x[r] = (!role.optional || load[r]) ? L::load(at<r, const Storage>(i, j)) : V(T(0));
      if (role.kind == RoleKind::grad && scale_grads) x[r] = x[r] / V(grad_scale);
      if (role.kind == RoleKind::grad && clip_grads) x[r] = x[r] * V(grad_clip);
    });
    if constexpr (Masked) {
      V old[N];
      for (int r = 0; r < N; ++r) old[r] = x[r];
      F::update(x, c);
      const typename L::keep_type keep = L::load_keep(masks[i] + j);
      for_each_role<N>([&](auto role_index) {
        constexpr int r = decltype(role_index)::value;
        if constexpr (Opt::roles[r].written)
          x[r] = L::select(keep, x[r], Opt::roles[r].kind == RoleKind::param ? V(T(0)) : old[r]);
      });
    } else {
      F::update(x, c);
    }
    for_each_role<N>([&](auto role_index) {
      constexpr int r = decltype(role_index)::value;
      constexpr Role role = Opt::roles[r];
      using Storage = std::conditional_t<role.kind == RoleKind::state, S, P>;
      if constexpr (Stochastic && role.kind == RoleKind::param)
        L::store_stochastic(static_cast<P*>(ptr[r][i]) + j, x[r], keys[i], j);
      else if (role.written && (!role.optional || store[r]))
        L::store(at<r, Storage>(i, j), x[r]);
      if constexpr (kMasterable && role.kind == RoleKind::param)
        if (masters) L::store(masters[i] + j, x[r]);
    });
  }
};

// The 8-bit state step (common/state8.h), one block of kState8Block elements at a time:
// the state roles' codes are decoded into float buffers, the step kernel runs over the
// block with its state in those buffers, and each written state is encoded back with its
// block's new absmax. Every element is still read and written once.
template <class Wide, class Step> struct Blocked8 {
  static constexpr int N = Step::N;
  Step step;
  const State8Map* map[N];  // per 8-bit state role: its map; null for the other roles
  bool is_signed[N];
  float* const* absmax[N];  // per 8-bit state role: the tensors' block maxima
  void block(int i, int64_t lo, int64_t hi) const {
    alignas(32) float buf[N][kState8Block];
    Step k = step;
    k.block_start = lo;
    const int64_t b = lo / kState8Block, len = hi - lo;
    for (int r = 0; r < N; ++r) {
      if (!map[r]) continue;
      k.buf[r] = buf[r];
      if (!step.load[r]) continue;  // fresh this step: written before it is read
      Wide::load_state8_block(*map[r], static_cast<const uint8_t*>(step.ptr[r][i]) + lo,
                              absmax[r][i][b], buf[r], len);
    }
    // Vectors from the block's start: the buffers are aligned, and aligning the params
    // instead (apply_range) would send up to 2 x 7 elements per block the scalar way.
    constexpr int W = Wide::width;
    int64_t j = lo;
    for (; j + 2 * W <= hi; j += 2 * W) {
      k(Wide{}, i, j);
      k(Wide{}, i, j + W);
    }
    for (; j + W <= hi; j += W) k(Wide{}, i, j);
    for (; j < hi; ++j) k(ScalarLane<float>{}, i, j);
    for (int r = 0; r < N; ++r) {
      if (!map[r] || !step.store[r] || !Step::Optimizer::roles[r].written) continue;
      absmax[r][i][b] = Wide::store_state8_block(
          *map[r], is_signed[r], static_cast<uint8_t*>(step.ptr[r][i]) + lo, buf[r], len);
    }
  }
};

// S = State8: 8-bit state (the table's absmax lists say which roles), through Blocked8.
struct State8 {};

template <class Opt, class P, class T, class S, bool Masked, bool Stochastic>
void run_step(const TensorTable& t, const typename Opt::Hyper& h, const StepOptions& o) {
  constexpr bool blocked = std::is_same_v<S, State8>;
  using Step = StepKernel<Opt, P, T, std::conditional_t<blocked, float, S>, Masked, Stochastic, blocked>;
  std::vector<uint32_t> keys;
  if (Stochastic) {
    keys.resize(size_t(t.num_tensors));
    for (int i = 0; i < t.num_tensors; ++i) keys[size_t(i)] = rounding_key(o.seed, o.step, i);
  }
  Step k{Formula<Opt>::template coeffs<T>(h, o.step),
         {},
         reinterpret_cast<const uint8_t* const*>(t.ptrs[cpu::kMaskSlot]),
         keys.data(),
         {},
         {},
         o.grad_scale != 1.0,
         !(o.grad_clip == 1.0),  // NaN too
         T(o.grad_scale),
         T(o.grad_clip)};
  for (int r = 0; r < Opt::num_roles; ++r) {
    k.ptr[r] = t.ptrs[r];
    k.store[r] = t.ptrs[r] != nullptr;
    k.load[r] = k.store[r] && (Masked || !(t.fresh >> r & 1u));
  }
  k.masters = reinterpret_cast<float* const*>(t.ptrs[cpu::kMasterSlot]);
  if constexpr (blocked) {
    Blocked8<WideLane<T>, Step> b{k, {}, {}, {}};
    for (int r = 0; r < Opt::num_roles; ++r) {
      if (!t.absmax[r] || !t.ptrs[r]) continue;
      b.is_signed[r] = !Opt::roles[r].nonnegative;
      b.map[r] = &state8_map(b.is_signed[r]);
      b.absmax[r] = t.absmax[r];
    }
    run_blocks(t, kState8Block, b);
  } else {
    run_multi_tensor<WideLane<T>, T>(t, k);
  }
}

template <class Opt, class P, class T, class S, bool Stochastic = false>
void run_step(const TensorTable& t, const typename Opt::Hyper& h, const StepOptions& o) {
  if (t.ptrs[cpu::kMaskSlot]) run_step<Opt, P, T, S, true, Stochastic>(t, h, o);
  else run_step<Opt, P, T, S, false, Stochastic>(t, h, o);
}

// Params of storage type P with float math: float32, bfloat16 or 8-bit state; bfloat16
// params rounded to nearest or stochastically.
template <class Opt, class P, class S>
void run_float_step(const TensorTable& t, const typename Opt::Hyper& h, const StepOptions& o) {
  if constexpr (std::is_same_v<P, bfloat16>) {
    if (o.stochastic) return run_step<Opt, P, float, S, true>(t, h, o);
  }
  run_step<Opt, P, float, S>(t, h, o);
}
template <class Opt, class P>
void run_float_step(const TensorTable& t, DType state, const typename Opt::Hyper& h,
                    const StepOptions& o) {
  if (state == DType::bf16) run_float_step<Opt, P, bfloat16>(t, h, o);
  else if (state == DType::u8) run_float_step<Opt, P, State8>(t, h, o);
  else run_float_step<Opt, P, float>(t, h, o);
}

FASTOPT_ISA_END

// The entry point of each ISA (declared in cpu/optim_kernels.h).
namespace fastopt {
namespace cpu {
namespace FASTOPT_ISA {

template <class Opt>
void step(const TensorTable& t, DType d, DType state, const typename Opt::Hyper& h,
          const StepOptions& o) {
  using namespace fastopt::FASTOPT_ISA;
  switch (d) {
    case DType::f32: run_float_step<Opt, float>(t, state, h, o); break;
    case DType::f64: run_step<Opt, double, double, double>(t, h, o); break;
    case DType::f16: run_float_step<Opt, float16>(t, state, h, o); break;
    case DType::bf16: run_float_step<Opt, bfloat16>(t, state, h, o); break;
    case DType::u8: throw std::invalid_argument("fastopt: optimizer params must be float arrays");
  }
}

}  // namespace FASTOPT_ISA
}  // namespace cpu
}  // namespace fastopt

// FASTOPT_CPU_STEP(Opt): the entry point of optimizer Opt for the ISA being compiled.
#define FASTOPT_CPU_STEP(Opt)                                                              \
  template void fastopt::cpu::FASTOPT_ISA::step<fastopt::Opt>(                             \
      const fastopt::cpu::TensorTable&, fastopt::cpu::DType, fastopt::cpu::DType,          \
      const fastopt::Opt::Hyper&, const fastopt::StepOptions&);
