"""`convit-kernels backends` (what runs here and what auto picks) and `verify-kernels` (the on-device check)."""

from __future__ import annotations

import argparse
import sys

import torch

from . import dispatch, extension_loader, settings, verdict_cache
from .backends import BACKEND_NAMES, available_backends, backend_problem, get_backend

__all__ = ["list_backends", "verify_kernels"]

# What `backends` asks auto about: ConViT's head dim and grid, and the dtypes a model trains in.
_AUTO_HEAD_DIM = 48
_AUTO_GRID = (14, 14)
_AUTO_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _devices():
    return [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


def list_backends(argv=None) -> int:
    argparse.ArgumentParser(
        prog="convit-kernels backends",
        description="List the GPSA backends, which ones run here, and what backend='auto' picks on each device.",
    ).parse_args(argv)
    for name, status in available_backends().items():
        print(f"{name:10s} {'yes' if status.available else 'no ':3s}  {status.reason}")
    print("\nfp32 gradients at content logits of size L:")
    for name in BACKEND_NAMES:
        if backend_problem(name) is None:
            print(f"  {name:10s} {get_backend(name).large_logits}")
    print(f"\nC++/CUDA extension (this torch: {torch.__version__}):")
    for line in extension_loader.describe():
        print(f"  {line}")
    print(f"\nbackend='auto' (head dim {_AUTO_HEAD_DIM}):")
    tokens, grid_w = _AUTO_GRID[0] * _AUTO_GRID[1], _AUTO_GRID[1]
    for device in _devices():
        print(f"  on {device}: {dispatch.auto_policy(device.type)}")
        for dtype in _AUTO_DTYPES:
            name, skipped = dispatch.explain_auto(device, dtype, _AUTO_HEAD_DIM)
            why = f" (skipped {' | '.join(skipped)})" if skipped else ""
            chosen = dispatch.choose("auto", device, dtype, _AUTO_HEAD_DIM, tokens, grid_w)
            why += "" if chosen == name else f" -> {chosen} (failed its on-device check)"
            print(f"    {str(dtype).replace('torch.', ''):9s} -> {name}{why}")
    print(f"\non-device checks (CONVIT_KERNELS_SELF_CHECK={settings.self_check_mode()}):")
    for line in dispatch.describe() or ["none in this process (they run on CUDA devices only)"]:
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
        found = dispatch.check_and_store(device)
        failed += sum(not v.passed for v in found.values())
        path = verdict_cache.cache_path(dispatch.device_name(device))
        print(f"{dispatch.device_name(device)}: {len(found)} combinations checked, stored in {path}")
    print("\n".join(dispatch.describe()))
    return 1 if failed else 0
