"""Which backend runs a call: the auto policy, and why each backend refuses an input.

``backend="auto"`` tries the candidates of :data:`AUTO_POLICY` for the device type, best first,
and takes the first that runs here and takes the input; an explicit name runs or refuses with
every reason (:func:`not_supported_reasons`). On a GPU, the first time ``auto`` would hand a
combination (backend, device, capability, dtype, head dim, N, grid width) to one of the project's
own kernels (:func:`verified_before_use`), :func:`choose` asks :mod:`convit_kernels.verification`
for its verdict, checked there against the float64 reference or read from the device's verdict
file; on a failed verdict ``auto`` takes :data:`FALLBACK` for that combination and warns once
(CONVIT_KERNELS_SELF_CHECK in :mod:`convit_kernels.settings`). Which combinations
``convit-kernels verify-kernels`` checks ahead and stores is :func:`stored_combinations`.
"""

from __future__ import annotations

import warnings

import torch

from . import settings, verification
from .backends import BackendError, backend_names, backend_problem, get_backend
from .convit_shapes import GRID_224, GRID_384, HEAD_DIM, HEAD_DIMS, TOKENS_224
from .dtypes import dtype_name
from .separable import whole_tables_fit

__all__ = [
    "AUTO",
    "AUTO_POLICY",
    "FALLBACK",
    "CHECKED_BACKENDS",
    "auto_candidates",
    "auto_policy",
    "not_supported_reasons",
    "explain_auto",
    "resolve_backend",
    "choose",
    "verified_before_use",
    "stored_combinations",
]

# The name that asks for the policy's choice instead of one backend.
AUTO = "auto"

# Device type -> (backends auto tries, best first; why that order). Other device types: _AUTO_ELSEWHERE.
AUTO_POLICY = {
    "cuda": (
        ("triton", "sdpa"),
        "the Triton kernels where they are built and verified (sm_80+, head dims up to 128), else PyTorch's "
        "SDPA kernels",
    ),
    "cpu": (
        ("cpu", "sdpa"),
        "the fused C++ kernel (faster than sdpa at ConViT's sizes in `convit-kernels bench`; slower on strips, "
        "but exact at large content logits there too), else sdpa",
    ),
}
_AUTO_ELSEWHERE = (("sdpa",), "PyTorch's own attention kernels for the device (MPS, XPU, ...)")
# What auto takes instead of a kernel that failed its on-device check: PyTorch's own kernels.
FALLBACK = "sdpa"
# The project's own GPU kernels among auto's candidates: what is verified before it is trusted.
CHECKED_BACKENDS = tuple(name for name in AUTO_POLICY["cuda"][0] if name != FALLBACK)
CHECKED_DEVICE_TYPES = ("cuda",)
# (head dim, N, grid width) verified where a compiled call's own are symbolic: ConViT-S at 224 px.
VERIFIED_WHEN_SYMBOLIC = (HEAD_DIM, TOKENS_224, GRID_224[1])


def auto_candidates(device_type: str) -> tuple[str, ...]:
    """The backends ``auto`` tries on a device type, best first; "reference" is the last resort."""
    return AUTO_POLICY.get(device_type, _AUTO_ELSEWHERE)[0] + ("reference",)


def auto_policy(device_type: str) -> str:
    """Why ``auto`` tries the backends of :func:`auto_candidates` in that order, and which run there only by name."""
    candidates = auto_candidates(device_type)
    named_only = [
        name
        for name in backend_names()
        if name not in candidates and backend_problem(name) is None and get_backend(name).runs_on(device_type)
    ]
    why = AUTO_POLICY.get(device_type, _AUTO_ELSEWHERE)[1]
    return why + (f"; {', '.join(named_only)} only when named" if named_only else "")


def not_supported_reasons(
    name: str, device: torch.device, dtype: torch.dtype, head_dim: int, grid: tuple[int, int] | None = None
) -> list[str]:
    """Every reason backend ``name`` cannot take inputs of this device, dtype, head dim and grid (empty: it can).

    ``grid`` (H_p, W): None leaves the grid out (any grid whose tables fit).
    """
    problem = backend_problem(name)
    if problem is not None:
        return [problem]
    return get_backend(name).not_supported_reasons(device, dtype, head_dim, grid)


def explain_auto(
    device: torch.device, dtype: torch.dtype, head_dim: int, grid: tuple[int, int] | None = None
) -> tuple[str, list[str]]:
    """(the backend ``auto`` picks, why each better candidate was skipped), before on-device verification."""
    skipped = []
    for name in auto_candidates(device.type):
        reasons = not_supported_reasons(name, device, dtype, head_dim, grid)
        if not reasons:
            return name, skipped
        skipped.append(f"{name}: {'; '.join(reasons)}")
    raise BackendError(f"no backend takes {dtype_name(dtype)} inputs on {device}: " + " | ".join(skipped))


