// The four BN primitives on the CPU; see primitives.h for the math and the layouts.
#include "primitives.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace bnorder {
namespace {

// ---------------------------------------------------------------------------------------
// Geometry and input checks
// ---------------------------------------------------------------------------------------

// rows_by_channels: M rows of C contiguous channels (channels_last, 2-D, or H = W = 1).
// Otherwise N planes per channel, each of S contiguous values (NCHW).
struct Geometry {
  bool rows_by_channels;
  int64_t N, C, S;
  int64_t rows() const { return N * S; }
};

Geometry geometry_of(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() >= 2, op, ": expected a tensor with a channel dimension (N, C, ...), got ",
              t.dim(), "-D input");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op,
              ": expected a floating-point tensor, got ", t.scalar_type());
  const int64_t N = t.size(0), C = t.size(1);
  TORCH_CHECK(C > 0, op, ": the tensor has no channels (size ", t.sizes(), ")");
  const int64_t S = (N == 0) ? 0 : t.numel() / (N * C);
  if (t.is_contiguous()) return {t.dim() == 2 || S == 1, N, C, S};
  if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) return {true, N, C, S};
  TORCH_CHECK(false, op, ": expected a contiguous or channels_last tensor, got strides ",
              t.strides(), "; call .contiguous() first");
}

void check_like(const at::Tensor& g, const at::Tensor& t, const Geometry& geo, const char* op) {
  TORCH_CHECK(g.device().is_cpu(), op, ": gradient must be a CPU tensor, got ", g.device());
  TORCH_CHECK(g.sizes() == t.sizes(), op, ": gradient size ", g.sizes(),
              " does not match input size ", t.sizes());
  TORCH_CHECK(g.scalar_type() == t.scalar_type(), op, ": gradient dtype ", g.scalar_type(),
              " does not match input dtype ", t.scalar_type());
  TORCH_CHECK(geometry_of(g, op).rows_by_channels == geo.rows_by_channels, op,
              ": gradient strides ", g.strides(),
              " do not match the input's memory format (strides ", t.strides(), ")");
}

