// The "sdpa" backend's positional mix on the CPU, fused: one pass over the
// B x H x N x d tensors per direction (convit_kernels/backends/sdpa.py).
//
// The small per-head tables come from positional_tables below (the serial twin
// of separable.positional_axis_probs); Python hands them back in the
// accumulation type: px (H x W x W), py_g = g py (H x H_p x H_p, the gate riding
// on the row table) and one_minus_g (H). With rows n = y W + x of a (batch,
// head) slice:
//
// positional_mix_fwd, per (b, h):
//   T[y, x]   = sum_x' px[x, x'] v[y, x']                   (N x d, thread-local)
//   out[y, x] = (1 - g) content[y, x] + sum_y' py_g[y, y'] T[y', x]   (B x N x H x d)
// positional_mix_bwd, per (b, h), with R = py_g^T dO and C = px^T dO (thread-local):
//   d_content = (1 - g) dO;  dv[Y, X] = sum_x px[x, X] R[Y, x]  (= g P^T dO);
//   dpx_g[a, c] = sum_Y R[Y, a] . v[Y, c]   (= g dpx of separable.positional_backward);
//   dpy[y, Y]   = sum_X C[y, X] . v[Y, X];  dot = sum dO . content;
// the last three per (b, h), then summed over the batch in a fixed order (the
// same bits whatever the thread count). Python turns them into the gradients
// of pos_weight and gating_param (separable.pos_weight_grad).
//
// Half inputs are converted to float on load; everything accumulates in float
// (double for double inputs).

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <array>
#include <type_traits>
#include <utility>
#include <vector>

#include "../gpsa_ops.h"
#include "simd.h"

namespace convit_kernels {
namespace {

// R output rows that combine the same source rows with their own coefficients:
//   dst[r][c] = init_scale init[r][c] + sum_{k < count} coef[r][k coef_stride] src[k src_stride + c]
// (init null: no first term). Two rows at a time halve the loads per multiply-add.
template <int R, typename acc_t>
struct Combine {
  std::array<const acc_t*, R> coef;
  int64_t coef_stride, count;
  const acc_t* src;
  int64_t src_stride;
  std::array<const acc_t*, R> init;  // all null or none
  acc_t init_scale;
  std::array<acc_t*, R> dst;
};

// Columns [c0, c0 + NV lanes): R x NV vectors kept in registers over the k loop.
template <int NV, int R, typename acc_t>
inline void combine_block(const Combine<R, acc_t>& op, int64_t c0) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::lanes;
  V acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i)
      acc[r][i] = op.init[0] ? op.init_scale * load<V>(op.init[r] + c0 + i * L) : V{};
  for (int64_t k = 0; k < op.count; ++k) {
    const acc_t* s = op.src + k * op.src_stride + c0;
    V sv[NV];
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) sv[i] = load<V>(s + i * L);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const acc_t w = op.coef[r][k * op.coef_stride];
#pragma GCC unroll 8
      for (int i = 0; i < NV; ++i) acc[r][i] += w * sv[i];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) store(op.dst[r] + c0 + i * L, acc[r][i]);
}

// Every column c < d: blocks of up to 6 vectors (12 accumulators for two rows), then scalars.
template <int R, typename acc_t>
void combine(const Combine<R, acc_t>& op, int64_t d) {
  constexpr int L = Vec<acc_t>::lanes;
  int64_t c = 0;
  for (; c + 6 * L <= d; c += 6 * L) combine_block<6>(op, c);
  const int64_t rest = (d - c) / L;
  switch (rest) {
    case 5:
      combine_block<5>(op, c);
      break;
    case 4:
      combine_block<4>(op, c);
      break;
    case 3:
      combine_block<3>(op, c);
      break;
    case 2:
      combine_block<2>(op, c);
      break;
    case 1:
      combine_block<1>(op, c);
      break;
    default:
      break;
  }
  for (c += rest * L; c < d; ++c)
    for (int r = 0; r < R; ++r) {
      acc_t acc = op.init[0] ? op.init_scale * op.init[r][c] : acc_t(0);
      for (int64_t k = 0; k < op.count; ++k) acc += op.coef[r][k * op.coef_stride] * op.src[k * op.src_stride + c];
      op.dst[r][c] = acc;
    }
}

