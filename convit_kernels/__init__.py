"""convit-kernels: fused gated positional self-attention (GPSA) for ConViT."""

from .op import available_backends, gpsa_attention
from .reference import gpsa_reference, relative_positions

__version__ = "0.1.0"

__all__ = ["gpsa_attention", "available_backends", "gpsa_reference", "relative_positions"]
