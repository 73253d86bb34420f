"""The training loop: device and process-group setup, one epoch of training, evaluation, and `fit`.

One process or many: under torchrun (WORLD_SIZE > 1) every process trains a
DistributedDataParallel replica on its DistributedSampler shard, NCCL on GPUs,
gloo on CPU; `--batch-size` is per process, so the total batch (x
--accum-steps, the micro-batches of an optimiser step) and the scaled lr grow
with the world size. Only rank 0 prints, logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint, data, output, pretrained
from . import model as recipe
from .errors import Diverged, TrainError
from .report import JsonLog, TensorBoard, gpsa_statistics, nonlocality_as_convit, plot_gpsa, tensorboard_installed

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
# Steps between host synchronisations: the progress bar's numbers and the check for a non-finite loss.
SYNC_EVERY = 10
# Optimiser steps of each epoch left out of its images/s: data loader start-up, torch.compile, cuDNN autotuning.
WARMUP_STEPS = 5


@dataclass
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(config) -> Runtime:
    """Pick the device, join the process group under torchrun, and size the CPU thread pool."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and config.device != "cpu"
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        # The processes of one machine share its cores; oversubscribing them slows every process down.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 1) // local_world))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, store=attempt_store(rank, world_size), rank=rank, world_size=world_size)
    return Runtime(device, rank, world_size, local_rank)