// body(i, rows) over [0, count) two at a time, then the odd last one; rows is 2 or 1 as a constant.
template <typename Body>
void in_pairs(int64_t count, Body&& body) {
  int64_t i = 0;
  for (; i + 2 <= count; i += 2) body(i, std::integral_constant<int, 2>{});
  if (i < count) body(i, std::integral_constant<int, 1>{});
}

// sum_{k < count} a[k a_stride + c] b[k b_stride + c] over c < d, in a fixed order.
template <typename acc_t>
acc_t dot_rows(const acc_t* a, int64_t a_stride, const acc_t* b, int64_t b_stride, int64_t count, int64_t d) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::lanes;
  V acc0{}, acc1{}, acc2{}, acc3{};
  acc_t tail = 0;
  for (int64_t k = 0; k < count; ++k) {
    const acc_t* ak = a + k * a_stride;
    const acc_t* bk = b + k * b_stride;
    int64_t c = 0;
    for (; c + 4 * L <= d; c += 4 * L) {
      acc0 += load<V>(ak + c) * load<V>(bk + c);
      acc1 += load<V>(ak + c + L) * load<V>(bk + c + L);
      acc2 += load<V>(ak + c + 2 * L) * load<V>(bk + c + 2 * L);
      acc3 += load<V>(ak + c + 3 * L) * load<V>(bk + c + 3 * L);
    }
    for (; c + L <= d; c += L) acc0 += load<V>(ak + c) * load<V>(bk + c);
    for (; c < d; ++c) tail += ak[c] * bk[c];
  }
  return lane_sum((acc0 + acc1) + (acc2 + acc3)) + tail;
}


// One d-row of a strided tensor as dense acc_t: itself, or a converted copy in `buffer`.
template <typename scalar_t, typename acc_t>
const acc_t* load_row(const scalar_t* src, int64_t col_stride, int64_t d, acc_t* buffer) {
  return load_tile<scalar_t, acc_t>(src, 0, col_stride, 1, d, buffer, false).data;
}

// A dense acc_t row into a scalar_t destination row (contiguous).
template <typename scalar_t, typename acc_t>
inline void store_row(const acc_t* src, int64_t d, scalar_t* dst) {
  for (int64_t c = 0; c < d; ++c) dst[c] = scalar_t(src[c]);
}

struct MixSizes {
  int64_t batch, heads, seq_len, head_dim, grid_h, grid_w;
};

// content, v (and grad_out) B x H x N x d of one dtype; px H x W x W, py_g H x H_p x H_p,
// one_minus_g H, all three in the accumulation type of that dtype, on the CPU.
MixSizes check_mix_args(const Tensor& content, const Tensor& v, const Tensor& px, const Tensor& py_g,
                        const Tensor& one_minus_g) {
  STD_TORCH_CHECK(v.dim() == 4, "positional_mix: v must have 4 dimensions (B, H, N, d), got shape ",
                  shape_str(v.sizes()));
  check_floating(v, "v");
  const int64_t B = v.size(0), H = v.size(1), N = v.size(2), d = v.size(3);
  check_shape(content, {B, H, N, d}, "content (the shape of v)");
  STD_TORCH_CHECK(content.scalar_type() == v.scalar_type(), "positional_mix: content must have the dtype of v (",
                  dtype_name(v.scalar_type()), "), got ", dtype_name(content.scalar_type()));
  STD_TORCH_CHECK(px.dim() == 3 && py_g.dim() == 3, "positional_mix: px and py_g must be H x W x W and H x H_p x H_p");
  const int64_t W = px.size(1), Hp = py_g.size(1);
  check_shape(px, {H, W, W}, "px (H x W x W)");
  check_shape(py_g, {H, Hp, Hp}, "py_g (H x H_p x H_p)");
  check_shape(one_minus_g, {H}, "one_minus_g (H)");
  STD_TORCH_CHECK(N > 0 && d > 0 && W * Hp == N, "positional_mix: N = ", N, " must be W x H_p = ", W, " x ", Hp,
                  " with d > 0");
  const ScalarType acc = accumulation_type(v.scalar_type());
  for (auto [t, name] : {std::pair{&px, "px"}, {&py_g, "py_g"}, {&one_minus_g, "one_minus_g"}})
    STD_TORCH_CHECK(t->scalar_type() == acc, "positional_mix: ", name, " must be ", dtype_name(acc), ", got ",
                    dtype_name(t->scalar_type()));
  for (const Tensor* t : {&content, &v, &px, &py_g, &one_minus_g})
    STD_TORCH_CHECK(t->is_cpu(), "positional_mix: every tensor must be on the CPU");
  return {B, H, N, d, Hp, W};
}

