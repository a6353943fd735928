// conv -> norm with batch statistics (conv-bn-relu and conv-relu-bn in training) as one
// C++ autograd node, for eager calls on the C++ backend.
//
// The composition is _conv_then_norm's batch-statistics branch, step for step:
//
//   forward    y = conv(x, W, bias);  out, mean, var = norm_forward(y)       (norm.cpp)
//   backward   dy, dgamma, dbeta = norm_backward(g, y);  dx, dW, dbias = conv_backward(dy)
//
// saving x, W, y and the statistics, as DESIGN §2 lists. What it removes is Python: the
// autograd.Function's call and backward node, and the wrappers around the two C++ calls per
// direction, ~0.1 ms per unit and step, which weighs most at small batches. torch.compile,
// synchronized BN, fixed statistics, the affine norm and the other backends keep the Python
// op, which composes the same calls (fused/_conv_then_norm.py).
#include "primitives.h"

#include <torch/csrc/autograd/custom_function.h>

namespace bnorder {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

c10::optional<at::Tensor> present(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
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
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["norm"] = norm;
    ctx->saved_data["relu_mode"] = relu_mode;
    // needs_input_grad counts the tensor inputs that are present: x 0, weight 1, then bias,
    // gamma and beta in that order where given (-1: absent).
    int64_t edge = 2;
    for (const auto& [name, t] : {std::pair<const char*, const c10::optional<at::Tensor>*>{
                                      "bias_edge", &bias},
                                  {"gamma_edge", &gamma}, {"beta_edge", &beta}})
      ctx->saved_data[name] = (t->has_value() && (*t)->defined()) ? edge++ : int64_t(-1);
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
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const auto needs = [&](const char* edge_name) {
      const int64_t edge = ctx->saved_data[edge_name].toInt();
      return edge >= 0 && ctx->needs_input_grad(edge);
    };
    const bool has_bias = ctx->saved_data["bias_edge"].toInt() >= 0;
    // The primitives read g in y's layout.
    g = g.contiguous(y.is_contiguous() ? at::MemoryFormat::Contiguous
                                       : at::MemoryFormat::ChannelsLast);
    auto [dy, dgamma, dbeta] = norm_backward(
        g, y, mean, var, present(gamma), present(beta), ctx->saved_data["eps"].toDouble(),
        ctx->saved_data["norm"].toInt(), ctx->saved_data["relu_mode"].toInt(),
        /*batch_stats=*/true, /*input_grad=*/true, c10::nullopt, c10::nullopt);
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      needs("bias_edge")};
    if (mask[0] || mask[1] || mask[2]) {
      std::vector<int64_t> bias_sizes = {weight.size(0)};
      auto [dx, dweight, dbias] = at::convolution_backward(
          dy, x, weight, has_bias ? c10::optional<at::IntArrayRef>(bias_sizes) : c10::nullopt,
          stride, padding, dilation, /*transposed=*/false, {0, 0}, groups, mask);
      result[0] = mask[0] ? dx : at::Tensor();
      result[1] = mask[1] ? dweight : at::Tensor();
      result[2] = mask[2] ? dbias : at::Tensor();
    }
    // dgamma / dbeta are float32 (float64 for float64 data); the parameters' own dtype back.
    if (needs("gamma_edge")) result[3] = dgamma.to(gamma.scalar_type());
    if (needs("beta_edge")) result[4] = dbeta.to(beta.scalar_type());
    return result;
  }
};

}  // namespace

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
