// The eager entry of the cpu/cuda kernels (declared in csrc/eager.h, bound in csrc/ops.cpp):
// one C++ call checks the arguments, runs moram_kernels_C::moram_fwd and records one
// autograd node whose backward runs moram_kernels_C::moram_bwd. moram_kernels/eager.py
// sends a call here when it runs eagerly on the cpu or cuda backend in a single dtype; the
// Python custom ops of moram_kernels/ops.py stay the road for torch.compile, opcheck,
// casts, autocast and the other backends. Both roads call the same two dispatcher ops, so
// they compute the same thing, and both save every tensor the backward reads as a saved
// variable (torch.autograd.graph.saved_tensors_hooks sees all of them).
#include "eager.h"

#include <torch/extension.h>

#include <c10/core/impl/LocalDispatchKeySet.h>

#include <charconv>
#include <cmath>
#include <string>

namespace moram_eager {

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Python's repr of a float and of a shape tuple, so that errors read as those of
// moram_kernels/_checks.py.
std::string py_float(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), v);
  std::string s(buf, res.ptr);
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

std::string py_shape(at::IntArrayRef s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

std::string py_device(const at::Device& d) { return d.str(); }

void check_positive(const char* name, double v) {
  TORCH_CHECK_VALUE(!std::isnan(v), name, " must not be NaN");
  TORCH_CHECK_VALUE(v > 0 && std::isfinite(v), name, " must be finite and > 0, got ", py_float(v));
}

void check_same_device(const char* name, const Tensor& t, const Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", py_device(t.device()), " but x is on ",
                    py_device(x.device()));
}

void check_vector(const char* name, const c10::optional<Tensor>& s, int64_t n, const Tensor& x) {
  if (!s.has_value() || !s->defined()) return;
  TORCH_CHECK_VALUE(s->dim() == 1 && s->size(0) == n, name, " must have shape [N] = [", n, "], got ",
                    py_shape(s->sizes()));
  check_same_device(name, *s, x);
  TORCH_CHECK_TYPE(s->is_floating_point(), name, " must be a floating-point tensor, got ", s->scalar_type());
}

// The checks of moram_kernels/_checks.py (validate, check_extras) that the caller has not
// already made: the caller has chosen the backend from the dtypes and the device of x, and
// passes k as an int and tau/delta/eps as floats. Segment 1 is checked as segment 0
// (MoRAMLinear builds both); the value scales and the Gram matrix before any work, so a
// wrong one fails here and not in the backward.
void validate(const Tensor& x, const Tensor& keys0, const Tensor& values0, const c10::optional<Tensor>& scale0,
              const Tensor& keys1, const Tensor& values1, const c10::optional<Tensor>& scale1,
              const c10::optional<Tensor>& gram0, int64_t k, double tau, double delta, double eps) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least one dimension [..., d_in]");
  const Tensor* ks[2] = {&keys0, &keys1};
  const Tensor* vs[2] = {&values0, &values1};
  const char* kn[2] = {"keys", "keys1"};
  const char* vn[2] = {"values", "values1"};
  for (int s = 0; s < 2; ++s) {
    const Tensor& kt = *ks[s];
    const Tensor& vt = *vs[s];
    TORCH_CHECK_VALUE(kt.dim() == 2, kn[s], " must be 2-D [N, d_in], got shape ", py_shape(kt.sizes()));
    TORCH_CHECK_VALUE(vt.dim() == 2, vn[s], " must be 2-D [N, d_out], got shape ", py_shape(vt.sizes()));
    TORCH_CHECK_VALUE(kt.size(0) == vt.size(0), kn[s], " and ", vn[s],
                      " must hold the same number of atoms, got keys N = ", kt.size(0), " and values N = ",
                      vt.size(0));
    TORCH_CHECK_VALUE(x.size(-1) == kt.size(1), "x has d_in = ", x.size(-1),
                      " in its last dimension, but keys have d_in = ", kt.size(1));
    check_same_device(kn[s], kt, x);
    check_same_device(vn[s], vt, x);
  }
  TORCH_CHECK_VALUE(values0.size(1) == values1.size(1), "values and values1 must have the same d_out, got ",
                    values0.size(1), " and ", values1.size(1));
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
  check_positive("tau", tau);
  TORCH_CHECK_VALUE(!std::isnan(delta), "delta must not be NaN");
  TORCH_CHECK_VALUE(delta <= 1, "delta must be <= 1 (it is compared with normalised scores, which lie in "
                    "[-1, 1]: above 1 every atom is dropped), got ", py_float(delta));
  check_positive("eps", eps);
  check_vector("value_scale", scale0, keys0.size(0), x);
  check_vector("scale1", scale1, keys1.size(0), x);
  if (gram0.has_value() && gram0->defined()) {
    const int64_t d = x.size(-1);
    TORCH_CHECK_VALUE(gram0->dim() == 2 && gram0->size(0) == d && gram0->size(1) == d,
                      "gram0 must have shape [d_in, d_in] = [", d, ", ", d, "], got ", py_shape(gram0->sizes()));
    check_same_device("gram0", *gram0, x);
    TORCH_CHECK_TYPE(gram0->is_floating_point(), "gram0 must be a floating-point tensor, got ",
                     gram0->scalar_type());
  }
}

