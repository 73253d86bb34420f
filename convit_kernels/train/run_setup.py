"""A run's setup, before its first step: the model, its data, optimiser and schedule, a resumed state, the wrappers.

`prepare` builds them in the order that keeps a run's random numbers those of the seed (timm's pretrained
model first, then the seeds, the data, the model) and validates what can be validated before any work: the
backend, the augmentation policy, every validation image of this rank.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint, data, pretrained
from . import model as recipe
from .runtime import Runtime, print_main
from .steps import AMP_DTYPES


@dataclass
class Run:
    """What a run trains and with what; `net` is the model itself, `model` the same wrapped for training (DDP,
    torch.compile) where asked. `start_epoch` and `best` (epoch from 1 and val acc1) are a resumed run's."""

    config: Any
    runtime: Runtime
    bundle: data.DataBundle
    net: torch.nn.Module
    model: torch.nn.Module
    ema: Any
    train_loader: Any
    val_loader: Any
    steps: int
    lr: float
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    per_update: bool
    schedule: dict
    no_sync: Any = None
    start_epoch: int = 0
    best: dict | None = None


def prepare(config, runtime: Runtime) -> Run:
    """Every piece of a run, built and validated, a --resume checkpoint loaded into them, the data and model named."""
    from timm.utils import ModelEmaV3

    if config.fused:
        recipe.validate_backend(
            config.backend,
            config.model,
            runtime.device.type,
            AMP_DTYPES[config.amp] or torch.float32,
            embed_dim=config.embed_dim,
        )
    # Before seeding: timm builds a model to load its pretrained weights into, drawing random numbers.
    start_weights = pretrained.fetch(config, announce=lambda line: print_main(runtime, line))
    seed_everything(config.seed + runtime.rank)  # DeiT's seeding: ranks differ in augmentation, DDP syncs weights
    bundle = data.build_data(config)
    if config.data_path is not None and not config.eval:  # after the data path's validation: a missing folder first
        data.validate_augmentation(config)
    net = build_net(config, runtime, bundle, start_weights)
    del start_weights
    # ConViT's ModelEma: a copy of the weights, averaged after every optimiser step with a fixed decay.
    ema = ModelEmaV3(net, decay=config.model_ema_decay) if config.model_ema else None
    train_loader, val_loader = data.build_loaders(
        bundle, config, runtime.rank, runtime.world_size, pin_memory=runtime.device.type == "cuda"
    )
    if config.data_path is not None and not config.eval:
        data.decode_every_image(val_loader.dataset, config.workers)
    steps = data.steps_per_epoch(train_loader, config.steps_per_epoch, config.accum_steps)
    lr = recipe.scaled_lr(config, runtime.world_size)
    optimizer = recipe.create_optimizer(net, lr, config)
    run = Run(
        config=config,
        runtime=runtime,
        bundle=bundle,
        net=net,
        model=net,
        ema=ema,
        train_loader=train_loader,
        val_loader=val_loader,
        steps=steps,
        lr=lr,
        optimizer=optimizer,
        scheduler=recipe.create_scheduler(optimizer, config, steps),
        scaler=torch.amp.GradScaler(runtime.device.type) if config.amp == "fp16" else None,
        per_update=recipe.per_update_schedule(config.epochs, config.warmup_epochs),
        schedule=schedule_of(config, lr, steps),
    )
    if config.resume:
        resume(run)
    wrap_for_training(run)
    announce(run)
    return run


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def build_net(config, runtime: Runtime, bundle: data.DataBundle, start_weights):
    """The model on the runtime's device, its start weights (--finetune, --pretrained) applied."""
    net = recipe.create_model(
        config.model,
        num_classes=bundle.num_classes,
        img_size=config.input_size,
        in_chans=bundle.in_chans,
        drop_path=config.drop_path,
        fused=config.fused,
        backend=config.backend,
        **recipe.architecture(config),
    )
    if start_weights is not None:
        source = pretrained.source_of(config)
        notes = pretrained.apply(net, start_weights, source)
        print_main(runtime, f"weights: {source}{''.join(', ' + note for note in notes)}")
    net = net.to(runtime.device)
    if runtime.device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)  # the patch-embedding convolution prefers NHWC on GPUs
    return net


