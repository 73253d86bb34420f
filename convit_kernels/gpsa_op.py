"""The GPSA op: the package's one custom-op pair and one autograd path over every op-pair backend.

:func:`attention`, the path of every :func:`convit_kernels.gpsa_attention` call, asks
:func:`convit_kernels.dispatch.choose` for a backend once and runs that :class:`~convit_kernels.backends.Backend`:
its ``attention`` for a composite, the op pair for an op pair, or what the backend declares for the
calls its own code cannot take (``functorch``, ``onnx_export``). :data:`gpsa_forward_op` /
:data:`gpsa_backward_op`, registered as ``convit_kernels::gpsa_fwd`` / ``gpsa_bwd``, carry the chosen
backend by name (a schema holds no object) and look it up in the registry; the tensors saved between
them are that backend's own ``state``. (The extension's kernels ``convit_kernels_ext::gpsa_fwd`` /
``gpsa_bwd`` share the short names in another namespace: they are the kernels of the extension's
backends, :mod:`convit_kernels.backends.extension`, which this op pair may run.) A backward with
``create_graph=True`` runs the backend's ``double_backward``, tensor ops autograd differentiates. A
scripted ``FusedGPSA`` calls ``convit_kernels::gpsa_fwd`` itself with its backend,
:data:`~convit_kernels.dispatch.AUTO` included: there the op asks dispatch for the choice, and refuses
in one line where that is a composite.
"""

from __future__ import annotations

import math

import torch

from . import dispatch
from .backends import Backend, BackendError, empty_backward_outputs, get_backend
from .op_registration import define_op_pair

__all__ = ["gpsa_forward_op", "gpsa_backward_op", "attention", "op_pair_backend", "is_finite_positive"]


def is_finite_positive(x) -> bool:
    try:
        value = float(x)
    except (TypeError, ValueError):
        return False
    # Comparisons, not math.isfinite: torch.compile traces them on a symbolic float. NaN fails both.
    return 0 < value < math.inf


def op_pair_backend(backend: str, q: torch.Tensor, grid_w: int) -> Backend:
    """The op-pair backend the op runs: the one named (chosen by :func:`attention` or by a scripted layer's
    owner), or dispatch's choice where a scripted FusedGPSA passes :data:`~convit_kernels.dispatch.AUTO`."""
    if backend == dispatch.AUTO:
        name = dispatch.choose(backend, q.device, q.dtype, q.shape[-1], q.shape[2], grid_w)
    else:
        name = backend
    impl = get_backend(name)
    if impl.is_op_pair:
        return impl
    what = f"backend {name!r} is" if backend == name else f"backend {backend!r} picks {name!r} here, which is"
    raise BackendError(
        f"{what} a composite of torch ops, not an op pair: convit_kernels::gpsa_fwd (which a scripted FusedGPSA "
        "calls) runs op-pair backends only; name one of them, or do not script the layer"
    )


def _precision(precision: str) -> str:
    """The fp32 matmul precision of a call: given by :func:`attention`, read now when a scripted call gives ""."""
    return precision or torch.get_float32_matmul_precision()


