"""FusedGPSA where timm's GPSA goes: TorchScript, torch.compile with a changing N, rectangular ConViTs."""

import io
import warnings

import pytest
import timm
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import convit_kernels.module
from convit_kernels import FusedGPSA, patch_convit
from convit_kernels.backends import BackendError
from convit_kernels.reference import relative_positions

# TorchScript is what timm tests here, deprecated or not.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")


def _layer(backend="auto", **kwargs):
    torch.manual_seed(0)
    layer = FusedGPSA(32, num_heads=2, qkv_bias=True, backend=backend, **kwargs)
    with torch.no_grad():
        layer.gating_param.uniform_(-2, 2)
    return layer


def _forward_backward(layer, x):
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    return out.detach(), grads


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu"])
@pytest.mark.parametrize("grid_size,N", [(None, 16), ((3, 5), 15)], ids=["square", "rectangular"])
def test_scripted_layer_matches_eager_forward_and_backward(backend, grid_size, N):
    layer = _layer(backend, grid_size=grid_size)
    scripted = torch.jit.script(layer)
    x = torch.randn(2, N, 32)
    (out, grads), (want, want_grads) = _forward_backward(scripted, x), _forward_backward(layer, x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_scripted_layer_follows_n_and_says_when_no_grid_fits():
    scripted = torch.jit.script(_layer().eval())
    for N in (16, 25):
        assert scripted(torch.randn(1, N, 32)).shape == (1, N, 32)
    with pytest.raises(torch.jit.Error, match="N = 15 patches is not a perfect square"):
        scripted(torch.randn(1, 15, 32))
    rectangular = torch.jit.script(_layer(grid_size=(3, 5)).eval())
    with pytest.raises(torch.jit.Error, match=r"grid_size \(3, 5\) has 15 patches, but N = 16"):
        rectangular(torch.randn(1, 16, 32))


def test_scripting_a_layer_with_a_composite_backend_says_why_it_cannot_run():
    for backend in ("sdpa", "reference"):
        with pytest.raises(BackendError, match=f"backend '{backend}' is a composite of torch ops, not an op pair"):
            torch.jit.script(_layer(backend))


def test_the_op_resolves_auto_and_refuses_a_composite():
    """What a scripted layer relies on: the op itself takes "auto" (an op pair) and says why it refuses sdpa."""
    q, k, v = torch.randn(3, 1, 2, 16, 8).unbind(0)
    params = (torch.randn(2, 3), torch.zeros(2), torch.zeros(2))
    out, _ = torch.ops.convit_kernels.gpsa_fwd(q, k, v, *params, 4, 0.5, "auto")
    want, _ = torch.ops.convit_kernels.gpsa_fwd(q, k, v, *params, 4, 0.5, "torch")
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(BackendError, match="backend 'sdpa' is a composite of torch ops"):
        torch.ops.convit_kernels.gpsa_fwd(q, k, v, *params, 4, 0.5, "sdpa")
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        torch.ops.convit_kernels.gpsa_fwd(q, k, v, *params, 4, float("nan"), "auto")


def test_the_op_refuses_auto_where_auto_picks_a_composite(monkeypatch):
    """Where auto's choice is sdpa (here: no C++ extension), a scripted layer refuses in one line, never runs torch."""
    import dataclasses

    from convit_kernels import backends

    described = backends.get_backend("cpu")
    monkeypatch.setitem(backends._BACKENDS, "cpu", dataclasses.replace(described, unavailable=lambda: "not built"))
    q, k, v = torch.randn(3, 1, 2, 16, 8).unbind(0)
    params = (torch.randn(2, 3), torch.zeros(2), torch.zeros(2))
    with pytest.raises(BackendError, match="backend 'auto' picks 'sdpa' here, which is a composite of torch ops"):
        torch.ops.convit_kernels.gpsa_fwd(q, k, v, *params, 4, 0.5, "auto")


def test_scripted_layer_with_attention_dropout_in_training_says_why_it_cannot_run():
    scripted = torch.jit.script(_layer(attn_drop=0.1).train())
    with pytest.raises(torch.jit.Error, match="cannot drop attention weights in training"):
        scripted(torch.randn(1, 16, 32))
    scripted.eval()(torch.randn(1, 16, 32))


def test_scripted_model_saves_and_loads():
    scripted = torch.jit.script(_layer().eval())
    x = torch.randn(1, 16, 32)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.jit.load(buffer)(x), scripted(x))


@pytest.mark.parametrize("dynamic", [None, True], ids=["dynamic-default", "dynamic-true"])
def test_compile_fullgraph_follows_a_changing_n(dynamic):
    """ConViT fine-tuned at a new resolution feeds its layers another N: no error, no graph break."""
    torch._dynamo.reset()
    layer = _layer()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, backend=counter, dynamic=dynamic)
    compiles = []
    for N in (16, 25, 36, 49):
        x = torch.randn(2, N, 32)
        (out, grads), (want, want_grads) = _forward_backward(compiled, x), _forward_backward(layer, x)
        torch.testing.assert_close(out, want)
        for got, expected in zip(grads, want_grads):
            torch.testing.assert_close(got, expected)
        compiles.append(counter.frame_count)
    # N stays symbolic: once it is dynamic (from the start, or from the second N by default), no recompilation.
    first_dynamic = 0 if dynamic else 1
    assert len(set(compiles[first_dynamic:])) == 1, compiles
    with pytest.raises(Exception, match="N = 15 patches is not a perfect square"):
        compiled(torch.randn(2, 15, 32))


