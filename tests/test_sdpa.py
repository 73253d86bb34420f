"""The "sdpa" backend: (1 - g) SDPA + g separable P v against the reference, its op, and its memory."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from convit_kernels import FusedGPSA, gpsa_attention, patch_convit, settings

from gpsa_cases import assert_matches_reference, make_inputs, max_error, outputs_and_grads, upcast

# Its forward and gradients against the reference (every dtype, gates near 0 and 1, large positional
# weights, saturated rows in float64) are tests/test_conformance.py's, as for every backend.


def _rtol(dtype):
    return 1e-12 if dtype == torch.float64 else 2e-5


def _saturated_inputs(dtype):
    """q and k scaled by 100: one key takes the whole content row."""
    q, k, v, *params = make_inputs(2, 4, 49, 16, dtype=dtype)
    with torch.no_grad():
        q, k = (t * 100 for t in (q, k))
    return [t.detach().requires_grad_() for t in (q, k, v, *params)]


def test_saturated_content_softmax_fp32_adds_nothing_to_sdpas_error():
    """In float32 PyTorch's flash kernel itself loses accuracy in dq and dk here (its lse is fp32; the fp32
    reference keeps ~1e-2 relative); the backend's error stays within 3x plain SDPA's on the same content branch."""
    inputs = _saturated_inputs(torch.float32)
    exact_out, exact_grads = outputs_and_grads(upcast(inputs), backend="reference")
    out, grads = outputs_and_grads(inputs, backend="sdpa")
    # The content branch alone, with the upstream gradient the backend hands SDPA: (1 - g) dO.
    dout = torch.randn(exact_out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    upstream = torch.sigmoid(-inputs[5].detach().double()).view(1, -1, 1, 1) * dout
    content_errors = []
    for dtype in (torch.float64, torch.float32):
        q, k, v = (t.detach().to(dtype).requires_grad_() for t in inputs[:3])
        content = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        content_errors.append(torch.autograd.grad(content, (q, k), upstream.to(dtype)))
    for i, name in ((0, "q"), (1, "k")):
        sdpa_error = max_error(content_errors[1][i], content_errors[0][i])
        scale = exact_grads[i].abs().max().item()
        assert max_error(grads[i], exact_grads[i]) <= 3 * sdpa_error + 2e-5 * scale, name
    assert_matches_reference(inputs, rtol_overrides={"q": 1.0, "k": 1.0}, backend="sdpa")  # every other tensor


def test_gradcheck_fp64():
    inputs = [t.detach().requires_grad_() for t in make_inputs(1, 2, 6, 3, dtype=torch.float64, strided=False)]

    def f(*args):
        return gpsa_attention(*args, grid_size=(2, 3), backend="sdpa")

    assert torch.autograd.gradcheck(f, inputs, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_positional_mix(dtype):
    q, k, v, w, b, lam = [t.detach() for t in make_inputs(2, 3, 12, 8, dtype=dtype)]
    content = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    args = (content.requires_grad_(), v.requires_grad_(), w.requires_grad_(), b, lam.requires_grad_(), 4)
    torch.library.opcheck(torch.ops.convit_kernels.positional_mix.default, args)
    grad_out = torch.randn(2, 12, 3, 8, dtype=dtype).transpose(1, 2)  # the strided layout autograd hands
    bwd_args = (grad_out, content.detach(), v.detach(), w.detach(), lam.detach(), 4)
    torch.library.opcheck(torch.ops.convit_kernels.positional_mix_bwd.default, bwd_args)


class _OutputShapes(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def test_nothing_n_by_n_saved_or_allocated():
    B, H, N, d = 2, 3, 64, 8  # one B x H x N x N tensor is 8x a B x H x N x d one
    inputs = make_inputs(B, H, N, d)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    shapes = _OutputShapes()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), shapes:
        out = gpsa_attention(*inputs, backend="sdpa")
        torch.autograd.grad(out.square().sum(), inputs)
    limit = B * H * N * d
    assert saved and max(torch.Size(s).numel() for s in saved) <= limit, saved
    too_big = [(op, s) for op, s in shapes.shapes if torch.Size(s).numel() > limit]
    assert not too_big, too_big


def test_reference_path_allocates_n_by_n():
    """The check above sees an N x N tensor where one is made."""
    shapes = _OutputShapes()
    with shapes:
        gpsa_attention(*[t.detach() for t in make_inputs(2, 3, 64, 8)], backend="reference")
    assert any(torch.Size(s).numel() >= 2 * 3 * 64 * 64 for _, s in shapes.shapes)


def test_patched_convit_runs_sdpa_and_matches_stock():
    import timm

    torch.manual_seed(0)
    stock = timm.create_model("convit_tiny", img_size=64, num_classes=10).eval()
    patched = patch_convit(timm.create_model("convit_tiny", img_size=64, num_classes=10).eval(), backend="sdpa")
    patched.load_state_dict(stock.state_dict())
    assert {m.backend for m in patched.modules() if isinstance(m, FusedGPSA)} == {"sdpa"}
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(patched(x), stock(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the fused CPU mix (csrc/cpu/positional_mix_cpu.cpp)


@pytest.fixture
def fused_mix():
    """The extension's CPU part with the mix ops (built on first use when it is not), else a skip."""
    from convit_kernels.backends.sdpa import _fused_cpu_mix
    from convit_kernels.extension_loader import load_cpu

    problem = load_cpu()
    if problem is not None:
        pytest.skip(f"the extension's CPU part is unavailable: {problem}")
    if settings.enabled("CONVIT_KERNELS_NO_FUSED_MIX"):
        pytest.skip("CONVIT_KERNELS_NO_FUSED_MIX is set")
    assert _fused_cpu_mix(1, 1, torch.zeros(1)) is not None, "convit_kernels._C predates the mix ops: rebuild it"


