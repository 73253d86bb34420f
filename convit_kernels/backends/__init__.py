"""The backend registry: what each backend can take, which ones run here, and what ``backend="auto"`` picks.

A backend is one implementation of GPSA, of one of two kinds:

* an *op-pair* backend implements the forward / backward interface of the
  project op (``convit_kernels::gpsa_fwd`` / ``gpsa_bwd``, documented in
  :mod:`convit_kernels.op`): ``torch``, ``triton``, ``cpu``, ``cuda``;
* a *composite* backend is a function of torch ops differentiated by autograd:
  ``sdpa`` ((1 - g) SDPA + g separable positional branch) and ``reference``
  (timm's math).

Each backend module registers a :class:`Backend` when imported; the registry
imports them on first use and remembers why one did not import. What a backend
can take (devices, dtypes, head dims, CUDA capability) are fields of its
description, checked here in one place, so ``auto`` skips a backend that cannot
take the input and a backend named explicitly refuses with the same
:class:`BackendError` whichever it is. docs/design.md says how to add one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch

__all__ = [
    "Backend",
    "BackendError",
    "BackendStatus",
    "BACKEND_NAMES",
    "FLOAT_DTYPES",
    "HALF_AND_FLOAT",
    "register_backend",
    "get_backend",
    "available_backends",
    "auto_candidates",
    "auto_policy",
    "explain_auto",
    "resolve_backend",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_AND_FLOAT = (torch.float16, torch.bfloat16, torch.float32)

# Backend name -> the module that registers it (imported on first use).
_MODULES = {
    "triton": "convit_kernels.backends.triton_gpsa",
    "cuda": "convit_kernels.backends.extension",
    "cpu": "convit_kernels.backends.extension",
    "sdpa": "convit_kernels.backends.sdpa",
    "torch": "convit_kernels.backends.torch_ops",
    "reference": "convit_kernels.backends.reference",
}
BACKEND_NAMES = tuple(_MODULES)


class BackendError(RuntimeError):
    """A backend named explicitly cannot run here, or cannot take these inputs."""


class OpForward(Protocol):
    def __call__(
        self, q, k, v, pos_weight, gating_param, grid_w: int, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class OpBackward(Protocol):
    def __call__(
        self, grad_out, q, k, v, pos_weight, gating_param, stats, grid_w: int, scale: float
    ) -> tuple[torch.Tensor, ...]: ...


class Attention(Protocol):
    def __call__(
        self, q, k, v, pos_weight, pos_bias, gating_param, grid_size: tuple[int, int], scale: float
    ) -> torch.Tensor: ...


def _always_available() -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """One implementation of GPSA and the inputs it can take.

    Exactly one of (``forward``, ``backward``) and ``attention`` is set: the
    op-pair interface, or a composite function of torch ops (B x H x N x d in
    and out). ``unavailable`` says why the backend cannot run in this process
    (None when it can).
    """

    name: str
    summary: str
    devices: tuple[str, ...] | None  # device types; None: any
    dtypes: tuple[torch.dtype, ...]
    forward: OpForward | None = None
    backward: OpBackward | None = None
    attention: Attention | None = None
    max_head_dim: int | None = None
    min_cuda_capability: tuple[int, int] | None = None
    unavailable: Callable[[], str | None] = field(default=_always_available)

    def __post_init__(self):
        if (self.forward is None) != (self.backward is None) or (self.forward is None) == (self.attention is None):
            raise TypeError(f"backend {self.name!r}: give forward and backward, or attention")

    def refuses(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
        """Why this backend cannot take inputs of this device, dtype and head dim (None when it can)."""
        if self.devices is not None and device.type not in self.devices:
            return f"runs on {'/'.join(self.devices)} tensors, not {device.type}"
        if dtype not in self.dtypes:
            names = ", ".join(_dtype_name(d) for d in self.dtypes)
            return f"takes {names}, not {_dtype_name(dtype)}"
        if self.max_head_dim is not None and head_dim > self.max_head_dim:
            return f"takes head dims up to {self.max_head_dim}, not {head_dim}"
        if self.min_cuda_capability is not None and device.type == "cuda":
            capability = cuda_capability(device)
            if capability < self.min_cuda_capability:
                need = "sm_{}{}".format(*self.min_cuda_capability)
                return f"needs compute capability {need} or newer; {device} is sm_{capability[0]}{capability[1]}"
        return None


class BackendStatus(NamedTuple):
    available: bool
    reason: str


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of a CUDA device (tests replace this function)."""
    return torch.cuda.get_device_capability(device)


_BACKENDS: dict[str, Backend] = {}
_IMPORT_ERRORS: dict[str, str] = {}


def register_backend(backend: Backend) -> None:
    if backend.name not in _MODULES:
        raise ValueError(f"unknown backend {backend.name!r}: add it to the registry's module table")
    _BACKENDS[backend.name] = backend


def _load(name: str) -> None:
    """Import the module that registers ``name``, once; remember why it failed."""
    if name in _BACKENDS or name in _IMPORT_ERRORS:
        return
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


def _problem(name: str) -> str | None:
    _load(name)
    if name not in _BACKENDS:
        return _IMPORT_ERRORS[name]
    return _BACKENDS[name].unavailable()


def available_backends() -> dict[str, BackendStatus]:
    """Map each backend name to ``BackendStatus(available, reason)`` for this process."""
    result = {}
    for name in BACKEND_NAMES:
        problem = _problem(name)
        result[name] = BackendStatus(problem is None, problem or get_backend(name).summary)
    return result


# Device type -> (backends auto tries, best first; why that order). Other device types: _AUTO_ELSEWHERE.
AUTO_POLICY = {
    "cuda": (
        ("triton", "sdpa"),
        "the Triton kernels where they are built and checked (sm_80+, head dims up to 128), else PyTorch's "
        "SDPA kernels; the CUDA extension runs only when named",
    ),
    "cpu": (("cpu", "sdpa"), "the fused C++ kernel (faster than sdpa in `convit-kernels bench`), else sdpa"),
}
_AUTO_ELSEWHERE = (("sdpa",), "PyTorch's own attention kernels for the device (MPS, XPU, ...)")


def auto_candidates(device_type: str) -> tuple[str, ...]:
    """The backends ``auto`` tries on a device type, best first; "reference" is the last resort."""
    return AUTO_POLICY.get(device_type, _AUTO_ELSEWHERE)[0] + ("reference",)


def auto_policy(device_type: str) -> str:
    """Why ``auto`` tries the backends of :func:`auto_candidates` in that order."""
    return AUTO_POLICY.get(device_type, _AUTO_ELSEWHERE)[1]


def explain_auto(device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[str, list[str]]:
    """(the backend ``auto`` picks, why each better candidate was skipped)."""
    skipped = []
    for name in auto_candidates(device.type):
        problem = _problem(name) or get_backend(name).refuses(device, dtype, head_dim)
        if problem is None:
            return name, skipped
        skipped.append(f"{name}: {problem}")
    raise BackendError(f"no backend takes {_dtype_name(dtype)} inputs on {device}: " + "; ".join(skipped))


# A pure function of its constant arguments for the life of the process: torch.compile evaluates
# it once while tracing instead of tracing the lazy imports inside.
@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The concrete backend for ``backend`` ("auto" or a name) on inputs of this device, dtype and head dim."""
    device = torch.device(device)
    if backend == "auto":
        return explain_auto(device, dtype, head_dim)[0]
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
    problem = _problem(backend) or get_backend(backend).refuses(device, dtype, head_dim)
    if problem is not None:
        raise BackendError(f"backend {backend!r} cannot run here: {problem}")
    return backend
