// The four BN primitives on the CPU; see primitives.h for the math and the layouts.
#include "primitives.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>
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

// An element-wise pass may write over an input it reads element for element, not over
// another part of it.
bool same_or_apart(const at::Tensor& out, const at::Tensor& in) {
  return !out.is_alias_of(in) ||
         (out.data_ptr() == in.data_ptr() && out.sizes() == in.sizes() &&
          out.strides() == in.strides());
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

// The mean a pass centers on: float64 (the statistics' own digits) or float32.
void check_mean_vector(const at::Tensor& v, const at::Tensor& t, const char* op) {
  const int64_t C = t.size(1);
  TORCH_CHECK(v.device().is_cpu(), op, ": mean must be a CPU tensor, got ", v.device());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == C, op, ": mean must have shape (", C, ",), got ",
              v.sizes());
  TORCH_CHECK(v.scalar_type() == at::kDouble || v.scalar_type() == at::kFloat, op,
              ": mean must be float64 or float32, got ", v.scalar_type());
  TORCH_CHECK(v.is_contiguous(), op, ": mean must be contiguous");
}

// The per-channel terms of the passes, from the mean (float64 or float32), s and the shift
// of norm(t) = (t − mean)·s + shift:
//   hi + lo   the mean as two acc_t values: hi its rounding, lo the rest (0 when the mean has
//             no more digits than acc_t); the backward centers on it as (t − hi) − lo.
//   b + b_lo  the pre-activation is t·s + b + b_lo, one fused multiply-add plus b_lo, where
//             b = shift − hi·s is formed as ATen forms it (the product rounded, then the
//             difference) and b_lo = (shift − mean·s) − b is what that rounding left out.
// With lo = 0 (a mean of acc_t's digits) b_lo is 0: the pass is eager ATen's t·s + b exactly,
// and adding 0 rounds nothing. A mean with more digits (coefficients gives one where
// |mean|/std is large, csrc/norm.cpp) gets the exact shift: far from zero, b alone is off by
// up to half an ulp of mean·s, the same offset on every value of the channel.
template <typename acc_t>
struct ChannelTerms {
  std::vector<acc_t> hi, lo, b, b_lo;
  ChannelTerms(const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift)
      : hi(mean.size(0)), lo(mean.size(0)), b(mean.size(0)), b_lo(mean.size(0)) {
    const acc_t* sp = scale.const_data_ptr<acc_t>();
    const acc_t* shp = shift.const_data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bnorder_channel_terms", [&] {
      const scalar_t* m = mean.const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < mean.size(0); ++c) {
        const double md = static_cast<double>(m[c]), s = sp[c], sh = shp[c];
        hi[c] = static_cast<acc_t>(md);
        lo[c] = static_cast<acc_t>(md - static_cast<double>(hi[c]));
        const acc_t product = static_cast<acc_t>(static_cast<double>(hi[c]) * s);
        b[c] = static_cast<acc_t>(sh - static_cast<double>(product));
        b_lo[c] = lo[c] == acc_t(0) ? acc_t(0)
                                    : static_cast<acc_t>((sh - md * s) - static_cast<double>(b[c]));
      }
    });
  }
};

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

// The norm before any ReLU after it: in·s + b + b_lo (ChannelTerms), the product and b in
// one rounding, as ATen's fused multiply-add. The forward pass and the backward's ReLU mask
// both call this, so the mask is the forward's. std::fma, because the build's -std=c++17
// turns off the contraction of a·b + c.
template <typename acc_t>
inline acc_t pre_activation(acc_t in, acc_t s, acc_t b, acc_t bl) {
  return std::fma(in, s, b) + bl;
}

// The gradient at the norm's output: for ReLU after the norm, masked where the output was 0.
template <int Mode, typename acc_t, typename scalar_t>
inline acc_t load_grad(scalar_t gv, acc_t t, acc_t s, acc_t b, acc_t bl) {
  acc_t g = static_cast<acc_t>(gv);
  if (Mode == RELU_AFTER) return (pre_activation(t, s, b, bl) > acc_t(0)) ? g : acc_t(0);
  return g;
}

template <int Mode, typename acc_t>
inline acc_t normalize(acc_t t, acc_t s, acc_t b, acc_t bl) {
  acc_t in = Mode == RELU_BEFORE ? relu(t) : t;
  acc_t v = pre_activation(in, s, b, bl);
  return Mode == RELU_AFTER ? relu(v) : v;
}

