"""timm's own model checks (its tests/test_models.py, the ones it runs on convit_*), on patched models.

Each test builds a model with timm's public API, patches it, and asserts what the
timm test of the same name asserts, plus that every GPSA layer ran a fused
backend (never the reference) and, where stock timm can run the model, that the
output is stock's. Two variants: convit_tiny at its 224 px default, and a
rectangular one (img_size=(64, 112), a 4 x 7 grid) that stock timm cannot run
(its GPSA assumes a square grid), checked against the reference backend instead.
"""

import contextlib
import copy
import dataclasses
import math

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import FeatureInfo, get_notrace_functions, get_notrace_modules, is_notrace_module
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from convit_kernels import FusedGPSA, patch_convit
from convit_kernels.backends import BACKEND_NAMES, get_backend

# (id, create_model kwargs, input size, whether stock timm runs it)
VARIANTS = [
    ("convit_tiny-224", {}, (3, 224, 224), True),
    ("convit_tiny-64x112", {"img_size": (64, 112)}, (3, 64, 112), False),
]
VARIANT_IDS = [v[0] for v in VARIANTS]
NUM_GPSA = 10  # convit_tiny: local_up_to_layer=10

# timm's test_model_forward_intermediates / features_only run on models that have them; ConViT has them
# from timm 1.0.31 on (earlier releases raise "features_only not implemented").
needs_timm_features = pytest.mark.skipif(
    not hasattr(timm.models.convit.ConVit, "forward_intermediates"),
    reason=f"timm {timm.__version__}'s ConVit has no forward_intermediates / features_only (timm >= 1.0.31)",
)

# TorchScript is what timm tests here, deprecated or not.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")


def _create(variant_kwargs, backend="auto", **kwargs):
    torch.manual_seed(0)
    return patch_convit(timm.create_model("convit_tiny", pretrained=False, **variant_kwargs, **kwargs), backend=backend)


@contextlib.contextmanager
def fused_calls(monkeypatch):
    """Record the name of every backend that runs a GPSA forward (eager, scripted or traced)."""
    from convit_kernels import backends

    calls = []

    def recording(name, fn):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapped

    with monkeypatch.context() as m:
        for name in BACKEND_NAMES:
            try:
                described = get_backend(name)
            except backends.BackendError:
                continue
            if described.forward is not None:
                replaced = dataclasses.replace(described, forward=recording(name, described.forward))
            else:
                replaced = dataclasses.replace(described, attention=recording(name, described.attention))
            m.setitem(backends._BACKENDS, name, replaced)
        yield calls


def _assert_all_fused(calls, layers=NUM_GPSA):
    assert len(calls) == layers, calls
    assert "reference" not in calls, calls


def _expected(variant_kwargs, stock_runs, x, **kwargs):
    """What the patched model must output: stock timm's, or the reference backend's where stock cannot run."""
    torch.manual_seed(0)
    model = timm.create_model("convit_tiny", pretrained=False, **variant_kwargs, **kwargs)
    if not stock_runs:
        patch_convit(model, backend="reference")
    with torch.no_grad():
        return model.eval()(x)


def _fx_model(model):
    """torchvision's feature extractor returning the model's output node, with timm's notrace leaves and functions."""
    tracer_kwargs = {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions()}
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(
        model,
        train_return_nodes=[train_nodes[-1]],
        eval_return_nodes=[eval_nodes[-1]],
        tracer_kwargs=tracer_kwargs,
    )


@pytest.mark.parametrize("variant,input_size,stock_runs", [v[1:] for v in VARIANTS], ids=VARIANT_IDS)
def test_forward(monkeypatch, variant, input_size, stock_runs):
    model = _create(variant).eval()
    x = torch.randn(1, *input_size)
    with fused_calls(monkeypatch) as calls, torch.no_grad():
        out = model(x)
    _assert_all_fused(calls)
    assert out.shape == (1, 1000) and not torch.isnan(out).any()
    torch.testing.assert_close(out, _expected(variant, stock_runs, x), rtol=1e-4, atol=1e-5)
    with pytest.raises(AssertionError, match="gradient checkpointing not supported"):
        model.set_grad_checkpointing()  # as stock: timm's test then skips its checkpointed rerun


@pytest.mark.parametrize("variant,input_size", [v[1:3] for v in VARIANTS], ids=VARIANT_IDS)
def test_backward(monkeypatch, variant, input_size):
    model = _create(variant, num_classes=42).train()
    with fused_calls(monkeypatch) as calls:
        out = model(torch.randn(2, *input_size))
        out.mean().backward()
    _assert_all_fused(calls)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    assert out.shape[-1] == 42 and not torch.isnan(out).any()


