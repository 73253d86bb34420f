"""On-device verification of a backend: a small forward + backward against the float64 reference, and its verdicts.

:func:`run_check` runs one combination (backend, device, dtype, head dim, N, grid width) through the
backend's own interface (the kernels, not the autograd glue) and applies flash-attention's rule
(:mod:`convit_kernels.accuracy`). :func:`verdict` gives a combination's verdict once per process:
from this process's memo, else from the device's verdict file (:mod:`convit_kernels.verdict_cache`),
else by running the check; a check that raises fails, it never breaks the caller. When a verdict is
needed, and what ``auto`` does with a failed one, is :mod:`convit_kernels.dispatch`'s policy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from . import _version, backends, verdict_cache
from .accuracy import accuracy_failure
from .dtypes import dtype_name
from .reference import gpsa_reference

__all__ = [
    "Combination",
    "Verdict",
    "combination",
    "device_name",
    "known_verdict",
    "verdict",
    "verdicts",
    "run_check",
    "check_and_store",
    "store_verdicts",
    "describe",
]

PASSED = "matches the float64 reference"


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
    detail: str  # what was wrong, or PASSED
    source: str  # "this process" or the cache file it came from


_VERDICTS: dict[Combination, Verdict] = {}


def device_name(device: torch.device) -> str:
    """The device's marketing name (tests replace this function)."""
    return torch.cuda.get_device_name(device)


def combination(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, tokens: int, grid_w: int):
    """The :class:`Combination` of backend ``name`` at this size on ``device``."""
    capability = tuple(backends.cuda_capability(device)) if device.type == "cuda" else (0, 0)
    return Combination(name, device_name(device), capability, dtype_name(dtype), head_dim, tokens, grid_w)


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
    impl = backends.get_backend(name)
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
    return accuracy_failure(candidate, exact, same_precision, names, dtype)


def known_verdict(combination: Combination) -> Verdict | None:
    """The verdict of ``combination`` this process has or its device's verdict file holds; None: it needs a check."""
    if combination in _VERDICTS:
        return _VERDICTS[combination]
    path = verdict_cache.cache_path(combination.device_name)
    stored = verdict_cache.read_verdicts(path, _stack()).get(combination.key())
    if stored is None:
        return None
    _VERDICTS[combination] = Verdict(*stored, path)
    return _VERDICTS[combination]


def verdict(combination: Combination, device: torch.device, dtype: torch.dtype) -> Verdict:
    """The verdict of ``combination``: :func:`known_verdict`, else the check run now (once per process)."""
    known = known_verdict(combination)
    if known is not None:
        return known
    c = combination
    try:
        problem = run_check(c.backend, device, dtype, c.head_dim, c.tokens, c.grid_w)
    except Exception as exc:  # a kernel that cannot run here fails its check; it never breaks the caller
        problem = f"raised {type(exc).__name__}: {exc}"
    _VERDICTS[combination] = Verdict(problem is None, problem or PASSED, "this process")
    return _VERDICTS[combination]


def check_and_store(
    device: torch.device, combinations: Iterable[tuple[str, torch.dtype, int, int, int]]
) -> dict[Combination, Verdict]:
    """The verdicts of (backend, dtype, head dim, tokens, grid width) on ``device``; stored in its verdict file."""
    found = {}
    for name, dtype, head_dim, tokens, grid_w in combinations:
        c = combination(name, device, dtype, head_dim, tokens, grid_w)
        found[c] = verdict(c, device, dtype)
    if found:
        store_verdicts(device_name(device), found)
    return found


def describe(fallback: str) -> list[str]:
    """One line per verdict known to this process (``fallback``: what auto takes instead of a failed backend)."""
    return [
        f"{c.device_name}: {c.key()}: {'passed' if v.passed else 'FAILED, auto uses ' + fallback}"
        f" ({v.detail}; {v.source})"
        for c, v in sorted(_VERDICTS.items(), key=lambda item: item[0].key())
    ]