// fp32 contiguous scales, as the kernels take them (the caller checked the shape)
c10::optional<Tensor> as_scale(const c10::optional<Tensor>& s) {
  if (!s.has_value() || !s->defined()) return c10::nullopt;
  return s->detach().to(at::kFloat).contiguous();
}

const c10::TypedOperatorHandle<std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const c10::optional<Tensor>&, const Tensor&, const Tensor&,
    const c10::optional<Tensor>&, int64_t, double, double, double)>&
fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("moram_kernels_C::moram_fwd", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                                 const Tensor&, const Tensor&, const Tensor&, const c10::optional<Tensor>&,
                                 const Tensor&, const Tensor&, const c10::optional<Tensor>&, int64_t, double,
                                 double, double)>();
  return op;
}

const c10::TypedOperatorHandle<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const c10::optional<Tensor>&, const Tensor&,
    const Tensor&, const c10::optional<Tensor>&, const c10::optional<Tensor>&, const Tensor&, const Tensor&,
    const Tensor&, double, double, double, bool, bool, bool)>&
bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("moram_kernels_C::moram_bwd", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
              const Tensor&, const Tensor&, const Tensor&, const Tensor&, const c10::optional<Tensor>&,
              const Tensor&, const Tensor&, const c10::optional<Tensor>&, const c10::optional<Tensor>&,
              const Tensor&, const Tensor&, const Tensor&, double, double, double, bool, bool, bool)>();
  return op;
}

// Differentiable inputs first (x, keys0, values0, keys1, values1), so that their indices
// in needs_input_grad are fixed; the scales and the Gram matrix never get a gradient here.
// Every tensor the backward reads is a saved variable, as in the custom op's setup_context
// (moram_kernels/ops.py): saved-tensor hooks (save_on_cpu, checkpointing) see and may
// replace each of them, and the version counters catch an in-place change.
struct MoramFunction : public torch::autograd::Function<MoramFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& keys0, const Tensor& values0,
                               const Tensor& keys1, const Tensor& values1, const c10::optional<Tensor>& scale0,
                               const c10::optional<Tensor>& scale1, const c10::optional<Tensor>& gram0, int64_t K,
                               double tau, double delta, double eps) {
    // The caller passes tensors already in the compute dtype (autocast's included): an
    // autocast region around this call must not re-cast what the kernels' GEMMs see.
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const Tensor x2 = x.reshape({-1, x.size(-1)});
    auto [y, idx, p_sel, norm] = fwd_op().call(x2, keys0, values0, scale0, keys1, values1, scale1, K, tau, delta, eps);
    ctx->mark_non_differentiable({idx});
    ctx->save_for_backward({x2, keys0, values0, keys1, values1, scale0.value_or(Tensor()),
                            scale1.value_or(Tensor()), gram0.value_or(Tensor()), idx, p_sel, norm});
    ctx->saved_data["hyper"] = std::vector<double>{tau, delta, eps};
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    return {y, idx};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_k0 = ctx->needs_input_grad(1), need_v0 = ctx->needs_input_grad(2);
    const bool need_k1 = ctx->needs_input_grad(3), need_v1 = ctx->needs_input_grad(4);
    variable_list out(12);
    if (!(need_x || need_k0 || need_v0 || need_k1 || need_v1)) return out;
    // The same for a backward run inside an autocast region (the custom op's backward
    // switches autocast off too).
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const auto h = ctx->saved_data["hyper"].toDoubleVector();
    auto opt = [](const Tensor& t) { return t.defined() ? c10::optional<Tensor>(t) : c10::nullopt; };
    const Tensor& x2 = saved[0];
    const Tensor gy = grads[0].contiguous();
    auto [gx, gk0, gv0, gk1, gv1] =
        bwd_op().call(gy, x2, saved[1], saved[2], opt(saved[5]), saved[3], saved[4], opt(saved[6]), opt(saved[7]),
                      saved[8], saved[9], saved[10], h[0], h[1], h[2], need_x, need_k0 || need_v0,
                      need_k1 || need_v1);
    // Not a view (at::_unsafe_view keeps autograd's view tracking out): autograd adds a
    // second gradient of x (the base layer's) into a tensor it solely owns in place, but
    // into a view out of place, a fresh [T, d_in] each step (2.6 ms of the adapter's ~20 ms
    // in a CLIP-layer train step on a 2-core AVX2 EPYC).
    if (need_x) {
      const auto sizes = ctx->saved_data["x_sizes"].toIntVector();
      out[0] = gx.sizes() == c10::IntArrayRef(sizes) ? gx : at::_unsafe_view(gx, sizes);
    }
    if (need_k0) out[1] = gk0;
    if (need_v0) out[2] = gv0;
    if (need_k1) out[3] = gk1;
    if (need_v1) out[4] = gv1;
    return out;
  }
};

}  // namespace

