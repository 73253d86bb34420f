"""The op's front door: auto's choice (under torch.compile too), the registry's report, and the errors for bad input.

Each backend's own contract (opcheck, torch.compile, refusals) is tests/test_conformance.py's.
"""

import dataclasses

import numpy as np
import pytest
import torch

import convit_kernels
from convit_kernels import FusedGPSA, available_backends, gpsa_attention
from convit_kernels.backends import backend_names
from convit_kernels.dispatch import resolve_backend

from gpsa_cases import make_inputs


def test_available_backends_reports_every_backend_with_a_reason():
    status = available_backends()
    assert set(status) == set(backend_names())
    assert status["torch"].available and status["reference"].available
    for name, (_, reason) in status.items():
        assert reason, name
    if not torch.cuda.is_available():
        assert not status["cuda"].available


def test_auto_picks_an_available_backend_for_cpu():
    name = resolve_backend("auto", torch.device("cpu"), torch.float32, 48)
    assert name in backend_names() and available_backends()[name].available


def test_the_backend_is_chosen_once_per_call(monkeypatch):
    """gpsa_attention asks dispatch once; the op pair's forward, fake, backward and autograd context look the
    chosen backend up by name."""
    from convit_kernels import dispatch

    calls = []
    choose = dispatch.choose
    monkeypatch.setattr(dispatch, "choose", lambda *args: calls.append(args) or choose(*args))
    inputs = make_inputs(2, 3, 16, 8)
    for backend in backend_names():
        if available_backends()[backend].available:
            calls.clear()
            torch.autograd.grad(gpsa_attention(*inputs, backend=backend).sum(), inputs)
            assert len(calls) == 1, backend


