// dglm.kernels.cpu_ops: CPU twins of the kernels in kernels/*.py, on numpy fp32 buffers.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "guided_update.h"
#include "int8_linear.h"
#include "llama_step.h"
#include "sampling.h"
#include "value_edit.h"

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
                    int64_t M, int64_t K, int64_t N, int threads, const std::string& isa,
                    int widen, bool bf16) {
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
  a.widen = widen < 0 ? -1 : widen > 0;
  if (bf16 && !dglm::int8_linear_bf16_supported())
    throw py::value_error("int8_linear: bf16 activations need AVX512-BF16, which this CPU lacks");
  a.bf16 = bf16;
  if (!isa.empty()) {
    if (!dglm::int8_linear_supports(isa.c_str()))
      throw py::value_error("int8_linear: isa " + isa + " is unknown or not supported by this CPU");
    a.isa = isa.c_str();
  }
  py::gil_scoped_release release;
  dglm::int8_linear(a);
}

// The fused int8 Llama decode step: the weights' addresses are taken once (the Python owner,
// dglm.kernels.llama_step, keeps the tensors alive); each call passes the step's buffers.
class LlamaInt8Step {
 public:
  // layers: per layer 14 addresses: attn_norm, mlp_norm, then (q, scale, bias) of wqkv, wo,
  // w13, w2 (bias 0 = none).
  LlamaInt8Step(int64_t hidden, int64_t intermediate, int64_t heads, int64_t kv_heads,
                int64_t head_dim, int64_t max_context, float eps,
                const std::vector<std::vector<uintptr_t>>& layers, uintptr_t final_norm,
                uintptr_t rope_cos, uintptr_t rope_sin, bool bf16) {
    if (bf16 && !dglm::int8_linear_bf16_supported())
      throw py::value_error("LlamaInt8Step: bf16 activations need AVX512-BF16, which this CPU "
                            "lacks");
    m_.bf16 = bf16;
    if (hidden <= 0 || intermediate <= 0 || heads <= 0 || kv_heads <= 0 || head_dim <= 0 ||
        max_context <= 0 || heads % kv_heads || head_dim % 2)
      throw py::value_error("LlamaInt8Step: need positive sizes, heads % kv_heads == 0 and an "
                            "even head_dim");
    if (layers.empty()) throw py::value_error("LlamaInt8Step: no layers");
    if (!final_norm || !rope_cos || !rope_sin)
      throw py::value_error("LlamaInt8Step: null final_norm / rope table address");
    m_.shape = {hidden, intermediate, heads, kv_heads, head_dim, max_context, eps};
    m_.final_norm = reinterpret_cast<const float*>(final_norm);
    m_.rope_cos = reinterpret_cast<const float*>(rope_cos);
    m_.rope_sin = reinterpret_cast<const float*>(rope_sin);
    for (size_t i = 0; i < layers.size(); ++i) {
      const std::vector<uintptr_t>& p = layers[i];
      if (p.size() != 14)
        throw py::value_error("LlamaInt8Step: layer " + std::to_string(i) + " has " +
                              std::to_string(p.size()) + " addresses, expected 14");
      for (size_t j : {0, 1, 2, 3, 5, 6, 8, 9, 11, 12})
        if (!p[j])
          throw py::value_error("LlamaInt8Step: layer " + std::to_string(i) +
                                ": null address at " + std::to_string(j));
      auto mat = [&](size_t j) {
        return dglm::Int8Matrix{reinterpret_cast<const int8_t*>(p[j]),
                                reinterpret_cast<const float*>(p[j + 1]),
                                reinterpret_cast<const float*>(p[j + 2])};
      };
      dglm::LlamaLayer l;
      l.attn_norm = reinterpret_cast<const float*>(p[0]);
      l.mlp_norm = reinterpret_cast<const float*>(p[1]);
      l.wqkv = mat(2);
      l.wo = mat(5);
      l.w13 = mat(8);
      l.w2 = mat(11);
      m_.layers.push_back(l);
    }
  }

