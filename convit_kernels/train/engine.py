"""`fit`: a run of `convit-kernels train` from its options to its last epoch, and what each epoch leaves behind.

The run's pieces come from `run_setup`, its steps from `steps`, its scores from `evaluation`. `--batch-size`
is per process, so the total batch (x --accum-steps, the micro-batches of an optimiser step) and the scaled lr
grow with the world size. Only rank 0 prints, logs and writes checkpoints; each epoch it writes the log
line, the checkpoint (and the best and every-N copies) and TensorBoard's scalars.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import checkpoint, data, output, run_setup
from . import model as recipe
from .errors import TrainError
from .evaluation import evaluate, evaluate_ema
from .report import JsonLog, TensorBoard, gpsa_statistics, nonlocality_as_convit, plot_gpsa, tensorboard_installed
from .run_setup import Run
from .runtime import Runtime, print_main, setup_runtime
from .steps import WARMUP_STEPS, train_one_epoch


def fit(config) -> dict:
    """Train (or with config.eval only evaluate) as the config says. Returns the per-epoch records and the model.

    Raises TrainError for bad input, found before the first epoch where it can be (the CLI: one line, exit
    code 2), and Diverged when the loss stops being finite (exit code 1). Rank 0 holds --output-dir throughout.
    """
    runtime = setup_runtime(config)
    if config.eval:  # --eval writes nothing
        return train_or_evaluate(config, runtime)
    output.validate_folder(config.output_dir, resume=config.resume, overwrite=config.overwrite)
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
    run = run_setup.prepare(config, runtime)
    return evaluate_only(run) if config.eval else train_epochs(run)


def evaluate_only(run: Run) -> dict:
    """--eval: the resumed weights' (and their EMA's) metrics, printed."""
    metrics = score(run)
    print_main(run.runtime, "eval: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return {"records": [], "eval": metrics, "model": run.net, "ema": run.ema}


def score(run: Run) -> dict:
    """The validation metrics of the model, and of its EMA where there is one."""
    config, classes = run.config, run.bundle.num_classes
    metrics = evaluate(run.model, run.val_loader, run.runtime, config.amp, classes)
    if run.ema is not None:
        metrics.update(evaluate_ema(run.ema, run.val_loader, run.runtime, config.amp, classes))
    return metrics


@dataclass
class Outputs:
    """Rank 0's side of a run's files: its log, whether it continues this folder's run, the images of the GPSA
    statistics, and TensorBoard's writer once the first epoch has claimed the folder."""

    log: JsonLog | None
    continues: bool
    stat_images: torch.Tensor | None
    tensorboard: bool
    board: TensorBoard | None = None


def open_outputs(run: Run) -> Outputs:
    """The run's Outputs; a continued run's damaged log lines named (they go at its first write)."""
    config, runtime = run.config, run.runtime
    stat_images = data.fixed_batch(run.bundle.val, config.stat_images)
    if stat_images is not None:
        stat_images = stat_images.to(runtime.device)
    log = JsonLog(os.path.join(config.output_dir, output.LOG)) if runtime.is_main else None
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
    return Outputs(log, continues, stat_images, use_tensorboard)


def train_epochs(run: Run) -> dict:
    """The epochs from the run's start to --epochs (or --stop-after's), each trained, scored and written."""
    config, runtime = run.config, run.runtime
    run_setup.announce_recipe(run)
    mixup = recipe.create_mixup(config, run.bundle.num_classes)
    criterion = recipe.create_criterion(config, mixup)
    outputs = open_outputs(run)
    records = []
    timed_images, timed_s = 0, 0.0
    stop_epoch = config.epochs if not config.stop_after else min(config.epochs, run.start_epoch + config.stop_after)
    try:
        for epoch in range(run.start_epoch, stop_epoch):
            record = train_epoch(run, epoch, criterion, mixup)
            images, seconds = record.pop("timed")
            timed_images, timed_s = timed_images + images, timed_s + seconds
            improved = run.best is None or record["val_acc1"] > run.best["val_acc1"]
            if improved:
                run.best = {"epoch": epoch + 1, "val_acc1": record["val_acc1"]}
            rng_states = gathered_rng_states(runtime)
            if runtime.is_main:
                write_epoch(run, outputs, record, improved, rng_states)
            records.append(record)
    finally:
        if outputs.board is not None:
            outputs.board.close()
    plot_path = os.path.join(config.output_dir, output.PLOT)
    if runtime.is_main and records and plot_gpsa(outputs.log.records(), plot_path):
        last_path = os.path.join(config.output_dir, output.CHECKPOINT)
        print(f"log: {outputs.log.path}, plot: {plot_path}, checkpoint: {last_path}")
    return {
        "records": records,
        "model": run.net,
        "ema": run.ema,
        "best": run.best,
        "images_per_s": timed_images / timed_s if timed_images else None,
    }