template <int Mode, typename acc_t>
inline acc_t input_grad(acc_t g, acc_t t, acc_t s, acc_t b, acc_t bl, acc_t mh, acc_t ml,
                        acc_t k1, acc_t k2, acc_t k3) {
  if constexpr (Mode == RELU_BEFORE) {
    // Zero where t ≤ 0 (NaN included, as torch's ReLU backward), t itself elsewhere. Written
    // as three selects of inputs in the `!(c) ? 0 : v` form, so that d is exactly 0 there:
    // without AVX-512's masked arithmetic GCC vectorizes only that form (FP compares may trap),
    // and a select of the result stayed a scalar branch, mispredicted on half of the values:
    // 10x slower than the other passes on an AVX2 machine.
    const acc_t gm = !(t > acc_t(0)) ? acc_t(0) : g;
    const acc_t tm = !(t > acc_t(0)) ? mh : t;  // centered to exactly 0 where masked
    const acc_t lm = !(t > acc_t(0)) ? acc_t(0) : ml;
    const acc_t k = !(t > acc_t(0)) ? acc_t(0) : k3;
    return gm * k1 + ((tm - mh) - lm) * k2 + k;
  }
  const acc_t gm =
      (Mode == RELU_AFTER && !(pre_activation(t, s, b, bl) > acc_t(0))) ? acc_t(0) : g;
  return gm * k1 + ((t - mh) - ml) * k2 + k3;
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

// Rows per block of the reductions (stats, backward_reduce) in the rows-by-channels layout: up
// to 1024 rows or 64 KB, L2-resident while a wide C is read in chunks of channels. The merge of
// all C channels after each block costs as much as reading a few rows, hence long blocks; yet at
// most a thread's share, so that every thread has work.
inline int64_t rows_per_reduce_block(int64_t C, int64_t rows, int nthreads) {
  return std::clamp<int64_t>(std::min<int64_t>(16384 / C, (rows + nthreads - 1) / nthreads), 1,
                             1024);
}

// Accumulator lanes: one vector register of acc_t, as wide as the target's widest. Sums kept
// per lane stay in registers; their horizontal sum waits for the merge, once per ~kMergeValues
// values.
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif
template <typename acc_t>
constexpr int kLanes = kVectorBytes / static_cast<int>(sizeof(acc_t));

// Values a lane-accumulated channel takes in before it is merged in double precision: bounds
// the float rounding of its sums as the blocks of the rows layout do.
constexpr int64_t kMergeValues = 4096;

// Block statistics from sums shifted by k (Σ(t − k), Σ(t − k)² over n values): the mean and the
// squared deviations about it. With k near the block's mean the subtraction q − s²/n cancels
// nothing, so data far from zero keeps the digits the two-pass form keeps; clamped at 0 against
// rounding, NaN kept.
inline void shifted_to_block(double k, double s, double q, double n, double& mean, double& m2) {
  mean = k + s / n;
  const double d = q - s * s / n;
  m2 = d < 0 ? 0.0 : d;
}

// ---------------------------------------------------------------------------------------
// stats
// ---------------------------------------------------------------------------------------

// A vector of kLanes<acc_t> accumulators (GCC/Clang vector extension): the compiler keeps it in
// a register, where it moves a plain array of the same size through the stack on every plane.
typedef float lanes_float __attribute__((vector_size(kVectorBytes)));
typedef double lanes_double __attribute__((vector_size(kVectorBytes)));
template <typename acc_t>
using lanes_t = std::conditional_t<std::is_same_v<acc_t, double>, lanes_double, lanes_float>;

// kLanes<acc_t> consecutive values as the norm sees them, minus k.
template <int Mode, typename acc_t, typename scalar_t>
inline lanes_t<acc_t> load_lanes(const scalar_t* p, acc_t k) {
  lanes_t<acc_t> v;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(&v, p, sizeof v);
  } else {
    for (int j = 0; j < kLanes<acc_t>; ++j) v[j] = static_cast<acc_t>(p[j]);
  }
  if constexpr (Mode == RELU_BEFORE) {
    const lanes_t<acc_t> zero = {};
    v = v < zero ? zero : v;  // NaN stays
  }
  return v - k;
}

// Two sums over a run of n contiguous values of one channel, added into the channel's lanes
// a[0..V), b[0..V): shared by stats (Σ(t − k), Σ(t − k)²) and backward_reduce (Σg',
// Σg'·(t_in − mean)) in the NCHW layout. add_lanes(i, va, vb) adds the V values from i to the
// vectors va, vb; add_one(i, a, b) adds value i. Two sets in flight halve the add latency
// chain. NV >= 0 is n / V known at compile time: a plane of a few vectors then has no loop
// control, which costs as much as its arithmetic.
template <int NV = -1, typename acc_t, typename AddLanes, typename AddOne>
inline void lane_sums(int64_t n, const AddLanes& add_lanes, const AddOne& add_one,
                      acc_t* __restrict__ a, acc_t* __restrict__ b) {
  constexpr int V = kLanes<acc_t>;
  using vec = lanes_t<acc_t>;
  const int64_t nv = NV >= 0 ? NV : n / V;
  vec a0 = {}, b0 = {}, a1 = {}, b1 = {};
  int64_t v = 0;
  for (; v + 2 <= nv; v += 2) {
    add_lanes(v * V, a0, b0);
    add_lanes(v * V + V, a1, b1);
  }
  if (v < nv) add_lanes(v * V, a0, b0);
  vec am, bm;
  std::memcpy(&am, a, sizeof am);
  std::memcpy(&bm, b, sizeof bm);
  am += a0 + a1;
  bm += b0 + b1;
  std::memcpy(a, &am, sizeof am);
  std::memcpy(b, &bm, sizeof bm);
  for (int64_t i = nv * V, j = 0; i < n; ++i, ++j) add_one(i, a[j], b[j]);
}