@pytest.mark.parametrize("variant,input_size", [v[1:3] for v in VARIANTS], ids=VARIANT_IDS)
def test_default_cfgs_non_std(variant, input_size):
    model = _create(variant).eval()
    x = torch.randn(1, *input_size)
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    cfg, state_dict = model.default_cfg, model.state_dict()
    assert f"{cfg['classifier']}.weight" in state_dict and f"{cfg['first_conv']}.weight" in state_dict
    features = model.forward_features(x)
    pre_logits = model.forward_head(features, pre_logits=True)
    assert features.shape[-1] == model.num_features and pre_logits.shape[1] == model.head_hidden_size
    model.reset_classifier(0)
    assert model.num_classes == 0
    pooled = model(x)
    assert pooled.shape == pre_logits.shape == (1, model.head_hidden_size)
    headless = _create(variant, num_classes=0).eval()
    assert headless(x).shape == (1, headless.num_features)


@pytest.mark.parametrize("variant,input_size,stock_runs", [v[1:] for v in VARIANTS], ids=VARIANT_IDS)
def test_torchscript_runs_the_fused_op(monkeypatch, variant, input_size, stock_runs):
    with timm.set_scriptable(True):
        model = _create(variant).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, *input_size)
    with fused_calls(monkeypatch) as calls, torch.no_grad():
        out = scripted(x)
    _assert_all_fused(calls)
    assert out.shape == (1, 1000) and not torch.isnan(out).any()
    torch.testing.assert_close(out, _expected(variant, stock_runs, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant,input_size", [v[1:3] for v in VARIANTS], ids=VARIANT_IDS)
@needs_timm_features
def test_features_only(monkeypatch, variant, input_size):
    model = _create(variant, features_only=True).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    output_fmt = getattr(model, "output_fmt", "NCHW")
    feat_axis, spatial_axis = get_channel_dim(output_fmt), get_spatial_dim(output_fmt)
    with fused_calls(monkeypatch) as calls, torch.no_grad():
        outputs = model(torch.randn(1, *input_size))
    _assert_all_fused(calls)
    assert len(outputs) == len(channels) >= 3
    for c, r, o in zip(channels, reductions, outputs):
        assert o.shape[feat_axis] == c and o.shape[0] == 1 and not torch.isnan(o).any()
        for axis, size in zip(spatial_axis, input_size[1:]):
            assert o.shape[axis] <= math.ceil(size / r) + 1


@pytest.mark.parametrize("variant,input_size", [v[1:3] for v in VARIANTS], ids=VARIANT_IDS)
@needs_timm_features
def test_forward_intermediates(variant, input_size):
    model = _create(variant).eval()
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    x = torch.randn(1, *input_size)
    with torch.no_grad():
        output, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
        features = model.forward_features(x)
    assert len(intermediates) == len(info.channels()) >= 3
    for c, r, o in zip(info.channels(), info.reduction(), intermediates):
        assert o.shape[:2] == (1, c) and not torch.isnan(o).any()
        assert o.shape[2] <= math.ceil(input_size[1] / r) + 1 and o.shape[3] <= math.ceil(input_size[2] / r) + 1
    torch.testing.assert_close(output, features)


def test_fused_gpsa_is_an_fx_leaf_as_timms_gpsa():
    assert is_notrace_module(timm.models.convit.GPSA) and is_notrace_module(FusedGPSA)


@pytest.mark.parametrize("variant,input_size", [v[1:3] for v in VARIANTS], ids=VARIANT_IDS)
def test_fx_forward(monkeypatch, variant, input_size):
    model = _create(variant).eval()
    x = torch.randn(1, *input_size)
    with torch.inference_mode():
        out = model(x)
        traced = _fx_model(model)
        with fused_calls(monkeypatch) as calls:
            (fx_out,) = traced(x).values()
    _assert_all_fused(calls)
    assert torch.equal(fx_out, out)


@pytest.mark.parametrize("variant,input_size", [v[1:3] for v in VARIANTS], ids=VARIANT_IDS)
def test_fx_backward(monkeypatch, variant, input_size):
    model = _create(variant, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    traced = _fx_model(model)
    with fused_calls(monkeypatch) as calls:
        (out,) = traced(torch.randn(2, *input_size)).values()
        out.mean().backward()
    _assert_all_fused(calls)
    assert sum(p.grad.numel() for p in traced.parameters() if p.grad is not None) == num_params
    assert out.shape[-1] == 42 and not torch.isnan(out).any()


@pytest.mark.parametrize("variant,input_size", [v[1:3] for v in VARIANTS], ids=VARIANT_IDS)
def test_fx_torchscript(monkeypatch, variant, input_size):
    with timm.set_scriptable(True):
        model = _create(variant).eval()
    x = torch.randn(1, *input_size)
    scripted = torch.jit.script(_fx_model(copy.deepcopy(model)))
    with torch.inference_mode():
        with fused_calls(monkeypatch) as calls:
            (out,) = scripted(x).values()
        expected = model(x)
    _assert_all_fused(calls)
    torch.testing.assert_close(out, expected)