std::tuple<Tensor, Tensor> eager(const Tensor& x, const Tensor& keys0, const Tensor& values0,
                                 const c10::optional<Tensor>& scale0, const c10::optional<Tensor>& keys1_opt,
                                 const c10::optional<Tensor>& values1_opt, const c10::optional<Tensor>& scale1,
                                 const c10::optional<Tensor>& gram0, int64_t k, double tau, double delta,
                                 double eps) {
  TORCH_CHECK_VALUE(keys0.dim() == 2, "keys must be 2-D [N, d_in], got shape ", py_shape(keys0.sizes()));
  TORCH_CHECK_VALUE(values0.dim() == 2, "values must be 2-D [N, d_out], got shape ", py_shape(values0.sizes()));
  const bool two = keys1_opt.has_value() && keys1_opt->defined();
  TORCH_CHECK(two == (values1_opt.has_value() && values1_opt->defined()),
              "keys1 and values1 must be given together");
  const Tensor keys1 = two ? *keys1_opt : keys0.new_empty({0, keys0.size(1)});
  const Tensor values1 = two ? *values1_opt : values0.new_empty({0, values0.size(1)});
  validate(x, keys0, values0, scale0, keys1, values1, scale1, gram0, k, tau, delta, eps);
  const int64_t n = keys0.size(0) + keys1.size(0);
  const int64_t K = n == 1 ? 1 : std::min(std::max<int64_t>(k, 2), n);  // effective K
  std::vector<Tensor> out;
  if (torch::autograd::GradMode::is_enabled() &&
      (x.requires_grad() || keys0.requires_grad() || values0.requires_grad() || keys1.requires_grad() ||
       values1.requires_grad())) {
    out = MoramFunction::apply(x, keys0, values0, keys1, values1, as_scale(scale0), as_scale(scale1), gram0, K, tau,
                               delta, eps);
  } else {
    // Nothing to record (no_grad, inference mode, or no input that requires grad: the same
    // test as Function::apply's): the forward op alone, below autograd, without a context,
    // saved variables or the autograd fallback's checks (a few µs of a decoded token's ~40).
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto res = fwd_op().call(x.reshape({-1, x.size(-1)}), keys0, values0, as_scale(scale0), keys1, values1,
                             as_scale(scale1), K, tau, delta, eps);
    out = {std::get<0>(res), std::get<1>(res)};
  }
  if (x.dim() == 2) return {out[0], out[1]};
  // Shaped outside the node, as an ordinary view: an output made a view inside a custom
  // autograd function could not be modified in place.
  auto sizes = x.sizes().vec();
  sizes.back() = values0.size(1);
  return {out[0].view(sizes), out[1]};
}

}  // namespace moram_eager
