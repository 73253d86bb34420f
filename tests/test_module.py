"""FusedGPSA / SDPAMHSA as drop-ins for timm's modules, and patch_convit on a timm ConViT."""

import copy
import warnings

import pytest
import timm
import torch
from timm.models.convit import GPSA, MHSA

from convit_kernels import SDPAMHSA, FusedGPSA, patch_convit
from convit_kernels.backends import backend_names, backend_problem, get_backend
from convit_kernels.reference import relative_positions


def _run(layer, x):
    layer.zero_grad()
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    out.square().sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


def _assert_same_run(got, want, rtol):
    (out_g, dx_g, grads_g), (out_w, dx_w, grads_w) = got, want
    torch.testing.assert_close(out_g, out_w, rtol=rtol, atol=rtol * out_w.abs().max().item())
    torch.testing.assert_close(dx_g, dx_w, rtol=rtol, atol=rtol * dx_w.abs().max().item())
    scale = max(g.abs().max().item() for g in grads_w.values())
    for name, grad in grads_w.items():
        # pos_proj.bias: exactly zero in the fused op, rounding noise in timm's
        torch.testing.assert_close(grads_g[name], grad, rtol=rtol, atol=rtol * scale, msg=name)


def _timm_gpsa(dim=96, heads=4, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layer = GPSA(dim, num_heads=heads, qkv_bias=True, locality_strength=1.0, dtype=dtype)
    layer.local_init()
    with torch.no_grad():
        layer.gating_param.uniform_(-2, 2)
        layer.pos_proj.bias.normal_()
        layer.qk.bias.normal_()
    return layer


# "auto" and every backend that runs on CPU tensors in this process.
CPU_BACKENDS = ["auto"] + [
    name for name in backend_names() if backend_problem(name) is None and get_backend(name).runs_on("cpu")
]


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fused_gpsa_matches_timm_after_state_dict_copy(dtype, rtol, backend):
    if backend != "auto" and dtype not in get_backend(backend).dtypes:
        pytest.skip(f"backend {backend!r} takes no {dtype}")
    stock = _timm_gpsa(dtype=dtype)
    fused = FusedGPSA(96, num_heads=4, qkv_bias=True, dtype=dtype, backend=backend)
    fused.load_state_dict(stock.state_dict(), strict=True)
    x = torch.randn(2, 49, 96, dtype=dtype)
    _assert_same_run(_run(fused, x), _run(stock, x), rtol)


def test_state_dict_keys_and_shapes_equal_timm():
    stock = GPSA(192, num_heads=4)
    fused = FusedGPSA(192, num_heads=4)
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in stock.state_dict().items()}


def test_local_init_matches_timm():
    stock = GPSA(144, num_heads=9, locality_strength=2.0)
    stock.local_init()
    fused = FusedGPSA(144, num_heads=9, locality_strength=2.0)
    torch.testing.assert_close(fused.pos_proj.weight, stock.pos_proj.weight)
    torch.testing.assert_close(fused.v.weight, torch.eye(144))


def test_from_gpsa_shares_parameters():
    stock = _timm_gpsa()
    fused = FusedGPSA.from_gpsa(stock)
    for (name, p), (_, q) in zip(stock.named_parameters(), fused.named_parameters()):
        assert p is q, name
    assert list(stock.state_dict()) == list(fused.state_dict())
    x = torch.randn(2, 49, 96)
    torch.testing.assert_close(fused(x), stock(x), rtol=2e-5, atol=2e-6)


def test_to_moves_relative_positions_and_n_change_rebuilds_them():
    fused = FusedGPSA(32, num_heads=2)
    fused(torch.randn(1, 16, 32))
    assert fused.rel_indices.shape == (1, 1, 1, 3)  # the forward builds no N x N table
    fused.get_attention(torch.randn(1, 16, 32))
    assert fused.rel_indices.shape == (1, 16, 16, 3)
    fused.to(torch.float64)
    assert fused.rel_indices.dtype == torch.float64
    fused.get_attention(torch.randn(1, 25, 32, dtype=torch.float64))
    assert torch.equal(fused.rel_indices, relative_positions(5, 5, dtype=torch.float64)[None])
    assert "rel_indices" not in fused.state_dict()
    fused.to("meta")
    assert fused.rel_indices.device.type == "meta"


def test_rectangular_grid_matches_reference_path():
    x = torch.randn(2, 12, 32)
    fused = FusedGPSA(32, num_heads=2, grid_size=(3, 4), backend="torch")
    reference = FusedGPSA.from_gpsa(fused, grid_size=(3, 4), backend="reference")
    torch.testing.assert_close(fused(x), reference(x), rtol=2e-5, atol=2e-6)
    with pytest.raises(ValueError, match=r"grid_size \(3, 4\) has 12 patches, but N = 16"):
        fused(torch.randn(1, 16, 32))


