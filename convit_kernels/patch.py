"""``patch_convit``: swap the attention of a ConViT model for the fused modules, in place."""

from __future__ import annotations

from torch import nn

from .module import SDPAMHSA, FusedGPSA, timm_convit


def _timm_class(name: str):
    """timm's GPSA or MHSA class, or None without timm (facebookresearch models are matched by layout)."""
    try:
        return getattr(timm_convit(), name)
    except ImportError:
        return None


__all__ = ["patch_convit"]

_GPSA_PARTS = ("qk", "v", "proj", "pos_proj")


def _is_gpsa(module: nn.Module) -> bool:
    """timm's GPSA, or a module shaped like facebookresearch's (same submodules and gate)."""
    if isinstance(module, FusedGPSA):
        return False
    timm_gpsa = _timm_class("GPSA")
    if timm_gpsa is not None and isinstance(module, timm_gpsa):
        return True
    return (
        all(isinstance(getattr(module, name, None), nn.Linear) for name in _GPSA_PARTS)
        and module.pos_proj.in_features == 3
        and isinstance(getattr(module, "gating_param", None), nn.Parameter)
        and hasattr(module, "num_heads")
        and hasattr(module, "scale")
    )


def _is_mhsa(module: nn.Module) -> bool:
    """timm's MHSA, or facebookresearch's class of the same name and layout."""
    timm_mhsa = _timm_class("MHSA")
    if timm_mhsa is not None and isinstance(module, timm_mhsa):
        return True
    return (
        type(module).__name__ == "MHSA"
        and isinstance(getattr(module, "qkv", None), nn.Linear)
        and isinstance(getattr(module, "proj", None), nn.Linear)
        and hasattr(module, "num_heads")
        and hasattr(module, "scale")
    )


def _rectangular_grid(model: nn.Module) -> tuple[int, int] | None:
    """The patch grid where the model's ``patch_embed`` makes a rectangular one (timm's ConVit at
    img_size=(h, w), h != w; also inside a features_only wrapper), else None: a square grid is
    found from N, whatever N is."""
    for name, module in model.named_modules():
        grid = getattr(module, "grid_size", None)
        if name.rpartition(".")[2] == "patch_embed" and grid is not None and grid[0] != grid[1]:
            return int(grid[0]), int(grid[1])
    return None


def patch_convit(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Replace every GPSA with :class:`FusedGPSA` and every MHSA with :class:`SDPAMHSA`, in place.

    The new modules share the old ones' Parameters, so the state_dict keys and
    values are unchanged and an optimizer built before the patch still holds
    the right tensors. A model with a rectangular patch grid (``patch_embed.grid_size``,
    timm's ConVit at img_size=(h, w)) gives it to every FusedGPSA. Returns ``model``.
    """
    grid_size = _rectangular_grid(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_gpsa(child):
                setattr(parent, name, FusedGPSA.from_gpsa(child, grid_size=grid_size, backend=backend))
            elif _is_mhsa(child):
                setattr(parent, name, SDPAMHSA.from_mhsa(child))
    return model