def schedule_of(config, lr: float, steps: int) -> dict:
    """What the optimiser and scheduler states of a checkpoint hold, and how its steps were taken: a resume must
    not change it unseen."""
    return dict(
        model=config.model,
        epochs=config.epochs,
        lr=lr,
        steps_per_epoch=steps,
        opt=config.opt,
        weight_decay=config.weight_decay,
        warmup_epochs=config.warmup_epochs,
        warmup_lr=config.warmup_lr,
        min_lr=config.min_lr,
        accum_steps=config.accum_steps,
        clip_grad=config.clip_grad,
        clip_mode=config.clip_mode if config.clip_grad else None,
        model_ema_decay=config.model_ema_decay if config.model_ema else None,
    )


def resume(run: Run) -> None:
    """Load --resume into the run's pieces; the scheduler, where the checkpoint holds none of it, as the epochs
    before this run left it."""
    config = run.config
    resumed = checkpoint.resume(
        config.resume,
        model=run.net,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        scaler=run.scaler,
        restore_training=not config.eval,
        schedule=run.schedule,
        rank=run.runtime.rank,
        ema=run.ema,
    )
    run.start_epoch, run.best = resumed["start_epoch"], resumed["best"]
    if run.start_epoch and not resumed["scheduler_restored"]:
        if run.per_update:
            run.scheduler.step(run.start_epoch * run.steps)
        else:
            run.scheduler.step(run.start_epoch - 1)
    if resumed["not_restored"]:
        print_main(
            run.runtime,
            f"resumed {config.resume} (not written by convit-kernels) at epoch {run.start_epoch + 1}; not restored: "
            + "; ".join(resumed["not_restored"]),
        )


def wrap_for_training(run: Run) -> None:
    """run.model: the net in DistributedDataParallel with several processes, compiled with --compile."""
    runtime = run.runtime
    if runtime.world_size > 1:
        device_ids = [runtime.local_rank] if runtime.device.type == "cuda" else None
        # Broadcasts rank 0's weights. No buffers at each forward: ConViT's only ones are GPSA's rel_indices, a cache
        # of the grid that rank 0's GPSA statistics resize (a size mismatch in gloo's broadcast from epoch 2 on).
        run.model = torch.nn.parallel.DistributedDataParallel(run.net, device_ids=device_ids, broadcast_buffers=False)
        run.no_sync = run.model.no_sync
        if run.ema is not None:  # ranks initialise (and a new head) from their own seeds: rank 0's, as DDP does
            for tensor in run.ema.module.state_dict().values():
                dist.broadcast(tensor, src=0)
    if run.config.compile:
        run.model = torch.compile(run.model)


def announce(run: Run) -> None:
    """The data and the model, in a line each (rank 0); a warning for a data set of one class."""
    config, runtime, bundle = run.config, run.runtime, run.bundle
    print_main(
        runtime,
        f"data: {bundle.name}, {len(bundle.train)} train / {len(bundle.val)} val images, {bundle.num_classes} classes",
    )
    if bundle.num_classes == 1 and runtime.is_main:
        print(
            "warning: the data set has one class: every prediction is right, 100% accuracy says nothing",
            file=sys.stderr,
        )
    print_main(
        runtime,
        f"model: {config.model} ({'fused GPSA' if config.fused else 'stock timm'}), "
        f"{sum(p.numel() for p in run.net.parameters()) / 1e6:.2f} M parameters, on {runtime.device}"
        f" x {runtime.world_size}, amp {config.amp}",
    )


def announce_recipe(run: Run) -> None:
    """The recipe a training run follows, in one line (rank 0)."""
    config = run.config
    total_batch = recipe.total_batch(config, run.runtime.world_size)
    accumulation = f" ({config.batch_size} x {config.accum_steps} accumulated)" if config.accum_steps > 1 else ""
    print_main(
        run.runtime,
        f"recipe: lr {config.lr:g} x total batch {total_batch}{accumulation} / 512 = {run.lr:.4g}, "
        f"{config.epochs} epochs x {run.steps} steps, warm-up {config.warmup_epochs}"
        f"{' (lr stepped per update, warm-up at most a tenth of the updates)' if run.per_update else ''}, "
        f"wd {config.weight_decay}, smoothing {config.smoothing}, mixup {config.mixup}, "
        f"cutmix {config.cutmix}, drop path {config.drop_path}, augment {config.augment}, "
        f"repeated augmentation {config.repeated_aug}, clip grad "
        f"{f'{config.clip_grad:g} ({config.clip_mode})' if config.clip_grad else 'off'}, model EMA "
        f"{config.model_ema_decay if config.model_ema else 'off'}",
    )
