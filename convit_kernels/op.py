"""The GPSA op: input checks, the op pair every fused backend implements, and dispatch.

``gpsa_attention`` validates its arguments (:func:`check_inputs`), resolves the
backend (:mod:`convit_kernels.backends`) and runs it: a composite backend
(``sdpa``, ``reference``) as torch ops under autograd, an op-pair backend
through ``convit_kernels::gpsa_fwd`` / ``gpsa_bwd``. Autograd and fake (meta)
functions are registered once here, so ``torch.compile(fullgraph=True)`` traces
through any backend without a graph break. The op pair also takes
``backend="auto"`` and resolves it itself (:func:`op_pair_backend`): a scripted
``FusedGPSA`` calls ``torch.ops.convit_kernels.gpsa_fwd`` directly.

The op-pair interface (``torch``, ``triton``, ``cpu``, ``cuda``)::

    forward(q, k, v, pos_weight, gating_param, grid_w, scale)
        q, k, v:       B x H x N x d, same dtype, any strides
        pos_weight:    H x 3, gating_param: H (any float dtype)
        returns out:   B x N x H x d contiguous, dtype of q
                stats: B x H x N x 2 float32 (float64 for float64 input): per row of the
                       content logits s = scale * q k^T, [..., 0] max_j s_ij and
                       [..., 1] sum_j exp(s_ij - max), kept apart (not as an lse: an ulp
                       of a float32 lse at logits of 1e4 would be ~1e-3 on every weight)
    backward(grad_out, q, k, v, pos_weight, gating_param, stats, grid_w, scale)
        grad_out:      B x N x H x d, any strides, dtype of q
        returns dq, dk, dv (B x N x H x d contiguous, dtype of q),
                d_pos_weight (H x 3), d_gating_param (H) in their own dtypes

The op saves q, k, v and stats (O(B H N)) for the backward, nothing of size N x N. A backward
takes A = exp(s - max) / sum either from stats, recomputing s bit for bit as its forward made it
(cuda), or from the recomputed row itself (cpu's max only as the shift; torch reads no stats).
The backward needs the row dot products ``delta_c = dO.O_c`` and
``delta_p = dO.O_p``; backends take them as ``delta_c = sum_j A_ij T_ij`` and
``delta_p = sum_j P_ij T_ij`` over the recomputed attention and ``T = dO v^T``:
rounded consistently with the T they are subtracted from, as in softmax's own
backward, they keep d pos_weight accurate for peaked positional heads and
bf16 outputs, and need no division by g or 1 - g (O_c cannot be recovered
stably from O where g is near 1). Then ``dlambda = g (1 - g) sum_i (delta_p - delta_c)``.
Every backend takes ``1 - g`` as ``sigmoid(-lambda)``, not ``1 - sigmoid(lambda)``:
at lambda = 20 the latter is 0 in float32 and the content branch's gradients vanish.
d pos_bias is exactly zero (the bias cancels in the positional softmax); the op returns zeros.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import self_check
from .backends import FLOAT_DTYPES, Backend, BackendError, get_backend, resolve_backend
from .separable import compute_dtype

__all__ = [
    "check_inputs",
    "square_grid_side",
    "op_pair_backend",
    "gpsa_attention",
    "gates",
    "empty_forward_outputs",
    "empty_backward_outputs",
]


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {str(t.dtype).replace('torch.', '')}, device {t.device}"


def _is_finite_positive(x) -> bool:
    try:
        value = float(x)
    except (TypeError, ValueError):
        return False
    # Comparisons, not math.isfinite: torch.compile traces them on a symbolic float. NaN fails both.
    return 0 < value < math.inf


def square_grid_side(num_patches: int) -> int:
    """The side of a square grid of ``num_patches`` patches; ValueError when there is none.

    Not ``math.isqrt``: TorchScript cannot compile it and torch.compile cannot trace it on a
    symbolic N. The float root of a perfect square below 2**52 is exact, and any other N fails
    the check whatever the rounding.
    """
    side = int(num_patches**0.5)
    if side * side != num_patches:
        raise ValueError(
            f"N = {num_patches} patches is not a perfect square: give grid_size=(rows, cols) with rows * cols = N"
        )
    return side


def check_inputs(q, k, v, pos_weight, pos_bias, gating_param, grid_size=None, scale=None) -> tuple[int, int]:
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
    if scale is not None and not _is_finite_positive(scale):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    if grid_size is None:
        side = square_grid_side(N)
        return side, side
    if (
        not isinstance(grid_size, Sequence)
        or len(grid_size) != 2
        or not all(isinstance(s, int) and s > 0 for s in grid_size)
    ):
        raise ValueError(f"grid_size must be a pair of positive ints (rows, cols), got {grid_size!r}")
    if grid_size[0] * grid_size[1] != N:
        raise ValueError(f"grid_size {tuple(grid_size)} has {grid_size[0] * grid_size[1]} patches, but N = {N}")
    return int(grid_size[0]), int(grid_size[1])


# ---------------------------------------------------------------- torch.library registration


def op_pair_backend(backend: str, q: torch.Tensor) -> Backend:
    """The op-pair backend that runs the op pair for ``backend`` on inputs like ``q``.

    :func:`gpsa_attention` hands the op a resolved name. A scripted :class:`FusedGPSA` calls
    ``torch.ops.convit_kernels.gpsa_fwd`` itself with the module's backend, "auto" included, and
    only an op pair can run there: "auto" becomes auto's choice where that is an op pair, else
    "torch"; a composite backend named explicitly is an error.
    """
    name = resolve_backend(backend, q.device, q.dtype, q.shape[-1])
    impl = get_backend(name)
    if impl.forward is not None:
        return impl
    if backend == "auto":
        return get_backend("torch")
    raise BackendError(
        f"backend {backend!r} is a composite of torch ops, not an op pair: convit_kernels::gpsa_fwd "
        "(which a scripted FusedGPSA calls) runs 'auto', 'triton', 'cuda', 'cpu' or 'torch'"
    )


@torch.library.custom_op("convit_kernels::gpsa_fwd", mutates_args=())
def gpsa_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos_weight: torch.Tensor,
    pos_bias: torch.Tensor,
    gating_param: torch.Tensor,
    grid_w: int,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused GPSA forward; returns (out B x N x H x d, stats B x H x N x 2: the content rows' max and sum)."""
    if not _is_finite_positive(scale):  # a scripted FusedGPSA calls the op without check_inputs
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    return op_pair_backend(backend, q).forward(q, k, v, pos_weight, gating_param, grid_w, scale)


