"""The op at its edges: higher-order autograd, torch.func, bad scales, on every backend here."""

import pytest
import torch

from convit_kernels import available_backends, gpsa_attention

from gpsa_cases import PARAM_NAMES, make_inputs

CPU_BACKENDS = [name for name in ("cpu", "torch", "sdpa", "reference") if available_backends()[name].available]
OP_PAIRS = [name for name in ("cpu", "torch") if name in CPU_BACKENDS]


def _small():
    """float64 leaves of one head on a 2 x 3 grid, small enough for gradgradcheck's numerical Jacobians."""
    return [t.detach().requires_grad_() for t in make_inputs(1, 1, 6, 2, dtype=torch.float64, strided=False)]


# ---------------------------------------------------------------- double backward, torch.func


@pytest.mark.parametrize("backend", OP_PAIRS + ["reference"])
def test_double_backward_gradgradcheck(backend):
    def f(*args):
        return gpsa_attention(*args, grid_size=(2, 3), backend=backend)

    assert torch.autograd.gradgradcheck(f, _small(), atol=1e-7)


def test_double_backward_through_sdpa_names_pytorchs_limitation():
    inputs = _small()
    out = gpsa_attention(*inputs, grid_size=(2, 3), backend="sdpa")
    grads = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
    with pytest.raises(RuntimeError, match="scaled_dot_product"):
        torch.autograd.grad(sum(g.square().sum() for g in grads), inputs, allow_unused=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_func_grad_matches_autograd(backend):
    inputs = _small()
    weight = torch.randn(1, 1, 6, 2, dtype=torch.float64)

    def loss(*args):
        return (gpsa_attention(*args, grid_size=(2, 3), backend=backend) * weight).sum()

    got = torch.func.grad(loss, argnums=tuple(range(6)))(*[t.detach() for t in inputs])
    want = torch.autograd.grad(loss(*inputs), inputs)
    for name, g, w in zip(PARAM_NAMES, got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_func_vmap_matches_a_loop(backend):
    q, k, v, *params = [t.detach() for t in make_inputs(3, 2, 6, 4, dtype=torch.float64)]

    def attention(q, k, v):
        return gpsa_attention(q, k, v, *params, grid_size=(2, 3), backend=backend)

    batched = torch.func.vmap(attention)(q[:, None], k[:, None], v[:, None])
    looped = torch.stack([attention(*(t[i : i + 1] for t in (q, k, v))) for i in range(3)])
    torch.testing.assert_close(batched, looped)


# ---------------------------------------------------------------- scale


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_finite_or_non_positive_scale_is_refused_by_every_backend(backend):
    """The cpu kernel (MKL) would ignore a NaN alpha and return finite values: checked before any backend runs."""
    inputs = [t.detach() for t in make_inputs(1, 2, 16, 8)]
    for scale in (float("nan"), float("inf"), -float("inf"), 0.0, -0.5):
        with pytest.raises(ValueError, match="scale must be a finite number > 0"):
            gpsa_attention(*inputs, scale=scale, backend=backend)