@pytest.mark.slow
def test_compile_inductor_follows_a_changing_n():
    torch._dynamo.reset()
    layer = _layer()
    compiled = torch.compile(layer, fullgraph=True)
    for N in (16, 25):
        x = torch.randn(2, N, 32)
        (out, grads), (want, want_grads) = _forward_backward(compiled, x), _forward_backward(layer, x)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
        for got, expected in zip(grads, want_grads):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_patch_gives_a_rectangular_convit_its_grid():
    torch.manual_seed(0)
    model = timm.create_model("convit_tiny", img_size=(48, 80), num_classes=10).eval()
    patch_convit(model)
    assert {m.grid_size for m in model.modules() if isinstance(m, FusedGPSA)} == {(3, 5)}
    square = patch_convit(timm.create_model("convit_tiny", img_size=64, num_classes=10))
    assert {m.grid_size for m in square.modules() if isinstance(m, FusedGPSA)} == {None}  # found from N
    reference = patch_convit(timm.create_model("convit_tiny", img_size=(48, 80), num_classes=10), backend="reference")
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 48, 80)
    torch.testing.assert_close(model(x), reference.eval()(x), rtol=1e-4, atol=1e-5)


def _reinit_non_persistent_buffers(model):
    """timm's reinit_non_persistent_buffers, or the same walk over the init_non_persistent_buffers hooks where
    timm is older than that function (timm 1.0.21)."""
    try:
        from timm.models._manipulate import reinit_non_persistent_buffers
    except ImportError:
        for module in model.modules():
            if hasattr(module, "init_non_persistent_buffers"):
                module.init_non_persistent_buffers()
    else:
        reinit_non_persistent_buffers(model)


# (id, img_size, patch grid): convit_tiny's patches are 16 px
GRIDS = [("square", 64, (4, 4)), ("rectangular", (64, 112), (4, 7))]


def _image_size(grid):
    """(height, width) in pixels of an image with this patch grid."""
    return grid[0] * 16, grid[1] * 16


def _convit(img_size, **kwargs):
    torch.manual_seed(0)
    return timm.create_model("convit_tiny", img_size=img_size, num_classes=10, **kwargs)


@pytest.mark.parametrize("img_size,grid", [g[1:] for g in GRIDS], ids=[g[0] for g in GRIDS])
def test_reinit_non_persistent_buffers_on_a_patched_convit(img_size, grid):
    model = patch_convit(_convit(img_size)).eval()
    x = torch.randn(2, 3, *_image_size(grid))
    gpsa = model.blocks[0].attn
    with torch.no_grad():
        out = model(x)
        _reinit_non_persistent_buffers(model)  # the 1-patch placeholders, before get_attention builds a table
        torch.testing.assert_close(model(x), out, rtol=0, atol=0)
        tokens = model.pos_drop(model.patch_embed(x) + model.pos_embed)
        dist = gpsa.get_attention_map(tokens)
        gpsa.rel_indices.fill_(float("nan"))
        _reinit_non_persistent_buffers(model)
        assert torch.equal(gpsa.rel_indices, relative_positions(*grid)[None])
        torch.testing.assert_close(gpsa.get_attention_map(tokens), dist, rtol=0, atol=0)
        torch.testing.assert_close(model(x), out, rtol=0, atol=0)


@pytest.mark.parametrize("img_size,grid", [g[1:] for g in GRIDS], ids=[g[0] for g in GRIDS])
@pytest.mark.parametrize("meta", ["device-context", "device-argument"])
def test_meta_init_to_empty_and_reinit_on_a_patched_convit(img_size, grid, meta):
    """timm's init on the meta device: build without storage, to_empty, reinit the buffers, load the weights."""
    want = patch_convit(_convit(img_size)).eval()
    if meta == "device-context":
        with torch.device("meta"):
            model = patch_convit(_convit(img_size))
    else:
        model = patch_convit(_convit(img_size, device="meta"))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    model.to_empty(device="cpu")
    _reinit_non_persistent_buffers(model)
    model.load_state_dict(want.state_dict(), strict=True)
    x = torch.randn(2, 3, *_image_size(grid))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), want(x), rtol=0, atol=0)


def test_compile_fullgraph_trains_a_patched_convit_with_attention_dropout(monkeypatch):
    """attn_drop_rate > 0 in training runs the reference path, with its one warning, inside one graph as stock timm."""
    monkeypatch.setattr(convit_kernels.module, "_warned_attn_drop", False)
    torch._dynamo.reset()
    model = patch_convit(_convit((32, 48), depth=3, local_up_to_layer=2, attn_drop_rate=0.5)).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 48)
    with pytest.warns(UserWarning, match="attn_drop > 0 in training runs the reference") as caught:
        out = compiled(x)
    assert len([w for w in caught if "attn_drop > 0" in str(w.message)]) == 1
    out.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled(x)  # once per process, compiled or eager
        model(x)
    with torch.no_grad():
        assert not torch.allclose(compiled(x), out)  # dropout draws again
        torch.testing.assert_close(compiled.eval()(x), model(x), rtol=1e-5, atol=1e-6)
