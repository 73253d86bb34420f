"""The backend registry and the contract every backend keeps (docs/design.md, "Architecture").

A backend is one implementation of GPSA, of one of two kinds:

* an *op-pair* backend gives ``forward`` / ``backward`` (:class:`OpForward`, :class:`OpBackward`),
  run by the one custom-op pair and autograd registration of :mod:`convit_kernels.gpsa_op`;
  the tensors it saves between them (``state``) are its own: ``torch``, ``triton``, ``cpu``, ``cuda``;
* a *composite* backend gives ``attention``, a function of torch ops differentiated by autograd:
  ``sdpa`` and ``reference``.

Each backend module registers a :class:`Backend` when imported; the registry imports the package's
own on first use (:data:`BACKEND_NAMES`) and remembers why one did not import; a backend defined
elsewhere registers by calling :func:`register_backend` (:func:`backend_names` lists both). What a
backend can take (devices, dtypes, head dims, CUDA capability) are fields of its description;
:meth:`Backend.not_supported_reasons` lists every reason it refuses an input. So are the paths that
serve what its own code cannot: a differentiable backward (``double_backward``), torch.func
transforms (``functorch``) and ONNX export (``onnx_export``); the op layer reads them and names no
backend. Which backend runs is :mod:`convit_kernels.dispatch`'s call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch

from ..dtypes import dtype_name
from ..separable import WHOLE_TABLES_PER_TOKEN, compute_dtype, whole_tables_fit

__all__ = [
    "Backend",
    "BackendError",
    "BackendStatus",
    "BACKEND_NAMES",
    "FLOAT_DTYPES",
    "HALF_AND_FLOAT",
    "register_backend",
    "backend_names",
    "get_backend",
    "backend_problem",
    "available_backends",
    "cuda_capability",
    "gates",
    "stats_state_like",
    "empty_backward_outputs",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_AND_FLOAT = (torch.float16, torch.bfloat16, torch.float32)

# The package's own backends: name -> the module that registers it (imported on first use).
_MODULES = {
    "triton": "convit_kernels.backends.triton",
    "cuda": "convit_kernels.backends.extension",
    "cpu": "convit_kernels.backends.extension",
    "sdpa": "convit_kernels.backends.sdpa",
    "torch": "convit_kernels.backends.eager",
    "reference": "convit_kernels.backends.eager",
}
BACKEND_NAMES = tuple(_MODULES)


class BackendError(RuntimeError):
    """A backend named explicitly cannot run here, or cannot take these inputs."""


class OpForward(Protocol):
    def __call__(
        self, q, k, v, pos_weight, gating_param, grid_w: int, scale: float, precision: str
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(out B x N x H x d contiguous in q's dtype, the state the backward reads).

        q, k, v: B x H x N x d, one dtype, any strides; pos_weight H x 3, gating_param H.
        precision: torch's float32 matmul precision at the call ("highest", "high", "medium").
        """


class OpBackward(Protocol):
    def __call__(
        self, grad_out, q, k, v, pos_weight, gating_param, state, grid_w: int, scale: float, precision: str
    ) -> tuple[torch.Tensor, ...]:
        """(dq, dk, dv B x N x H x d contiguous in q's dtype, d pos_weight, d gating_param in their dtypes).

        grad_out: B x N x H x d, any strides, q's dtype; state and precision: the forward's.
        """


class Attention(Protocol):
    def __call__(
        self, q, k, v, pos_weight, pos_bias, gating_param, grid_size: tuple[int, int], scale: float
    ) -> torch.Tensor: ...


def _always_available() -> str | None:
    return None


def stats_state_like(q: torch.Tensor) -> list[torch.Tensor]:
    """The state of the backends that save each content row's maximum and sum (B x H x N x 2, accumulation dtype).

    Kept apart, not as one log-sum-exp: docs/design.md, "Saturated rows".
    """
    B, H, N, _ = q.shape
    return [q.new_empty((B, H, N, 2), dtype=compute_dtype(q.dtype))]


def empty_backward_outputs(q: torch.Tensor, pos_weight: torch.Tensor, gating_param: torch.Tensor):
    """Uninitialised (dq, dk, dv, d pos_weight, d gating_param) of the backward contract (for fakes)."""
    B, H, N, d = q.shape
    return tuple(q.new_empty((B, N, H, d)) for _ in range(3)) + (
        torch.empty_like(pos_weight),
        torch.empty_like(gating_param),
    )