def test_compile_fullgraph_with_dynamic_shapes_through_auto():
    """dynamic=True: head dim and N are symbolic while auto chooses; one graph serves every size, forward and
    backward (each backend by name: tests/test_conformance.py)."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: gpsa_attention(*a), dynamic=True, fullgraph=True, backend="aot_eager")
    for N, d in [(16, 8), (25, 8), (36, 12)]:
        inputs = [t.detach().requires_grad_() for t in make_inputs(2, 3, N, d)]
        got = compiled(*inputs)
        want = gpsa_attention(*inputs)
        torch.testing.assert_close(got, want)
        for g, w in zip(torch.autograd.grad(got.sum(), inputs[:3]), torch.autograd.grad(want.sum(), inputs[:3])):
            torch.testing.assert_close(g, w)


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    torch._dynamo.reset()
    layer = FusedGPSA(32, num_heads=2, backend="auto")
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 16, 32, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    dx_compiled = x.grad.clone()
    x.grad = None
    expected = layer(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_compiled, x.grad, rtol=1e-5, atol=1e-6)


def _good():
    return [t.detach() for t in make_inputs(2, 4, 16, 8)]


def _replace(index, value):
    args = _good()
    args[index] = value(args) if callable(value) else value
    return args


BAD_INPUTS = [
    ("q not a tensor", _replace(0, [[1.0]]), {}, TypeError, "q must be a torch.Tensor"),
    ("integer k", _replace(1, lambda a: a[1].long()), {}, TypeError, "k must be a floating tensor"),
    ("q of rank 3", _replace(0, lambda a: a[0][0]), {}, ValueError, r"q must have shape \(B, H, N, d\)"),
    ("q with no patches", _replace(0, lambda a: a[0][:, :, :0]), {}, ValueError, "with N >= 1 patches and d >= 1"),
    ("k of another shape", _replace(1, lambda a: a[1][:, :, :9]), {}, ValueError, "k must have the shape of q"),
    ("v of another dtype", _replace(2, lambda a: a[2].double()), {}, TypeError, "v must have the dtype of q"),
    ("pos_weight H x 2", _replace(3, lambda a: a[3][:, :2]), {}, ValueError, r"pos_weight must have shape \(4, 3\)"),
    ("pos_bias of 3 heads", _replace(4, lambda a: a[4][:3]), {}, ValueError, r"pos_bias must have shape \(4,\)"),
    ("gating of 5 heads", _replace(5, torch.ones(5)), {}, ValueError, r"gating_param must have shape \(4,\)"),
    ("mixed devices", _replace(3, lambda a: a[3].to("meta")), {}, ValueError, "pos_weight must be on the device of q"),
    (
        "grid that is not N",
        _good(),
        {"grid_size": (3, 4)},
        ValueError,
        r"grid_size \(3, 4\) has 12 patches, but N = 16",
    ),
    ("grid not a pair", _good(), {"grid_size": 16}, ValueError, "grid_size must be a pair of positive ints"),
    ("grid of a bool", _good(), {"grid_size": (True, 16)}, ValueError, "grid_size must be a pair of positive ints"),
    ("grid of floats", _good(), {"grid_size": (4.0, 4.0)}, ValueError, "grid_size must be a pair of positive ints"),
    (
        "N not square",
        [t[:, :, :15] if t.dim() == 4 else t for t in _good()],
        {},
        ValueError,
        "N = 15 patches is not a perfect square",
    ),
    ("unknown backend", _good(), {"backend": "fast"}, ValueError, "backend must be 'auto' or one of"),
]


@pytest.mark.parametrize("args,kwargs,error,message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_a_clear_error(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        gpsa_attention(*args, **kwargs)


def test_public_api():
    for name in convit_kernels.__all__:
        assert hasattr(convit_kernels, name)


# ---------------------------------------------------------------- backend="auto"


@pytest.fixture
def gpu_backends_available(monkeypatch):
    """Every backend that runs on CUDA tensors as it would be on a machine with a GPU (nothing runs)."""
    from convit_kernels import backends

    for name in backend_names():
        described = backends.get_backend(name)
        if described.runs_on("cuda"):
            monkeypatch.setitem(backends._BACKENDS, name, dataclasses.replace(described, unavailable=lambda: None))
    return backends


# (device, capability, dtype, head dim) -> what auto picks
AUTO_TABLE = [
    ("cuda", (9, 0), torch.bfloat16, 48, "triton"),
    ("cuda", (8, 0), torch.float32, 128, "triton"),
    ("cuda", (8, 6), torch.float16, 160, "sdpa"),  # head dim above the kernels' 128
    ("cuda", (8, 0), torch.float64, 48, "sdpa"),  # no float64 kernels
    ("cuda", (7, 5), torch.float16, 48, "sdpa"),  # Turing: no Triton kernels, the extension only by name
    ("cuda", (7, 0), torch.float32, 64, "sdpa"),
    ("mps", None, torch.float32, 48, "sdpa"),
    ("xpu", None, torch.bfloat16, 64, "sdpa"),
    ("cpu", None, torch.float32, 48, "cpu"),
    ("cpu", None, torch.float64, 200, "cpu"),
]


@pytest.mark.parametrize("device,capability,dtype,head_dim,expected", AUTO_TABLE)
def test_auto_selection_table(gpu_backends_available, monkeypatch, device, capability, dtype, head_dim, expected):
    if device == "cpu" and not available_backends()["cpu"].available:
        pytest.skip("the C++ extension is not built here")
    monkeypatch.setattr(gpu_backends_available, "cuda_capability", lambda device: capability)
    assert resolve_backend("auto", torch.device(device), dtype, head_dim) == expected


def test_auto_on_cpu_without_the_extension_is_sdpa(monkeypatch):
    from convit_kernels import backends, dispatch

    described = backends.get_backend("cpu")
    monkeypatch.setitem(backends._BACKENDS, "cpu", dataclasses.replace(described, unavailable=lambda: "not built"))
    name, skipped = dispatch.explain_auto(torch.device("cpu"), torch.float32, 48)
    assert name == "sdpa" and skipped == ["cpu: not built"]


def test_backends_command_says_what_auto_picks(capsys):
    from convit_kernels.cli import main

    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    for name in backend_names():
        assert out.count(f"\n{name} ") + out.startswith(f"{name} ") == 1, name
    expected = resolve_backend("auto", torch.device("cpu"), torch.float32, 48)
    assert "on cpu: " in out and f"float32   -> {expected}" in out


@pytest.mark.parametrize("integer", [np.int64, np.int32, np.uint8], ids=str)
def test_numpy_integer_grid_sides_are_taken(integer):
    out = gpsa_attention(*_good(), grid_size=(integer(2), integer(8)), backend="sdpa")
    torch.testing.assert_close(out, gpsa_attention(*_good(), grid_size=(2, 8), backend="sdpa"), rtol=0, atol=0)


@pytest.mark.parametrize("grid_w", [0, -4, 3, 17])
def test_the_op_pair_refuses_a_grid_width_that_does_not_divide_n(grid_w):
    """A scripted FusedGPSA calls the op pair without validate_inputs: each op validates grid_w itself."""
    q, k, v, w, b, lam = _good()
    message = f"grid_w must be a positive divisor of N = 16, got {grid_w}"
    with pytest.raises(ValueError, match=message):
        torch.ops.convit_kernels.gpsa_fwd(q, k, v, w, b, lam, grid_w, 8**-0.5, "torch")
    out, lse = torch.ops.convit_kernels.gpsa_fwd(q, k, v, w, b, lam, 4, 8**-0.5, "torch")
    with pytest.raises(ValueError, match=message):
        torch.ops.convit_kernels.gpsa_bwd(torch.ones_like(out), q, k, v, w, lam, lse, grid_w, 8**-0.5, "torch")


def test_bad_scale_is_a_clear_error():
    for scale in (float("nan"), float("inf"), 0.0, -1.0, "big"):
        with pytest.raises(ValueError, match="scale must be a finite number > 0"):
            gpsa_attention(*_good(), scale=scale)


def test_one_version_source():
    from importlib.metadata import version

    assert convit_kernels.__version__ == version("convit-kernels")
