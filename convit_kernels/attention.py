"""The public function, :func:`gpsa_attention`: validates its arguments in one place, then runs the GPSA op.

Which backend runs is :mod:`convit_kernels.dispatch`'s choice; the GPSA op pair, its fakes and autograd
registration are :mod:`convit_kernels.gpsa_op`; the backends keep the contract of
:mod:`convit_kernels.backends`. docs/design.md has the math and the layers.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from . import gpsa_op
from .backends import FLOAT_DTYPES
from .dtypes import dtype_name

__all__ = ["validate_inputs", "square_grid_side", "gpsa_attention"]


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {dtype_name(t.dtype)}, device {t.device}"


def square_grid_side(num_patches: int) -> int:
    """The side of a square grid of ``num_patches`` patches; ValueError when there is none.

    Not ``math.isqrt``: TorchScript cannot compile it and torch.compile cannot trace it on a
    symbolic N. The float root of a perfect square below 2**52 is exact, and any other N fails
    ``side * side == N`` whatever the rounding.
    """
    side = int(num_patches**0.5)
    if side * side != num_patches:
        raise ValueError(
            f"N = {num_patches} patches is not a perfect square: give grid_size=(rows, cols) with rows * cols = N"
        )
    return side


def validate_inputs(q, k, v, pos_weight, pos_bias, gating_param, grid_size=None, scale=None) -> tuple[int, int]:
    """Validate the arguments of :func:`gpsa_attention`; return the patch grid (rows, cols).

    Raises TypeError for a non-tensor or non-floating argument or mismatched
    q/k/v dtypes, ValueError for a wrong shape, a grid that does not match N,
    tensors on different devices, or a scale that is not a finite positive number.
    """
    named = {"q": q, "k": k, "v": v, "pos_weight": pos_weight, "pos_bias": pos_bias, "gating_param": gating_param}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {_describe(t)}"
            )
    if q.dim() != 4 or q.shape[2] == 0 or q.shape[3] == 0:
        raise ValueError(f"q must have shape (B, H, N, d) with N >= 1 patches and d >= 1, got {_describe(q)}")
    B, H, N, d = q.shape
    for name in ("k", "v"):
        if named[name].shape != q.shape:
            raise ValueError(
                f"{name} must have the shape of q, (B, H, N, d) = {tuple(q.shape)}, got {_describe(named[name])}"
            )
    for name in ("k", "v"):
        if named[name].dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {_describe(named[name])}")
    expected = {"pos_weight": (H, 3), "pos_bias": (H,), "gating_param": (H,)}
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (H = {H} heads), got {_describe(named[name])}")
    for name, t in named.items():
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {_describe(t)}")
    if scale is not None and not gpsa_op.is_finite_positive(scale):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    if grid_size is None:
        side = square_grid_side(N)
        return side, side
    if not isinstance(grid_size, Sequence) or len(grid_size) != 2 or not all(map(_is_positive_int, grid_size)):
        raise ValueError(f"grid_size must be a pair of positive ints (rows, cols), got {grid_size!r}")
    grid_h, grid_w = int(grid_size[0]), int(grid_size[1])  # int before the product: numpy's uint8 would wrap
    if grid_h * grid_w != N:
        raise ValueError(f"grid_size {(grid_h, grid_w)} has {grid_h * grid_w} patches, but N = {N}")
    return grid_h, grid_w


def _is_positive_int(x) -> bool:
    """An int > 0 of any integer type (numpy's included); not a bool, which would count as a side of 1."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x > 0


@torch.compiler.assume_constant_result
def _has_autocast(device_type: str) -> bool:
    """Whether autocast exists for a device type: a constant of the device type, which torch 2.11's Dynamo
    cannot trace (torch._C._is_autocast_available is marked skipped there)."""
    return torch.amp.is_autocast_available(device_type)


def _autocast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q, k, v in the autocast dtype where autocast is on for their device, else as they are.

    timm's GPSA (and the reference) multiply them under autocast, which casts float16, bfloat16
    and float32 (never float64) to its dtype: casting here makes every backend return that dtype.
    """
    device_type = q.device.type
    if q.dtype == torch.float64 or not _has_autocast(device_type):
        return q, k, v
    if not torch.is_autocast_enabled(device_type):
        return q, k, v
    dtype = torch.get_autocast_dtype(device_type)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def gpsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos_weight: torch.Tensor,
    pos_bias: torch.Tensor,
    gating_param: torch.Tensor,
    *,
    grid_size: tuple[int, int] | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Gated positional self-attention, ConViT's GPSA without the projections.

    Args:
        q, k, v: B x H x N x d, one floating dtype, any strides.
        pos_weight: H x 3 (``pos_proj.weight``), pos_bias: H (``pos_proj.bias``),
            gating_param: H (the gate lambda, ``g = sigmoid(lambda)``).
        grid_size: (rows, cols) of the patch grid, row-major; default a square grid.
        scale: content logit scale, default ``d ** -0.5``.
        backend: "auto" or a name of :func:`convit_kernels.backends.backend_names`; see
            :func:`available_backends` and ``convit-kernels backends`` (docs/backends.md).

    Returns:
        B x H x N x d in q's dtype; under autocast (on q's device) float16, bfloat16
        and float32 inputs are cast to the autocast dtype first, as the matmuls of
        timm's GPSA cast them, so every backend returns timm's dtype there.
        The package's backends (timm's math aside) return a view of a
        B x N x H x d tensor, so ``out.transpose(1, 2).reshape(B, N, H * d)``
        makes no copy.

    Higher-order autograd: a backward with ``create_graph=True`` through an op-pair
    backend runs the backward it declares for that (``Backend.double_backward``,
    tensor ops autograd differentiates), so double backward works; a composite is
    differentiated through its own ops (PyTorch's SDPA kernels have no double
    backward). Under torch.func transforms (grad, vjp, jacrev, vmap) and ONNX
    export every backend runs what it declares for them (``Backend.functorch``,
    ``Backend.onnx_export``; docs/backends.md lists them). The package's paths for
    double backward and torch.func build N x N tensors.
    """
    grid = validate_inputs(q, k, v, pos_weight, pos_bias, gating_param, grid_size, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = _autocast(q, k, v)
    return gpsa_op.attention(q, k, v, pos_weight, pos_bias, gating_param, grid, scale, backend)
