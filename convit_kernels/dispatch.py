"""Which backend runs a call: the auto policy, why each backend refuses an input, and on-device verification.

``backend="auto"`` tries the candidates of :data:`AUTO_POLICY` for the device type, best first,
and takes the first that runs here and takes the input; an explicit name runs or refuses with
every reason (:func:`not_supported_reasons`). On a GPU, the first time ``auto`` would hand a
combination (backend, device, capability, dtype, head dim, N, grid width) to one of the project's
own kernels, :func:`choose` runs a small forward + backward of it there against the float64
reference (flash-attention's rule, :mod:`convit_kernels.accuracy`) and keeps the verdict; on a
mismatch or an exception ``auto`` takes :data:`FALLBACK` for that combination and warns once
(CONVIT_KERNELS_SELF_CHECK in :mod:`convit_kernels.settings`). ``convit-kernels verify-kernels``
stores verdicts per device (:mod:`convit_kernels.verdict_cache`) for later processes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from . import _version, backends, settings, verdict_cache
from .accuracy import gate
from .backends import BACKEND_NAMES, BackendError, backend_problem, get_backend
from .reference import gpsa_reference
from .separable import whole_tables_fit

__all__ = [
    "AUTO_POLICY",
    "FALLBACK",
    "CHECKED_BACKENDS",
    "auto_candidates",
    "auto_policy",
    "not_supported_reasons",
    "explain_auto",
    "resolve_backend",
    "choose",
    "Combination",
    "Verdict",
    "verdicts",
    "run_check",
    "check_and_store",
    "stored_combinations",
    "store_verdicts",
    "describe",
]

# Device type -> (backends auto tries, best first; why that order). Other device types: _AUTO_ELSEWHERE.
AUTO_POLICY = {
    "cuda": (
        ("triton", "sdpa"),
        "the Triton kernels where they are built and verified (sm_80+, head dims up to 128), else PyTorch's "
        "SDPA kernels; the CUDA extension runs only when named",
    ),
    "cpu": (("cpu", "sdpa"), "the fused C++ kernel (faster than sdpa in `convit-kernels bench`), else sdpa"),
}
_AUTO_ELSEWHERE = (("sdpa",), "PyTorch's own attention kernels for the device (MPS, XPU, ...)")
# What auto takes instead of a kernel that failed its on-device check: PyTorch's own kernels.
FALLBACK = "sdpa"
# The project's own GPU kernels among auto's candidates: what is verified before it is trusted.
CHECKED_BACKENDS = tuple(name for name in AUTO_POLICY["cuda"][0] if name != FALLBACK)
CHECKED_DEVICE_TYPES = ("cuda",)
# (head dim, N, grid width) verified where a compiled call's own are symbolic: ConViT-S at 224 px.
VERIFIED_WHEN_SYMBOLIC = (48, 196, 14)


def auto_candidates(device_type: str) -> tuple[str, ...]:
    """The backends ``auto`` tries on a device type, best first; "reference" is the last resort."""
    return AUTO_POLICY.get(device_type, _AUTO_ELSEWHERE)[0] + ("reference",)


def auto_policy(device_type: str) -> str:
    """Why ``auto`` tries the backends of :func:`auto_candidates` in that order."""
    return AUTO_POLICY.get(device_type, _AUTO_ELSEWHERE)[1]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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
    raise BackendError(f"no backend takes {_dtype_name(dtype)} inputs on {device}: " + " | ".join(skipped))


def resolve_backend(
    backend: str, device: torch.device, dtype: torch.dtype, head_dim: int, grid: tuple[int, int] | None = None
) -> str:
    """The concrete backend for ``backend`` ("auto" or a name) on inputs of this device, dtype, head dim and grid."""
    device = torch.device(device)
    if backend == "auto":
        return explain_auto(device, dtype, head_dim, grid)[0]
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
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
    names = auto_candidates(device.type) if backend == "auto" else (resolve_backend(backend, device, dtype, 1),)
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
    if backend != "auto" or name not in CHECKED_BACKENDS or torch.device(device).type not in CHECKED_DEVICE_TYPES:
        return name
    if torch.compiler.is_compiling():
        # While tracing the call's size may be symbolic (dynamic shapes): check at ConViT's.
        head_dim, tokens, grid_w = VERIFIED_WHEN_SYMBOLIC
    return _verified(name, device, dtype, head_dim, tokens, grid_w)


# ---------------------------------------------------------------- on-device verification


@dataclass(frozen=True)
class Combination:
    backend: str
    device_name: str
    capability: tuple[int, int]
    dtype: str
    head_dim: int
    tokens: int
    grid_w: int

    def key(self) -> str:
        return "{} sm_{}{} {} d={} N={} W={}".format(
            self.backend, *self.capability, self.dtype, self.head_dim, self.tokens, self.grid_w
        )


@dataclass(frozen=True)
class Verdict:
    passed: bool
    detail: str  # what was wrong, or "matches the float64 reference"
    source: str  # "this process" or the cache file it came from


_VERDICTS: dict[Combination, Verdict] = {}
_WARNED: set[Combination] = set()


def device_name(device: torch.device) -> str:
    """The device's marketing name (tests replace this function)."""
    return torch.cuda.get_device_name(device)


