"""The separable positional branch against the dense H x N x N positional softmax, in float64."""

import pytest
import torch

from convit_kernels.reference import relative_positions
from convit_kernels.separable import (
    apply_positional,
    dense_positional_probs,
    pos_weight_grad,
    positional_axis_probs,
    positional_table_grads,
)

GRIDS = [(14, 14), (3, 5), (7, 1), (1, 7), (1, 1)]


def _dense(w, grid):
    rel = relative_positions(*grid, dtype=torch.float64)
    return torch.einsum("ijc,hc->hij", rel, w).softmax(-1)


@pytest.mark.parametrize("grid", GRIDS)
def test_tables_factor_the_direct_softmax(grid):
    w = torch.randn(5, 3, dtype=torch.float64) * 3
    tables = positional_axis_probs(w, *grid)
    torch.testing.assert_close(dense_positional_probs(tables), _dense(w, grid), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("strength", [1.0, 10.0])
def test_apply_and_gradients_match_the_dense_product(grid, strength):
    B, H, d = 2, 3, 5
    N = grid[0] * grid[1]
    w = (torch.randn(H, 3, dtype=torch.float64) * strength).requires_grad_()
    # v as the strided head view of a B x N x (H d) projection, as the modules pass it
    v = torch.randn(B, N, H, d, dtype=torch.float64).transpose(1, 2).requires_grad_()
    dout = torch.randn(B, H, N, d, dtype=torch.float64)
    dense_out = _dense(w, grid) @ v
    want_dw, want_dv = torch.autograd.grad((dense_out * dout).sum(), (w, v))

    tables = positional_axis_probs(w.detach(), *grid)
    torch.testing.assert_close(apply_positional(tables, v.detach()), dense_out.detach(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(apply_positional(tables, dout, transposed=True), want_dv, rtol=1e-12, atol=1e-13)
    dw = pos_weight_grad(tables, *positional_table_grads(tables, dout, v.detach()))
    torch.testing.assert_close(dw, want_dw, rtol=1e-10, atol=1e-12 * max(1.0, want_dw.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype):
    w = torch.randn(2, 3)
    v = torch.randn(1, 2, 12, 4).to(dtype)
    tables = positional_axis_probs(w, 3, 4)
    out = apply_positional(tables, v)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, dense_positional_probs(tables) @ v.float(), rtol=1e-6, atol=1e-6)
    dpx, dpy = positional_table_grads(tables, v, v)
    assert dpx.dtype == dpy.dtype == torch.float32


def test_tables_in_a_requested_dtype():
    tables = positional_axis_probs(torch.randn(2, 3), 3, 4, torch.float64)
    assert tables.px.dtype == tables.py.dtype == torch.float64
    assert tables.px.shape == (2, 4, 4) and tables.py.shape == (2, 3, 3)