// The two sums a channel's lanes hold (a[0..V), then b[0..V)), in double, and the lanes
// cleared for the channel's next run.
template <typename acc_t>
inline void take_lanes(acc_t* lanes, double& a, double& b) {
  constexpr int V = kLanes<acc_t>;
  a = 0;
  b = 0;
  for (int j = 0; j < V; ++j) {
    a += lanes[j];
    b += lanes[V + j];
  }
  std::fill(lanes, lanes + 2 * V, acc_t(0));
}

// stats' sums of a run: Σ(t − k) and Σ(t − k)² as the norm sees t.
template <int Mode, int NV = -1, typename scalar_t, typename acc_t>
inline void shifted_lanes(const scalar_t* __restrict__ p, int64_t n, acc_t k,
                          acc_t* __restrict__ s, acc_t* __restrict__ q) {
  using vec = lanes_t<acc_t>;
  lane_sums<NV>(
      n,
      [&](int64_t i, vec& vs, vec& vq) {
        const vec d = load_lanes<Mode>(p + i, k);
        vs += d;
        vq += d * d;
      },
      [&](int64_t i, acc_t& ds, acc_t& dq) {
        const acc_t d = load_input<Mode, acc_t>(p[i]) - k;
        ds += d;
        dq += d * d;
      },
      s, q);
}

