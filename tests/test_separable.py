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
    positional_axes,
    positional_axis_probs,
    positional_backward,
    whole_tables_fit,
)

# (1, 40) and (37, 1) with B d = 10: tables made in blocks of 16 rows (16, 16, 8 and 16, 16, 5).
GRIDS = [(14, 14), (3, 5), (7, 1), (1, 7), (1, 1), (1, 40), (37, 1)]


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

    axes = positional_axes(w.detach(), *grid)
    v_hm, dout_hm = head_major(v.detach(), grid[0], torch.float64), head_major(dout, grid[0], torch.float64)
    torch.testing.assert_close(bhnd(apply_positional(axes, v_hm)), dense_out.detach(), rtol=1e-12, atol=1e-13)
    pt_dout, dw, dout_dot_positional = positional_backward(axes, dout_hm, v_hm)
    torch.testing.assert_close(bhnd(apply_positional(axes, dout_hm, transposed=True)), want_dv, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(bhnd(pt_dout), want_dv, rtol=1e-12, atol=1e-13)
    dw_tol = dict(rtol=1e-10, atol=1e-12 * max(1.0, want_dw.abs().max().item()))
    torch.testing.assert_close(dw, want_dw, **dw_tol)
    torch.testing.assert_close(dout_dot_positional, (dense_out * dout).sum((0, 2, 3)).detach(), rtol=1e-12, atol=1e-12)
    # The same gradient from whole tables and their gradients (what the fused CPU mix returns).
    tables = positional_axis_probs(w.detach(), *grid)
    rows_t = torch.einsum("hyY,hYxbd->hyxbd", tables.py.transpose(1, 2), dout_hm)
    cols_t = torch.einsum("hxX,hyXbd->hyxbd", tables.px.transpose(1, 2), dout_hm)
    dpx = torch.einsum("hyabd,hycbd->hac", rows_t, v_hm)
    dpy = torch.einsum("hyxbd,hYxbd->hyY", cols_t, v_hm)
    torch.testing.assert_close(pos_weight_grad(tables, dpx, dpy), want_dw, **dw_tol)


def test_gated_axes_scale_the_product():
    w, gate = torch.randn(3, 3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    v_hm = head_major(torch.randn(2, 3, 20, 4, dtype=torch.float64), 4, torch.float64)
    gated = apply_positional(positional_axes(w, 4, 5, gate), v_hm)
    torch.testing.assert_close(gated, gate.view(3, 1, 1, 1, 1) * apply_positional(positional_axes(w, 4, 5), v_hm))


FITS = [((14, 14), True), ((7, 28), True), ((4, 60), True), ((1, 15), True), ((1, 16), False), ((4096, 1), False)]


@pytest.mark.parametrize("grid,fits", FITS)
def test_whole_tables_fit_grids_up_to_about_16_to_1(grid, fits):
    assert whole_tables_fit(*grid) is fits


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
    axes = positional_axes(torch.randn(H, 3, dtype=torch.float64), 3, 4)
    v_hm = head_major(torch.randn(B, H, 12, 5, dtype=torch.float64), 3, torch.float64)
    assert apply_positional(axes, v_hm).shape == v_hm.shape
    pt_dout, dw, dot = positional_backward(axes, v_hm, v_hm)
    assert pt_dout.shape == v_hm.shape and dw.shape == (H, 3) and dot.shape == (H,)
    assert not dw.any() and not dot.any()  # sums over an empty batch
