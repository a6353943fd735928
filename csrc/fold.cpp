// bn-conv-relu's weight-side algebra around its folded convolution, one call per direction
// (fused/bn_conv_relu.py has the math; fused/_conv.py the same steps in torch ops for the
// other backends):
//
//   fold_forward(W, s, b)      -> W·s_c (each weight scaled by the scale of the input channel
//                                 it reads) and the border map conv(B, W), B = b_c inside the
//                                 image, zero padding:
//                                 map[o, i, j] = Σ_{k,l} v[o, k, l]·in_h(i, k)·in_w(j, l),
//                                 v[o, k, l] = Σ_c W[o, c, k, l]·b_c
//   fold_backward(W, G, Σ_n g) -> dW = s_c·G + b_c·u[o, k, l],
//                                 u[o, k, l] = Σ_{i,j} Σ_n g[o, i, j]·in_h(i, k)·in_w(j, l)
//
//   fold_exact(mean, var)     -> whether |mean_c|·rstd_c <= limit for every channel: the
//                                 fold is then as accurate as applying the norm (see
//                                 bn_conv_relu.py); one call, where the torch test was six.
//
// in_h(i, k) = 1 when tap k of output row i reads inside the image (0 <= i·stride − pad +
// k·dilation < H), likewise in_w. All of it is weight-sized: in torch ops it was ~40 tensor
// calls per unit and step, as much time as a pass over a small layer's activation.
#include "primitives.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

namespace bnorder {
namespace {

// inside[i·k_size + k] for one axis.
std::vector<char> inside_axis(int64_t in, int64_t out, int64_t k_size, int64_t stride,
                              int64_t padding, int64_t dilation) {
  std::vector<char> inside(out * k_size);
  for (int64_t i = 0; i < out; ++i)
    for (int64_t k = 0; k < k_size; ++k) {
      const int64_t pos = i * stride - padding + k * dilation;
      inside[i * k_size + k] = pos >= 0 && pos < in;
    }
  return inside;
}

// For each tap k of one axis, the output positions i whose tap k reads the padding (not
// inside_axis): at most a few per tap for the usual paddings.
std::vector<std::vector<int64_t>> outside_axis(int64_t in, int64_t out, int64_t k_size,
                                               int64_t stride, int64_t padding,
                                               int64_t dilation) {
  std::vector<std::vector<int64_t>> outside(k_size);
  for (int64_t i = 0; i < out; ++i)
    for (int64_t k = 0; k < k_size; ++k) {
      const int64_t pos = i * stride - padding + k * dilation;
      if (pos < 0 || pos >= in) outside[k].push_back(i);
    }
  return outside;
}

// The weight's layout: (O, Cg, KH, KW) contiguous, or channels_last, where each tap holds
// the Cg input channels side by side. Both are read as they are and the outputs come in the
// same layout: a channels_last network's weights, scaled weights and weight gradients are
// never converted (those copies took longer than the fold itself).
struct FoldGeometry {
  int64_t O, Cg, KH, KW, groups, out_per_group;
  bool channels_inner;
  int64_t taps() const { return KH * KW; }
  // First input channel of output channel o's group.
  int64_t group_base(int64_t o) const { return (o / out_per_group) * Cg; }
  // Offset of weight (o, c, tap t), tap t = kh·KW + kw.
  int64_t offset(int64_t o, int64_t c, int64_t t) const {
    return channels_inner ? (o * taps() + t) * Cg + c : (o * Cg + c) * taps() + t;
  }
};

// The weight in a layout the kernels read: its own if contiguous or channels_last.
at::Tensor dense_weight(const at::Tensor& w) {
  return (w.is_contiguous() || is_channels_last(w)) ? w : w.contiguous();
}

FoldGeometry check_fold(const at::Tensor& weight, const at::Tensor& scale,
                        const at::Tensor& shift, int64_t groups, const char* op) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 4, op,
              ": expected a 4-D CPU conv weight, got ", weight.sizes(), " on ", weight.device());
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble, op,
              ": the fold is for float32/float64 weights, got ", weight.scalar_type());
  TORCH_CHECK(groups >= 1 && weight.size(0) % groups == 0, op, ": bad groups=", groups,
              " for weight ", weight.sizes());
  const int64_t C = weight.size(1) * groups;
  for (const at::Tensor* v : {&scale, &shift}) {
    TORCH_CHECK(v->dim() == 1 && v->size(0) == C && v->scalar_type() == weight.scalar_type() &&
                    v->is_contiguous(),
                op, ": scale and shift must be contiguous (", C, ",) ", weight.scalar_type(),
                " vectors, got ", v->sizes(), " ", v->scalar_type());
  }
  return {weight.size(0), weight.size(1), weight.size(2), weight.size(3), groups,
          weight.size(0) / groups, is_channels_last(weight)};
}

