// GPSA forward and backward CUDA kernels: the fallback for GPUs the Triton
// kernels do not serve (sm_70, sm_75) and for any CUDA device. fp32, fp16 and
// bf16 inputs, fp32 accumulation, head_dim <= 128. The per-element math is
// gpsa_common.h's, the same the CPU kernel runs.
//
// Layout of work: blocks of 128 threads; a tile of 16 rows with 8 threads per
// row (row = thread / 8, lane = thread % 8). A lane owns the keys (or queries)
// lane, lane + 8, ... of its row's tile and the channels lane, lane + 8, ... of
// its row's accumulators, so the row reductions are 8-lane shuffles.
//   forward:  one block per (query tile, head, batch); one pass over key tiles
//             with an online softmax for the content branch and a second
//             accumulator for P v (the positional probabilities come from the
//             per-axis tables, P_ij = px py, and need no normaliser), mixed at
//             the end: out = (1 - g) O_c + g O_p, and the row's max and sum
//             (RowSoftmax, gpsa_common.h; every kernel takes a content weight as
//             exp(shifted_logit), alike). The CPU kernel mixes
//             before one product instead: it has the whole key row at hand.
//   backward: one kernel per query tile computes delta_c = rowsum(A o T) and
//             delta_p = rowsum(P o T) in a first pass over the key tiles, then
//             dq in a second; then one kernel per key tile accumulates dk, dv
//             (and d pos_weight partials) over query tiles. No atomics: partial
//             sums are reduced in a fixed order.
//
// Built on the LibTorch stable ABI, like the CPU part (convit_kernels/build_config.py:
// TORCH_TARGET_VERSION): tensors are torch::stable::Tensor, the device guard is
// torch::stable::accelerator's, the current stream comes from the C shim
// (aoti_torch_get_current_cuda_stream: the stable Stream's native handle needs
// torch 2.13), and the dtype dispatch is a switch.

#include <Python.h>
#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>
// TORCH_ERROR_CODE_CHECK: header-only in every torch from 2.10 (torch 2.11 has no STABLE_TORCH_ERROR_CODE_CHECK).
#include <torch/headeronly/util/shim_utils.h>

#include <tuple>
#include <vector>

#include "../gpsa_common.h"
#include "../gpsa_ops.h"