def resolve_backend(
    backend: str, device: torch.device, dtype: torch.dtype, head_dim: int, grid: tuple[int, int] | None = None
) -> str:
    """The concrete backend for ``backend`` ("auto" or a name) on inputs of this device, dtype, head dim and grid."""
    device = torch.device(device)
    if backend == AUTO:
        return explain_auto(device, dtype, head_dim, grid)[0]
    if backend not in backend_names():
        raise ValueError(f"backend must be 'auto' or one of {backend_names()}, got {backend!r}")
    reasons = not_supported_reasons(backend, device, dtype, head_dim, grid)
    if reasons:
        raise BackendError(f"backend {backend!r} cannot run here: {'; '.join(reasons)}")
    return backend


_ANY_HEAD_DIM = 2**31


# A pure function of its constant arguments for the life of the process: torch.compile evaluates it
# once while tracing. The head dim and the grid stay out: with dynamic shapes they are symbolic there,
# and the caller compares them with each candidate's limits (guards, not graph breaks).
@torch.compiler.assume_constant_result
def _candidates(backend: str, device: torch.device, dtype: torch.dtype) -> tuple[tuple[str, int, bool], ...]:
    """(name, largest head dim it takes, whether it builds whole tables) of each backend that may run the call."""
    device = torch.device(device)
    names = auto_candidates(device.type) if backend == AUTO else (resolve_backend(backend, device, dtype, 1),)
    return tuple(
        (name, get_backend(name).max_head_dim or _ANY_HEAD_DIM, get_backend(name).whole_tables)
        for name in names
        if not not_supported_reasons(name, device, dtype, 1)
    )


def choose(backend: str, device: torch.device, dtype: torch.dtype, head_dim, tokens, grid_w) -> str:
    """The backend a call runs: :func:`resolve_backend`, and for ``auto`` its on-device verdict.

    Traceable by torch.compile with dynamic shapes: head_dim, tokens and grid_w may be symbolic.
    """
    grid = (tokens // grid_w, grid_w)
    if not torch.compiler.is_compiling():
        name = resolve_backend(backend, device, dtype, head_dim, grid)  # a refusal names every reason
    else:
        fitting = [
            name
            for name, max_head_dim, whole_tables in _candidates(backend, device, dtype)
            if head_dim <= max_head_dim and (not whole_tables or whole_tables_fit(*grid))
        ]
        if not fitting:  # an explicit backend's limits
            raise BackendError(
                f"backend {backend!r} cannot run here: head dim {head_dim} or grid {grid[0]} x {grid[1]} "
                "beyond its limits"
            )
        name = fitting[0]
    if backend != AUTO or not verified_before_use(name, device):
        return name
    if torch.compiler.is_compiling():
        # While tracing the call's size may be symbolic (dynamic shapes): check at ConViT's.
        head_dim, tokens, grid_w = VERIFIED_WHEN_SYMBOLIC
    return _verified(name, device, dtype, head_dim, tokens, grid_w)


def verified_before_use(name: str, device: torch.device) -> bool:
    """Whether ``auto`` hands ``name`` a call on ``device`` only after its on-device check passed."""
    return name in CHECKED_BACKENDS and torch.device(device).type in CHECKED_DEVICE_TYPES


_WARNED: set[verification.Combination] = set()


# A pure function of its constant arguments for the life of the process (verdicts are kept): under
# torch.compile it runs once while tracing, outside the graph.
@torch.compiler.assume_constant_result
def _verified(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, tokens: int, grid_w: int) -> str:
    """``name`` if it passed its on-device check for this combination (or checks are off), else ``FALLBACK``."""
    mode = settings.self_check_mode()
    if mode == "off":
        return name
    combination = verification.combination(name, device, dtype, head_dim, tokens, grid_w)
    verdict = verification.verdict(combination, device, dtype)
    if verdict.passed:
        return name
    message = (
        f"convit-kernels: backend {name!r} disagrees with the float64 reference on {combination.device_name} "
        f"({combination.key()}): {verdict.detail} [verdict from {verdict.source}]"
    )
    if mode == "strict":
        raise BackendError(message)
    if combination not in _WARNED:
        _WARNED.add(combination)
        warnings.warn(
            f"{message}; backend='auto' uses {FALLBACK!r} for this combination from now on. Please report it to "
            "the convit-kernels issue tracker with this message and the output of `convit-kernels backends`.",
            RuntimeWarning,
            stacklevel=5,
        )
    return FALLBACK


# What `convit-kernels verify-kernels` verifies and stores: ConViT's head dims, its 224 px and 384 px grids.
STORED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
STORED_HEAD_DIMS = HEAD_DIMS
STORED_GRIDS = (GRID_224, GRID_384)


def stored_combinations(device: torch.device) -> list[tuple[str, torch.dtype, int, int, int]]:
    """(backend, dtype, head dim, tokens, grid width) of each combination `verify-kernels` checks on ``device``.

    `convit-kernels gpu-check` runs these in parallel processes first, to fill Triton's cache.
    """
    return [
        (name, dtype, head_dim, grid_h * grid_w, grid_w)
        for name in CHECKED_BACKENDS
        for dtype in STORED_DTYPES
        for head_dim in STORED_HEAD_DIMS
        if not not_supported_reasons(name, device, dtype, head_dim)
        for grid_h, grid_w in STORED_GRIDS
    ]