at::ScalarType acc_type_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_channel_vector(const at::Tensor& v, const char* name, const at::Tensor& t,
                          const char* op) {
  const int64_t C = t.size(1);
  TORCH_CHECK(v.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", v.device());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == C, op, ": ", name, " must have shape (", C,
              ",), got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == acc_type_of(t), op, ": ", name, " must be ",
              acc_type_of(t), " for ", t.scalar_type(), " activations, got ", v.scalar_type());
  TORCH_CHECK(v.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_relu_mode(int64_t relu_mode, const char* op) {
  TORCH_CHECK(relu_mode >= 0 && relu_mode <= 2, op, ": relu_mode must be 0 (none), 1 (after) ",
              "or 2 (before), got ", relu_mode);
}

// ---------------------------------------------------------------------------------------
// Element-wise pieces, with the ReLU placement as a template parameter
// ---------------------------------------------------------------------------------------

// relu(v) that keeps NaN (as torch.relu does): NaN < 0 is false.
template <typename T>
inline T relu(T v) { return v < T(0) ? T(0) : v; }

// The value the norm sees.
template <int Mode, typename acc_t, typename scalar_t>
inline acc_t load_input(scalar_t v) {
  acc_t a = static_cast<acc_t>(v);
  return Mode == RELU_BEFORE ? relu(a) : a;
}

// The gradient at the norm's output: for ReLU after the norm, masked where the output was 0.
template <int Mode, typename acc_t, typename scalar_t>
inline acc_t load_grad(scalar_t gv, acc_t t, acc_t s, acc_t b) {
  acc_t g = static_cast<acc_t>(gv);
  if (Mode == RELU_AFTER) return (t * s + b > acc_t(0)) ? g : acc_t(0);
  return g;
}

template <int Mode, typename acc_t>
inline acc_t normalize(acc_t t, acc_t s, acc_t b) {
  acc_t in = Mode == RELU_BEFORE ? relu(t) : t;
  acc_t v = in * s + b;
  return Mode == RELU_AFTER ? relu(v) : v;
}

template <int Mode, typename acc_t>
inline acc_t input_grad(acc_t g, acc_t t, acc_t s, acc_t b, acc_t mean, acc_t k1, acc_t k2,
                        acc_t k3) {
  const acc_t in = Mode == RELU_BEFORE ? relu(t) : t;
  const acc_t gm = (Mode == RELU_AFTER && !(t * s + b > acc_t(0))) ? acc_t(0) : g;
  const acc_t d = gm * k1 + (in - mean) * k2 + k3;
  return (Mode == RELU_BEFORE && !(t > acc_t(0))) ? acc_t(0) : d;
}

// Chan et al.: merge (n_b, mean_b, m2_b) into the running (n, mean, m2).
inline void chan_merge(double& n, double& mean, double& m2, double n_b, double mean_b,
                       double m2_b) {
  if (n_b == 0) return;
  const double total = n + n_b;
  const double delta = mean_b - mean;
  mean += delta * (n_b / total);
  m2 += m2_b + delta * delta * (n * n_b / total);
  n = total;
}

// Rows per block in the rows-by-channels layout: ~16 KB of activations, cache-resident for
// the second pass.
inline int64_t rows_per_block(int64_t C) { return std::max<int64_t>(1, 4096 / C); }

// ---------------------------------------------------------------------------------------
// stats
// ---------------------------------------------------------------------------------------

// Planes are visited in memory order (plane p = n·C + c), each thread merging into its own
// per-channel partials: walking one channel's N planes instead would jump C·S values between
// short runs, which the hardware prefetcher does not follow (3–4× slower at 8×8 maps).
template <typename scalar_t, typename acc_t, int Mode>
void stats_planes(const scalar_t* x, const Geometry& geo, acc_t* mean_out, acc_t* var_out) {
  const int64_t S = geo.S, C = geo.C;
  const int nthreads = at::get_num_threads();
  std::vector<double> t_n(nthreads * C, 0.0), t_mean(nthreads * C, 0.0), t_m2(nthreads * C, 0.0);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, S));
  at::parallel_for(0, geo.N * C, grain, [&](int64_t p0, int64_t p1) {
    const int tid = at::get_thread_num();
    double* pn = &t_n[tid * C];
    double* pmean = &t_mean[tid * C];
    double* pm2 = &t_m2[tid * C];
    for (int64_t plane = p0; plane < p1; ++plane) {
      const scalar_t* __restrict__ p = x + plane * S;
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < S; ++i) sum += load_input<Mode, acc_t>(p[i]);
      const acc_t pm = sum / static_cast<acc_t>(S);
      acc_t sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t i = 0; i < S; ++i) {
        const acc_t d = load_input<Mode, acc_t>(p[i]) - pm;
        sq += d * d;
      }
      const int64_t c = plane % C;
      chan_merge(pn[c], pmean[c], pm2[c], static_cast<double>(S), pm, sq);
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double n = 0, mean = 0, m2 = 0;
    for (int t = 0; t < nthreads; ++t)
      chan_merge(n, mean, m2, t_n[t * C + c], t_mean[t * C + c], t_m2[t * C + c]);
    mean_out[c] = static_cast<acc_t>(mean);
    var_out[c] = static_cast<acc_t>(n > 0 ? m2 / n : 0.0);
  }
}

template <typename scalar_t, typename acc_t, int Mode>
void stats_rows(const scalar_t* x, const Geometry& geo, acc_t* mean_out, acc_t* var_out) {
  const int64_t C = geo.C, rows = geo.rows(), block = rows_per_block(C);
  const int64_t nblocks = (rows + block - 1) / block;
  const int nthreads = at::get_num_threads();
  // Per-thread partial (count, mean, m2) in double, merged at the end.
  std::vector<double> t_n(nthreads, 0.0), t_mean(nthreads * C, 0.0), t_m2(nthreads * C, 0.0);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    const int tid = at::get_thread_num();
    std::vector<acc_t> sum(C), sq(C);
    double* pmean = &t_mean[tid * C];
    double* pm2 = &t_m2[tid * C];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * block, r1 = std::min(rows, r0 + block);
      std::fill(sum.begin(), sum.end(), acc_t(0));
      std::fill(sq.begin(), sq.end(), acc_t(0));
      acc_t* s = sum.data();
      acc_t* q = sq.data();
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* p = x + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) s[c] += load_input<Mode, acc_t>(p[c]);
      }
      const acc_t inv = acc_t(1) / static_cast<acc_t>(r1 - r0);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) s[c] *= inv;  // now the block mean
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* p = x + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = load_input<Mode, acc_t>(p[c]) - s[c];
          q[c] += d * d;
        }
      }
      const double nb = static_cast<double>(r1 - r0);
      for (int64_t c = 0; c < C; ++c) {
        double n = t_n[tid];
        chan_merge(n, pmean[c], pm2[c], nb, s[c], q[c]);
      }
      t_n[tid] += nb;
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double n = 0, mean = 0, m2 = 0;
    for (int t = 0; t < nthreads; ++t) chan_merge(n, mean, m2, t_n[t], t_mean[t * C + c], t_m2[t * C + c]);
    mean_out[c] = static_cast<acc_t>(mean);
    var_out[c] = static_cast<acc_t>(n > 0 ? m2 / n : 0.0);
  }
}

