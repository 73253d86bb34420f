"""The "triton" backend: fused GPSA forward and backward kernels in Triton.

Layout of the work
------------------
* ``_gpsa_fwd_kernel``: one program per (batch, head, block of BLOCK_M queries).
  It computes the content logits ``scale q k^T`` (``tl.dot``), the content
  softmax, gathers the positional probabilities P[i, j] = px[h, x_i, x_j] *
  py[h, y_i, y_j] from the two per-axis softmax tables of
  ``separable.positional_axis_probs`` (H x (W^2 + H_p^2) floats per call, shared
  by the whole batch and L1/L2-resident), mixes M = (1 - g) A + g P and does a
  single product M v per key tile. It stores O (B x N x H x d, input dtype) and
  ``lse`` (B x H x N, fp32): O(B H N) state, no N x N tensor.
  Mixing before the product needs A normalised. Where the key row fits one
  tile (N <= BLOCK_N: ConViT's N = 196 with BLOCK_N = 256, the constexpr
  ONE_KEY_BLOCK) the softmax is exact in registers and Q K^T is done once.
  Longer rows take two passes over the keys: row max and sum first (Q K^T
  only), then the mix and M v.
  The positional probabilities come from the per-call tables rather than from
  ``exp(w . r - lse_pos)`` generated in-kernel: the tables are real softmaxes,
  so P keeps softmax accuracy for peaked heads (locality strength 10), where a
  separately computed log-sum-exp loses ~30x in d pos_weight; and a gather
  costs one multiply per element instead of an exp.
* ``_gpsa_bwd_dq_kernel``: one program per (batch, head, block of queries)
  walks the keys, recomputes A from lse and gathers P, computes T = dO v^T once
  per tile for both branches and takes the row deltas of the design page as
  delta_c = sum_j A_ij T_ij and delta_p = sum_j P_ij T_ij (reference.py says
  why). With the key row in one tile it forms dS = (1 - g) A o (T - delta_c)
  and dq = scale dS k in registers; over several tiles a first pass takes the
  deltas and a second forms dS and dq. It stores dq, both deltas (B x H x N)
  and its partial sum of g (1 - g) (delta_p - delta_c) for d gating_param.
* ``_gpsa_bwd_dkdv_kernel``: one program per (batch, head, block of keys) walks
  the queries after the dq kernel: recomputes A and P, T = dO v^T once per tile
  for both branches (dS for dk, ds for d pos_weight), dv = M^T dO,
  dk = scale dS^T q, and its partial sums of ds * (dx, dy, dx^2 + dy^2).
  Keeping dq apart from dk/dv is flash-attention 2's choice: no atomics on dq.
* The per-head reductions (d pos_weight, d gating_param) are per-program partial
  sums reduced by a second, fixed-order ``torch.sum``: deterministic. With
  ``atomic_reductions=True`` (argument of :func:`gpsa_backward`) the programs
  add into one H-sized buffer with ``tl.atomic_add`` instead (last-bit
  run-to-run differences). d pos_bias is exactly zero (the op returns zeros).

Registration: the launchers are the "triton" backend of the project's op
(``convit_kernels::gpsa_fwd`` / ``gpsa_bwd``, torch.library custom ops with
fake functions and autograd), so ``torch.compile(fullgraph=True)`` traces the
layer with the kernels as one opaque node and no graph break, on a GPU as under
the interpreter. They are plain launchers rather than ``triton_op`` +
``wrap_triton``: torch 2.14's wrapper rebuilds autotuned kernels without their
``reset_to_zero`` (torch/_higher_order_ops/triton_kernel_wrap.py), and the
per-program partial sums of dq and dk/dv rely on it: a benchmarked finer tile
would leave partials that the chosen one does not overwrite. Under
TRITON_INTERPRET=1 wrap_triton cannot be traced either.

Every tensor is addressed through explicit strides: q, k, v are taken as the
strided views the qk and v projections give (no copies), out/dq/dk/dv are
written in B x N x H x d order. Head dims up to 128 are padded to a power of
two (BLOCK_D) with masks, N to the block sizes with masks. Inputs fp32, fp16,
bf16; accumulation, softmax, mixing and the reductions in fp32; dot operands in
the input dtype, fp32 ones as 3xTF32 (``input_precision="tf32x3"``: tensor
cores at fp32-level accuracy; IEEE fp32 dots fall back to FMAs and spill on
sm_80). Under the interpreter (TRITON_INTERPRET=1),
whose bf16 ``tl.dot`` is wrong, the constexpr DOT_DTYPE upcasts bf16 operands
to fp32; compiled GPU code keeps bf16 operands for the tensor cores.

Cost and resources
------------------
docs/design.md ("Cost model") counts the FLOPs and bytes of each kernel. The
fixed configurations (``FIXED_CONFIGS``) are the tiles that compile without
spills for sm_80 and sm_90 in every dtype and key path they serve;
``convit-kernels aot --arch 80 90`` prints registers, spills, shared memory and
the tensor-core instructions of each, and tests/test_aot.py asserts no spill and
tensor-core SASS. On a GPU ``triton.autotune`` picks among a few tile shapes and
the fixed configurations, keyed on (N, HEAD_DIM) and the dtypes; the pruning
(``_autotune``) keeps 256-wide key tiles only where a one-tile fixed
configuration exists, and smaller tiles for fp32 and d > 64. Set
CONVIT_KERNELS_TRITON_AUTOTUNE=0 (before import) for the fixed ones.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..separable import positional_axis_probs
from . import HALF_AND_FLOAT, Backend, register_backend

__all__ = ["gpsa_forward", "gpsa_backward", "INTERPRET", "KERNELS"]

# Read once, as triton.jit reads it when decorating the kernels below.
INTERPRET = bool(triton.knobs.runtime.interpret)
AUTOTUNE = not INTERPRET and os.environ.get("CONVIT_KERNELS_TRITON_AUTOTUNE", "1") != "0"
MAX_HEAD_DIM = 128
LOG2E = 1.4426950408889634  # host side: logits are scaled by scale * log2(e) to use exp2
LOG2E_IN_KERNEL = tl.constexpr(LOG2E)  # the same constant, as kernels may read it
# Smallest key/query block any configuration uses: sizes the partial-sum buffers.
MIN_BLOCK = 16


# ---------------------------------------------------------------- configurations


def _config(block_m, block_n, num_warps, num_stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# The fixed configurations, by key path and input element size (2: fp16/bf16, 4: fp32): tiles that
# compile without spills for sm_80 and sm_90 (`convit-kernels aot`). "tile" configurations hold a
# whole key row (N <= BLOCK_N, N = 196 for ConViT) and serve head dims up to 64; "loop" ones the
# rest. fp32 tiles are smaller (the 3xTF32 dots hold a high and a low part of each operand), and
# fp32 dq has no one-tile configuration: 16 x 256 spills.
FIXED_CONFIGS = {
    "fwd": {
        "tile": {2: _config(32, 256, 8, 2), 4: _config(16, 256, 8, 1)},
        "loop": {2: _config(32, 64, 4, 2), 4: _config(32, 32, 8, 1)},
    },
    "bwd_dq": {"tile": {2: _config(32, 256, 8, 2)}, "loop": {2: _config(32, 64, 8, 2), 4: _config(32, 32, 8, 1)}},
    "bwd_dkdv": {"loop": {2: _config(32, 32, 4, 2), 4: _config(16, 32, 4, 1)}},
}
# The interpreter's cost is per program and loop step, nearly independent of the tile: few, large
# tiles for every dtype. Key rows up to 256 (N = 196) take the forward's and dq's one-key-block
# path, longer ones (tested at N = 257, 289 and 576) the two-pass one; dk/dv walks N = 196 in 4 blocks.
INTERPRETER_CONFIGS = {
    "fwd": _config(64, 256, 4, 1),
    "bwd_dq": _config(64, 256, 4, 1),
    "bwd_dkdv": _config(64, 64, 4, 1),
}


def fixed_config(kernel_name: str, element_size: int, N: int, block_d: int) -> triton.Config:
    """The fixed configuration of a kernel for inputs of this element size, N and BLOCK_D."""
    paths = FIXED_CONFIGS[kernel_name]
    tile = paths.get("tile", {}).get(element_size)
    if tile is not None and N <= tile.kwargs["BLOCK_N"] and block_d <= 64:
        return tile
    return paths["loop"][element_size]


def _config_space(*tiles):
    """Autotuning candidates: each (BLOCK_M, BLOCK_N) with 4 or 8 warps and 1 or 2 stages."""
    return [_config(bm, bn, w, s) for bm, bn in tiles for w in (4, 8) for s in (1, 2)]


def _config_key(config):
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _autotune(kernel_name, space, reset_to_zero=None):
    """triton.autotune over ``space`` keyed on (N, HEAD_DIM) (and the dtypes), or the fixed configuration.

    Without autotuning the candidates are the fixed configurations and the pruning keeps the one for
    the input: a single candidate, so nothing is benchmarked.
    """
    fixed_configs = [c for path in FIXED_CONFIGS[kernel_name].values() for c in path.values()]
    if INTERPRET:
        configs = [INTERPRETER_CONFIGS[kernel_name]]
    elif AUTOTUNE:  # the space, plus the fixed configurations it lacks
        seen = {_config_key(c) for c in space}
        configs = space + [c for c in fixed_configs if _config_key(c) not in seen]
    else:
        configs = fixed_configs

    def prune(configs, named_args, **kwargs):
        elem, N = named_args["Q"].element_size(), named_args["N"]
        fixed = fixed_config(kernel_name, elem, N, kwargs["BLOCK_D"])
        if not AUTOTUNE:
            return [fixed]
        n_cap = max(MIN_BLOCK, triton.next_power_of_2(N))
        max_tile = 64 * 64 if elem == 4 or kwargs["BLOCK_D"] > 64 else 128 * 64
        # 256-wide key tiles only where a fixed one-tile configuration compiles without spills.
        max_block_n = 256 if elem in FIXED_CONFIGS[kernel_name].get("tile", {}) else 128
        kept = [
            c
            for c in configs
            if c.kwargs["BLOCK_M"] <= n_cap
            and c.kwargs["BLOCK_N"] <= min(n_cap, max_block_n)
            and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= max_tile
        ]
        return kept or [fixed]

    return triton.autotune(
        configs=configs,
        key=["N", "HEAD_DIM"],
        prune_configs_by={"early_config_prune": prune},
        reset_to_zero=reset_to_zero,
    )


# The constexpr that picks the forward's and dq's key path: the whole key row fits one BLOCK_N tile.
_one_key_block = triton.heuristics({"ONE_KEY_BLOCK": lambda args: args["N"] <= args["BLOCK_N"]})


# ---------------------------------------------------------------- shared device code


@triton.jit
def _positional_probs_tile(PX, PY, h, offs_m, offs_n, N, grid_w, grid_h):
    """P[i, j] = px[h, x_i, x_j] * py[h, y_i, y_j] for a BLOCK_M x BLOCK_N tile, 0 outside N x N."""
    valid = (offs_m < N)[:, None] & (offs_n < N)[None, :]
    x_i, y_i = offs_m % grid_w, offs_m // grid_w
    x_j, y_j = offs_n % grid_w, offs_n // grid_w
    px = tl.load(PX + (h * grid_w + x_i[:, None]) * grid_w + x_j[None, :], mask=valid, other=0.0)
    py = tl.load(PY + (h * grid_h + y_i[:, None]) * grid_h + y_j[None, :], mask=valid, other=0.0)
    return px * py


@triton.jit
def _load_tile(BASE, stride_n, stride_d, offs_n, offs_d, N, HEAD_DIM: tl.constexpr):
    """A rows x BLOCK_D tile of one (batch, head) slice, zero outside N x HEAD_DIM."""
    mask = (offs_n < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
    return tl.load(BASE + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def _store_tile(BASE, value, stride_n, stride_d, offs_n, offs_d, N, HEAD_DIM: tl.constexpr):
    mask = (offs_n < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(BASE + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d, value.to(BASE.dtype.element_ty), mask=mask)


@triton.jit
def _content_logits(q, k, qk_scale, offs_n, N):
    """scale q k^T of a tile in log2 units (qk_scale = scale log2(e)), -inf at keys past N."""
    s = tl.dot(q, tl.trans(k), input_precision="tf32x3") * qk_scale
    return tl.where((offs_n < N)[None, :], s, float("-inf"))


@triton.jit
def _gates(GATE, h):
    """(g, 1 - g) with 1 - g = sigmoid(-lambda): exact where g rounds to 1."""
    lam = tl.load(GATE + h).to(tl.float32)
    return tl.sigmoid(lam), tl.sigmoid(-lam)


# ---------------------------------------------------------------- forward


@_autotune("fwd", _config_space((32, 64), (64, 64), (16, 256), (32, 256)))
@_one_key_block
@triton.jit
def _gpsa_fwd_kernel(
    Q, K, V, PX, PY, GATE, OUT, LSE,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N, grid_w, grid_h, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_KEY_BLOCK: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    b, h = (pid_bh // H).to(tl.int64), pid_bh % H
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, stride_qn, stride_qd, offs_m, offs_d, N, HEAD_DIM)
    q = q.to(DOT_DTYPE)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    g, one_minus_g = _gates(GATE, h)

    if ONE_KEY_BLOCK:
        # The whole key row in one tile: exact softmax, then the mix and one product with v.
        offs_n = tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, stride_kn, stride_kd, offs_n, offs_d, N, HEAD_DIM).to(DOT_DTYPE)
        s = _content_logits(q, k, qk_scale, offs_n, N)
        m_i = tl.max(s, 1)
        e = tl.exp2(s - m_i[:, None])
        l_i = tl.sum(e, 1)
        lse = m_i + tl.log2(l_i)  # log2 units
        pos = _positional_probs_tile(PX, PY, h, offs_m, offs_n, N, grid_w, grid_h)
        mix = (one_minus_g / l_i)[:, None] * e + g * pos
        v = _load_tile(v_base, stride_vn, stride_vd, offs_n, offs_d, N, HEAD_DIM).to(DOT_DTYPE)
        acc = tl.dot(mix.to(DOT_DTYPE), v, input_precision="tf32x3")
    else:
        # Mixing before the product needs A normalised, so a first pass over the keys takes the
        # row statistics (Q K^T only) and a second one mixes and multiplies by v.
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 units
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of 2^(logit - m_i)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _load_tile(k_base, stride_kn, stride_kd, offs_n, offs_d, N, HEAD_DIM).to(DOT_DTYPE)
            s = _content_logits(q, k, qk_scale, offs_n, N)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m_i = m_new
        lse = m_i + tl.log2(l_i)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _load_tile(k_base, stride_kn, stride_kd, offs_n, offs_d, N, HEAD_DIM).to(DOT_DTYPE)
            s = _content_logits(q, k, qk_scale, offs_n, N)
            pos = _positional_probs_tile(PX, PY, h, offs_m, offs_n, N, grid_w, grid_h)
            mix = one_minus_g * tl.exp2(s - lse[:, None]) + g * pos
            v = _load_tile(v_base, stride_vn, stride_vd, offs_n, offs_d, N, HEAD_DIM).to(DOT_DTYPE)
            acc += tl.dot(mix.to(DOT_DTYPE), v, input_precision="tf32x3")

    _store_tile(OUT + b * stride_ob + h * stride_oh, acc, stride_on, stride_od, offs_m, offs_d, N, HEAD_DIM)
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, lse / LOG2E_IN_KERNEL, mask=offs_m < N)  # natural log


# ---------------------------------------------------------------- backward


@triton.jit
def _key_tile_terms(
    q,
    dout,
    lse,
    k_base,
    v_base,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    offs_n,
    offs_d,
    N,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """For the query block (q, dO, lse) and one key tile: k, A = 2^(logit - lse) (0 past N) and T = dO v^T."""
    k = _load_tile(k_base, stride_kn, stride_kd, offs_n, offs_d, N, HEAD_DIM).to(DOT_DTYPE)
    v = _load_tile(v_base, stride_vn, stride_vd, offs_n, offs_d, N, HEAD_DIM).to(DOT_DTYPE)
    a = tl.exp2(_content_logits(q, k, qk_scale, offs_n, N) - lse[:, None])
    return k, a, tl.dot(dout, tl.trans(v), input_precision="tf32x3")


@_autotune("bwd_dq", _config_space((32, 64), (64, 64), (16, 256), (32, 256)), reset_to_zero=["GATE_PARTIAL"])
@_one_key_block
@triton.jit
def _gpsa_bwd_dq_kernel(
    Q, K, V, DOUT, PX, PY, GATE, LSE, DELTA_C, DELTA_P, DQ, GATE_PARTIAL,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_db, stride_dh, stride_dn, stride_dd,
    H, N, grid_w, grid_h, scale, qk_scale, partials_per_head,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, USE_ATOMICS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_KEY_BLOCK: tl.constexpr,
):  # fmt: skip
    """dq and the row deltas of a block of queries; runs before the dk/dv kernel, which reads the deltas.

    delta_c = sum_j A_ij T_ij and delta_p = sum_j P_ij T_ij need the whole key row before
    dS = (1 - g) A o (T - delta_c) can be formed: in registers where the row is one tile, else in a
    first pass over the key blocks (Q K^T and dO v^T only) before the pass that forms dS and dq.
    """
    pid_bh, pid_m = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, stride_qn, stride_qd, offs_m, offs_d, N, HEAD_DIM).to(DOT_DTYPE)
    dout_base = DOUT + b * stride_gb + h * stride_gh
    dout = _load_tile(dout_base, stride_gn, stride_gd, offs_m, offs_d, N, HEAD_DIM).to(DOT_DTYPE)
    rows = pid_bh.to(tl.int64) * N + offs_m
    lse = tl.load(LSE + rows, mask=offs_m < N, other=0.0) * LOG2E_IN_KERNEL
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    g, one_minus_g = _gates(GATE, h)

    if ONE_KEY_BLOCK:
        offs_n = tl.arange(0, BLOCK_N)
        k, a, t = _key_tile_terms(q, dout, lse, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                  offs_n, offs_d, N, qk_scale, HEAD_DIM, DOT_DTYPE)  # fmt: skip
        pos = _positional_probs_tile(PX, PY, h, offs_m, offs_n, N, grid_w, grid_h)
        delta_c = tl.sum(a * t, 1)
        delta_p = tl.sum(pos * t, 1)
        ds_c = one_minus_g * a * (t - delta_c[:, None])
        dq = tl.dot(ds_c.to(DOT_DTYPE), k, input_precision="tf32x3")
    else:
        delta_c = tl.zeros([BLOCK_M], tl.float32)
        delta_p = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            _, a, t = _key_tile_terms(q, dout, lse, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                      offs_n, offs_d, N, qk_scale, HEAD_DIM, DOT_DTYPE)  # fmt: skip
            pos = _positional_probs_tile(PX, PY, h, offs_m, offs_n, N, grid_w, grid_h)
            delta_c += tl.sum(a * t, 1)
            delta_p += tl.sum(pos * t, 1)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k, a, t = _key_tile_terms(q, dout, lse, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                      offs_n, offs_d, N, qk_scale, HEAD_DIM, DOT_DTYPE)  # fmt: skip
            ds_c = one_minus_g * a * (t - delta_c[:, None])
            dq += tl.dot(ds_c.to(DOT_DTYPE), k, input_precision="tf32x3")

    _store_tile(DQ + b * stride_db + h * stride_dh, dq * scale, stride_dn, stride_dd, offs_m, offs_d, N, HEAD_DIM)
    tl.store(DELTA_C + rows, delta_c, mask=offs_m < N)
    tl.store(DELTA_P + rows, delta_p, mask=offs_m < N)
    d_gate = g * one_minus_g * tl.sum(delta_p - delta_c, 0)  # rows past N have dO = 0: deltas 0
    if USE_ATOMICS:
        tl.atomic_add(GATE_PARTIAL + h, d_gate)
    else:
        tl.store(GATE_PARTIAL + pid_bh * partials_per_head + pid_m, d_gate)


@_autotune("bwd_dkdv", _config_space((16, 32), (32, 32), (32, 64), (64, 64)), reset_to_zero=["DW_PARTIAL"])
@triton.jit
def _gpsa_bwd_dkdv_kernel(
    Q, K, V, DOUT, PX, PY, GATE, LSE, DELTA_C, DELTA_P, DK, DV, DW_PARTIAL,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_db, stride_dh, stride_dn, stride_dd,
    H, N, grid_w, grid_h, scale, qk_scale, partials_per_head,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, USE_ATOMICS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_bh, pid_n = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + b * stride_kb + h * stride_kh, stride_kn, stride_kd, offs_n, offs_d, N, HEAD_DIM).to(DOT_DTYPE)
    v = _load_tile(V + b * stride_vb + h * stride_vh, stride_vn, stride_vd, offs_n, offs_d, N, HEAD_DIM).to(DOT_DTYPE)
    q_base = Q + b * stride_qb + h * stride_qh
    dout_base = DOUT + b * stride_gb + h * stride_gh
    rows_base = pid_bh.to(tl.int64) * N
    g, one_minus_g = _gates(GATE, h)
    x_j = (offs_n % grid_w).to(tl.float32)
    y_j = (offs_n // grid_w).to(tl.float32)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dw_x = tl.zeros([BLOCK_N], tl.float32)  # d pos_weight partials, kept per key until the end
    dw_y = tl.zeros([BLOCK_N], tl.float32)
    dw_r = tl.zeros([BLOCK_N], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        valid = (offs_m < N)[:, None] & (offs_n < N)[None, :]
        q = _load_tile(q_base, stride_qn, stride_qd, offs_m, offs_d, N, HEAD_DIM).to(DOT_DTYPE)
        dout = _load_tile(dout_base, stride_gn, stride_gd, offs_m, offs_d, N, HEAD_DIM).to(DOT_DTYPE)
        lse = tl.load(LSE + rows_base + offs_m, mask=offs_m < N, other=0.0) * LOG2E_IN_KERNEL
        delta_c = tl.load(DELTA_C + rows_base + offs_m, mask=offs_m < N, other=0.0)
        delta_p = tl.load(DELTA_P + rows_base + offs_m, mask=offs_m < N, other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision="tf32x3") * qk_scale
        a = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        pos = _positional_probs_tile(PX, PY, h, offs_m, offs_n, N, grid_w, grid_h)
        t = tl.dot(dout, tl.trans(v), input_precision="tf32x3")  # T = dO v^T, for both branches
        mix = one_minus_g * a + g * pos
        dv += tl.dot(tl.trans(mix.to(DOT_DTYPE)), dout, input_precision="tf32x3")
        ds_c = one_minus_g * a * (t - delta_c[:, None])
        dk += tl.dot(tl.trans(ds_c.to(DOT_DTYPE)), q, input_precision="tf32x3")
        ds_p = g * pos * (t - delta_p[:, None])
        x_i = (offs_m % grid_w).to(tl.float32)
        y_i = (offs_m // grid_w).to(tl.float32)
        dx = x_j[None, :] - x_i[:, None]
        dy = y_j[None, :] - y_i[:, None]
        dw_x += tl.sum(ds_p * dx, 0)
        dw_y += tl.sum(ds_p * dy, 0)
        dw_r += tl.sum(ds_p * (dx * dx + dy * dy), 0)

    dk_base = DK + b * stride_db + h * stride_dh
    dv_base = DV + b * stride_db + h * stride_dh
    _store_tile(dk_base, dk * scale, stride_dn, stride_dd, offs_n, offs_d, N, HEAD_DIM)
    _store_tile(dv_base, dv, stride_dn, stride_dd, offs_n, offs_d, N, HEAD_DIM)
    # (sum ds_p dx, sum ds_p dy, sum ds_p (dx^2 + dy^2)) as one 3-vector (padded to 4 lanes).
    lane = tl.arange(0, 4)
    sums = tl.where(lane == 0, tl.sum(dw_x, 0), tl.where(lane == 1, tl.sum(dw_y, 0), tl.sum(dw_r, 0)))
    if USE_ATOMICS:
        tl.atomic_add(DW_PARTIAL + h * 3 + lane, sums, mask=lane < 3)
    else:
        tl.store(DW_PARTIAL + (pid_bh * partials_per_head + pid_n) * 3 + lane, sums, mask=lane < 3)


KERNELS = {
    "fwd": _gpsa_fwd_kernel,
    "bwd_dq": _gpsa_bwd_dq_kernel,
    "bwd_dkdv": _gpsa_bwd_dkdv_kernel,
}


# ---------------------------------------------------------------- launchers


def dot_dtype(dtype: torch.dtype):
    """Element type of the tl.dot operands: the input's, except bf16 under the interpreter (fp32 there)."""
    if dtype == torch.bfloat16 and INTERPRET:
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


