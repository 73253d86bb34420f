"""The separable positional branch against the dense H x N x N positional softmax, in float64."""

import pytest
import torch

from convit_kernels.reference import relative_positions
from convit_kernels.separable import (
    apply_positional,
    bhnd,
    dense_positional_probs,
    head_major,
    pos_weight_grad,
    positional_axis_probs,
    positional_backward,
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
    v_hm, dout_hm = head_major(v.detach(), grid[0], torch.float64), head_major(dout, grid[0], torch.float64)
    torch.testing.assert_close(bhnd(apply_positional(tables, v_hm)), dense_out.detach(), rtol=1e-12, atol=1e-13)
    pt_dout, dpx, dpy = positional_backward(tables, dout_hm, v_hm)
    torch.testing.assert_close(
        bhnd(apply_positional(tables, dout_hm, transposed=True)), want_dv, rtol=1e-12, atol=1e-13
    )
    torch.testing.assert_close(bhnd(pt_dout), want_dv, rtol=1e-12, atol=1e-13)
    dw = pos_weight_grad(tables, dpx, dpy)
    torch.testing.assert_close(dw, want_dw, rtol=1e-10, atol=1e-12 * max(1.0, want_dw.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_head_major_copies_half_inputs_to_float32(dtype):
    x = torch.randn(2, 12, 3, 4).to(dtype).transpose(1, 2)  # B x H x N x d view, H = 3, N = 12
    x_hm = head_major(x, 3, torch.float32)
    assert x_hm.shape == (3, 3, 4, 2, 4) and x_hm.dtype == torch.float32 and x_hm.is_contiguous()
    assert torch.equal(bhnd(x_hm), x.float())


def test_tables_in_a_requested_dtype():
    tables = positional_axis_probs(torch.randn(2, 3), 3, 4, torch.float64)
    assert tables.px.dtype == tables.py.dtype == torch.float64
    assert tables.px.shape == (2, 4, 4) and tables.py.shape == (2, 3, 3)


@pytest.mark.parametrize("B,H", [(2, 0), (0, 3), (0, 0)])
def test_no_heads_or_an_empty_batch(B, H):
    tables = positional_axis_probs(torch.randn(H, 3, dtype=torch.float64), 3, 4)
    v_hm = head_major(torch.randn(B, H, 12, 5, dtype=torch.float64), 3, torch.float64)
    assert apply_positional(tables, v_hm).shape == v_hm.shape
    pt_dout, dpx, dpy = positional_backward(tables, v_hm, v_hm)
    assert pt_dout.shape == v_hm.shape and dpx.shape == (H, 4, 4) and dpy.shape == (H, 3, 3)
    assert not dpx.any() and not dpy.any()  # sums over an empty batch