// ---------------------------------------------------------------------------------------
// Element-wise passes (apply, backward_apply) share one traversal
// ---------------------------------------------------------------------------------------

// Calls body(c, begin, end, offset) for every contiguous run of one channel (planes) or
// every row (rows-by-channels, then body walks the channels itself).
template <typename PlaneFn, typename RowFn>
void for_each_run(const Geometry& geo, PlaneFn plane, RowFn row) {
  if (!geo.rows_by_channels) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, geo.S));
    at::parallel_for(0, geo.N * geo.C, grain, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) plane(p % geo.C, p * geo.S, geo.S);
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, 32768 / geo.C);
    at::parallel_for(0, geo.rows(), grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) row(r * geo.C);
    });
  }
}

template <typename scalar_t, typename acc_t, int Mode>
void apply_kernel(const scalar_t* x, scalar_t* y, const Geometry& geo, const acc_t* scale,
                  const acc_t* shift) {
  const int64_t C = geo.C;
  for_each_run(
      geo,
      [&](int64_t c, int64_t off, int64_t n) {
        const acc_t s = scale[c], b = shift[c];
        const scalar_t* __restrict__ xp = x + off;
        scalar_t* __restrict__ yp = y + off;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i)
          yp[i] = static_cast<scalar_t>(normalize<Mode, acc_t>(static_cast<acc_t>(xp[i]), s, b));
      },
      [&](int64_t off) {
        const scalar_t* __restrict__ xp = x + off;
        scalar_t* __restrict__ yp = y + off;
        const acc_t* __restrict__ sp = scale;
        const acc_t* __restrict__ bp = shift;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c)
          yp[c] = static_cast<scalar_t>(
              normalize<Mode, acc_t>(static_cast<acc_t>(xp[c]), sp[c], bp[c]));
      });
}

