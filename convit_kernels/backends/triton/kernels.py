"""The Triton kernels: FlashAttention-2 forward (GPSA epilogue), backward preprocess, dk/dv and dq.

docs/design.md ("Triton kernels") describes their loops, the saved state (O_c and each row's max and
sum, apart), 3xTF32 from split operands, and why the positional branch joins in the epilogues.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["KERNELS", "EVEN_FLAGS", "LOG2E", "runtime_loop_probe"]

LOG2E = 1.4426950408889634  # logits are scaled by scale * log2(e) so that the kernels use exp2


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
    """One key tile of the online softmax; MASKED for the last, partial tile (keys past N get -inf).

    The running max is of the unscaled q . k: differences from it are exact near the top of a row,
    and only then scaled, so no logit is rounded at its full size (~1e-3 in log2 units at 1e4).
    """
    keys_ok = offs_n < N
    dims_ok = offs_d < HEAD_DIM
    kt, kt_lo = _load_operand(kt_ptrs, LO_OFFSET, dims_ok, keys_ok, HEAD_DIM != BLOCK_D, MASKED, DOT_DTYPE, SPLIT)
    v, v_lo = _load_operand(v_ptrs, LO_OFFSET, keys_ok, dims_ok, MASKED, HEAD_DIM != BLOCK_D, DOT_DTYPE, SPLIT)
    dots = _mma(q, q_lo, kt, kt_lo, None, PRECISION, SPLIT)
    if MASKED:
        dots = tl.where(keys_ok[None, :], dots, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(dots, 1))
    p = tl.exp2((dots - m_new[:, None]) * qk_scale)
    alpha = tl.exp2((m_i - m_new) * qk_scale)
    l_i = l_i * alpha + tl.sum(p, 1)
    p_hi, p_lo = _split(p.to(DOT_DTYPE), SPLIT)
    acc = _mma(p_hi, p_lo, v, v_lo, acc * alpha[:, None], PRECISION, SPLIT)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, POS, GATES, OUT, OUT_C, ROW_STATS,
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

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of q . k (unscaled)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of 2^((q . k - m_i) qk_scale)
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

    # The max and 1 / sum apart (a float32 lse = m + log(l) would round m by ~1e-3 at logits of 1e4);
    # the reciprocal once here, not in each step of the dk/dv loop.
    stats_ptrs = ROW_STATS + 2 * (pid_bh.to(tl.int64) * N + offs_m)
    tl.store(stats_ptrs, m_i, mask=rows_ok)
    tl.store(stats_ptrs + 1, 1.0 / l_i, mask=rows_ok)
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
    dk, dv, k, v, k_ptrs, v_ptrs, keys_ok, qt_ptrs, dout_ptrs, LO_OFFSET, STATS_ROWS, DELTA_ROWS, offs_m, offs_d, N,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """One query tile for a block of keys; MASKED for the last, partial tile (row max +inf there: p = 0).

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
        row_max = tl.load(STATS_ROWS + 2 * offs_m, mask=rows_ok, other=float("inf"))
        inv_sum = tl.load(STATS_ROWS + 2 * offs_m + 1, mask=rows_ok, other=1.0)
        delta = tl.load(DELTA_ROWS + offs_m, mask=rows_ok, other=0.0)
    else:
        row_max = tl.load(STATS_ROWS + 2 * offs_m)
        inv_sum = tl.load(STATS_ROWS + 2 * offs_m + 1)
        delta = tl.load(DELTA_ROWS + offs_m)
    dots = _mma(k, k_lo, qt, qt_lo, None, PRECISION, SPLIT)
    pt = tl.exp2((dots - row_max[None, :]) * qk_scale) * inv_sum[None, :]  # P^T, keys x queries
    pt_hi, pt_lo = _split(pt.to(DOT_DTYPE), SPLIT)
    dv = _mma(pt_hi, pt_lo, dout, dout_lo, dv, PRECISION, SPLIT)
    dpt = _mma(v, v_lo, tl.trans(dout), tl.trans(dout_lo), None, PRECISION, SPLIT)  # (dO v^T)^T
    dst_hi, dst_lo = _split((pt * (dpt - delta[None, :])).to(DOT_DTYPE), SPLIT)
    dk = _mma(dst_hi, dst_lo, tl.trans(qt), tl.trans(qt_lo), dk, PRECISION, SPLIT)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DOUT, ROW_STATS, DELTA, PT_DOUT, GATES, DK, DV,
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
    stats_rows = ROW_STATS + 2 * pid_bh.to(tl.int64) * N
    delta_rows = DELTA + pid_bh.to(tl.int64) * N

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    m_full = (N // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _dkdv_query_step(dk, dv, k, v, k_ptrs, v_ptrs, keys_ok, qt_ptrs + start_m * stride_qn,
                                  dout_ptrs + start_m * stride_gn, LO_OFFSET, stats_rows, delta_rows,
                                  start_m + offs_m, offs_d, N, qk_scale,
                                  HEAD_DIM, BLOCK_D, DOT_DTYPE, PRECISION, SPLIT, False)  # fmt: skip
    if not EVEN_M:
        dk, dv = _dkdv_query_step(dk, dv, k, v, k_ptrs, v_ptrs, keys_ok, qt_ptrs + m_full * stride_qn,
                                  dout_ptrs + m_full * stride_gn, LO_OFFSET, stats_rows, delta_rows,
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
    dq, q, dout, q_ptrs, dout_ptrs, rows_ok, row_max, delta, kt_ptrs, vt_ptrs, LO_OFFSET, offs_n, offs_d, N, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """One key tile for a block of queries, p not yet divided by the row sum; MASKED for the last, partial tile.

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
    dots = _mma(q, q_lo, kt, kt_lo, None, PRECISION, SPLIT)
    p = tl.exp2((dots - row_max[:, None]) * qk_scale)  # the epilogue divides dq's rows by their sums
    if MASKED:  # zero keys would give p = 2^(-row max qk_scale), which overflows for very negative rows
        p = tl.where(keys_ok[None, :], p, 0.0)
    dp = _mma(dout, dout_lo, vt, vt_lo, None, PRECISION, SPLIT)
    ds_hi, ds_lo = _split((p * (dp - delta[:, None])).to(DOT_DTYPE), SPLIT)
    return _mma(ds_hi, ds_lo, tl.trans(kt), tl.trans(kt_lo), dq, PRECISION, SPLIT)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DOUT, ROW_STATS, DELTA, GATES, DQ,
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
    # Rows past N have q = dO = 0 and are never stored: any finite max and sum serve them.
    stats_ptrs = ROW_STATS + 2 * (pid_bh.to(tl.int64) * N + offs_m)
    row_max = tl.load(stats_ptrs, mask=rows_ok, other=0.0)
    inv_sum = tl.load(stats_ptrs + 1, mask=rows_ok, other=1.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + offs_m, mask=rows_ok, other=0.0)
    # K^T and V^T tiles (BLOCK_D x BLOCK_N), advanced BLOCK_N keys a step.
    kt_ptrs = K + b * stride_kb + h * stride_kh + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn
    vt_ptrs = V + b * stride_vb + h * stride_vh + offs_d[:, None] * stride_vd + offs_n[None, :] * stride_vn

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_key_step(dq, q, dout, q_ptrs, dout_ptrs, rows_ok, row_max, delta,
                          kt_ptrs + start_n * stride_kn, vt_ptrs + start_n * stride_vn, LO_OFFSET, start_n + offs_n,
                          offs_d, N, qk_scale,
                          HEAD_DIM, BLOCK_D, DOT_DTYPE, PRECISION, SPLIT, False)  # fmt: skip
    if not EVEN_N:
        dq = _dq_key_step(dq, q, dout, q_ptrs, dout_ptrs, rows_ok, row_max, delta,
                          kt_ptrs + n_full * stride_kn, vt_ptrs + n_full * stride_vn, LO_OFFSET, n_full + offs_n,
                          offs_d, N, qk_scale,
                          HEAD_DIM, BLOCK_D, DOT_DTYPE, PRECISION, SPLIT, True)  # fmt: skip

    one_minus_g = tl.load(GATES + 2 * h + 1)
    d_ptrs = DQ + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dn + offs_d[None, :] * stride_dd
    _store(d_ptrs, dq * (inv_sum[:, None] * (scale * one_minus_g)), rows_ok, dims_ok, HEAD_DIM != BLOCK_D)


@triton.jit
def runtime_loop_probe(OUT, N):
    """OUT = N, counted by a loop whose bound is a runtime argument, as every kernel above loops over N."""
    count = 0
    for _ in range(0, N):
        count += 1
    tl.store(OUT, count)


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
