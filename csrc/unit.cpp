// The units' training steps with batch statistics as one C++ autograd node each, for eager
// calls on the C++ backend: the same compositions as the Python ops, step for step.
//
// ConvNormTrain, conv-bn-relu and conv-relu-bn (_conv_then_norm's batch-statistics branch):
//
//   forward    y = conv(x, W, bias);  out, mean, var = norm_forward(y)       (norm.cpp)
//   backward   dy, dgamma, dbeta = norm_backward(g, y);  dx, dW, dbias = conv_backward(dy)
//
// NormConvTrain, bn-conv-relu (bn_conv_relu.py has the math): stats of x, then the fold
//
//   forward    W·s and the border map (fold_forward), z = conv(x, W·s) + map, ReLU
//   backward   g_z and Σ_n g_z, conv_backward(g_z, x, W) -> dn and G, fold_backward (dW from
//              G), norm_backward(dn, x)
//
// or, where the fold is not exact (|mean|·rstd > limit) or the weight outweighs the
// activation, the norm applied explicitly and recomputed in backward. Both save what
// DESIGN §2 lists. What they remove is Python: the autograd.Function's call and backward
// node and the wrappers around the C++ calls, ~0.1 ms per unit and step, which weighs most
// at small batches. torch.compile, synchronized BN, fixed statistics, the affine norm,
// 16-bit activations and the other backends keep the Python ops.
#include "primitives.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/graph_task.h>

namespace bnorder {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

c10::optional<at::Tensor> present(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// needs_input_grad counts the tensor inputs that are present: x 0, weight 1, then bias,
// gamma and beta in that order where given (-1: absent).
void save_edges(AutogradContext* ctx, const c10::optional<at::Tensor>& bias,
                const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& beta) {
  int64_t edge = 2;
  for (const auto& [name, t] : {std::pair<const char*, const c10::optional<at::Tensor>*>{
                                    "bias_edge", &bias},
                                {"gamma_edge", &gamma}, {"beta_edge", &beta}})
    ctx->saved_data[name] = (t->has_value() && (*t)->defined()) ? edge++ : int64_t(-1);
}

bool needs(AutogradContext* ctx, const char* edge_name) {
  const int64_t edge = ctx->saved_data[edge_name].toInt();
  return edge >= 0 && ctx->needs_input_grad(edge);
}

// F.conv2d's output height and width.
std::vector<int64_t> conv_output_hw(const at::Tensor& x, const at::Tensor& weight,
                                    const std::vector<int64_t>& stride,
                                    const std::vector<int64_t>& padding,
                                    const std::vector<int64_t>& dilation) {
  std::vector<int64_t> hw(2);
  for (int i = 0; i < 2; ++i)
    hw[i] = (x.size(2 + i) + 2 * padding[i] - dilation[i] * (weight.size(2 + i) - 1) - 1) /
                stride[i] + 1;
  return hw;
}

// What both nodes keep besides tensors: the convolution's geometry, eps, the norm, and which
// of the optional tensor inputs are present (save_edges).
struct UnitArgs {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
  double eps;
  int64_t norm;

  void save(AutogradContext* ctx, const c10::optional<at::Tensor>& bias,
            const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& beta) const {
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["norm"] = norm;
    save_edges(ctx, bias, gamma, beta);
  }

  static UnitArgs load(AutogradContext* ctx) {
    return {ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
            ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["groups"].toInt(),
            ctx->saved_data["eps"].toDouble(), ctx->saved_data["norm"].toInt()};
  }

  // (d input, d weight, d bias) of conv(input, weight) for gradient g; entries not in mask
  // are undefined.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward(
      AutogradContext* ctx, const at::Tensor& g, const at::Tensor& input,
      const at::Tensor& weight, std::array<bool, 3> mask) const {
    const bool has_bias = ctx->saved_data["bias_edge"].toInt() >= 0;
    std::vector<int64_t> bias_sizes = {weight.size(0)};
    return at::convolution_backward(
        g, input, weight, has_bias ? c10::optional<at::IntArrayRef>(bias_sizes) : c10::nullopt,
        stride, padding, dilation, /*transposed=*/false, {0, 0}, groups, mask);
  }
};

// gamma's and beta's gradients, where asked for, in the parameters' own dtype (the norm
// computes them in float32, float64 for float64 data).
void set_param_grads(AutogradContext* ctx, variable_list& result, const at::Tensor& dgamma,
                     const at::Tensor& dbeta, const at::Tensor& gamma, const at::Tensor& beta) {
  if (needs(ctx, "gamma_edge")) result[3] = dgamma.to(gamma.scalar_type());
  if (needs(ctx, "beta_edge")) result[4] = dbeta.to(beta.scalar_type());
}

struct ConvNormTrain : public torch::autograd::Function<ConvNormTrain> {
  // Inputs 0-4 are tensors (bias, gamma, beta optional); the rest configure.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias,
                               const c10::optional<at::Tensor>& gamma,
                               const c10::optional<at::Tensor>& beta, std::vector<int64_t> stride,
                               std::vector<int64_t> padding, std::vector<int64_t> dilation,
                               int64_t groups, double eps, int64_t norm, int64_t relu_mode) {
    const at::Tensor y = at::convolution(x, weight, bias, stride, padding, dilation,
                                         /*transposed=*/false, {0, 0}, groups);
    auto [out, mean, var, scale, shift] = norm_forward(y, gamma, beta, c10::nullopt,
                                                       c10::nullopt, eps, norm, relu_mode,
                                                       /*apply_norm=*/true);
    ctx->save_for_backward({x, weight, y, mean, var, gamma.value_or(at::Tensor()),
                            beta.value_or(at::Tensor())});
    UnitArgs{stride, padding, dilation, groups, eps, norm}.save(ctx, bias, gamma, beta);
    ctx->saved_data["relu_mode"] = relu_mode;
    ctx->mark_non_differentiable({mean, var});
    return {out, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(12);
    at::Tensor g = grads[0];
    if (!g.defined()) return result;  // only the statistics were used downstream
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &y = saved[2], &mean = saved[3],
                     &var = saved[4], &gamma = saved[5], &beta = saved[6];
    const UnitArgs args = UnitArgs::load(ctx);
    // The primitives read g in y's layout.
    g = g.contiguous(format_of(y));
    // y, the convolution output this node saved, is read for the last time here: unless the
    // graph is kept for another backward, dy is written over it rather than into a new
    // activation-sized tensor (g is the caller's and may be shared, e.g. by a residual sum).
    const bool y_is_last_use = !torch::autograd::get_current_graph_task_keep_graph();
    auto [dy, dgamma, dbeta] = norm_backward_into(
        g, y, mean, var, present(gamma), present(beta), args.eps, args.norm,
        ctx->saved_data["relu_mode"].toInt(), /*batch_stats=*/true, /*input_grad=*/true,
        /*into=*/y_is_last_use ? y : at::Tensor());
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      needs(ctx, "bias_edge")};
    if (mask[0] || mask[1] || mask[2])
      std::tie(result[0], result[1], result[2]) = args.conv_backward(ctx, dy, x, weight, mask);
    set_param_grads(ctx, result, dgamma, dbeta, gamma, beta);
    return result;
  }
};

