"""On a GPU, verify before trusting: a one-time on-device check of the kernels ``backend="auto"`` picks.

The compiled Triton and CUDA kernels run code the CPU tests never execute
(bf16 / TF32 tensor-core paths, wgmma). So the first time ``auto`` would hand
a call on a device to one of them, :func:`checked_backend` runs a small
forward + backward of that backend on the device against the float64
reference there (flash-attention's rule, :mod:`convit_kernels.accuracy`) and
keeps the verdict for the process. A combination is (backend, device,
compute capability, dtype, head dim, N, grid width): N decides every key path
a kernel takes (one key tile or several, masked tails), so checking at the
call's own N covers the path the call runs. On a mismatch, or an exception,
``auto`` uses ``sdpa`` for that combination from then on and warns once; a
training step never raises for it. ``convit-kernels gpu-check`` stores its
verdicts in a JSON file per device name in the user's cache folder
(:func:`cache_path`), which later processes read instead of checking again; a file
they cannot read or write never breaks a call (:mod:`convit_kernels.verdict_cache`).

``CONVIT_KERNELS_SELF_CHECK``: ``1`` (default) checks, ``0`` trusts the kernels
(benchmarks), ``strict`` raises :class:`~convit_kernels.backends.BackendError`
instead of falling back.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from . import _version, backends, verdict_cache
from .accuracy import gate
from .backends import BackendError

__all__ = [
    "CHECKED_BACKENDS",
    "FALLBACK",
    "Combination",
    "Verdict",
    "mode",
    "checked_backend",
    "run_check",
    "cache_path",
    "store_verdicts",
    "verdicts",
    "check_and_store",
    "describe",
    "main",
]

CHECKED_BACKENDS = ("triton", "cuda")
CHECKED_DEVICE_TYPES = ("cuda",)
FALLBACK = "sdpa"
MODE_ENV = "CONVIT_KERNELS_SELF_CHECK"
_MODES = {"1": "on", "0": "off", "strict": "strict"}


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


def mode() -> str:
    """ "on", "off" or "strict", from CONVIT_KERNELS_SELF_CHECK."""
    value = os.environ.get(MODE_ENV, "1").strip().lower()
    if value not in _MODES:
        raise ValueError(f"{MODE_ENV} must be 1, 0 or strict, got {value!r}")
    return _MODES[value]


def device_name(device: torch.device) -> str:
    """The device's marketing name (tests replace this function)."""
    return torch.cuda.get_device_name(device)


def cache_path(name: str) -> str:
    """The verdict file of a device name: $XDG_CACHE_HOME (or ~/.cache)/convit_kernels/self-check/<name>.json."""
    return verdict_cache.cache_path(name)


def _stack() -> dict:
    """What a stored verdict is valid for: verdicts of other versions are ignored."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # the cuda backend is checked where triton is not installed (no aarch64 dependency)
        triton_version = None
    return {"convit_kernels": _version.__version__, "torch": torch.__version__, "triton": triton_version}


def store_verdicts(name: str, found: dict[Combination, Verdict]) -> str | None:
    """Merge ``found`` into the device's verdict file (written atomically); its path, or None (and a warning)."""
    path = cache_path(name)
    stored = verdict_cache.store_verdicts(path, _stack(), {c.key(): (v.passed, v.detail) for c, v in found.items()})
    return path if stored else None


def verdicts() -> dict[Combination, Verdict]:
    """Every verdict known to this process (checked here or read from a cache file)."""
    return dict(_VERDICTS)


def _inputs(device, dtype, head_dim, tokens, grid_w, seed=0):
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