// Planes are visited in memory order (plane p = n·C + c), each thread merging into its own
// per-channel partials: walking one channel's N planes instead would jump C·S values between
// short runs, which the hardware prefetcher does not follow (3–4× slower at 8×8 maps).
// A plane is read once, its sums shifted by the channel's running mean; a small plane adds into
// the channel's lanes and several planes share one merge, which would otherwise cost more than
// reading 8×8 values. The thread's first plane of a channel has no running mean yet and is read
// twice, its own mean being the shift.
template <typename scalar_t, typename acc_t, int Mode>
void stats_planes(const scalar_t* x, const Geometry& geo, double* mean_out, double* var_out) {
  constexpr int V = kLanes<acc_t>;
  const int64_t S = geo.S, C = geo.C;
  const int nthreads = at::get_num_threads();
  std::vector<double> t_n(nthreads * C, 0.0), t_mean(nthreads * C, 0.0), t_m2(nthreads * C, 0.0);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, S));
  at::parallel_for(0, geo.N * C, grain, [&](int64_t p0, int64_t p1) {
    const int tid = at::get_thread_num();
    double* pn = &t_n[tid * C];
    double* pmean = &t_mean[tid * C];
    double* pm2 = &t_m2[tid * C];
    std::vector<acc_t> lanes(2 * C * V, acc_t(0)), shift(C);
    std::vector<int64_t> count(C, 0);
    // The thread's first plane of each channel: its mean is the channel's first shift.
    for (int64_t plane = p0, c = p0 % C; plane < std::min(p1, p0 + C);
         ++plane, c = (c + 1 == C) ? 0 : c + 1) {
      const scalar_t* p = x + plane * S;
      acc_t s[V] = {}, q[V] = {};
      const acc_t k = load_input<Mode, acc_t>(p[0]);
      shifted_lanes<Mode>(p, S, k, s, q);
      double sd = 0;
      for (int j = 0; j < V; ++j) sd += s[j];
      shift[c] = static_cast<acc_t>(k + sd / static_cast<double>(S));
    }
    // Runs of planes in which every channel takes in about kMergeValues values, each run then
    // merged: no test per plane.
    const int64_t run = C * std::max<int64_t>(1, kMergeValues / S);
    for (int64_t r0 = p0; r0 < p1; r0 += run) {
      const int64_t r1 = std::min(p1, r0 + run);
      for (int64_t plane = r0, c = r0 % C; plane < r1; ++plane, c = (c + 1 == C) ? 0 : c + 1) {
        const scalar_t* p = x + plane * S;
        acc_t* s = &lanes[2 * c * V];
        switch (S / V) {  // the same case for every plane: predicted
          case 1: shifted_lanes<Mode, 1>(p, S, shift[c], s, s + V); break;
          case 2: shifted_lanes<Mode, 2>(p, S, shift[c], s, s + V); break;
          case 3: shifted_lanes<Mode, 3>(p, S, shift[c], s, s + V); break;
          case 4: shifted_lanes<Mode, 4>(p, S, shift[c], s, s + V); break;
          default: shifted_lanes<Mode>(p, S, shift[c], s, s + V);
        }
        count[c] += S;
      }
      for (int64_t c = 0; c < C; ++c) {
        if (count[c] == 0) continue;
        double sd, qd;
        take_lanes(&lanes[2 * c * V], sd, qd);
        const double n = static_cast<double>(count[c]);
        double mean_b, m2_b;
        shifted_to_block(static_cast<double>(shift[c]), sd, qd, n, mean_b, m2_b);
        chan_merge(pn[c], pmean[c], pm2[c], n, mean_b, m2_b);
        shift[c] = static_cast<acc_t>(pmean[c]);
        count[c] = 0;
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double n = 0, mean = 0, m2 = 0;
    for (int t = 0; t < nthreads; ++t)
      chan_merge(n, mean, m2, t_n[t * C + c], t_mean[t * C + c], t_m2[t * C + c]);
    mean_out[c] = mean;
    var_out[c] = n > 0 ? m2 / n : 0.0;
  }
}

// Two per-channel sums over a block of m rows (stride C) in the rows-by-channels layout, shared
// by stats (Σ(t − k), Σ(t − k)²) and backward_reduce (Σg', Σg'·(t_in − mean)). term(i, c, a, b)
// adds element i's contributions (channel c) to a and b.
//
// W channels at a compile-time width keep all sums in registers: W·U of them in flight (U rows
// at a time) hide the add latency, where one row at a time through per-channel arrays in memory
// waits on store forwarding at every row.
template <int W, int U, typename acc_t, typename Term>
inline void column_sums(int64_t c0, int64_t C, int64_t m, const Term& term,
                        acc_t* __restrict__ a_out, acc_t* __restrict__ b_out) {
  acc_t a[U][W] = {}, b[U][W] = {};
  int64_t r = 0;
  for (; r + U <= m; r += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const int64_t row = (r + u) * C + c0;
#pragma omp simd
      for (int j = 0; j < W; ++j) term(row + j, c0 + j, a[u][j], b[u][j]);
    }
  }
  for (; r < m; ++r) {
    const int64_t row = r * C + c0;
#pragma omp simd
    for (int j = 0; j < W; ++j) term(row + j, c0 + j, a[0][j], b[0][j]);
  }
#pragma omp simd
  for (int j = 0; j < W; ++j) {
    acc_t sa = 0, sb = 0;
    for (int u = 0; u < U; ++u) sa += a[u][j], sb += b[u][j];
    a_out[c0 + j] = sa;
    b_out[c0 + j] = sb;
  }
}

// Every channel of the block: chunks of 4, 2 and 1 vectors of channels, then the w < kLanes
// channels left over at a runtime width.
template <typename acc_t, typename Term>
void block_column_sums(int64_t C, int64_t m, const Term& term, acc_t* a, acc_t* b) {
  constexpr int V = kLanes<acc_t>;
  int64_t c = 0;
  for (; c + 4 * V <= C; c += 4 * V) column_sums<4 * V, 1>(c, C, m, term, a, b);
  if (c + 2 * V <= C) {
    column_sums<2 * V, 2>(c, C, m, term, a, b);
    c += 2 * V;
  }
  if (c + V <= C) {
    column_sums<V, 4>(c, C, m, term, a, b);
    c += V;
  }
  if (c < C) {
    std::fill(a + c, a + C, acc_t(0));
    std::fill(b + c, b + C, acc_t(0));
    for (int64_t r = 0; r < m; ++r) {
#pragma omp simd
      for (int64_t j = c; j < C; ++j) term(r * C + j, j, a[j], b[j]);
    }
  }
}

// stats' sums of a block: Σ(t − k) and Σ(t − k)² as the norm sees t.
template <int Mode, typename scalar_t, typename acc_t>
void shifted_rows(const scalar_t* __restrict__ x, int64_t C, int64_t m,
                  const acc_t* __restrict__ k, acc_t* s, acc_t* q) {
  block_column_sums(C, m, [&](int64_t i, int64_t c, acc_t& ds, acc_t& dq) {
    const acc_t d = load_input<Mode, acc_t>(x[i]) - k[c];
    ds += d;
    dq += d * d;
  }, s, q);
}

// A block of rows is read once, its sums shifted by the thread's running mean of each channel;
// the thread's first block has none yet and is read twice, its own mean being the shift.
template <typename scalar_t, typename acc_t, int Mode>
void stats_rows(const scalar_t* x, const Geometry& geo, double* mean_out, double* var_out) {
  const int64_t C = geo.C, rows = geo.rows();
  const int nthreads = at::get_num_threads();
  const int64_t block = rows_per_reduce_block(C, rows, nthreads);
  const int64_t nblocks = (rows + block - 1) / block;
  // Per-thread partial (count, mean, m2) in double, merged at the end.
  std::vector<double> t_n(nthreads, 0.0), t_mean(nthreads * C, 0.0), t_m2(nthreads * C, 0.0);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    const int tid = at::get_thread_num();
    std::vector<acc_t> shift(C), sum(C), sq(C);
    acc_t* __restrict__ k = shift.data();
    acc_t* __restrict__ s = sum.data();
    acc_t* __restrict__ q = sq.data();
    double* __restrict__ pmean = &t_mean[tid * C];
    double* __restrict__ pm2 = &t_m2[tid * C];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * block, m = std::min(rows, r0 + block) - r0;
      const scalar_t* xb = x + r0 * C;
      const double nb = static_cast<double>(m), n = t_n[tid];
      if (n == 0) {
        for (int64_t c = 0; c < C; ++c) k[c] = load_input<Mode, acc_t>(xb[c]);
        shifted_rows<Mode>(xb, C, m, k, s, q);
        for (int64_t c = 0; c < C; ++c) k[c] = static_cast<acc_t>(k[c] + s[c] / nb);
      }
      shifted_rows<Mode>(xb, C, m, k, s, q);
      // chan_merge for all channels at once: they share the counts.
      const double f = nb / (n + nb), g = n * f;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        double mean_b, m2_b;
        shifted_to_block(static_cast<double>(k[c]), s[c], q[c], nb, mean_b, m2_b);
        const double delta = mean_b - pmean[c];
        pmean[c] += delta * f;
        pm2[c] += m2_b + delta * delta * g;
        k[c] = static_cast<acc_t>(pmean[c]);
      }
      t_n[tid] = n + nb;
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double n = 0, mean = 0, m2 = 0;
    for (int t = 0; t < nthreads; ++t) chan_merge(n, mean, m2, t_n[t], t_mean[t * C + c], t_m2[t * C + c]);
    mean_out[c] = mean;
    var_out[c] = n > 0 ? m2 / n : 0.0;
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

// Runs of 16-bit values go through acc_t buffers of kConvertBlock values on the stack: GCC keeps
// the bf16/fp16 conversions scalar, and in a scalar loop a ReLU's select stays a branch,
// mispredicted on half of the values (apply with the ReLU after ran 4x slower than without).
// Converted, the arithmetic runs in the same vectorized loop as float32's.
constexpr int64_t kConvertBlock = 256;

// body(i0, len, in, out) computes out[0..len) from the N inputs in[k][0..len): acc_t values
// [i0, i0 + len) of a run of n. For acc_t data it is called once on the data itself.
template <typename scalar_t, typename acc_t, size_t N, typename Body>
inline void map_run(int64_t n, const std::array<const scalar_t*, N>& in, scalar_t* out,
                    const Body& body) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    body(int64_t(0), n, in, out);
  } else {
    acc_t in_block[N][kConvertBlock], out_block[kConvertBlock];
    std::array<const acc_t*, N> converted;
    for (size_t k = 0; k < N; ++k) converted[k] = in_block[k];
    for (int64_t i0 = 0; i0 < n; i0 += kConvertBlock) {
      const int64_t len = std::min(kConvertBlock, n - i0);
      for (size_t k = 0; k < N; ++k)
        for (int64_t i = 0; i < len; ++i) in_block[k][i] = static_cast<acc_t>(in[k][i0 + i]);
      body(i0, len, converted, out_block);
      for (int64_t i = 0; i < len; ++i) out[i0 + i] = static_cast<scalar_t>(out_block[i]);
    }
  }
}