template <typename scalar_t, typename acc_t, int Mode>
void backward_apply_kernel(const scalar_t* g, const scalar_t* x, scalar_t* dx,
                           const Geometry& geo, const acc_t* mean, const acc_t* scale,
                           const acc_t* shift, const acc_t* k1, const acc_t* k2,
                           const acc_t* k3) {
  const int64_t C = geo.C;
  for_each_run(
      geo,
      [&](int64_t c, int64_t off, int64_t n) {
        const acc_t s = scale[c], b = shift[c], m = mean[c], a1 = k1[c], a2 = k2[c], a3 = k3[c];
        const scalar_t* __restrict__ gp = g + off;
        const scalar_t* __restrict__ xp = x + off;
        scalar_t* __restrict__ dp = dx + off;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i)
          dp[i] = static_cast<scalar_t>(input_grad<Mode, acc_t>(
              static_cast<acc_t>(gp[i]), static_cast<acc_t>(xp[i]), s, b, m, a1, a2, a3));
      },
      [&](int64_t off) {
        const scalar_t* __restrict__ gp = g + off;
        const scalar_t* __restrict__ xp = x + off;
        scalar_t* __restrict__ dp = dx + off;
        const acc_t *__restrict__ sp = scale, *__restrict__ bp = shift, *__restrict__ mp = mean;
        const acc_t *__restrict__ p1 = k1, *__restrict__ p2 = k2, *__restrict__ p3 = k3;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c)
          dp[c] = static_cast<scalar_t>(input_grad<Mode, acc_t>(
              static_cast<acc_t>(gp[c]), static_cast<acc_t>(xp[c]), sp[c], bp[c], mp[c],
              p1[c], p2[c], p3[c]));
      });
}

// ---------------------------------------------------------------------------------------
// backward_reduce
// ---------------------------------------------------------------------------------------

// The backward sums of every thread, added per channel in double precision.
template <typename acc_t>
void sum_thread_partials(const std::vector<double>& t_g, const std::vector<double>& t_gt,
                         int nthreads, int64_t C, acc_t* sum_g_out, acc_t* sum_gt_out) {
  for (int64_t c = 0; c < C; ++c) {
    double a = 0, b = 0;
    for (int t = 0; t < nthreads; ++t) {
      a += t_g[t * C + c];
      b += t_gt[t * C + c];
    }
    sum_g_out[c] = static_cast<acc_t>(a);
    sum_gt_out[c] = static_cast<acc_t>(b);
  }
}

// Memory order with per-thread per-channel sums, as stats_planes.
template <typename scalar_t, typename acc_t, int Mode>
void backward_reduce_planes(const scalar_t* g, const scalar_t* x, const Geometry& geo,
                            const acc_t* mean, const acc_t* scale, const acc_t* shift,
                            acc_t* sum_g_out, acc_t* sum_gt_out) {
  const int64_t S = geo.S, C = geo.C;
  const int nthreads = at::get_num_threads();
  std::vector<double> t_g(nthreads * C, 0.0), t_gt(nthreads * C, 0.0);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, S));
  at::parallel_for(0, geo.N * C, grain, [&](int64_t p0, int64_t p1) {
    const int tid = at::get_thread_num();
    for (int64_t plane = p0; plane < p1; ++plane) {
      const int64_t c = plane % C;
      const acc_t s = scale[c], b = shift[c], m = mean[c];
      // Local pointers: loads through the lambda's captured references would keep the
      // loop from vectorizing.
      const scalar_t* __restrict__ xp = x + plane * S;
      const scalar_t* __restrict__ gp = g + plane * S;
      acc_t sg = 0, sgt = 0;
#pragma omp simd reduction(+ : sg, sgt)
      for (int64_t i = 0; i < S; ++i) {
        const acc_t t = static_cast<acc_t>(xp[i]);
        const acc_t gv = load_grad<Mode, acc_t>(gp[i], t, s, b);
        sg += gv;
        sgt += gv * ((Mode == RELU_BEFORE ? relu(t) : t) - m);
      }
      t_g[tid * C + c] += sg;
      t_gt[tid * C + c] += sgt;
    }
  });
  sum_thread_partials(t_g, t_gt, nthreads, C, sum_g_out, sum_gt_out);
}

