// fastopt._cpu: thin pybind11 bindings of the CPU kernels. Each optimizer's step function
// is generated from its descriptor (common/optim/registry.h, bindings/optim_binding.h):
// it receives aligned lists of NumPy arrays (hyper-parameters already validated in
// Python), checks and unpacks them (array_table.h), releases the GIL and runs one
// multi-tensor call.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <stdexcept>
#include "bindings/array_table.h"
#include "bindings/optim_binding.h"
#include "build_info.h"
#include "cpu/dispatch.h"

namespace py = pybind11;
using fastopt::bindings::ArrayTable;
using fastopt::bindings::RoleSpec;
using fastopt::bindings::StepCall;
namespace cpu = fastopt::cpu;

namespace {

template <class Fn>
void run_released(Fn&& fn) {
  py::gil_scoped_release release;
  fn();
}

// One step of optimizer Opt over the call's aligned lists (see bindings/optim_binding.h
// for the arguments): the arrays are checked and tabled, then the kernel runs with the GIL
// released.
template <class Opt>
void step(const py::args& args, const py::kwargs& kwargs) {
  const StepCall<Opt> call(args, kwargs, {});
  std::array<RoleSpec, Opt::num_roles> roles;
  for (int r = 0; r < Opt::num_roles; ++r)
    roles[r] = {Opt::roles[r].name, call.lists[r], Opt::roles[r].written, Opt::roles[r].kind};
  const ArrayTable arrays(roles, call.listed);
  cpu::TensorTable table = arrays.table();
  table.fresh = call.fresh;
  run_released(
      [&] { cpu::step<Opt>(table, arrays.dtype(), call.hyper, call.step, call.grad_scale); });
}

// Batched Cholesky: arrays validated in fastopt/newton.py (contiguous, one dtype, shapes
// (batch, n, n) and (batch, n)). Returns the mask of systems that solved.
cpu::DType float_dtype(const py::array& a) {
  return a.dtype().is(py::dtype::of<float>()) ? cpu::DType::f32 : cpu::DType::f64;
}

py::array_t<bool> newton_solve(py::array hessians, py::array grads, py::array out,
                               int64_t batch, int64_t n, double damping) {
  py::array_t<bool> solved(batch);
  const cpu::DType dt = float_dtype(hessians);
  const void* H = hessians.data();
  const void* g = grads.data();
  void* d = out.mutable_data();
  bool* ok = solved.mutable_data();
  run_released([&] { cpu::newton_solve(dt, H, g, d, ok, batch, n, damping); });
  return solved;
}

void newton_apply(py::array params, py::array steps, py::object use, int64_t batch, int64_t n,
                  double lr) {
  const cpu::DType dt = float_dtype(params);
  void* p = params.mutable_data();
  const void* d = steps.data();
  py::array_t<bool, py::array::c_style | py::array::forcecast> mask_array;
  if (!use.is_none()) mask_array = use;
  const bool* mask = use.is_none() ? nullptr : mask_array.data();
  run_released([&] { cpu::newton_apply(dt, p, d, mask, batch, n, lr); });
}

// Quantization: arrays validated and allocated in fastopt/quant.py (contiguous, dtypes
// checked); `in_type` is 0 float32, 1 float16, 2 bfloat16. Functions reading floats
// return the first non-finite element's flat index, or -1.
cpu::InType in_type(int code) { return static_cast<cpu::InType>(code); }

int64_t quantize_affine(py::array x, int in, py::array q, bool unsigned_q, int64_t channels,
                        int64_t inner, py::array_t<float> scales, py::array_t<float> zps) {
  const cpu::ChannelLayout L{int64_t(x.size()), channels, inner};
  int64_t bad = -1;
  const void* xp = x.data();
  void* qp = q.mutable_data();
  const float *s = scales.data(), *z = zps.data();
  run_released([&] { cpu::quantize_affine(in_type(in), xp, qp, unsigned_q, L, s, z, &bad); });
  return bad;
}

void dequantize_affine(py::array q, bool unsigned_q, py::array x, int64_t channels,
                       int64_t inner, py::array_t<float> scales, py::array_t<float> zps) {
  const cpu::ChannelLayout L{int64_t(q.size()), channels, inner};
  const void* qp = q.data();
  float* xp = static_cast<float*>(x.mutable_data());
  const float *s = scales.data(), *z = zps.data();
  run_released([&] { cpu::dequantize_affine(qp, unsigned_q, xp, L, s, z); });
}

int64_t minmax(py::array x, int in, int64_t channels, int64_t inner, py::array mins,
               py::array maxs) {
  const cpu::ChannelLayout L{int64_t(x.size()), channels, inner};
  int64_t bad = -1;
  const void* xp = x.data();
  float* mn = static_cast<float*>(mins.mutable_data());
  float* mx = static_cast<float*>(maxs.mutable_data());
  run_released([&] { cpu::minmax(in_type(in), xp, L, mn, mx, &bad); });
  return bad;
}

int64_t quantize_blockwise(py::array x, int in, py::array q, py::array absmax, int64_t block,
                           bool stochastic, uint64_t seed) {
  int64_t bad = -1;
  const int64_t n = int64_t(x.size());
  const void* xp = x.data();
  int8_t* qp = static_cast<int8_t*>(q.mutable_data());
  float* ap = static_cast<float*>(absmax.mutable_data());
  run_released([&] {
    cpu::quantize_blockwise(in_type(in), xp, qp, ap, n, block, stochastic, seed, &bad);
  });
  return bad;
}

void dequantize_blockwise(py::array q, py::array absmax, py::array x, int64_t block) {
  const int64_t n = int64_t(q.size());
  const int8_t* qp = static_cast<const int8_t*>(q.data());
  const float* ap = static_cast<const float*>(absmax.data());
  float* xp = static_cast<float*>(x.mutable_data());
  run_released([&] { cpu::dequantize_blockwise(qp, ap, xp, n, block); });
}

void add_inplace(py::array dst, py::array src) {
  const std::array<RoleSpec, 2> roles{
      {{"dst", py::list(py::make_tuple(dst)), true, fastopt::RoleKind::param},
       {"src", py::list(py::make_tuple(src)), false, fastopt::RoleKind::grad}}};
  const ArrayTable arrays(roles, false);
  if (arrays.dtype() != cpu::DType::f32 && arrays.dtype() != cpu::DType::f64)
    throw py::type_error("dst: add_inplace takes float32 or float64 arrays");
  run_released([&] { cpu::add_inplace(arrays.table(), arrays.dtype()); });
}

py::dict build_info() {
  py::dict d;
  d["version"] = FASTOPT_VERSION;
  d["compiler"] = FASTOPT_CXX_COMPILER;
#ifdef FASTOPT_OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["cpu_paths"] = py::make_tuple("scalar", "avx2");
  d["cpu_has_avx2_fma"] = cpu::cpu_has_avx2();
  return d;
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "fastopt CPU kernels (scalar and AVX2 paths, OpenMP threads)";
  using py::arg;
  fastopt::for_each_optimizer([&](auto opt) {
    using Opt = decltype(opt);
    m.def(Opt::name, &step<Opt>);
  });
  m.def("optimizers", &fastopt::bindings::describe_optimizers,
        "Each optimizer's array roles, hyper-parameter names and whether it takes step");
  m.def("newton_solve", &newton_solve, arg("hessians"), arg("grads"), arg("out"), arg("batch"),
        arg("n"), arg("damping"));
  m.def("newton_apply", &newton_apply, arg("params"), arg("steps"), arg("use"), arg("batch"),
        arg("n"), arg("lr"));
  m.def("quantize_affine", &quantize_affine, arg("x"), arg("in_type"), arg("q"),
        arg("unsigned_q"), arg("channels"), arg("inner"), arg("scales"), arg("zero_points"));
  m.def("dequantize_affine", &dequantize_affine, arg("q"), arg("unsigned_q"), arg("x"),
        arg("channels"), arg("inner"), arg("scales"), arg("zero_points"));
  m.def("minmax", &minmax, arg("x"), arg("in_type"), arg("channels"), arg("inner"),
        arg("mins"), arg("maxs"));
  m.def("quantize_blockwise", &quantize_blockwise, arg("x"), arg("in_type"), arg("q"),
        arg("absmax"), arg("block"), arg("stochastic"), arg("seed"));
  m.def("dequantize_blockwise", &dequantize_blockwise, arg("q"), arg("absmax"), arg("x"),
        arg("block"));
  m.def("add_inplace", &add_inplace, arg("dst"), arg("src"),
        "dst += src with all threads: the bandwidth ceiling of the benchmark");
  m.def("set_cpu_path", [](const std::string& name) {
    try {
      cpu::set_isa(name);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(std::string("path: ") + e.what());
    }
  }, arg("path"));
  m.def("get_cpu_path", [] { return std::string(cpu::isa_name(cpu::active_isa())); });
  m.def("set_num_threads", [](int64_t n) {
    try {
      cpu::set_num_threads(n);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(std::string("n: ") + e.what());
    }
  }, arg("n"));
  m.def("get_num_threads", &cpu::num_threads);
  m.def("build_info", &build_info);
  m.def("set_array_adapter", [](py::object fn) { ArrayTable::array_adapter() = fn; },
        arg("adapter"), "Callable (name, obj) -> numpy view, for arrays that are not ndarrays");
}
