"""The separable positional branch: P = Py (x) Px, applied and differentiated without an N x N tensor.

The positional logit is a term in dx plus a term in dy, so each row's softmax over the keys is
the product of a softmax over key columns (``px``, H x W x W) and one over key rows (``py``,
H x H_p x H_p). ``P v`` is then two small contractions on head-major H x H_p x W x B x d tensors
(:func:`head_major`), each one batched GEMM; ``P^T x`` the same with the tables transposed; the
tables' gradients go through each table's softmax to ``pos_weight`` (the bias cancels). All in
the accumulation dtype (:func:`compute_dtype`). docs/design.md ("The positional branch is
separable") derives it; every backend that computes the positional branch apart uses this unit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "AxisTables",
    "compute_dtype",
    "axis_offsets",
    "positional_axis_probs",
    "dense_positional_probs",
    "head_major",
    "bhnd",
    "along_columns",
    "along_rows",
    "apply_positional",
    "positional_backward",
    "pos_weight_grad",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of every backend: float64 stays float64, all else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class AxisTables(NamedTuple):
    """Per-head positional softmax along each grid axis, in the accumulation dtype."""

    px: torch.Tensor  # H x W x W: over key columns, for each query column
    py: torch.Tensor  # H x H_p x H_p: over key rows, for each query row


def axis_offsets(size: int, device, dtype) -> torch.Tensor:
    """offsets[i, j] = j - i on one axis of the patch grid."""
    idx = torch.arange(size, device=device, dtype=dtype)
    return idx.view(1, -1) - idx.view(-1, 1)


def _axis_logits(w_linear: torch.Tensor, w_square: torch.Tensor, size: int) -> torch.Tensor:
    offsets = axis_offsets(size, w_linear.device, w_linear.dtype)
    return w_linear[:, None, None] * offsets + w_square[:, None, None] * offsets * offsets


def positional_axis_probs(pos_weight: torch.Tensor, grid_h: int, grid_w: int, dtype=None) -> AxisTables:
    """The positional softmax of every head as its two per-axis tables (bias left out: it cancels).

    Computed in pos_weight's accumulation dtype and returned in ``dtype`` (default that one).

    Each table is a real softmax (max-subtracted, normalised over the same
    rounded logits), so P keeps the accuracy of ``softmax`` even for peaked,
    large-weight heads; ``exp(logit - lse)`` with a separately computed lse does not.
    """
    w = pos_weight.to(compute_dtype(pos_weight.dtype))
    px = _axis_logits(w[:, 0], w[:, 2], grid_w).softmax(-1)
    py = _axis_logits(w[:, 1], w[:, 2], grid_h).softmax(-1)
    return AxisTables(px.to(dtype or w.dtype), py.to(dtype or w.dtype))


def dense_positional_probs(tables: AxisTables) -> torch.Tensor:
    """The H x N x N matrix P the tables factor (for backends that mix P densely, and tests)."""
    px, py = tables
    H, grid_w, grid_h = px.shape[0], px.shape[1], py.shape[1]
    P = py[:, :, None, :, None] * px[:, None, :, None, :]  # [h, yi, xi, yj, xj]
    return P.reshape(H, grid_h * grid_w, grid_h * grid_w)


def head_major(x: torch.Tensor, grid_h: int, dtype: torch.dtype) -> torch.Tensor:
    """B x H x N x d (any strides) -> a contiguous H x H_p x W x B x d copy in ``dtype``.

    The layout the contractions run in: for each head, a grid axis and the
    rest (the other axis, the batch, d) form one wide GEMM operand, so every
    product below is a view of it, no further copy.
    """
    grid = x.unflatten(2, (grid_h, x.shape[2] // grid_h)).permute(1, 2, 3, 0, 4)
    # One copy that casts and lays out; not copy_ into an empty, which torch.jit.trace (so the TorchScript
    # ONNX exporter) loses. copy=True: without it, to() returns a same-dtype permuted view as it is.
    return grid.to(dtype, memory_format=torch.contiguous_format, copy=True)


def bhnd(x_hm: torch.Tensor) -> torch.Tensor:
    """The B x H x N x d view of a head-major H x H_p x W x B x d tensor (no copy)."""
    H, grid_h, grid_w, B, d = x_hm.shape
    return x_hm.permute(3, 0, 1, 2, 4).reshape(B, H, grid_h * grid_w, d)


def along_columns(px: torch.Tensor, x_hm: torch.Tensor) -> torch.Tensor:
    """px[h] (W x W) applied along the grid's columns of a head-major tensor."""
    H, grid_h, grid_w, B, d = x_hm.shape  # sizes, not -1, in the views: -1 is ambiguous when H = 0
    return torch.matmul(px[:, None], x_hm.view(H, grid_h, grid_w, B * d)).view(x_hm.shape)