template <typename scalar_t, typename acc_t, int Mode>
void backward_reduce_rows(const scalar_t* g, const scalar_t* x, const Geometry& geo,
                          const acc_t* mean, const acc_t* scale, const acc_t* shift,
                          acc_t* sum_g_out, acc_t* sum_gt_out) {
  const int64_t C = geo.C, rows = geo.rows(), block = rows_per_block(C);
  const int64_t nblocks = (rows + block - 1) / block;
  const int nthreads = at::get_num_threads();
  std::vector<double> t_g(nthreads * C, 0.0), t_gt(nthreads * C, 0.0);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    const int tid = at::get_thread_num();
    std::vector<acc_t> bg(C), bgt(C);
    acc_t* __restrict__ sg = bg.data();
    acc_t* __restrict__ sgt = bgt.data();
    const acc_t *__restrict__ sp = scale, *__restrict__ bp = shift, *__restrict__ mp = mean;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * block, r1 = std::min(rows, r0 + block);
      std::fill(bg.begin(), bg.end(), acc_t(0));
      std::fill(bgt.begin(), bgt.end(), acc_t(0));
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* __restrict__ xp = x + r * C;
        const scalar_t* __restrict__ gp = g + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc_t t = static_cast<acc_t>(xp[c]);
          const acc_t gv = load_grad<Mode, acc_t>(gp[c], t, sp[c], bp[c]);
          sg[c] += gv;
          sgt[c] += gv * ((Mode == RELU_BEFORE ? relu(t) : t) - mp[c]);
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        t_g[tid * C + c] += sg[c];
        t_gt[tid * C + c] += sgt[c];
      }
    }
  });
  sum_thread_partials(t_g, t_gt, nthreads, C, sum_g_out, sum_gt_out);
}

// Dispatch on the ReLU placement: Mode becomes a compile-time constant in the loops.
#define BNORDER_DISPATCH_RELU(relu_mode, ...)             \
  [&] {                                                   \
    if (relu_mode == RELU_AFTER) {                        \
      constexpr int Mode = RELU_AFTER;                    \
      return __VA_ARGS__();                               \
    } else if (relu_mode == RELU_BEFORE) {                \
      constexpr int Mode = RELU_BEFORE;                   \
      return __VA_ARGS__();                               \
    } else {                                              \
      constexpr int Mode = RELU_NONE;                     \
      return __VA_ARGS__();                               \
    }                                                     \
  }()

#define BNORDER_DISPATCH_TYPES(t, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), name, __VA_ARGS__)

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

}  // namespace