def _head_dims(d: int):
    if d > MAX_HEAD_DIM:
        raise ValueError(f"the triton backend takes head dims up to {MAX_HEAD_DIM}, got {d}")
    return d, max(16, triton.next_power_of_2(d))


def _axis_tables(pos_weight, N: int, grid_w: int):
    grid_h = N // grid_w
    px, py = positional_axis_probs(pos_weight, grid_h, grid_w, torch.float32)
    return px.contiguous(), py.contiguous(), grid_h


def gpsa_forward(q, k, v, pos_weight, gating_param, grid_w: int, scale: float):
    """The op's forward (see reference.py for the interface); q, k, v read through their strides."""
    B, H, N, d = q.shape
    head_dim, block_d = _head_dims(d)
    px, py, grid_h = _axis_tables(pos_weight, N, grid_w)
    gating_param = gating_param.contiguous()  # the kernels read it at GATE + h
    out = torch.empty((B, N, H, d), device=q.device, dtype=q.dtype)
    out_bhnd = out.transpose(1, 2)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    _gpsa_fwd_kernel[lambda meta: (B * H, triton.cdiv(N, meta["BLOCK_M"]))](
        q, k, v, px, py, gating_param, out_bhnd, lse,
        *q.stride(), *k.stride(), *v.stride(), *out_bhnd.stride(),
        H, N, grid_w, grid_h, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=block_d, DOT_DTYPE=dot_dtype(q.dtype),
    )  # fmt: skip
    return out, lse