def _autocast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q, k, v in the autocast dtype where autocast is on for their device, else as they are.

    timm's GPSA (and the reference) multiply them under autocast, which casts float16, bfloat16
    and float32 (never float64) to its dtype: casting here makes every backend return that dtype.
    """
    device_type = q.device.type
    if q.dtype == torch.float64 or not torch.amp.is_autocast_available(device_type):
        return q, k, v
    if not torch.is_autocast_enabled(device_type):
        return q, k, v
    dtype = torch.get_autocast_dtype(device_type)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _under_functorch_transform() -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, vmap, ...) is tracing this call."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._are_functorch_transforms_active()


def gates(gating_param: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, 1 - g) as 1 x H x 1 x 1 in ``acc``, with 1 - g = sigmoid(-lambda): exact where g rounds to 1."""
    lam = gating_param.to(acc).view(1, -1, 1, 1)
    return torch.sigmoid(lam), torch.sigmoid(-lam)


def empty_forward_outputs(q: torch.Tensor):
    """Uninitialised (out, stats) of the forward interface; the fake (meta) function of every forward."""
    B, H, N, d = q.shape
    return q.new_empty((B, N, H, d)), q.new_empty((B, H, N, 2), dtype=compute_dtype(q.dtype))


def empty_backward_outputs(q: torch.Tensor, pos_weight: torch.Tensor, gating_param: torch.Tensor):
    """Uninitialised (dq, dk, dv, d pos_weight, d gating_param) of the backward interface."""
    B, H, N, d = q.shape
    return tuple(q.new_empty((B, N, H, d)) for _ in range(3)) + (
        torch.empty_like(pos_weight),
        torch.empty_like(gating_param),
    )


@gpsa_fwd.register_fake
def _gpsa_fwd_fake(q, k, v, pos_weight, pos_bias, gating_param, grid_w, scale, backend):
    return empty_forward_outputs(q)