template <typename scalar_t, typename acc_t, int Mode>
void apply_kernel(const scalar_t* x, scalar_t* y, const Geometry& geo, const acc_t* scale,
                  const acc_t* shift, const acc_t* shift_lo) {
  const int64_t C = geo.C;
  for_each_run(
      geo,
      [&](int64_t c, int64_t off, int64_t n) {
        const acc_t s = scale[c], b = shift[c], bl = shift_lo[c];
        map_run<scalar_t, acc_t, 1>(n, {x + off}, y + off,
            [&](int64_t, int64_t len, const auto& in, acc_t* __restrict__ yp) {
              const acc_t* __restrict__ xp = in[0];
#pragma omp simd
              for (int64_t i = 0; i < len; ++i)
                yp[i] = normalize<Mode, acc_t>(xp[i], s, b, bl);
            });
      },
      [&](int64_t off) {
        map_run<scalar_t, acc_t, 1>(C, {x + off}, y + off,
            [&](int64_t c0, int64_t len, const auto& in, acc_t* __restrict__ yp) {
              const acc_t* __restrict__ xp = in[0];
              const acc_t* __restrict__ sp = scale + c0;
              const acc_t* __restrict__ bp = shift + c0;
              const acc_t* __restrict__ lp = shift_lo + c0;
#pragma omp simd
              for (int64_t c = 0; c < len; ++c)
                yp[c] = normalize<Mode, acc_t>(xp[c], sp[c], bp[c], lp[c]);
            });
      });
}