struct NormConvTrain : public torch::autograd::Function<NormConvTrain> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias,
                               const c10::optional<at::Tensor>& gamma,
                               const c10::optional<at::Tensor>& beta, std::vector<int64_t> stride,
                               std::vector<int64_t> padding, std::vector<int64_t> dilation,
                               int64_t groups, double eps, int64_t norm, bool relu,
                               double fold_limit) {
    auto [unused, mean, var, scale, shift] = norm_forward(x, gamma, beta, c10::nullopt,
                                                          c10::nullopt, eps, norm, RELU_NONE,
                                                          /*apply_norm=*/false);
    const bool folds = weight.numel() <= x.numel() && fold_exact(mean, var, eps, fold_limit);
    at::Tensor z;
    if (folds) {
      const std::vector<int64_t> out_hw = conv_output_hw(x, weight, stride, padding, dilation);
      auto [scaled_weight, map] = fold_forward(
          weight, scale.to(weight.scalar_type()),
          affine_shift(mean, scale, shift).to(weight.scalar_type()),
          x.sizes().slice(2), out_hw, stride, padding, dilation, groups);
      z = at::convolution(x, scaled_weight, bias, stride, padding, dilation, false, {0, 0}, groups);
      add_map_relu_(z, map, relu);  // z is this node's own convolution output
    } else {
      z = at::convolution(bnorder::apply(x, mean, scale, shift, RELU_NONE), weight, bias, stride,
                          padding, dilation, false, {0, 0}, groups);
      if (relu) z.relu_();
    }
    ctx->save_for_backward({x, weight, relu ? z : at::Tensor(), mean, var, scale, shift,
                            gamma.value_or(at::Tensor()), beta.value_or(at::Tensor())});
    UnitArgs{stride, padding, dilation, groups, eps, norm}.save(ctx, bias, gamma, beta);
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["folds"] = folds;
    ctx->mark_non_differentiable({mean, var});
    return {z, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(13);
    at::Tensor grad = grads[0];
    if (!grad.defined()) return result;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &out = saved[2], &mean = saved[3],
                     &var = saved[4], &scale = saved[5], &shift = saved[6], &gamma = saved[7],
                     &beta = saved[8];
    const UnitArgs args = UnitArgs::load(ctx);
    const bool relu = ctx->saved_data["relu"].toBool(), folds = ctx->saved_data["folds"].toBool();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_b = needs(ctx, "bias_edge");
    // dn = ∂L/∂norm(x) feeds the norm's backward (backward_reduce for Σdn and Σdn·(x − mean),
    // backward_apply for dx) wherever x or the norm's parameters need a gradient.
    const bool need_dn = need_x || needs(ctx, "gamma_edge") || needs(ctx, "beta_edge");
    // Folded, the weight gradient is s·wgrad(x, g_z) plus the border term, from Σ_n g_z.
    const bool fold_wgrad = folds && need_w;
    at::Tensor g, g_batch_sum;
    if (relu && fold_wgrad) {
      std::tie(g, g_batch_sum) = relu_grad_batch_sum(grad.contiguous(format_of(out)), out);
    } else {
      g = relu ? at::threshold_backward(grad, out, 0) : grad;
    }
    const at::Tensor conv_input = folds ? x : bnorder::apply(x, mean, scale, shift, RELU_NONE);
    auto [dn, dweight, dbias] = args.conv_backward(ctx, g, conv_input, weight,
                                                   {need_dn, need_w, need_b});
    if (fold_wgrad) {
      if (!g_batch_sum.defined()) {  // no ReLU: the incoming gradient, any strides
        const bool dense = g.is_contiguous() || is_channels_last(g);
        g_batch_sum = batch_sum(dense ? g : g.contiguous(format_of(x)));
      }
      const auto wdtype = weight.scalar_type();
      dweight = fold_backward(weight, dweight, g_batch_sum, scale.to(wdtype),
                              affine_shift(mean, scale, shift).to(wdtype),
                              x.sizes().slice(2), args.stride, args.padding, args.dilation,
                              args.groups);
    }
    at::Tensor dx, dgamma, dbeta;
    if (need_dn) {
      // dn is this node's own: dx is written over it.
      const at::Tensor dn_in = dn.contiguous(format_of(x));
      std::tie(dx, dgamma, dbeta) = norm_backward_into(
          dn_in, x, mean, var, present(gamma), present(beta), args.eps, args.norm, RELU_NONE,
          /*batch_stats=*/true, need_x, /*into=*/dn_in);
    }
    if (need_x) result[0] = dx;
    if (need_w) result[1] = dweight;
    if (need_b) result[2] = dbias;
    set_param_grads(ctx, result, dgamma, dbeta, gamma, beta);
    return result;
  }
};

}  // namespace

