"""The op at its edges: higher-order autograd, torch.func, autocast, bad scales, on every backend here."""

import pytest
import torch

from convit_kernels import available_backends, gpsa_attention

from gpsa_cases import PARAM_NAMES, make_inputs, outputs_and_grads, upcast

CPU_BACKENDS = ["cpu", "torch", "sdpa", "reference"]


@pytest.fixture(autouse=True)
def _skip_unavailable_backend(request):
    """A backend that cannot run here skips its cases visibly (the C++ extension may not be built)."""
    backend = request.node.callspec.params.get("backend") if hasattr(request.node, "callspec") else None
    if backend in CPU_BACKENDS and not available_backends()[backend].available:
        pytest.skip(f"backend {backend!r} cannot run here: {available_backends()[backend].reason}")


def _small():
    """float64 leaves of one head on a 2 x 3 grid, small enough for gradgradcheck's numerical Jacobians."""
    return [t.detach().requires_grad_() for t in make_inputs(1, 1, 6, 2, dtype=torch.float64, strided=False)]


# ---------------------------------------------------------------- double backward, torch.func


@pytest.mark.parametrize("backend", ["cpu", "torch", "reference"])
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


# ---------------------------------------------------------------- autocast


def _autocast_dtypes(inputs, device_type, autocast_dtype, backend):
    with torch.autocast(device_type, dtype=autocast_dtype):
        out = gpsa_attention(*inputs, backend=backend)
    grads = torch.autograd.grad(out.float().square().sum(), inputs)
    return out.dtype, [g.dtype for g in grads]


def _timm_dtype(inputs, device_type, autocast_dtype):
    from test_reference import timm_gpsa_core  # timm's GPSA on given q, k, v

    with torch.no_grad(), torch.autocast(device_type, dtype=autocast_dtype):
        return timm_gpsa_core(*[t.detach() for t in inputs]).dtype


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_autocast_returns_the_reference_dtype(backend, dtype, autocast_dtype):
    inputs = make_inputs(2, 2, 16, 8, dtype=dtype)
    want, _ = _autocast_dtypes(inputs, "cpu", autocast_dtype, "reference")
    if dtype in (torch.float32, torch.float64, autocast_dtype):  # timm's stack of q and k refuses the others
        assert want == _timm_dtype(inputs, "cpu", autocast_dtype)
    out_dtype, grad_dtypes = _autocast_dtypes(inputs, "cpu", autocast_dtype, backend)
    assert out_dtype == want
    assert grad_dtypes == [t.dtype for t in inputs]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_autocast_output_is_accurate(backend):
    inputs = make_inputs(2, 4, 49, 16)
    exact, _ = outputs_and_grads(upcast(inputs), backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gpsa_attention(*inputs, backend=backend)
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=2e-2 * exact.abs().max().item())


def test_compiled_under_autocast_returns_the_autocast_dtype():
    torch._dynamo.reset()
    inputs = [t.detach() for t in make_inputs(2, 2, 16, 8)]

    def attention(*args):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return gpsa_attention(*args)

    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    assert compiled(*inputs).dtype == attention(*inputs).dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", ["auto", "triton", "cuda", "sdpa", "torch", "reference"])
def test_cuda_autocast_returns_the_reference_dtype(backend, dtype):
    inputs = [t.detach().cuda().requires_grad_() for t in make_inputs(2, 2, 16, 8, dtype=dtype)]
    if backend in ("triton", "cuda") and dtype == torch.float64:
        pytest.skip(f"{backend} takes no float64")
    want, _ = _autocast_dtypes(inputs, "cuda", torch.float16, "reference")
    assert want == _timm_dtype(inputs, "cuda", torch.float16)
    out_dtype, grad_dtypes = _autocast_dtypes(inputs, "cuda", torch.float16, backend)
    assert out_dtype == want and grad_dtypes == [t.dtype for t in inputs]


# ---------------------------------------------------------------- scale


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_finite_or_non_positive_scale_is_refused_by_every_backend(backend):
    """The cpu kernel (MKL) would ignore a NaN alpha and return finite values: checked before any backend runs."""
    inputs = [t.detach() for t in make_inputs(1, 2, 16, 8)]
    for scale in (float("nan"), float("inf"), -float("inf"), 0.0, -0.5):
        with pytest.raises(ValueError, match="scale must be a finite number > 0"):
            gpsa_attention(*inputs, scale=scale, backend=backend)
