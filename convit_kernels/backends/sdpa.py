"""The "sdpa" backend: GPSA = (1 - g) SDPA(q, k, v) + g P v, exactly, on PyTorch's own attention kernels.

The content branch is ``F.scaled_dot_product_attention`` (the best kernel the device has,
differentiated by its own backward); the positional branch is separable (:mod:`convit_kernels.separable`).
One op pair, :data:`positional_mix_op` / :data:`positional_mix_backward_op` (registered as
``convit_kernels::positional_mix`` / ``positional_mix_bwd``), takes SDPA's output O_c and v and returns
``(1 - g) O_c + g P v``; it saves O_c and v, which SDPA keeps anyway, so the
backend stores nothing of size N x N beyond what PyTorch's chosen kernel does. Its passes over the
B x H x N x d tensors run as one fused C++ pass per direction for CPU tensors of one dtype where the
extension's CPU part is built (csrc/cpu/positional_mix_cpu.cpp: the extension's own ops
``convit_kernels_ext::positional_mix_fwd`` / ``positional_mix_bwd``, the backward of the same short
name as the package's in another namespace), else as separable.py's torch contractions
(CONVIT_KERNELS_NO_FUSED_MIX forces these). docs/design.md has the backward.
:func:`~convit_kernels.backends.decomposed.sdpa_gpsa_decomposed` is the same math in standard ops alone, for
the ONNX exporters.
"""

from __future__ import annotations

import functools

import torch

from .. import settings
from ..extension_loader import import_built
from ..op_registration import define_op_pair
from ..separable import (
    AxisTables,
    bhnd,
    compute_dtype,
    head_major,
    pos_weight_grad,
    positional_axes,
    positional_backward,
    whole_tables_fit,
)
from . import FLOAT_DTYPES, Backend, gates, register_backend
from .decomposed import content_attention, mix_positional, sdpa_gpsa_decomposed, sdpa_gpsa_exported
from .eager import torch_attention

__all__ = ["sdpa_gpsa", "sdpa_gpsa_decomposed", "sdpa_gpsa_exported", "positional_mix_op"]


