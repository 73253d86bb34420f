"""The separable positional branch: P = Py (x) Px, applied and differentiated without an N x N tensor.

The positional logit is a term in dx plus a term in dy, so each row's softmax over the keys is
the product of a softmax over key columns (``px``, H x W x W) and one over key rows (``py``,
H x H_p x H_p). ``P v`` is then two small contractions on head-major H x H_p x W x B x d tensors
(:func:`head_major`), each a batched GEMM; ``P^T x`` the same with the tables transposed; the
tables' gradients go through each table's softmax to ``pos_weight`` (the bias cancels). The
torch contractions make a table whole where both fit (:func:`whole_tables_fit`) and else in blocks
of rows (:class:`Axis`) that hold no more numbers than the tensor they multiply: a 1 x 4096 grid
never builds its 4096 x 4096 table.
All in the accumulation dtype (:func:`compute_dtype`). docs/design.md ("The positional branch
is separable") derives it; every backend that computes the positional branch apart uses this unit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .build_config import WHOLE_TABLES_PER_TOKEN

__all__ = [
    "AxisTables",
    "Axis",
    "RowBuffers",
    "PositionalAxes",
    "WHOLE_TABLES_PER_TOKEN",
    "whole_tables_fit",
    "compute_dtype",
    "axis_offsets",
    "positional_axes",
    "positional_axis_probs",
    "dense_positional_probs",
    "head_major",
    "bhnd",
    "apply_positional",
    "positional_backward",
    "pos_weight_grad",
]

# Fewest table rows a block of the torch contractions makes, so that tiny B x d does not mean one row a block.
MIN_BLOCK_ROWS = 16


def whole_tables_fit(grid_h: int, grid_w: int) -> bool:
    """Whether both per-axis tables together hold at most WHOLE_TABLES_PER_TOKEN numbers per token."""
    return grid_w * grid_w + grid_h * grid_h <= WHOLE_TABLES_PER_TOKEN * grid_h * grid_w


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of every backend: float64 stays float64, all else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class AxisTables(NamedTuple):
    """Per-head positional softmax along each grid axis, whole, in the accumulation dtype."""

    px: torch.Tensor  # H x W x W: over key columns, for each query column
    py: torch.Tensor  # H x H_p x H_p: over key rows, for each query row


def axis_offsets(size: int, device, dtype, start: int = 0, stop: int | None = None, out=None) -> torch.Tensor:
    """offsets[i - start, j] = j - i for query positions i in [start, stop) of one grid axis (into ``out``)."""
    keys = torch.arange(size, device=device, dtype=dtype)
    queries = torch.arange(start, size if stop is None else stop, device=device, dtype=dtype)
    return torch.sub(keys.view(1, -1), queries.view(-1, 1), out=out)


class RowBuffers(NamedTuple):
    """Preallocated room for row blocks of an axis's table, flat: a block of any height is a contiguous view.

    Allocating each block's temporaries anew let glibc's moving mmap threshold keep the freed blocks on its
    heap, so a strip's resident memory grew with its side; reused buffers keep it at one block's worth.
    """

    offsets: torch.Tensor  # room for rows x size
    linear: torch.Tensor  # room for H x rows x size: the logits, then scratch
    square: torch.Tensor  # room for H x rows x size: the rows of the table

    def carve(self, heads: int, rows: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Contiguous (offsets rows x size, linear and square H x rows x size) views for a block of ``rows``."""
        table = heads * rows * size
        return self.offsets[: rows * size].view(rows, size), *(b[:table].view(heads, rows, size) for b in self[1:])


class Axis(NamedTuple):
    """One grid axis of every head's positional softmax; its H x size x size table is made by rows on demand."""

    w_linear: torch.Tensor  # H: the logit's weight on the offset, in the accumulation dtype
    w_square: torch.Tensor  # H: its weight on the squared offset
    size: int
    scale: torch.Tensor | None = None  # H: a factor on the whole table (the gate rides on one axis), or None
    table: torch.Tensor | None = None  # the whole table, made once where it fits (see positional_axes)

    def rows(self, start: int, stop: int, buffers: RowBuffers | None = None) -> torch.Tensor:
        """Rows [start, stop) of the table, H x (stop - start) x size: each a real softmax (max-subtracted).

        Made in ``buffers`` (see :meth:`row_buffers`) where given: a loop over blocks then allocates nothing big.
        """
        if self.table is not None:
            return self.table[:, start:stop]
        count = stop - start
        into = (None,) * 3 if buffers is None else buffers.carve(len(self.w_linear), count, self.size)
        offsets = axis_offsets(self.size, self.w_linear.device, self.w_linear.dtype, start, stop, out=into[0])
        # w_linear o + w_square o o, evaluated in that order wherever the rows are made: the same rounding
        linear = torch.mul(self.w_linear[:, None, None], offsets, out=into[1])
        square = torch.mul(torch.mul(self.w_square[:, None, None], offsets, out=into[2]), offsets, out=into[2])
        logits = torch.add(linear, square, out=into[1])
        probs = logits.softmax(-1) if buffers is None else torch._softmax(logits, -1, False, out=into[2])
        return probs if self.scale is None else torch.mul(probs, self.scale.view(-1, 1, 1), out=into[2])

    def row_buffers(self, rows: int) -> RowBuffers:
        """Room for ``rows`` rows of the table and their offsets, for :meth:`rows`."""
        room = len(self.w_linear) * rows * self.size
        return RowBuffers(*(self.w_linear.new_empty(n) for n in (rows * self.size, room, room)))

    def blocks(self, inner: int):
        """(start, stop) of the row blocks for operands of ``inner`` columns: at most max(inner, 16) rows each."""
        step = min(self.size, max(inner, MIN_BLOCK_ROWS))
        return [(start, min(start + step, self.size)) for start in range(0, self.size, step)]


