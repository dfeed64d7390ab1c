// What every optimizer header (common/optim/<name>.h) declares, and the pieces they share.
//
// An optimizer is two things:
//  * its descriptor, `struct Name` in namespace fastopt: the binding name, whether it takes
//    the step count, its hyper-parameters (`Hyper`, declared with FASTOPT_DEFINE_HYPER so
//    that the bindings read every field by name), its array roles (`roles[]`, in the order
//    of the Python arguments: params, grads, then state), which optional roles the options
//    use (`uses`) and which are written before they are read at a given step (`fresh`);
//  * its formula, `Formula<Name>`, compiled once per ISA (scalar, AVX2, CUDA): the per-step
//    coefficients `Coeffs<S>` (precomputed once per call in the element type S), `coeffs()`,
//    and `update(x, c)`, which updates x[role] for one element (or one SIMD vector) of
//    every role in place. The CPU loop (cpu/optim_step.h) and the CUDA kernel
//    (cuda/optim_step.cuh) load the roles a call uses, run update() and store the written
//    ones; neither knows any optimizer by name.
// The float64 NumPy twin of every formula is in python/fastopt/reference.py.
#pragma once
#include <cstdint>
#include <type_traits>
#include <utility>
#include "common/math.h"
#include "common/platform.h"

namespace fastopt {

constexpr int kMaxRoles = 5;  // arrays per element: params, grads and up to three states
// The array slots of a step call: the optimizer's roles, then the masks any step may take
// (one bool/uint8 array per param; where it is 0 the param is set to 0 and no state
// changes), then the master params (master_params=: float32 copies of 16-bit params, which
// the step reads and writes in their place, writing the params rounded to nearest).
constexpr int kMaskSlot = kMaxRoles;
constexpr int kMasterSlot = kMaxRoles + 1;
constexpr int kMaxSlots = kMaxRoles + 2;
// The CUDA launch tables also carry the block maxima of 8-bit state (common/state8.h), one
// list per state role: state role r (roles 2.. are the states) at slot kAbsmaxSlot + r - 2.
constexpr int kFirstState = 2;
constexpr int kAbsmaxSlot = kMaxSlots;
constexpr int kTableSlots = kAbsmaxSlot + kMaxRoles - kFirstState;

// Which element type a role's arrays have: the params' own (params, grads), the state
// type (float32 for 16-bit params, else the params' type), or one byte (the masks, which
// no optimizer lists among its roles: every step takes them); master: float32 master
// params; absmax: float32 block maxima of 8-bit state, one per 256 elements (CUDA tables).
enum class RoleKind { param, grad, state, mask, master, absmax };

struct Role {
  const char* name;  // the Python argument, used in error messages ("exp_avgs[3]: ...")
  RoleKind kind;
  bool written;      // updated in place: must be writeable and may not alias anything
  bool optional;     // used only under some options (the descriptor's uses() says when)
  bool nonnegative = false;  // a state that is never negative (second moments): 8-bit state
                             // stores it with the unsigned map (common/state8.h)
};

// What every step takes besides its optimizer's hyper-parameters.
struct StepOptions {
  int64_t step = 1;         // the 1-based step count (for optimizers that take it)
  double grad_scale = 1.0;  // the grads are divided by it as they are loaded (GradScaler's)
  double grad_clip = 1.0;   // ... then multiplied by it (a clip coefficient: [0, 1] or NaN)
  bool stochastic = false;  // bfloat16 params rounded stochastically (common/rounding.h)
  uint64_t seed = 0;        // ... with this seed
};

// Defaults of the optional parts of a descriptor.
struct Descriptor {
  // Whether the options in h use optional role r (required roles are always used).
  template <class Hyper> static bool uses(const Hyper&, int /*role*/) { return true; }
  // Whether role r is written without being read at this step (SGD's momentum buffer at
  // step 1): its old contents are then not loaded.
  template <class Hyper> static bool fresh(const Hyper&, int /*role*/, int64_t /*step*/) {
    return false;
  }
};

// Declares `struct Hyper { type name; ... };` and `for_each_field(h, f)`, which calls
// f("name", h.name) for every field in declaration order, from one list of X(type, name):
// the bindings fill a Hyper from Python keywords by these names, so the two cannot drift.
#define FASTOPT_HYPER_MEMBER(type, name) type name;
#define FASTOPT_HYPER_VISIT(type, name) f(#name, h.name);
#define FASTOPT_DEFINE_HYPER(FIELDS)          \
  struct Hyper {                              \
    FIELDS(FASTOPT_HYPER_MEMBER)              \
  };                                          \
  template <class H, class F>                 \
  static void for_each_field(H& h, F&& f) {   \
    FIELDS(FASTOPT_HYPER_VISIT)               \
  }

}  // namespace fastopt

FASTOPT_ISA_BEGIN

// The formula of optimizer Opt, specialised in its header (see the top of this file).
template <class Opt> struct Formula;

// Calls f(std::integral_constant<int, r>{}) for r = 0 .. N-1, so that the role index stays a
// compile-time constant in the loops over roles of the CPU and CUDA kernels: each role's
// slot, kind and flags are then known where they are used and the loops unroll.
template <class F, int... R>
FASTOPT_HD void for_each_role_of(F&& f, std::integer_sequence<int, R...>) {
  (f(std::integral_constant<int, R>{}), ...);
}
template <int N, class F> FASTOPT_HD void for_each_role(F&& f) {
  for_each_role_of(f, std::make_integer_sequence<int, N>{});
}

FASTOPT_ISA_END