// dx may be g itself (backward_apply_into): every element is read before it is written and
// no other element is, so the passes carry no __restrict__ on g and dx; `omp simd` is what
// vectorizes them.
template <typename scalar_t, typename acc_t, int Mode>
void backward_apply_kernel(const scalar_t* g, const scalar_t* x, scalar_t* dx,
                           const Geometry& geo, const acc_t* mean_hi, const acc_t* mean_lo,
                           const acc_t* scale, const acc_t* shift, const acc_t* shift_lo,
                           const acc_t* k1, const acc_t* k2, const acc_t* k3) {
  const int64_t C = geo.C;
  for_each_run(
      geo,
      [&](int64_t c, int64_t off, int64_t n) {
        const acc_t s = scale[c], b = shift[c], bl = shift_lo[c], mh = mean_hi[c],
                    ml = mean_lo[c], a1 = k1[c], a2 = k2[c], a3 = k3[c];
        map_run<scalar_t, acc_t, 2>(n, {g + off, x + off}, dx + off,
            [&](int64_t, int64_t len, const auto& in, acc_t* dp) {
              const acc_t *gp = in[0], *xp = in[1];
#pragma omp simd
              for (int64_t i = 0; i < len; ++i)
                dp[i] = input_grad<Mode, acc_t>(gp[i], xp[i], s, b, bl, mh, ml, a1, a2, a3);
            });
      },
      [&](int64_t off) {
        map_run<scalar_t, acc_t, 2>(C, {g + off, x + off}, dx + off,
            [&](int64_t c0, int64_t len, const auto& in, acc_t* dp) {
              const acc_t *gp = in[0], *xp = in[1];
              const acc_t *__restrict__ sp = scale + c0, *__restrict__ bp = shift + c0,
                          *__restrict__ hp = mean_hi + c0, *__restrict__ lp = mean_lo + c0,
                          *__restrict__ blp = shift_lo + c0;
              const acc_t *__restrict__ p1 = k1 + c0, *__restrict__ p2 = k2 + c0,
                          *__restrict__ p3 = k3 + c0;
#pragma omp simd
              for (int64_t c = 0; c < len; ++c)
                dp[c] = input_grad<Mode, acc_t>(gp[c], xp[c], sp[c], bp[c], blp[c], hp[c], lp[c],
                                                p1[c], p2[c], p3[c]);
            });
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

// backward_reduce's sums of a run: Σg' and Σg'·(t_in − m).
template <int Mode, typename scalar_t, typename acc_t>
inline void grad_lanes(const scalar_t* __restrict__ gp, const scalar_t* __restrict__ xp,
                       int64_t n, acc_t s, acc_t b, acc_t bl, acc_t mh, acc_t ml,
                       acc_t* __restrict__ sg, acc_t* __restrict__ sgt) {
  using vec = lanes_t<acc_t>;
  const vec zero = {};
  lane_sums(
      n,
      [&](int64_t i, vec& vg, vec& vgt) {
        const vec t = load_lanes<RELU_NONE>(xp + i, acc_t(0));
        vec g = load_lanes<RELU_NONE>(gp + i, acc_t(0));
        if constexpr (Mode == RELU_AFTER) {
          vec pre;
          for (int j = 0; j < kLanes<acc_t>; ++j) pre[j] = pre_activation(t[j], s, b, bl);
          g = pre > zero ? g : zero;
        }
        const vec in = Mode == RELU_BEFORE ? (t < zero ? zero : t) : t;
        vg += g;
        vgt += g * ((in - mh) - ml);
      },
      [&](int64_t i, acc_t& dg, acc_t& dgt) {
        const acc_t t = static_cast<acc_t>(xp[i]);
        const acc_t gv = load_grad<Mode, acc_t>(gp[i], t, s, b, bl);
        dg += gv;
        dgt += gv * (((Mode == RELU_BEFORE ? relu(t) : t) - mh) - ml);
      },
      sg, sgt);
}

// Memory order with per-thread per-channel sums, as stats_planes, and as there a plane adds
// into its channel's lanes, summed into the double partials after runs of ~kMergeValues values
// per channel.
template <typename scalar_t, typename acc_t, int Mode>
void backward_reduce_planes(const scalar_t* g, const scalar_t* x, const Geometry& geo,
                            const acc_t* mean_hi, const acc_t* mean_lo, const acc_t* scale,
                            const acc_t* shift, const acc_t* shift_lo,
                            acc_t* sum_g_out, acc_t* sum_gt_out) {
  constexpr int V = kLanes<acc_t>;
  const int64_t S = geo.S, C = geo.C;
  const int nthreads = at::get_num_threads();
  std::vector<double> t_g(nthreads * C, 0.0), t_gt(nthreads * C, 0.0);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, S));
  at::parallel_for(0, geo.N * C, grain, [&](int64_t p0, int64_t p1) {
    const int tid = at::get_thread_num();
    std::vector<acc_t> lanes(2 * C * V, acc_t(0));
    const int64_t run = C * std::max<int64_t>(1, kMergeValues / S);
    for (int64_t r0 = p0; r0 < p1; r0 += run) {
      const int64_t r1 = std::min(p1, r0 + run);
      for (int64_t plane = r0, c = r0 % C; plane < r1; ++plane, c = (c + 1 == C) ? 0 : c + 1) {
        acc_t* sg = &lanes[2 * c * V];
        grad_lanes<Mode>(g + plane * S, x + plane * S, S, scale[c], shift[c], shift_lo[c],
                         mean_hi[c], mean_lo[c], sg, sg + V);
      }
      for (int64_t c = 0; c < C; ++c) {
        double a, b;
        take_lanes(&lanes[2 * c * V], a, b);
        t_g[tid * C + c] += a;
        t_gt[tid * C + c] += b;
      }
    }
  });
  sum_thread_partials(t_g, t_gt, nthreads, C, sum_g_out, sum_gt_out);
}

// Blocks of rows as stats_rows, each block's sums of every channel (block_column_sums) added
// into the thread's double partials.
template <typename scalar_t, typename acc_t, int Mode>
void backward_reduce_rows(const scalar_t* g, const scalar_t* x, const Geometry& geo,
                          const acc_t* mean_hi, const acc_t* mean_lo, const acc_t* scale,
                          const acc_t* shift, const acc_t* shift_lo,
                          acc_t* sum_g_out, acc_t* sum_gt_out) {
  const int64_t C = geo.C, rows = geo.rows();
  const int nthreads = at::get_num_threads();
  const int64_t block = rows_per_reduce_block(C, rows, nthreads);
  const int64_t nblocks = (rows + block - 1) / block;
  std::vector<double> t_g(nthreads * C, 0.0), t_gt(nthreads * C, 0.0);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    const int tid = at::get_thread_num();
    std::vector<acc_t> bg(C), bgt(C);
    acc_t* __restrict__ sg = bg.data();
    acc_t* __restrict__ sgt = bgt.data();
    double* __restrict__ pg = &t_g[tid * C];
    double* __restrict__ pgt = &t_gt[tid * C];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * block, m = std::min(rows, r0 + block) - r0;
      const scalar_t* gb = g + r0 * C;
      const scalar_t* xb = x + r0 * C;
      block_column_sums(C, m, [&](int64_t i, int64_t c, acc_t& dg, acc_t& dgt) {
        const acc_t t = static_cast<acc_t>(xb[i]);
        const acc_t gv = load_grad<Mode, acc_t>(gb[i], t, scale[c], shift[c], shift_lo[c]);
        dg += gv;
        dgt += gv * (((Mode == RELU_BEFORE ? relu(t) : t) - mean_hi[c]) - mean_lo[c]);
      }, sg, sgt);
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) {
        pg[j] += sg[j];
        pgt[j] += sgt[j];
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

std::tuple<at::Tensor, at::Tensor> stats(const at::Tensor& t, int64_t relu_mode, bool exact) {
  const char* op = "bnorder_cpu::stats";
  const Geometry geo = geometry_of(t, op);
  check_relu_mode(relu_mode, op);
  TORCH_CHECK(geo.N * geo.S > 0, op, ": cannot compute statistics of an empty tensor (size ",
              t.sizes(), ")");
  // The kernels merge in double; `exact` returns that, not its float32 rounding (the
  // synchronized merge of several processes' statistics needs the digits, see fused/sync.py).
  auto mean = at::empty({geo.C}, t.options().dtype(at::kDouble));
  auto var = at::empty({geo.C}, t.options().dtype(at::kDouble));
  BNORDER_DISPATCH_TYPES(t, "bnorder_stats", [&] {
    using acc_t = acc_of<scalar_t>;
    BNORDER_DISPATCH_RELU(relu_mode, [&] {
      // Only RELU_BEFORE changes what the statistics see.
      constexpr int M = Mode == RELU_BEFORE ? RELU_BEFORE : RELU_NONE;
      if (geo.rows_by_channels)
        stats_rows<scalar_t, acc_t, M>(t.const_data_ptr<scalar_t>(), geo,
                                       mean.mutable_data_ptr<double>(), var.mutable_data_ptr<double>());
      else
        stats_planes<scalar_t, acc_t, M>(t.const_data_ptr<scalar_t>(), geo,
                                         mean.mutable_data_ptr<double>(), var.mutable_data_ptr<double>());
    });
  });
  if (exact || acc_type_of(t) == at::kDouble) return {mean, var};
  return {mean.to(acc_type_of(t)), var.to(acc_type_of(t))};
}

at::Tensor apply(const at::Tensor& t, const at::Tensor& mean, const at::Tensor& scale,
                 const at::Tensor& shift, int64_t relu_mode) {
  const char* op = "bnorder_cpu::apply";
  const Geometry geo = geometry_of(t, op);
  check_relu_mode(relu_mode, op);
  check_mean_vector(mean, t, op);
  check_channel_vector(scale, "scale", t, op);
  check_channel_vector(shift, "shift", t, op);
  auto out = at::empty_like(t);
  if (t.numel() == 0) return out;
  BNORDER_DISPATCH_TYPES(t, "bnorder_apply", [&] {
    using acc_t = acc_of<scalar_t>;
    const ChannelTerms<acc_t> k(mean, scale, shift);
    BNORDER_DISPATCH_RELU(relu_mode, [&] {
      apply_kernel<scalar_t, acc_t, Mode>(t.const_data_ptr<scalar_t>(),
                                          out.mutable_data_ptr<scalar_t>(), geo,
                                          scale.const_data_ptr<acc_t>(), k.b.data(),
                                          k.b_lo.data());
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
  check_mean_vector(mean, t, op);
  check_channel_vector(scale, "scale", t, op);
  check_channel_vector(shift, "shift", t, op);
  auto sum_g = at::zeros({geo.C}, t.options().dtype(acc_type_of(t)));
  auto sum_gt = at::zeros({geo.C}, t.options().dtype(acc_type_of(t)));
  if (t.numel() == 0) return {sum_g, sum_gt};
  BNORDER_DISPATCH_TYPES(t, "bnorder_backward_reduce", [&] {
    using acc_t = acc_of<scalar_t>;
    const ChannelTerms<acc_t> k(mean, scale, shift);
    BNORDER_DISPATCH_RELU(relu_mode, [&] {
      auto kernel = geo.rows_by_channels ? backward_reduce_rows<scalar_t, acc_t, Mode>
                                         : backward_reduce_planes<scalar_t, acc_t, Mode>;
      kernel(g.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), geo,
             k.hi.data(), k.lo.data(), scale.const_data_ptr<acc_t>(), k.b.data(), k.b_lo.data(),
             sum_g.mutable_data_ptr<acc_t>(),
             sum_gt.mutable_data_ptr<acc_t>());
    });
  });
  return {sum_g, sum_gt};
}

void backward_apply_into(const at::Tensor& g, const at::Tensor& t, const at::Tensor& mean,
                         const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& k1,
                         const at::Tensor& k2, const at::Tensor& k3, int64_t relu_mode,
                         at::Tensor& dx) {
  const char* op = "bnorder_cpu::backward_apply";
  const Geometry geo = geometry_of(t, op);
  check_like(g, t, geo, op);
  check_like(dx, t, geo, op);
  check_relu_mode(relu_mode, op);
  const std::pair<const at::Tensor*, const char*> vectors[] = {
      {&scale, "scale"}, {&shift, "shift"}, {&k1, "k1"}, {&k2, "k2"}, {&k3, "k3"}};
  check_mean_vector(mean, t, op);
  for (const auto& [v, name] : vectors) check_channel_vector(*v, name, t, op);
  TORCH_CHECK(same_or_apart(dx, g) && same_or_apart(dx, t), op,
              ": the output must be g or t itself or share no memory with them");
  if (t.numel() == 0) return;
  BNORDER_DISPATCH_TYPES(t, "bnorder_backward_apply", [&] {
    using acc_t = acc_of<scalar_t>;
    const ChannelTerms<acc_t> k(mean, scale, shift);
    BNORDER_DISPATCH_RELU(relu_mode, [&] {
      backward_apply_kernel<scalar_t, acc_t, Mode>(
          g.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
          dx.mutable_data_ptr<scalar_t>(), geo, k.hi.data(), k.lo.data(),
          scale.const_data_ptr<acc_t>(), k.b.data(), k.b_lo.data(),
          k1.const_data_ptr<acc_t>(), k2.const_data_ptr<acc_t>(), k3.const_data_ptr<acc_t>());
    });
  });
}

at::Tensor backward_apply(const at::Tensor& g, const at::Tensor& t, const at::Tensor& mean,
                          const at::Tensor& scale, const at::Tensor& shift,
                          const at::Tensor& k1, const at::Tensor& k2, const at::Tensor& k3,
                          int64_t relu_mode) {
  auto dx = at::empty_like(t);  // backward_apply_into checks t, g and dx
  backward_apply_into(g, t, mean, scale, shift, k1, k2, k3, relu_mode, dx);
  return dx;
}

}  // namespace bnorder
