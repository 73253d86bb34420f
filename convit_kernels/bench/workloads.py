"""What the bench measures: ConViT attention shapes, one benchmark point (Workload), its inputs (Problem), FLOPs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from timm.models.convit import GPSA

from ..convit_shapes import FAMILY_HEADS, HEAD_DIMS, IMAGE_SIZES, grid_side
from ..dtypes import dtype_name

LEVELS = ("core", "module")  # attention core (q, k, v given) | whole GPSA layer with its projections
PASSES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Shape:
    """One GPSA layer shape: heads x head_dim channels over a grid x grid patch grid."""

    name: str
    heads: int
    head_dim: int
    grid: int

    @property
    def tokens(self) -> int:
        return self.grid * self.grid

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim


def _convit_shapes() -> dict:
    """ConViT-Ti/S/B (d = 48) and Ti+/S+/B+ (d = 64) at 224 px (14 x 14 patches) and 384 px (24 x 24)."""
    shapes = {}
    for family, heads in FAMILY_HEADS.items():
        for plus, head_dim in zip(("", "+"), HEAD_DIMS):
            for pixels in IMAGE_SIZES:
                name = f"{family}{plus}-{pixels}"
                shapes[name] = Shape(name, heads, head_dim, grid_side(pixels))
    return shapes


CONVIT_SHAPES = _convit_shapes()
# A few-millisecond shape for the bench's own tests; never part of a default run.
SHAPES = {**CONVIT_SHAPES, "toy": Shape("toy", heads=2, head_dim=8, grid=4)}


def attention_flops(shape: Shape, batch: int, pass_: str) -> float:
    """FLOPs of the fused form: forward 4 B H N^2 d (q k^T and one M v).

    Backward convention: 10 B H N^2 d (q k^T recomputed, dO v^T, dv, dq, dk:
    five N x N x d products), so fwd+bwd counts 14 B H N^2 d = 3.5x the forward.
    Every implementation is credited with these FLOPs, whatever it computes.
    """
    forward = 4.0 * batch * shape.heads * shape.tokens**2 * shape.head_dim
    return forward if pass_ == "fwd" else 3.5 * forward


def projection_flops(shape: Shape, batch: int, pass_: str) -> float:
    """FLOPs of the layer's projections (qk: C -> 2C, v and proj: C -> C): 8 B N C^2 forward, twice that backward."""
    forward = 8.0 * batch * shape.tokens * shape.dim**2
    return forward if pass_ == "fwd" else 3.0 * forward


@dataclass(frozen=True)
class Workload:
    """One benchmark point; every implementation of its level is timed on it side by side."""

    level: str
    shape: Shape
    batch: int
    dtype: torch.dtype
    device: torch.device

    def flops(self, pass_: str) -> float:
        attention = attention_flops(self.shape, self.batch, pass_)
        return attention + (projection_flops(self.shape, self.batch, pass_) if self.level == "module" else 0.0)

    @property
    def dtype_name(self) -> str:
        return {v: k for k, v in DTYPES.items()}.get(self.dtype, dtype_name(self.dtype))

    @property
    def label(self) -> str:
        return f"{self.level} {self.shape.name} B={self.batch} {self.dtype_name}"


def default_batch(shape: Shape, device_type: str, dtype: torch.dtype) -> int:
    """Batch size giving every shape about the same forward work: 16 GFLOP a call on a GPU, 0.5 on CPU.

    CPU bfloat16 gets an eighth of that: this torch build's CPU kernels run
    bfloat16 matmuls through a slow path (the bench's matmul yardstick shows it),
    which the timm and SDPA baselines depend on.
    """
    if device_type == "cuda":
        budget, largest = 16e9, 256
    else:
        budget, largest = (0.5e9 if dtype == torch.float32 else 0.0625e9), 64
    return int(min(largest, max(1, round(budget / attention_flops(shape, 1, "fwd")))))


@dataclass
class Problem:
    """The inputs of one workload, shared by every implementation timed on it.

    ``layer`` is a timm GPSA (local init, as in ConViT) whose Parameters every
    implementation uses; ``args`` are the callables' inputs (core: q, k, v as
    strided views of one B x N x 3 x H x d projection output, pos_weight,
    pos_bias, gating_param; module: x); ``leaves`` are what the backward pass
    differentiates and ``leaf_names`` name them for the accuracy rule's messages.
    """

    workload: Workload
    layer: GPSA
    args: tuple
    leaves: list
    leaf_names: list
    grad_out: torch.Tensor
    grid: tuple = field(init=False)

    def __post_init__(self):
        self.grid = (self.workload.shape.grid, self.workload.shape.grid)

    @property
    def scale(self) -> float:
        return self.layer.scale


def make_problem(workload: Workload, dtype: torch.dtype = None, seed: int = 0) -> Problem:
    """Inputs of ``workload`` in ``dtype`` (default its own).

    Values are drawn in float64, so every dtype rounds the same numbers.
    """
    dtype = dtype or workload.dtype
    shape, B, device = workload.shape, workload.batch, workload.device
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = GPSA(shape.dim, num_heads=shape.heads, locality_strength=1.0, dtype=torch.float64)
        layer.local_init()
    # Core level: positional parameters stay float32 for half-precision q, k, v, as under AMP.
    param_dtype = dtype if workload.level == "module" or dtype == torch.float64 else torch.float32
    layer = layer.to(device=device, dtype=param_dtype).requires_grad_()
    layer.rel_indices = layer.get_rel_indices(shape.tokens)  # built once here, not inside a timed call

    def draw(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    if workload.level == "core":
        qkv = draw(B, shape.tokens, 3, shape.heads, shape.head_dim).requires_grad_()
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        pos = layer.pos_proj
        args = (q, k, v, pos.weight, pos.bias, layer.gating_param)
        leaves, names = [qkv, pos.weight, layer.gating_param], ["qkv", "pos_weight", "gating_param"]
        out_shape = (B, shape.heads, shape.tokens, shape.head_dim)
    else:
        x = draw(B, shape.tokens, shape.dim).requires_grad_()
        args = (x,)
        # pos_proj.bias is left out: its gradient is exactly zero (fused) or rounding noise (timm).
        params = [(n, p) for n, p in layer.named_parameters() if n != "pos_proj.bias"]
        leaves, names = [x] + [p for _, p in params], ["x"] + [n for n, _ in params]
        out_shape = (B, shape.tokens, shape.dim)
    return Problem(workload, layer, args, leaves, names, draw(*out_shape))