@pytest.mark.parametrize("grid_size,N", [(None, 16), ((3, 4), 12)], ids=["square", "rectangular"])
def test_init_non_persistent_buffers_rebuilds_rel_indices_at_their_n(grid_size, N):
    """timm's hook (its reinit_non_persistent_buffers calls it, e.g. after to_empty), before and after
    get_attention has built the table: the 1-patch placeholder stays one whatever the grid."""
    fused = FusedGPSA(32, num_heads=2, grid_size=grid_size)
    x = torch.randn(2, N, 32)
    out = fused(x)
    fused.init_non_persistent_buffers()
    assert torch.equal(fused.rel_indices, torch.zeros(1, 1, 1, 3))
    dist, attn_map = fused.get_attention_map(x, return_map=True)
    fused.rel_indices.fill_(float("nan"))  # as to_empty leaves it
    fused.init_non_persistent_buffers()
    assert torch.equal(fused.rel_indices, relative_positions(*(grid_size or (4, 4)))[None])
    torch.testing.assert_close(fused.get_attention_map(x, return_map=True), (dist, attn_map), rtol=0, atol=0)
    torch.testing.assert_close(fused(x), out, rtol=0, atol=0)

    on_meta = FusedGPSA(32, num_heads=2, grid_size=grid_size, device="meta").to_empty(device="cpu")
    on_meta.init_non_persistent_buffers()
    assert torch.equal(on_meta.rel_indices, torch.zeros(1, 1, 1, 3))


def test_non_square_n_without_grid_is_a_clear_error():
    with pytest.raises(ValueError, match="N = 15 patches is not a perfect square"):
        FusedGPSA(32, num_heads=2)(torch.randn(1, 15, 32))


def test_attention_map_matches_timm():
    stock = _timm_gpsa()
    fused = FusedGPSA.from_gpsa(copy.deepcopy(stock))
    x = torch.randn(2, 49, 96)
    stock(x)  # timm builds rel_indices in forward
    dist_s, map_s = stock.get_attention_map(x, return_map=True)
    dist_f, map_f = fused.get_attention_map(x, return_map=True)
    torch.testing.assert_close(dist_f, dist_s)
    torch.testing.assert_close(map_f, map_s)


def test_attn_dropout_in_training_uses_reference_and_warns_once(monkeypatch):
    import convit_kernels.module as module

    monkeypatch.setattr(module, "_warned_attn_drop", False)
    fused = FusedGPSA(32, num_heads=2, attn_drop=0.5).train()
    x = torch.randn(1, 16, 32)
    with pytest.warns(UserWarning, match="attn_drop > 0 in training runs the reference"):
        fused(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused(x)
        fused.eval()(x)


def test_sdpa_mhsa_matches_timm():
    torch.manual_seed(0)
    stock = MHSA(96, num_heads=4, qkv_bias=True)
    fast = SDPAMHSA.from_mhsa(copy.deepcopy(stock))
    assert list(fast.state_dict()) == list(stock.state_dict())
    x = torch.randn(2, 50, 96)
    _assert_same_run(_run(fast, x), _run(stock, x), 2e-5)
    torch.testing.assert_close(fast.get_attention_map(x[:, :49]), stock.get_attention_map(x[:, :49]))


def test_patched_convit_tiny_gives_stock_outputs_and_gradients():
    torch.manual_seed(0)
    stock = timm.create_model("convit_tiny", pretrained=False, num_classes=10)
    patched = patch_convit(copy.deepcopy(stock))
    assert sum(isinstance(m, FusedGPSA) for m in patched.modules()) == 10
    assert sum(isinstance(m, SDPAMHSA) for m in patched.modules()) == 2
    assert list(patched.state_dict()) == list(stock.state_dict())
    x = torch.randn(2, 3, 224, 224)
    _assert_same_run(_run(patched, x), _run(stock, x), 1e-4)


def test_patch_takes_facebookresearch_shaped_gpsa():
    class GPSALike(torch.nn.Module):  # facebookresearch's layout: plain attributes, no timm class
        def __init__(self):
            super().__init__()
            self.num_heads, self.dim, self.scale = 2, 32, 16**-0.5
            self.qk = torch.nn.Linear(32, 64, bias=False)
            self.v = torch.nn.Linear(32, 32, bias=False)
            self.proj = torch.nn.Linear(32, 32)
            self.pos_proj = torch.nn.Linear(3, 2)
            self.attn_drop = torch.nn.Dropout(0.0)
            self.proj_drop = torch.nn.Dropout(0.0)
            self.gating_param = torch.nn.Parameter(torch.ones(2))

    model = torch.nn.Sequential(GPSALike())
    patch_convit(model)
    assert isinstance(model[0], FusedGPSA)
