// dglm.kernels.cpu_ops: CPU twins of the kernels in kernels/*.py, on numpy fp32 buffers.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "guided_update.h"
#include "int8_linear.h"

namespace py = pybind11;

namespace {

// Inputs: any array-like, copied to C-contiguous fp32 only when it is not already.
using In = py::array_t<float, py::array::c_style | py::array::forcecast>;

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

std::vector<int64_t> shape_of(const py::array& a) {
  return std::vector<int64_t>(a.shape(), a.shape() + a.ndim());
}

void check_shape(const char* name, const py::array& a, const std::vector<int64_t>& want,
                 const char* what) {
  const std::vector<int64_t> got = shape_of(a);
  if (got != want)
    throw py::value_error(std::string("guided_update: ") + name + " must have shape " + what +
                          " = " + shape_str(want) + ", got " + shape_str(got));
}

// Outputs are written in place, so they must already be writeable C-contiguous fp32 arrays.
float* out_ptr(const char* name, const py::handle& h, const std::vector<int64_t>& want) {
  if (!py::isinstance<py::array_t<float>>(h))
    throw py::value_error(std::string("guided_update: ") + name +
                          " must be a float32 numpy array (preallocated output), got " +
                          std::string(py::str(py::type::handle_of(h))));
  auto a = py::reinterpret_borrow<py::array>(h);
  check_shape(name, a, want, "(B, D)");
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string("guided_update: ") + name + " must be C-contiguous");
  if (!a.writeable())
    throw py::value_error(std::string("guided_update: ") + name + " must be writeable");
  return static_cast<float*>(a.mutable_data());
}

struct Span {
  const char* name;
  const char* lo;
  const char* hi;
};

Span span_of(const char* name, const py::array& a) {
  const char* p = static_cast<const char*>(a.data());
  return {name, p, p + a.nbytes()};
}

void check_no_overlap(const Span& out, const std::vector<Span>& others) {
  for (const Span& s : others)
    if (out.lo < s.hi && s.lo < out.hi && out.lo != out.hi && s.lo != s.hi)
      throw py::value_error(std::string("guided_update: ") + out.name +
                            " shares memory with " + s.name + "; pass a fresh output array");
}

void guided_update_py(const In& z, const In& v_cond, const std::optional<In>& v_uncond,
                      const In& cfg_scale, const In& probe_weight, const In& probe_bias,
                      const In& probe_target, const In& probe_scale, const In& noise,
                      const In& coefs, bool rescale, const py::handle& z_next,
                      const py::handle& x0) {
  if (z.ndim() != 2)
    throw py::value_error("guided_update: z must be 2-D (B, D), got shape " +
                          shape_str(shape_of(z)));
  if (probe_weight.ndim() != 2)
    throw py::value_error("guided_update: probe_weight must be 2-D (K, D), got shape " +
                          shape_str(shape_of(probe_weight)));
  const int64_t B = z.shape(0), D = z.shape(1), K = probe_weight.shape(0);
  check_shape("v_cond", v_cond, {B, D}, "(B, D)");
  if (v_uncond) check_shape("v_uncond", *v_uncond, {B, D}, "(B, D)");
  check_shape("cfg_scale", cfg_scale, {B}, "(B,)");
  check_shape("probe_weight", probe_weight, {K, D}, "(K, D)");
  check_shape("probe_bias", probe_bias, {K}, "(K,)");
  check_shape("probe_target", probe_target, {B, K}, "(B, K)");
  check_shape("probe_scale", probe_scale, {B, K}, "(B, K)");
  check_shape("noise", noise, {B, D}, "(B, D)");
  check_shape("coefs", coefs, {B, 5}, "(B, 5)");

  dglm::GuidedUpdateArgs g;
  g.z_next = out_ptr("z_next", z_next, {B, D});
  g.x0 = out_ptr("x0", x0, {B, D});
  std::vector<Span> ins = {
      span_of("z", z),
      span_of("v_cond", v_cond),
      span_of("cfg_scale", cfg_scale),
      span_of("probe_weight", probe_weight),
      span_of("probe_bias", probe_bias),
      span_of("probe_target", probe_target),
      span_of("probe_scale", probe_scale),
      span_of("noise", noise),
      span_of("coefs", coefs),
  };
  if (v_uncond) ins.push_back(span_of("v_uncond", *v_uncond));
  const Span zn_span = span_of("z_next", py::reinterpret_borrow<py::array>(z_next));
  const Span x0_span = span_of("x0", py::reinterpret_borrow<py::array>(x0));
  check_no_overlap(zn_span, ins);
  ins.push_back(zn_span);
  check_no_overlap(x0_span, ins);

  g.z = z.data();
  g.v_cond = v_cond.data();
  g.v_uncond = v_uncond ? v_uncond->data() : nullptr;
  g.cfg_scale = cfg_scale.data();
  g.probe_weight = probe_weight.data();
  g.probe_bias = probe_bias.data();
  g.probe_target = probe_target.data();
  g.probe_scale = probe_scale.data();
  g.noise = noise.data();
  g.coefs = coefs.data();
  g.B = B;
  g.D = D;
  g.K = K;
  g.rescale = rescale;

  py::gil_scoped_release no_gil;
  dglm::guided_update(g);
}

