"""Time the "cpu" backend (C++ extension) against the SDPA decomposition and timm's eager GPSA, side by side.

Attention core only (q, k, v -> output), fp32, N = 196, d = 48, at the ConViT-Ti/S/B
batch and head counts of the project's performance targets. The three
implementations run round-robin in one process, and each reports its fastest
round, so that load from other processes affects them alike.

    python benchmarks/cpu_extension.py [--rounds 7] [--threads 2] [--shapes Ti S B]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from convit_kernels import gpsa_attention, gpsa_reference
from convit_kernels.reference import positional_probs

SHAPES = {"Ti": (64, 4), "S": (32, 9), "B": (16, 16)}  # (batch, heads) of the targets
N, D, GRID = 196, 48, (14, 14)


def sdpa_decomposition(q, k, v, pos_weight, pos_bias, gating_param):
    """(1 - g) SDPA(q, k, v) + g P v, with P built once per call: the baseline a fused kernel has to beat."""
    g = torch.sigmoid(gating_param).view(1, -1, 1, 1)
    P = positional_probs(pos_weight, *GRID)
    return (1 - g) * F.scaled_dot_product_attention(q, k, v) + g * (P @ v)


def fused(q, k, v, pos_weight, pos_bias, gating_param):
    return gpsa_attention(q, k, v, pos_weight, pos_bias, gating_param, backend="cpu")


def timm_eager(q, k, v, pos_weight, pos_bias, gating_param):
    return gpsa_reference(q, k, v, pos_weight, pos_bias, gating_param, GRID, D**-0.5)


IMPLEMENTATIONS = {"fused cpu": fused, "sdpa decomposition": sdpa_decomposition, "timm eager": timm_eager}


def make_inputs(batch, heads):
    # q, k, v as views of one projection output (B x N x 3 x H x d), as in the model.
    q, k, v = torch.randn(batch, N, 3, heads, D).permute(2, 0, 3, 1, 4).unbind(0)
    pos_weight = torch.randn(heads, 3)
    pos_weight[:, 2] = -1
    return [q, k, v, pos_weight, torch.zeros(heads), torch.randn(heads)]


def timers(inputs):
    """name -> (forward, forward + backward) callables."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    grad_out = torch.randn_like(inputs[0])
    result = {}
    for name, fn in IMPLEMENTATIONS.items():

        def forward(fn=fn):
            with torch.no_grad():
                fn(*inputs)

        def forward_backward(fn=fn):
            torch.autograd.grad(fn(*leaves), leaves, grad_out, allow_unused=True)

        result[name] = (forward, forward_backward)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"threads={torch.get_num_threads()}  fp32  N={N} d={D}  best of {args.rounds} rounds, ms")
    for shape in args.shapes:
        batch, heads = SHAPES[shape]
        fns = timers(make_inputs(batch, heads))
        best = {(name, mode): float("inf") for name in fns for mode in (0, 1)}
        for name in fns:  # warm-up
            for fn in fns[name]:
                fn()
        for _ in range(args.rounds):
            for name in fns:
                for mode, fn in enumerate(fns[name]):
                    start = time.perf_counter()
                    fn()
                    best[name, mode] = min(best[name, mode], (time.perf_counter() - start) * 1e3)
        for mode, label in enumerate(("fwd", "fwd+bwd")):
            ours = best["fused cpu", mode]
            sdpa, timm = best["sdpa decomposition", mode], best["timm eager", mode]
            print(
                f"ConViT-{shape:2s} B={batch:2d} H={heads:2d} {label:8s} fused {ours:6.1f}  sdpa {sdpa:6.1f}  "
                f"timm {timm:6.1f}  | x{sdpa / ours:.2f} vs sdpa  x{timm / ours:.2f} vs timm",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
