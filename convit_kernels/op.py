"""The GPSA op: input checks, the backend registry, dispatch and torch.library registration.

One forward/backward op pair, ``convit_kernels::gpsa_fwd`` and
``convit_kernels::gpsa_bwd``, carries every fused implementation; the
``backend`` argument names the one to run (see ``reference.py`` for the
interface each implements). Autograd and fake (meta) functions are registered
once here, so ``torch.compile(fullgraph=True)`` traces through any backend as a
single opaque node. ``backend="reference"`` bypasses the op and runs timm's math
through autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch

from .reference import compute_dtype, gpsa_backward_torch, gpsa_forward_torch, gpsa_reference

__all__ = [
    "Backend",
    "BackendStatus",
    "register_backend",
    "available_backends",
    "resolve_backend",
    "check_inputs",
    "gpsa_attention",
    "BACKEND_NAMES",
]

# Order of preference of backend="auto"; "reference" is the last resort.
AUTO_ORDER = ("triton", "cuda", "cpu", "torch")
BACKEND_NAMES = AUTO_ORDER + ("reference",)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Backend:
    """One implementation of the op pair.

    ``unavailable`` returns why the backend cannot run in this process (None when
    it can); ``unsupported`` returns why it cannot take tensors of a device type
    and dtype (None when it can). ``auto_devices`` are the device types where
    ``backend="auto"`` may pick it (the Triton interpreter serves CPU tensors for
    tests, but is never the fast choice there).
    """

    name: str
    forward: Callable
    backward: Callable
    devices: Tuple[str, ...]
    dtypes: Tuple[torch.dtype, ...]
    auto_devices: Tuple[str, ...] = ()
    unavailable: Callable[[], Optional[str]] = field(default=lambda: None)

    def unsupported(self, device_type: str, dtype: torch.dtype) -> Optional[str]:
        if device_type not in self.devices:
            return f"backend {self.name!r} runs on {'/'.join(self.devices)} tensors, not {device_type}"
        if dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"backend {self.name!r} takes {names}, not {str(dtype).replace('torch.', '')}"
        return None


class BackendStatus(NamedTuple):
    available: bool
    reason: str


_BACKENDS: dict = {}
_OPTIONAL_BACKEND_MODULES = {
    "triton": "convit_kernels.triton_gpsa",
    "cpu": "convit_kernels.extension",
    "cuda": "convit_kernels.extension",
}
_IMPORT_ERRORS: dict = {}


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


register_backend(
    Backend(
        "torch",
        gpsa_forward_torch,
        gpsa_backward_torch,
        devices=("cpu", "cuda", "mps", "xpu"),
        dtypes=FLOAT_DTYPES,
        auto_devices=("cpu", "cuda", "mps", "xpu"),
    )
)


def _load_optional_backends() -> None:
    """Import the modules that register the kernel backends, once; remember why one failed."""
    import importlib

    for name, module in _OPTIONAL_BACKEND_MODULES.items():
        if name in _BACKENDS or name in _IMPORT_ERRORS:
            continue
        try:
            importlib.import_module(module)
        except ImportError as exc:
            _IMPORT_ERRORS[name] = f"{module} did not import: {exc}"
        if name not in _BACKENDS and name not in _IMPORT_ERRORS:
            _IMPORT_ERRORS[name] = f"{module} registered no {name!r} backend"


def _backend_problem(name: str) -> Optional[str]:
    _load_optional_backends()
    if name == "reference":
        return None
    if name not in _BACKENDS:
        return _IMPORT_ERRORS.get(name, f"unknown backend {name!r}")
    return _BACKENDS[name].unavailable()


def available_backends() -> dict:
    """Map each backend name to ``BackendStatus(available, reason)`` for this process."""
    result = {}
    for name in BACKEND_NAMES:
        problem = _backend_problem(name)
        result[name] = BackendStatus(problem is None, problem or "available")
    return result


# A pure function of its constant arguments for the life of the process: torch.compile evaluates
# it once while tracing instead of tracing the lazy imports inside.
@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device_type: str, dtype: torch.dtype) -> str:
    """The concrete backend name for ``backend`` on tensors of this device type and dtype."""
    if backend not in BACKEND_NAMES and backend != "auto":
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
    if backend == "auto":
        for name in AUTO_ORDER:
            if _backend_problem(name) is None and device_type in _BACKENDS[name].auto_devices:
                if _BACKENDS[name].unsupported(device_type, dtype) is None:
                    return name
        return "reference"
    problem = _backend_problem(backend)
    if problem is None and backend != "reference":
        problem = _BACKENDS[backend].unsupported(device_type, dtype)
    if problem is not None:
        raise RuntimeError(f"backend {backend!r} cannot run here: {problem}")
    return backend


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {str(t.dtype).replace('torch.', '')}, device {t.device}"


def check_inputs(q, k, v, pos_weight, pos_bias, gating_param, grid_size=None) -> Tuple[int, int]:
    """Validate the arguments of :func:`gpsa_attention`; return the patch grid (rows, cols).

    Raises TypeError for a non-tensor or non-floating argument or mismatched
    q/k/v dtypes, ValueError for a wrong shape, a grid that does not match N,
    or tensors on different devices.
    """
    named = {"q": q, "k": k, "v": v, "pos_weight": pos_weight, "pos_bias": pos_bias, "gating_param": gating_param}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {_describe(t)}")
    if q.dim() != 4 or q.shape[2] == 0 or q.shape[3] == 0:
        raise ValueError(f"q must have shape (B, H, N, d) with N >= 1 patches and d >= 1, got {_describe(q)}")
    B, H, N, d = q.shape
    for name in ("k", "v"):
        if named[name].shape != q.shape:
            raise ValueError(f"{name} must have the shape of q, (B, H, N, d) = {tuple(q.shape)}, got {_describe(named[name])}")
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
    if grid_size is None:
        side = math.isqrt(N)
        if side * side != N:
            raise ValueError(
                f"N = {N} patches is not a perfect square: pass grid_size=(rows, cols) with rows * cols = N"
            )
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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused GPSA forward; returns (out B x N x H x d, lse B x H x N)."""
    return _BACKENDS[backend].forward(q, k, v, pos_weight, gating_param, grid_w, scale)