// ---------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> stats(const at::Tensor& t, int64_t relu_mode) {
  const char* op = "bnorder_cpu::stats";
  const Geometry geo = geometry_of(t, op);
  check_relu_mode(relu_mode, op);
  TORCH_CHECK(geo.N * geo.S > 0, op, ": cannot compute statistics of an empty tensor (size ",
              t.sizes(), ")");
  auto mean = at::empty({geo.C}, t.options().dtype(acc_type_of(t)));
  auto var = at::empty({geo.C}, t.options().dtype(acc_type_of(t)));
  BNORDER_DISPATCH_TYPES(t, "bnorder_stats", [&] {
    using acc_t = acc_of<scalar_t>;
    BNORDER_DISPATCH_RELU(relu_mode, [&] {
      // Only RELU_BEFORE changes what the statistics see.
      constexpr int M = Mode == RELU_BEFORE ? RELU_BEFORE : RELU_NONE;
      if (geo.rows_by_channels)
        stats_rows<scalar_t, acc_t, M>(t.const_data_ptr<scalar_t>(), geo,
                                       mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
      else
        stats_planes<scalar_t, acc_t, M>(t.const_data_ptr<scalar_t>(), geo,
                                         mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
    });
  });
  return {mean, var};
}

at::Tensor apply(const at::Tensor& t, const at::Tensor& scale, const at::Tensor& shift,
                 int64_t relu_mode) {
  const char* op = "bnorder_cpu::apply";
  const Geometry geo = geometry_of(t, op);
  check_relu_mode(relu_mode, op);
  check_channel_vector(scale, "scale", t, op);
  check_channel_vector(shift, "shift", t, op);
  auto out = at::empty_like(t);
  if (t.numel() == 0) return out;
  BNORDER_DISPATCH_TYPES(t, "bnorder_apply", [&] {
    using acc_t = acc_of<scalar_t>;
    BNORDER_DISPATCH_RELU(relu_mode, [&] {
      apply_kernel<scalar_t, acc_t, Mode>(t.const_data_ptr<scalar_t>(),
                                          out.mutable_data_ptr<scalar_t>(), geo,
                                          scale.const_data_ptr<acc_t>(),
                                          shift.const_data_ptr<acc_t>());
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& g, const at::Tensor& t,
                                                   const at::Tensor& mean,
                                                   const at::Tensor& scale,
                                                   const at::Tensor& shift, int64_t relu_mode) {
  const char* op = "bnorder_cpu::backward_reduce";
  const Geometry geo = geometry_of(t, op);
  check_like(g, t, geo, op);
  check_relu_mode(relu_mode, op);
  check_channel_vector(mean, "mean", t, op);
  check_channel_vector(scale, "scale", t, op);
  check_channel_vector(shift, "shift", t, op);
  auto sum_g = at::zeros({geo.C}, t.options().dtype(acc_type_of(t)));
  auto sum_gt = at::zeros({geo.C}, t.options().dtype(acc_type_of(t)));
  if (t.numel() == 0) return {sum_g, sum_gt};
  BNORDER_DISPATCH_TYPES(t, "bnorder_backward_reduce", [&] {
    using acc_t = acc_of<scalar_t>;
    BNORDER_DISPATCH_RELU(relu_mode, [&] {
      auto kernel = geo.rows_by_channels ? backward_reduce_rows<scalar_t, acc_t, Mode>
                                         : backward_reduce_planes<scalar_t, acc_t, Mode>;
      kernel(g.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), geo,
             mean.const_data_ptr<acc_t>(), scale.const_data_ptr<acc_t>(),
             shift.const_data_ptr<acc_t>(), sum_g.mutable_data_ptr<acc_t>(),
             sum_gt.mutable_data_ptr<acc_t>());
    });
  });
  return {sum_g, sum_gt};
}

at::Tensor backward_apply(const at::Tensor& g, const at::Tensor& t, const at::Tensor& mean,
                          const at::Tensor& scale, const at::Tensor& shift,
                          const at::Tensor& k1, const at::Tensor& k2, const at::Tensor& k3,
                          int64_t relu_mode) {
  const char* op = "bnorder_cpu::backward_apply";
  const Geometry geo = geometry_of(t, op);
  check_like(g, t, geo, op);
  check_relu_mode(relu_mode, op);
  const std::pair<const at::Tensor*, const char*> vectors[] = {
      {&mean, "mean"}, {&scale, "scale"}, {&shift, "shift"}, {&k1, "k1"}, {&k2, "k2"}, {&k3, "k3"}};
  for (const auto& [v, name] : vectors) check_channel_vector(*v, name, t, op);
  auto dx = at::empty_like(t);
  if (t.numel() == 0) return dx;
  BNORDER_DISPATCH_TYPES(t, "bnorder_backward_apply", [&] {
    using acc_t = acc_of<scalar_t>;
    BNORDER_DISPATCH_RELU(relu_mode, [&] {
      backward_apply_kernel<scalar_t, acc_t, Mode>(
          g.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
          dx.mutable_data_ptr<scalar_t>(), geo, mean.const_data_ptr<acc_t>(),
          scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(),
          k1.const_data_ptr<acc_t>(), k2.const_data_ptr<acc_t>(), k3.const_data_ptr<acc_t>());
    });
  });
  return dx;
}

}  // namespace bnorder