  void run(uintptr_t x, uintptr_t out, uintptr_t positions, uintptr_t k, uintptr_t v,
           const std::array<int64_t, 4>& kv_stride, int64_t slot, uintptr_t key_mask,
           int64_t mask_stride, int64_t batch, int threads, uintptr_t residual,
           const std::array<int64_t, 2>& residual_stride) const {
    if (!x || !out || !positions || !k || !v || !key_mask)
      throw py::value_error("LlamaInt8Step.run: null buffer address");
    if (batch < 0 || slot < 0 || kv_stride[3] < m_.shape.head_dim || mask_stride <= slot)
      throw py::value_error("LlamaInt8Step.run: need batch >= 0, slot >= 0, a slot stride of "
                            "at least head_dim and a key-mask row longer than slot");
    dglm::LlamaStepArgs a;
    a.x = reinterpret_cast<const float*>(x);
    a.out = reinterpret_cast<float*>(out);
    a.positions = reinterpret_cast<const int64_t*>(positions);
    a.k = reinterpret_cast<float*>(k);
    a.v = reinterpret_cast<float*>(v);
    std::copy(kv_stride.begin(), kv_stride.end(), a.kv_stride);
    a.slot = slot;
    a.key_mask = reinterpret_cast<const uint8_t*>(key_mask);
    a.mask_stride = mask_stride;
    a.batch = batch;
    a.threads = threads;
    a.residual = reinterpret_cast<const float*>(residual);
    std::copy(residual_stride.begin(), residual_stride.end(), a.residual_stride);
    py::gil_scoped_release release;
    dglm::llama_int8_step(m_, a);
  }

  size_t num_layers() const { return m_.layers.size(); }

 private:
  dglm::LlamaModel m_;
};

// Raw addresses: called once per decode step by dglm.kernels.nucleus, which checks the tensors.
void sample_nucleus_py(uintptr_t logits, int64_t stride, uintptr_t rows, uintptr_t uniforms,
                       uintptr_t temperature, uintptr_t top_k, uintptr_t top_p, int64_t S,
                       int64_t V, uintptr_t out) {
  if (!logits || !uniforms || !temperature || !top_k || !top_p || !out)
    throw py::value_error("sample_nucleus: null buffer address");
  if (S < 0 || V <= 0 || stride < V)
    throw py::value_error("sample_nucleus: need S >= 0, V > 0 and stride >= V");
  dglm::NucleusArgs a;
  a.logits = reinterpret_cast<const float*>(logits);
  a.stride = stride;
  a.rows = reinterpret_cast<const int64_t*>(rows);
  a.uniforms = reinterpret_cast<const float*>(uniforms);
  a.temperature = reinterpret_cast<const float*>(temperature);
  a.top_k = reinterpret_cast<const int64_t*>(top_k);
  a.top_p = reinterpret_cast<const double*>(top_p);
  a.S = S;
  a.V = V;
  a.out = reinterpret_cast<int64_t*>(out);
  py::gil_scoped_release release;
  dglm::sample_nucleus(a);
}

