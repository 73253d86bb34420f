"""Models and the DeiT/ConViT recipe: which ConViT, with which optimiser, schedule, loss and Mixup.

Every piece comes from timm: ``ConVit`` and its registered variants, AdamW
from ``create_optimizer_v2`` with ``param_groups_weight_decay`` (no decay on
1-d parameters, i.e. biases, norms and ``gating_param``, nor on
``model.no_weight_decay()`` = pos_embed, cls_token), ``create_scheduler_v2``
(cosine with warm-up, stepped every epoch as in ConViT), ``Mixup`` and its losses.
"""

from __future__ import annotations

import timm
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.convit import ConVit
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from torch import nn

from .errors import TrainError

# Names timm does not register, built from timm's ConVit class. As in timm and
# facebookresearch, embed_dim is per head (ConVit multiplies it by num_heads).
EXTRA_MODELS = {
    # the "+" variants: 64-dim heads instead of 48
    "convit_tiny_plus": dict(embed_dim=64, num_heads=4, local_up_to_layer=10, locality_strength=1.0),
    "convit_small_plus": dict(embed_dim=64, num_heads=9, local_up_to_layer=10, locality_strength=1.0),
    "convit_base_plus": dict(embed_dim=64, num_heads=16, local_up_to_layer=10, locality_strength=1.0),
    # the embedded-digits default: 16 px / patch 4 = a 4 x 4 grid, 4 GPSA + 2 MHSA blocks, 4 x 16-dim heads
    "convit_digits": dict(patch_size=4, embed_dim=16, num_heads=4, depth=6, local_up_to_layer=4, mlp_ratio=2.0),
    # tests: 16 px / patch 4 = a 4 x 4 grid, one GPSA and one MHSA block
    "convit_test": dict(patch_size=4, embed_dim=8, num_heads=4, depth=2, local_up_to_layer=1, mlp_ratio=2.0),
}
TIMM_MODELS = ("convit_tiny", "convit_small", "convit_base")
MODEL_NAMES = TIMM_MODELS + tuple(EXTRA_MODELS)


# ConViT's architecture options (its main.py's --embed_dim, --local_up_to_layer, --locality_strength): None keeps
# the named model's value.
ARCHITECTURE_OPTIONS = ("embed_dim", "local_up_to_layer", "locality_strength")


def architecture(config) -> dict:
    """The architecture options the config sets, as ConVit keyword arguments."""
    return {key: getattr(config, key) for key in ARCHITECTURE_OPTIONS if getattr(config, key, None) is not None}


def create_model(
    name: str,
    *,
    num_classes: int,
    img_size: int,
    in_chans: int,
    drop_path: float,
    fused: bool,
    backend: str = "auto",
    **arch,
) -> nn.Module:
    """A ConViT by name; with ``fused`` its GPSA layers are FusedGPSA and its MHSA layers SDPA (same keys).

    ``arch``: embed_dim (per head), local_up_to_layer, locality_strength, replacing the named model's.
    """
    kwargs = dict(num_classes=num_classes, img_size=img_size, in_chans=in_chans, drop_path_rate=drop_path, **arch)
    if name in TIMM_MODELS:
        model = timm.create_model(name, pretrained=False, **kwargs)
    elif name in EXTRA_MODELS:
        model = ConVit(**{**EXTRA_MODELS[name], **kwargs})
    else:
        raise TrainError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
    if fused:
        from convit_kernels import patch_convit  # imported here: the lead's modules may change independently

        patch_convit(model, backend=backend)
    return model


def head_dim(name: str, embed_dim=None) -> int:
    """The attention head dim of a model name (timm's ConViTs: 48), or `embed_dim` where given (--embed-dim)."""
    if embed_dim is not None:
        return embed_dim
    return EXTRA_MODELS[name]["embed_dim"] if name in EXTRA_MODELS else 48


def patch_size(name: str) -> int:
    """The patch side in pixels of a model name (timm's ConViTs: 16)."""
    return EXTRA_MODELS.get(name, {}).get("patch_size", 16)


def check_optimizer(name: str) -> None:
    """Before any work: timm's create_optimizer_v2 knows `name` (its last '_' part; 'lookahead_' may lead)."""
    from timm.optim import get_optimizer_info, list_optimizers

    try:
        get_optimizer_info(name.lower().split("_")[-1])
    except ValueError:
        raise TrainError(
            f"--opt {name}: not one of timm's optimizers (e.g. adamw, sgd, momentum, lamb, lion; "
            f"{len(list_optimizers())} in timm.optim.list_optimizers())"
        ) from None


def model_depth(name: str) -> int:
    """The number of blocks of a model name (timm's ConViTs: 12)."""
    return EXTRA_MODELS.get(name, {}).get("depth", 12)


def check_backend(backend: str, model: str, device_type: str, dtype: torch.dtype, embed_dim=None) -> None:
    """Before any work: the fused GPSA backend runs on this device and dtype, at this model's head dim."""
    from convit_kernels.dispatch import resolve_backend

    try:
        resolve_backend(backend, torch.device(device_type), dtype, head_dim(model, embed_dim))
    except RuntimeError as error:
        raise TrainError(f"--backend {backend}: {error}") from None


def total_batch(config, world_size: int) -> int:
    """The images of one optimiser step: per-process batch x processes x accumulated micro-batches."""
    return config.batch_size * world_size * config.accum_steps


def scaled_lr(config, world_size: int) -> float:
    """The linear scaling rule of DeiT and ConViT: --lr x total batch / 512 (the batch of an optimiser step)."""
    return config.lr * total_batch(config, world_size) / 512


def create_optimizer(model: nn.Module, lr: float, config) -> torch.optim.Optimizer:
    no_decay = getattr(model, "no_weight_decay", lambda: set())()
    groups = param_groups_weight_decay(model, config.weight_decay, no_weight_decay_list=no_decay)
    return create_optimizer_v2(groups, opt=config.opt, lr=lr, weight_decay=config.weight_decay)


def create_scheduler(optimizer: torch.optim.Optimizer, config):
    """ConViT's schedule: stepped once per epoch, after it, with the epoch's index (see engine.fit)."""
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=config.epochs,
        warmup_epochs=config.warmup_epochs,
        warmup_lr=config.warmup_lr,
        min_lr=config.min_lr,
    )
    return scheduler


def mixup_active(config) -> bool:
    """Mixup or CutMix is on: an alpha above 0, and augmentation not turned off by --no-aug."""
    return config.augment and (config.mixup > 0 or config.cutmix > 0)


def create_mixup(config, num_classes: int):
    """timm's Mixup/CutMix with label smoothing folded in, or None when they are off."""
    if not mixup_active(config):
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=config.mixup,
        cutmix_alpha=config.cutmix,
        prob=1.0,
        switch_prob=0.5,
        mode="batch",
        label_smoothing=config.smoothing,
        num_classes=num_classes,
    )


def create_criterion(config, mixup) -> nn.Module:
    if mixup is not None:
        return SoftTargetCrossEntropy()  # Mixup already produced the smoothed soft targets
    if config.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.smoothing)
    return nn.CrossEntropyLoss()
