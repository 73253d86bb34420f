"""`convit-kernels backends` (what runs here and what auto picks) and `verify-kernels` (the on-device check)."""

from __future__ import annotations

import argparse
import sys

import torch

from . import dispatch, extension_loader, settings, verdict_cache, verification
from .backends import available_backends, backend_names, backend_problem, get_backend
from .convit_shapes import GRID_224, HEAD_DIM
from .dtypes import dtype_name

__all__ = ["list_backends", "verify_kernels"]

# What `backends` asks auto about: ConViT's head dim and 224 px grid, and the dtypes a model trains in.
_AUTO_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _devices():
    return [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


def _auto_choice(device: torch.device, dtype: torch.dtype) -> str:
    """One line: what auto picks for ConViT's shape, saying first when that takes an on-device check now."""
    tokens, grid_w = GRID_224[0] * GRID_224[1], GRID_224[1]
    name, skipped = dispatch.explain_auto(device, dtype, HEAD_DIM, GRID_224)
    why = f" (skipped {' | '.join(skipped)})" if skipped else ""
    if dispatch.verified_before_use(name, device) and settings.self_check_mode() != "off":
        combination = verification.combination(name, device, dtype, HEAD_DIM, tokens, grid_w)
        if verification.known_verdict(combination) is None:
            check = f"running the on-device check of {name} ({combination.key()}) ..."
            print(f"    {dtype_name(dtype):9s}    {check}", flush=True)
        chosen = dispatch.choose(dispatch.AUTO, device, dtype, HEAD_DIM, tokens, grid_w)
        why += "" if chosen == name else f" -> {chosen} (failed its on-device check)"
    return f"    {dtype_name(dtype):9s} -> {name}{why}"


def list_backends(argv=None) -> int:
    argparse.ArgumentParser(
        prog="convit-kernels backends",
        description="List the GPSA backends, which ones run here, and what backend='auto' picks on each device "
        "(on a GPU, running the on-device check of auto's kernel first where no verdict is stored).",
    ).parse_args(argv)
    for name, status in available_backends().items():
        print(f"{name:10s} {'yes' if status.available else 'no ':3s}  {status.reason}")
    print("\nfp32 gradients at content logits of size L:")
    for name in backend_names():
        if backend_problem(name) is None:
            print(f"  {name:10s} {get_backend(name).large_logits}")
    print(f"\nC++/CUDA extension (this torch: {torch.__version__}):")
    for line in extension_loader.describe():
        print(f"  {line}")
    print(f"\nbackend='auto' (head dim {HEAD_DIM}, {GRID_224[0]} x {GRID_224[1]} grid):")
    for device in _devices():
        print(f"  on {device}: {dispatch.auto_policy(device.type)}")
        for dtype in _AUTO_DTYPES:
            print(_auto_choice(device, dtype))
    print(f"\non-device checks (CONVIT_KERNELS_SELF_CHECK={settings.self_check_mode()}):")
    for line in verification.describe(dispatch.FALLBACK) or ["none in this process (they run on CUDA devices only)"]:
        print(f"  {line}")
    return 0


def verify_kernels(argv=None) -> int:
    argparse.ArgumentParser(
        prog="convit-kernels verify-kernels",
        description="Check the project's GPU kernels on every CUDA device here against the float64 reference "
        "and store the verdicts, which backend='auto' then reads instead of checking again.",
    ).parse_args(argv)
    if not torch.cuda.is_available():
        print("verify-kernels: no CUDA GPU here, nothing to check", file=sys.stderr, flush=True)
        return 2
    failed = 0
    for index in range(torch.cuda.device_count()):
        device = torch.device("cuda", index)
        found = verification.check_and_store(device, dispatch.stored_combinations(device))
        failed += sum(not v.passed for v in found.values())
        path = verdict_cache.cache_path(verification.device_name(device))
        print(f"{verification.device_name(device)}: {len(found)} combinations checked, stored in {path}")
    print("\n".join(verification.describe(dispatch.FALLBACK)))
    return 1 if failed else 0