// The small tables, contiguous, read through acc_t pointers.
template <typename acc_t>
struct MixTables {
  Tensor px_t, py_t, omg_t;
  const acc_t *px, *py, *omg;
  MixTables(const Tensor& px_, const Tensor& py_, const Tensor& omg_)
      : px_t(torch::stable::contiguous(px_)), py_t(torch::stable::contiguous(py_)),
        omg_t(torch::stable::contiguous(omg_)) {
    px = static_cast<const acc_t*>(px_t.data_ptr());
    py = static_cast<const acc_t*>(py_t.data_ptr());
    omg = static_cast<const acc_t*>(omg_t.data_ptr());
  }
};

// ------------------------------------------------------------------ forward

template <typename scalar_t, typename acc_t>
void mix_forward_kernel(const Tensor& content, const Tensor& v, const MixTables<acc_t>& tables, const MixSizes& s,
                        Tensor& out) {
  const int64_t H = s.heads, N = s.seq_len, d = s.head_dim, W = s.grid_w, Hp = s.grid_h;
  const auto c_s = bhnd_view<const scalar_t>(content), v_s = bhnd_view<const scalar_t>(v);
  scalar_t* out_p = static_cast<scalar_t*>(out.data_ptr());  // B x N x H x d, contiguous
  constexpr bool direct = std::is_same_v<scalar_t, acc_t>;

  torch::stable::parallel_for(0, s.batch * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(2 * N * d + 4 * d);
    acc_t* t_buf = scratch.data();  // N x d: T = px along the columns of v
    acc_t* v_buf = t_buf + N * d;   // N x d: v converted, when it has to be
    acc_t* c_rows = v_buf + N * d;  // 2 x d: content rows converted
    acc_t* o_rows = c_rows + 2 * d;  // 2 x d: output rows before conversion
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const Tile<acc_t> vr = load_tile(v_s.slice(b, h), v_s.row_stride, v_s.col_stride, N, d, v_buf, false);
      const acc_t* px = tables.px + h * W * W;
      const acc_t* py = tables.py + h * Hp * Hp;
      // T[y, x] = sum_x' px[x, x'] v[y, x'], rows x and x + 1 together.
      for (int64_t y = 0; y < Hp; ++y)
        in_pairs(W, [&](int64_t x, auto rows) {
          constexpr int R = decltype(rows)::value;
          Combine<R, acc_t> op{{}, 1, W, vr.row(y * W), vr.ld, {}, 0, {}};
          for (int r = 0; r < R; ++r) {
            op.coef[r] = px + (x + r) * W;
            op.dst[r] = t_buf + (y * W + x + r) * d;
          }
          combine(op, d);
        });
      // out[y, x] = (1 - g) content[y, x] + sum_y' py_g[y, y'] T[y', x], rows y and y + 1 together.
      const acc_t omg = tables.omg[h];
      for (int64_t x = 0; x < W; ++x)
        in_pairs(Hp, [&](int64_t y, auto rows) {
          constexpr int R = decltype(rows)::value;
          Combine<R, acc_t> op{{}, 1, Hp, t_buf + x * d, W * d, {}, omg, {}};
          std::array<scalar_t*, R> dst;
          for (int r = 0; r < R; ++r) {
            const int64_t n = (y + r) * W + x;
            op.coef[r] = py + (y + r) * Hp;
            op.init[r] = load_row(c_s.slice(b, h, n), c_s.col_stride, d, c_rows + r * d);
            dst[r] = out_p + ((b * N + n) * H + h) * d;
            if constexpr (direct) {
              op.dst[r] = dst[r];
            } else {
              op.dst[r] = o_rows + r * d;
            }
          }
          combine(op, d);
          if constexpr (!direct)
            for (int r = 0; r < R; ++r) store_row(o_rows + r * d, d, dst[r]);
        });
    }
  });
}