def attempt_store(rank: int, world_size: int):
    """The rendezvous store under a prefix of torchrun's attempt; None (init's own env:// store) outside torchrun.

    torchrun's agent store outlives a restart (--max-restarts): without the prefix the new attempt's ranks can
    read the dead ranks' gloo addresses ("connection refused") or their barrier counts.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    store, _, _ = next(dist.rendezvous("env://", rank, world_size))
    return dist.PrefixStore(f"convit_kernels/attempt_{attempt}", store)


def print_main(runtime: Runtime, *args) -> None:
    if runtime.is_main:
        print(*args, flush=True)


def stop_if_diverged(recent_losses: list, runtime: Runtime, epoch: int, step: int) -> None:
    """Raise Diverged, on every process alike, when a loss of the recent steps of any process is not finite.

    Before the epoch's checkpoint is written: the one of the last finished epoch stays (ConViT's engine exits too).
    """
    losses = torch.stack(recent_losses).float()
    bad = (~losses.isfinite()).sum()
    if runtime.world_size > 1:
        dist.all_reduce(bad)
    if bad.item():
        kept = f"the checkpoint of epoch {epoch} is kept" if epoch else "no checkpoint was written"
        raise Diverged(
            f"the loss is not finite (nan or inf) by epoch {epoch + 1}, step {step + 1}: training stopped; {kept}"
        )


def synchronize(runtime: Runtime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()


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
    """`steps` optimiser steps of --accum-steps micro-batches each.

    Each micro-batch's loss is scaled by 1 / accum-steps, so the accumulated gradient is that of the mean loss over
    the step's images; `no_sync` (DDP's) skips the gradient all-reduce of all micro-batches but the last. `net`:
    `model` without its DDP / torch.compile wrappers (default `model`), whose gradients are clipped (--clip-grad,
    after unscaling fp16's) before the step and whose weights `ema` follows after it; `on_update(step)` runs after
    each optimiser step (a per-update lr schedule). images/s is timed from the
    end of the first WARMUP_STEPS steps (data loader start-up, compilation, cuDNN autotuning) to the end of the
    epoch, evaluation excluded: None in epochs of no more steps than that.
    """
    from timm.utils import dispatch_clip_grad

    model.train()
    amp_dtype = AMP_DTYPES[config.amp]
    channels_last = runtime.device.type == "cuda"
    accum = config.accum_steps
    net = model if net is None else net
    params = list(net.parameters()) if config.clip_grad else None
    losses = []  # detached device tensors, one per optimiser step: no host sync per step
    batches = iter(loader)
    timed_images, timed_from = 0, None
    first_lr = optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    bar = tqdm(
        total=steps,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        dynamic_ncols=True,
        disable=not (runtime.is_main and config.progress),
    )
    for step in range(steps):
        if step == WARMUP_STEPS:
            synchronize(runtime)
            timed_from = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        micro_losses = []
        for micro in range(accum):
            x, y = next(batches)
            x = x.to(runtime.device, non_blocking=True)
            y = y.to(runtime.device, non_blocking=True)
            if channels_last:
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
            if timed_from is not None:
                timed_images += x.shape[0] * runtime.world_size
        if params is not None:
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            dispatch_clip_grad(params, config.clip_grad, mode=config.clip_mode)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if ema is not None:
            ema.update(net)
        if on_update is not None:
            on_update(step)
        losses.append(micro_losses[0] if accum == 1 else torch.stack(micro_losses).sum())
        bar.update()
        if (step + 1) % SYNC_EVERY == 0 or step + 1 == steps:
            stop_if_diverged(losses[-SYNC_EVERY:], runtime, epoch, step)
            postfix = dict(loss=f"{losses[-1].item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if timed_from is not None and timed_images:
                postfix["img_s"] = f"{timed_images / (time.perf_counter() - timed_from):.0f}"
            bar.set_postfix(**postfix)
    bar.close()
    step_losses = torch.stack(losses).float()
    if runtime.world_size > 1:  # the global batch's loss: mean of the equal-sized per-process means
        dist.all_reduce(step_losses)
        step_losses /= runtime.world_size
    synchronize(runtime)
    end = time.perf_counter()
    timed_s = end - timed_from if timed_from is not None else 0.0
    step_losses = step_losses.tolist()
    return {
        "train_loss": sum(step_losses) / len(step_losses),
        "lr_first": first_lr,
        "lr": optimizer.param_groups[0]["lr"],
        "images_per_s": timed_images / timed_s if timed_images else None,
        "epoch_time_s": end - start,
        "step_losses": step_losses,
        "timed": (timed_images, timed_s),
    }


@torch.no_grad()
def evaluate(model, loader, runtime, config, num_classes: int) -> dict:
    """Exact top-1 / top-5 accuracy and loss over the whole validation set (shards summed over processes)."""
    model.eval()
    amp_dtype = AMP_DTYPES[config.amp]
    top_k = min(5, num_classes)
    totals = torch.zeros(4, dtype=torch.float64, device=runtime.device)  # loss sum, top-1, top-k, count
    for x, y in loader:
        x, y = x.to(runtime.device), y.to(runtime.device)
        with torch.autocast(runtime.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x).float()
        hits = logits.topk(top_k, dim=-1).indices == y[:, None]
        totals += torch.stack(
            [
                F.cross_entropy(logits, y, reduction="sum"),
                hits[:, 0].sum(),
                hits.any(-1).sum(),
                torch.tensor(len(y), device=runtime.device),
            ]
        ).double()
    if runtime.world_size > 1:
        dist.all_reduce(totals)
    loss, top1, topk, count = totals.tolist()
    return {"val_loss": loss / count, "val_acc1": 100 * top1 / count, f"val_acc{top_k}": 100 * topk / count}


def evaluate_ema(ema, loader, runtime, config, num_classes: int) -> dict:
    """The EMA weights' metrics, keyed as evaluate's with an _ema suffix."""
    return {f"{key}_ema": value for key, value in evaluate(ema.module, loader, runtime, config, num_classes).items()}


def lr_range(record: dict) -> str:
    """The lr an epoch trained at: one value, or its first and last update's."""
    first, last = record["lr_first"], record["lr"]
    return f"{first:.3g}" if f"{first:.3g}" == f"{last:.3g}" else f"{first:.3g} to {last:.3g}"


def fit(config) -> dict:
    """Train (or with config.eval only evaluate) as the config says. Returns the per-epoch records and the model.

    Raises TrainError for bad input, found before the first epoch where it can be (the CLI: one line, exit
    code 2), and Diverged when the loss stops being finite (exit code 1). Rank 0 holds --output-dir throughout.
    """
    runtime = setup_runtime(config)
    if config.eval:  # --eval writes nothing
        return train_or_evaluate(config, runtime)
    output.check(config.output_dir, resume=config.resume, overwrite=config.overwrite)
    with hold_output(config.output_dir, runtime):
        return train_or_evaluate(config, runtime)


@contextlib.contextmanager
def hold_output(folder: str, runtime: Runtime):
    """Rank 0 holds `folder` (output.lock); a refusal is raised by every rank alike, as TrainErrors are."""
    with contextlib.ExitStack() as held:
        refusal = None
        if runtime.is_main:
            try:
                held.enter_context(output.lock(folder))
            except TrainError as error:
                refusal = error
        if runtime.world_size > 1:
            refused = [refusal is not None]
            dist.broadcast_object_list(refused, src=0)
            if refused[0] and refusal is None:
                refusal = TrainError(f"--output-dir {folder!r} is in use by another run")
        if refusal is not None:
            raise refusal
        yield


def train_or_evaluate(config, runtime: Runtime) -> dict:
    """fit, once the runtime is set up and the output folder held."""
    from timm.utils import ModelEmaV3

    if config.fused:
        recipe.check_backend(
            config.backend,
            config.model,
            runtime.device.type,
            AMP_DTYPES[config.amp] or torch.float32,
            embed_dim=config.embed_dim,
        )
    # Before seeding: timm builds a model to load its pretrained weights into, drawing random numbers.
    start_weights = pretrained.fetch(config, announce=lambda line: print_main(runtime, line))
    torch.manual_seed(config.seed + runtime.rank)  # DeiT's seeding: ranks differ in augmentation, DDP syncs weights
    np.random.seed(config.seed + runtime.rank)
    random.seed(config.seed + runtime.rank)

    bundle = data.build_data(config)
    if config.data_path is not None and not config.eval:  # after the data path's checks: a missing folder first
        data.check_augmentation(config)
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
        del start_weights
    net = net.to(runtime.device)
    if runtime.device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)  # the patch-embedding convolution prefers NHWC on GPUs
    # ConViT's ModelEma: a copy of the weights, averaged after every optimiser step with a fixed decay.
    ema = ModelEmaV3(net, decay=config.model_ema_decay) if config.model_ema else None
    train_loader, val_loader = data.build_loaders(
        bundle, config, runtime.rank, runtime.world_size, pin_memory=runtime.device.type == "cuda"
    )
    if config.data_path is not None and not config.eval:
        data.check_images(val_loader.dataset, config.workers)
    steps = data.steps_per_epoch(train_loader, config.steps_per_epoch, config.accum_steps)
    lr = recipe.scaled_lr(config, runtime.world_size)
    optimizer = recipe.create_optimizer(net, lr, config)
    scheduler = recipe.create_scheduler(optimizer, config, steps)
    per_update = recipe.per_update_schedule(config.epochs, config.warmup_epochs)
    # What the optimiser and scheduler states of a checkpoint hold, and how its steps were taken: a resume must
    # not change it unseen.
    schedule = dict(
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
    scaler = torch.amp.GradScaler(runtime.device.type) if config.amp == "fp16" else None
    start_epoch, best = 0, None
    if config.resume:
        resumed = checkpoint.resume(
            config.resume,
            model=net,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            restore_training=not config.eval,
            schedule=schedule,
            rank=runtime.rank,
            ema=ema,
        )
        start_epoch, best = resumed["start_epoch"], resumed["best"]
        if start_epoch and not resumed["scheduler_restored"]:  # as the epochs before this run left it
            scheduler.step(start_epoch * steps) if per_update else scheduler.step(start_epoch - 1)
        if resumed["not_restored"]:
            print_main(
                runtime,
                f"resumed {config.resume} (not written by convit-kernels) at epoch {start_epoch + 1}; not restored: "
                + "; ".join(resumed["not_restored"]),
            )

    model, no_sync = net, None
    if runtime.world_size > 1:
        device_ids = [runtime.local_rank] if runtime.device.type == "cuda" else None
        # Broadcasts rank 0's weights. No buffers at each forward: ConViT's only ones are GPSA's rel_indices, a cache
        # of the grid that rank 0's GPSA statistics resize (a size mismatch in gloo's broadcast from epoch 2 on).
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=device_ids, broadcast_buffers=False)
        no_sync = model.no_sync
        if ema is not None:  # ranks initialise (and a new head) from their own seeds: rank 0's, as DDP does
            for tensor in ema.module.state_dict().values():
                dist.broadcast(tensor, src=0)
    if config.compile:
        model = torch.compile(model)

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
        f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters, on {runtime.device}"
        f" x {runtime.world_size}, amp {config.amp}",
    )
    if config.eval:
        metrics = evaluate(model, val_loader, runtime, config, bundle.num_classes)
        if ema is not None:
            metrics.update(evaluate_ema(ema, val_loader, runtime, config, bundle.num_classes))
        print_main(runtime, "eval: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return {"records": [], "eval": metrics, "model": net, "ema": ema}

    total_batch = recipe.total_batch(config, runtime.world_size)
    accumulation = f" ({config.batch_size} x {config.accum_steps} accumulated)" if config.accum_steps > 1 else ""
    print_main(
        runtime,
        f"recipe: lr {config.lr:g} x total batch {total_batch}{accumulation} / 512 = {lr:.4g}, "
        f"{config.epochs} epochs x {steps} steps, warm-up {config.warmup_epochs}"
        f"{' (lr stepped per update, warm-up at most a tenth of the updates)' if per_update else ''}, "
        f"wd {config.weight_decay}, smoothing {config.smoothing}, mixup {config.mixup}, "
        f"cutmix {config.cutmix}, drop path {config.drop_path}, augment {config.augment}, "
        f"repeated augmentation {config.repeated_aug}, clip grad "
        f"{f'{config.clip_grad:g} ({config.clip_mode})' if config.clip_grad else 'off'}, model EMA "
        f"{config.model_ema_decay if config.model_ema else 'off'}",
    )
    mixup = recipe.create_mixup(config, bundle.num_classes)
    criterion = recipe.create_criterion(config, mixup)
    stat_images = data.fixed_batch(bundle.val, config.stat_images)
    if stat_images is not None:
        stat_images = stat_images.to(runtime.device)
    log = JsonLog(os.path.join(config.output_dir, output.LOG)) if runtime.is_main else None
    last_path = os.path.join(config.output_dir, output.CHECKPOINT)
    best_path = os.path.join(config.output_dir, output.BEST)
    continues = output.continues_run(config.output_dir, config.resume)
    damaged = log.damaged_lines() if continues and log is not None else []
    if damaged:
        print(
            f"warning: {log.path}: line{'s' if len(damaged) > 1 else ''} {', '.join(map(str, damaged[:10]))} "
            f"{'are' if len(damaged) > 1 else 'is'} not a whole record (a crash while writing?): dropped when "
            "this run writes its first epoch; the other records are kept",
            file=sys.stderr,
        )
    use_tensorboard = config.tensorboard if config.tensorboard is not None else tensorboard_installed()
    board = None

    records = []
    timed_images, timed_s = 0, 0.0
    stop_epoch = config.epochs if not config.stop_after else min(config.epochs, start_epoch + config.stop_after)
    try:
        for epoch in range(start_epoch, stop_epoch):
            train_loader.sampler.set_epoch(epoch)
            record = {"epoch": epoch + 1}
            record.update(
                train_one_epoch(
                    model,
                    train_loader,
                    steps,
                    optimizer,
                    scaler,
                    criterion,
                    mixup,
                    runtime,
                    config,
                    epoch,
                    net=net,
                    ema=ema,
                    no_sync=no_sync,
                    # per update: the count of updates done sets the next update's lr
                    on_update=(lambda step, e=epoch: scheduler.step(e * steps + step + 1)) if per_update else None,
                )
            )
            images, seconds = record.pop("timed")
            timed_images, timed_s = timed_images + images, timed_s + seconds
            # ConViT's (and DeiT's) schedule: after epoch e, the lr of step e; epoch e + 1 trains with it, so the
            # first two epochs both train at --warmup-lr.
            if not per_update:
                scheduler.step(epoch)
            record.update(evaluate(model, val_loader, runtime, config, bundle.num_classes))
            if ema is not None:
                record.update(evaluate_ema(ema, val_loader, runtime, config, bundle.num_classes))
            improved = best is None or record["val_acc1"] > best["val_acc1"]
            if improved:
                best = {"epoch": epoch + 1, "val_acc1": record["val_acc1"]}
            rng_states = [checkpoint.rng_state()]
            if runtime.world_size > 1:
                rng_states = [None] * runtime.world_size
                dist.all_gather_object(rng_states, checkpoint.rng_state())
            if runtime.is_main:
                if epoch == start_epoch:
                    output.claim(config.output_dir, continues=continues, start_epoch=start_epoch, log=log)
                    if use_tensorboard:
                        board = TensorBoard(
                            os.path.join(config.output_dir, output.TENSORBOARD),
                            purge_step=start_epoch + 1 if continues else None,
                        )
                if stat_images is not None:
                    record["gpsa"] = gpsa_statistics(net, stat_images)
                    record["nonlocality_convit"] = nonlocality_as_convit(net, stat_images)
                checkpoint.save(
                    last_path,
                    model=net,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    scaler=scaler,
                    epoch=epoch,
                    config=config,
                    schedule=schedule,
                    rng_states=rng_states,
                    ema=ema,
                    best=best,
                    world_size=runtime.world_size,
                )
                if improved:
                    checkpoint.atomic_copy(last_path, best_path)
                if config.save_every and (epoch + 1) % config.save_every == 0:
                    checkpoint.atomic_copy(last_path, output.every_path(config.output_dir, epoch + 1))
                log.write({k: v for k, v in record.items() if k != "step_losses"})
                if board is not None:
                    board.write(record)
                rate = (
                    f"{record['images_per_s']:.0f} images/s"
                    if record["images_per_s"]
                    else f"images/s not timed (<= {WARMUP_STEPS} steps)"
                )
                ema_acc = f" (EMA {record['val_acc1_ema']:.2f}%)" if ema is not None else ""
                print(
                    f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f}, "
                    f"val acc {record['val_acc1']:.2f}%{ema_acc}{', best' if improved else ''}, {rate}, "
                    f"lr {lr_range(record)}",
                    flush=True,
                )
            records.append(record)
    finally:
        if board is not None:
            board.close()

    plot_path = os.path.join(config.output_dir, output.PLOT)
    if runtime.is_main and records and plot_gpsa(log.records(), plot_path):
        print(f"log: {log.path}, plot: {plot_path}, checkpoint: {last_path}")
    return {
        "records": records,
        "model": net,
        "ema": ema,
        "best": best,
        "images_per_s": timed_images / timed_s if timed_images else None,
    }
