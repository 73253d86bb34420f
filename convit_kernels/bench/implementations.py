"""Every implementation the bench times, in one registry, and its comparison with the reference before it is timed.

An :class:`Implementation` turns a :class:`~.workloads.Problem` into a
zero-argument callable returning the output, at either level: ``core``
(the attention given q, k, v: B x H x N x d) or ``module`` (the GPSA layer
given x: B x N x C). All of them share the Problem's tensors and Parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from ..attention import gpsa_attention
from ..backends import available_backends, get_backend
from ..convit_shapes import HEAD_DIM
from ..dispatch import not_supported_reasons
from ..module import FusedGPSA
from ..reference import gpsa_reference
from ..separable import dense_positional_probs, positional_axis_probs
from .workloads import Problem

Factory = Callable[[Problem], Callable[[], torch.Tensor]]


@dataclass(frozen=True)
class Implementation:
    """``compared_to_reference``: held to the accuracy rule against the reference before it is timed (False only
    for the attention floor, which computes plain attention, not GPSA)."""

    name: str
    description: str
    core: Factory
    module: Factory
    compared_to_reference: bool = True
    why_not: Callable[[torch.device], str | None] = lambda device: None  # why it cannot run on a device

    def build(self, problem: Problem) -> Callable[[], torch.Tensor]:
        return getattr(self, problem.workload.level)(problem)


def sdpa_dense_attention(q, k, v, pos_weight, pos_bias, gating_param, grid_size, scale):
    """(1 - g) SDPA(q, k, v) + g P v with a dense H x N x N P built once per call: what a user writes by hand."""
    lam = gating_param.view(1, -1, 1, 1)
    P = dense_positional_probs(positional_axis_probs(pos_weight, *grid_size)).to(v.dtype)
    content = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return torch.sigmoid(-lam).to(v.dtype) * content + torch.sigmoid(lam).to(v.dtype) * (P @ v)


def gpsa_layer_forward(layer, x, attention):
    """timm GPSA's forward with another attention core: projections, attention(q, k, v, w, b, lambda), proj."""
    B, N, C = x.shape
    H = layer.num_heads
    q, k = layer.qk(x).reshape(B, N, 2, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
    v = layer.v(x).reshape(B, N, H, C // H).transpose(1, 2)
    out = attention(q, k, v, layer.pos_proj.weight, layer.pos_proj.bias, layer.gating_param)
    return layer.proj_drop(layer.proj(out.transpose(1, 2).reshape(B, N, C)))


def _timm_core(p: Problem):
    return partial(gpsa_reference, *p.args, p.grid, p.scale)


def _timm_module(p: Problem):
    return partial(p.layer, *p.args)


def _sdpa_dense_core(p: Problem):
    return partial(sdpa_dense_attention, *p.args, p.grid, p.scale)


def _sdpa_dense_module(p: Problem):
    return partial(gpsa_layer_forward, p.layer, *p.args, partial(sdpa_dense_attention, grid_size=p.grid, scale=p.scale))


def plain_attention(q, k, v, pos_weight, pos_bias, gating_param, scale):
    """SDPA on the same q, k, v, ignoring the positional branch: the work GPSA cannot do without."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _floor_core(p: Problem):
    return partial(plain_attention, *p.args, scale=p.scale)


def _floor_module(p: Problem):
    return partial(gpsa_layer_forward, p.layer, *p.args, partial(plain_attention, scale=p.scale))


def _compiled_why_not(device: torch.device) -> str | None:
    # The process aborts (double free, heap corruption) in the fused softmax-backward C++ kernel Inductor writes
    # for timm's GPSA on torch 2.11 (2.14 runs it; 2.12 and 2.13 untested), like pytorch/pytorch#181618.
    if device.type == "cpu" and torch.__version__ < "2.14":
        return f"torch {torch.__version__}'s Inductor C++ backward of timm's GPSA corrupts the heap (2.14 runs it)"
    return None


def _compiled_core(p: Problem):
    torch._dynamo.reset()  # one workload's graphs at a time: no recompile limit, no stale guards
    return partial(torch.compile(gpsa_reference, dynamic=False), *p.args, p.grid, p.scale)


def _compiled_module(p: Problem):
    torch._dynamo.reset()
    return partial(torch.compile(p.layer, dynamic=False), *p.args)


def fused(backend: str) -> Implementation:
    def core(p: Problem):
        return partial(gpsa_attention, *p.args, grid_size=p.grid, scale=p.scale, backend=backend)

    def module(p: Problem):
        return partial(FusedGPSA.from_gpsa(p.layer, grid_size=p.grid, backend=backend), *p.args)

    return Implementation(
        f"fused-{backend}", f"convit_kernels backend {backend!r} (FusedGPSA at module level)", core, module
    )


# The reference is timm's math: gpsa_reference (op for op timm's get_attention + attn @ v) at the core
# level, timm's GPSA itself at the module level. Speed-ups are reported against every GPSA baseline, and
# every time as a ratio to the attention floor (plain SDPA on the same q, k, v).
REFERENCE = "timm"
FLOOR = "attention-floor"
BASELINES = {
    impl.name: impl
    for impl in (
        Implementation("timm", "timm's GPSA math, eager (the reference)", _timm_core, _timm_module),
        Implementation(
            "sdpa-dense", "(1-g) SDPA(q,k,v) + g P v, dense P built once per call", _sdpa_dense_core, _sdpa_dense_module
        ),
        Implementation(
            "timm-compiled", "torch.compile of timm's GPSA", _compiled_core, _compiled_module, why_not=_compiled_why_not
        ),
        Implementation(
            FLOOR,
            "plain SDPA(q,k,v), no positional branch (not GPSA: the floor)",
            _floor_core,
            _floor_module,
            compared_to_reference=False,
        ),
    )
}


def fused_backends(device_type: str) -> dict[str, str]:
    """Fused backend name -> None when it can be timed on this device type, else why not."""
    result = {}
    for name, status in available_backends().items():
        if name == "reference":
            continue
        if not status.available:
            result[name] = status.reason
        elif get_backend(name).interpreted:
            result[name] = "runs under the Triton interpreter here, which is never timed"
        else:
            result[name] = None
    return result


def implementations(device_type: str, dtype: torch.dtype) -> dict[str, Implementation]:
    """name -> Implementation of everything that can be timed on this device type and dtype."""
    impls = {}
    for name, problem in fused_backends(device_type).items():
        if problem is None and not not_supported_reasons(name, torch.device(device_type), dtype, HEAD_DIM):
            impls[f"fused-{name}"] = fused(name)
    return {**impls, **BASELINES}


# ---------------------------------------------------------------- comparison with the reference


def evaluate(fn: Callable[[], torch.Tensor], problem: Problem, backward: bool) -> list[torch.Tensor]:
    """[output, grads of problem.leaves for problem.grad_out (when backward)] as float64 tensors."""
    out = fn()
    results = [out]
    if backward:
        grads = torch.autograd.grad(out, problem.leaves, problem.grad_out, allow_unused=True)
        results += [torch.zeros_like(t) if g is None else g for t, g in zip(problem.leaves, grads)]
    return [t.detach().double() for t in results]
