// The norm around the four primitives, one call per direction (fused/_norm.py has the
// algebra and the same composition in torch ops for the other backends):
//
//   coefficients   mean, var, gamma, beta        -> s_c, b_c, mean_c, rstd_c
//                  norm(t) = (t − mean_c)·s_c + b_c, mean_c in float64 (kExactShiftAbove)
//   norm_forward   t                             -> apply(t)      (stats, coefficients, apply)
//   norm_backward  g, t                          -> dt, dgamma, dbeta
//                                                   (backward_reduce, k1..k3, backward_apply)
//
// Why in C++: composed in Python, the per-channel algebra between the passes is a dozen tiny
// tensor ops per unit and direction, each a few microseconds of dispatch. At ResNet-20's
// small layers that overhead cost as much as a pass over the activation; here it is a loop
// over C values.
#include "primitives.h"

#include <cmath>

namespace bnorder {
namespace {

constexpr int64_t NORM_BN = 0, NORM_BN_MINUS = 1, NORM_AFFINE = 2;

// |mean|·rstd above which a channel's mean keeps its float64 digits. There the shift as
// eager forms it, beta − mean·s rounded, is off by up to half an ulp of mean·s, an offset
// on every value of the channel that grows with |mean|/std (5e-4 at mean 1e4, std 1) and
// dominates the next convolution's weight gradient; the passes then add the rest of the
// shift (primitives.cpp, ChannelTerms). Below it the mean is rounded to the accumulation
// dtype and the passes are eager's t·s + b exactly: there the extra rounding of adding the
// rest would cost more than the offset it removes (AlexNet conv-relu-bn, whose norms see ReLU
// outputs with |mean|/std ≈ 1.3, went from within 2x eager's error to 2.2x with it).
constexpr double kExactShiftAbove = 16.0;

void check_norm_code(int64_t norm, const char* op) {
  TORCH_CHECK(norm >= NORM_BN && norm <= NORM_AFFINE, op,
              ": norm must be 0 (bn), 1 (bn-minus) or 2 (affine), got ", norm);
}

// A per-channel vector as a contiguous tensor of the accumulation dtype: v itself for the
// float32/float64 parameters and statistics of the usual models, unless `copy` (values
// returned as outputs: an op's outputs may not alias its inputs).
at::Tensor channel_vector(const c10::optional<at::Tensor>& v, const char* name, int64_t C,
                          at::ScalarType acc, const char* op, bool copy = false) {
  TORCH_CHECK(v.has_value() && v->defined(), op, ": ", name, " is required for this norm");
  TORCH_CHECK(v->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", v->device());
  TORCH_CHECK(v->dim() == 1 && v->size(0) == C, op, ": ", name, " must have shape (", C,
              ",), got ", v->sizes());
  return copy ? v->to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous()
              : v->to(acc).contiguous();
}

struct Coefficients {
  at::Tensor scale, shift, mean, rstd;
};

// bn: s = gamma·rstd, b = beta; bn-minus: s = rstd, b = 0; affine: s = gamma, b = beta, with
// mean = 0 and rstd = 1 so that one backward formula serves all three (see _norm.py). The
// mean is returned in float64, every digit the statistics have: the passes center on it.
Coefficients coefficients_of(const c10::optional<at::Tensor>& mean,
                             const c10::optional<at::Tensor>& var,
                             const c10::optional<at::Tensor>& gamma,
                             const c10::optional<at::Tensor>& beta, double eps, int64_t norm,
                             int64_t C, at::ScalarType acc, const char* op) {
  check_norm_code(norm, op);
  const auto options = at::TensorOptions().dtype(acc);
  Coefficients k;
  if (norm == NORM_AFFINE) {
    k.scale = channel_vector(gamma, "gamma", C, acc, op, /*copy=*/true);
    k.shift = channel_vector(beta, "beta", C, acc, op, /*copy=*/true);
    k.mean = at::zeros({C}, at::TensorOptions().dtype(at::kDouble));
    k.rstd = at::ones({C}, options);
    return k;
  }
  // The per-channel algebra runs in float64 whatever the activations' dtype, and each
  // coefficient is rounded once to the accumulation dtype. s_c multiplies every value of
  // channel c, so its rounding error is the same relative error on the whole channel: a
  // coherent error that the next convolution sums in phase instead of averaging away, and
  // that a later norm over few or nearly equal values amplifies by 1/std. Computed in
  // float32 (1/sqrt(var + eps), then ·gamma) it carried four roundings; eager ATen's two.
  const at::Tensor m = channel_vector(mean, "mean", C, at::kDouble, op, /*copy=*/true);
  const at::Tensor v = channel_vector(var, "var", C, at::kDouble, op);
  const at::Tensor g = norm == NORM_BN ? channel_vector(gamma, "gamma", C, at::kDouble, op)
                                       : at::Tensor();
  const at::Tensor b = norm == NORM_BN ? channel_vector(beta, "beta", C, at::kDouble, op)
                                       : at::Tensor();
  const auto wide = at::TensorOptions().dtype(at::kDouble);
  at::Tensor scale = at::empty({C}, wide), rstd = at::empty({C}, wide);
  {
    const double* vp = v.const_data_ptr<double>();
    double *s = scale.mutable_data_ptr<double>(), *r = rstd.mutable_data_ptr<double>();
    double* mp = m.mutable_data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) {
      r[c] = 1.0 / std::sqrt(vp[c] + eps);
      s[c] = norm == NORM_BN ? r[c] * g.const_data_ptr<double>()[c] : r[c];
      if (acc == at::kFloat && !(std::abs(mp[c]) * r[c] > kExactShiftAbove))
        mp[c] = static_cast<double>(static_cast<float>(mp[c]));
    }
  }
  k.mean = m;
  k.scale = scale.to(acc);
  k.shift = norm == NORM_BN ? b.to(acc) : at::zeros({C}, options);
  k.rstd = rstd.to(acc);
  return k;
}

at::ScalarType acc_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> coefficients(
    const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& var,
    const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& beta, double eps,
    int64_t norm, int64_t channels, at::ScalarType acc) {
  const char* op = "bnorder_cpu::coefficients";
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, op,
              ": the accumulation dtype must be float32 or float64, got ", acc);
  Coefficients k = coefficients_of(mean, var, gamma, beta, eps, norm, channels, acc, op);
  return {k.scale, k.shift, k.mean, k.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_forward(
    const at::Tensor& t, const c10::optional<at::Tensor>& gamma,
    const c10::optional<at::Tensor>& beta, const c10::optional<at::Tensor>& mean_in,
    const c10::optional<at::Tensor>& var_in, double eps, int64_t norm, int64_t relu_mode,
    bool apply_norm) {
  const char* op = "bnorder_cpu::norm_forward";
  check_norm_code(norm, op);
  TORCH_CHECK(t.dim() >= 2, op, ": expected a tensor with a channel dimension, got ", t.dim(),
              "-D input");
  const bool batch_stats = norm != NORM_AFFINE && !(mean_in.has_value() && mean_in->defined());
  const auto acc = acc_of(t);
  at::Tensor mean, var;
  if (batch_stats) {
    // In float64: apply centers on the mean with all its digits, and the backward recomputes
    // the same pre-activation from the saved statistics.
    std::tie(mean, var) = stats(t, relu_mode, /*exact=*/true);
  }
  Coefficients k = batch_stats
      ? coefficients_of(mean, var, gamma, beta, eps, norm, t.size(1), acc, op)
      : coefficients_of(mean_in, var_in, gamma, beta, eps, norm, t.size(1), acc, op);
  at::Tensor out = apply_norm ? apply(t, k.mean, k.scale, k.shift, relu_mode) : t.new_empty({0});
  if (!batch_stats) {
    mean = at::empty({0}, t.options().dtype(at::kDouble));
    var = at::empty({0}, t.options().dtype(at::kDouble));
  }
  return {out, mean, var, k.scale, k.shift};
}

// dt is written into `into` where it is defined (g or t itself, buffers the caller owns),
// else into a new tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward_into(
    const at::Tensor& g, const at::Tensor& t, const c10::optional<at::Tensor>& mean,
    const c10::optional<at::Tensor>& var, const c10::optional<at::Tensor>& gamma,
    const c10::optional<at::Tensor>& beta, double eps, int64_t norm, int64_t relu_mode,
    bool batch_stats, bool input_grad, const at::Tensor& into) {
  const char* op = "bnorder_cpu::norm_backward";
  TORCH_CHECK(t.dim() >= 2, op, ": expected a tensor with a channel dimension, got ", t.dim(),
              "-D input");
  const int64_t C = t.size(1);
  const auto acc = acc_of(t);
  Coefficients k = coefficients_of(mean, var, gamma, beta, eps, norm, C, acc, op);
  auto [sum_g, sum_gt] = backward_reduce(g, t, k.mean, k.scale, k.shift, relu_mode);
  // dgamma = rstd·Σg'(t − mean); with batch statistics the mean and variance depend on t:
  // k2 = −s·rstd·dgamma/M, k3 = −s·Σg'/M; with fixed statistics k2 = k3 = 0.
  auto dgamma = at::empty({C}, sum_g.options());
  auto k2 = at::zeros({C}, sum_g.options());
  auto k3 = at::zeros({C}, sum_g.options());
  const int64_t count = C > 0 ? t.numel() / C : 0;
  AT_DISPATCH_FLOATING_TYPES(acc, "bnorder_norm_backward", [&] {
    const scalar_t *s = k.scale.const_data_ptr<scalar_t>(), *r = k.rstd.const_data_ptr<scalar_t>(),
                   *sg = sum_g.const_data_ptr<scalar_t>(), *sgt = sum_gt.const_data_ptr<scalar_t>();
    scalar_t *dg = dgamma.mutable_data_ptr<scalar_t>(), *p2 = k2.mutable_data_ptr<scalar_t>(),
             *p3 = k3.mutable_data_ptr<scalar_t>();
    // In float64 and rounded once, for the reason given in coefficients_of: k2 and k3 are
    // per-channel factors of the whole channel's gradient.
    const double inv_m = count > 0 ? -1.0 / static_cast<double>(count) : 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const double dgamma_c = static_cast<double>(sgt[c]) * static_cast<double>(r[c]);
      dg[c] = static_cast<scalar_t>(dgamma_c);
      if (batch_stats) {
        p2[c] = static_cast<scalar_t>(static_cast<double>(s[c]) * r[c] * dgamma_c * inv_m);
        p3[c] = static_cast<scalar_t>(static_cast<double>(s[c]) * sg[c] * inv_m);
      }
    }
  });
  at::Tensor dt = t.new_empty({0});
  if (input_grad && into.defined()) {
    dt = into;
    backward_apply_into(g, t, k.mean, k.scale, k.shift, k.scale, k2, k3, relu_mode, dt);
  } else if (input_grad) {
    dt = backward_apply(g, t, k.mean, k.scale, k.shift, k.scale, k2, k3, relu_mode);
  }
  return {dt, dgamma, sum_g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward(
    const at::Tensor& g, const at::Tensor& t, const c10::optional<at::Tensor>& mean,
    const c10::optional<at::Tensor>& var, const c10::optional<at::Tensor>& gamma,
    const c10::optional<at::Tensor>& beta, double eps, int64_t norm, int64_t relu_mode,
    bool batch_stats, bool input_grad) {
  return norm_backward_into(g, t, mean, var, gamma, beta, eps, norm, relu_mode, batch_stats,
                            input_grad, /*into=*/at::Tensor());
}

at::Tensor affine_shift(const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift) {
  const char* op = "bnorder_cpu::affine_shift";
  const int64_t C = scale.numel();
  TORCH_CHECK(mean.numel() == C && shift.numel() == C, op,
              ": mean, scale and shift must have one value per channel, got ", mean.sizes(),
              ", ", scale.sizes(), ", ", shift.sizes());
  // In float64 from the scale as rounded, then rounded once.
  const at::Tensor m = mean.to(at::kDouble), s = scale.to(at::kDouble), b = shift.to(at::kDouble);
  return (b - m * s).to(scale.scalar_type());
}

void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var,
                          const at::Tensor& mean, const at::Tensor& var, int64_t count,
                          double momentum) {
  const char* op = "bnorder_cpu::update_running_stats";
  const int64_t C = running_mean.numel();
  for (const at::Tensor* t : {static_cast<const at::Tensor*>(&running_mean),
                              static_cast<const at::Tensor*>(&running_var), &mean, &var}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 1 && t->size(0) == C && t->is_contiguous(),
                op, ": expected contiguous CPU vectors of ", C, " values, got size ", t->sizes());
  }
  TORCH_CHECK(running_var.scalar_type() == running_mean.scalar_type() &&
                  var.scalar_type() == mean.scalar_type(),
              op, ": running_mean/running_var and mean/var must share a dtype");
  TORCH_CHECK(count > 1, op, ": the unbiased variance needs more than one value per channel");
  // nn.BatchNorm2d: r ← r + momentum·(batch − r), with the unbiased batch variance.
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running_mean.scalar_type(),
                                  "bnorder_update_running_stats", [&] {
    using running_t = scalar_t;
    running_t* rm = running_mean.mutable_data_ptr<running_t>();
    running_t* rv = running_var.mutable_data_ptr<running_t>();
    AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bnorder_update_running_stats_batch", [&] {
      const scalar_t* m = mean.const_data_ptr<scalar_t>();
      const scalar_t* v = var.const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        const double r_m = static_cast<double>(rm[c]), r_v = static_cast<double>(rv[c]);
        rm[c] = static_cast<running_t>(r_m + momentum * (static_cast<double>(m[c]) - r_m));
        rv[c] = static_cast<running_t>(
            r_v + momentum * (static_cast<double>(v[c]) * unbias - r_v));
      }
    });
  });
}

}  // namespace bnorder