namespace convit_kernels {
namespace {

constexpr int kThreads = 128;
constexpr int kLanesPerRow = 8;
constexpr int kTileRows = kThreads / kLanesPerRow;  // 16 rows per tile
constexpr int kForwardKeys = 32;                    // keys per tile in the forward
constexpr int kBackwardCols = 16;                   // the other side's tile in the backward
constexpr int kMaxHeadDim = 128;
constexpr int kChannelsPerLane = kMaxHeadDim / kLanesPerRow;

struct PositionalTablesView {
  const float* px;  // H x W x W
  const float* py;  // H x H_p x H_p
  int grid_h, grid_w;
  __device__ float prob(int h, int i, int j) const {
    return px[(h * grid_w + i % grid_w) * grid_w + j % grid_w] * py[(h * grid_h + i / grid_w) * grid_h + j / grid_w];
  }
};

// Rows [row0, row0 + rows) of a (b, h) slice into shared memory (rows x d), zero past N.
template <typename scalar_t>
__device__ void load_rows(float* dst, const Strided4d<const scalar_t>& src, int b, int h, int row0, int rows, int N,
                          int d) {
  for (int e = threadIdx.x; e < rows * d; e += blockDim.x) {
    const int r = e / d, c = e % d;
    dst[e] = row0 + r < N ? static_cast<float>(src.at(b, h, row0 + r, c)) : 0.f;
  }
}

__device__ float dot_shared(const float* a, const float* b, int d) {
  float sum = 0.f;
  for (int c = 0; c < d; ++c) sum = __fmaf_rn(a[c], b[c], sum);
  return sum;
}

// s_ij - max for the content logit s_ij = scale * dot, dot = q_i . k_j (dot_shared): one fma, of the
// unrounded product. The backward takes A = exp(s - max) / sum with max and sum from the forward, so
// every kernel computes the exponent with this function, bit for bit alike: an explicit fma is
// never split or contracted otherwise by the compiler (an ulp of a logit of 1e4 would be ~1e-3
// relative on its weight). max itself is the largest rounded scale * dot of the row.
__device__ float shifted_logit(float scale, float dot, float row_max) { return __fmaf_rn(scale, dot, -row_max); }

__device__ float row_max8(float x) {
  for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ float row_sum8(float x) {
  for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// ------------------------------------------------------------------ positional tables

__global__ void axis_tables_kernel(const float* __restrict__ pos_weight, int heads, int grid_h, int grid_w,
                                   float* __restrict__ px, float* __restrict__ py) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t < heads * (grid_w + grid_h)) axis_tables_row<float>(pos_weight, heads, grid_h, grid_w, t, px, py);
}

template <typename T>
T* ptr(const Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// A contiguous float32 copy of t (t itself when it already is one).
Tensor float_contiguous(const Tensor& t) {
  return torch::stable::contiguous(torch::stable::to(t, ScalarType::Float));
}

struct PositionalTables {
  Tensor px, py;
  PositionalTablesView view() const { return {ptr<float>(px), ptr<float>(py), int(py.size(1)), int(px.size(1))}; }
};

PositionalTables positional_tables(const Tensor& pos_weight, const GpsaSizes& s, cudaStream_t stream) {
  const Tensor w = float_contiguous(pos_weight);
  PositionalTables tables{empty_on({s.heads, s.grid_w, s.grid_w}, ScalarType::Float, w),
                          empty_on({s.heads, s.grid_h, s.grid_h}, ScalarType::Float, w)};
  const int rows = int(s.heads * (s.grid_w + s.grid_h));
  axis_tables_kernel<<<(rows + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      ptr<float>(w), int(s.heads), int(s.grid_h), int(s.grid_w), ptr<float>(tables.px), ptr<float>(tables.py));
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  return tables;
}

// d gating_param = g (1 - g) sum_{b, i} (delta_p - delta_c), per head; g = sigmoid(lambda).
__global__ void gating_grad_kernel(const float* __restrict__ lambdas, const float* __restrict__ delta_sum, int heads,
                                   float* __restrict__ d_gating) {
  const int h = blockIdx.x * blockDim.x + threadIdx.x;
  if (h >= heads) return;
  const Gates<float> gates = gates_from_lambda(lambdas[h]);
  d_gating[h] = gates.pos * gates.content * delta_sum[h];
}

// ------------------------------------------------------------------ forward

// At least 7 blocks per SM caps the registers at 72, which the kernel needs without spilling; left to
// itself, ptxas picks 64 for sm_86 and spills 16 bytes.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, 7) forward_kernel(
    Strided4d<const scalar_t> q, Strided4d<const scalar_t> k, Strided4d<const scalar_t> v,
    PositionalTablesView tables, const float* __restrict__ lambdas, int N, int d, float scale,
    scalar_t* __restrict__ out, RowSoftmax<float>* __restrict__ stats) {
  extern __shared__ float smem[];
  float* q_tile = smem;                           // kTileRows x d
  float* k_tile = q_tile + kTileRows * d;         // kForwardKeys x d
  float* v_tile = k_tile + kForwardKeys * d;      // kForwardKeys x d
  float* a_tile = v_tile + kForwardKeys * d;      // kTileRows x kForwardKeys, exp(s - running max)
  float* p_tile = a_tile + kTileRows * kForwardKeys;  // kTileRows x kForwardKeys, positional probs

  const int row0 = blockIdx.x * kTileRows, h = blockIdx.y, b = blockIdx.z, H = gridDim.y;
  const int r = threadIdx.x / kLanesPerRow, lane = threadIdx.x % kLanesPerRow;
  const int i = row0 + r, i_clamped = min(i, N - 1);
  const Gates<float> gates = gates_from_lambda(lambdas[h]);

  load_rows(q_tile, q, b, h, row0, kTileRows, N, d);
  float running_max = -INFINITY, running_sum = 0.f;
  float out_c[kChannelsPerLane], out_p[kChannelsPerLane];
#pragma unroll
  for (int u = 0; u < kChannelsPerLane; ++u) out_c[u] = out_p[u] = 0.f;

  for (int key0 = 0; key0 < N; key0 += kForwardKeys) {
    __syncthreads();  // the previous tile's readers are done
    load_rows(k_tile, k, b, h, key0, kForwardKeys, N, d);
    load_rows(v_tile, v, b, h, key0, kForwardKeys, N, d);
    __syncthreads();
    float dots[kForwardKeys / kLanesPerRow];  // q_i . k_j of this lane's keys
    float tile_max = -INFINITY;
#pragma unroll
    for (int u = 0; u < kForwardKeys / kLanesPerRow; ++u) {
      const int jt = lane + u * kLanesPerRow, j = key0 + jt;
      dots[u] = j < N ? dot_shared(q_tile + r * d, k_tile + jt * d, d) : -INFINITY;
      tile_max = fmaxf(tile_max, dots[u]);
      p_tile[r * kForwardKeys + jt] = j < N ? tables.prob(h, i_clamped, j) : 0.f;
    }
    // scale > 0 and rounding is monotone: the largest rounded scale * dot is scale * the largest dot.
    const float new_max = fmaxf(running_max, scale * row_max8(tile_max));
    const float rescale = gpsa_exp(running_max - new_max);  // 0 on the first tile
    float tile_sum = 0.f;
#pragma unroll
    for (int u = 0; u < kForwardKeys / kLanesPerRow; ++u) {
      const float e = gpsa_exp(shifted_logit(scale, dots[u], new_max));
      a_tile[r * kForwardKeys + lane + u * kLanesPerRow] = e;
      tile_sum += e;
    }
    running_sum = running_sum * rescale + row_sum8(tile_sum);
    running_max = new_max;
    __syncwarp();  // the row's 8 lanes share a warp: its a/p entries are visible to them
#pragma unroll
    for (int u = 0; u < kChannelsPerLane; ++u) {
      const int c = lane + u * kLanesPerRow;
      if (c >= d) continue;
      float acc_c = 0.f, acc_p = 0.f;
      for (int jt = 0; jt < kForwardKeys; ++jt) {
        const float vj = v_tile[jt * d + c];
        acc_c += a_tile[r * kForwardKeys + jt] * vj;
        acc_p += p_tile[r * kForwardKeys + jt] * vj;
      }
      out_c[u] = out_c[u] * rescale + acc_c;
      out_p[u] += acc_p;
    }
  }
  if (i >= N) return;
  const int64_t bh_row = (int64_t(b) * H + h) * N + i;
  if (lane == 0) stats[bh_row] = {running_max, running_sum};
  const float inv_sum = 1.f / running_sum;
#pragma unroll
  for (int u = 0; u < kChannelsPerLane; ++u) {
    const int c = lane + u * kLanesPerRow;
    if (c >= d) continue;
    const float oc = out_c[u] * inv_sum, op = out_p[u];
    out[((int64_t(b) * N + i) * H + h) * d + c] = static_cast<scalar_t>(gates.content * oc + gates.pos * op);
  }
}

// ------------------------------------------------------------------ backward

// Shared inputs of both backward kernels.
template <typename scalar_t>
struct BackwardArgs {
  Strided4d<const scalar_t> q, k, v, grad_out;
  PositionalTablesView tables;
  const float* lambdas;
  const RowSoftmax<float>* stats;  // B x H x N, the forward's
  float* delta_content;  // B x H x N, dO . O_c = rowsum(A o T): written by the dq kernel, read by dk/dv's
  float* delta_pos;      // B x H x N, dO . O_p = rowsum(P o T): likewise
  int N, d;
  float scale;
};

// The content probability A_ij = exp(s_ij - max) / sum (the logit recomputed as the forward made
// it; inv_sum = 1 / sum of the row) and T_ij = dO_i . v_j of one (b, h), from rows of q, k, dO and
// v in shared memory.
struct ContentAndT {
  float a, t;
};

__device__ ContentAndT content_and_t(float scale, float row_max, float inv_sum, const float* q_row,
                                     const float* k_row, const float* do_row, const float* v_row, int d) {
  const float a = gpsa_exp(shifted_logit(scale, dot_shared(q_row, k_row, d), row_max)) * inv_sum;
  return {a, dot_shared(do_row, v_row, d)};
}

// The per-row constants of the backward: the content softmax's max and 1 / sum, and both row deltas.
struct RowStats {
  float max, inv_sum;
  RowDeltas<float> deltas;
};

// dk, dv of one key tile, and its d pos_weight partial (3 floats at pos_weight_partial[tile]).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) backward_dkdv_kernel(BackwardArgs<scalar_t> args,
                                                                 scalar_t* __restrict__ dk, scalar_t* __restrict__ dv,
                                                                 float* __restrict__ pos_weight_partial) {
  extern __shared__ float smem[];
  const int d = args.d, N = args.N;
  float* k_tile = smem;                         // kTileRows x d
  float* v_tile = k_tile + kTileRows * d;       // kTileRows x d
  float* q_tile = v_tile + kTileRows * d;       // kBackwardCols x d
  float* do_tile = q_tile + kBackwardCols * d;  // kBackwardCols x d
  float* mixed = do_tile + kBackwardCols * d;   // kTileRows x kBackwardCols (key, query)
  float* dlogits = mixed + kTileRows * kBackwardCols;
  float* reduce = dlogits + kTileRows * kBackwardCols;  // kThreads x 3
  RowStats* row_stats = reinterpret_cast<RowStats*>(reduce + 3 * kThreads);  // kBackwardCols

  const int key0 = blockIdx.x * kTileRows, h = blockIdx.y, b = blockIdx.z, H = gridDim.y;
  const int64_t bh = int64_t(b) * H + h;
  const int r = threadIdx.x / kLanesPerRow, lane = threadIdx.x % kLanesPerRow;
  const int j = key0 + r, j_clamped = min(j, N - 1);
  const Gates<float> gates = gates_from_lambda(args.lambdas[h]);
  const float xj = float(j_clamped % args.tables.grid_w), yj = float(j_clamped / args.tables.grid_w);

  load_rows(k_tile, args.k, b, h, key0, kTileRows, N, d);
  load_rows(v_tile, args.v, b, h, key0, kTileRows, N, d);
  float grad_k[kChannelsPerLane], grad_v[kChannelsPerLane], grad_w[3] = {0.f, 0.f, 0.f};
#pragma unroll
  for (int u = 0; u < kChannelsPerLane; ++u) grad_k[u] = grad_v[u] = 0.f;

  for (int query0 = 0; query0 < N; query0 += kBackwardCols) {
    __syncthreads();
    load_rows(q_tile, args.q, b, h, query0, kBackwardCols, N, d);
    load_rows(do_tile, args.grad_out, b, h, query0, kBackwardCols, N, d);
    if (threadIdx.x < kBackwardCols && query0 + threadIdx.x < N) {  // the query rows' constants, read once
      const int64_t row = bh * N + query0 + threadIdx.x;
      const RowSoftmax<float> softmax = args.stats[row];
      row_stats[threadIdx.x] = {softmax.max, 1.f / softmax.sum, {args.delta_content[row], args.delta_pos[row]}};
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kBackwardCols / kLanesPerRow; ++u) {
      const int it = lane + u * kLanesPerRow, i = query0 + it;
      ElementGrads<float> e{0.f, 0.f, 0.f};
      if (i < N && j < N) {
        const RowStats stats = row_stats[it];
        const ContentAndT at =
            content_and_t(args.scale, stats.max, stats.inv_sum, q_tile + it * d, k_tile + r * d, do_tile + it * d,
                          v_tile + r * d, d);
        e = element_grads(at.a, args.tables.prob(h, i, j), at.t, stats.deltas, gates);
        const PosWeightGrad<float> w =
            pos_weight_grad_terms(e.pos, xj - float(i % args.tables.grid_w), yj - float(i / args.tables.grid_w));
        grad_w[0] += w.dx;
        grad_w[1] += w.dy;
        grad_w[2] += w.dist2;
      }
      mixed[r * kBackwardCols + it] = e.mixed;
      dlogits[r * kBackwardCols + it] = e.content;
    }
    __syncwarp();
#pragma unroll
    for (int u = 0; u < kChannelsPerLane; ++u) {
      const int c = lane + u * kLanesPerRow;
      if (c >= d) continue;
      float acc_v = 0.f, acc_k = 0.f;
      for (int it = 0; it < kBackwardCols; ++it) {
        acc_v += mixed[r * kBackwardCols + it] * do_tile[it * d + c];
        acc_k += dlogits[r * kBackwardCols + it] * q_tile[it * d + c];
      }
      grad_v[u] += acc_v;
      grad_k[u] += args.scale * acc_k;
    }
  }
  if (j < N) {
#pragma unroll
    for (int u = 0; u < kChannelsPerLane; ++u) {
      const int c = lane + u * kLanesPerRow;
      if (c >= d) continue;
      const int64_t offset = ((int64_t(b) * N + j) * H + h) * d + c;
      dk[offset] = static_cast<scalar_t>(grad_k[u]);
      dv[offset] = static_cast<scalar_t>(grad_v[u]);
    }
  }
  // Fixed-order block reduction of the d pos_weight partials.
  for (int c = 0; c < 3; ++c) reduce[threadIdx.x * 3 + c] = grad_w[c];
  __syncthreads();
  if (threadIdx.x < 3) {
    float sum = 0.f;
    for (int t = 0; t < kThreads; ++t) sum += reduce[t * 3 + threadIdx.x];
    pos_weight_partial[(bh * gridDim.x + blockIdx.x) * 3 + threadIdx.x] = sum;
  }
}

// Keys [key0, key0 + kBackwardCols) of k and v into shared memory, once the previous tile's readers are done.
template <typename scalar_t>
__device__ void load_key_tile(const BackwardArgs<scalar_t>& args, int b, int h, int key0, float* k_tile,
                              float* v_tile) {
  __syncthreads();
  load_rows(k_tile, args.k, b, h, key0, kBackwardCols, args.N, args.d);
  load_rows(v_tile, args.v, b, h, key0, kBackwardCols, args.N, args.d);
  __syncthreads();
}

// dq of one query tile, and the tile's row deltas (run before the dk/dv kernel).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) backward_dq_kernel(BackwardArgs<scalar_t> args,
                                                               scalar_t* __restrict__ dq) {
  extern __shared__ float smem[];
  const int d = args.d, N = args.N;
  float* q_tile = smem;                        // kTileRows x d
  float* do_tile = q_tile + kTileRows * d;     // kTileRows x d
  float* k_tile = do_tile + kTileRows * d;     // kBackwardCols x d
  float* v_tile = k_tile + kBackwardCols * d;  // kBackwardCols x d
  float* dlogits = v_tile + kBackwardCols * d;  // kTileRows x kBackwardCols

  const int query0 = blockIdx.x * kTileRows, h = blockIdx.y, b = blockIdx.z, H = gridDim.y;
  const int64_t bh = int64_t(b) * H + h;
  const int r = threadIdx.x / kLanesPerRow, lane = threadIdx.x % kLanesPerRow;
  const int i = query0 + r;
  const int64_t row = bh * N + i;
  const Gates<float> gates = gates_from_lambda(args.lambdas[h]);
  // Rows past N are never stored: any finite max and sum serve them.
  const RowSoftmax<float> softmax = i < N ? args.stats[row] : RowSoftmax<float>{0.f, 1.f};
  const float inv_sum = 1.f / softmax.sum;

  load_rows(q_tile, args.q, b, h, query0, kTileRows, N, d);
  load_rows(do_tile, args.grad_out, b, h, query0, kTileRows, N, d);
  // First pass over the keys: delta_c = sum_j A_ij T_ij and delta_p = sum_j P_ij T_ij of this tile's rows.
  float content_dot = 0.f, pos_dot = 0.f;
  for (int key0 = 0; key0 < N; key0 += kBackwardCols) {
    load_key_tile(args, b, h, key0, k_tile, v_tile);
#pragma unroll
    for (int u = 0; u < kBackwardCols / kLanesPerRow; ++u) {
      const int jt = lane + u * kLanesPerRow, j = key0 + jt;
      if (i < N && j < N) {
        const ContentAndT at =
            content_and_t(args.scale, softmax.max, inv_sum, q_tile + r * d, k_tile + jt * d, do_tile + r * d,
                          v_tile + jt * d, d);
        content_dot += at.a * at.t;
        pos_dot += args.tables.prob(h, i, j) * at.t;
      }
    }
  }
  const RowDeltas<float> deltas{row_sum8(content_dot), row_sum8(pos_dot)};
  if (lane == 0 && i < N) {
    args.delta_content[row] = deltas.content;
    args.delta_pos[row] = deltas.pos;
  }

  float grad_q[kChannelsPerLane];
#pragma unroll
  for (int u = 0; u < kChannelsPerLane; ++u) grad_q[u] = 0.f;
  for (int key0 = 0; key0 < N; key0 += kBackwardCols) {
    load_key_tile(args, b, h, key0, k_tile, v_tile);
#pragma unroll
    for (int u = 0; u < kBackwardCols / kLanesPerRow; ++u) {
      const int jt = lane + u * kLanesPerRow, j = key0 + jt;
      float ds = 0.f;
      if (i < N && j < N) {
        const ContentAndT at =
            content_and_t(args.scale, softmax.max, inv_sum, q_tile + r * d, k_tile + jt * d, do_tile + r * d,
                          v_tile + jt * d, d);
        ds = element_grads(at.a, 0.f, at.t, deltas, gates).content;  // the content branch only: P is not needed
      }
      dlogits[r * kBackwardCols + jt] = ds;
    }
    __syncwarp();
#pragma unroll
    for (int u = 0; u < kChannelsPerLane; ++u) {
      const int c = lane + u * kLanesPerRow;
      if (c >= d) continue;
      float acc = 0.f;
      for (int jt = 0; jt < kBackwardCols; ++jt) acc += dlogits[r * kBackwardCols + jt] * k_tile[jt * d + c];
      grad_q[u] += args.scale * acc;
    }
  }
  if (i >= N) return;
#pragma unroll
  for (int u = 0; u < kChannelsPerLane; ++u) {
    const int c = lane + u * kLanesPerRow;
    if (c >= d) continue;
    dq[((int64_t(b) * N + i) * H + h) * d + c] = static_cast<scalar_t>(grad_q[u]);
  }
}

