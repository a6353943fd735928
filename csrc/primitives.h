// The four batch-norm primitives on the CPU (DESIGN §4), shared by every order:
//
//   stats            t            -> mean_c, var_c                    one read
//   apply            t            -> act((t_in − mean_c)·s_c + b_c)          one read, one write
//   backward_reduce  g, t         -> Σg', Σg'·(t_in − mean_c)         one read of each
//   backward_apply   g, t         -> mask·(g'·k1 + (t_in − mean)·k2 + k3)   one read of each, one write
//
// relu_mode: 0 none, 1 ReLU after the norm (g' = g·[(t − mean)·s + b > 0], computed as the
// forward computes it), 2 ReLU before the norm (t_in = relu(t), dt masked by t > 0).
//
// The mean is float64 or the accumulation dtype; the passes center on it as hi + lo, two
// values of the accumulation dtype, so that a float64 mean keeps its digits on data far from
// zero (fused/_norm.py: why the norm is applied centered).
//
// Two layouts, each with loops the compiler vectorizes:
//   NCHW (contiguous):        a channel is N planes of S = H·W contiguous values
//   NHWC (channels_last, and 2-D (N, C)): M = N·H·W rows of C contiguous channels
//
// Variance is computed without E[t²] − E[t]²: each plane (NCHW) or block of rows (NHWC) is
// read once for Σ(t − k) and Σ(t − k)², k being the thread's running mean of the channel (the
// thread's first plane or block of a channel has none and is read twice, its own mean being
// k), and the blocks are merged with Chan's formula in double precision. With k near the mean
// nothing cancels: data with mean 1e4 and std 1 is as exact as the eager two-pass result.
#pragma once

#include <torch/extension.h>

namespace bnorder {

constexpr int64_t RELU_NONE = 0, RELU_AFTER = 1, RELU_BEFORE = 2;

// channels_last and not also contiguous (a tensor with C == 1 or H·W == 1 can be both; it
// counts as contiguous).
inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::MemoryFormat format_of(const at::Tensor& t) {
  return is_channels_last(t) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// exact: float64 results whatever the activation dtype.
std::tuple<at::Tensor, at::Tensor> stats(const at::Tensor& t, int64_t relu_mode, bool exact = false);

at::Tensor apply(const at::Tensor& t, const at::Tensor& mean, const at::Tensor& scale,
                 const at::Tensor& shift, int64_t relu_mode);

std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& g, const at::Tensor& t,
                                                   const at::Tensor& mean,
                                                   const at::Tensor& scale,
                                                   const at::Tensor& shift, int64_t relu_mode);

at::Tensor backward_apply(const at::Tensor& g, const at::Tensor& t, const at::Tensor& mean,
                          const at::Tensor& scale, const at::Tensor& shift,
                          const at::Tensor& k1, const at::Tensor& k2, const at::Tensor& k3,
                          int64_t relu_mode);

// backward_apply writing into dx, which may be g itself: the units' C++ autograd nodes
// (unit.cpp) overwrite a gradient they own instead of allocating and filling a new one.
void backward_apply_into(const at::Tensor& g, const at::Tensor& t, const at::Tensor& mean,
                         const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& k1,
                         const at::Tensor& k2, const at::Tensor& k3, int64_t relu_mode,
                         at::Tensor& dx);

// bn-conv-relu's passes around its folded convolution (border.cpp). add_map_relu_ writes
// over z (a convolution output the caller owns).
at::Tensor add_map_relu(const at::Tensor& z, const at::Tensor& map, bool apply_relu);
void add_map_relu_(at::Tensor& z, const at::Tensor& map, bool apply_relu);

std::tuple<at::Tensor, at::Tensor> relu_grad_batch_sum(const at::Tensor& g, const at::Tensor& out);
// Σ_n g, (1, C, H, W) in g's layout: relu_grad_batch_sum's sum where there is no ReLU.
at::Tensor batch_sum(const at::Tensor& g);

// The norm around the primitives, one call per direction (norm.cpp). Batch statistics
// (norm_forward's mean and var) and the coefficients' mean are float64.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> coefficients(
    const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& var,
    const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& beta, double eps,
    int64_t norm, int64_t channels, at::ScalarType acc);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_forward(
    const at::Tensor& t, const c10::optional<at::Tensor>& gamma,
    const c10::optional<at::Tensor>& beta, const c10::optional<at::Tensor>& mean_in,
    const c10::optional<at::Tensor>& var_in, double eps, int64_t norm, int64_t relu_mode,
    bool apply_norm);

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward(
    const at::Tensor& g, const at::Tensor& t, const c10::optional<at::Tensor>& mean,
    const c10::optional<at::Tensor>& var, const c10::optional<at::Tensor>& gamma,
    const c10::optional<at::Tensor>& beta, double eps, int64_t norm, int64_t relu_mode,
    bool batch_stats, bool input_grad);

// norm_backward with dt written into `into`: g or t itself, a buffer the caller owns and no
// longer needs (unit.cpp), or undefined for a new tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward_into(
    const at::Tensor& g, const at::Tensor& t, const c10::optional<at::Tensor>& mean,
    const c10::optional<at::Tensor>& var, const c10::optional<at::Tensor>& gamma,
    const c10::optional<at::Tensor>& beta, double eps, int64_t norm, int64_t relu_mode,
    bool batch_stats, bool input_grad, const at::Tensor& into);

// b_c = shift_c − mean_c·s_c: the norm as t·s_c + b_c, for the folds (norm.cpp).
at::Tensor affine_shift(const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift);

// bn-conv-relu's weight-side algebra around its folded convolution (fold.cpp).
std::tuple<at::Tensor, at::Tensor> fold_forward(const at::Tensor& weight, const at::Tensor& scale,
                                                const at::Tensor& shift, at::IntArrayRef in_hw,
                                                at::IntArrayRef out_hw, at::IntArrayRef stride,
                                                at::IntArrayRef padding,
                                                at::IntArrayRef dilation, int64_t groups);

at::Tensor fold_backward(const at::Tensor& weight, const at::Tensor& wgrad,
                         const at::Tensor& grad_sum, const at::Tensor& scale,
                         const at::Tensor& shift, at::IntArrayRef in_hw, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// conv -> norm with batch statistics as one C++ autograd node (unit.cpp): [out, mean, var].
std::vector<at::Tensor> conv_norm_train(const at::Tensor& x, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias,
                                        const c10::optional<at::Tensor>& gamma,
                                        const c10::optional<at::Tensor>& beta,
                                        std::vector<int64_t> stride, std::vector<int64_t> padding,
                                        std::vector<int64_t> dilation, int64_t groups, double eps,
                                        int64_t norm, int64_t relu_mode);

// bn-conv-relu with batch statistics as one C++ autograd node (unit.cpp): [out, mean, var].
std::vector<at::Tensor> norm_conv_train(const at::Tensor& x, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias,
                                        const c10::optional<at::Tensor>& gamma,
                                        const c10::optional<at::Tensor>& beta,
                                        std::vector<int64_t> stride, std::vector<int64_t> padding,
                                        std::vector<int64_t> dilation, int64_t groups, double eps,
                                        int64_t norm, bool relu, double fold_limit);

bool fold_exact(const at::Tensor& mean, const at::Tensor& var, double eps, double limit);

void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var,
                          const at::Tensor& mean, const at::Tensor& var, int64_t count,
                          double momentum);

}  // namespace bnorder
