"""ConViT's canonical sizes: the one place the project writes them down.

timm's ConViTs cut images into 16 px patches and give every head 48 dims (the "+" variants, 64);
at 224 px that is a 14 x 14 grid (N = 196), at 384 px a 24 x 24 one. What `backends`, `verify-kernels`,
the bench, the aot report and the training stack call "ConViT's shape" comes from here.
"""

from __future__ import annotations

__all__ = [
    "PATCH_SIZE",
    "HEAD_DIM",
    "HEAD_DIMS",
    "IMAGE_SIZE",
    "IMAGE_SIZES",
    "grid_side",
    "GRID_224",
    "GRID_384",
    "TOKENS_224",
    "FAMILY_HEADS",
]

PATCH_SIZE = 16
HEAD_DIM = 48
# ConViT-Ti/S/B (48) and their "+" variants (64).
HEAD_DIMS = (HEAD_DIM, 64)
# The input size timm's ConViTs are made for, and the one they are also fine-tuned at.
IMAGE_SIZE = 224
IMAGE_SIZES = (IMAGE_SIZE, 384)
# Heads of each model family; the embedding dim is heads x head dim.
FAMILY_HEADS = {"Ti": 4, "S": 9, "B": 16}


def grid_side(image_size: int, patch_size: int = PATCH_SIZE) -> int:
    """Patches along one side of a square image."""
    return image_size // patch_size


GRID_224 = (grid_side(224), grid_side(224))
GRID_384 = (grid_side(384), grid_side(384))
TOKENS_224 = GRID_224[0] * GRID_224[1]