// Strides of a (1, O, H, W) image, either layout.
struct ImageStrides {
  int64_t o, i, j;
  explicit ImageStrides(const at::Tensor& t) : o(t.stride(1)), i(t.stride(2)), j(t.stride(3)) {}
  int64_t at(int64_t oc, int64_t row, int64_t col) const { return oc * o + row * i + col * j; }
};

// Output channel o's scaled weights and the border taps v[t] = Σ_c W[o, c, t]·b_c.
template <typename scalar_t>
void scale_weights(const FoldGeometry& g, int64_t o, const scalar_t* w, const scalar_t* s,
                   const scalar_t* b, scalar_t* ws, scalar_t* v) {
  const scalar_t* sg = s + g.group_base(o);
  const scalar_t* bg = b + g.group_base(o);
  if (g.channels_inner) {  // each tap's channels are contiguous: vectorize over them
    for (int64_t t = 0; t < g.taps(); ++t) {
      const scalar_t* __restrict__ wp = w + g.offset(o, 0, t);
      scalar_t* __restrict__ wsp = ws + g.offset(o, 0, t);
      scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < g.Cg; ++c) {
        wsp[c] = wp[c] * sg[c];
        acc += wp[c] * bg[c];
      }
      v[t] = acc;
    }
    return;
  }
  std::fill(v, v + g.taps(), scalar_t(0));
  for (int64_t c = 0; c < g.Cg; ++c) {
    const scalar_t* __restrict__ wp = w + g.offset(o, c, 0);
    scalar_t* __restrict__ wsp = ws + g.offset(o, c, 0);
    for (int64_t t = 0; t < g.taps(); ++t) {
      wsp[t] = wp[t] * sg[c];
      v[t] += wp[t] * bg[c];
    }
  }
}