def gates(gating_param: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, 1 - g) as 1 x H x 1 x 1 in ``acc``; 1 - g = sigmoid(-lambda) (docs/design.md, "The gate")."""
    lam = gating_param.to(acc).view(1, -1, 1, 1)
    return torch.sigmoid(lam), torch.sigmoid(-lam)


@dataclass(frozen=True)
class Backend:
    """One implementation of GPSA and the inputs it can take.

    Exactly one of (``forward``, ``backward``) and ``attention`` is set. ``state_like`` gives
    uninitialised tensors shaped as the forward's state (the op pair's fake). ``unavailable``
    says why the backend cannot run in this process (None when it can).

    What serves the calls its own code cannot take, each None where nothing does (the op then
    refuses them in one line):

    * ``double_backward`` (op pairs only): a backward of the op-pair contract in tensor ops, which
      autograd differentiates; a backward with ``create_graph=True`` runs it. A composite's own
      torch ops are differentiated as they are.
    * ``functorch``: an :class:`Attention` of plain tensor ops, what runs under torch.func
      transforms (grad, vjp, jacrev, vmap), which custom ops with autograd reject.
    * ``onnx_export``: an :class:`Attention` of standard ops alone (no custom op), what runs while
      an ONNX exporter traces the call.
    """

    name: str
    summary: str
    devices: tuple[str, ...] | None  # device types; None: any
    dtypes: tuple[torch.dtype, ...]
    forward: OpForward | None = None
    backward: OpBackward | None = None
    state_like: Callable[[torch.Tensor], list[torch.Tensor]] = stats_state_like
    attention: Attention | None = None
    max_head_dim: int | None = None
    min_cuda_capability: tuple[int, int] | None = None
    interpreted: bool = False  # runs in an interpreter here: correct, never fast (the bench does not time it)
    whole_tables: bool = False  # builds both per-axis tables whole: only grids where they fit (separable.py)
    # fp32 gradients at content logits of size L (two near-tied maxima per row; docs/backends.md)
    large_logits: str = "within 2x the fp32 eager error up to L = 3e6 (each row's maximum and sum kept apart)"
    unavailable: Callable[[], str | None] = field(default=_always_available)
    double_backward: OpBackward | None = None
    functorch: Attention | None = None
    onnx_export: Attention | None = None

    def __post_init__(self):
        if (self.forward is None) != (self.backward is None) or (self.forward is None) == (self.attention is None):
            raise TypeError(f"backend {self.name!r}: give forward and backward, or attention")
        if self.double_backward is not None and self.forward is None:
            raise TypeError(f"backend {self.name!r}: double_backward is an op pair's (composites are differentiated)")

    @property
    def is_op_pair(self) -> bool:
        return self.forward is not None

    def runs_on(self, device_type: str) -> bool:
        return self.devices is None or device_type in self.devices

    def takes_grid(self, grid_h: int, grid_w: int) -> bool:
        return not self.whole_tables or whole_tables_fit(grid_h, grid_w)

    def not_supported_reasons(
        self, device: torch.device, dtype: torch.dtype, head_dim: int, grid: tuple[int, int] | None = None
    ) -> list[str]:
        """Every reason this backend cannot take inputs of this device, dtype, head dim and grid (empty: it can)."""
        reasons = []
        if not self.runs_on(device.type):
            reasons.append(f"runs on {'/'.join(self.devices)} tensors, not {device.type}")
        if dtype not in self.dtypes:
            names = ", ".join(dtype_name(d) for d in self.dtypes)
            reasons.append(f"takes {names}, not {dtype_name(dtype)}")
        if self.max_head_dim is not None and head_dim > self.max_head_dim:
            reasons.append(f"takes head dims up to {self.max_head_dim}, not {head_dim}")
        if self.min_cuda_capability is not None and device.type == "cuda":
            capability = cuda_capability(device)
            if capability < self.min_cuda_capability:
                need = "sm_{}{}".format(*self.min_cuda_capability)
                have = "sm_{}{}".format(*capability)
                reasons.append(f"needs compute capability {need} or newer; {device} is {have}")
        if grid is not None and not self.takes_grid(*grid):
            reasons.append(
                "builds the per-axis positional tables whole (W^2 + H_p^2 numbers a head), more than "
                f"{WHOLE_TABLES_PER_TOKEN} a token on a {grid[0]} x {grid[1]} grid"
            )
        return reasons


class BackendStatus(NamedTuple):
    available: bool
    reason: str


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of a CUDA device (tests replace this function)."""
    return torch.cuda.get_device_capability(device)


_BACKENDS: dict[str, Backend] = {}
_IMPORT_ERRORS: dict[str, str] = {}


def register_backend(backend: Backend) -> None:
    """Make ``backend`` one of :func:`backend_names`: a package module's at its import, any other when called."""
    if backend.name == "auto":
        raise ValueError("'auto' names the automatic choice, not a backend")
    _BACKENDS[backend.name] = backend


def backend_names() -> tuple[str, ...]:
    """Every backend a call can name: the package's own (:data:`BACKEND_NAMES`), then those registered since."""
    return BACKEND_NAMES + tuple(name for name in _BACKENDS if name not in _MODULES)


def _load(name: str) -> None:
    """Import the module that registers ``name``, once; remember why it failed."""
    if name in _BACKENDS or name in _IMPORT_ERRORS:
        return
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}: the backends are {backend_names()}")
    module = _MODULES[name]
    try:
        importlib.import_module(module)
    except ImportError as exc:
        _IMPORT_ERRORS[name] = f"{module} did not import: {exc}"
    if name not in _BACKENDS and name not in _IMPORT_ERRORS:
        _IMPORT_ERRORS[name] = f"{module} registered no {name!r} backend"


def get_backend(name: str) -> Backend:
    """The registered backend ``name``; BackendError when its module did not import."""
    _load(name)
    if name not in _BACKENDS:
        raise BackendError(f"backend {name!r} cannot run here: {_IMPORT_ERRORS[name]}")
    return _BACKENDS[name]


def backend_problem(name: str) -> str | None:
    """Why backend ``name`` cannot run in this process at all (None when it can)."""
    _load(name)
    if name not in _BACKENDS:
        return _IMPORT_ERRORS[name]
    return _BACKENDS[name].unavailable()


def available_backends() -> dict[str, BackendStatus]:
    """Map each backend name to ``BackendStatus(available, reason)`` for this process."""
    result = {}
    for name in backend_names():
        problem = backend_problem(name)
        result[name] = BackendStatus(problem is None, problem or get_backend(name).summary)
    return result