// Raw addresses, not arrays: the decode step calls this ~120 times per token, and the Python
// wrapper (dglm.kernels.int8_linear) has already checked dtypes, shapes and contiguity.
void int8_linear_py(uintptr_t x, uintptr_t q, uintptr_t scale, uintptr_t bias, uintptr_t y,
                    int64_t M, int64_t K, int64_t N, int threads, const std::string& isa) {
  if (!x || !q || !scale || !y) throw py::value_error("int8_linear: null buffer address");
  if (M < 0 || K <= 0 || N <= 0)
    throw py::value_error("int8_linear: need M >= 0, K > 0, N > 0");
  dglm::Int8LinearArgs a;
  a.x = reinterpret_cast<const float*>(x);
  a.q = reinterpret_cast<const int8_t*>(q);
  a.scale = reinterpret_cast<const float*>(scale);
  a.bias = reinterpret_cast<const float*>(bias);
  a.y = reinterpret_cast<float*>(y);
  a.M = M;
  a.K = K;
  a.N = N;
  a.threads = threads;
  if (!isa.empty()) {
    if (!dglm::int8_linear_supports(isa.c_str()))
      throw py::value_error("int8_linear: isa " + isa + " is unknown or not supported by this CPU");
    a.isa = isa.c_str();
  }
  py::gil_scoped_release release;
  dglm::int8_linear(a);
}

}  // namespace

PYBIND11_MODULE(cpu_ops, m) {
  m.doc() = "CPU twins of the kernels in dglm.kernels (numpy fp32 buffers, no PyTorch).";
  m.def("guided_update", &guided_update_py, py::arg("z"), py::arg("v_cond"),
        py::arg("v_uncond").none(true), py::arg("cfg_scale"), py::arg("probe_weight"),
        py::arg("probe_bias"), py::arg("probe_target"), py::arg("probe_scale"),
        py::arg("noise"), py::arg("coefs"), py::arg("rescale"), py::arg("z_next"),
        py::arg("x0"),
        "Fused guided step (twin of dglm.kernels.guided_update.guided_update_ref).\n\n"
        "Inputs are fp32 arrays (copied to C-contiguous fp32 if needed): z, v_cond, noise "
        "(B, D); v_uncond (B, D) or None; cfg_scale (B,); probe_weight (K, D); probe_bias "
        "(K,); probe_target, probe_scale (B, K); coefs (B, 5) [alpha_t, sigma_t, coef_x0, "
        "coef_z, noise_std]. Writes z_next and x0, preallocated C-contiguous float32 (B, D) "
        "arrays that share no memory with the inputs. Releases the GIL.");
  m.def("int8_linear", &int8_linear_py, py::arg("x"), py::arg("q"), py::arg("scale"),
        py::arg("bias"), py::arg("y"), py::arg("M"), py::arg("K"), py::arg("N"),
        py::arg("threads") = 1, py::arg("isa") = "",
        "y (M, N) = x (M, K) · (q (N, K) int8 · scale (N,))ᵀ + bias (N,), fp32, on raw buffer "
        "addresses (bias 0 = none). isa '' = the best this CPU has, or 'avx512' / 'avx2' / "
        "'scalar' (tests). Unchecked: call it through dglm.kernels.int8_linear. "
        "Releases the GIL.");
  m.def("int8_linear_supports", &dglm::int8_linear_supports, py::arg("isa"),
        "Whether this CPU runs the named int8_linear path ('avx512', 'avx2', 'scalar').");
  m.attr("int8_linear_isa") = std::string(dglm::int8_linear_isa());
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