def along_rows(py: torch.Tensor, x_hm: torch.Tensor) -> torch.Tensor:
    """py[h] (H_p x H_p) applied along the grid's rows of a head-major tensor."""
    H, grid_h, grid_w, B, d = x_hm.shape
    return torch.bmm(py, x_hm.view(H, grid_h, grid_w * B * d)).view(x_hm.shape)


def apply_positional(tables: AxisTables, x_hm: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """``P x`` (or ``P^T x``) for a head-major x: along the columns with px, then along the rows with py."""
    px, py = tables
    if transposed:
        px, py = px.transpose(-2, -1), py.transpose(-2, -1)
    return along_rows(py, along_columns(px, x_hm))


def positional_backward(tables: AxisTables, dout_hm: torch.Tensor, v_hm: torch.Tensor):
    """(P^T dout, dpx, dpy): the backward of ``sum(dout . P v)`` with respect to v and the two tables.

    dout and v are head-major in the tables' dtype; P^T dout is head-major, dpx
    (H x W x W) and dpy (H x H_p x H_p) are summed over the batch. Three
    contractions serve all three, since the two axes' products commute:
    ``dpx[a, c] = sum (py^T dout)[Y, a] . v[Y, c]`` over (Y, batch, d), and
    ``dpy[y, Y] = sum (px^T dout)[y, X] . v[Y, X]`` over (X, batch, d).
    """
    px_t, py_t = tables.px.transpose(-2, -1), tables.py.transpose(-2, -1)
    H, grid_h, grid_w, B, d = v_hm.shape
    rows_t = along_rows(py_t, dout_hm)
    cols_t = along_columns(px_t, dout_hm)
    by_column, by_row = (H * grid_h, grid_w, B * d), (H, grid_h, grid_w * B * d)
    dpx = torch.bmm(rows_t.view(by_column), v_hm.view(by_column).transpose(1, 2))
    dpy = torch.bmm(cols_t.view(by_row), v_hm.view(by_row).transpose(1, 2))
    return along_columns(px_t, rows_t), dpx.view(H, grid_h, grid_w, grid_w).sum(1), dpy


def pos_weight_grad(tables: AxisTables, dpx: torch.Tensor, dpy: torch.Tensor) -> torch.Tensor:
    """H x 3 gradient of pos_weight from the tables' gradients, through each table's softmax."""
    px, py = tables
    # softmax backward per row: dlogit = p o (dp - sum_j p dp)
    dlx = px * (dpx - (px * dpx).sum(-1, keepdim=True))
    dly = py * (dpy - (py * dpy).sum(-1, keepdim=True))
    ox = axis_offsets(px.shape[-1], px.device, px.dtype)
    oy = axis_offsets(py.shape[-1], py.device, py.dtype)
    dw_dx = (dlx * ox).sum((1, 2))
    dw_dy = (dly * oy).sum((1, 2))
    dw_sq = (dlx * ox * ox).sum((1, 2)) + (dly * oy * oy).sum((1, 2))
    return torch.stack((dw_dx, dw_dy, dw_sq), dim=-1)
