// Fused GPSA forward and backward on the CPU, and the definition of the
// extension's op pair (convit_kernels_ext::gpsa_fwd / gpsa_bwd).
//
// Flash style: a block of query rows at a time with the whole key row in one
// tile (N = 196 fits), so the content softmax is exact. Scratch is per thread and
// O(block x N + N d); the positional probabilities are generated a row at a time from
// the per-axis tables (P_ij = px[x_i, x_j] py[y_i, y_j], H (W^2 + H_p^2) numbers), or,
// on grids where those would be large (strips), from axis rows made for each query row.
// The products on tiles go to BLAS (sgemm_/dgemm_, which libtorch_cpu exports
// on x86-64), with a portable loop version where the symbol is missing or the
// op is called with use_blas=False (the backend's reading of its setting).
//
// Forward, per (batch, head, query block), the fused form's 4 B H N^2 d FLOPs:
//   S = scale q k^T; E = exp(S - rowmax) (the row's max and sum kept: RowSoftmax, gpsa_common.h);
//   M = ((1 - g) / rowsum(E)) E + g P, mixed in place of E; out = M v (B x N x H x d).
// Backward, per (batch, head), a loop over query blocks (10 B H N^2 d FLOPs):
//   recompute S, A = exp(S - max) / rowsum(exp(S - max)) (the forward's max, the recomputed
//   row's sum), T = dO v^T, delta_c = rowsum(A o T), delta_p = rowsum(P o T); per element
//   (gpsa_common.h) dS, ds, M; dv += M^T dO, dq = scale dS k, dk += scale dS^T q;
//   dw and dgating from per-(batch, head) partials summed over the batch in a fixed order.

#include <Python.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "../gpsa_common.h"
#include "../gpsa_ops.h"
#include "simd.h"

// Fortran BLAS, declared weak: present in libtorch_cpu on x86-64 (MKL), absent elsewhere.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace convit_kernels {
namespace {

// Query rows per block. At N = 196 one block takes a whole (batch, head): the
// larger tile products ran fastest, and B x H tasks still keep the cores busy.
constexpr int64_t kMaxBlockRows = 256;
// Numbers in a block's bm x N tile at most (4 MB in float32).
constexpr int64_t kMaxBlockNumbers = int64_t(1) << 20;

// A CPU, contiguous copy of t in dtype (t itself when it already is one).
Tensor cpu_contiguous(const Tensor& t, ScalarType dtype) {
  const torch::stable::Device cpu(torch::headeronly::DeviceType::CPU);
  return torch::stable::contiguous(torch::stable::to(t, dtype, std::nullopt, cpu));
}


// ------------------------------------------------------------------ tile products

// C = alpha op(A) op(B) + beta C on row-major matrices; op(A) is m x k, op(B) is k x n.
template <typename T>
void portable_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                   const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    T* c_row = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) c_row[j] = beta == T(0) ? T(0) : beta * c_row[j];
    if (!trans_b) {  // rows of B are contiguous: axpy form
      for (int64_t p = 0; p < k; ++p) {
        const T a_ip = alpha * (trans_a ? a[p * lda + i] : a[i * lda + p]);
        const T* b_row = b + p * ldb;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) c_row[j] += a_ip * b_row[j];
      }
    } else {  // columns of op(B) are rows of B: dot form
      for (int64_t j = 0; j < n; ++j) {
        const T* b_row = b + j * ldb;
        T dot = 0;
        if (trans_a) {
          for (int64_t p = 0; p < k; ++p) dot += a[p * lda + i] * b_row[p];
        } else {
#pragma omp simd reduction(+ : dot)
          for (int64_t p = 0; p < k; ++p) dot += a[i * lda + p] * b_row[p];
        }
        c_row[j] += alpha * dot;
      }
    }
  }
}