std::vector<at::Tensor> norm_conv_train(const at::Tensor& x, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias,
                                        const c10::optional<at::Tensor>& gamma,
                                        const c10::optional<at::Tensor>& beta,
                                        std::vector<int64_t> stride, std::vector<int64_t> padding,
                                        std::vector<int64_t> dilation, int64_t groups, double eps,
                                        int64_t norm, bool relu, double fold_limit) {
  TORCH_CHECK(norm == 0 || norm == 1, "bnorder norm_conv_train: batch statistics need norm bn "
              "(0) or bn-minus (1), got ", norm);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "bnorder norm_conv_train: float32/float64 input, got ", x.scalar_type());
  return NormConvTrain::apply(x, weight, bias, gamma, beta, std::move(stride), std::move(padding),
                              std::move(dilation), groups, eps, norm, relu, fold_limit);
}

std::vector<at::Tensor> conv_norm_train(const at::Tensor& x, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias,
                                        const c10::optional<at::Tensor>& gamma,
                                        const c10::optional<at::Tensor>& beta,
                                        std::vector<int64_t> stride, std::vector<int64_t> padding,
                                        std::vector<int64_t> dilation, int64_t groups, double eps,
                                        int64_t norm, int64_t relu_mode) {
  TORCH_CHECK(norm == 0 || norm == 1, "bnorder conv_norm_train: batch statistics need norm bn "
              "(0) or bn-minus (1), got ", norm);
  return ConvNormTrain::apply(x, weight, bias, gamma, beta, std::move(stride), std::move(padding), std::move(dilation), groups,
                              eps, norm, relu_mode);
}

}  // namespace bnorder
