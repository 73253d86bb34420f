// GPSA per-element math shared by the CPU and CUDA kernels (see docs/design.md).
//
// Everything here is __host__ __device__ so that the CPU tests exercise the same
// code the CUDA kernels run: the gates, the per-axis positional softmax and the
// per-element gradient of both branches.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define GPSA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define GPSA_HOST_DEVICE inline
#endif

namespace convit_kernels {

// Exponential in the accumulation type; the CPU kernel has its own vectorised
// expf for its hot loops.
GPSA_HOST_DEVICE float gpsa_exp(float x) { return expf(x); }
GPSA_HOST_DEVICE double gpsa_exp(double x) { return exp(x); }

// What the forward keeps of a content softmax row for the backward (the op's stats, B x H x N x 2):
// the row maximum of the logits s and the sum of exp(s - max), apart. Not lse = max + log(sum): at
// logits of 1e4 an ulp of a float32 lse (~1e-3) scales every weight alike, and in a saturated row
// that error exceeds the weights of all keys but the largest, of which dq and dk are made. The
// CUDA backward recomputes s bit for bit as its forward made it and takes A = exp(s - max) / sum;
// the CPU one, which has the whole row, shifts by max and divides by its own row's sum.
template <typename acc_t>
struct RowSoftmax {
  acc_t max, sum;
};

// (batch, head) slices of a strided 4-D tensor: rows are patches, columns channels
// (views of B x H x N x d and B x N x H x d tensors: gpsa_ops.h, bhnd_view / bnhd_view).
template <typename scalar_t>
struct Strided4d {
  scalar_t* base;
  long long batch_stride, head_stride, row_stride, col_stride;
  GPSA_HOST_DEVICE scalar_t* slice(long long b, long long h, long long row = 0) const {
    return base + b * batch_stride + h * head_stride + row * row_stride;
  }
  GPSA_HOST_DEVICE scalar_t& at(long long b, long long h, long long row, long long col) const {
    return slice(b, h, row)[col * col_stride];
  }
};

// The gate g = sigmoid(lambda) and 1 - g, the latter as sigmoid(-lambda): at
// lambda = 20, 1 - sigmoid(lambda) is 0 in float32 and the content gradients vanish.
template <typename acc_t>
struct Gates {
  acc_t pos;      // g, weight of the positional branch
  acc_t content;  // 1 - g
};

template <typename acc_t>
GPSA_HOST_DEVICE Gates<acc_t> gates_from_lambda(acc_t lambda) {
  Gates<acc_t> gates;
  gates.pos = acc_t(1) / (acc_t(1) + gpsa_exp(-lambda));
  gates.content = acc_t(1) / (acc_t(1) + gpsa_exp(lambda));
  return gates;
}

// One row of a per-axis positional softmax. On one axis of the patch grid the
// positional logit of offset o = j - i is w_lin * o + w_sq * o^2 (w_lin is w0 for
// columns, w1 for rows; w_sq is w2), so P[h, i, j] = px[h, x_i, x_j] * py[h, y_i, y_j]
// where px and py are softmaxes over one axis (reference.positional_axis_probs).
// Writes probs[j] for j < size, the softmax over j of the logits of row i.
template <typename acc_t>
GPSA_HOST_DEVICE void axis_softmax_row(acc_t w_lin, acc_t w_sq, int i, int size, acc_t* probs) {
  acc_t row_max = -INFINITY;
  for (int j = 0; j < size; ++j) {
    const acc_t offset = acc_t(j - i);
    probs[j] = (w_lin + w_sq * offset) * offset;
    row_max = probs[j] > row_max ? probs[j] : row_max;
  }
  acc_t sum = 0;
  for (int j = 0; j < size; ++j) {
    probs[j] = gpsa_exp(probs[j] - row_max);
    sum += probs[j];
  }
  const acc_t inv_sum = acc_t(1) / sum;
  for (int j = 0; j < size; ++j) probs[j] *= inv_sum;
}

// Row t of the per-axis tables of all heads, t < heads (grid_w + grid_h): rows
// [0, heads grid_w) are px (H x W x W, logit weights w0 and w2), the rest py
// (H x H_p x H_p, weights w1 and w2). pos_weight is H x 3, row-major.
template <typename acc_t>
GPSA_HOST_DEVICE void axis_tables_row(const acc_t* pos_weight, int heads, int grid_h, int grid_w, int t, acc_t* px,
                                      acc_t* py) {
  if (t < heads * grid_w) {
    const int h = t / grid_w;
    axis_softmax_row<acc_t>(pos_weight[3 * h + 0], pos_weight[3 * h + 2], t % grid_w, grid_w, px + t * grid_w);
  } else {
    const int row = t - heads * grid_w, h = row / grid_h;
    axis_softmax_row<acc_t>(pos_weight[3 * h + 1], pos_weight[3 * h + 2], row % grid_h, grid_h, py + row * grid_h);
  }
}

// The backward's row dot products of both branches, delta_c = dO_i . O_c,i and
// delta_p = dO_i . O_p,i. The kernels take them as sum_j A_ij T_ij and sum_j P_ij T_ij
// over the recomputed A, P and T = dO v^T: no saved O_c or O_p, no division by
// g or 1 - g, and rounded like the T they are subtracted from (see reference.py).
template <typename acc_t>
struct RowDeltas {
  acc_t content;
  acc_t pos;
};

// Gradients at one (query i, key j) element, given the content probability a,
// the positional probability p and t = dO_i . v_j:
//   mixed   = (1 - g) a + g p            the weight of v_j in O_i (for dv)
//   content = (1 - g) a (t - delta_c)    dS_ij, the content logit gradient (for dq, dk)
//   pos     = g p (t - delta_p)          ds_ij, the positional logit gradient (for dw)
template <typename acc_t>
struct ElementGrads {
  acc_t mixed;
  acc_t content;
  acc_t pos;
};

template <typename acc_t>
GPSA_HOST_DEVICE ElementGrads<acc_t> element_grads(acc_t a, acc_t p, acc_t t, RowDeltas<acc_t> deltas,
                                                   Gates<acc_t> gates) {
  const acc_t weighted_a = gates.content * a;
  const acc_t weighted_p = gates.pos * p;
  return {weighted_a + weighted_p, weighted_a * (t - deltas.content), weighted_p * (t - deltas.pos)};
}

// d pos_weight terms of one element: the positional logit is
// w . (dx, dy, dx^2 + dy^2), so the element adds ds_ij times that vector.
template <typename acc_t>
struct PosWeightGrad {
  acc_t dx, dy, dist2;
};

template <typename acc_t>
GPSA_HOST_DEVICE PosWeightGrad<acc_t> pos_weight_grad_terms(acc_t ds, acc_t dx, acc_t dy) {
  return {ds * dx, ds * dy, ds * (dx * dx + dy * dy)};
}

}  // namespace convit_kernels
