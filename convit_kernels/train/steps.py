"""The step loop, the project's one: optimiser steps of accumulated micro-batches, and one epoch of them.

`train_steps` takes a number of optimiser steps on an iterator of (images, labels) batches: autocast,
gradient accumulation (DDP's all-reduce skipped on all micro-batches but a step's last), clipping, an fp16
grad scaler, the EMA of the weights and a per-update lr schedule; a non-finite loss stops it on every
process alike. `train_one_epoch` is an epoch of `convit-kernels train` through it; the experiments train
their runs through it too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from .errors import Diverged
from .runtime import Runtime, synchronize

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
# Steps between host synchronisations: the progress bar's numbers and the test for a non-finite loss.
SYNC_EVERY = 10
# Optimiser steps of each epoch left out of its images/s: data loader start-up, torch.compile, cuDNN autotuning.
WARMUP_STEPS = 5


@dataclass(frozen=True)
class Stepping:
    """How every optimiser step is taken: the autocast dtype (AMP_DTYPES' name), the micro-batches a step
    accumulates, gradient clipping (timm's dispatch_clip_grad: None for none) and the steps between reads of
    the loss (a read waits for the device)."""

    amp: str = "off"
    accum_steps: int = 1
    clip_grad: float | None = None
    clip_mode: str = "norm"
    sync_every: int = SYNC_EVERY

    @classmethod
    def of(cls, config) -> Stepping:
        """The stepping `convit-kernels train`'s options ask for."""
        return cls(config.amp, config.accum_steps, config.clip_grad, config.clip_mode)


def not_finite(step: int) -> str:
    return f"the loss is not finite (nan or inf) by step {step + 1}"


def stop_if_diverged(recent_losses: list, runtime: Runtime, step: int, message: Callable[[int], str]) -> None:
    """Raise Diverged(message(step)), on every process alike, when a loss of the recent steps of any process is not
    finite."""
    losses = torch.stack(recent_losses).float()
    bad = (~losses.isfinite()).sum()
    if runtime.world_size > 1:
        dist.all_reduce(bad)
    if bad.item():
        raise Diverged(message(step))


def forward_backward(model, batches, criterion, runtime: Runtime, stepping: Stepping, *, mixup, scaler, no_sync):
    """One optimiser step's micro-batches through `model` and back: (the step's loss, detached; its images).

    Each micro-batch's loss is scaled by 1 / accum_steps, so the accumulated gradient is that of the mean loss
    over the step's images; `no_sync` (DDP's) skips the gradient all-reduce of all micro-batches but the last.
    """
    amp_dtype = AMP_DTYPES[stepping.amp]
    accum = stepping.accum_steps
    micro_losses, images = [], 0
    for micro in range(accum):
        x, y = next(batches)
        x = x.to(runtime.device, non_blocking=True)
        y = y.to(runtime.device, non_blocking=True)
        if runtime.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        if mixup is not None:
            x, y = mixup(x, y)
        syncs = no_sync is None or micro == accum - 1
        with contextlib.nullcontext() if syncs else no_sync():
            with torch.autocast(runtime.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = criterion(model(x), y)
            if accum > 1:
                loss = loss / accum
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
        micro_losses.append(loss.detach())
        images += x.shape[0]
    return (micro_losses[0] if accum == 1 else torch.stack(micro_losses).sum()), images


def optimiser_step(optimizer, stepping: Stepping, *, params, scaler, net, ema) -> None:
    """Clip the gradients of `params` (after unscaling fp16's), step, and let `ema` follow `net`'s new weights."""
    if params is not None:
        from timm.utils import dispatch_clip_grad

        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        dispatch_clip_grad(params, stepping.clip_grad, mode=stepping.clip_mode)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if ema is not None:
        ema.update(net)


def train_steps(
    model,
    batches,
    steps: int,
    optimizer,
    criterion,
    runtime: Runtime,
    stepping: Stepping,
    *,
    scaler=None,
    mixup=None,
    net=None,
    ema=None,
    no_sync=None,
    on_update=None,
    bar=None,
    diverged: Callable[[int], str] = not_finite,
) -> dict:
    """`steps` optimiser steps on the (images, labels) pairs of the iterator `batches`.

    `net`: `model` without its DDP / torch.compile wrappers (default `model`), whose gradients are clipped and
    whose weights `ema` follows; `on_update(step)` runs after each optimiser step (a per-update lr schedule);
    `bar`, a tqdm, advances every step; `diverged(step)` is the message of the Diverged a non-finite loss raises.
    images/s is timed from the end of the first WARMUP_STEPS steps (data loader start-up, compilation, cuDNN
    autotuning) to the end: None for no more steps than that.
    """
    model.train()
    net = model if net is None else net
    params = list(net.parameters()) if stepping.clip_grad else None
    losses = []  # detached device tensors, one per optimiser step: no host sync per step
    timed_images, timed_from = 0, None
    first_lr = optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    for step in range(steps):
        if step == WARMUP_STEPS:
            synchronize(runtime)
            timed_from = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, images = forward_backward(
            model, batches, criterion, runtime, stepping, mixup=mixup, scaler=scaler, no_sync=no_sync
        )
        if timed_from is not None:
            timed_images += images * runtime.world_size
        optimiser_step(optimizer, stepping, params=params, scaler=scaler, net=net, ema=ema)
        if on_update is not None:
            on_update(step)
        losses.append(loss)
        if bar is not None:
            bar.update()
        if (step + 1) % stepping.sync_every == 0 or step + 1 == steps:
            stop_if_diverged(losses[-stepping.sync_every :], runtime, step, diverged)
            if bar is not None:
                show_progress(bar, losses[-1], optimizer, timed_images, timed_from)
    return steps_record(losses, runtime, optimizer, first_lr, start, (timed_images, timed_from))


def show_progress(bar, loss: torch.Tensor, optimizer, timed_images: int, timed_from: float | None) -> None:
    postfix = dict(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    if timed_from is not None and timed_images:
        postfix["img_s"] = f"{timed_images / (time.perf_counter() - timed_from):.0f}"
    bar.set_postfix(**postfix)


def steps_record(losses: list, runtime: Runtime, optimizer, first_lr: float, start: float, timed: tuple) -> dict:
    """What train_steps returns: the mean loss and each step's (over all processes), the lr at the first and the
    last step, images/s after the warm-up steps, the seconds of it all, and `timed` (images, seconds) for sums."""
    step_losses = torch.stack(losses).float()
    if runtime.world_size > 1:  # the global batch's loss: mean of the equal-sized per-process means
        dist.all_reduce(step_losses)
        step_losses /= runtime.world_size
    synchronize(runtime)
    end = time.perf_counter()
    timed_images, timed_from = timed
    timed_s = end - timed_from if timed_from is not None else 0.0
    step_losses = step_losses.tolist()
    return {
        "train_loss": sum(step_losses) / len(step_losses),
        "lr_first": first_lr,
        "lr": optimizer.param_groups[0]["lr"],
        "images_per_s": timed_images / timed_s if timed_images else None,
        "time_s": end - start,
        "step_losses": step_losses,
        "timed": (timed_images, timed_s),
    }


def train_one_epoch(
    model,
    loader,
    steps,
    optimizer,
    scaler,
    criterion,
    mixup,
    runtime,
    config,
    epoch: int,
    *,
    net=None,
    ema=None,
    no_sync=None,
    on_update=None,
) -> dict:
    """`steps` optimiser steps of --accum-steps micro-batches each (train_steps) on a pass over `loader`, with the
    progress bar; its record keeps train_steps' keys, the seconds as epoch_time_s.

    A non-finite loss stops it before the epoch's checkpoint is written: the one of the last finished epoch stays
    (ConViT's engine exits too).
    """
    bar = tqdm(
        total=steps,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        dynamic_ncols=True,
        disable=not (runtime.is_main and config.progress),
    )

    def diverged(step: int) -> str:
        kept = f"the checkpoint of epoch {epoch} is kept" if epoch else "no checkpoint was written"
        return f"the loss is not finite (nan or inf) by epoch {epoch + 1}, step {step + 1}: training stopped; {kept}"

    record = train_steps(
        model,
        iter(loader),
        steps,
        optimizer,
        criterion,
        runtime,
        Stepping.of(config),
        scaler=scaler,
        mixup=mixup,
        net=net,
        ema=ema,
        no_sync=no_sync,
        on_update=on_update,
        bar=bar,
        diverged=diverged,
    )
    bar.close()
    return {("epoch_time_s" if key == "time_s" else key): value for key, value in record.items()}
