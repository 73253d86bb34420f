"""Models and the DeiT/ConViT recipe: which ConViT, with which optimiser, schedule, loss and Mixup.

Every piece comes from timm: ``ConVit`` and its registered variants, AdamW
from ``create_optimizer_v2`` with ``param_groups_weight_decay`` (no decay on
1-d parameters, i.e. biases, norms and ``gating_param``, nor on
``model.no_weight_decay()`` = pos_embed, cls_token), ``create_scheduler_v2``
(cosine with warm-up, stepped every epoch as in ConViT, or every update in short runs), ``Mixup`` and its losses.
The recipes the command's defaults come from: ImageNet's with --data-path, the embedded digits' without.
"""

from __future__ import annotations

import timm
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.convit import ConVit
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from torch import nn

from ..convit_shapes import HEAD_DIM, PATCH_SIZE
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
    # the sample-efficiency experiment: 28 px / patch 4 = a 7 x 7 grid, 9 x 6-dim heads (a 3 x 3 local kernel, as
    # ConViT-S's 9 heads), GPSA in all but the last 2 of 5 blocks
    "convit_fashion": dict(patch_size=4, embed_dim=6, num_heads=9, depth=5, local_up_to_layer=3, mlp_ratio=2.0),
    # tests: 16 px / patch 4 = a 4 x 4 grid, one GPSA and one MHSA block
    "convit_test": dict(patch_size=4, embed_dim=8, num_heads=4, depth=2, local_up_to_layer=1, mlp_ratio=2.0),
}
TIMM_MODELS = ("convit_tiny", "convit_small", "convit_base")
MODEL_NAMES = TIMM_MODELS + tuple(EXTRA_MODELS)


# Defaults that depend on the data. With --data-path: the DeiT/ConViT ImageNet recipe.
IMAGENET_RECIPE = dict(
    model="convit_tiny",
    input_size=224,
    batch_size=64,
    epochs=300,
    lr=5e-4,
    warmup_epochs=5,
    smoothing=0.1,
    mixup=0.8,
    cutmix=1.0,
    auto_augment="rand-m9-mstd0.5-inc1",
    reprob=0.25,
    drop_path=0.1,
    repeated_aug=True,
    workers=8,
    threads=0,
)
# Without it: the embedded 8x8 digits, upscaled to 16 px, patch 4: a 4 x 4 grid of 2 x 2-pixel patches (at 32 px,
# an 8 x 8 grid, the 10 epochs that fit in the same CPU time reached 74% instead of 98%). No RandAugment / Mixup /
# CutMix / erasing / flips: on 8x8 digits they destroy the digit (a flipped 2 is no digit) and the run does not
# learn in minutes; a small random affine instead, and a larger lr (2e-3 for the batch of 32), 1 warm-up epoch.
# One thread: this model's ops (32 x 16 tokens x 64 channels) are too small to pay for a thread pool's barriers,
# and on shared cores those barriers stalled 2 threads to ~3 s per step against ~0.05 s for one.
DIGITS_RECIPE = dict(
    model="convit_digits",
    input_size=16,
    batch_size=32,
    epochs=30,
    lr=3.2e-2,
    warmup_epochs=1,
    smoothing=0.1,
    mixup=0.0,
    cutmix=0.0,
    auto_augment="",
    reprob=0.0,
    drop_path=0.0,
    repeated_aug=False,
    workers=0,
    threads=1,
)


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
    plain_attention: bool = False,
    **arch,
) -> nn.Module:
    """A ConViT by name; with ``fused`` its GPSA layers are FusedGPSA and its MHSA layers SDPA (same keys).

    ``arch``: embed_dim (per head), local_up_to_layer, locality_strength, replacing the named model's.
    ``plain_attention``: every GPSA layer becomes timm's MHSA, while the class token still joins after
    local_up_to_layer blocks: the control that separates where the class token enters from locality.
    """
    kwargs = dict(num_classes=num_classes, img_size=img_size, in_chans=in_chans, drop_path_rate=drop_path, **arch)
    if name in TIMM_MODELS:
        model = timm.create_model(name, pretrained=False, **kwargs)
    elif name in EXTRA_MODELS:
        model = ConVit(**{**EXTRA_MODELS[name], **kwargs})
    else:
        raise TrainError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
    if plain_attention:
        replace_gpsa_by_mhsa(model)
    if fused:
        from convit_kernels import patch_convit  # imported here: only a fused model needs the package's layers

        patch_convit(model, backend=backend)
    return model


def replace_gpsa_by_mhsa(model: ConVit) -> None:
    """Every GPSA layer of a timm ConVit becomes a freshly initialised MHSA of the same width and heads."""
    from timm.models.convit import GPSA, MHSA

    for block in model.blocks:
        if isinstance(block.attn, GPSA):
            gpsa = block.attn
            block.attn = MHSA(gpsa.dim, num_heads=gpsa.num_heads, qkv_bias=gpsa.qk.bias is not None)
            block.attn.apply(model._init_weights)


def head_dim(name: str, embed_dim=None) -> int:
    """The attention head dim of a model name (timm's ConViTs: HEAD_DIM), or `embed_dim` where given (--embed-dim)."""
    if embed_dim is not None:
        return embed_dim
    return EXTRA_MODELS[name]["embed_dim"] if name in EXTRA_MODELS else HEAD_DIM


def patch_size(name: str) -> int:
    """The patch side in pixels of a model name (timm's ConViTs: PATCH_SIZE)."""
    return EXTRA_MODELS.get(name, {}).get("patch_size", PATCH_SIZE)


def validate_optimizer(name: str) -> None:
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


def validate_backend(backend: str, model: str, device_type: str, dtype: torch.dtype, embed_dim=None) -> None:
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


def per_update_schedule(epochs: int, warmup_epochs: int) -> bool:
    """Whether the lr steps after every update instead of every epoch (ConViT's): when the per-epoch warm-up, plus
    the extra epoch that ConViT's stepping trains at --warmup-lr, would take more than a tenth of the run."""
    return warmup_epochs > 0 and warmup_epochs + 1 > epochs / 10


def cosine_schedule(optimizer: torch.optim.Optimizer, length: int, warmup: int, warmup_lr: float, min_lr: float):
    """timm's cosine schedule over `length` steps (epochs or updates), the first `warmup` of them a linear warm-up
    from `warmup_lr`; `scheduler.step(t)` sets the lr of step t."""
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=length, warmup_epochs=warmup, warmup_lr=warmup_lr, min_lr=min_lr
    )
    return scheduler


def create_scheduler(optimizer: torch.optim.Optimizer, config, steps_per_epoch: int):
    """ConViT's schedule, stepped once per epoch, after it, with the epoch's index; or, where its warm-up would
    take more than a tenth of the run (per_update_schedule), stepped after every update with the count of updates
    done, the warm-up cut to a tenth of the updates (see engine.fit)."""
    if not per_update_schedule(config.epochs, config.warmup_epochs):
        return cosine_schedule(optimizer, config.epochs, config.warmup_epochs, config.warmup_lr, config.min_lr)
    updates = config.epochs * steps_per_epoch
    warmup = min(config.warmup_epochs * steps_per_epoch, updates // 10)
    return cosine_schedule(optimizer, updates, warmup, config.warmup_lr, config.min_lr)


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
