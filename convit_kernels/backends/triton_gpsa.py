"""The "triton" backend: GPSA = (1 - g) Attention(q, k, v) + g P v, FlashAttention-2 kernels in Triton.

The positional branch is separable (:mod:`convit_kernels.separable`, docs/design.md): ``g P v``
is two small contractions per head, with no work per score. So the kernels are plain
FlashAttention-2 kernels for the content branch, and the positional branch joins in their
epilogues, computed before them by the separable unit in fp32:

* ``_attn_fwd_kernel``: one program per (block of BLOCK_M queries, batch x head); each warp
  owns rows of the block. It walks the keys BLOCK_N at a time (online softmax in exp2, K / V
  tiles software-pipelined over ``num_stages``), full tiles without masks and the last, partial
  one (constexpr EVEN_N) masked. With the constexpr GPSA the epilogue reads ``g P v`` (fp32)
  and writes ``out = (1 - g) O_c + g P v`` and O_c itself (for the backward); without it the
  kernel is plain attention, the yardstick `convit-kernels aot` compares it with. It stores lse
  in log2 units (the logits are scaled by ``scale log2(e)``), which the backward reads as it
  is: p = 2^(s - lse) is then exactly what the forward normalised, with no conversion to
  round.
* ``_bwd_preprocess_kernel``: delta_c = dO . O_c per row, from the O_c the forward saved.
  O_c cannot be recovered from out where g is near 1 ((out - g P v) / (1 - g) cancels), and
  taking delta_c as sum_j A_ij T_ij from recomputed probabilities loses everything where the
  content softmax saturates (an ulp of lse moves A_ij* = 1 by ~1e-3, and T - delta_c is meant
  to cancel to ~0): dO . O_c is the FlashAttention-2 statistic, exact at both ends.
* ``_bwd_dkdv_kernel``: one program per block of BLOCK_N keys (k, v resident), walking the
  queries BLOCK_M at a time; ``_bwd_dq_kernel``: one program per block of BLOCK_M queries,
  walking the keys. Both are FlashAttention-2's content-only loops (p from lse, dp = dO v^T,
  ds = p (dp - delta_c)); the gate is a factor of their epilogues (the content branch sees
  (1 - g) dO), and the dk/dv epilogue adds the positional ``g P^T dO``. No atomics: dq has
  its own kernel.
* The positional gradients (P^T dO, the tables' gradients to pos_weight, sum dO . O_p) come
  from :func:`separable.positional_backward` and :func:`separable.pos_weight_grad`;
  d lambda = g (1 - g) sum (delta_p - delta_c), with both sums fixed-order torch reductions:
  the backward is deterministic.

The backend is a composite (``Backend.attention``) with its own custom-op pair,
``convit_kernels::triton_gpsa_fwd`` / ``triton_gpsa_bwd``, rather than the project op pair of
op.py: its saved state is its own (O_c and a log2-unit lse), which the op pair's interface
(out, natural-log lse) cannot carry without changing every backend. Autograd and fake functions
are registered here, so ``torch.compile(fullgraph=True)`` sees one opaque node per direction.

Every tensor is addressed through explicit strides (q, k, v as the qk / v projections give
them; out, O_c, dq, dk, dv written B x N x H x d). Head dims up to 128 are padded to a power of
two (BLOCK_D) with masks only where HEAD_DIM < BLOCK_D. Accumulation, softmax and the mix in
fp32; dot operands in the input dtype. fp32 inputs follow PyTorch's matmul precision
(:func:`dot_precision`): 3xTF32 under ``torch.get_float32_matmul_precision() == "highest"`` (the
default; three tensor-core products per dot from operands split by the launchers,
:func:`dot_constexprs`; fp32-level accuracy), one TF32 product under
"high" / "medium" (``torch.backends.cuda.matmul.allow_tf32 = True``; ~1e-3 relative). Under the
interpreter (TRITON_INTERPRET=1), whose bf16 ``tl.dot`` is wrong, the constexpr DOT_DTYPE
upcasts bf16 operands to fp32; compiled code keeps bf16 operands.

Configurations: ``FIXED_CONFIGS`` (by kernel and input element size) compile without spills
for sm_80 and sm_90 and take wgmma on sm_90 in 16-bit dtypes; ``convit-kernels aot`` reports
their resources and instruction counts. On a GPU ``triton.autotune`` picks among a few tile
shapes and the fixed configuration, cached per (N, head dim, dtypes, arch); under
``torch.use_deterministic_algorithms(True)`` or CONVIT_KERNELS_TRITON_AUTOTUNE=0 the launchers
run the fixed configuration, so results are bitwise the same in every process and rank.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from ..separable import (
    AxisTables,
    apply_positional,
    bhnd,
    head_major,
    pos_weight_grad,
    positional_axis_probs,
    positional_backward,
)
from . import HALF_AND_FLOAT, Backend, register_backend

__all__ = ["gpsa_forward", "gpsa_backward", "attention_forward", "triton_gpsa", "dot_precision", "INTERPRET"]

# Read once, as triton.jit reads it when decorating the kernels below.
INTERPRET = bool(triton.knobs.runtime.interpret)
AUTOTUNE = not INTERPRET and os.environ.get("CONVIT_KERNELS_TRITON_AUTOTUNE", "1") != "0"
MAX_HEAD_DIM = 128
LOG2E = 1.4426950408889634  # logits are scaled by scale * log2(e) so that the kernels use exp2


# ---------------------------------------------------------------- configurations


def _config(block_m, block_n, num_warps, num_stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# The fixed configurations, by kernel and input element size (2: fp16 / bf16, 4: fp32). BLOCK_M
# is the query block, BLOCK_N the key block, for every kernel (dk/dv owns BLOCK_N keys and walks
# BLOCK_M queries a step; dq and the forward own BLOCK_M queries and walk BLOCK_N keys). 16-bit
# tiles are 64 rows per warpgroup (wgmma's M) on the operand each warp owns. fp32 tiles are
# small: fp32 dot operands held in registers take twice the room of 16-bit ones (and 3xTF32
# reads a high and a low part of each), so these are the largest that compile without spills;
# `convit-kernels aot --fp32-precision highest` / `high` reports both precisions.
FIXED_CONFIGS = {
    "fwd": {2: _config(128, 64, 8, 3), 4: _config(16, 32, 4, 1)},
    "bwd_pre": {2: _config(128, 16, 4, 1), 4: _config(128, 16, 4, 1)},
    "bwd_dkdv": {2: _config(32, 128, 8, 2), 4: _config(16, 32, 4, 1)},
    "bwd_dq": {2: _config(128, 32, 8, 2), 4: _config(16, 32, 4, 1)},
}
# The interpreter's cost is per program and loop step, nearly independent of the tile: few,
# large tiles. 64-wide key and query steps give N = 196 three full steps and a partial one,
# N <= 64 a partial one only.
INTERPRETER_CONFIGS = {
    "fwd": _config(64, 64, 4, 1),
    "bwd_pre": _config(64, 16, 4, 1),
    "bwd_dkdv": _config(64, 64, 4, 1),
    "bwd_dq": _config(64, 64, 4, 1),
}
# Autotuning candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) of the 16-bit kernels; fp32
# runs its fixed configuration.
TUNING_SPACE = {
    "fwd": [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
    "bwd_pre": [],
    "bwd_dkdv": [(32, 128, 8, 2), (32, 64, 4, 3), (64, 128, 8, 2)],
    "bwd_dq": [(128, 32, 8, 2), (64, 32, 4, 3), (128, 64, 8, 2)],
}


def fixed_config(kernel_name: str, element_size: int) -> triton.Config:
    """The configuration a kernel runs without autotuning (and under the interpreter, its own)."""
    if INTERPRET:
        return INTERPRETER_CONFIGS[kernel_name]
    return FIXED_CONFIGS[kernel_name][element_size]


def _tuned(kernel_name):
    """triton.autotune over the kernel's space, keyed on (N, HEAD_DIM, ARCH) and the dtypes of the arguments.

    fp32 inputs keep their fixed configuration (the 16-bit tiles spill with fp32 operands);
    16-bit ones drop tiles wider than N needs.
    """
    space = [_config(*c) for c in TUNING_SPACE[kernel_name]]
    fp32 = FIXED_CONFIGS[kernel_name][4]

    def prune(configs, named_args, **kwargs):
        if named_args["Q"].element_size() == 4:
            return [fp32]
        cap = max(64, triton.next_power_of_2(named_args["N"]))
        return [c for c in space if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= cap] or space[:1]

    return triton.autotune(
        configs=space + [fp32], key=["N", "HEAD_DIM", "ARCH"], prune_configs_by={"early_config_prune": prune}
    )


# ---------------------------------------------------------------- shared device code


@triton.jit
def _load(ptrs, rows_ok, cols_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """A 2-D tile, zero where a masked row or column is out of range; the unmasked forms vectorise."""
    if MASK_ROWS and MASK_COLS:
        return tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
    elif MASK_ROWS:
        return tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    elif MASK_COLS:
        return tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _store(ptrs, value, rows_ok, cols_ok, MASK_COLS: tl.constexpr):
    if MASK_COLS:
        tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=rows_ok[:, None] & cols_ok[None, :])
    else:
        tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=rows_ok[:, None])


@triton.jit
def _tf32_high(x):
    """fp32 x rounded to TF32's 10-bit mantissa (nearest, ties away): exact as a TF32 operand, x - it exact too."""
    return ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _mma(a, a_lo, b, b_lo, acc, PRECISION: tl.constexpr, SPLIT: tl.constexpr):
    """acc + a b; with SPLIT, 3xTF32 from operands split as a + a_lo, b + b_lo (a, b exact in TF32)."""
    if SPLIT:
        acc = tl.dot(a_lo, b, acc, input_precision="tf32")
        acc = tl.dot(a, b_lo, acc, input_precision="tf32")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _load_operand(
    ptrs, LO_OFFSET, rows_ok, cols_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """(tile, low part) of a dot operand: under SPLIT the low part is LO_OFFSET elements on; else the tile again."""
    x = _load(ptrs, rows_ok, cols_ok, MASK_ROWS, MASK_COLS).to(DOT_DTYPE)
    if SPLIT:
        return x, _load(ptrs + LO_OFFSET, rows_ok, cols_ok, MASK_ROWS, MASK_COLS)
    else:
        return x, x


@triton.jit
def _split(x, SPLIT: tl.constexpr):
    """(high, low) parts of a computed fp32 operand under SPLIT; (x, x) otherwise (the low part unused)."""
    if SPLIT:
        high = _tf32_high(x)
        return high, x - high
    else:
        return x, x


# ---------------------------------------------------------------- forward


@triton.jit
def _fwd_key_step(
    acc, m_i, l_i, q, q_lo, kt_ptrs, v_ptrs, LO_OFFSET, offs_n, offs_d, N, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """One key tile of the online softmax; MASKED for the last, partial tile (keys past N get -inf)."""
    keys_ok = offs_n < N
    dims_ok = offs_d < HEAD_DIM
    kt, kt_lo = _load_operand(kt_ptrs, LO_OFFSET, dims_ok, keys_ok, HEAD_DIM != BLOCK_D, MASKED, DOT_DTYPE, SPLIT)
    v, v_lo = _load_operand(v_ptrs, LO_OFFSET, keys_ok, dims_ok, MASKED, HEAD_DIM != BLOCK_D, DOT_DTYPE, SPLIT)
    s = _mma(q, q_lo, kt, kt_lo, None, PRECISION, SPLIT) * qk_scale  # log2 units
    if MASKED:
        s = tl.where(keys_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    p_hi, p_lo = _split(p.to(DOT_DTYPE), SPLIT)
    acc = _mma(p_hi, p_lo, v, v_lo, acc * alpha[:, None], PRECISION, SPLIT)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, POS, GATES, OUT, OUT_C, LSE,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_ph, stride_pn, stride_pd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N, qk_scale, LO_OFFSET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT: tl.constexpr, GPSA: tl.constexpr, ARCH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    """O_c = softmax(scale q k^T) v for BLOCK_M queries; with GPSA, out = (1 - g) O_c + POS (= g P v)."""
    pid_bh = tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows_ok = offs_m < N
    dims_ok = offs_d < HEAD_DIM
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q, q_lo = _load_operand(q_ptrs, LO_OFFSET, rows_ok, dims_ok, True, HEAD_DIM != BLOCK_D, DOT_DTYPE, SPLIT)
    # K^T (BLOCK_D x BLOCK_N) and V (BLOCK_N x BLOCK_D) tiles, advanced BLOCK_N keys a step.
    kt_ptrs = K + b * stride_kb + h * stride_kh + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max, log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of 2^(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_key_step(acc, m_i, l_i, q, q_lo, kt_ptrs + start_n * stride_kn,
                                      v_ptrs + start_n * stride_vn, LO_OFFSET, start_n + offs_n, offs_d, N, qk_scale,
                                      HEAD_DIM, BLOCK_D, DOT_DTYPE, PRECISION, SPLIT, False)  # fmt: skip
    if not EVEN_N:
        acc, m_i, l_i = _fwd_key_step(acc, m_i, l_i, q, q_lo, kt_ptrs + n_full * stride_kn,
                                      v_ptrs + n_full * stride_vn, LO_OFFSET, n_full + offs_n, offs_d, N, qk_scale,
                                      HEAD_DIM, BLOCK_D, DOT_DTYPE, PRECISION, SPLIT, True)  # fmt: skip

    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_i), mask=rows_ok)  # log2 units
    o_c = acc / l_i[:, None]
    o_offs = b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    if GPSA:
        one_minus_g = tl.load(GATES + 2 * h + 1)
        p_ptrs = POS + b * stride_pb + h * stride_ph + offs_m[:, None] * stride_pn + offs_d[None, :] * stride_pd
        pos = _load(p_ptrs, rows_ok, dims_ok, True, HEAD_DIM != BLOCK_D)
        _store(OUT_C + o_offs, o_c, rows_ok, dims_ok, HEAD_DIM != BLOCK_D)
        _store(OUT + o_offs, one_minus_g * o_c + pos, rows_ok, dims_ok, HEAD_DIM != BLOCK_D)
    else:
        _store(OUT + o_offs, o_c, rows_ok, dims_ok, HEAD_DIM != BLOCK_D)


# ---------------------------------------------------------------- backward


@triton.jit
def _bwd_preprocess_kernel(
    OUT_C, DOUT, DELTA,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    H, N,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ARCH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """delta_c = dO . O_c for BLOCK_M rows (BLOCK_N unused: the configurations share one form)."""
    pid_bh = tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows_ok = offs_m < N
    dims_ok = offs_d < HEAD_DIM
    o_ptrs = OUT_C + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    g_ptrs = DOUT + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gn + offs_d[None, :] * stride_gd
    o_c = _load(o_ptrs, rows_ok, dims_ok, True, HEAD_DIM != BLOCK_D).to(tl.float32)
    dout = _load(g_ptrs, rows_ok, dims_ok, True, HEAD_DIM != BLOCK_D).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_m, tl.sum(o_c * dout, 1), mask=rows_ok)


@triton.jit
def _dkdv_query_step(
    dk, dv, k, v, k_ptrs, v_ptrs, keys_ok, qt_ptrs, dout_ptrs, LO_OFFSET, LSE_ROWS, DELTA_ROWS, offs_m, offs_d, N,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """One query tile for a block of keys; MASKED for the last, partial tile (lse = +inf there: p = 0).

    k, v: the resident tiles; under SPLIT they are read here, high and low parts, each step.
    """
    rows_ok = offs_m < N
    dims_ok = offs_d < HEAD_DIM
    k_lo, v_lo = k, v
    if SPLIT:
        k, k_lo = _load_operand(k_ptrs, LO_OFFSET, keys_ok, dims_ok, True, HEAD_DIM != BLOCK_D, DOT_DTYPE, SPLIT)
        v, v_lo = _load_operand(v_ptrs, LO_OFFSET, keys_ok, dims_ok, True, HEAD_DIM != BLOCK_D, DOT_DTYPE, SPLIT)
    qt, qt_lo = _load_operand(qt_ptrs, LO_OFFSET, dims_ok, rows_ok, HEAD_DIM != BLOCK_D, MASKED, DOT_DTYPE, SPLIT)
    dout, dout_lo = _load_operand(dout_ptrs, LO_OFFSET, rows_ok, dims_ok, MASKED, HEAD_DIM != BLOCK_D, DOT_DTYPE, SPLIT)
    if MASKED:
        lse = tl.load(LSE_ROWS + offs_m, mask=rows_ok, other=float("inf"))
        delta = tl.load(DELTA_ROWS + offs_m, mask=rows_ok, other=0.0)
    else:
        lse = tl.load(LSE_ROWS + offs_m)
        delta = tl.load(DELTA_ROWS + offs_m)
    pt = tl.exp2(_mma(k, k_lo, qt, qt_lo, None, PRECISION, SPLIT) * qk_scale - lse[None, :])  # P^T, keys x queries
    pt_hi, pt_lo = _split(pt.to(DOT_DTYPE), SPLIT)
    dv = _mma(pt_hi, pt_lo, dout, dout_lo, dv, PRECISION, SPLIT)
    dpt = _mma(v, v_lo, tl.trans(dout), tl.trans(dout_lo), None, PRECISION, SPLIT)  # (dO v^T)^T
    dst_hi, dst_lo = _split((pt * (dpt - delta[None, :])).to(DOT_DTYPE), SPLIT)
    dk = _mma(dst_hi, dst_lo, tl.trans(qt), tl.trans(qt_lo), dk, PRECISION, SPLIT)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DOUT, LSE, DELTA, PT_DOUT, GATES, DK, DV,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_pb, stride_ph, stride_pn, stride_pd,
    stride_db, stride_dh, stride_dn, stride_dd,
    H, N, qk_scale, scale, LO_OFFSET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT: tl.constexpr, ARCH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr,
):  # fmt: skip
    """dk = scale (1 - g) dS^T q and dv = (1 - g) A^T dO + g P^T dO (PT_DOUT) for BLOCK_N keys."""
    pid_bh = tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    keys_ok = offs_n < N
    dims_ok = offs_d < HEAD_DIM
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    # Keys past N load as zeros; their rows of dk / dv are never stored, and no other row reads them.
    if SPLIT:  # read by each step, with their low parts: resident split k and v spill
        k, v = 0.0, 0.0
    else:
        k = _load(k_ptrs, keys_ok, dims_ok, True, HEAD_DIM != BLOCK_D).to(DOT_DTYPE)
        v = _load(v_ptrs, keys_ok, dims_ok, True, HEAD_DIM != BLOCK_D).to(DOT_DTYPE)
    # Q^T (BLOCK_D x BLOCK_M) and dO (BLOCK_M x BLOCK_D) tiles, advanced BLOCK_M queries a step.
    qt_ptrs = Q + b * stride_qb + h * stride_qh + offs_d[:, None] * stride_qd + offs_m[None, :] * stride_qn
    dout_ptrs = DOUT + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gn + offs_d[None, :] * stride_gd
    lse_rows = LSE + pid_bh.to(tl.int64) * N
    delta_rows = DELTA + pid_bh.to(tl.int64) * N

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    m_full = (N // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _dkdv_query_step(dk, dv, k, v, k_ptrs, v_ptrs, keys_ok, qt_ptrs + start_m * stride_qn,
                                  dout_ptrs + start_m * stride_gn, LO_OFFSET, lse_rows, delta_rows,
                                  start_m + offs_m, offs_d, N, qk_scale,
                                  HEAD_DIM, BLOCK_D, DOT_DTYPE, PRECISION, SPLIT, False)  # fmt: skip
    if not EVEN_M:
        dk, dv = _dkdv_query_step(dk, dv, k, v, k_ptrs, v_ptrs, keys_ok, qt_ptrs + m_full * stride_qn,
                                  dout_ptrs + m_full * stride_gn, LO_OFFSET, lse_rows, delta_rows,
                                  m_full + offs_m, offs_d, N, qk_scale,
                                  HEAD_DIM, BLOCK_D, DOT_DTYPE, PRECISION, SPLIT, True)  # fmt: skip

    g = tl.load(GATES + 2 * h)
    one_minus_g = tl.load(GATES + 2 * h + 1)
    p_ptrs = PT_DOUT + b * stride_pb + h * stride_ph + offs_n[:, None] * stride_pn + offs_d[None, :] * stride_pd
    positional = _load(p_ptrs, keys_ok, dims_ok, True, HEAD_DIM != BLOCK_D)
    d_offs = b * stride_db + h * stride_dh + offs_n[:, None] * stride_dn + offs_d[None, :] * stride_dd
    _store(DK + d_offs, dk * (scale * one_minus_g), keys_ok, dims_ok, HEAD_DIM != BLOCK_D)
    _store(DV + d_offs, one_minus_g * dv + g * positional, keys_ok, dims_ok, HEAD_DIM != BLOCK_D)


@triton.jit
def _dq_key_step(
    dq, q, dout, q_ptrs, dout_ptrs, rows_ok, lse, delta, kt_ptrs, vt_ptrs, LO_OFFSET, offs_n, offs_d, N, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """One key tile for a block of queries; MASKED for the last, partial tile (p = 0 past N).

    q, dout: the resident tiles; under SPLIT they are read here, high and low parts, each step.
    """
    keys_ok = offs_n < N
    dims_ok = offs_d < HEAD_DIM
    q_lo, dout_lo = q, dout
    if SPLIT:
        q, q_lo = _load_operand(q_ptrs, LO_OFFSET, rows_ok, dims_ok, True, HEAD_DIM != BLOCK_D, DOT_DTYPE, SPLIT)
        dout, dout_lo = _load_operand(
            dout_ptrs, LO_OFFSET, rows_ok, dims_ok, True, HEAD_DIM != BLOCK_D, DOT_DTYPE, SPLIT
        )
    kt, kt_lo = _load_operand(kt_ptrs, LO_OFFSET, dims_ok, keys_ok, HEAD_DIM != BLOCK_D, MASKED, DOT_DTYPE, SPLIT)
    vt, vt_lo = _load_operand(vt_ptrs, LO_OFFSET, dims_ok, keys_ok, HEAD_DIM != BLOCK_D, MASKED, DOT_DTYPE, SPLIT)
    p = tl.exp2(_mma(q, q_lo, kt, kt_lo, None, PRECISION, SPLIT) * qk_scale - lse[:, None])
    if MASKED:  # zero keys would give p = 2^-lse, which overflows for very negative rows
        p = tl.where(keys_ok[None, :], p, 0.0)
    dp = _mma(dout, dout_lo, vt, vt_lo, None, PRECISION, SPLIT)
    ds_hi, ds_lo = _split((p * (dp - delta[:, None])).to(DOT_DTYPE), SPLIT)
    return _mma(ds_hi, ds_lo, tl.trans(kt), tl.trans(kt_lo), dq, PRECISION, SPLIT)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DOUT, LSE, DELTA, GATES, DQ,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_db, stride_dh, stride_dn, stride_dd,
    H, N, qk_scale, scale, LO_OFFSET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT: tl.constexpr, ARCH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    """dq = scale (1 - g) dS k for BLOCK_M queries."""
    pid_bh = tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows_ok = offs_m < N
    dims_ok = offs_d < HEAD_DIM
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    dout_ptrs = DOUT + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gn + offs_d[None, :] * stride_gd
    if SPLIT:  # read by each step, with their low parts: resident split q and dO spill
        q, dout = 0.0, 0.0
    else:
        q = _load(q_ptrs, rows_ok, dims_ok, True, HEAD_DIM != BLOCK_D).to(DOT_DTYPE)
        dout = _load(dout_ptrs, rows_ok, dims_ok, True, HEAD_DIM != BLOCK_D).to(DOT_DTYPE)
    # Rows past N have q = dO = 0 and are never stored: any finite lse serves them.
    lse = tl.load(LSE + pid_bh.to(tl.int64) * N + offs_m, mask=rows_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + offs_m, mask=rows_ok, other=0.0)
    # K^T and V^T tiles (BLOCK_D x BLOCK_N), advanced BLOCK_N keys a step.
    kt_ptrs = K + b * stride_kb + h * stride_kh + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn
    vt_ptrs = V + b * stride_vb + h * stride_vh + offs_d[:, None] * stride_vd + offs_n[None, :] * stride_vn

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_key_step(dq, q, dout, q_ptrs, dout_ptrs, rows_ok, lse, delta, kt_ptrs + start_n * stride_kn,
                          vt_ptrs + start_n * stride_vn, LO_OFFSET, start_n + offs_n, offs_d, N, qk_scale,
                          HEAD_DIM, BLOCK_D, DOT_DTYPE, PRECISION, SPLIT, False)  # fmt: skip
    if not EVEN_N:
        dq = _dq_key_step(dq, q, dout, q_ptrs, dout_ptrs, rows_ok, lse, delta, kt_ptrs + n_full * stride_kn,
                          vt_ptrs + n_full * stride_vn, LO_OFFSET, n_full + offs_n, offs_d, N, qk_scale,
                          HEAD_DIM, BLOCK_D, DOT_DTYPE, PRECISION, SPLIT, True)  # fmt: skip

    one_minus_g = tl.load(GATES + 2 * h + 1)
    d_ptrs = DQ + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dn + offs_d[None, :] * stride_dd
    _store(d_ptrs, dq * (scale * one_minus_g), rows_ok, dims_ok, HEAD_DIM != BLOCK_D)


# The kernels by name: aot compiles each ("fwd" also as its GPSA-free twin).
KERNELS = {
    "fwd": _attn_fwd_kernel,
    "bwd_pre": _bwd_preprocess_kernel,
    "bwd_dkdv": _bwd_dkdv_kernel,
    "bwd_dq": _bwd_dq_kernel,
}
# The even-tile constexpr of each looping kernel and the block it divides N by: set at launch,
# after autotuning has picked the block.
EVEN_FLAGS = {"fwd": ("EVEN_N", "BLOCK_N"), "bwd_dkdv": ("EVEN_M", "BLOCK_M"), "bwd_dq": ("EVEN_N", "BLOCK_N")}


def _with_even_flag(name, kernel):
    if name not in EVEN_FLAGS:
        return kernel
    flag, block = EVEN_FLAGS[name]
    return triton.heuristics({flag: lambda args: args["N"] % args[block] == 0})(kernel)


_FIXED = {name: _with_even_flag(name, kernel) for name, kernel in KERNELS.items()}
_TUNED = {name: _tuned(name)(_FIXED[name]) for name in KERNELS if TUNING_SPACE[name]}


# ---------------------------------------------------------------- launchers


def dot_dtype(dtype: torch.dtype):
    """Element type of the tl.dot operands: the input's, except bf16 under the interpreter (fp32 there)."""
    if dtype == torch.bfloat16 and INTERPRET:
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: fp32 inputs follow torch's matmul precision; 16-bit ones ignore it.

    "highest" (the default) takes 3xTF32, three tensor-core products per dot with fp32-level
    accuracy (IEEE fp32 dots would leave the tensor cores); "high" / "medium" (or
    ``torch.backends.cuda.matmul.allow_tf32 = True``) one TF32 product, about 3x cheaper and
    ~1e-3 relative.
    """
    if dtype == torch.float32 and _fp32_matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"


@torch.compiler.assume_constant_result
def _fp32_matmul_precision() -> str:
    """torch's setting, read when a compiled graph is traced (as Inductor reads it for its own matmuls)."""
    return torch.get_float32_matmul_precision()


def _head_dims(d: int):
    """(HEAD_DIM, BLOCK_D) of a head dim the registry let through (d <= MAX_HEAD_DIM)."""
    if d > MAX_HEAD_DIM:
        raise ValueError(f"the triton backend takes head dims up to {MAX_HEAD_DIM}, got {d}")
    return d, max(16, triton.next_power_of_2(d))


def _arch(device: torch.device) -> int:
    """10 major + minor of a CUDA device (0 elsewhere): the autotuning key's architecture."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _launch(kernel_name, grid, q, args, **constexprs):
    """Run a kernel on q's device: autotuned, or in its fixed configuration.

    The fixed configuration is the same in every process, so under
    ``torch.use_deterministic_algorithms(True)`` (or CONVIT_KERNELS_TRITON_AUTOTUNE=0) results
    are bitwise stable across processes and ranks; an autotuned choice depends on timings.
    """
    head_dim, block_d = _head_dims(q.shape[-1])
    constexprs.update(HEAD_DIM=head_dim, BLOCK_D=block_d, ARCH=_arch(q.device))
    tuned = _TUNED.get(kernel_name)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if AUTOTUNE and tuned is not None and not torch.are_deterministic_algorithms_enabled():
            tuned[lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **constexprs)
            return
        config = fixed_config(kernel_name, q.element_size())
        _FIXED[kernel_name][grid(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"])](
            *args, **constexprs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
        )


def dot_constexprs(dtype: torch.dtype, precision: str | None = None) -> dict:
    """DOT_DTYPE, PRECISION and SPLIT of the kernels; the fp32 precision defaults to torch's (:func:`dot_precision`).

    3xTF32 is SPLIT: the launchers hand the kernels each fp32 operand as a TF32 high part and
    its remainder (:func:`tf32_split`) and the kernels make the three TF32 products themselves.
    Triton's own "tf32x3" splits operands inside the kernel, where the resident ones then spill
    registers; and the forward and both backward kernels split alike, so the backward's logits
    are the forward's to the last bit that matters for saturated softmaxes.
    """
    if precision is None or dtype != torch.float32:
        precision = dot_precision(dtype)
    split = precision == "tf32x3"
    return dict(DOT_DTYPE=dot_dtype(dtype), PRECISION="tf32" if split else precision, SPLIT=split)


def tf32_split(x: torch.Tensor) -> torch.Tensor:
    """2 x (x's shape) contiguous fp32: x rounded to TF32 (exact as a TF32 operand) and x minus that (exact).

    The operands of the SPLIT kernels: a product of x and y is then three TF32 products,
    hi hi + hi lo + lo hi, which leaves out only lo lo (~2^-22 relative): 3xTF32.
    """
    x = x.detach()  # the kernels' operands: the custom ops' autograd is their own
    pair = torch.empty((2, *x.shape), device=x.device, dtype=torch.float32)
    high = pair[0]
    high.copy_(x)
    # The bits as int32: + half an ulp of TF32, then clear the 13 bits TF32 drops (nearest, ties away).
    high.view(torch.int32).add_(0x1000).bitwise_and_(~0x1FFF)
    torch.sub(x, high, out=pair[1])
    return pair


def _gates_table(gating_param: torch.Tensor) -> torch.Tensor:
    """H x 2 fp32 (g, 1 - g), with 1 - g = sigmoid(-lambda): exact where g rounds to 1."""
    lam = gating_param.detach().to(torch.float32)
    return torch.stack((torch.sigmoid(lam), torch.sigmoid(-lam)), -1).contiguous()


def attention_forward(q, k, v, scale: float, positional=None, gates=None, precision: str | None = None):
    """(out, O_c, lse2) of the forward kernel; plain attention (its GPSA-free twin) when positional is None.

    q, k, v: B x H x N x d, any strides. positional: B x H x N x d fp32 ``g P v``, gates: the
    H x 2 (g, 1 - g) table. out and O_c are B x N x H x d in q's dtype (O_c None for the twin),
    lse2 is B x H x N fp32 in log2 units. precision: fp32's dots (:func:`dot_precision`'s
    value; default torch's current setting).
    """
    B, H, N, d = q.shape
    gpsa = positional is not None
    out = torch.empty((B, N, H, d), device=q.device, dtype=q.dtype)
    dots, lo_offset = dot_constexprs(q.dtype, precision), 0
    if dots["SPLIT"]:  # each operand's TF32 high part, its low part lo_offset elements further on
        q, k, v = (tf32_split(t)[0] for t in (q, k, v))
        lo_offset = q.numel()
    out_bhnd = out.transpose(1, 2)
    content = torch.empty_like(out) if gpsa else None
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    if not gpsa:  # the twin reads neither: any tensors of the right kind fill the slots
        positional, gates = out_bhnd, lse
    _launch(
        "fwd", lambda bm, bn: (triton.cdiv(N, bm), B * H), q,
        (q, k, v, positional, gates, out_bhnd, content.transpose(1, 2) if gpsa else out_bhnd, lse,
         *q.stride(), *k.stride(), *v.stride(), *positional.stride(), *out_bhnd.stride(),
         H, N, scale * LOG2E, lo_offset),
        **dots, GPSA=gpsa,
    )  # fmt: skip
    return out, content, lse


def gpsa_forward(q, k, v, pos_weight, gating_param, grid_w: int, scale: float, precision: str | None = None):
    """(out, O_c, lse2): the content branch in the kernel, g P v from the separable unit mixed in its epilogue."""
    grid_h = q.shape[2] // grid_w
    gates = _gates_table(gating_param)
    px, py = positional_axis_probs(pos_weight, grid_h, grid_w, torch.float32)
    gated = AxisTables(px, py * gates[:, 0].view(-1, 1, 1))  # g P = (g py) (x) px: the gate rides on a small table
    positional = bhnd(apply_positional(gated, head_major(v, grid_h, torch.float32)))  # g P v, fp32
    return attention_forward(q, k, v, scale, positional, gates, precision)


def gpsa_backward(
    grad_out, q, k, v, content, lse, pos_weight, gating_param, grid_w: int, scale: float, precision: str | None = None
):
    """(dq, dk, dv in B x N x H x d, d pos_weight, d gating_param); grad_out and content are B x N x H x d.

    precision: the forward's (its logits are recomputed here as the forward made them).
    """
    B, H, N, d = q.shape
    grid_h = N // grid_w
    gates = _gates_table(gating_param)
    g = gates[:, 0]
    dout = grad_out.transpose(1, 2)  # B x H x N x d views
    content = content.transpose(1, 2)

    # The positional half on head-major fp32 copies: P^T dO, the tables' gradients, sum dO . P v.
    tables = positional_axis_probs(pos_weight, grid_h, grid_w, torch.float32)
    v_hm, dout_hm = head_major(v, grid_h, torch.float32), head_major(dout, grid_h, torch.float32)
    pt_dout_hm, dpx, dpy = positional_backward(tables, dout_hm, v_hm)
    d_pos_weight = pos_weight_grad(tables, g.view(H, 1, 1) * dpx, g.view(H, 1, 1) * dpy)
    sum_delta_p = torch.linalg.vecdot(pt_dout_hm.flatten(1), v_hm.flatten(1))  # sum (P^T dO) . v = sum dO . P v
    pt_dout = bhnd(pt_dout_hm)

    delta = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    _launch(
        "bwd_pre", lambda bm, bn: (triton.cdiv(N, bm), B * H), q,
        (content, dout, delta, *content.stride(), *dout.stride(), H, N),
    )  # fmt: skip
    dq, dk, dv = (torch.empty((B, N, H, d), device=q.device, dtype=q.dtype) for _ in range(3))
    dq_bhnd, dk_bhnd, dv_bhnd = (t.transpose(1, 2) for t in (dq, dk, dv))
    dots, lo_offset = dot_constexprs(q.dtype, precision), 0
    if dots["SPLIT"]:
        q, k, v, dout = (tf32_split(t)[0] for t in (q, k, v, dout))
        lo_offset = q.numel()
    _launch(
        "bwd_dkdv", lambda bm, bn: (triton.cdiv(N, bn), B * H), q,
        (q, k, v, dout, lse, delta, pt_dout, gates, dk_bhnd, dv_bhnd,
         *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *pt_dout.stride(), *dk_bhnd.stride(),
         H, N, scale * LOG2E, scale, lo_offset),
        **dots,
    )  # fmt: skip
    _launch(
        "bwd_dq", lambda bm, bn: (triton.cdiv(N, bm), B * H), q,
        (q, k, v, dout, lse, delta, gates, dq_bhnd,
         *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq_bhnd.stride(),
         H, N, scale * LOG2E, scale, lo_offset),
        **dots,
    )  # fmt: skip
    # d lambda = g (1 - g) sum_(b, i) (delta_p - delta_c): fixed-order sums, deterministic.
    d_gating = g * gates[:, 1] * (sum_delta_p - delta.sum((0, 2)))
    return dq, dk, dv, d_pos_weight.to(pos_weight.dtype), d_gating.to(gating_param.dtype)


# ---------------------------------------------------------------- the custom-op pair and the backend


def _bnhd_like(q: torch.Tensor) -> torch.Tensor:
    B, H, N, d = q.shape
    return q.new_empty((B, N, H, d))


@torch.library.custom_op("convit_kernels::triton_gpsa_fwd", mutates_args=())
def triton_gpsa_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos_weight: torch.Tensor,
    pos_bias: torch.Tensor,
    gating_param: torch.Tensor,
    grid_w: int,
    scale: float,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, O_c in B x N x H x d, lse2 B x H x N fp32, log2 units); pos_bias is taken for its (zero) gradient.

    precision: fp32's dots, "tf32x3" or "tf32" (:func:`dot_precision`), fixed at the call so that
    the backward recomputes the logits as the forward made them.
    """
    return gpsa_forward(q, k, v, pos_weight, gating_param, grid_w, scale, precision)


@triton_gpsa_fwd.register_fake
def _triton_gpsa_fwd_fake(q, k, v, pos_weight, pos_bias, gating_param, grid_w, scale, precision):
    B, H, N, d = q.shape
    return _bnhd_like(q), _bnhd_like(q), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("convit_kernels::triton_gpsa_bwd", mutates_args=())
def triton_gpsa_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    content: torch.Tensor,
    lse: torch.Tensor,
    pos_weight: torch.Tensor,
    gating_param: torch.Tensor,
    grid_w: int,
    scale: float,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv in B x N x H x d, d pos_weight, d gating_param)."""
    return gpsa_backward(grad_out, q, k, v, content, lse, pos_weight, gating_param, grid_w, scale, precision)


@triton_gpsa_bwd.register_fake
def _triton_gpsa_bwd_fake(grad_out, q, k, v, content, lse, pos_weight, gating_param, grid_w, scale, precision):
    return _bnhd_like(q), _bnhd_like(q), _bnhd_like(q), torch.empty_like(pos_weight), torch.empty_like(gating_param)


def _setup_context(ctx, inputs, output):
    q, k, v, pos_weight, pos_bias, gating_param, grid_w, scale, precision = inputs
    _, content, lse = output
    ctx.save_for_backward(q, k, v, content, lse, pos_weight, pos_bias, gating_param)
    ctx.grid_w, ctx.scale, ctx.precision = grid_w, scale, precision


def _backward(ctx, grad_out, _grad_content, _grad_lse):
    q, k, v, content, lse, pos_weight, pos_bias, gating_param = ctx.saved_tensors
    # dO in the dtype of q (autograd may hand another one, e.g. under AMP).
    dq, dk, dv, dw, dgate = triton_gpsa_bwd(
        grad_out.to(q.dtype), q, k, v, content, lse, pos_weight, gating_param, ctx.grid_w, ctx.scale, ctx.precision
    )
    # The bias is a per-row constant inside the positional softmax: its gradient is exactly zero.
    db = torch.zeros_like(pos_bias)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), dw, db, dgate, None, None, None


triton_gpsa_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_gpsa(q, k, v, pos_weight, pos_bias, gating_param, grid_size: tuple[int, int], scale: float):
    """GPSA through the Triton kernels; B x H x N x d view of a B x N x H x d tensor."""
    precision = dot_precision(q.dtype)
    out, _, _ = triton_gpsa_fwd(q, k, v, pos_weight, pos_bias, gating_param, grid_size[1], scale, precision)
    return out.transpose(1, 2)


def _unavailable() -> str | None:
    if INTERPRET or torch.cuda.is_available():
        return None
    return (
        "no CUDA GPU here (set TRITON_INTERPRET=1 before import to run the kernels on CPU tensors "
        "in Triton's interpreter)"
    )


register_backend(
    Backend(
        "triton",
        "(1 - g) FlashAttention-2 Triton kernels + g separable P v in their epilogues (sm_80+; "
        "CPU tensors under TRITON_INTERPRET=1)",
        devices=("cuda", "cpu") if INTERPRET else ("cuda",),
        dtypes=HALF_AND_FLOAT,
        attention=triton_gpsa,
        max_head_dim=MAX_HEAD_DIM,
        min_cuda_capability=(8, 0),
        unavailable=_unavailable,
    )
)
