"""`convit-kernels compare-timm` (alias `check`): FusedGPSA against timm's GPSA on one ConViT-Ti layer."""

from __future__ import annotations

import argparse
import copy
import time

import torch

from .arguments import SEED, SIZE
from .backends import BACKEND_NAMES, BackendError
from .convit_shapes import FAMILY_HEADS, GRID_224, HEAD_DIM, TOKENS_224
from .dispatch import resolve_backend
from .module import FusedGPSA, timm_convit

# Agreement `compare-timm` requires in float32, as a fraction of each tensor's largest value: the tests hold the
# backends to 2e-5 on the CPU and to 1e-4 on GPUs, where Triton's fp32 dots run as 3xTF32.
TOLERANCE = 1e-4
# The layer compared: ConViT-Ti's, at 224 px.
HEADS = FAMILY_HEADS["Ti"]
DIM = HEADS * HEAD_DIM


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
            # Zero in exact arithmetic (docs/design.md, "The positional bias"): the fused backends return
            # exact zeros, timm's math (the reference backend's too) rounding noise.
            fused_bias, timm_bias = grads_f[n].abs().max().item(), grads_t[n].abs().max().item()
            what = "exactly 0" if fused_bias == 0 else "rounding"
            print(f"  grad {n:14s} fused {fused_bias:.1e} ({what}), timm {timm_bias:.1e} (rounding)")
            error = fused_bias / grads_t["pos_proj.weight"].abs().max().clamp_min(1e-30).item()
        else:
            error = _relative_error(grads_f[n], grads_t[n])
            print(f"  grad {n:14s} max rel. error {error:.2e}")
        if not error <= TOLERANCE:
            failed.append(f"grad {n}")
    return failed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convit-kernels compare-timm",
        description="Run timm's GPSA and FusedGPSA on one ConViT-Ti layer "
        f"(dim {DIM}, {HEADS} heads, {GRID_224[0]} x {GRID_224[1]} patches), "
        f"print how far apart their outputs and gradients are, and exit 1 if any is beyond {TOLERANCE:g} "
        "of its scale.",
    )
    parser.add_argument("--batch", type=SIZE, default=8, help="images per batch (default: %(default)s)")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=("auto",) + BACKEND_NAMES,
        help="FusedGPSA's backend (default: %(default)s)",
    )
    parser.add_argument("--seed", type=SEED, default=0, help="(default: %(default)s)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        backend = resolve_backend(args.backend, torch.device(device), torch.float32, HEAD_DIM)
    except BackendError as exc:
        parser.error(str(exc))

    torch.manual_seed(args.seed)
    stock = timm_convit().GPSA(DIM, num_heads=HEADS, locality_strength=1.0, device=device)
    stock.local_init()
    fused = FusedGPSA.from_gpsa(copy.deepcopy(stock), backend=backend)
    x = torch.randn(args.batch, TOKENS_224, DIM, device=device)
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