def empty_forward_outputs(q: torch.Tensor):
    """Uninitialised (out, lse) of the forward interface; the fake (meta) function of every forward."""
    B, H, N, d = q.shape
    return q.new_empty((B, N, H, d)), q.new_empty((B, H, N), dtype=compute_dtype(q.dtype))


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
    lse: torch.Tensor,
    grid_w: int,
    scale: float,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused GPSA backward; returns (dq, dk, dv in B x N x H x d, d pos_weight, d gating_param)."""
    return _BACKENDS[backend].backward(grad_out, q, k, v, pos_weight, gating_param, lse, grid_w, scale)


@gpsa_bwd.register_fake
def _gpsa_bwd_fake(grad_out, q, k, v, pos_weight, gating_param, lse, grid_w, scale, backend):
    return empty_backward_outputs(q, pos_weight, gating_param)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, pos_weight, pos_bias, gating_param, grid_w, scale, backend = inputs
    _, lse = output
    ctx.save_for_backward(q, k, v, pos_weight, pos_bias, gating_param, lse)
    ctx.grid_w, ctx.scale, ctx.backend = grid_w, scale, backend


def _fwd_backward(ctx, grad_out, _grad_lse):
    q, k, v, pos_weight, pos_bias, gating_param, lse = ctx.saved_tensors
    # Backends take dO in the dtype of q (autograd may hand another one, e.g. under AMP).
    dq, dk, dv, dw, dgate = gpsa_bwd(
        grad_out.to(q.dtype), q, k, v, pos_weight, gating_param, lse, ctx.grid_w, ctx.scale, ctx.backend
    )
    # P does not depend on the bias (a per-row constant inside a softmax): its gradient is exactly zero.
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), dw, torch.zeros_like(pos_bias), dgate, None, None, None


gpsa_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def gpsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos_weight: torch.Tensor,
    pos_bias: torch.Tensor,
    gating_param: torch.Tensor,
    *,
    grid_size: Optional[Tuple[int, int]] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Gated positional self-attention, ConViT's GPSA without the projections.

    Args:
        q, k, v: B x H x N x d, one floating dtype, any strides.
        pos_weight: H x 3 (``pos_proj.weight``), pos_bias: H (``pos_proj.bias``),
            gating_param: H (the gate lambda, ``g = sigmoid(lambda)``).
        grid_size: (rows, cols) of the patch grid, row-major; default a square grid.
        scale: content logit scale, default ``d ** -0.5``.
        backend: "auto", "triton", "cuda", "cpu", "torch" or "reference"
            (see :func:`available_backends`).

    Returns:
        B x H x N x d in q's dtype. Fused backends return a view of a
        B x N x H x d tensor, so ``out.transpose(1, 2).reshape(B, N, H * d)``
        makes no copy.
    """
    grid_h, grid_w = check_inputs(q, k, v, pos_weight, pos_bias, gating_param, grid_size)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    name = resolve_backend(backend, q.device.type, q.dtype)
    if name == "reference":
        return gpsa_reference(q, k, v, pos_weight, pos_bias, gating_param, (grid_h, grid_w), scale)
    out, _ = gpsa_fwd(q, k, v, pos_weight, pos_bias, gating_param, grid_w, scale, name)
    return out.transpose(1, 2)