def _mix_args(B, H, grid, d, dtype, layout, seed=0):
    """positional_mix's and positional_mix_bwd's arguments; v in a given memory layout.

    layout "qkv": q, k, v views of one projection output as timm makes them;
    "channels_strided": v's channels not contiguous (stride H); "contiguous".
    """
    q, k, v, w, b, lam = (t.detach() for t in make_inputs(B, H, grid[0] * grid[1], d, dtype=dtype, seed=seed))
    if layout == "channels_strided":
        v = v.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # B x N x d x H storage
        assert v.stride(3) == H
    elif layout == "contiguous":
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    content = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(B, grid[0] * grid[1], H, d, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
    if layout == "contiguous":
        grad_out = grad_out.contiguous()
    return content, v, w, b, lam, grad_out


def _run_mix(content, v, w, b, lam, grad_out, grid_w):
    out = torch.ops.convit_kernels.positional_mix(content, v, w, b, lam, grid_w)
    return (out, *torch.ops.convit_kernels.positional_mix_bwd(grad_out, content, v, w, lam, grid_w))


# (B, H, grid, d): ConViT-S's shape, rectangular grids (both ways), one row or column, N = 1, odd d, B = 1.
FUSED_CASES = [
    (2, 9, (14, 14), 48),
    (1, 3, (5, 7), 1),
    (2, 2, (7, 5), 3),
    (2, 3, (1, 6), 64),
    (2, 2, (4, 1), 128),
    (2, 2, (1, 1), 48),
    (1, 4, (3, 4), 17),
]
# The fused kernel and the torch path accumulate in the same dtype, in different orders; half
# outputs are rounded once from it, so they can differ by one unit of the last place.
FUSED_RTOL = {torch.float64: 1e-13, torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


@pytest.mark.parametrize("layout", ["qkv", "channels_strided", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "B,H,grid,d", FUSED_CASES, ids=[f"B{c[0]}-H{c[1]}-{c[2][0]}x{c[2][1]}-d{c[3]}" for c in FUSED_CASES]
)
def test_fused_mix_matches_torch_path(fused_mix, monkeypatch, B, H, grid, d, dtype, layout):
    args = _mix_args(B, H, grid, d, dtype, layout)
    fused = _run_mix(*args, grid[1])
    monkeypatch.setenv("CONVIT_KERNELS_NO_FUSED_MIX", "1")
    torch_path = _run_mix(*args, grid[1])
    names = ("out", "d_content", "dv", "d_pos_weight", "d_gating")
    for name, got, want in zip(names, fused, torch_path):
        assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous(), name
        # d_gating is a difference of two sums, (dO . P v) - (dO . O_c): its scale is theirs
        scale = args[-1].double().abs().sum().item() if name == "d_gating" else want.double().abs().max().item()
        # the parameters' gradients are sums in the accumulation dtype, whatever the inputs' dtype
        param_sum = name in ("d_pos_weight", "d_gating") and dtype != torch.float64
        rtol = FUSED_RTOL[torch.float32 if param_sum else dtype]
        assert max_error(got, want) <= 4 * rtol * max(scale, 1e-30), name


def test_fused_mix_deterministic_across_thread_counts(fused_mix):
    args = _mix_args(4, 9, (14, 14), 48, torch.float32, "qkv")
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (max(2, threads), 1, max(2, threads)):
            torch.set_num_threads(count)
            runs.append(_run_mix(*args, 14))
    finally:
        torch.set_num_threads(threads)
    for many, single, again in zip(*runs):
        assert torch.equal(many, single) and torch.equal(many, again)


def test_fused_mix_is_the_cpu_path_and_the_torch_path_still_matches_the_reference(fused_mix, monkeypatch):
    from convit_kernels.backends.sdpa import _fused_cpu_mix

    x = torch.zeros(2, 3)
    assert _fused_cpu_mix(14, 14, x, x) is not None
    assert _fused_cpu_mix(14, 14, x, x.double()) is None  # mixed dtypes: the torch path
    assert _fused_cpu_mix(14, 14, x, torch.zeros(2, 3, device="meta")) is None  # any other device: the torch path
    assert _fused_cpu_mix(1, 4096, x, x) is None  # whole tables too large for the grid: the torch path
    from convit_kernels.separable import positional_axis_probs

    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-15)):  # the tables the fused path computes in C++
        w = 3 * torch.randn(4, 3, dtype=dtype)
        for got, want in zip(torch.ops.convit_kernels_ext.positional_tables(w, 5, 7), positional_axis_probs(w, 5, 7)):
            assert got.dtype == dtype and got.shape == want.shape and max_error(got, want) <= tol
    monkeypatch.setenv("CONVIT_KERNELS_NO_FUSED_MIX", "1")
    assert _fused_cpu_mix(14, 14, x, x) is None
    for dtype in (torch.float64, torch.float32):
        assert_matches_reference(
            make_inputs(2, 3, 50, 16, dtype=dtype), rtol_fp32=_rtol(dtype), backend="sdpa", grid_size=(5, 10)
        )


def test_fused_mix_rejects_bad_arguments(fused_mix):
    content, v, w, b, lam, grad_out = _mix_args(1, 2, (3, 4), 8, torch.float32, "qkv")
    px, py = torch.rand(2, 4, 4), torch.rand(2, 3, 3)
    ops = torch.ops.convit_kernels_ext
    ops.positional_mix_fwd(content, v, px, py, torch.rand(2))
    with pytest.raises(RuntimeError, match="one_minus_g"):
        ops.positional_mix_fwd(content, v, px, py, torch.rand(3))
    with pytest.raises(RuntimeError, match="px"):
        ops.positional_mix_fwd(content, v, px.double(), py, torch.rand(2))
    with pytest.raises(RuntimeError, match="W x H_p"):
        ops.positional_mix_fwd(content, v, torch.rand(2, 3, 3), py, torch.rand(2))
    with pytest.raises(RuntimeError, match="content"):
        ops.positional_mix_fwd(content.double(), v, px, py, torch.rand(2))
    with pytest.raises(RuntimeError, match="grad_out"):
        ops.positional_mix_bwd(grad_out[:, :, :6], content, v, px, py, torch.rand(2))