class PositionalAxes(NamedTuple):
    x: Axis  # along the grid's columns (size W)
    y: Axis  # along its rows (size H_p)


def positional_axes(pos_weight: torch.Tensor, grid_h: int, grid_w: int, gate: torch.Tensor | None = None):
    """The two :class:`Axis` of every head's positional softmax, in pos_weight's accumulation dtype.

    ``gate`` (H), if given, scales the row axis: the tables of g P = (g py) (x) px. Where the whole
    tables fit, each is made here once (a call's contractions read it several times); else by blocks.
    """
    w = pos_weight.to(compute_dtype(pos_weight.dtype))
    scale = None if gate is None else gate.to(w.dtype).reshape(-1)
    axes = PositionalAxes(Axis(w[:, 0], w[:, 2], grid_w), Axis(w[:, 1], w[:, 2], grid_h, scale))
    if not whole_tables_fit(grid_h, grid_w):
        return axes
    return PositionalAxes(*(axis._replace(table=axis.rows(0, axis.size)) for axis in axes))


def positional_axis_probs(pos_weight: torch.Tensor, grid_h: int, grid_w: int, dtype=None) -> AxisTables:
    """The positional softmax of every head as its two whole per-axis tables (bias left out: it cancels).

    Computed in pos_weight's accumulation dtype and returned in ``dtype`` (default that one).

    Each table is a real softmax (max-subtracted, normalised over the same
    rounded logits), so P keeps the accuracy of ``softmax`` even for peaked,
    large-weight heads; ``exp(logit - lse)`` with a separately computed lse does not.
    """
    axes = positional_axes(pos_weight, grid_h, grid_w)
    px, py = (axis.rows(0, axis.size) for axis in axes)
    return AxisTables(px.to(dtype or px.dtype), py.to(dtype or py.dtype))


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


def _by_columns(x_hm: torch.Tensor) -> torch.Tensor:
    """H x H_p x W x (B d): a head-major tensor with the column axis third."""
    H, grid_h, grid_w, B, d = x_hm.shape  # sizes, not -1, in the views: -1 is ambiguous when H = 0
    return x_hm.view(H, grid_h, grid_w, B * d)


def _by_rows(x_hm: torch.Tensor) -> torch.Tensor:
    """H x 1 x H_p x (W B d): a head-major tensor with the row axis third."""
    H, grid_h, grid_w, B, d = x_hm.shape
    return x_hm.view(H, 1, grid_h, grid_w * B * d)


def _apply_axis(axis: Axis, x: torch.Tensor, transposed: bool) -> torch.Tensor:
    """T x (or T^T x) along dim 2 of an H x outer x size x inner ``x``: a contiguous tensor of x's shape."""
    if axis.table is None:
        return _apply_axis_by_blocks(axis, x, transposed)
    table = axis.table[:, None]  # broadcast over ``outer``
    return torch.matmul(table.transpose(-2, -1) if transposed else table, x)


def _fold(x: torch.Tensor) -> torch.Tensor:
    """H x outer x size x inner -> H x size x (outer inner): one GEMM operand a head (a copy where outer > 1)."""
    H, outer, size, inner = x.shape
    return x.transpose(1, 2).reshape(H, size, outer * inner)