// ------------------------------------------------------------------ backward

template <typename scalar_t, typename acc_t>
void mix_backward_kernel(const Tensor& grad_out, const Tensor& content, const Tensor& v,
                         const MixTables<acc_t>& tables, const MixSizes& s, Tensor& d_content, Tensor& dv,
                         Tensor& dpx, Tensor& dpy, Tensor& dot) {
  const int64_t B = s.batch, H = s.heads, N = s.seq_len, d = s.head_dim, W = s.grid_w, Hp = s.grid_h;
  const auto g_s = bhnd_view<const scalar_t>(grad_out), c_s = bhnd_view<const scalar_t>(content),
             v_s = bhnd_view<const scalar_t>(v);
  scalar_t* dc_p = static_cast<scalar_t*>(d_content.data_ptr());  // B x N x H x d, contiguous
  scalar_t* dv_p = static_cast<scalar_t*>(dv.data_ptr());
  constexpr bool direct = std::is_same_v<scalar_t, acc_t>;
  // Per-(batch, head) partials: dpx_g (W x W), dpy (H_p x H_p), dot (1).
  const int64_t part = W * W + Hp * Hp + 1;
  std::vector<acc_t> partial(B * H * part);

  torch::stable::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(4 * N * d + 3 * d);
    acc_t* r_buf = scratch.data();   // N x d: R = py_g^T dO (along the rows)
    acc_t* cx_buf = r_buf + N * d;   // N x d: C = px^T dO (along the columns)
    acc_t* v_buf = cx_buf + N * d;   // N x d: v converted, when it has to be
    acc_t* do_buf = v_buf + N * d;   // N x d: dO converted, when it has to be
    acc_t* c_row = do_buf + N * d;   // d: a content row converted
    acc_t* o_rows = c_row + d;       // 2 x d: gradient rows before conversion
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const acc_t* px = tables.px + h * W * W;
      const acc_t* py = tables.py + h * Hp * Hp;
      const acc_t omg = tables.omg[h];
      const Tile<acc_t> vr = load_tile(v_s.slice(b, h), v_s.row_stride, v_s.col_stride, N, d, v_buf, false);
      const Tile<acc_t> gr = load_tile(g_s.slice(b, h), g_s.row_stride, g_s.col_stride, N, d, do_buf, false);
      acc_t* part_p = partial.data() + bh * part;

      // d_content = (1 - g) dO and sum dO . content, one row at a time.
      acc_t dot_sum = 0;
      for (int64_t n = 0; n < N; ++n) {
        const acc_t* go = gr.row(n);
        const acc_t* cr = load_row(c_s.slice(b, h, n), c_s.col_stride, d, c_row);
        dot_sum += dot_rows<acc_t>(go, 0, cr, 0, 1, d);
        scalar_t* dst = dc_p + ((b * N + n) * H + h) * d;
        acc_t* row = direct ? reinterpret_cast<acc_t*>(dst) : o_rows;
        for (int64_t c = 0; c < d; ++c) row[c] = omg * go[c];
        if constexpr (!direct) store_row(o_rows, d, dst);
      }
      part_p[W * W + Hp * Hp] = dot_sum;

      // R[Y, x] = sum_y py_g[y, Y] dO[y, x];  C[y, X] = sum_x px[x, X] dO[y, x].
      // Two output rows at a time: Y and Y + 1 of R, X and X + 1 of C and dv.
      for (int64_t x = 0; x < W; ++x)
        in_pairs(Hp, [&](int64_t y, auto rows) {
          constexpr int R = decltype(rows)::value;
          Combine<R, acc_t> op{{}, Hp, Hp, gr.row(x), W * gr.ld, {}, 0, {}};
          for (int r = 0; r < R; ++r) {
            op.coef[r] = py + y + r;
            op.dst[r] = r_buf + ((y + r) * W + x) * d;
          }
          combine(op, d);
        });
      for (int64_t y = 0; y < Hp; ++y)
        in_pairs(W, [&](int64_t x, auto rows) {
          constexpr int R = decltype(rows)::value;
          Combine<R, acc_t> op{{}, W, W, gr.row(y * W), gr.ld, {}, 0, {}};
          for (int r = 0; r < R; ++r) {
            op.coef[r] = px + x + r;
            op.dst[r] = cx_buf + (y * W + x + r) * d;
          }
          combine(op, d);
        });
      // dv[Y, X] = sum_x px[x, X] R[Y, x].
      for (int64_t y = 0; y < Hp; ++y)
        in_pairs(W, [&](int64_t x, auto rows) {
          constexpr int R = decltype(rows)::value;
          Combine<R, acc_t> op{{}, W, W, r_buf + y * W * d, d, {}, 0, {}};
          std::array<scalar_t*, R> dst;
          for (int r = 0; r < R; ++r) {
            op.coef[r] = px + x + r;
            dst[r] = dv_p + ((b * N + y * W + x + r) * H + h) * d;
            if constexpr (direct) {
              op.dst[r] = dst[r];
            } else {
              op.dst[r] = o_rows + r * d;
            }
          }
          combine(op, d);
          if constexpr (!direct)
            for (int r = 0; r < R; ++r) store_row(o_rows + r * d, d, dst[r]);
        });
      // dpx_g[a, c] = sum_Y R[Y, a] . v[Y, c];  dpy[y, Y] = sum_X C[y, X] . v[Y, X].
      for (int64_t a = 0; a < W; ++a)
        for (int64_t c = 0; c < W; ++c)
          part_p[a * W + c] = dot_rows<acc_t>(r_buf + a * d, W * d, vr.row(c), W * vr.ld, Hp, d);
      for (int64_t y = 0; y < Hp; ++y)
        for (int64_t yy = 0; yy < Hp; ++yy)
          part_p[W * W + y * Hp + yy] = dot_rows<acc_t>(cx_buf + y * W * d, d, vr.row(yy * W), vr.ld, W, d);
    }
  });

  // Fixed-order sums over the batch: the same bits whatever the thread count.
  acc_t* dpx_p = static_cast<acc_t*>(dpx.data_ptr());
  acc_t* dpy_p = static_cast<acc_t*>(dpy.data_ptr());
  acc_t* dot_p = static_cast<acc_t*>(dot.data_ptr());
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < part; ++i) {
      double sum = 0;
      for (int64_t b = 0; b < B; ++b) sum += double(partial[(b * H + h) * part + i]);
      if (i < W * W) {
        dpx_p[h * W * W + i] = acc_t(sum);
      } else if (i < W * W + Hp * Hp) {
        dpy_p[h * Hp * Hp + i - W * W] = acc_t(sum);
      } else {
        dot_p[h] = acc_t(sum);
      }
    }
}