template <typename T>
void gemm(bool use_blas, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  constexpr bool is_float = std::is_same_v<T, float>;
  const bool have_blas = is_float ? sgemm_ != nullptr : dgemm_ != nullptr;
  if (!have_blas || !use_blas) {
    portable_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  // Column-major BLAS computes the row-major C as C^T = op(B)^T op(A)^T.
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int mi = int(m), ni = int(n), ki = int(k), lda_i = int(lda), ldb_i = int(ldb), ldc_i = int(ldc);
  if constexpr (is_float) {
    sgemm_(&tb, &ta, &ni, &mi, &ki, &alpha, b, &ldb_i, a, &lda_i, &beta, c, &ldc_i);
  } else {
    dgemm_(&tb, &ta, &ni, &mi, &ki, &alpha, b, &ldb_i, a, &lda_i, &beta, c, &ldc_i);
  }
}

// ------------------------------------------------------------------ vectorised elementwise loops (on simd.h)

// expf to a few ulp on float or floatx8 (Cephes' reduction and polynomial),
// for arguments <= 0 as softmax gives it; std::exp for double.
template <typename V>
V fast_exp(V x) {
  if constexpr (std::is_same_v<V, double>) {
    return std::exp(x);
  } else {
    using I = std::conditional_t<std::is_same_v<V, float>, int32_t, intx8>;
    x = x < -87.0f ? V{} - 87.0f : x;
    x = x > 88.0f ? V{} + 88.0f : x;
    const V round_magic = V{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const V n = (x * 1.44269504088896341f + round_magic) - round_magic;
    V r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    V poly = V{} + 1.9875691500e-4f;
    poly = poly * r + 1.3981999507e-3f;
    poly = poly * r + 8.3334519073e-3f;
    poly = poly * r + 4.1665795894e-2f;
    poly = poly * r + 1.6666665459e-1f;
    poly = poly * r + 5.0000001201e-1f;
    const V exp_r = poly * r * r + r + 1.0f;
    I n_int;
    if constexpr (std::is_same_v<V, float>) {
      n_int = static_cast<int32_t>(n);
    } else {
      n_int = __builtin_convertvector(n, intx8);
    }
    const I bits = (n_int + 127) << 23;
    V two_n;
    std::memcpy(&two_n, &bits, sizeof(V));
    return exp_r * two_n;
  }
}

// Softmax of one row in place, not normalised: row[j] = exp(row[j] - max). The
// caller divides the row's product with v by the sum (d values, not N).
template <typename acc_t>
RowSoftmax<acc_t> exp_row(acc_t* row, int64_t n) {
  using V = typename Simd<acc_t>::type;
  V vec_max = V{} - INFINITY;
  acc_t row_max = -INFINITY;
  simd_loop<acc_t>(n, [&](auto lane, int64_t j) {
    using L = decltype(lane);
    const L x = load<L>(row + j);
    if constexpr (std::is_same_v<L, V>) {
      vec_max = x > vec_max ? x : vec_max;
    } else {
      row_max = x > row_max ? x : row_max;
    }
  });
  row_max = std::max(row_max, lane_max(vec_max));
  SimdSum<acc_t> exp_sum;
  simd_loop<acc_t>(n, [&](auto lane, int64_t j) {
    using L = decltype(lane);
    const L e = fast_exp(load<L>(row + j) - row_max);
    store(row + j, e);
    exp_sum.add(e);
  });
  return {row_max, exp_sum.total()};
}

// ------------------------------------------------------------------ positional tables

// Whole per-axis tables only where they hold at most this many numbers a token (a 1 x 4096 strip's px is
// 4096^2 a head); elsewhere each row of P makes its two axis rows on the fly: W + H_p exps beside the
// row's N content ones. The number is convit_kernels.build_config.WHOLE_TABLES_PER_TOKEN, handed over by
// its cxx_flags(), so that this kernel and the torch contractions split grids at the same place.
#ifndef CONVIT_WHOLE_TABLES_PER_TOKEN
#error "build with convit_kernels.build_config.cxx_flags(): it defines CONVIT_WHOLE_TABLES_PER_TOKEN"
#endif
constexpr int64_t kWholeTablesPerToken = CONVIT_WHOLE_TABLES_PER_TOKEN;

// Per-axis positional softmaxes px (H x W x W) and py (H x H_p x H_p), whole where they fit, and the
// patch coordinates (x_n, y_n) of each patch in acc_t.
template <typename acc_t>
struct PositionalTables {
  int64_t heads, grid_h, grid_w;
  bool whole;
  std::vector<acc_t> weights, px, py, x_of, y_of;  // weights: pos_weight, H x 3

  PositionalTables(const Tensor& pos_weight, int64_t grid_h_, int64_t grid_w_)
      : heads(pos_weight.size(0)), grid_h(grid_h_), grid_w(grid_w_) {
    constexpr ScalarType acc_dtype = std::is_same_v<acc_t, double> ? ScalarType::Double : ScalarType::Float;
    const Tensor w = cpu_contiguous(pos_weight, acc_dtype);
    const acc_t* wp = static_cast<const acc_t*>(w.data_ptr());
    weights.assign(wp, wp + heads * 3);
    whole = grid_w * grid_w + grid_h * grid_h <= kWholeTablesPerToken * grid_h * grid_w;
    if (whole) {
      px.resize(heads * grid_w * grid_w);
      py.resize(heads * grid_h * grid_h);
      for (int64_t t = 0; t < heads * (grid_w + grid_h); ++t)
        axis_tables_row<acc_t>(wp, int(heads), int(grid_h), int(grid_w), int(t), px.data(), py.data());
    }
    for (int64_t n = 0; n < grid_h * grid_w; ++n) {
      x_of.push_back(acc_t(n % grid_w));
      y_of.push_back(acc_t(n / grid_w));
    }
  }
  // Room a thread gives positional_row for the axis rows it makes (none where the tables are whole).
  int64_t axis_room() const { return whole ? 0 : grid_w + grid_h; }
  // Row x of head h's px and row y of its py: the whole tables' rows, else made in room (axis_room numbers),
  // by the function that makes the whole tables' rows: the same numbers either way.
  std::pair<const acc_t*, const acc_t*> axis_rows(int64_t h, int64_t x, int64_t y, acc_t* room) const {
    if (whole) return {&px[(h * grid_w + x) * grid_w], &py[(h * grid_h + y) * grid_h]};
    axis_softmax_row<acc_t>(weights[3 * h + 0], weights[3 * h + 2], int(x), int(grid_w), room);
    axis_softmax_row<acc_t>(weights[3 * h + 1], weights[3 * h + 2], int(y), int(grid_h), room + grid_w);
    return {room, room + grid_w};
  }
};

// Row i of head h's positional attention, P[i, (y_j, x_j)] = py[y_i, y_j] px[x_i, x_j], into row[0, N);
// room: tables.axis_room() numbers of the calling thread's.
template <typename acc_t>
void positional_row(const PositionalTables<acc_t>& tables, int64_t h, int64_t i, acc_t* row, acc_t* room) {
  const int64_t grid_w = tables.grid_w;
  const auto [pxr, pyr] = tables.axis_rows(h, i % grid_w, i / grid_w, room);
  for (int64_t yj = 0; yj < tables.grid_h; ++yj) {
    const acc_t py_value = pyr[yj];
    acc_t* dst = row + yj * grid_w;
#pragma omp simd
    for (int64_t xj = 0; xj < grid_w; ++xj) dst[xj] = py_value * pxr[xj];
  }
}

std::vector<double> gate_values(const Tensor& gating_param) {
  const Tensor lam = cpu_contiguous(gating_param, ScalarType::Double);
  const double* p = static_cast<const double*>(lam.data_ptr());
  return std::vector<double>(p, p + lam.numel());
}

// Query blocks of at most kMaxBlockRows rows and kMaxBlockNumbers / N, balanced (N = 576: 3 blocks of
// 192): a thread's block x N tiles stay a few MB at any N (a 1 x 65536 strip: blocks of 16 rows).
struct QueryBlocks {
  int64_t count, rows;
  explicit QueryBlocks(int64_t seq_len) {
    const int64_t max_rows = std::clamp<int64_t>(kMaxBlockNumbers / std::max<int64_t>(seq_len, 1), 1, kMaxBlockRows);
    count = (seq_len + max_rows - 1) / max_rows;
    rows = (seq_len + count - 1) / count;
  }
};

// ------------------------------------------------------------------ forward

template <typename scalar_t, typename acc_t>
void forward_kernel(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& pos_weight,
                    const Tensor& gating_param, const GpsaSizes& s, double scale, bool use_blas, Tensor& out,
                    Tensor& stats) {
  const int64_t N = s.seq_len, d = s.head_dim, H = s.heads;
  const PositionalTables<acc_t> tables(pos_weight, s.grid_h, s.grid_w);
  const std::vector<double> lambdas = gate_values(gating_param);
  const QueryBlocks blocks(N);
  const auto q_s = bhnd_view<const scalar_t>(q), k_s = bhnd_view<const scalar_t>(k),
             v_s = bhnd_view<const scalar_t>(v);
  scalar_t* out_p = static_cast<scalar_t*>(out.data_ptr());  // B x N x H x d, contiguous
  RowSoftmax<acc_t>* stats_p = static_cast<RowSoftmax<acc_t>*>(stats.data_ptr());  // B x H x N
  // M v is written straight into out's rows when acc_t is the output type, else converted from scratch.
  constexpr bool direct_output = std::is_same_v<scalar_t, acc_t>;
  const int64_t out_ld = H * d;

  torch::stable::parallel_for(0, s.batch * H * blocks.count, 1, [&](int64_t begin, int64_t end) {
    const int64_t bm = blocks.rows;
    std::vector<acc_t> scratch(bm * N + N + tables.axis_room() + bm * d + 2 * N * d + (direct_output ? 0 : bm * d));
    acc_t* mixed = scratch.data();  // bm x N: exp(S - rowmax), then M
    acc_t* pos_row = mixed + bm * N;  // N
    acc_t* axis_buf = pos_row + N;
    acc_t* q_buf = axis_buf + tables.axis_room();
    acc_t* k_buf = q_buf + bm * d;
    acc_t* v_buf = k_buf + N * d;
    acc_t* out_buf = v_buf + N * d;  // bm x d when converting
    int64_t loaded_bh = -1;  // consecutive tasks share (b, h): load k and v once
    Tile<acc_t> k_tile{nullptr, 0}, v_tile{nullptr, 0};

    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks.count, b = bh / H, h = bh % H;
      const int64_t row0 = (task % blocks.count) * bm, rows = std::min(bm, N - row0);
      if (rows <= 0) continue;
      if (bh != loaded_bh) {
        k_tile = load_tile(k_s.slice(b, h), k_s.row_stride, k_s.col_stride, N, d, k_buf, true);
        v_tile = load_tile(v_s.slice(b, h), v_s.row_stride, v_s.col_stride, N, d, v_buf, true);
        loaded_bh = bh;
      }
      const Tile<acc_t> q_tile = load_tile(q_s.slice(b, h, row0), q_s.row_stride, q_s.col_stride, rows, d, q_buf, true);
      const Gates<acc_t> gates = gates_from_lambda(acc_t(lambdas[h]));

      gemm<acc_t>(use_blas, false, true, rows, N, d, acc_t(scale), q_tile.data, q_tile.ld, k_tile.data, k_tile.ld, 0,
                  mixed, N);
      for (int64_t r = 0; r < rows; ++r) {
        acc_t* m_row = mixed + r * N;
        const RowSoftmax<acc_t> row = exp_row(m_row, N);
        stats_p[bh * N + row0 + r] = row;
        positional_row(tables, h, row0 + r, pos_row, axis_buf);
        const acc_t content_scale = gates.content / row.sum;
        simd_loop<acc_t>(N, [&](auto lane, int64_t j) {
          using L = decltype(lane);
          store(m_row + j, content_scale * load<L>(m_row + j) + gates.pos * load<L>(pos_row + j));
        });
      }
      scalar_t* out_rows = out_p + (b * N + row0) * out_ld + h * d;
      if constexpr (direct_output) {
        gemm<acc_t>(use_blas, false, false, rows, d, N, 1, mixed, N, v_tile.data, v_tile.ld, 0, out_rows, out_ld);
      } else {
        gemm<acc_t>(use_blas, false, false, rows, d, N, 1, mixed, N, v_tile.data, v_tile.ld, 0, out_buf, d);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < d; ++c) out_rows[r * out_ld + c] = scalar_t(out_buf[r * d + c]);
      }
    }
  });
}

