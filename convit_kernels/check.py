"""`convit-kernels check` and `convit-kernels backends`: what runs here, and does it agree with timm."""

from __future__ import annotations

import argparse
import copy
import time

import torch

from . import self_check
from .backends import BACKEND_NAMES, BackendError, auto_policy, available_backends, explain_auto, resolve_backend
from .module import FusedGPSA

# What `backends` asks auto about: ConViT's head dim, and the dtypes a model trains in.
_AUTO_HEAD_DIM = 48
_AUTO_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _devices():
    return [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


def main_backends(argv=None) -> int:
    argparse.ArgumentParser(
        prog="convit-kernels backends",
        description="List the GPSA backends, which ones run here, and what backend='auto' picks on each device.",
    ).parse_args(argv)
    for name, status in available_backends().items():
        print(f"{name:10s} {'yes' if status.available else 'no ':3s}  {status.reason}")
    from .backends import extension

    print(f"\nC++/CUDA extension (this torch: {torch.__version__}):")
    for line in extension.describe():
        print(f"  {line}")
    print(f"\nbackend='auto' (head dim {_AUTO_HEAD_DIM}):")
    for device in _devices():
        print(f"  on {device}: {auto_policy(device.type)}")
        for dtype in _AUTO_DTYPES:
            name, skipped = explain_auto(device, dtype, _AUTO_HEAD_DIM)
            why = f" (skipped {'; '.join(skipped)})" if skipped else ""
            if name in self_check.CHECKED_BACKENDS:  # what auto runs after the on-device check, at N = 196
                verified = self_check.checked_backend(name, device, dtype, _AUTO_HEAD_DIM, 196, 14)
                why += "" if verified == name else f" -> {verified} (failed its on-device check)"
            print(f"    {str(dtype).replace('torch.', ''):9s} -> {name}{why}")
    print(f"\non-device checks ({self_check.MODE_ENV}={self_check.mode()}):")
    for line in self_check.describe() or ["none in this process (they run on CUDA devices only)"]:
        print(f"  {line}")
    return 0


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="convit-kernels check",
        description="Run timm's GPSA and FusedGPSA on one ConViT-Ti layer (dim 192, 4 heads, 14 x 14 patches) "
        "and print how far apart their outputs and gradients are.",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--backend", default="auto", choices=("auto",) + BACKEND_NAMES)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        backend = resolve_backend(args.backend, torch.device(device), torch.float32, 48)
    except BackendError as exc:
        parser.error(str(exc))

    from .module import _timm_convit

    torch.manual_seed(args.seed)
    stock = _timm_convit().GPSA(192, num_heads=4, locality_strength=1.0, device=device)
    stock.local_init()
    fused = FusedGPSA.from_gpsa(copy.deepcopy(stock), backend=backend)
    x = torch.randn(args.batch, 196, 192, device=device)
    print(f"ConViT-Ti GPSA layer, x {tuple(x.shape)} float32 on {device}; fused backend: {backend}")
    results = {}
    for name, layer in (("timm", stock), ("fused", fused)):
        layer.zero_grad()
        start = time.perf_counter()
        out = layer(x)
        out.square().mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        results[name] = (out.detach(), grads, elapsed)
    out_t, grads_t, time_t = results["timm"]
    out_f, grads_f, time_f = results["fused"]
    print(f"  output            max rel. error {_relative_error(out_f, out_t):.2e}")
    for n in grads_t:
        if n == "pos_proj.bias":
            fused_bias, timm_bias = grads_f[n].abs().max().item(), grads_t[n].abs().max().item()
            print(f"  grad {n:14s} fused {fused_bias:.1e} (exactly 0), timm {timm_bias:.1e} (rounding)")
            continue
        print(f"  grad {n:14s} max rel. error {_relative_error(grads_f[n], grads_t[n]):.2e}")
    print(f"  first forward+backward: timm {time_t * 1e3:.1f} ms, fused {time_f * 1e3:.1f} ms (one run, no warm-up)")
    return 0
