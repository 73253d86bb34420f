"""One run of the experiment: a model trained through the training stack's step loop, measured along the way.

Between the curve points the run is `train.steps.train_steps` on the seed's batches, with AdamW and its cosine
schedule stepped per update; at every point its gates and per-block nonlocality are recorded (and, for the
runs that draw the curves, its accuracy by the trainer's `evaluate`).
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
import torch.nn.functional as F

from ...train.evaluation import evaluate
from ...train.model import cosine_schedule, create_model, create_optimizer
from ...train.report import gpsa_layers, nonlocality_as_convit
from ...train.runtime import Runtime
from ...train.steps import Stepping, train_steps
from .data import Images, subset, training_batches
from .options import MODELS, STAT_IMAGES, run_name

# Every run trains on the CPU, in a process of its own; every step's loss is read (no device to wait for).
RUNTIME = Runtime.single("cpu")
STEPPING = Stepping(amp="off", sync_every=1)


def build_model(args, data: Images, kind: str, fused: bool):
    local, plain = MODELS[kind]
    arch = {"local_up_to_layer": local} if local is not None else {}
    if args.embed_dim:
        arch["embed_dim"] = args.embed_dim
    return create_model(
        args.model,
        num_classes=data.classes,
        img_size=data.train_x.shape[-1],
        in_chans=data.train_x.shape[1],
        drop_path=0.0,
        fused=fused,
        plain_attention=plain,
        **arch,
    )


def accuracy(model, data: Images, count: int) -> float:
    """Top-1 (%) on the first `count` test images (0: all)."""
    return evaluate(model, data.test_batches(count), RUNTIME, STEPPING.amp, data.classes)["val_acc1"]


def curve_points(steps: int, points: int) -> list:
    """The steps at which a run is measured: `points` + 1 evenly spaced from 0 to `steps`, each once."""
    return sorted({round(k * steps / points) for k in range(points + 1)})


def train_run(args, data: Images, kind: str, ratio: float, seed: int, fused: bool, curve: bool) -> dict:
    """One model trained for args.steps; at every curve point its gates and per-block nonlocality (and with
    `curve`, its accuracy on the curve images and the training seconds so far, evaluation excluded)."""
    indices = subset(data.train_y, ratio, seed)
    torch.manual_seed(seed)
    model = build_model(args, data, kind, fused)
    optimizer = create_optimizer(model, args.lr, argparse.Namespace(weight_decay=args.weight_decay, opt="adamw"))
    scheduler = cosine_schedule(optimizer, args.steps, round(args.warmup * args.steps), 1e-6, 1e-5)
    generator = torch.Generator().manual_seed(seed)  # the same batches and augmentation for every model of a seed
    stream = training_batches(data, indices, args.batch_size, generator)
    criterion = functools.partial(F.cross_entropy, label_smoothing=args.smoothing)
    stat_images = data.normalise(data.test_x[:STAT_IMAGES].float().div_(255))
    points = curve_points(args.steps, args.curve_points)
    history = {"step": [], "train_s": [], "lr": [], "train_loss": [], "gates": {}, "nonlocality": {}, "top1": []}
    measure = functools.partial(record_point, history, model, optimizer, stat_images, data if curve else None, args)
    wall_start = time.perf_counter()
    with torch.no_grad():  # timm's GPSA builds its position table in its first forward, which its maps need
        model.eval()(stat_images[:1])
    model.train()
    train_s = 0.0
    measure(0, train_s, None)
    for done, until in zip(points, points[1:]):
        trained = train_steps(
            model,
            stream,
            until - done,
            optimizer,
            criterion,
            RUNTIME,
            STEPPING,
            on_update=lambda step, done=done: scheduler.step(done + step + 1),
            diverged=lambda step, done=done: (
                f"{kind} f={ratio:g} seed {seed}: the loss is not finite at step {done + step + 1} (lower --lr)"
            ),
        )
        train_s += trained["time_s"]
        measure(until, train_s, trained["train_loss"])
        if until in (points[len(points) // 2], points[-1]):
            name = run_name(kind if fused else "stock", ratio, seed)
            print(f"{name}: step {until}, loss {trained['train_loss']:.3f}", flush=True)
    return {
        "model": kind if fused else "stock",
        "ratio": ratio,
        "seed": seed,
        "train_images": len(indices),
        "epochs": args.steps * args.batch_size / len(indices),
        "top1": accuracy(model, data, args.test_images),
        "train_s": train_s,
        "wall_s": time.perf_counter() - wall_start,
        "history": history,
    }


def record_point(history: dict, model, optimizer, stat_images, curve_data, args, step: int, train_s: float, loss):
    """Append the run's state at `step` to its history: the training seconds so far, the mean loss since the last
    point, the lr, each GPSA layer's mean gate, each block's mean nonlocality (and the accuracy on the curve images
    when `curve_data` is given)."""
    history["step"].append(step)
    history["train_s"].append(train_s)
    history["lr"].append(optimizer.param_groups[0]["lr"])
    history["train_loss"].append(loss)
    for name, layer in gpsa_layers(model).items():
        history["gates"].setdefault(name, []).append(torch.sigmoid(layer.gating_param).mean().item())
    for block, values in nonlocality_as_convit(model, stat_images).items():
        history["nonlocality"].setdefault(block, []).append(sum(values) / len(values))
    if curve_data is not None:
        history["top1"].append(accuracy(model, curve_data, args.curve_images))
