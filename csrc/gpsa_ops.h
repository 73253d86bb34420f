// Host-side argument checks and output allocation of the extension's op pair,
// shared by the CPU and CUDA implementations (header-only: each shared object
// compiles its own copy). The public op checks its inputs in Python
// (op.check_inputs); these checks guard callers that reach the extension
// directly, so that bad input raises a RuntimeError naming the argument.
#pragma once

#include <ATen/ATen.h>

#include "gpsa_common.h"

#include <tuple>
#include <vector>

namespace convit_kernels {

struct GpsaSizes {
  int64_t batch, heads, seq_len, head_dim, grid_h, grid_w;
};

inline at::ScalarType accumulation_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_floating(const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "gpsa: ", name, " must be float16, bfloat16, float32 or float64, got ", dtype);
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, "gpsa: ", name, " must have shape ", expected, ", got ", t.sizes());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.device() == q.device(), "gpsa: ", name, " must be on the device of q (", q.device(), "), got ",
              t.device());
}

// Checks of the forward's arguments, also run by the backward; returns the sizes.
inline GpsaSizes check_forward_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& pos_weight, const at::Tensor& gating_param, int64_t grid_w) {
  TORCH_CHECK(q.dim() == 4, "gpsa: q must have 4 dimensions (B, H, N, d), got shape ", q.sizes());
  check_floating(q, "q");
  check_shape(k, q.sizes(), "k");
  check_shape(v, q.sizes(), "v");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "gpsa: k must have the dtype of q (", q.scalar_type(), "), got ",
              k.scalar_type());
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), "gpsa: v must have the dtype of q (", q.scalar_type(), "), got ",
              v.scalar_type());
  const int64_t heads = q.size(1), seq_len = q.size(2);
  check_floating(pos_weight, "pos_weight");
  check_floating(gating_param, "gating_param");
  check_shape(pos_weight, {heads, 3}, "pos_weight (H x 3, H = heads of q)");
  check_shape(gating_param, {heads}, "gating_param (H, H = heads of q)");
  for (auto [t, name] : {std::pair{&k, "k"}, {&v, "v"}, {&pos_weight, "pos_weight"}, {&gating_param, "gating_param"}})
    check_same_device(*t, q, name);
  TORCH_CHECK(seq_len > 0 && q.size(3) > 0, "gpsa: q must have N > 0 patches and d > 0 channels, got shape ",
              q.sizes());
  TORCH_CHECK(grid_w > 0 && seq_len % grid_w == 0, "gpsa: grid_w must be a positive divisor of N = ", seq_len,
              ", got ", grid_w);
  return {q.size(0), heads, seq_len, q.size(3), seq_len / grid_w, grid_w};
}

inline GpsaSizes check_backward_args(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& pos_weight,
                                     const at::Tensor& gating_param, const at::Tensor& lse, int64_t grid_w) {
  const GpsaSizes s = check_forward_args(q, k, v, pos_weight, gating_param, grid_w);
  const auto acc = accumulation_type(q.scalar_type());
  check_shape(grad_out, {s.batch, s.seq_len, s.heads, s.head_dim}, "grad_out (B x N x H x d)");
  check_shape(lse, {s.batch, s.heads, s.seq_len}, "lse (B x H x N)");
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type(), "gpsa: grad_out must have the dtype of q (",
              q.scalar_type(), "), got ", grad_out.scalar_type());
  TORCH_CHECK(lse.scalar_type() == acc, "gpsa: lse must be ", acc, ", got ", lse.scalar_type());
  for (auto [t, name] : {std::pair{&grad_out, "grad_out"}, {&lse, "lse"}}) check_same_device(*t, q, name);
  return s;
}

// Strided4d views: B x H x N x d tensors (q, k, v) and B x N x H x d ones (grad_out).
template <typename scalar_t>
Strided4d<scalar_t> bhnd_view(const at::Tensor& t) {
  return {static_cast<scalar_t*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}
template <typename scalar_t>
Strided4d<scalar_t> bnhd_view(const at::Tensor& t) {
  return {static_cast<scalar_t*>(t.data_ptr()), t.stride(0), t.stride(2), t.stride(1), t.stride(3)};
}

// The forward's outputs: out (B x N x H x d, dtype of q) and lse (B x H x N, accumulation type).
inline std::tuple<at::Tensor, at::Tensor> empty_forward_outputs(const at::Tensor& q, const GpsaSizes& s) {
  return {at::empty({s.batch, s.seq_len, s.heads, s.head_dim}, q.options()),
          at::empty({s.batch, s.heads, s.seq_len}, q.options().dtype(accumulation_type(q.scalar_type())))};
}

// dq, dk, dv: B x N x H x d in the dtype of q.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_input_grads(const at::Tensor& q, const GpsaSizes& s) {
  const std::vector<int64_t> shape{s.batch, s.seq_len, s.heads, s.head_dim};
  return {at::empty(shape, q.options()), at::empty(shape, q.options()), at::empty(shape, q.options())};
}

}  // namespace convit_kernels