// ------------------------------------------------------------------ op entry points

void check_cuda_args(const Tensor& q, const GpsaSizes& s) {
  STD_TORCH_CHECK(q.is_cuda(), "gpsa (CUDA): q must be a CUDA tensor, got ", device_str(q));
  STD_TORCH_CHECK(q.scalar_type() != ScalarType::Double,
                  "gpsa (CUDA): float64 is not supported; use float32, float16 or bfloat16");
  STD_TORCH_CHECK(s.batch <= 65535 && s.heads <= 65535,
                  "gpsa (CUDA): at most 65535 batch elements and heads, got q of shape ", shape_str(q.sizes()));
  STD_TORCH_CHECK(s.head_dim <= kMaxHeadDim, "gpsa (CUDA): q's head_dim must be at most ", kMaxHeadDim, ", got ",
                  s.head_dim);
}

// float32, float16 and bfloat16 (float64 is rejected by check_cuda_args): body(TypeTag<scalar_t>{}).
template <typename Body>
void dispatch_cuda_types(ScalarType dtype, Body&& body) {
  switch (dtype) {
    case ScalarType::Float:
      return body(TypeTag<float>{});
    case ScalarType::Half:
      return body(TypeTag<torch::headeronly::Half>{});
    case ScalarType::BFloat16:
      return body(TypeTag<torch::headeronly::BFloat16>{});
    default:
      STD_TORCH_CHECK(false, "gpsa (CUDA): unsupported dtype ", dtype_name(dtype));
  }
}

