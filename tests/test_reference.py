"""The reference against timm's GPSA, and the op's torch backend against the reference."""

import itertools

import pytest
import torch
from timm.models.convit import GPSA

from convit_kernels import gpsa_attention, relative_positions

from gpsa_cases import LARGE_WEIGHT_RTOL, assert_matches_reference, make_inputs, outputs_and_grads


class _Linear(torch.nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        self.w, self.b = weight, bias

    def forward(self, x):
        return torch.nn.functional.linear(x, self.w, self.b)


class _Given(torch.nn.Module):
    """Stands in for a projection: returns a fixed tensor, so timm's code runs on our q, k, v."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return self.value


def timm_gpsa_core(q, k, v, pos_weight, pos_bias, gating_param):
    """timm's GPSA forward (without projections) on given q, k, v (B x H x N x d) and parameters."""
    B, H, N, d = q.shape
    layer = GPSA(H * d, num_heads=H, dtype=q.dtype)
    layer.rel_indices = layer.get_rel_indices(N)
    layer.qk = _Given(torch.stack((q, k)).permute(1, 3, 0, 2, 4).reshape(B, N, 2 * H * d))
    layer.v = _Given(v.transpose(1, 2).reshape(B, N, H * d))
    layer.pos_proj = _Linear(pos_weight, pos_bias)
    del layer.gating_param
    layer.gating_param = gating_param  # a plain tensor, so its gradient reaches the caller
    layer.proj = torch.nn.Identity()
    out = layer(torch.empty(B, N, H * d, dtype=q.dtype))
    return out.reshape(B, N, H, d).transpose(1, 2)


@pytest.mark.parametrize("N,H,d", list(itertools.product((196, 144), (4, 9, 16), (48, 64))))
def test_reference_equals_timm_fp64(N, H, d):
    inputs = make_inputs(2, H, N, d, dtype=torch.float64)
    ours = outputs_and_grads(inputs, backend="reference")
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = timm_gpsa_core(*leaves)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((out * weight).sum(), leaves)
    assert (ours[0] - out).abs().max() < 1e-12
    for mine, theirs in zip(ours[1], grads):
        assert (mine - theirs).abs().max() <= 1e-12 * max(1.0, theirs.abs().max().item())


def test_relative_positions_rectangular_grid():
    rows, cols = 3, 5
    rel = relative_positions(rows, cols, dtype=torch.float64)
    for i, j in itertools.product(range(rows * cols), repeat=2):
        dx = j % cols - i % cols
        dy = j // cols - i // cols
        assert rel[i, j].tolist() == [dx, dy, dx * dx + dy * dy]


def test_relative_positions_match_timm_square():
    layer = GPSA(16, num_heads=2)
    assert torch.equal(relative_positions(6, 6)[None], layer.get_rel_indices(36))


@pytest.mark.parametrize(
    "B,H,N,d,dtype,gate,grid",
    [
        (2, 4, 196, 48, torch.float64, None, None),
        (2, 3, 50, 16, torch.float32, None, (5, 10)),
        (1, 2, 1, 8, torch.float32, None, None),
        (2, 4, 49, 40, torch.float32, -20.0, None),
        (2, 4, 49, 40, torch.float32, 20.0, None),
        (2, 4, 36, 32, torch.bfloat16, None, None),
        (2, 4, 36, 32, torch.float16, None, None),
    ],
)
def test_torch_backend_matches_reference(B, H, N, d, dtype, gate, grid):
    assert_matches_reference(make_inputs(B, H, N, d, dtype=dtype, gate=gate), backend="torch", grid_size=grid)


def test_torch_backend_large_positional_weights():
    inputs = make_inputs(2, 9, 196, 48, locality_strength=10.0)
    assert_matches_reference(inputs, rtol_overrides=LARGE_WEIGHT_RTOL, backend="torch")


def test_fused_output_is_a_view_of_b_n_h_d_memory():
    q, k, v, *params = make_inputs(2, 4, 16, 8)
    out = gpsa_attention(q, k, v, *params, backend="torch")
    assert out.shape == (2, 4, 16, 8)
    assert out.transpose(1, 2).is_contiguous()


def test_non_finite_inputs_propagate_like_timm():
    q, k, v, *params = [t.detach() for t in make_inputs(2, 4, 16, 8, dtype=torch.float64)]
    q = q.clone()
    q[0, 1, 3, 2] = float("nan")
    v = v.clone()
    v[1, 0, 5, 0] = float("inf")
    expected = timm_gpsa_core(q, k, v, *params).detach()
    for backend in ("reference", "torch", "auto"):
        got = gpsa_attention(q, k, v, *params, backend=backend)
        assert torch.equal(torch.isnan(got), torch.isnan(expected)), backend
        assert torch.equal(torch.isinf(got), torch.isinf(expected)), backend
