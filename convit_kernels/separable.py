"""The separable positional branch: P = Py (x) Px, applied and differentiated without an N x N tensor.

The positional logit ``w0 dx + w1 dy + w2 (dx^2 + dy^2) (+ b)`` is a term in dx plus
a term in dy, so its softmax over the keys of a row is the product of a softmax
over key columns (``px``, H x W x W) and one over key rows (``py``, H x H_p x H_p):

    P[h, (y_i, x_i), (y_j, x_j)] = py[h, y_i, y_j] * px[h, x_i, x_j]

With v seen as B x H x H_p x W x d, ``P v`` is two small contractions (along x
with px, then along y with py): 2 B H N d (W + H_p) multiply-adds instead of
2 B H N^2 d, and no per-score work. docs/design.md ("The positional branch is
separable") derives the backward used here:

* ``P^T x`` is the same two contractions with the transposed tables;
* the gradient of ``sum(dO . P v)`` reaches the tables as
  ``dpx[x_i, x_j] = sum dO[y_i, x_i] . (py v)[y_i, x_j]`` and
  ``dpy[y_i, y_j] = sum dO[y_i, x_i] . (px v)[y_j, x_i]`` (sums over the batch,
  the other axis and d), and then goes through each table's softmax to ``pos_weight``;
* the bias cancels in the softmax: its gradient is exactly zero.

Everything runs in the accumulation dtype (``compute_dtype``: float32 for half
inputs), whatever the input dtype. This module is the unit every backend that
computes the positional branch apart uses: the ``sdpa`` backend here, and the
kernels that mix it in their epilogue.
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
    "apply_positional",
    "positional_table_grads",
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


def _grid_view(x: torch.Tensor, grid_h: int) -> torch.Tensor:
    """B x H x N x d -> B x H x H_p x W x d (a view for the projections' strided layouts)."""
    B, H, N, d = x.shape
    return x.unflatten(2, (grid_h, N // grid_h))


def apply_positional(tables: AxisTables, x: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """``P x`` (or ``P^T x``) for x of shape B x H x N x d, in the accumulation dtype.

    Two batched products: along the grid's columns with px, then along its rows
    with py. The result is B x H x N x d, contiguous in that order.
    """
    px, py = tables
    if transposed:
        px, py = px.transpose(-2, -1), py.transpose(-2, -1)
    B, H, N, d = x.shape
    grid_h, grid_w = py.shape[-1], px.shape[-1]
    along_x = torch.matmul(px[:, None], _grid_view(x.to(px.dtype), grid_h))  # B x H x H_p x W x d
    along_y = torch.matmul(py, along_x.view(B, H, grid_h, grid_w * d))  # B x H x H_p x (W d)
    return along_y.view(B, H, N, d)


def positional_table_grads(tables: AxisTables, dout: torch.Tensor, v: torch.Tensor):
    """(dpx, dpy): the gradient of ``sum(dout . P v)`` with respect to the two tables.

    dout and v are B x H x N x d (any strides and float dtypes); the results are
    H x W x W and H x H_p x H_p in the accumulation dtype, summed over the batch.
    """
    px, py = tables
    B, H, N, d = v.shape
    grid_h, grid_w = py.shape[-1], px.shape[-1]
    acc = px.dtype
    v5 = _grid_view(v.to(acc), grid_h)
    dout5 = _grid_view(dout.to(acc), grid_h)
    v_along_y = torch.matmul(py, v5.reshape(B, H, grid_h, grid_w * d)).view(B, H, grid_h, grid_w, d)
    v_along_x = torch.matmul(px[:, None], v5)
    # dpx[h, a, c] = sum over (b, y, d) of dout[b, h, y, a, :] . (py v)[b, h, y, c, :]
    dpx = torch.einsum("bhyad,bhycd->hac", dout5, v_along_y)
    # dpy[h, y, Y] = sum over (b, x, d) of dout[b, h, y, x, :] . (px v)[b, h, Y, x, :]
    dpy = torch.einsum("bhym,bhYm->hyY", dout5.reshape(B, H, grid_h, -1), v_along_x.reshape(B, H, grid_h, -1))
    return dpx, dpy


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
