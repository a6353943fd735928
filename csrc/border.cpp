// The two passes bn-conv-relu needs around its folded convolution (fused/bn_conv_relu.py):
//
//   add_map_relu(z, map, relu)        out = relu(z + map), map one image (1, C, H, W)
//                                     broadcast over the batch: the border map conv(B, W)
//                                     added in the same pass as the ReLU, one read, one write.
//   relu_grad_batch_sum(g, out, relu) g_z = g·[out > 0] and Σ_n g_z (the 1-image gradient
//                                     that the border map's weight gradient needs), one read
//                                     of g and out, one write, instead of a mask pass plus a
//                                     reduction pass.
//
//   add_map_relu_(z, map, relu)       the same over z itself (the C++ node's own conv output)
//   batch_sum(g)                      Σ_n g alone, where the unit has no ReLU
//
// All take NCHW-contiguous or channels_last tensors, with `map` / the sum in the same layout.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include "primitives.h"

#include <algorithm>
#include <vector>

namespace bnorder {
namespace {

void check_activation(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got ", t.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be floating-point, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast), op, ": ",
              name, " must be contiguous or channels_last, got strides ", t.strides());
}

template <typename T>
inline T relu(T v) { return v < T(0) ? T(0) : v; }

// (Loops with `#pragma omp simd` live in functions: pragmas are not allowed inside the
// AT_DISPATCH macro's arguments.)
template <typename scalar_t, bool Relu>
void add_map_relu_kernel(const scalar_t* zp, const scalar_t* mp, scalar_t* outp, int64_t N,
                         int64_t image) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t chunk = 16384;
  const int64_t chunks = (image + chunk - 1) / chunk;
  at::parallel_for(0, N * chunks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / chunks, i0 = (b % chunks) * chunk;
      const int64_t len = std::min(chunk, image - i0);
      // dst may be src (add_map_relu_): no __restrict__ between them.
      const scalar_t* src = zp + n * image + i0;
      const scalar_t* __restrict__ add = mp + i0;
      scalar_t* dst = outp + n * image + i0;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const acc_t v = static_cast<acc_t>(src[i]) + static_cast<acc_t>(add[i]);
        dst[i] = static_cast<scalar_t>(Relu ? relu(v) : v);
      }
    }
  });
}

// Relu: g_z = g·[out > 0] written to gzp and summed; otherwise g itself summed (out and
// gzp unused).
template <typename scalar_t, bool Relu>
void relu_grad_batch_sum_kernel(const scalar_t* gp, const scalar_t* outp, scalar_t* gzp,
                                scalar_t* sp, int64_t N, int64_t image) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  // Each thread takes its own range of images, adding into its own image-sized
  // sum (a slice of the image per thread instead would leave all but one thread idle on
  // the small maps of late layers, where one image is a few thousand values); the
  // threads' sums are added at the end.
  const int nthreads = at::get_num_threads();
  std::vector<acc_t> partial(static_cast<size_t>(nthreads) * image, acc_t(0));
  // Within its images a thread walks the image in L1-sized slices, so that the running
  // sum it adds into stays in L1 rather than being re-read from L2 for every image.
  constexpr int64_t slice = 2048;
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    const int tid = at::get_thread_num();
    for (int64_t i0 = 0; i0 < image; i0 += slice) {
      const int64_t len = std::min(slice, image - i0);
      acc_t* __restrict__ a = partial.data() + static_cast<size_t>(tid) * image + i0;
      for (int64_t n = n0; n < n1; ++n) {
        const scalar_t* __restrict__ src = gp + n * image + i0;
        if constexpr (Relu) {
          const scalar_t* __restrict__ o = outp + n * image + i0;
          scalar_t* __restrict__ dst = gzp + n * image + i0;
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) {
            const acc_t v = static_cast<acc_t>(o[i]) > acc_t(0) ? static_cast<acc_t>(src[i]) : acc_t(0);
            dst[i] = static_cast<scalar_t>(v);
            a[i] += v;
          }
        } else {
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) a[i] += static_cast<acc_t>(src[i]);
        }
      }
    }
  });
  for (int64_t i = 0; i < image; ++i) {
    acc_t total = 0;
    for (int t = 0; t < nthreads; ++t) total += partial[static_cast<size_t>(t) * image + i];
    sp[i] = static_cast<scalar_t>(total);
  }
}

