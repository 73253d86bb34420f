"""dq and dk at large content logits: rows with two near-tied top logits, and a backend's error on them.

The workload of benchmarks/saturated_precision.py's table and of the tests that hold every op-pair
backend within 2x the fp32 eager math's error there (tests/test_saturated.py).
"""

from __future__ import annotations

import torch

from ..attention import gpsa_attention

__all__ = ["NEAR_TIED_LOGITS", "near_tied_inputs", "dq_dk_relative_errors"]

# Logit sizes of the near-tied rows (near_tied_inputs): every fp32 backend but sdpa within 2x eager up to 3e6.
NEAR_TIED_LOGITS = (100.0, 1e4, 1e6, 3e6)


def _local_pos_weight(num_heads: int) -> torch.Tensor:
    """pos_weight as the paper's local init sets it (locality strength 1): head h attends around its own offset."""
    kernel = max(1, int(num_heads**0.5))
    center = (kernel - 1) / 2 if kernel % 2 == 0 else kernel // 2
    w = torch.zeros(num_heads, 3, dtype=torch.float64)
    w[:, 2] = -1
    for h in range(num_heads):
        w[h, 0] = 2 * (h // kernel % kernel - center)
        w[h, 1] = 2 * (h % kernel - center)
    return w


def _values_and_positional_parameters(B, H, N, d, dtype, seed) -> list[torch.Tensor]:
    """v (a B x H x N x d view of a B x N x 3 x H x d projection output), pos_weight, pos_bias, gating_param."""
    g = torch.Generator().manual_seed(seed)
    projection = torch.randn(B, N, 3, H, d, generator=g, dtype=torch.float64).to(dtype)
    v = projection.permute(2, 0, 3, 1, 4)[2]
    pos_weight = _local_pos_weight(H) + 0.1 * torch.randn(H, 3, generator=g, dtype=torch.float64)
    pos_bias = torch.randn(H, generator=g, dtype=torch.float64)
    gating = torch.randn(H, generator=g, dtype=torch.float64)
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype  # as under AMP
    return [v] + [t.to(param_dtype) for t in (pos_weight, pos_bias, gating)]


def near_tied_inputs(logit: float, dtype=torch.float32, B=2, H=2, grid=(4, 4), d=32, seed=0):
    """(inputs, options): content rows with two near-tied top logits of size ``logit``.

    Row i's logits: ``logit`` and ``logit - U(0, 1)`` on two random keys, ``logit - U(2, 12)`` on
    the others. They are exact in float32: k_j is the unit vector e_j in channels < N (random in
    the others, where q is 0) and scale is 1/4, so q k^T rounds nowhere and the fp32 eager math's
    error is its softmax's alone. A backend that rounds the row maximum into a float32 lse (an ulp
    of ~1e-3 at 1e4) puts that error on every weight; one that keeps the maximum and the sum apart
    stays at the eager math's level. ``inputs`` are gpsa_attention's tensors, leaves requiring
    grad; ``options`` its grid_size and scale.
    """
    N, scale = grid[0] * grid[1], 0.25
    g = torch.Generator().manual_seed(seed)
    logits = logit - 2 - 10 * torch.rand(B, H, N, N, generator=g, dtype=torch.float64)
    top_two = torch.rand(B, H, N, N, generator=g).argsort(-1)[..., :2]
    gaps = torch.rand(B, H, N, 2, generator=g, dtype=torch.float64) * torch.tensor([0.0, 1.0], dtype=torch.float64)
    logits.scatter_(-1, top_two, logit - gaps)
    k = torch.randn(B, H, N, d, generator=g, dtype=torch.float64)
    k[..., :N] = torch.eye(N, dtype=torch.float64)
    q = torch.zeros(B, H, N, d, dtype=torch.float64)
    q[..., :N] = logits.to(dtype).double() / scale
    inputs = [q.to(dtype), k.to(dtype), *_values_and_positional_parameters(B, H, N, d, dtype, seed)]
    return [t.requires_grad_() for t in inputs], {"grid_size": grid, "scale": scale}


def _dq_dk(inputs: list[torch.Tensor], backend: str, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """dq and dk of a fixed random projection of gpsa_attention's output (every input's gradient computed)."""
    out = gpsa_attention(*inputs, backend=backend, **options)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((out * weight.to(out.device, out.dtype)).sum(), inputs, allow_unused=True)
    return grads[0], grads[1]


def dq_dk_relative_errors(inputs, backend: str, **options) -> tuple[float, float]:
    """Max errors of dq and dk against the float64 reference, each relative to its largest value."""
    exact = _dq_dk([t.detach().to(torch.float64).requires_grad_() for t in inputs], "reference", **options)
    got = _dq_dk(inputs, backend, **options)
    return tuple((have.double() - want).abs().max().item() / want.abs().max().item() for have, want in zip(got, exact))
