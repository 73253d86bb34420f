"""The op at its edges beyond each backend's own (tests/test_conformance.py runs every backend through
torch.func, double backward, autocast and bad scales): what the reference and the op layer promise there."""

import dataclasses

import pytest
import torch

from convit_kernels import backends, gpsa_attention
from convit_kernels.backends import BackendError

from gpsa_cases import make_inputs


def _small():
    """float64 leaves of one head on a 2 x 3 grid, small enough for gradgradcheck's numerical Jacobians."""
    return [t.detach().requires_grad_() for t in make_inputs(1, 1, 6, 2, dtype=torch.float64, strided=False)]


# ---------------------------------------------------------------- double backward, torch.func


def test_double_backward_of_the_reference_gradgradcheck():
    """The specification itself: a composite of plain tensor ops, differentiated twice by autograd."""

    def f(*args):
        return gpsa_attention(*args, grid_size=(2, 3), backend="reference")

    assert torch.autograd.gradgradcheck(f, _small(), atol=1e-7)


def test_double_backward_through_sdpa_names_pytorchs_limitation():
    inputs = _small()
    out = gpsa_attention(*inputs, grid_size=(2, 3), backend="sdpa")
    grads = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
    with pytest.raises(RuntimeError, match="scaled_dot_product"):
        torch.autograd.grad(sum(g.square().sum() for g in grads), inputs, allow_unused=True)


def test_a_backend_that_declares_no_path_refuses_in_one_line(monkeypatch):
    """No double backward, torch.func path or ONNX export declared: the op layer says so, naming the backend."""
    bare = dataclasses.replace(backends.get_backend("torch"), double_backward=None, functorch=None, onnx_export=None)
    monkeypatch.setitem(backends._BACKENDS, "torch", bare)
    inputs = _small()
    out = gpsa_attention(*inputs, grid_size=(2, 3), backend="torch")
    torch.autograd.grad(out.square().sum(), inputs, retain_graph=True)  # a first-order backward runs
    with pytest.raises(BackendError, match="backend 'torch' cannot run a backward with create_graph=True"):
        torch.autograd.grad(out.square().sum(), inputs[:3], create_graph=True)

    def loss(*args):
        return gpsa_attention(*args, grid_size=(2, 3), backend="torch").sum()

    with pytest.raises(BackendError, match="backend 'torch' cannot run under a torch.func transform"):
        torch.func.grad(loss)(*[t.detach() for t in inputs])


# ---------------------------------------------------------------- autocast


def _timm_dtype(inputs, device_type, autocast_dtype):
    from test_reference import timm_gpsa_core  # timm's GPSA on given q, k, v

    with torch.no_grad(), torch.autocast(device_type, dtype=autocast_dtype):
        return timm_gpsa_core(*[t.detach() for t in inputs]).dtype


def _reference_dtype(inputs, device_type, autocast_dtype):
    with torch.no_grad(), torch.autocast(device_type, dtype=autocast_dtype):
        return gpsa_attention(*inputs, backend="reference").dtype


# (input dtype, autocast dtype); timm's stack of q and k refuses the mixed half ones.
TIMM_AUTOCAST = [
    (dtype, autocast_dtype)
    for autocast_dtype in (torch.bfloat16, torch.float16)
    for dtype in (torch.float32, torch.float64, autocast_dtype)
]


@pytest.mark.parametrize("dtype,autocast_dtype", TIMM_AUTOCAST, ids=str)
def test_under_autocast_the_reference_returns_timms_dtype(dtype, autocast_dtype):
    """The dtype every backend returns under autocast (tests/test_conformance.py) is timm's."""
    inputs = make_inputs(2, 2, 16, 8, dtype=dtype)
    assert _reference_dtype(inputs, "cpu", autocast_dtype) == _timm_dtype(inputs, "cpu", autocast_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cuda_autocast_returns_the_reference_dtype(dtype):
    """timm's dtype on a GPU; auto's choice (each backend by name: tests/test_conformance.py) returns it."""
    inputs = [t.detach().cuda().requires_grad_() for t in make_inputs(2, 2, 16, 8, dtype=dtype)]
    want = _reference_dtype(inputs, "cuda", torch.float16)
    assert want == _timm_dtype(inputs, "cuda", torch.float16)
    with torch.autocast("cuda", dtype=torch.float16):
        out = gpsa_attention(*inputs)
    grads = torch.autograd.grad(out.float().square().sum(), inputs)
    assert out.dtype == want and [g.dtype for g in grads] == [t.dtype for t in inputs]


def test_compiled_under_autocast_returns_the_autocast_dtype():
    torch._dynamo.reset()
    inputs = [t.detach() for t in make_inputs(2, 2, 16, 8)]

    def attention(*args):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return gpsa_attention(*args)

    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    assert compiled(*inputs).dtype == attention(*inputs).dtype == torch.bfloat16