// Raw addresses: dglm.kernels.value_edit checks the tensors (fp32, contiguous, shapes).
void value_ascent_py(const std::vector<std::array<uintptr_t, 2>>& weights,
                     const std::vector<std::array<int64_t, 2>>& shapes, uintptr_t h,
                     uintptr_t coef, uintptr_t steps, uintptr_t step_size, int64_t rows,
                     int64_t max_steps, int threads) {
  if (weights.empty() || weights.size() != shapes.size())
    throw py::value_error("value_ascent: one (weight, bias) pair and shape per layer");
  if (!h || !coef || !steps || !step_size) throw py::value_error("value_ascent: null address");
  dglm::ValueAscentArgs a;
  for (size_t l = 0; l < weights.size(); ++l) {
    const auto [out, in] = shapes[l];
    if (!weights[l][0] || !weights[l][1] || out <= 0 || in <= 0 ||
        (l && in != a.layers.back().out))
      throw py::value_error("value_ascent: layer " + std::to_string(l) +
                            " has a null address or a shape that does not chain");
    a.layers.push_back({reinterpret_cast<const float*>(weights[l][0]),
                        reinterpret_cast<const float*>(weights[l][1]), in, out});
  }
  a.h = reinterpret_cast<float*>(h);
  a.coef = reinterpret_cast<const float*>(coef);
  a.steps = reinterpret_cast<const int64_t*>(steps);
  a.step_size = reinterpret_cast<const float*>(step_size);
  a.rows = rows;
  a.max_steps = max_steps;
  (void)threads;  // single-threaded: a few rows of small products
  py::gil_scoped_release release;
  dglm::value_ascent(a);
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
        py::arg("threads") = 1, py::arg("isa") = "", py::arg("widen") = -1,
        py::arg("bf16") = false,
        "y (M, N) = x (M, K) · (q (N, K) int8 · scale (N,))ᵀ + bias (N,), fp32, on raw buffer "
        "addresses (bias 0 = none). isa '' = the best this CPU has, or 'avx512' / 'avx2' / "
        "'scalar' (tests); widen (AVX-512, > 4 rows): 1 = weights widened once per block into "
        "scratch, 0 = in registers per tile, -1 = the faster here (int8_linear_widening). "
        "bf16: activations rounded to bf16, products by AVX512-BF16 (int8_linear_bf16_supported). "
        "Unchecked: call it through dglm.kernels.int8_linear. Releases the GIL.");
  m.def("int8_linear_bf16_supported", &dglm::int8_linear_bf16_supported,
        "Whether this CPU runs int8_linear's bf16-activation mode (AVX512-BF16).");
  m.def("int8_linear_widening", &dglm::int8_linear_widening,
        "'buffer' or 'registers': how the AVX-512 path serves more than 4 activation rows on this "
        "CPU (timed once, at first use).");
  m.def("int8_linear_supports", &dglm::int8_linear_supports, py::arg("isa"),
        "Whether this CPU runs the named int8_linear path ('avx512', 'avx2', 'scalar').");
  m.attr("int8_linear_isa") = std::string(dglm::int8_linear_isa());
  m.def("sample_nucleus", &sample_nucleus_py, py::arg("logits"), py::arg("stride"),
        py::arg("rows"), py::arg("uniforms"), py::arg("temperature"), py::arg("top_k"),
        py::arg("top_p"), py::arg("S"), py::arg("V"), py::arg("out"),
        "Top-k then top-p Gumbel-max sampling on raw buffer addresses (rows 0 = row s). "
        "Unchecked: call it through dglm.kernels.nucleus. Releases the GIL.");
  m.def("value_ascent", &value_ascent_py, py::arg("weights"), py::arg("shapes"), py::arg("h"),
        py::arg("coef"), py::arg("steps"), py::arg("step_size"), py::arg("rows"),
        py::arg("max_steps"), py::arg("threads") = 1,
        "RE-Control's analytic value ascent on raw buffer addresses, h edited in place "
        "(weights: (w, b) addresses per layer; shapes: (out, in)). Unchecked: call it through "
        "dglm.kernels.value_edit. Releases the GIL.");
  py::class_<LlamaInt8Step>(m, "LlamaInt8Step",
                            "Fused int8 decode step of a Llama-family decoder on raw buffer "
                            "addresses. Unchecked: use it through dglm.kernels.llama_step.")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float,
                    const std::vector<std::vector<uintptr_t>>&, uintptr_t, uintptr_t,
                    uintptr_t, bool>(),
           py::arg("hidden"), py::arg("intermediate"), py::arg("heads"), py::arg("kv_heads"),
           py::arg("head_dim"), py::arg("max_context"), py::arg("eps"), py::arg("layers"),
           py::arg("final_norm"), py::arg("rope_cos"), py::arg("rope_sin"),
           py::arg("bf16") = false)
      .def("run", &LlamaInt8Step::run, py::arg("x"), py::arg("out"), py::arg("positions"),
           py::arg("k"), py::arg("v"), py::arg("kv_stride"), py::arg("slot"),
           py::arg("key_mask"), py::arg("mask_stride"), py::arg("batch"), py::arg("threads"),
           py::arg("residual") = 0, py::arg("residual_stride") = std::array<int64_t, 2>{0, 0},
           "One decode step (releases the GIL): x (B, H) fp32 → out (B, H) final-norm hidden "
           "states; writes K/V of every layer at `slot`; residual (0: none) is added to the "
           "residual stream after layer l of row b at b·residual_stride[0] + "
           "l·residual_stride[1].")
      .def_property_readonly("num_layers", &LlamaInt8Step::num_layers);
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
