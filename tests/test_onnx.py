"""ONNX export: a patched ConViT and a bare FusedGPSA export with torch.onnx.export as standard ops
(sdpa_gpsa_decomposed), and onnxruntime's output is PyTorch's within float32 tolerance."""

import io

import onnx
import onnxruntime
import pytest
import timm
import torch

from convit_kernels import FusedGPSA, gpsa_attention, patch_convit
from convit_kernels.backends.sdpa import sdpa_gpsa_decomposed

# The exporters' notes on their passes and opset choices, and the TorchScript one's on the shape checks
# it traces as constants (it exports one input shape): not failures.
pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning"
)


def _onnx_output(module: torch.nn.Module, x: torch.Tensor, dynamo: bool = True):
    """(the exported ONNX model, its output on x in onnxruntime), exported by the dynamo or the TorchScript exporter."""
    if dynamo:
        proto = torch.onnx.export(module, (x,), dynamo=True, verbose=False).model_proto
    else:
        buffer = io.BytesIO()
        torch.onnx.export(module, (x,), buffer, dynamo=False)
        proto = onnx.load_from_string(buffer.getvalue())
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return proto, torch.from_numpy(out)


def _op_domains(proto) -> set[str]:
    """The domain of every node of the model and of the functions it calls: '' (or 'ai.onnx') for standard ops."""
    nodes = list(proto.graph.node) + [node for function in proto.functions for node in function.node]
    return {node.domain for node in nodes}


@pytest.mark.slow
def test_patched_rectangular_convit_exports_to_onnx_and_matches_pytorch():
    torch.manual_seed(0)
    # A GPSA block and an MHSA one on a 3 x 5 patch grid (which stock timm's GPSA cannot run): seconds to export.
    model = timm.create_model("convit_tiny", img_size=(48, 80), depth=2, local_up_to_layer=1, num_classes=10)
    model = patch_convit(model).eval()
    x = torch.randn(2, 3, 48, 80)
    proto, out = _onnx_output(model, x)
    assert _op_domains(proto) <= {"", "ai.onnx"}
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_fused_gpsa_layer_exports_to_onnx_and_matches_pytorch(dynamo):
    torch.manual_seed(0)
    layer = FusedGPSA(32, num_heads=2, qkv_bias=True).eval()
    with torch.no_grad():
        layer.gating_param.uniform_(-2, 2)  # both branches weigh in, differently per head
    x = torch.randn(2, 16, 32)
    proto, out = _onnx_output(layer, x, dynamo)
    assert _op_domains(proto) <= {"", "ai.onnx"}
    with torch.no_grad():
        want = layer(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grid", [(3, 5), (1, 40)], ids=["whole tables", "tables by blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decomposition_matches_the_op_forward_and_backward(dtype, grid):
    torch.manual_seed(0)
    B, H, d = 2, 3, 8
    q, k, v = torch.randn(3, B, H, grid[0] * grid[1], d).to(dtype).unbind(0)
    pos_weight, gating_param = torch.randn(H, 3), torch.randn(H)
    inputs = [t.requires_grad_() for t in (q, k, v, pos_weight, gating_param)]
    pos_bias = torch.randn(H)

    def loss_and_grads(out):
        return out, torch.autograd.grad(out.float().square().sum(), inputs)

    got, got_grads = loss_and_grads(sdpa_gpsa_decomposed(q, k, v, pos_weight, gating_param, grid, d**-0.5))
    want, want_grads = loss_and_grads(
        gpsa_attention(q, k, v, pos_weight, pos_bias, gating_param, grid_size=grid, backend="reference")
    )
    assert got.dtype == dtype
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(got, want, **tolerance)
    for g, w in zip(got_grads, want_grads):
        # relative to each gradient's size: pos_weight's on the strip sums offsets up to 39^2 (|grad| ~ 50)
        scale = max(1.0, w.abs().max().item())
        torch.testing.assert_close(g, w, rtol=tolerance["rtol"], atol=tolerance["atol"] * scale)


def test_only_an_onnx_export_runs_the_decomposition():
    """Eager calls and torch.export keep the fused op; the decomposition is for the ONNX exporter alone."""
    assert not torch.onnx.is_in_onnx_export()
    layer = FusedGPSA(32, num_heads=2).eval()
    exported = torch.export.export(layer, (torch.randn(1, 16, 32),))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert any(target.startswith("convit_kernels.") for target in targets), targets