def _bnhd_like(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty B x N x H x d tensor for a B x H x N x d ``x`` (the layout the output projection reads)."""
    B, H, N, d = x.shape
    return x.new_empty((B, N, H, d), dtype=dtype)


def _fused_cpu_mix(grid_h: int, grid_w: int, *tensors: torch.Tensor):
    """``torch.ops.convit_kernels_ext``, whose fused CPU mix ops take these tensors, or None.

    Only for CPU tensors of one dtype, on grids whose whole tables fit (the ops take them whole,
    and their backward keeps a B x H x (W^2 + H_p^2) partial), and only when the extension's CPU
    part is built for this torch (never built from here: that is the "cpu" backend's first use,
    load_cpu) and has the mix ops; CONVIT_KERNELS_NO_FUSED_MIX forces the torch path.
    """
    if settings.enabled("CONVIT_KERNELS_NO_FUSED_MIX") or not whole_tables_fit(grid_h, grid_w):
        return None
    if any(t.device.type != "cpu" or t.dtype != tensors[0].dtype for t in tensors):
        return None
    _import_cpu_part()
    ops = torch.ops.convit_kernels_ext
    return ops if hasattr(ops, "positional_mix_fwd") else None  # None: not built, or built before the mix ops


def _fused_tables(extension_ops, pos_weight: torch.Tensor, grid_h: int, grid_w: int, acc: torch.dtype) -> AxisTables:
    """The whole tables of :func:`positional_axis_probs` by their serial C++ twin (the same math, gpsa_common.h).

    On the CPU, torch's exp and softmax on these few hundred numbers call MKL's
    own thread pool: right after SDPA's parallel region its wake-up cost
    milliseconds per call on a busy 2-core machine, as much as the mix itself.
    """
    px, py = extension_ops.positional_tables(pos_weight, grid_h, grid_w)
    return AxisTables(px.to(acc), py.to(acc))


@functools.cache
def _import_cpu_part() -> None:
    """Import the extension's CPU part where it is built for this torch; nothing when it is not."""
    import_built("convit_kernels._C")


def _mix_forward(
    content: torch.Tensor,
    v: torch.Tensor,
    pos_weight: torch.Tensor,
    pos_bias: torch.Tensor,
    gating_param: torch.Tensor,
    grid_w: int,
) -> torch.Tensor:
    """(1 - g) content + g P v for B x H x N x d content and v; returns B x N x H x d in v's dtype."""
    acc, grid_h = compute_dtype(v.dtype), v.shape[2] // grid_w
    g, one_minus_g = gates(gating_param, acc)
    extension_ops = _fused_cpu_mix(grid_h, grid_w, content, v)
    if extension_ops is not None:  # one pass over v and content (csrc/cpu/positional_mix_cpu.cpp)
        px, py = _fused_tables(extension_ops, pos_weight, grid_h, grid_w, acc)
        return extension_ops.positional_mix_fwd(content, v, px, py * g.view(-1, 1, 1), one_minus_g.view(-1))
    out = _bnhd_like(v, v.dtype)
    mix_positional(content, v, positional_axes(pos_weight, grid_h, grid_w, g), one_minus_g, out=out.transpose(1, 2))
    return out


def _mix_forward_fake(content, v, pos_weight, pos_bias, gating_param, grid_w):
    return _bnhd_like(v, v.dtype)


def _mix_backward(
    grad_out: torch.Tensor,
    content: torch.Tensor,
    v: torch.Tensor,
    pos_weight: torch.Tensor,
    gating_param: torch.Tensor,
    grid_w: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d content, dv in B x N x H x d, d pos_weight, d gating_param) of :data:`positional_mix_op`."""
    acc = compute_dtype(v.dtype)
    H, grid_h = v.shape[1], v.shape[2] // grid_w
    g, one_minus_g = gates(gating_param, acc)
    g_h = g.view(H, 1, 1)
    extension_ops = _fused_cpu_mix(grid_h, grid_w, grad_out, content, v)
    if extension_ops is not None:  # one pass over dO, v and content (csrc/cpu/positional_mix_cpu.cpp)
        tables = _fused_tables(extension_ops, pos_weight, grid_h, grid_w, acc)
        d_content, dv, g_dpx, dpy, dout_dot_content = extension_ops.positional_mix_bwd(
            grad_out, content, v, tables.px, tables.py * g_h, one_minus_g.view(-1)
        )
        # sum dO . P v = sum over (y, Y) of py o dpy: dpy's contraction already holds every other sum
        dout_dot_positional = (tables.py * dpy).sum((1, 2))
        d_pos_weight = pos_weight_grad(tables, g_dpx, g_h * dpy)
    else:
        v_hm, dout_hm = head_major(v, grid_h, acc), head_major(grad_out, grid_h, acc)
        axes = positional_axes(pos_weight, grid_h, grid_w)
        pt_dout, dw, dout_dot_positional = positional_backward(axes, dout_hm, v_hm)
        d_pos_weight = g.view(H, 1) * dw
        dout_dot_content = torch.linalg.vecdot(grad_out.to(acc), content.to(acc)).sum((0, 2))
        d_content = _bnhd_like(content, content.dtype)
        torch.mul(grad_out, one_minus_g, out=d_content.transpose(1, 2))
        dv = _bnhd_like(v, v.dtype)
        torch.mul(bhnd(pt_dout), g, out=dv.transpose(1, 2))
    # d lambda = g (1 - g) sum dO . (P v - O_c) per head
    d_gating = (g * one_minus_g).view(H) * (dout_dot_positional - dout_dot_content)
    return d_content, dv, d_pos_weight.to(pos_weight.dtype), d_gating.to(gating_param.dtype)


def _mix_backward_fake(grad_out, content, v, pos_weight, gating_param, grid_w):
    return (
        _bnhd_like(content, content.dtype),
        _bnhd_like(v, v.dtype),
        torch.empty_like(pos_weight),
        torch.empty_like(gating_param),
    )


def _mix_setup_context(ctx, inputs, output):
    content, v, pos_weight, pos_bias, gating_param, grid_w = inputs
    ctx.save_for_backward(content, v, pos_weight, pos_bias, gating_param)
    ctx.grid_w = grid_w


def _mix_gradients(ctx, backward_op, grad_out):
    content, v, pos_weight, pos_bias, gating_param = ctx.saved_tensors
    d_content, dv, dw, dgate = backward_op(grad_out.transpose(1, 2), content, v, pos_weight, gating_param, ctx.grid_w)
    # The bias gradient is exactly zero (docs/design.md, "The positional bias").
    return d_content.transpose(1, 2), dv.transpose(1, 2), dw, torch.zeros_like(pos_bias), dgate, None


# Registered names are kept by saved and exported graphs; convit_kernels_ext::positional_mix_bwd, the extension's
# fused CPU pass that _mix_backward may call, shares the backward's short name.
positional_mix_op, positional_mix_backward_op = define_op_pair(
    "convit_kernels::positional_mix",
    "convit_kernels::positional_mix_bwd",
    _mix_forward,
    _mix_forward_fake,
    _mix_backward,
    _mix_backward_fake,
    _mix_setup_context,
    _mix_gradients,
)


def sdpa_gpsa(q, k, v, pos_weight, pos_bias, gating_param, grid_size: tuple[int, int], scale: float) -> torch.Tensor:
    """GPSA as SDPA's content attention mixed with the separable positional branch; B x H x N x d view."""
    content = content_attention(q, k, v, scale)
    return positional_mix_op(content, v, pos_weight, pos_bias, gating_param, grid_size[1]).transpose(1, 2)


register_backend(
    Backend(
        "sdpa",
        "(1 - g) F.scaled_dot_product_attention + g separable P v (PyTorch's attention kernels, any device)",
        devices=None,
        dtypes=FLOAT_DTYPES,
        attention=sdpa_gpsa,
        functorch=torch_attention,
        onnx_export=sdpa_gpsa_exported,
        large_logits="off by up to 5e-4 of their scale at L = 3e4, 4e-3 at 1e5, 2e-2 at 1e6, 0.13 at 3e6 (CPU, torch "
        "2.14): PyTorch's SDPA keeps one float32 log-sum-exp per row",
    )
)