// ------------------------------------------------------------------ backward

template <typename scalar_t, typename acc_t>
void backward_kernel(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                     const Tensor& pos_weight, const Tensor& gating_param, const Tensor& stats,
                     const GpsaSizes& s, double scale, bool use_blas, Tensor& dq, Tensor& dk, Tensor& dv,
                     Tensor& d_pos_weight, Tensor& d_gating) {
  const int64_t B = s.batch, N = s.seq_len, d = s.head_dim, H = s.heads;
  const PositionalTables<acc_t> tables(pos_weight, s.grid_h, s.grid_w);
  const std::vector<double> lambdas = gate_values(gating_param);
  const QueryBlocks blocks(N);
  const auto q_s = bhnd_view<const scalar_t>(q), k_s = bhnd_view<const scalar_t>(k),
             v_s = bhnd_view<const scalar_t>(v), do_s = bnhd_view<const scalar_t>(grad_out);
  const RowSoftmax<acc_t>* stats_p = static_cast<const RowSoftmax<acc_t>*>(stats.data_ptr());  // B x H x N
  // Per-(batch, head) partial sums, reduced over the batch in a fixed order below.
  std::vector<double> pos_weight_partial(B * H * 3), gating_partial(B * H);
  // Gradients of q, k, v are written in place (B x N x H x d rows) when acc_t is
  // the output type, else accumulated in scratch and converted at the end.
  constexpr bool direct_output = std::is_same_v<scalar_t, acc_t>;
  const int64_t out_ld = H * d;

  torch::stable::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    const int64_t bm = blocks.rows;
    std::vector<acc_t> scratch(2 * bm * N + N + tables.axis_room() + 4 * N * d + (direct_output ? 0 : 3 * N * d));
    acc_t* mixed = scratch.data();  // bm x N: A, then M = (1 - g) A + g P
    acc_t* dlogits = mixed + bm * N;  // bm x N: T = dO v^T, then dS
    acc_t* pos_row = dlogits + bm * N;  // N: P[i, :]
    acc_t* axis_buf = pos_row + N;
    acc_t* q_buf = axis_buf + tables.axis_room();
    acc_t* k_buf = q_buf + N * d;
    acc_t* v_buf = k_buf + N * d;
    acc_t* do_buf = v_buf + N * d;
    acc_t* grad_buf = do_buf + N * d;  // 3 x N x d when converting

    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const Tile<acc_t> q_t = load_tile(q_s.slice(b, h), q_s.row_stride, q_s.col_stride, N, d, q_buf, true);
      const Tile<acc_t> k_t = load_tile(k_s.slice(b, h), k_s.row_stride, k_s.col_stride, N, d, k_buf, true);
      const Tile<acc_t> v_t = load_tile(v_s.slice(b, h), v_s.row_stride, v_s.col_stride, N, d, v_buf, true);
      const Tile<acc_t> do_t = load_tile(do_s.slice(b, h), do_s.row_stride, do_s.col_stride, N, d, do_buf, true);
      acc_t *dq_dst, *dk_dst, *dv_dst;
      int64_t grad_ld;
      if constexpr (direct_output) {
        const int64_t offset = b * N * out_ld + h * d;
        dq_dst = static_cast<acc_t*>(dq.data_ptr()) + offset;
        dk_dst = static_cast<acc_t*>(dk.data_ptr()) + offset;
        dv_dst = static_cast<acc_t*>(dv.data_ptr()) + offset;
        grad_ld = out_ld;
      } else {
        dq_dst = grad_buf;
        dk_dst = grad_buf + N * d;
        dv_dst = grad_buf + 2 * N * d;
        grad_ld = d;
      }
      const Gates<acc_t> gates = gates_from_lambda(acc_t(lambdas[h]));
      double pos_weight_acc[3] = {0, 0, 0}, gating_acc = 0;

      for (int64_t blk = 0; blk < blocks.count; ++blk) {
        const int64_t row0 = blk * bm, rows = std::min(bm, N - row0);
        if (rows <= 0) break;
        const acc_t* q_blk = q_t.row(row0);
        const acc_t* do_blk = do_t.row(row0);
        gemm<acc_t>(use_blas, false, true, rows, N, d, acc_t(scale), q_blk, q_t.ld, k_t.data, k_t.ld, 0, mixed, N);
        gemm<acc_t>(use_blas, false, true, rows, N, d, 1, do_blk, do_t.ld, v_t.data, v_t.ld, 0, dlogits, N);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = row0 + r;
          const acc_t row_max = stats_p[bh * N + i].max;
          const acc_t xi = tables.x_of[i], yi = tables.y_of[i];
          const acc_t* x_of = tables.x_of.data();
          const acc_t* y_of = tables.y_of.data();
          acc_t* m_row = mixed + r * N;
          acc_t* ds_row = dlogits + r * N;
          positional_row(tables, h, i, pos_row, axis_buf);
          // A = e / sum_j e_ij, e = exp(S - max), normalised by the sum of this recomputed row, not
          // the forward's: with BLAS the product need not repeat the forward's bits (MKL's results
          // depend on the operands' alignment), and an ulp of a logit of 1e4 is ~1e-3 on its
          // weight, which a saturated row cannot take unless its weights sum to 1. The forward's
          // max is only the shift. delta_c = sum_j A_ij T_ij, delta_p = sum_j P_ij T_ij.
          SimdSum<acc_t> exp_sum, content_dot, pos_dot;
          simd_loop<acc_t>(N, [&](auto lane, int64_t j) {
            using L = decltype(lane);
            const L e = fast_exp(load<L>(m_row + j) - row_max);
            const L t = load<L>(ds_row + j);
            store(m_row + j, e);
            exp_sum.add(e);
            content_dot.add(e * t);
            pos_dot.add(load<L>(pos_row + j) * t);
          });
          const acc_t inv_sum = acc_t(1) / exp_sum.total();
          const RowDeltas<acc_t> deltas{content_dot.total() * inv_sum, pos_dot.total()};
          // (1 - g) A = ((1 - g) / sum) exp(S - max): the normaliser goes into the gate, as in the forward.
          const acc_t content_gate = gates.content * inv_sum;
          gating_acc += double(deltas.pos) - double(deltas.content);
          SimdSum<acc_t> grad_dx, grad_dy, grad_dist2;
          simd_loop<acc_t>(N, [&](auto lane, int64_t j) {
            using L = decltype(lane);
            const Gates<L> lane_gates{L{} + gates.pos, L{} + content_gate};
            const RowDeltas<L> lane_deltas{L{} + deltas.content, L{} + deltas.pos};
            const ElementGrads<L> e =
                element_grads(load<L>(m_row + j), load<L>(pos_row + j), load<L>(ds_row + j), lane_deltas, lane_gates);
            const PosWeightGrad<L> w = pos_weight_grad_terms(e.pos, load<L>(x_of + j) - xi, load<L>(y_of + j) - yi);
            store(m_row + j, e.mixed);
            store(ds_row + j, e.content);
            grad_dx.add(w.dx);
            grad_dy.add(w.dy);
            grad_dist2.add(w.dist2);
          });
          pos_weight_acc[0] += grad_dx.total();
          pos_weight_acc[1] += grad_dy.total();
          pos_weight_acc[2] += grad_dist2.total();
        }
        const acc_t beta = blk == 0 ? 0 : 1;  // dk, dv: the first block overwrites, the others accumulate
        gemm<acc_t>(use_blas, true, false, N, d, rows, 1, mixed, N, do_blk, do_t.ld, beta, dv_dst, grad_ld);
        gemm<acc_t>(use_blas, false, false, rows, d, N, acc_t(scale), dlogits, N, k_t.data, k_t.ld, 0,
                    dq_dst + row0 * grad_ld, grad_ld);
        gemm<acc_t>(use_blas, true, false, N, d, rows, acc_t(scale), dlogits, N, q_blk, q_t.ld, beta, dk_dst,
                    grad_ld);
      }
      if constexpr (!direct_output) {
        const int64_t offset = b * N * out_ld + h * d;
        for (auto [src, dst] : {std::pair{dq_dst, &dq}, {dk_dst, &dk}, {dv_dst, &dv}}) {
          scalar_t* dst_p = static_cast<scalar_t*>(dst->data_ptr()) + offset;
          for (int64_t n = 0; n < N; ++n)
            for (int64_t c = 0; c < d; ++c) dst_p[n * out_ld + c] = scalar_t(src[n * d + c]);
        }
      }
      for (int c = 0; c < 3; ++c) pos_weight_partial[bh * 3 + c] = pos_weight_acc[c];
      gating_partial[bh] = gating_acc;
    }
  });

  // Fixed-order reductions over the batch: the same bits whatever the thread count.
  const torch::stable::Device cpu(torch::headeronly::DeviceType::CPU);
  Tensor dw = torch::stable::empty(std::vector<int64_t>{H, 3}, ScalarType::Double, std::nullopt, cpu);
  Tensor dgate = torch::stable::empty(std::vector<int64_t>{H}, ScalarType::Double, std::nullopt, cpu);
  double* dw_p = static_cast<double*>(dw.data_ptr());
  double* dgate_p = static_cast<double*>(dgate.data_ptr());
  std::fill(dw_p, dw_p + H * 3, 0.0);
  std::fill(dgate_p, dgate_p + H, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      for (int c = 0; c < 3; ++c) dw_p[h * 3 + c] += pos_weight_partial[(b * H + h) * 3 + c];
      dgate_p[h] += gating_partial[b * H + h];
    }
  for (int64_t h = 0; h < H; ++h) {
    const Gates<acc_t> gates = gates_from_lambda(acc_t(lambdas[h]));
    dgate_p[h] *= double(gates.pos) * double(gates.content);
  }
  torch::stable::copy_(d_pos_weight, dw);
  torch::stable::copy_(d_gating, dgate);
}