def verdicts() -> dict[Combination, Verdict]:
    """Every verdict known to this process (checked here or read from a cache file)."""
    return dict(_VERDICTS)


def _stack() -> dict:
    """What a stored verdict is valid for: verdicts of other versions are ignored."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # the cuda backend is checked where triton is not installed (no aarch64 dependency)
        triton_version = None
    return {"convit_kernels": _version.__version__, "torch": torch.__version__, "triton": triton_version}


def store_verdicts(name: str, found: dict[Combination, Verdict]) -> str | None:
    """Merge ``found`` into the verdict file of device ``name``; its path, or None (it warned) where it could not."""
    path = verdict_cache.cache_path(name)
    stored = verdict_cache.store_verdicts(path, _stack(), {c.key(): (v.passed, v.detail) for c, v in found.items()})
    return path if stored else None


def _inputs(device, dtype, head_dim, tokens, seed=0):
    generator = torch.Generator().manual_seed(seed)
    heads = 2
    q, k, v = (torch.randn(2, heads, tokens, head_dim, generator=generator, dtype=torch.float64) for _ in range(3))
    pos_weight = torch.tensor([[0.5, -0.5, -1.0], [-0.5, 0.5, -1.0]], dtype=torch.float64)
    pos_weight = pos_weight + 0.1 * torch.randn(heads, 3, generator=generator, dtype=torch.float64)
    pos_bias = torch.zeros(heads, dtype=torch.float64)
    gating = torch.randn(heads, generator=generator, dtype=torch.float64)
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    tensors = [t.to(device, dtype) for t in (q, k, v)] + [
        t.to(device, param_dtype) for t in (pos_weight, pos_bias, gating)
    ]
    grad_out = torch.randn(2, heads, tokens, head_dim, generator=generator, dtype=torch.float64).to(device)
    return tensors, grad_out


def _reference_results(inputs, grad_out, grid, dtype=None):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    out = gpsa_reference(*leaves, grid, leaves[0].shape[-1] ** -0.5)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return [t.detach().double() for t in (out, *grads)]


def _backend_results(name, inputs, grad_out, grid):
    """The backend's output and gradients, through its own interface (the kernels, not the autograd glue)."""
    impl = get_backend(name)
    q, k, v, pos_weight, pos_bias, gating = inputs
    scale = q.shape[-1] ** -0.5
    if not impl.is_op_pair:
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = impl.attention(*leaves, grid, scale)
        grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
        return [t.detach().double() for t in (out, *grads)]
    precision = torch.get_float32_matmul_precision()
    out, state = impl.forward(q, k, v, pos_weight, gating, grid[1], scale, precision)
    dq, dk, dv, dw, dgate = impl.backward(
        grad_out.to(q.dtype).transpose(1, 2), q, k, v, pos_weight, gating, state, grid[1], scale, precision
    )
    results = [out.transpose(1, 2), dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), dw]
    return [t.double() for t in results] + [torch.zeros_like(pos_bias, dtype=torch.float64), dgate.double()]


