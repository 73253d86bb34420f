// Host-side argument checks and output allocation of the extension's op pair,
// shared by the CPU and CUDA implementations, on the LibTorch stable ABI
// (torch/csrc/stable, torch/headeronly; header-only: each shared object compiles
// its own copy). The public op checks its inputs in Python (op.check_inputs);
// these checks guard callers that reach the extension directly, so that bad
// input raises a RuntimeError naming the argument.
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <cmath>
#include <initializer_list>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "gpsa_common.h"

namespace convit_kernels {

using Tensor = torch::stable::Tensor;
using torch::headeronly::ScalarType;

// A dtype dispatch hands its body a TypeTag<scalar_t>{} (AT_DISPATCH without ATen).
template <typename T>
struct TypeTag {
  using type = T;
};

struct GpsaSizes {
  int64_t batch, heads, seq_len, head_dim, grid_h, grid_w;
};

inline ScalarType accumulation_type(ScalarType dtype) {
  return dtype == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

// The names torch gives dtypes in its C++ messages ("Float", "Half", ...).
inline const char* dtype_name(ScalarType dtype) {
  switch (dtype) {
    case ScalarType::Float:
      return "Float";
    case ScalarType::Double:
      return "Double";
    case ScalarType::Half:
      return "Half";
    case ScalarType::BFloat16:
      return "BFloat16";
    default:
      return torch::headeronly::toString(dtype);
  }
}

// AT_DISPATCH_FLOATING_TYPES_AND2(Half, BFloat16, ...) without ATen: body(TypeTag<scalar_t>{});
// another dtype raises "<op>: unsupported dtype ...".
template <typename Body>
void dispatch_floating(ScalarType dtype, const char* op, Body&& body) {
  switch (dtype) {
    case ScalarType::Float:
      return body(TypeTag<float>{});
    case ScalarType::Double:
      return body(TypeTag<double>{});
    case ScalarType::Half:
      return body(TypeTag<torch::headeronly::Half>{});
    case ScalarType::BFloat16:
      return body(TypeTag<torch::headeronly::BFloat16>{});
    default:
      STD_TORCH_CHECK(false, op, ": unsupported dtype ", dtype_name(dtype));
  }
}

template <typename Sizes>
std::string shape_str(const Sizes& sizes) {
  std::ostringstream out;
  out << "[";
  bool first = true;
  for (int64_t s : sizes) {
    out << (first ? "" : ", ") << s;
    first = false;
  }
  out << "]";
  return out.str();
}

inline std::string device_str(const Tensor& t) {
  std::ostringstream out;
  out << (t.is_cpu() ? "cpu" : t.is_cuda() ? "cuda" : "device");
  if (!t.is_cpu()) out << ":" << int(t.get_device());
  return out.str();
}

inline void check_floating(const Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  STD_TORCH_CHECK(dtype == ScalarType::Float || dtype == ScalarType::Double || dtype == ScalarType::Half ||
                      dtype == ScalarType::BFloat16,
                  "gpsa: ", name, " must be float16, bfloat16, float32 or float64, got ", dtype_name(dtype));
}

inline bool same_sizes(const Tensor& t, std::initializer_list<int64_t> expected) {
  if (t.dim() != int64_t(expected.size())) return false;
  int64_t i = 0;
  for (int64_t e : expected)
    if (t.size(i++) != e) return false;
  return true;
}

inline void check_shape(const Tensor& t, std::initializer_list<int64_t> expected, const char* name) {
  STD_TORCH_CHECK(same_sizes(t, expected), "gpsa: ", name, " must have shape ", shape_str(expected), ", got ",
                  shape_str(t.sizes()));
}

inline void check_same_device(const Tensor& t, const Tensor& q, const char* name) {
  STD_TORCH_CHECK(t.is_cpu() == q.is_cpu() && t.get_device() == q.get_device(), "gpsa: ", name,
                  " must be on the device of q (", device_str(q), "), got ", device_str(t));
}

inline GpsaSizes check_forward_args(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& pos_weight,
                                    const Tensor& gating_param, int64_t grid_w, double scale) {
  STD_TORCH_CHECK(q.dim() == 4, "gpsa: q must have 4 dimensions (B, H, N, d), got shape ", shape_str(q.sizes()));
  check_floating(q, "q");
  const std::initializer_list<int64_t> q_shape{q.size(0), q.size(1), q.size(2), q.size(3)};
  check_shape(k, q_shape, "k");
  check_shape(v, q_shape, "v");
  STD_TORCH_CHECK(k.scalar_type() == q.scalar_type(), "gpsa: k must have the dtype of q (",
                  dtype_name(q.scalar_type()), "), got ", dtype_name(k.scalar_type()));
  STD_TORCH_CHECK(v.scalar_type() == q.scalar_type(), "gpsa: v must have the dtype of q (",
                  dtype_name(q.scalar_type()), "), got ", dtype_name(v.scalar_type()));
  const int64_t heads = q.size(1), seq_len = q.size(2);
  check_floating(pos_weight, "pos_weight");
  check_floating(gating_param, "gating_param");
  check_shape(pos_weight, {heads, 3}, "pos_weight (H x 3, H = heads of q)");
  check_shape(gating_param, {heads}, "gating_param (H, H = heads of q)");
  for (auto [t, name] : {std::pair{&k, "k"}, {&v, "v"}, {&pos_weight, "pos_weight"}, {&gating_param, "gating_param"}})
    check_same_device(*t, q, name);
  STD_TORCH_CHECK(seq_len > 0 && q.size(3) > 0, "gpsa: q must have N > 0 patches and d > 0 channels, got shape ",
                  shape_str(q.sizes()));
  STD_TORCH_CHECK(grid_w > 0 && seq_len % grid_w == 0, "gpsa: grid_w must be a positive divisor of N = ", seq_len,
                  ", got ", grid_w);
  STD_TORCH_CHECK(std::isfinite(scale) && scale > 0, "gpsa: scale must be a finite number > 0, got ", scale);
  return {q.size(0), heads, seq_len, q.size(3), seq_len / grid_w, grid_w};
}

inline GpsaSizes check_backward_args(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Tensor& pos_weight, const Tensor& gating_param, const Tensor& stats,
                                     int64_t grid_w, double scale) {
  const GpsaSizes s = check_forward_args(q, k, v, pos_weight, gating_param, grid_w, scale);
  const auto acc = accumulation_type(q.scalar_type());
  check_shape(grad_out, {s.batch, s.seq_len, s.heads, s.head_dim}, "grad_out (B x N x H x d)");
  check_shape(stats, {s.batch, s.heads, s.seq_len, 2}, "stats (B x H x N x 2)");
  STD_TORCH_CHECK(grad_out.scalar_type() == q.scalar_type(), "gpsa: grad_out must have the dtype of q (",
                  dtype_name(q.scalar_type()), "), got ", dtype_name(grad_out.scalar_type()));
  STD_TORCH_CHECK(stats.scalar_type() == acc, "gpsa: stats must be ", dtype_name(acc), ", got ",
                  dtype_name(stats.scalar_type()));
  for (auto [t, name] : {std::pair{&grad_out, "grad_out"}, {&stats, "stats"}}) check_same_device(*t, q, name);
  return s;
}

// Strided4d views: B x H x N x d tensors (q, k, v) and B x N x H x d ones (grad_out).
template <typename scalar_t>
Strided4d<scalar_t> bhnd_view(const Tensor& t) {
  return {static_cast<scalar_t*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}
template <typename scalar_t>
Strided4d<scalar_t> bnhd_view(const Tensor& t) {
  return {static_cast<scalar_t*>(t.data_ptr()), t.stride(0), t.stride(2), t.stride(1), t.stride(3)};
}

// A rows x cols matrix of acc_t, row-major with leading dimension ld.
template <typename acc_t>
struct Tile {
  const acc_t* data;
  int64_t ld;
  const acc_t* row(int64_t i) const { return data + i * ld; }
};

// A (rows x cols) slice of a strided view as an acc_t tile: the slice itself when it is acc_t
// with unit column stride (and, with dense_rows, rows cols apart), else a dense copy in scratch.
// The fused kernel asks for dense rows: copying the rows of a strided view (q, k, v sliced from
// one qkv projection) measured faster than handing BLAS and its positional loops strided rows.
template <typename scalar_t, typename acc_t>
Tile<acc_t> load_tile(const scalar_t* src, int64_t row_stride, int64_t col_stride, int64_t rows, int64_t cols,
                      acc_t* scratch, bool dense_rows) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (col_stride == 1 && !dense_rows) return {src, row_stride};
    if (col_stride == 1 && (row_stride == cols || rows == 1)) return {src, cols};
  }
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* src_row = src + i * row_stride;
    acc_t* dst_row = scratch + i * cols;
    if (col_stride == 1) {
      for (int64_t c = 0; c < cols; ++c) dst_row[c] = acc_t(src_row[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) dst_row[c] = acc_t(src_row[c * col_stride]);
    }
  }
  return {scratch, cols};
}

inline Tensor empty_on(std::initializer_list<int64_t> shape, ScalarType dtype, const Tensor& like) {
  const std::vector<int64_t> sizes(shape);
  return torch::stable::empty(sizes, dtype, std::nullopt, like.device());
}

// The forward's outputs: out (B x N x H x d, dtype of q) and stats (B x H x N x 2, accumulation
// type: each row's RowSoftmax, max then sum).
inline std::tuple<Tensor, Tensor> empty_forward_outputs(const Tensor& q, const GpsaSizes& s) {
  return {empty_on({s.batch, s.seq_len, s.heads, s.head_dim}, q.scalar_type(), q),
          empty_on({s.batch, s.heads, s.seq_len, 2}, accumulation_type(q.scalar_type()), q)};
}

// dq, dk, dv: B x N x H x d in the dtype of q.
inline std::tuple<Tensor, Tensor, Tensor> empty_input_grads(const Tensor& q, const GpsaSizes& s) {
  const auto shape = {s.batch, s.seq_len, s.heads, s.head_dim};
  return {empty_on(shape, q.scalar_type(), q), empty_on(shape, q.scalar_type(), q),
          empty_on(shape, q.scalar_type(), q)};
}

}  // namespace convit_kernels