@torch.library.custom_op("convit_kernels::gpsa_bwd", mutates_args=())
def gpsa_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos_weight: torch.Tensor,
    gating_param: torch.Tensor,
    stats: torch.Tensor,
    grid_w: int,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused GPSA backward; returns (dq, dk, dv in B x N x H x d, d pos_weight, d gating_param)."""
    return op_pair_backend(backend, q).backward(grad_out, q, k, v, pos_weight, gating_param, stats, grid_w, scale)


@gpsa_bwd.register_fake
def _gpsa_bwd_fake(grad_out, q, k, v, pos_weight, gating_param, stats, grid_w, scale, backend):
    return empty_backward_outputs(q, pos_weight, gating_param)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, pos_weight, pos_bias, gating_param, grid_w, scale, backend = inputs
    _, stats = output
    ctx.save_for_backward(q, k, v, pos_weight, pos_bias, gating_param, stats)
    ctx.grid_w, ctx.scale, ctx.backend = grid_w, scale, backend


def _fwd_backward(ctx, grad_out, _grad_stats):
    q, k, v, pos_weight, pos_bias, gating_param, stats = ctx.saved_tensors
    # Backends take dO in the dtype of q (autograd may hand another one, e.g. under AMP).
    args = (grad_out.to(q.dtype), q, k, v, pos_weight, gating_param, stats, ctx.grid_w, ctx.scale)
    if torch.is_grad_enabled():
        # create_graph=True: the backward must be differentiable itself, which no kernel is. The
        # torch backend's backward is tensor ops that recompute the softmax from q and k (stats, an
        # output whose gradient this op drops, is not read), so autograd differentiates it exactly.
        dq, dk, dv, dw, dgate = get_backend("torch").backward(*args)
    else:
        dq, dk, dv, dw, dgate = gpsa_bwd(*args, ctx.backend)
    # P does not depend on the bias (a per-row constant inside a softmax): its gradient is exactly zero.
    return (
        dq.transpose(1, 2),
        dk.transpose(1, 2),
        dv.transpose(1, 2),
        dw,
        torch.zeros_like(pos_bias),
        dgate,
        None,
        None,
        None,
    )


gpsa_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


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
        backend: "auto" or a name of :data:`convit_kernels.backends.BACKEND_NAMES`
            ("triton", "cuda", "cpu", "sdpa", "torch", "reference"); see
            :func:`available_backends` and ``convit-kernels backends``.

    Returns:
        B x H x N x d in q's dtype; under autocast (on q's device) float16, bfloat16
        and float32 inputs are cast to the autocast dtype first, as the matmuls of
        timm's GPSA cast them, so every backend returns timm's dtype there.
        Every backend but "reference" returns a view of a
        B x N x H x d tensor, so ``out.transpose(1, 2).reshape(B, N, H * d)``
        makes no copy.

    Higher-order autograd: a backward with ``create_graph=True`` through an op-pair
    backend runs the torch backend's backward, tensor ops autograd differentiates, so
    double backward works; through "sdpa" it fails in PyTorch's SDPA kernels, which
    have no double backward. Under torch.func transforms (grad, vjp, jacrev, vmap)
    every backend but "reference" runs the torch backend's forward as tensor ops
    (custom ops with autograd reject those transforms). Both paths build N x N tensors.
    """
    grid_h, grid_w = check_inputs(q, k, v, pos_weight, pos_bias, gating_param, grid_size, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = _autocast(q, k, v)
    name = resolve_backend(backend, q.device, q.dtype, q.shape[-1])
    if name != "reference" and _under_functorch_transform():
        # torch.library custom ops with autograd (the op pair, sdpa's mix) reject torch.func
        # transforms: run the torch backend's forward as tensor ops, which every transform sees through.
        return get_backend("torch").forward(q, k, v, pos_weight, gating_param, grid_w, scale)[0].transpose(1, 2)
    if backend == "auto" and name in self_check.CHECKED_BACKENDS:  # verified on this device before it is trusted
        name = self_check.checked_backend(name, q.device, q.dtype, q.shape[-1], q.shape[2], grid_w)
    impl = get_backend(name)
    if impl.attention is not None:
        return impl.attention(q, k, v, pos_weight, pos_bias, gating_param, (grid_h, grid_w), scale)
    out, _ = gpsa_fwd(q, k, v, pos_weight, pos_bias, gating_param, grid_w, scale, name)
    return out.transpose(1, 2)