def gpsa_backward(grad_out, q, k, v, pos_weight, gating_param, lse, grid_w: int, scale: float, atomic_reductions=False):
    """The op's backward; per-head reductions deterministic unless ``atomic_reductions``."""
    B, H, N, d = q.shape
    head_dim, block_d = _head_dims(d)
    px, py, grid_h = _axis_tables(pos_weight, N, grid_w)
    gating_param = gating_param.contiguous()  # the kernels read it at GATE + h
    dout = grad_out.transpose(1, 2)  # B x H x N x d view
    lse = lse.contiguous()  # a no-op for this backend's own forward
    delta_c = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    delta_p = torch.empty_like(delta_c)
    # One partial sum per (batch, head, program): room for the smallest block any configuration uses.
    partials_per_head = triton.cdiv(N, MIN_BLOCK)
    partials = dict(device=q.device, dtype=torch.float32)
    gate_partial = torch.zeros((1, H, 1) if atomic_reductions else (B, H, partials_per_head), **partials)
    dw_partial = torch.zeros((1, H, 1, 3) if atomic_reductions else (B, H, partials_per_head, 3), **partials)

    dq, dk, dv = (torch.empty((B, N, H, d), device=q.device, dtype=q.dtype) for _ in range(3))
    dq_bhnd, dk_bhnd, dv_bhnd = (t.transpose(1, 2) for t in (dq, dk, dv))
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk_bhnd.stride())
    meta_args = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, DOT_DTYPE=dot_dtype(q.dtype), USE_ATOMICS=atomic_reductions)
    _gpsa_bwd_dq_kernel[lambda meta: (B * H, triton.cdiv(N, meta["BLOCK_M"]))](
        q, k, v, dout, px, py, gating_param, lse, delta_c, delta_p, dq_bhnd, gate_partial,
        *strides,
        H, N, grid_w, grid_h, scale, scale * LOG2E, partials_per_head,
        **meta_args,
    )  # fmt: skip
    _gpsa_bwd_dkdv_kernel[lambda meta: (B * H, triton.cdiv(N, meta["BLOCK_N"]))](
        q, k, v, dout, px, py, gating_param, lse, delta_c, delta_p, dk_bhnd, dv_bhnd, dw_partial,
        *strides,
        H, N, grid_w, grid_h, scale, scale * LOG2E, partials_per_head,
        **meta_args,
    )  # fmt: skip
    # Second, fixed-order reduction of the per-program partials (a no-op sum for atomics).
    d_pos_weight = dw_partial.sum(dim=(0, 2))
    d_gating = gate_partial.sum(dim=(0, 2))
    return dq, dk, dv, d_pos_weight.to(pos_weight.dtype), d_gating.to(gating_param.dtype)


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
        "fused Triton kernels (sm_80+; CPU tensors under TRITON_INTERPRET=1)",
        devices=("cuda", "cpu") if INTERPRET else ("cuda",),
        dtypes=HALF_AND_FLOAT,
        forward=gpsa_forward,
        backward=gpsa_backward,
        max_head_dim=MAX_HEAD_DIM,
        min_cuda_capability=(8, 0),
        unavailable=_unavailable,
    )
)