// Output channel o's rows of dW = s_c·G + b_c·u[t].
template <typename scalar_t>
void weight_grads(const FoldGeometry& g, int64_t o, const scalar_t* G, const scalar_t* s,
                  const scalar_t* b, const double* u, scalar_t* dw) {
  const scalar_t* sg = s + g.group_base(o);
  const scalar_t* bg = b + g.group_base(o);
  if (g.channels_inner) {
    for (int64_t t = 0; t < g.taps(); ++t) {
      const int64_t base = g.offset(o, 0, t);
      const scalar_t* __restrict__ gp = G + base;
      scalar_t* __restrict__ dwp = dw + base;
      const double ut = u[t];
#pragma omp simd
      for (int64_t c = 0; c < g.Cg; ++c) {
        dwp[c] = static_cast<scalar_t>(static_cast<double>(gp[c]) * static_cast<double>(sg[c]) +
                                       static_cast<double>(bg[c]) * ut);
      }
    }
    return;
  }
  for (int64_t c = 0; c < g.Cg; ++c) {
    const int64_t base = g.offset(o, c, 0);
    const double sc = sg[c], bc = bg[c];
    for (int64_t t = 0; t < g.taps(); ++t) {
      dw[base + t] = static_cast<scalar_t>(static_cast<double>(G[base + t]) * sc + bc * u[t]);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fold_forward(const at::Tensor& weight_in,
                                                const at::Tensor& scale,
                                                const at::Tensor& shift, at::IntArrayRef in_hw,
                                                at::IntArrayRef out_hw, at::IntArrayRef stride,
                                                at::IntArrayRef padding,
                                                at::IntArrayRef dilation, int64_t groups) {
  const char* op = "bnorder_cpu::fold_forward";
  const at::Tensor weight = dense_weight(weight_in);
  const FoldGeometry g = check_fold(weight, scale, shift, groups, op);
  TORCH_CHECK(in_hw.size() == 2 && out_hw.size() == 2 && stride.size() == 2 &&
                  padding.size() == 2 && dilation.size() == 2,
              op, ": in_hw, out_hw, stride, padding and dilation must be pairs");
  const int64_t HO = out_hw[0], WO = out_hw[1];
  const auto in_h = inside_axis(in_hw[0], HO, g.KH, stride[0], padding[0], dilation[0]);
  const auto in_w = inside_axis(in_hw[1], WO, g.KW, stride[1], padding[1], dilation[1]);
  // Both outputs in the weight's layout: a channels_last network convolves channels_last.
  auto scaled = at::empty_like(weight);
  auto map = at::empty({1, g.O, HO, WO}, weight.options(), format_of(weight));
  const ImageStrides ms(map);
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "bnorder_fold_forward", [&] {
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    const scalar_t* s = scale.const_data_ptr<scalar_t>();
    const scalar_t* b = shift.const_data_ptr<scalar_t>();
    scalar_t* ws = scaled.mutable_data_ptr<scalar_t>();
    scalar_t* m = map.mutable_data_ptr<scalar_t>();
    // Output channels are independent: split them over the threads (wide layers have
    // millions of weights).
    at::parallel_for(0, g.O, 16, [&](int64_t o0, int64_t o1) {
    std::vector<scalar_t> v_buffer(g.taps()), rows(g.KH * WO), image(WO);
    scalar_t* __restrict__ v = v_buffer.data();
    for (int64_t o = o0; o < o1; ++o) {
      scale_weights(g, o, w, s, b, ws, v);
      // Separably: rows[k, j] = Σ_l v[k, l]·in_w(j, l), then map[i, j] = Σ_k in_h(i, k)·rows[k, j].
      for (int64_t k = 0; k < g.KH; ++k)
        for (int64_t j = 0; j < WO; ++j) {
          scalar_t acc = 0;
          for (int64_t l = 0; l < g.KW; ++l)
            if (in_w[j * g.KW + l]) acc += v[k * g.KW + l];
          rows[k * WO + j] = acc;
        }
      for (int64_t i = 0; i < HO; ++i) {
        std::fill(image.begin(), image.end(), scalar_t(0));
        for (int64_t k = 0; k < g.KH; ++k) {
          if (!in_h[i * g.KH + k]) continue;
          const scalar_t* r = &rows[k * WO];
          for (int64_t j = 0; j < WO; ++j) image[j] += r[j];
        }
        for (int64_t j = 0; j < WO; ++j) m[ms.at(o, i, j)] = image[j];
      }
    }
    });
  });
  return {scaled, map};
}

at::Tensor fold_backward(
    const at::Tensor& weight_in, const at::Tensor& wgrad_in, const at::Tensor& grad_sum,
    const at::Tensor& scale, const at::Tensor& shift, at::IntArrayRef in_hw,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "bnorder_cpu::fold_backward";
  const at::Tensor weight = dense_weight(weight_in);
  const FoldGeometry g = check_fold(weight, scale, shift, groups, op);
  TORCH_CHECK(wgrad_in.sizes() == weight.sizes() && wgrad_in.scalar_type() == weight.scalar_type(),
              op, ": the weight gradient must match the weight, got ", wgrad_in.sizes(), " ",
              wgrad_in.scalar_type());
  TORCH_CHECK(grad_sum.dim() == 4 && grad_sum.size(0) == 1 && grad_sum.size(1) == g.O &&
                  grad_sum.scalar_type() == weight.scalar_type() && grad_sum.device().is_cpu(),
              op, ": grad_sum must be a (1, ", g.O, ", H_out, W_out) ", weight.scalar_type(),
              " CPU tensor, got ", grad_sum.sizes(), " ", grad_sum.scalar_type());
  TORCH_CHECK(in_hw.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2,
              op, ": in_hw, stride, padding and dilation must be pairs");
  // The weight gradient is read in the weight's layout; grad_sum through its strides.
  const at::Tensor wgrad = wgrad_in.contiguous(format_of(weight));
  const ImageStrides gst(grad_sum);
  const int64_t HO = grad_sum.size(2), WO = grad_sum.size(3);
  const auto outside_h = outside_axis(in_hw[0], HO, g.KH, stride[0], padding[0], dilation[0]);
  const auto outside_w = outside_axis(in_hw[1], WO, g.KW, stride[1], padding[1], dilation[1]);
  auto dweight = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "bnorder_fold_backward", [&] {
    const scalar_t *G = wgrad.const_data_ptr<scalar_t>(), *gs = grad_sum.const_data_ptr<scalar_t>(),
                   *s = scale.const_data_ptr<scalar_t>(), *b = shift.const_data_ptr<scalar_t>();
    scalar_t* dw = dweight.mutable_data_ptr<scalar_t>();
    const int64_t taps = g.taps();
    // Per output channel (independent, split over the threads): its taps u and its rows of dW.
    at::parallel_for(0, g.O, 16, [&](int64_t o0, int64_t o1) {
      std::vector<double> cols(HO * g.KW), u(taps);
      for (int64_t o = o0; o < o1; ++o) {
        // cols[i, l] = Σ_j g[i, j]·in_w(j, l), then u[k, l] = Σ_i in_h(i, k)·cols[i, l]:
        // each as the full row (column) sum minus the few pixels whose tap falls in the
        // padding, so that the image is read once rather than once per tap.
        for (int64_t i = 0; i < HO; ++i) {
          double total = 0;
          for (int64_t j = 0; j < WO; ++j) total += static_cast<double>(gs[gst.at(o, i, j)]);
          for (int64_t l = 0; l < g.KW; ++l) {
            double acc = total;
            for (const int64_t j : outside_w[l]) acc -= static_cast<double>(gs[gst.at(o, i, j)]);
            cols[i * g.KW + l] = acc;
          }
        }
        for (int64_t l = 0; l < g.KW; ++l) {
          double total = 0;
          for (int64_t i = 0; i < HO; ++i) total += cols[i * g.KW + l];
          for (int64_t k = 0; k < g.KH; ++k) {
            double acc = total;
            for (const int64_t i : outside_h[k]) acc -= cols[i * g.KW + l];
            u[k * g.KW + l] = acc;
          }
        }
        weight_grads(g, o, G, s, b, u.data(), dw);
      }
    });
  });
  return dweight;
}

bool fold_exact(const at::Tensor& mean, const at::Tensor& var, double eps, double limit) {
  const char* op = "bnorder_cpu::fold_exact";
  TORCH_CHECK(mean.device().is_cpu() && var.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(mean.dim() == 1 && var.sizes() == mean.sizes(), op,
              ": mean and var must be vectors of one size, got ", mean.sizes(), " and ",
              var.sizes());
  const at::Tensor m = mean.to(at::kDouble).contiguous(), v = var.to(at::kDouble).contiguous();
  const double *mp = m.const_data_ptr<double>(), *vp = v.const_data_ptr<double>();
  const double limit2 = limit * limit;
  for (int64_t c = 0; c < m.numel(); ++c) {
    // Written so that a NaN mean or variance fails the test (the fold is then not used).
    if (!(mp[c] * mp[c] <= (vp[c] + eps) * limit2)) return false;
  }
  return true;
}

}  // namespace bnorder
