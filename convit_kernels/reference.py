"""The GPSA math in plain PyTorch: the executable form of shared/design/gpsa.md.

Two forms live here:

* :func:`gpsa_reference` is timm's ``GPSA.get_attention`` + ``attn @ v``, op for op,
  differentiable in every input through autograd. Every backend is tested
  against it.
* :func:`gpsa_forward_torch` / :func:`gpsa_backward_torch` are the forward /
  backward pair of the project's op written with tensor ops, with the
  backward derived by hand (design page, "Backward"). They keep exactly the
  state the fused kernels keep, so they are the specification of that
  interface and the op's implementation on devices no kernel serves.

Op interface shared by every backend (``torch``, ``triton``, ``cpu``, ``cuda``)::

    forward(q, k, v, pos_weight, gating_param, grid_w, scale)
        q, k, v:       B x H x N x d, same dtype, any strides
        pos_weight:    H x 3, gating_param: H (any float dtype)
        returns out:   B x N x H x d contiguous, dtype of q
                lse:   B x H x N float32 (float64 for float64 input),
                       log-sum-exp of the content logits scale * q k^T
    backward(grad_out, q, k, v, pos_weight, gating_param, lse, grid_w, scale)
        grad_out:      B x N x H x d, any strides
        returns dq, dk, dv (B x N x H x d contiguous, dtype of q),
                d_pos_weight (H x 3), d_gating_param (H) in their own dtypes

The forward keeps only lse (O(B H N)) for the backward. The fused CPU and
Triton forwards mix the normalised content softmax with P before a single
product with v (the CUDA one accumulates O_c and O_p and mixes them at the end).
The backward needs the row dot products ``delta_c = dO.O_c`` and
``delta_p = dO.O_p``; it takes them as ``delta_c = sum_j A_ij T_ij`` and
``delta_p = sum_j P_ij T_ij`` over the recomputed attention and ``T = dO v^T``.
Rounded consistently with the T they are subtracted from, as in softmax's own
backward, they keep d pos_weight accurate for peaked positional heads and
bf16 outputs, and they need no division by g or 1 - g (O_c cannot be
recovered stably from O where g is near 1).
Then ``dlambda = g (1 - g) sum_i (delta_p - delta_c)``.
Every backend takes ``1 - g`` as ``sigmoid(-lambda)``, not ``1 - sigmoid(lambda)``:
at lambda = 20 the latter is 0 in float32 and the content branch's gradients vanish.
"""

from __future__ import annotations

import torch

__all__ = [
    "relative_positions",
    "positional_axis_probs",
    "positional_probs",
    "gpsa_attention_probs",
    "gpsa_reference",
    "gpsa_forward_torch",
    "gpsa_backward_torch",
    "compute_dtype",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of every backend: float64 stays float64, all else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _axis_offsets(size: int, device, dtype) -> torch.Tensor:
    """offsets[i, j] = j - i on one axis of the patch grid."""
    idx = torch.arange(size, device=device, dtype=dtype)
    return idx.view(1, -1) - idx.view(-1, 1)


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


def positional_axis_probs(pos_weight: torch.Tensor, grid_h: int, grid_w: int):
    """The positional softmax as two per-axis tables: P[h, i, j] = px[h, x_i, x_j] * py[h, y_i, y_j].

    The logits w0 dx + w1 dy + w2 (dx^2 + dy^2) split into a term in dx and a
    term in dy, so their softmax over the keys of a row is the product of a
    softmax over key columns (px, H x W x W) and one over key rows (py,
    H x H_p x H_p): O(H (W^2 + H_p^2)) work, no N x N tensor. Each table is a
    real softmax (max-subtracted, normalised over the same rounded logits), so
    P keeps the accuracy of ``softmax`` even for peaked, large-weight heads;
    ``exp(logit - lse)`` with an independently computed lse does not. The bias
    is left out: it cancels in the softmax. Returned in the accumulation dtype.
    """
    w = pos_weight.to(compute_dtype(pos_weight.dtype))
    ox = _axis_offsets(grid_w, w.device, w.dtype)  # [x_i, x_j] = x_j - x_i
    oy = _axis_offsets(grid_h, w.device, w.dtype)
    px = (w[:, 0, None, None] * ox + w[:, 2, None, None] * ox * ox).softmax(-1)
    py = (w[:, 1, None, None] * oy + w[:, 2, None, None] * oy * oy).softmax(-1)
    return px, py


def positional_probs(pos_weight: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """H x N x N positional attention P = softmax_rows(w . r_ij), in the accumulation dtype."""
    px, py = positional_axis_probs(pos_weight, grid_h, grid_w)
    H = px.shape[0]
    # P[h, (yi, xi), (yj, xj)] = py[h, yi, yj] * px[h, xi, xj]
    P = py[:, :, None, :, None] * px[:, None, :, None, :]
    return P.reshape(H, grid_h * grid_w, grid_h * grid_w)


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


def _to_bhnd(t: torch.Tensor) -> torch.Tensor:
    """B x N x H x d (op layout) -> B x H x N x d view."""
    return t.transpose(1, 2)


def _gates(gating_param: torch.Tensor, acc: torch.dtype):
    """(g, 1 - g) as 1 x H x 1 x 1, with 1 - g = sigmoid(-lambda): exact where g rounds to 1."""
    lam = gating_param.to(acc).view(1, -1, 1, 1)
    return torch.sigmoid(lam), torch.sigmoid(-lam)


def gpsa_forward_torch(q, k, v, pos_weight, gating_param, grid_w: int, scale: float):
    """The op's forward with tensor ops; see the module docstring for the interface."""
    acc = compute_dtype(q.dtype)
    N = q.shape[2]
    grid_h = N // grid_w
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    logits = (qf @ kf.transpose(-2, -1)) * scale
    lse = logits.logsumexp(-1)
    g, one_minus_g = _gates(gating_param, acc)
    mixed = one_minus_g * (logits - lse[..., None]).exp() + g * positional_probs(pos_weight, grid_h, grid_w).to(acc)
    out = mixed @ vf
    return out.transpose(1, 2).to(q.dtype).contiguous(), lse


def gpsa_backward_torch(grad_out, q, k, v, pos_weight, gating_param, lse, grid_w: int, scale: float):
    """The op's backward with tensor ops, following the design page's derivation."""
    acc = compute_dtype(q.dtype)
    N = q.shape[2]
    grid_h = N // grid_w
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    dout = _to_bhnd(grad_out).to(acc)
    g, one_minus_g = _gates(gating_param, acc)

    attn_c = ((qf @ kf.transpose(-2, -1)) * scale - lse[..., None]).exp()
    attn_p = positional_probs(pos_weight, grid_h, grid_w).to(acc)
    t = dout @ vf.transpose(-2, -1)  # shared by both branches
    delta_c = (attn_c * t).sum(-1, keepdim=True)
    delta_p = (attn_p * t).sum(-1, keepdim=True)

    ds_c = one_minus_g * attn_c * (t - delta_c)
    dq = scale * (ds_c @ kf)
    dk = scale * (ds_c.transpose(-2, -1) @ qf)
    dv = (one_minus_g * attn_c + g * attn_p).transpose(-2, -1) @ dout

    ds_p = (g * attn_p * (t - delta_p)).sum(0)  # H x N x N, summed over the batch
    rel = relative_positions(grid_h, grid_w, device=q.device, dtype=acc)
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
