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


# Agreement `check` requires in float32, as a fraction of each tensor's largest value: the tests hold the
# backends to 2e-5 on the CPU and to 1e-4 on GPUs, where Triton's fp32 dots run as 3xTF32.
TOLERANCE = 1e-4


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _run(layer: torch.nn.Module, x: torch.Tensor, device: str):
    """(output, parameter gradients, seconds) of one forward and backward."""
    layer.zero_grad()
    start = time.perf_counter()
    out = layer(x)
    out.square().mean().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return out.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}, elapsed


def _compare(timm_run, fused_run) -> list[str]:
    """Print each tensor's error; return the names of those out of tolerance."""
    (out_t, grads_t, _), (out_f, grads_f, _) = timm_run, fused_run
    failed = []
    error = _relative_error(out_f, out_t)
    print(f"  output            max rel. error {error:.2e}")
    if not error <= TOLERANCE:  # NaN fails too
        failed.append("output")
    for n in grads_t:
        if n == "pos_proj.bias":
            # Exactly zero (the bias cancels in the positional softmax); timm's is rounding noise.
            fused_bias, timm_bias = grads_f[n].abs().max().item(), grads_t[n].abs().max().item()
            print(f"  grad {n:14s} fused {fused_bias:.1e} (exactly 0), timm {timm_bias:.1e} (rounding)")
            error = fused_bias / grads_t["pos_proj.weight"].abs().max().clamp_min(1e-30).item()
        else:
            error = _relative_error(grads_f[n], grads_t[n])
            print(f"  grad {n:14s} max rel. error {error:.2e}")
        if not error <= TOLERANCE:
            failed.append(f"grad {n}")
    return failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="convit-kernels check",
        description="Run timm's GPSA and FusedGPSA on one ConViT-Ti layer (dim 192, 4 heads, 14 x 14 patches), "
        f"print how far apart their outputs and gradients are, and exit 1 if any is beyond {TOLERANCE:g} "
        "of its scale.",
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
    timm_run, fused_run = _run(stock, x, device), _run(fused, x, device)
    failed = _compare(timm_run, fused_run)
    print(
        f"  first forward+backward: timm {timm_run[2] * 1e3:.1f} ms, fused {fused_run[2] * 1e3:.1f} ms "
        "(one run, no warm-up)"
    )
    if failed:
        print(f"FAIL: backend {backend!r} disagrees with timm beyond {TOLERANCE:g} of the scale: {', '.join(failed)}")
        return 1
    print(f"ok: backend {backend!r} agrees with timm within {TOLERANCE:g} of each tensor's scale")
    return 0