def run_check(
    backend: str, device: torch.device, dtype: torch.dtype, head_dim: int, tokens: int, grid_w: int
) -> str | None:
    """None when ``backend`` matches the float64 reference on ``device`` at this size, else what is wrong."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    grid = (tokens // grid_w, grid_w)
    # Under torch.compile this runs while the graph is traced: on real tensors, with autograd on.
    with unset_fake_temporarily(), torch.inference_mode(False), torch.enable_grad():
        inputs, grad_out = _inputs(device, dtype, head_dim, tokens)
        exact = _reference_results(inputs, grad_out, grid, torch.float64)
        same_precision = _reference_results(inputs, grad_out, grid)
        candidate = _backend_results(backend, inputs, grad_out, grid)
    names = ["out", "q", "k", "v", "pos_weight", "pos_bias", "gating_param"]
    return gate(candidate, exact, same_precision, names, dtype)


def _verdict(combination: Combination, device: torch.device, dtype: torch.dtype) -> Verdict:
    if combination in _VERDICTS:
        return _VERDICTS[combination]
    path = verdict_cache.cache_path(combination.device_name)
    stored = verdict_cache.read_verdicts(path, _stack()).get(combination.key())
    if stored is not None:
        verdict = Verdict(*stored, path)
    else:
        c = combination
        try:
            problem = run_check(c.backend, device, dtype, c.head_dim, c.tokens, c.grid_w)
        except Exception as exc:  # a kernel that cannot run here fails its check; it never breaks the caller
            problem = f"raised {type(exc).__name__}: {exc}"
        verdict = Verdict(problem is None, problem or "matches the float64 reference", "this process")
    _VERDICTS[combination] = verdict
    return verdict


def _combination(name, device, dtype, head_dim, tokens, grid_w) -> Combination:
    capability = tuple(backends.cuda_capability(device)) if device.type == "cuda" else (0, 0)
    return Combination(name, device_name(device), capability, _dtype_name(dtype), head_dim, tokens, grid_w)


# A pure function of its constant arguments for the life of the process (verdicts are kept): under
# torch.compile it runs once while tracing, outside the graph.
@torch.compiler.assume_constant_result
def _verified(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, tokens: int, grid_w: int) -> str:
    """``name`` if it passed its on-device check for this combination (or checks are off), else ``FALLBACK``."""
    mode = settings.self_check_mode()
    if mode == "off":
        return name
    combination = _combination(name, device, dtype, head_dim, tokens, grid_w)
    verdict = _verdict(combination, device, dtype)
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
STORED_HEAD_DIMS = (48, 64)
STORED_GRIDS = ((14, 14), (24, 24))


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


def check_and_store(device: torch.device) -> dict[Combination, Verdict]:
    """Verify every checked backend that runs on ``device`` at the stored combinations; write the verdict file."""
    found = {}
    for name, dtype, head_dim, tokens, grid_w in stored_combinations(device):
        combination = _combination(name, device, dtype, head_dim, tokens, grid_w)
        found[combination] = _verdict(combination, device, dtype)
    if found:
        store_verdicts(device_name(device), found)
    return found


def describe() -> list[str]:
    """One line per verdict known to this process, for `convit-kernels backends`."""
    return [
        f"{c.device_name}: {c.key()}: {'passed' if v.passed else 'FAILED, auto uses ' + FALLBACK}"
        f" ({v.detail}; {v.source})"
        for c, v in sorted(_VERDICTS.items(), key=lambda item: item[0].key())
    ]