def train_epoch(run: Run, epoch: int, criterion, mixup) -> dict:
    """One epoch's steps, the lr schedule's step after it, and the validation scores: the epoch's record."""
    run.train_loader.sampler.set_epoch(epoch)
    scheduler, steps = run.scheduler, run.steps
    record = {"epoch": epoch + 1}
    record.update(
        train_one_epoch(
            run.model,
            run.train_loader,
            steps,
            run.optimizer,
            run.scaler,
            criterion,
            mixup,
            run.runtime,
            run.config,
            epoch,
            net=run.net,
            ema=run.ema,
            no_sync=run.no_sync,
            # per update: the count of updates done sets the next update's lr
            on_update=(lambda step: scheduler.step(epoch * steps + step + 1)) if run.per_update else None,
        )
    )
    # ConViT's (and DeiT's) schedule: after epoch e, the lr of step e; epoch e + 1 trains with it, so the
    # first two epochs both train at --warmup-lr.
    if not run.per_update:
        scheduler.step(epoch)
    record.update(score(run))
    return record


def gathered_rng_states(runtime: Runtime) -> list:
    """Every process's RNG states, for rank 0's checkpoint."""
    rng_states = [checkpoint.rng_state()]
    if runtime.world_size > 1:
        rng_states = [None] * runtime.world_size
        dist.all_gather_object(rng_states, checkpoint.rng_state())
    return rng_states


def write_epoch(run: Run, outputs: Outputs, record: dict, improved: bool, rng_states: list) -> None:
    """Rank 0, after an epoch: the folder claimed (the first epoch), the GPSA statistics added to the record, the
    checkpoints, the log line and TensorBoard's scalars written, and the epoch's line printed."""
    config, epoch = run.config, record["epoch"] - 1
    if epoch == run.start_epoch:
        output.claim(config.output_dir, continues=outputs.continues, start_epoch=run.start_epoch, log=outputs.log)
        if outputs.tensorboard:
            outputs.board = TensorBoard(
                os.path.join(config.output_dir, output.TENSORBOARD),
                purge_step=run.start_epoch + 1 if outputs.continues else None,
            )
    if outputs.stat_images is not None:
        record["gpsa"] = gpsa_statistics(run.net, outputs.stat_images)
        record["nonlocality_convit"] = nonlocality_as_convit(run.net, outputs.stat_images)
    save_checkpoints(run, epoch, improved, rng_states)
    outputs.log.write({k: v for k, v in record.items() if k != "step_losses"})
    if outputs.board is not None:
        outputs.board.write(record)
    print(epoch_line(record, improved), flush=True)


def save_checkpoints(run: Run, epoch: int, improved: bool, rng_states: list) -> None:
    """checkpoint.pth, copied to checkpoint-best.pth when the epoch improved and to --save-every's file."""
    config = run.config
    last_path = os.path.join(config.output_dir, output.CHECKPOINT)
    checkpoint.save(
        last_path,
        model=run.net,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        scaler=run.scaler,
        epoch=epoch,
        config=config,
        schedule=run.schedule,
        rng_states=rng_states,
        ema=run.ema,
        best=run.best,
        world_size=run.runtime.world_size,
    )
    if improved:
        checkpoint.atomic_copy(last_path, os.path.join(config.output_dir, output.BEST))
    if config.save_every and (epoch + 1) % config.save_every == 0:
        checkpoint.atomic_copy(last_path, output.every_path(config.output_dir, epoch + 1))


def epoch_line(record: dict, improved: bool) -> str:
    rate = (
        f"{record['images_per_s']:.0f} images/s"
        if record["images_per_s"]
        else f"images/s not timed (<= {WARMUP_STEPS} steps)"
    )
    ema_acc = f" (EMA {record['val_acc1_ema']:.2f}%)" if "val_acc1_ema" in record else ""
    return (
        f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f}, "
        f"val acc {record['val_acc1']:.2f}%{ema_acc}{', best' if improved else ''}, {rate}, "
        f"lr {lr_range(record)}"
    )


def lr_range(record: dict) -> str:
    """The lr an epoch trained at: one value, or its first and last update's."""
    first, last = record["lr_first"], record["lr"]
    return f"{first:.3g}" if f"{first:.3g}" == f"{last:.3g}" else f"{first:.3g} to {last:.3g}"
