"""The plain-tensor backends: "torch", the op pair in tensor ops, and "reference", timm's math.

"torch" keeps the op-pair contract (:mod:`convit_kernels.backends`) with dense N x N tiles: it
is the contract's executable specification and the op where no kernel serves; its backward
recomputes both softmaxes from q and k and reads no state, so autograd can differentiate it: it is
the ``double_backward`` of every op pair here, and :func:`torch_attention`, its forward as a
composite, what they run under torch.func transforms. It normalises each content row from its exact
maximum, never as ``exp(s - lse)`` (docs/design.md, "Saturated rows"). "reference" is
:func:`convit_kernels.reference.gpsa_reference` through autograd.
"""

from __future__ import annotations

import torch

from ..reference import gpsa_reference, relative_positions
from ..separable import compute_dtype, dense_positional_probs, positional_axis_probs
from . import FLOAT_DTYPES, Backend, gates, register_backend
from .decomposed import sdpa_gpsa_exported

__all__ = ["gpsa_forward_torch", "gpsa_backward_torch", "torch_attention"]


def _positional(pos_weight: torch.Tensor, N: int, grid_w: int, acc: torch.dtype) -> torch.Tensor:
    return dense_positional_probs(positional_axis_probs(pos_weight, N // grid_w, grid_w, acc))


def gpsa_forward_torch(q, k, v, pos_weight, gating_param, grid_w: int, scale: float, precision: str = "highest"):
    """The op pair's forward with tensor ops; state: [stats], each content row's maximum and sum (B x H x N x 2)."""
    acc = compute_dtype(q.dtype)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    logits = (qf @ kf.transpose(-2, -1)) * scale
    # A constant to autograd (torch.func transforms differentiate this forward): the softmax does not depend on it.
    row_max = logits.amax(-1, keepdim=True).detach()
    unnormalised = (logits - row_max).exp()
    row_sum = unnormalised.sum(-1, keepdim=True)
    g, one_minus_g = gates(gating_param, acc)
    mixed = one_minus_g * (unnormalised / row_sum) + g * _positional(pos_weight, q.shape[2], grid_w, acc)
    out = mixed @ vf
    return out.transpose(1, 2).to(q.dtype).contiguous(), [torch.cat([row_max, row_sum], -1)]


def gpsa_backward_torch(
    grad_out, q, k, v, pos_weight, gating_param, state, grid_w: int, scale: float, precision: str = "highest"
):
    """The op pair's backward with tensor ops, following docs/design.md's derivation; reads no state."""
    acc = compute_dtype(q.dtype)
    N = q.shape[2]
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    dout = grad_out.transpose(1, 2).to(acc)
    g, one_minus_g = gates(gating_param, acc)

    attn_c = ((qf @ kf.transpose(-2, -1)) * scale).softmax(-1)  # from the row itself: see the module docstring
    attn_p = _positional(pos_weight, N, grid_w, acc)
    t = dout @ vf.transpose(-2, -1)  # shared by both branches
    delta_c = (attn_c * t).sum(-1, keepdim=True)
    delta_p = (attn_p * t).sum(-1, keepdim=True)

    ds_c = one_minus_g * attn_c * (t - delta_c)
    dq = scale * (ds_c @ kf)
    dk = scale * (ds_c.transpose(-2, -1) @ qf)
    dv = (one_minus_g * attn_c + g * attn_p).transpose(-2, -1) @ dout

    ds_p = (g * attn_p * (t - delta_p)).sum(0)  # H x N x N, summed over the batch
    rel = relative_positions(N // grid_w, grid_w, device=q.device, dtype=acc)
    d_pos_weight = torch.einsum("hij,ijc->hc", ds_p, rel)
    d_gating = (g * one_minus_g).view(-1) * (delta_p - delta_c).sum(dim=(0, 2, 3))

    def op_layout(t):
        return t.transpose(1, 2).to(q.dtype).contiguous()

    return (
        op_layout(dq),
        op_layout(dk),
        op_layout(dv),
        d_pos_weight.to(pos_weight.dtype),
        d_gating.to(gating_param.dtype),
    )


def torch_attention(q, k, v, pos_weight, pos_bias, gating_param, grid_size, scale) -> torch.Tensor:
    """The op pair's forward as a composite of tensor ops (B x H x N x d): what torch.func transforms see through."""
    out, _ = gpsa_forward_torch(q, k, v, pos_weight, gating_param, grid_size[1], scale, "highest")
    return out.transpose(1, 2)


register_backend(
    Backend(
        "torch",
        "the op pair in plain tensor ops (dense N x N tiles; the op interface's specification)",
        devices=None,
        dtypes=FLOAT_DTYPES,
        forward=gpsa_forward_torch,
        backward=gpsa_backward_torch,
        double_backward=gpsa_backward_torch,
        functorch=torch_attention,
        onnx_export=sdpa_gpsa_exported,
    )
)
register_backend(
    Backend(
        "reference",
        "timm's math through autograd (B x H x N x N tensors; the specification every backend is tested against)",
        devices=None,
        dtypes=FLOAT_DTYPES,
        attention=gpsa_reference,
        large_logits="the yardstick: timm's math in fp32 (one softmax per row)",
        functorch=gpsa_reference,
        onnx_export=sdpa_gpsa_exported,
    )
)