def _validate_op_arguments(q: torch.Tensor, grid_w: int, scale: float) -> None:
    """What a direct call of the op (a scripted FusedGPSA's) skips of gpsa_attention's validation."""
    if not is_finite_positive(scale):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    if not (grid_w > 0 and q.shape[2] % grid_w == 0):
        raise ValueError(f"grid_w must be a positive divisor of N = {q.shape[2]}, got {grid_w}")


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos_weight: torch.Tensor,
    pos_bias: torch.Tensor,
    gating_param: torch.Tensor,
    grid_w: int,
    scale: float,
    backend: str,
    precision: str = "",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Fused GPSA forward; returns (out B x N x H x d, the backend's state). pos_bias: for its (zero) gradient."""
    _validate_op_arguments(q, grid_w, scale)
    impl = op_pair_backend(backend, q, grid_w)
    out, state = impl.forward(q, k, v, pos_weight, gating_param, grid_w, scale, _precision(precision))
    return out, list(state)


def _forward_fake(q, k, v, pos_weight, pos_bias, gating_param, grid_w, scale, backend, precision=""):
    B, H, N, d = q.shape
    return q.new_empty((B, N, H, d)), op_pair_backend(backend, q, grid_w).state_like(q)


def _backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos_weight: torch.Tensor,
    gating_param: torch.Tensor,
    state: list[torch.Tensor],
    grid_w: int,
    scale: float,
    backend: str,
    precision: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused GPSA backward; returns (dq, dk, dv in B x N x H x d, d pos_weight, d gating_param)."""
    _validate_op_arguments(q, grid_w, scale)
    impl = op_pair_backend(backend, q, grid_w)
    return impl.backward(grad_out, q, k, v, pos_weight, gating_param, state, grid_w, scale, _precision(precision))


def _backward_fake(grad_out, q, k, v, pos_weight, gating_param, state, grid_w, scale, backend, precision=""):
    return empty_backward_outputs(q, pos_weight, gating_param)


def _setup_context(ctx, inputs, output):
    q, k, v, pos_weight, pos_bias, gating_param, grid_w, scale, backend, precision = inputs
    _, state = output
    ctx.save_for_backward(q, k, v, pos_weight, pos_bias, gating_param, *state)
    ctx.grid_w, ctx.scale = grid_w, scale
    # A name the forward has looked up; only a scripted call's AUTO asks dispatch again (its choice is kept).
    ctx.backend = op_pair_backend(backend, q, grid_w)
    ctx.precision = _precision(precision)


def _gradients(ctx, backward_op, grad_out, _grad_state):
    q, k, v, pos_weight, pos_bias, gating_param, *state = ctx.saved_tensors
    # Backends take dO in the dtype of q (autograd may hand another one, e.g. under AMP).
    args = (grad_out.to(q.dtype), q, k, v, pos_weight, gating_param, state, ctx.grid_w, ctx.scale)
    if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate
        double_backward = _declared(ctx.backend, ctx.backend.double_backward, "a backward with create_graph=True")
        dq, dk, dv, dw, dgate = double_backward(*args, ctx.precision)
    else:
        dq, dk, dv, dw, dgate = backward_op(*args, ctx.backend.name, ctx.precision)
    # The bias gradient is exactly zero (docs/design.md, "The positional bias").
    db = torch.zeros_like(pos_bias)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), dw, db, dgate, None, None, None, None


# Registered names are kept by saved and exported graphs. Not the extension's convit_kernels_ext::gpsa_fwd /
# gpsa_bwd: those are the cpu and cuda backends' kernels, which these ops run when one of them is chosen.
gpsa_forward_op, gpsa_backward_op = define_op_pair(
    "convit_kernels::gpsa_fwd",
    "convit_kernels::gpsa_bwd",
    _forward,
    _forward_fake,
    _backward,
    _backward_fake,
    _setup_context,
    _gradients,
)


@torch.compiler.assume_constant_result
def _fp32_matmul_precision() -> str:
    """torch's setting, read when a compiled graph is traced (as Inductor reads it for its own matmuls)."""
    return torch.get_float32_matmul_precision()


def _under_functorch_transform() -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, vmap, ...) is tracing this call."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._are_functorch_transforms_active()


def _declared(impl: Backend, path, what: str):
    """A path the backend declares for calls its own code cannot take; a one-line refusal where it has none."""
    if path is None:
        raise BackendError(f"backend {impl.name!r} cannot run {what}: it declares no path for it")
    return path


def attention(q, k, v, pos_weight, pos_bias, gating_param, grid_size: tuple[int, int], scale: float, backend: str):
    """GPSA of validated inputs through the backend :func:`dispatch.choose` picks; B x H x N x d."""
    grid_w = grid_size[1]
    impl = get_backend(dispatch.choose(backend, q.device, q.dtype, q.shape[-1], q.shape[2], grid_w))
    args = (q, k, v, pos_weight, pos_bias, gating_param, grid_size, scale)
    if torch.onnx.is_in_onnx_export():
        # ONNX has no custom ops. The flag is set for the whole torch.onnx.export (its non-strict torch.export
        # capture included); under Dynamo it reads False, so torch.compile and torch.export keep the fused op.
        return _declared(impl, impl.onnx_export, "under an ONNX exporter")(*args)
    if _under_functorch_transform():
        # Custom ops with autograd reject torch.func transforms.
        return _declared(impl, impl.functorch, "under a torch.func transform")(*args)
    if not impl.is_op_pair:
        return impl.attention(*args)
    out, _ = gpsa_forward_op(
        q, k, v, pos_weight, pos_bias, gating_param, grid_w, scale, impl.name, _fp32_matmul_precision()
    )
    return out.transpose(1, 2)