// relu(z + map) into out, which is z itself or a tensor like it.
void add_map_relu_into(const at::Tensor& z, const at::Tensor& map, bool apply_relu,
                       at::Tensor& out) {
  const char* op = "bnorder_cpu::add_map_relu";
  check_activation(z, "z", op);
  check_activation(map, "map", op);
  TORCH_CHECK(map.size(0) == 1 && map.sizes().slice(1) == z.sizes().slice(1), op,
              ": map must have size (1, C, H, W) = (1, ", z.size(1), ", ", z.size(2), ", ",
              z.size(3), "), got ", map.sizes());
  TORCH_CHECK(map.scalar_type() == z.scalar_type(), op, ": map dtype ", map.scalar_type(),
              " differs from z dtype ", z.scalar_type());
  const at::Tensor m = map.contiguous(format_of(z));
  const int64_t N = z.size(0), image = z.numel() / std::max<int64_t>(N, 1);
  if (z.numel() == 0) return;
  // In both layouts one image is `image` contiguous values, and map is one such image.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "add_map_relu", [&] {
    auto kernel = apply_relu ? add_map_relu_kernel<scalar_t, true>
                             : add_map_relu_kernel<scalar_t, false>;
    kernel(z.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(),
           out.mutable_data_ptr<scalar_t>(), N, image);
  });
}

}  // namespace

at::Tensor add_map_relu(const at::Tensor& z, const at::Tensor& map, bool apply_relu) {
  auto out = at::empty_like(z);
  add_map_relu_into(z, map, apply_relu, out);
  return out;
}

void add_map_relu_(at::Tensor& z, const at::Tensor& map, bool apply_relu) {
  add_map_relu_into(z, map, apply_relu, z);
}

std::tuple<at::Tensor, at::Tensor> relu_grad_batch_sum(const at::Tensor& g,
                                                       const at::Tensor& out) {
  const char* op = "bnorder_cpu::relu_grad_batch_sum";
  check_activation(g, "grad", op);
  check_activation(out, "out", op);
  TORCH_CHECK(out.sizes() == g.sizes() && out.scalar_type() == g.scalar_type(), op,
              ": out must match grad in size and dtype, got ", out.sizes(), " ",
              out.scalar_type(), " vs ", g.sizes(), " ", g.scalar_type());
  TORCH_CHECK(is_channels_last(out) == is_channels_last(g), op,
              ": out and grad must share a memory format");
  const auto fmt = format_of(g);
  auto gz = at::empty_like(g);
  auto sum = at::empty({1, g.size(1), g.size(2), g.size(3)}, g.options(), fmt);
  const int64_t N = g.size(0), image = sum.numel();
  if (g.numel() == 0) return {gz, sum.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "relu_grad_batch_sum", [&] {
    relu_grad_batch_sum_kernel<scalar_t, true>(g.const_data_ptr<scalar_t>(),
                                         out.const_data_ptr<scalar_t>(),
                                         gz.mutable_data_ptr<scalar_t>(),
                                         sum.mutable_data_ptr<scalar_t>(), N, image);
  });
  return {gz, sum};
}

at::Tensor batch_sum(const at::Tensor& g) {
  const char* op = "bnorder_cpu::batch_sum";
  check_activation(g, "grad", op);
  const auto fmt = format_of(g);
  auto sum = at::empty({1, g.size(1), g.size(2), g.size(3)}, g.options(), fmt);
  if (g.numel() == 0) return sum.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "batch_sum", [&] {
    relu_grad_batch_sum_kernel<scalar_t, false>(g.const_data_ptr<scalar_t>(), nullptr, nullptr,
                                                sum.mutable_data_ptr<scalar_t>(), g.size(0),
                                                sum.numel());
  });
  return sum;
}

}  // namespace bnorder