dim3 tile_grid(const GpsaSizes& s) {
  return dim3(unsigned((s.seq_len + kTileRows - 1) / kTileRows), unsigned(s.heads), unsigned(s.batch));
}

// The current CUDA stream of the device of q (the guard has made it the current device).
cudaStream_t current_stream(const Tensor& q) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(q.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

std::tuple<Tensor, Tensor> gpsa_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& pos_weight,
                                         const Tensor& gating_param, int64_t grid_w, double scale,
                                         bool /*use_blas: the CPU kernel's switch*/) {
  const GpsaSizes s = check_forward_args(q, k, v, pos_weight, gating_param, grid_w, scale);
  check_cuda_args(q, s);
  const torch::stable::accelerator::DeviceGuard device_guard(q.get_device_index());
  const cudaStream_t stream = current_stream(q);
  auto [out, stats] = empty_forward_outputs(q, s);
  if (s.batch == 0) return {out, stats};
  const PositionalTables tables = positional_tables(pos_weight, s, stream);
  const Tensor lambdas = float_contiguous(gating_param);
  const int d = int(s.head_dim);
  const size_t smem = sizeof(float) * ((kTileRows + 2 * kForwardKeys) * d + 2 * kTileRows * kForwardKeys);
  dispatch_cuda_types(q.scalar_type(), [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    forward_kernel<scalar_t><<<tile_grid(s), kThreads, smem, stream>>>(
        bhnd_view<const scalar_t>(q), bhnd_view<const scalar_t>(k), bhnd_view<const scalar_t>(v), tables.view(),
        ptr<float>(lambdas), int(s.seq_len), d, float(scale), ptr<scalar_t>(out), ptr<RowSoftmax<float>>(stats));
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, stats};
}

Tensor zeros_like(const Tensor& t) {
  Tensor zeros = torch::stable::empty_like(t);
  torch::stable::zero_(zeros);
  return zeros;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gpsa_bwd_cuda(const Tensor& grad_out, const Tensor& q,
                                                                 const Tensor& k, const Tensor& v,
                                                                 const Tensor& pos_weight, const Tensor& gating_param,
                                                                 const Tensor& stats, int64_t grid_w, double scale,
                                                                 bool /*use_blas: the CPU kernel's switch*/) {
  const GpsaSizes s = check_backward_args(grad_out, q, k, v, pos_weight, gating_param, stats, grid_w, scale);
  check_cuda_args(q, s);
  const torch::stable::accelerator::DeviceGuard device_guard(q.get_device_index());
  const cudaStream_t stream = current_stream(q);
  auto [dq, dk, dv] = empty_input_grads(q, s);
  if (s.batch == 0) return {dq, dk, dv, zeros_like(pos_weight), zeros_like(gating_param)};

  const Tensor stats_c = torch::stable::contiguous(stats);
  const Tensor delta_content = empty_on({s.batch, s.heads, s.seq_len}, ScalarType::Float, q);
  const Tensor delta_pos = empty_on({s.batch, s.heads, s.seq_len}, ScalarType::Float, q);
  const Tensor lambdas = float_contiguous(gating_param);
  const PositionalTables tables = positional_tables(pos_weight, s, stream);
  const dim3 grid = tile_grid(s);
  const Tensor pos_weight_partial = empty_on({s.batch, s.heads, int64_t(grid.x), 3}, ScalarType::Float, q);
  const int d = int(s.head_dim);
  const size_t smem_dkdv = sizeof(float) * (2 * (kTileRows + kBackwardCols) * d + 2 * kTileRows * kBackwardCols +
                                            3 * kThreads) +
                           sizeof(RowStats) * kBackwardCols;
  const size_t smem_dq = sizeof(float) * (2 * (kTileRows + kBackwardCols) * d + kTileRows * kBackwardCols);
  dispatch_cuda_types(q.scalar_type(), [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const BackwardArgs<scalar_t> args{bhnd_view<const scalar_t>(q),
                                      bhnd_view<const scalar_t>(k),
                                      bhnd_view<const scalar_t>(v),
                                      bnhd_view<const scalar_t>(grad_out),
                                      tables.view(),
                                      ptr<float>(lambdas),
                                      ptr<const RowSoftmax<float>>(stats_c),
                                      ptr<float>(delta_content),
                                      ptr<float>(delta_pos),
                                      int(s.seq_len),
                                      d,
                                      float(scale)};
    backward_dq_kernel<scalar_t><<<grid, kThreads, smem_dq, stream>>>(args, ptr<scalar_t>(dq));
    STD_CUDA_KERNEL_LAUNCH_CHECK();
    backward_dkdv_kernel<scalar_t><<<grid, kThreads, smem_dkdv, stream>>>(
        args, ptr<scalar_t>(dk), ptr<scalar_t>(dv), ptr<float>(pos_weight_partial));
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // Fixed-order reductions of the per-tile and per-row partials: deterministic.
  const std::vector<int64_t> batch_and_rows{0, 2};
  const Tensor d_pos_weight =
      torch::stable::to(torch::stable::sum(pos_weight_partial, batch_and_rows), pos_weight.scalar_type());
  const Tensor delta_sum = torch::stable::sum(torch::stable::subtract(delta_pos, delta_content), batch_and_rows);
  const Tensor d_gating = empty_on({s.heads}, ScalarType::Float, q);
  gating_grad_kernel<<<unsigned((s.heads + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      ptr<float>(lambdas), ptr<float>(delta_sum), int(s.heads), ptr<float>(d_gating));
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv, d_pos_weight, torch::stable::to(d_gating, gating_param.scalar_type())};
}

}  // namespace
}  // namespace convit_kernels

// The ops are defined (their schemas) by the CPU part, csrc/cpu/gpsa_cpu.cpp, loaded first.
STABLE_TORCH_LIBRARY_IMPL(convit_kernels_ext, CUDA, m) {
  m.impl("gpsa_fwd", TORCH_BOX(&convit_kernels::gpsa_fwd_cuda));
  m.impl("gpsa_bwd", TORCH_BOX(&convit_kernels::gpsa_bwd_cuda));
}

#include "../build_tag.h"

// An empty Python module, so that `import convit_kernels._C_cuda` loads the
// library and runs the registration above.
extern "C" PyObject* PyInit__C_cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