def _results(inputs, grad_out, grid, backend, dtype=None):
    from .op import gpsa_attention

    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    out = gpsa_attention(*leaves, grid_size=grid, backend=backend)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True)
    return [
        t.detach().double() for t in [out] + [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    ]


def run_check(
    backend: str, device: torch.device, dtype: torch.dtype, head_dim: int, tokens: int, grid_w: int
) -> str | None:
    """None when ``backend`` matches the float64 reference on ``device`` at this size, else what is wrong."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    grid = (tokens // grid_w, grid_w)
    # Under torch.compile this runs while the graph is traced: on real tensors, with autograd on.
    with unset_fake_temporarily(), torch.inference_mode(False), torch.enable_grad():
        inputs, grad_out = _inputs(device, dtype, head_dim, tokens, grid_w)
        exact = _results(inputs, grad_out, grid, "reference", torch.float64)
        same_precision = _results(inputs, grad_out, grid, "reference")
        candidate = _results(inputs, grad_out, grid, backend)
    names = ["out", "q", "k", "v", "pos_weight", "pos_bias", "gating_param"]
    return gate(candidate, exact, same_precision, names, dtype)


def _verdict(combination: Combination, device: torch.device, dtype: torch.dtype) -> Verdict:
    if combination in _VERDICTS:
        return _VERDICTS[combination]
    path = cache_path(combination.device_name)
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
    dtype_name = str(dtype).replace("torch.", "")
    return Combination(name, device_name(device), capability, dtype_name, head_dim, tokens, grid_w)


# A pure function of its constant arguments for the life of the process (verdicts are kept): under
# torch.compile it runs once while tracing, outside the graph.
@torch.compiler.assume_constant_result
def checked_backend(
    name: str, device: torch.device, dtype: torch.dtype, head_dim: int, tokens: int, grid_w: int
) -> str:
    """``name`` if it passed (or needs no) on-device check for this combination, else ``FALLBACK``."""
    if name not in CHECKED_BACKENDS or device.type not in CHECKED_DEVICE_TYPES or mode() == "off":
        return name
    combination = _combination(name, device, dtype, head_dim, tokens, grid_w)
    verdict = _verdict(combination, device, dtype)
    if verdict.passed:
        return name
    message = (
        f"convit-kernels: backend {name!r} disagrees with the float64 reference on {combination.device_name} "
        f"({combination.key()}): {verdict.detail} [verdict from {verdict.source}]"
    )
    if mode() == "strict":
        raise BackendError(message)
    if combination not in _WARNED:
        _WARNED.add(combination)
        warnings.warn(
            f"{message}; backend='auto' uses {FALLBACK!r} for this combination from now on. Please report it to "
            "the convit-kernels issue tracker with this message and the output of `convit-kernels backends`.",
            RuntimeWarning,
            stacklevel=3,
        )
    return FALLBACK


# What `convit-kernels self-check` verifies and stores: ConViT's head dims, its 224 px and 384 px grids.
STORED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
STORED_HEAD_DIMS = (48, 64)
STORED_GRIDS = ((14, 14), (24, 24))


def check_and_store(device: torch.device) -> dict[Combination, Verdict]:
    """Check every available checked backend on ``device`` at the stored combinations; write the verdict file."""
    found = {}
    for name in CHECKED_BACKENDS:
        for dtype in STORED_DTYPES:
            for head_dim in STORED_HEAD_DIMS:
                try:
                    backends.resolve_backend(name, device, dtype, head_dim)
                except BackendError:
                    continue
                for grid_h, grid_w in STORED_GRIDS:
                    combination = _combination(name, device, dtype, head_dim, grid_h * grid_w, grid_w)
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


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="convit-kernels self-check",
        description="Check the Triton / CUDA kernels on every CUDA device here against the float64 reference "
        "and store the verdicts, which backend='auto' then reads instead of checking again.",
    )
    parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("self-check: no CUDA GPU here, nothing to check", flush=True)
        return 2
    failed = 0
    for index in range(torch.cuda.device_count()):
        device = torch.device("cuda", index)
        found = check_and_store(device)
        failed += sum(not v.passed for v in found.values())
        path = cache_path(device_name(device))
        held = verdict_cache.read_verdicts(path, _stack())
        where = f"stored in {path}" if all(c.key() in held for c in found) else "not stored (see the warning)"
        print(f"{device_name(device)}: {len(found)} combinations checked, {where}")
    print("\n".join(describe()))
    return 1 if failed else 0