// ------------------------------------------------------------------ op entry points

std::tuple<Tensor, Tensor> gpsa_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                const Tensor& pos_weight, const Tensor& gating_param,
                                                int64_t grid_w, double scale, bool use_blas) {
  const GpsaSizes s = check_forward_args(q, k, v, pos_weight, gating_param, grid_w, scale);
  auto [out, stats] = empty_forward_outputs(q, s);
  dispatch_floating(q.scalar_type(), "gpsa", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_kernel<scalar_t, acc_t>(q, k, v, pos_weight, gating_param, s, scale, use_blas, out, stats);
  });
  return {out, stats};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gpsa_bwd_cpu(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
    const Tensor& pos_weight, const Tensor& gating_param, const Tensor& stats, int64_t grid_w,
    double scale, bool use_blas) {
  const GpsaSizes s = check_backward_args(grad_out, q, k, v, pos_weight, gating_param, stats, grid_w, scale);
  auto [dq, dk, dv] = empty_input_grads(q, s);
  Tensor d_pos_weight = torch::stable::empty_like(pos_weight);
  Tensor d_gating = torch::stable::empty_like(gating_param);
  const Tensor stats_c = torch::stable::contiguous(stats);
  dispatch_floating(q.scalar_type(), "gpsa", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward_kernel<scalar_t, acc_t>(grad_out, q, k, v, pos_weight, gating_param, stats_c, s, scale, use_blas, dq,
                                     dk, dv, d_pos_weight, d_gating);
  });
  return {dq, dk, dv, d_pos_weight, d_gating};
}

}  // namespace
}  // namespace convit_kernels

STABLE_TORCH_LIBRARY(convit_kernels_ext, m) {
  m.def(
      "gpsa_fwd(Tensor q, Tensor k, Tensor v, Tensor pos_weight, Tensor gating_param, int grid_w, float scale,"
      " bool use_blas=True) -> (Tensor, Tensor)");
  m.def(
      "gpsa_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor pos_weight, Tensor gating_param, Tensor stats,"
      " int grid_w, float scale, bool use_blas=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(convit_kernels_ext, CPU, m) {
  m.impl("gpsa_fwd", TORCH_BOX(&convit_kernels::gpsa_fwd_cpu));
  m.impl("gpsa_bwd", TORCH_BOX(&convit_kernels::gpsa_bwd_cpu));
}

#include "../build_tag.h"

// An empty Python module, so that `import convit_kernels._C` loads the library
// and runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