// ------------------------------------------------------------------ op entry points

// px (H x W x W) and py (H x H_p x H_p) in pos_weight's accumulation type, as
// separable.positional_axis_probs computes them (axis_tables_row, gpsa_common.h),
// serially with the C library's exp: on tables this small, torch's exp and softmax
// hand the work to MKL's thread pool, whose wake-up after torch's own parallel
// regions cost milliseconds per call on a busy 2-core machine.
std::tuple<Tensor, Tensor> positional_tables_cpu(const Tensor& pos_weight, int64_t grid_h, int64_t grid_w) {
  STD_TORCH_CHECK(pos_weight.dim() == 2 && pos_weight.size(1) == 3 && pos_weight.is_cpu(),
                  "positional_tables: pos_weight must be a CPU tensor of shape H x 3, got ",
                  shape_str(pos_weight.sizes()));
  check_floating(pos_weight, "pos_weight");
  STD_TORCH_CHECK(grid_h > 0 && grid_w > 0, "positional_tables: the grid must be positive, got ", grid_h, " x ",
                  grid_w);
  const int64_t H = pos_weight.size(0);
  const ScalarType acc = accumulation_type(pos_weight.scalar_type());
  const torch::stable::Device cpu(torch::headeronly::DeviceType::CPU);
  const Tensor w = torch::stable::contiguous(torch::stable::to(pos_weight, acc, std::nullopt, cpu));
  Tensor px = empty_on({H, grid_w, grid_w}, acc, pos_weight);
  Tensor py = empty_on({H, grid_h, grid_h}, acc, pos_weight);
  dispatch_floating(acc, "positional_mix", [&](auto tag) {
    using acc_t = typename decltype(tag)::type;
    if constexpr (std::is_same_v<acc_t, float> || std::is_same_v<acc_t, double>) {
      for (int64_t t = 0; t < H * (grid_w + grid_h); ++t)
        axis_tables_row<acc_t>(static_cast<const acc_t*>(w.data_ptr()), int(H), int(grid_h), int(grid_w), int(t),
                               static_cast<acc_t*>(px.data_ptr()), static_cast<acc_t*>(py.data_ptr()));
    }
  });
  return {px, py};
}

