"""timm's GPSA math in plain PyTorch, op for op: the specification every backend is tested against.

:func:`gpsa_reference` is timm's ``GPSA.get_attention`` followed by ``attn @ v``,
differentiable in every input through autograd. It materialises several
B x H x N x N tensors; docs/design.md is the same math written out, with the
backward and the separable positional branch the fused backends use.
"""

from __future__ import annotations

import torch

__all__ = ["relative_positions", "gpsa_attention_probs", "gpsa_reference"]


def relative_positions(grid_h: int, grid_w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """N x N x 3 tensor r[i, j] = (dx, dy, dx^2 + dy^2) for patches in row-major order.

    Patch n sits at row n // grid_w and column n % grid_w; dx = x_j - x_i and
    dy = y_j - y_i, the channel order of timm's ``rel_indices``. Built in
    float32 or float64 (integers up to 2 * 2^24 are exact) and cast at the end,
    so a bfloat16 table is the rounding of the exact one.
    """
    build = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.arange(grid_w, device=device, dtype=build).repeat(grid_h)
    y = torch.arange(grid_h, device=device, dtype=build).repeat_interleave(grid_w)
    dx = x.view(1, -1) - x.view(-1, 1)
    dy = y.view(1, -1) - y.view(-1, 1)
    return torch.stack((dx, dy, dx * dx + dy * dy), dim=-1).to(dtype)


def gpsa_attention_probs(q, k, pos_weight, pos_bias, gating_param, grid_size, scale, rel_indices=None):
    """B x H x N x N mixed attention, as timm's ``GPSA.get_attention`` computes it.

    ``rel_indices`` (1 x N x N x 3, timm's cached table) is built when not given.
    """
    B = q.shape[0]
    if rel_indices is None:
        rel_indices = relative_positions(*grid_size, device=q.device, dtype=pos_weight.dtype)[None]
    pos_score = rel_indices.expand(B, -1, -1, -1)
    pos_score = torch.nn.functional.linear(pos_score, pos_weight, pos_bias).permute(0, 3, 1, 2)
    patch_score = (q @ k.transpose(-2, -1)) * scale
    patch_score = patch_score.softmax(dim=-1)
    pos_score = pos_score.softmax(dim=-1)
    gating = gating_param.view(1, -1, 1, 1)
    attn = (1.0 - torch.sigmoid(gating)) * patch_score + torch.sigmoid(gating) * pos_score
    attn = attn / attn.sum(dim=-1).unsqueeze(-1)
    return attn


def gpsa_reference(q, k, v, pos_weight, pos_bias, gating_param, grid_size, scale, attn_drop=None):
    """B x H x N x d GPSA output, timm's math op for op; ``attn_drop`` is an optional dropout module."""
    attn = gpsa_attention_probs(q, k, pos_weight, pos_bias, gating_param, grid_size, scale)
    if attn_drop is not None:
        attn = attn_drop(attn)
    # A cast only where the parameters' dtype differs from v's (AMP without autocast):
    # under autocast matmul casts the same way, and with one dtype it is a no-op.
    return attn.to(v.dtype) @ v