def _unfold(folded: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_fold`, contiguous in ``like``'s shape."""
    H, outer, size, inner = like.shape
    return folded.view(H, size, outer, inner).transpose(1, 2).contiguous()


def _apply_axis_by_blocks(axis: Axis, x: torch.Tensor, transposed: bool) -> torch.Tensor:
    """:func:`_apply_axis` with T made a block of rows at a time, never whole.

    A block holds at most max(outer inner, 16) rows of ``size`` numbers a head: no more than x holds. The rows
    are made in buffers reused from block to block, but where autograd records the call (the decomposition an
    export differentiates), which keeps every block anyway and takes no ``out=``.
    """
    folded = _fold(x)
    blocks = axis.blocks(folded.shape[-1])
    recorded = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *axis[:2], axis.scale))
    buffers = None if recorded else axis.row_buffers(blocks[0][1])
    if transposed:  # each block of rows of T adds its share to every output row
        out = torch.zeros_like(folded)
        for start, stop in blocks:
            out.baddbmm_(axis.rows(start, stop, buffers).transpose(1, 2), folded[:, start:stop])
    else:  # each block of rows of T makes those output rows
        out = torch.empty_like(folded)
        for start, stop in blocks:
            out[:, start:stop] = torch.bmm(axis.rows(start, stop, buffers), folded)
    return _unfold(out, x)


def apply_positional(axes: PositionalAxes, x_hm: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """``P x`` (or ``P^T x``) for a head-major x: along the columns with px, then along the rows with py."""
    cols = _apply_axis(axes.x, _by_columns(x_hm), transposed).view(x_hm.shape)
    return _apply_axis(axes.y, _by_rows(cols), transposed).view(x_hm.shape)


def _softmax_weight_grads(table: torch.Tensor, d_table: torch.Tensor, offsets: torch.Tensor, scratch=None):
    """(d w_linear, d w_square, sum table o d_table), each H, from rows of one axis's table and their gradient.

    Through each row's softmax: d logit = p o (dp - sum_j p dp); the logit is w_linear o + w_square o^2.
    ``scratch`` (table's shape), if given, takes every temporary of that size; d_table is left as it was.
    """
    scratch = torch.empty_like(table) if scratch is None else scratch
    row_dots = torch.mul(table, d_table, out=scratch).sum(-1, keepdim=True)
    d_logits = torch.sub(d_table, row_dots, out=scratch).mul_(table)
    d_linear = d_logits.mul_(offsets).sum((1, 2))
    return d_linear, d_logits.mul_(offsets).sum((1, 2)), row_dots.sum((1, 2))


def _axis_backward(axis: Axis, d_out: torch.Tensor, x: torch.Tensor):
    """(d w_linear, d w_square, sum T o dT) of ``sum(d_out . T x)`` along dim 2 of H x outer x size x inner tensors.

    dT[i, j] = sum over (outer, inner) of d_out[i] x[j]; where T is not whole, dT too is made a block of rows at a
    time in reused buffers and reduced at once.
    """
    if axis.table is not None:
        offsets = axis_offsets(axis.size, x.device, x.dtype)
        return _softmax_weight_grads(axis.table, torch.matmul(d_out, x.transpose(-2, -1)).sum(1), offsets)
    d_out, x = _fold(d_out), _fold(x)
    blocks = axis.blocks(x.shape[-1])
    buffers = axis.row_buffers(blocks[0][1])
    d_table_room = torch.empty_like(buffers.linear)
    grads = []
    for start, stop in blocks:
        offsets, scratch, _ = buffers.carve(len(axis.w_linear), stop - start, axis.size)
        d_table = torch.bmm(
            d_out[:, start:stop], x.transpose(1, 2), out=d_table_room[: scratch.numel()].view_as(scratch)
        )
        table = axis.rows(start, stop, buffers)  # made in buffers.square, its offsets in buffers.offsets
        grads.append(torch.stack(_softmax_weight_grads(table, d_table, offsets, scratch)))
    return sum(grads[1:], grads[0]).unbind(0)


def positional_backward(axes: PositionalAxes, dout_hm: torch.Tensor, v_hm: torch.Tensor):
    """(P^T dout, d pos_weight, sum dout . P v): the backward of ``sum(dout . P v)`` for P without a gate.

    dout and v are head-major in the axes' dtype; P^T dout is head-major, d pos_weight H x 3 and
    the sum H, over the batch. Three contractions serve all, since the two axes' products commute:
    ``dpx[a, c] = sum (py^T dout)[Y, a] . v[Y, c]`` over (Y, batch, d), and
    ``dpy[y, Y] = sum (px^T dout)[y, X] . v[Y, X]`` over (X, batch, d).
    """
    rows_t = _apply_axis(axes.y, _by_rows(dout_hm), transposed=True).view(dout_hm.shape)
    cols_t = _apply_axis(axes.x, _by_columns(dout_hm), transposed=True).view(dout_hm.shape)
    dx_linear, dx_square, _ = _axis_backward(axes.x, _by_columns(rows_t), _by_columns(v_hm))
    dy_linear, dy_square, dout_dot_positional = _axis_backward(axes.y, _by_rows(cols_t), _by_rows(v_hm))
    pt_dout = _apply_axis(axes.x, _by_columns(rows_t), transposed=True).view(dout_hm.shape)
    return pt_dout, torch.stack((dx_linear, dy_linear, dx_square + dy_square), dim=-1), dout_dot_positional


def pos_weight_grad(tables: AxisTables, dpx: torch.Tensor, dpy: torch.Tensor) -> torch.Tensor:
    """H x 3 gradient of pos_weight from the whole tables' gradients, through each table's softmax."""
    px, py = tables
    dx_linear, dx_square, _ = _softmax_weight_grads(px, dpx, axis_offsets(px.shape[-1], px.device, px.dtype))
    dy_linear, dy_square, _ = _softmax_weight_grads(py, dpy, axis_offsets(py.shape[-1], py.device, py.dtype))
    return torch.stack((dx_linear, dy_linear, dx_square + dy_square), dim=-1)