Tensor positional_mix_fwd_cpu(const Tensor& content, const Tensor& v, const Tensor& px, const Tensor& py_g,
                              const Tensor& one_minus_g) {
  const MixSizes s = check_mix_args(content, v, px, py_g, one_minus_g);
  Tensor out = empty_on({s.batch, s.seq_len, s.heads, s.head_dim}, v.scalar_type(), v);
  dispatch_floating(v.scalar_type(), "positional_mix", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const MixTables<acc_t> tables(px, py_g, one_minus_g);
    mix_forward_kernel<scalar_t, acc_t>(content, v, tables, s, out);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> positional_mix_bwd_cpu(const Tensor& grad_out,
                                                                          const Tensor& content, const Tensor& v,
                                                                          const Tensor& px, const Tensor& py_g,
                                                                          const Tensor& one_minus_g) {
  const MixSizes s = check_mix_args(content, v, px, py_g, one_minus_g);
  check_shape(grad_out, {s.batch, s.heads, s.seq_len, s.head_dim}, "grad_out (the shape of v)");
  STD_TORCH_CHECK(grad_out.scalar_type() == v.scalar_type() && grad_out.is_cpu(),
                  "positional_mix: grad_out must be a CPU tensor of the dtype of v (", dtype_name(v.scalar_type()),
                  "), got ", dtype_name(grad_out.scalar_type()));
  const ScalarType acc = accumulation_type(v.scalar_type());
  const std::initializer_list<int64_t> grad_shape{s.batch, s.seq_len, s.heads, s.head_dim};
  Tensor d_content = empty_on(grad_shape, v.scalar_type(), v);
  Tensor dv = empty_on(grad_shape, v.scalar_type(), v);
  Tensor dpx = empty_on({s.heads, s.grid_w, s.grid_w}, acc, v);
  Tensor dpy = empty_on({s.heads, s.grid_h, s.grid_h}, acc, v);
  Tensor dot = empty_on({s.heads}, acc, v);
  dispatch_floating(v.scalar_type(), "positional_mix", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const MixTables<acc_t> tables(px, py_g, one_minus_g);
    mix_backward_kernel<scalar_t, acc_t>(grad_out, content, v, tables, s, d_content, dv, dpx, dpy, dot);
  });
  return {d_content, dv, dpx, dpy, dot};
}

}  // namespace
}  // namespace convit_kernels

STABLE_TORCH_LIBRARY_FRAGMENT(convit_kernels_ext, m) {
  m.def("positional_tables(Tensor pos_weight, int grid_h, int grid_w) -> (Tensor, Tensor)");
  m.def("positional_mix_fwd(Tensor content, Tensor v, Tensor px, Tensor py_g, Tensor one_minus_g) -> Tensor");
  m.def(
      "positional_mix_bwd(Tensor grad_out, Tensor content, Tensor v, Tensor px, Tensor py_g, Tensor one_minus_g)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(convit_kernels_ext, CPU, m) {
  m.impl("positional_tables", TORCH_BOX(&convit_kernels::positional_tables_cpu));
  m.impl("positional_mix_fwd", TORCH_BOX(&convit_kernels::positional_mix_fwd_cpu));
  m.impl("positional_mix_bwd", TORCH_BOX(&convit_kernels::positional_mix_bwd_cpu));
}
