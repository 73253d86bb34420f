"""convit-kernels: fused gated positional self-attention (GPSA) for ConViT."""

from ._version import __version__
from .attention import gpsa_attention
from .backends import available_backends
from .module import SDPAMHSA, FusedGPSA
from .patch import patch_convit
from .reference import gpsa_reference, relative_positions

__all__ = [
    "__version__",
    "gpsa_attention",
    "available_backends",
    "FusedGPSA",
    "SDPAMHSA",
    "patch_convit",
    "gpsa_reference",
    "relative_positions",
]
