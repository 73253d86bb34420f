"""convit-kernels: fused gated positional self-attention (GPSA) for ConViT."""

from .module import FusedGPSA, SDPAMHSA
from .backends import available_backends
from .op import gpsa_attention
from .patch import patch_convit
from .reference import gpsa_reference, relative_positions

__version__ = "0.1.0"

__all__ = [
    "gpsa_attention",
    "available_backends",
    "FusedGPSA",
    "SDPAMHSA",
    "patch_convit",
    "gpsa_reference",
    "relative_positions",
]
