"""GPSA in standard torch ops alone: ``(1 - g) SDPA(q, k, v) + g P v``, the mix as separable.py's contractions.

No custom op anywhere: :func:`sdpa_gpsa_exported` is the ``onnx_export`` of every backend of the package
(ONNX has no custom ops), and the "sdpa" backend's positional mix takes :func:`mix_positional` where its
fused C++ pass does not serve.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..separable import PositionalAxes, apply_positional, bhnd, compute_dtype, head_major, positional_axes
from . import gates

__all__ = ["content_attention", "mix_positional", "sdpa_gpsa_decomposed", "sdpa_gpsa_exported"]


def content_attention(q, k, v, scale: float) -> torch.Tensor:
    """softmax(scale q k^T) v by SDPA; an empty input by plain matmuls (torch 2.11's CPU SDPA with zero heads
    divides by zero: SIGFPE, the process dies)."""
    if q.numel() == 0:
        return torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def mix_positional(content: torch.Tensor, v: torch.Tensor, gated: PositionalAxes, one_minus_g: torch.Tensor, out=None):
    """(1 - g) content + g P v by separable.py's torch contractions, B x H x N x d; into ``out`` if given."""
    positional = bhnd(apply_positional(gated, head_major(v, gated.y.size, gated.y.w_linear.dtype)))  # g P v
    return torch.addcmul(positional, content, one_minus_g, out=out)


def sdpa_gpsa_decomposed(q, k, v, pos_weight, gating_param, grid_size: tuple[int, int], scale: float) -> torch.Tensor:
    """GPSA in standard ops alone, no custom op: ``(1 - g) SDPA(q, k, v) + g P v``, B x H x N x d in v's dtype.

    The "sdpa" backend's math with the mix as torch ops that autograd differentiates. pos_bias cancels.
    """
    content = content_attention(q, k, v, scale)
    g, one_minus_g = gates(gating_param, compute_dtype(v.dtype))
    return mix_positional(content, v, positional_axes(pos_weight, *grid_size, g), one_minus_g).to(v.dtype)


def sdpa_gpsa_exported(q, k, v, pos_weight, pos_bias, gating_param, grid_size, scale) -> torch.Tensor:
    """:func:`sdpa_gpsa_decomposed` with the arguments of a composite backend's ``attention`` (B x H x N x d)."""
    return sdpa_gpsa_decomposed(q, k, v, pos_weight, gating_param, grid_size, scale)
