"""One run of the experiment: a model trained through the training stack's step loop, measured along the way.

Between the curve points the run is `train.steps.train_steps` on the seed's batches, with AdamW and its cosine
schedule stepped per update; at every point its validation top-1, gates and per-block nonlocality are recorded;
at the end its top-1 on the test split.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
import torch.nn.functional as F

from ...train.errors import Diverged
from ...train.evaluation import evaluate
from ...train.model import cosine_schedule, create_model, create_optimizer
from ...train.report import gpsa_layers, nonlocality_as_convit
from ...train.runtime import Runtime
from ...train.steps import Stepping, train_steps
from .data import Images, subset, training_batches
from .options import ARMS, STAT_IMAGES, Run

# Every run trains on the CPU, in a process of its own; every step's loss is read (no device to wait for).
RUNTIME = Runtime.single("cpu")
STEPPING = Stepping(amp="off", sync_every=1)


def build_model(args, data: Images, kind: str, fused: bool):
    """The model of an arm (ARMS), with the package's layers if `fused`, else timm's."""
    arm = ARMS[kind]
    arch = {"local_up_to_layer": arm.local_up_to_layer} if arm.local_up_to_layer is not None else {}
    if args.embed_dim:
        arch["embed_dim"] = args.embed_dim
    model = create_model(
        args.model,
        num_classes=data.classes,
        img_size=data.train_x.shape[-1],
        in_chans=data.train_x.shape[1],
        drop_path=0.0,
        fused=fused,
        plain_attention=arm.plain_attention,
        **arch,
    )
    if arm.random_value:  # drawn as timm draws every other Linear of the model, in place of the identity
        for layer in gpsa_layers(model).values():
            layer.v.apply(model._init_weights)
    return model


def describe_model(args, data: Images) -> dict:
    """What the arms are made of: the shared shape, and per arm its GPSA blocks, where its class token joins and
    its parameter count."""
    convit = build_model(args, data, "convit", True)
    heads = convit.blocks[0].attn.num_heads
    shape = {
        "name": args.model,
        "image_side": data.train_x.shape[-1],
        "channels": data.train_x.shape[1],
        "patch": convit.patch_embed.patch_size[0],
        "grid": list(convit.patch_embed.grid_size),
        "depth": len(convit.blocks),
        "heads": heads,
        "embed_dim": convit.embed_dim,
        "head_dim": convit.embed_dim // heads,
        "classes": data.classes,
    }
    arms = {}
    for kind in ARMS:
        model = build_model(args, data, kind, True)
        arms[kind] = {
            "gpsa_blocks": [i for i, block in enumerate(model.blocks) if hasattr(block.attn, "gating_param")],
            "class_token_joins_before_block": model.local_up_to_layer,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
    return {**shape, "arms": arms}


def accuracy(model, data: Images, batches) -> float:
    """Top-1 (%) over `batches` of (normalised images, labels)."""
    return evaluate(model, batches, RUNTIME, STEPPING.amp, data.classes)["val_acc1"]


def curve_points(steps: int, points: int) -> list:
    """The steps at which a run is measured: `points` + 1 evenly spaced from 0 to `steps`, each once."""
    return sorted({round(k * steps / points) for k in range(points + 1)})


def train_run(args, data: Images, run: Run) -> dict:
    """One model trained for run.steps at run.lr; at every curve point its validation top-1, gates and per-block
    nonlocality; at the end its test top-1. A run whose loss is not finite ends there, recorded as diverged."""
    kind, fused = ("convit", False) if run.kind == "stock" else (run.kind, True)
    indices = subset(data.train_y, run.ratio, run.seed, data.pool)
    torch.manual_seed(run.seed)
    model = build_model(args, data, kind, fused)
    optimizer = create_optimizer(model, run.lr, argparse.Namespace(weight_decay=args.weight_decay, opt="adamw"))
    scheduler = cosine_schedule(optimizer, run.steps, round(args.warmup * run.steps), 1e-6, 1e-5)
    generator = torch.Generator().manual_seed(run.seed)  # the same batches and augmentation for every model of a seed
    stream = training_batches(data, indices, args.batch_size, generator)
    criterion = functools.partial(F.cross_entropy, label_smoothing=args.smoothing)
    stat_images = data.normalise(data.test_x[:STAT_IMAGES].float().div_(255))
    points = curve_points(run.steps, args.curve_points)
    history = {"step": [], "train_s": [], "lr": [], "train_loss": [], "val_top1": [], "gates": {}, "nonlocality": {}}
    measure = functools.partial(record_point, history, model, optimizer, stat_images, data)
    wall_start = time.perf_counter()
    with torch.no_grad():  # timm's GPSA builds its position table in its first forward, which its maps need
        model.eval()(stat_images[:1])
    model.train()
    train_s, diverged = 0.0, None
    measure(0, train_s, None)
    for done, until in zip(points, points[1:]):
        try:
            trained = train_steps(
                model,
                stream,
                until - done,
                optimizer,
                criterion,
                RUNTIME,
                STEPPING,
                on_update=lambda step, done=done: scheduler.step(done + step + 1),
                diverged=lambda step, done=done: f"{run.name}: the loss is not finite at step {done + step + 1}",
            )
        except Diverged as error:
            diverged = str(error)
            print(f"{diverged}: recorded as diverged", flush=True)
            break
        train_s += trained["time_s"]
        measure(until, train_s, trained["train_loss"])
        if until in (points[len(points) // 2], points[-1]):
            print(f"{run.name}: step {until}, loss {trained['train_loss']:.3f}", flush=True)
    return {
        "model": run.kind,
        "ratio": run.ratio,
        "seed": run.seed,
        "steps": run.steps,
        "lr": run.lr,
        "train_images": len(indices),
        "epochs": run.steps * args.batch_size / len(indices),
        "diverged": diverged,
        "val_top1": None if diverged else history["val_top1"][-1],
        "top1": None if diverged else accuracy(model, data, data.test_batches(args.test_images)),
        "train_s": train_s,
        "wall_s": time.perf_counter() - wall_start,
        "timed_alone": args.jobs == 1,
        "history": history,
    }


def record_point(history: dict, model, optimizer, stat_images, data: Images, step: int, train_s: float, loss):
    """Append the run's state at `step` to its history: the training seconds so far, the mean loss since the last
    point, the lr, the validation top-1, each GPSA layer's mean gate and each block's mean nonlocality."""
    history["step"].append(step)
    history["train_s"].append(train_s)
    history["lr"].append(optimizer.param_groups[0]["lr"])
    history["train_loss"].append(loss)
    history["val_top1"].append(accuracy(model, data, data.validation_batches()))
    for name, layer in gpsa_layers(model).items():
        history["gates"].setdefault(name, []).append(torch.sigmoid(layer.gating_param).mean().item())
    for block, values in nonlocality_as_convit(model, stat_images).items():
        history["nonlocality"].setdefault(block, []).append(sum(values) / len(values))
