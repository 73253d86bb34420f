"""`convit-kernels train` / `python -m convit_kernels.train`: options, recipe defaults, error handling."""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..arguments import (
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    PROBABILITY,
    SEED,
    SIZE,
    THREADS,
    WORKERS,
    number,
    out_of_memory,
)
from .errors import TrainError, message_of
from .model import DIGITS_RECIPE, IMAGENET_RECIPE, MODEL_NAMES, TIMM_MODELS


class Parser(argparse.ArgumentParser):
    """argparse whose errors are TrainErrors: main reports them as one line with exit code 2, no usage block."""

    def error(self, message):
        raise TrainError(f"{message} (see --help)")


def shown(value) -> str:
    """A default as the help states it: on/off, none for '', 1 for 1.0, lists space-separated."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if value != "" else "none"


def by_recipe(key: str) -> str:
    """The default of an option the recipes set: the ImageNet recipe's with --data-path, else the digits'."""
    return f"(default: {shown(IMAGENET_RECIPE[key])} with --data-path, {shown(DIGITS_RECIPE[key])} on the digits)"


class DefaultsOnce(argparse.HelpFormatter):
    """Adds "(default: X)" to an option's help where the default is a value and the help states none; not to flags
    (their default is the value they do not set), nor to None (by_recipe's or the model's, which the help states)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or "(default:" in text:
            return text
        return f"{text} (default: {shown(action.default)})"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="convit-kernels train",
        description=(
            "Train a timm ConViT with the fused GPSA (DeiT/ConViT recipe). Without --data-path it trains "
            "offline on scikit-learn's 8x8 digits (convit_digits, 16 px, 30 epochs). "
            "Under torchrun it trains with DistributedDataParallel (NCCL on GPUs, gloo on CPU)."
        ),
        formatter_class=DefaultsOnce,
    )
    add_model_options(parser.add_argument_group("model"))
    add_data_options(parser.add_argument_group("data"))
    add_optimisation_options(parser.add_argument_group("optimisation"))
    add_execution_options(parser.add_argument_group("execution"))
    add_output_options(parser.add_argument_group("output"))
    return parser


def add_model_options(g) -> None:
    from convit_kernels.backends import BACKEND_NAMES

    g.add_argument("--model", choices=MODEL_NAMES, help="the ConViT to train " + by_recipe("model"))
    g.add_argument(
        "--no-fused", dest="fused", action="store_false", help="train timm's stock GPSA/MHSA instead of the fused"
    )
    g.add_argument(
        "--backend",
        default="auto",
        choices=("auto",) + BACKEND_NAMES,
        help="fused GPSA backend (see `convit-kernels backends`)",
    )
    g.add_argument("--drop-path", type=PROBABILITY, help="stochastic depth " + by_recipe("drop_path"))
    g.add_argument(
        "--embed-dim",
        type=SIZE,
        help="channels per attention head, as ConViT's --embed_dim (default: the model's, 48 for timm's)",
    )
    g.add_argument(
        "--local-up-to-layer",
        type=COUNT,
        help="the first N blocks are GPSA, the others MHSA (default: the model's, 10 for timm's)",
    )
    g.add_argument(
        "--locality-strength",
        type=NON_NEGATIVE,
        help="how sharply the GPSA heads start focused around their centres (default: the model's, 1.0)",
    )
    g.add_argument(
        "--pretrained",
        action="store_true",
        help="start from timm's pretrained weights for --model (from the Hugging Face hub or its cache): "
        "--finetune <model>",
    )
    g.add_argument(
        "--finetune",
        metavar="FILE|TIMM_NAME",
        help="start a new run from these weights (a checkpoint or state_dict file, or timm's weights such "
        "as convit_tiny.fb_in1k); a head of another class count is replaced, pos_embed is resampled "
        "to the grid of --input-size",
    )


def add_data_options(g) -> None:
    g.add_argument(
        "--data-path", help="ImageFolder root with train/<class>/ and val/<class>/ (default: the embedded digits)"
    )
    g.add_argument(
        "--sampling-ratio", type=FRACTION, default=1.0, help="keep this deterministic fraction of every training class"
    )
    g.add_argument("--input-size", type=SIZE, help="image side in pixels " + by_recipe("input_size"))
    g.add_argument(
        "--batch-size",
        type=POSITIVE_INT,
        help="per process and micro-batch; the total batch is this x world size x --accum-steps "
        + by_recipe("batch_size"),
    )
    g.add_argument("--workers", type=WORKERS, help="DataLoader workers per process " + by_recipe("workers"))
    g.add_argument("--no-aug", dest="augment", action="store_false", help="no random augmentation at all")
    g.add_argument("--auto-augment", help="timm RandAugment spec ('' for none) " + by_recipe("auto_augment"))
    g.add_argument("--color-jitter", type=NON_NEGATIVE, default=0.4, help="colour jitter strength")
    g.add_argument("--reprob", type=PROBABILITY, help="random erasing probability " + by_recipe("reprob"))
    g.add_argument(
        "--repeated-aug",
        action=argparse.BooleanOptionalAction,
        help="timm's RepeatAugSampler, 3 repeats, as in ConViT " + by_recipe("repeated_aug"),
    )
    g.add_argument("--mixup", type=NON_NEGATIVE, help="Mixup alpha, 0 disables " + by_recipe("mixup"))
    g.add_argument("--cutmix", type=NON_NEGATIVE, help="CutMix alpha, 0 disables " + by_recipe("cutmix"))
    g.add_argument(
        "--smoothing",
        type=number(float, low=0, high=1, high_open=True),
        help="label smoothing " + by_recipe("smoothing"),
    )


def add_optimisation_options(g) -> None:
    g.add_argument("--epochs", type=POSITIVE_INT, help="epochs of the schedule " + by_recipe("epochs"))
    g.add_argument("--opt", default="adamw", help="timm optimizer name")
    g.add_argument(
        "--lr",
        type=POSITIVE,
        help="ConViT's --lr: the lr of a total batch of 512; the run uses lr x total batch / 512, "
        "total batch = --batch-size x processes x --accum-steps " + by_recipe("lr"),
    )
    g.add_argument(
        "--accum-steps",
        type=POSITIVE_INT,
        default=1,
        help="gradient accumulation: micro-batches of --batch-size per optimiser step",
    )
    g.add_argument(
        "--clip-grad",
        type=POSITIVE,
        help="clip the gradients at this norm, value or factor (--clip-mode); none clipped without it",
    )
    g.add_argument(
        "--clip-mode",
        choices=("norm", "value", "agc"),
        default="norm",
        help="timm's dispatch_clip_grad mode: global 2-norm, each value, or adaptive (AGC)",
    )
    g.add_argument(
        "--model-ema",
        action="store_true",
        help="keep an exponential moving average of the weights (timm's ModelEmaV3), evaluated every "
        "epoch and saved in the checkpoint",
    )
    g.add_argument(
        "--model-ema-decay",
        type=number(float, low=0, high=1, low_open=True, high_open=True),
        default=0.99996,
        help="EMA decay per optimiser step (ConViT's)",
    )
    g.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.05, help="the optimizer's weight decay")
    g.add_argument("--warmup-epochs", type=COUNT, help="linear warm-up from --warmup-lr " + by_recipe("warmup_epochs"))
    g.add_argument("--warmup-lr", type=NON_NEGATIVE, default=1e-6, help="the lr the warm-up starts at")
    g.add_argument("--min-lr", type=NON_NEGATIVE, default=1e-5, help="the lr the cosine ends at")


def add_execution_options(g) -> None:
    g.add_argument(
        "--amp", choices=("bf16", "fp16", "off"), help="autocast dtype (default: bf16 on a GPU, off on the CPU)"
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--device", choices=("auto", "cpu"), default="auto", help="auto: the GPU where there is one")
    g.add_argument(
        "--threads", type=THREADS, help="CPU threads per process, 0: cores / local processes " + by_recipe("threads")
    )
    g.add_argument("--seed", type=SEED, default=0, help="of the weights, the augmentation and the data order")
    g.add_argument(
        "--steps-per-epoch", type=COUNT, default=0, help="cap the optimiser steps of an epoch (0: whole epoch)"
    )
    g.add_argument(
        "--stop-after",
        type=COUNT,
        default=0,
        help="stop after this many epochs of this invocation; the schedule still spans --epochs",
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")


def add_output_options(g) -> None:
    g.add_argument(
        "--output-dir",
        default="convit-train",
        help="checkpoint.pth, checkpoint-best.pth, log.jsonl, gpsa.png (and --save-every's checkpoints, "
        "TensorBoard's events)",
    )
    g.add_argument(
        "--resume",
        help="checkpoint to continue from (or timm/facebookresearch weights to start from); auto: --output-dir's "
        "checkpoint.pth where there is one, else a new run (so that a torchrun restart continues by itself)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --output-dir (its files go when this run's first epoch ends)",
    )
    g.add_argument("--eval", action="store_true", help="only evaluate the --resume checkpoint")
    g.add_argument("--stat-images", type=COUNT, default=64, help="validation images for the GPSA statistics")
    g.add_argument(
        "--save-every",
        type=COUNT,
        default=0,
        help="also keep the checkpoint of every N-th epoch, as checkpoint-epochNNN.pth (0: never); "
        "checkpoint-best.pth is the epoch of the best val acc1",
    )
    g.add_argument(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        help="TensorBoard scalars in --output-dir/tensorboard (default: when tensorboard is installed)",
    )


def parse_config(argv=None) -> argparse.Namespace:
    """Parse options, fill data-dependent defaults from the ImageNet or the digits recipe, refuse bad combinations."""
    from .model import mixup_active, model_depth, patch_size, validate_optimizer
    from .pretrained import validate_finetune_source
    from .report import tensorboard_installed

    config = build_parser().parse_args(argv)
    recipe = IMAGENET_RECIPE if config.data_path is not None else DIGITS_RECIPE
    for key, value in recipe.items():
        if getattr(config, key) is None:
            setattr(config, key, value)
    if config.amp is None:
        import torch

        config.amp = "bf16" if torch.cuda.is_available() and config.device != "cpu" else "off"
    if config.resume == "auto":
        from .output import CHECKPOINT

        last = os.path.join(config.output_dir, CHECKPOINT)
        config.resume = last if os.path.isfile(last) else None
    if config.eval and config.resume is None:
        raise TrainError("--eval needs the weights to evaluate: --resume <checkpoint>")
    if config.resume is not None and (config.finetune is not None or config.pretrained):
        flag = "--finetune" if config.finetune is not None else "--pretrained"
        raise TrainError(
            f"{flag} starts a new run from weights, --resume continues a run (or evaluates one): choose one"
        )
    if config.pretrained and config.finetune is not None:
        raise TrainError("--pretrained is --finetune with timm's weights for --model: choose one")
    if config.pretrained and config.model not in TIMM_MODELS:
        raise TrainError(
            f"--pretrained: timm has no weights for {config.model}, only for {', '.join(TIMM_MODELS)} "
            f"(or --finetune FILE)"
        )
    if config.finetune is not None:
        validate_finetune_source(config.finetune)
    validate_optimizer(config.opt)
    patch = patch_size(config.model)
    if config.input_size < patch:
        raise TrainError(
            f"--input-size {config.input_size} is smaller than a patch of {config.model} ({patch} x {patch} pixels)"
        )
    depth = model_depth(config.model)
    if config.local_up_to_layer is not None and config.local_up_to_layer > depth:
        raise TrainError(f"--local-up-to-layer {config.local_up_to_layer}: {config.model} has {depth} blocks")
    if config.tensorboard and not tensorboard_installed():
        raise TrainError(
            "--tensorboard: the tensorboard package is not installed (pip install tensorboard, or "
            "leave out --tensorboard)"
        )
    if mixup_active(config) and config.batch_size % 2:
        raise TrainError(
            f"Mixup/CutMix pair each image with another of its batch: --batch-size must be even, "
            f"got {config.batch_size} (or --mixup 0 --cutmix 0)"
        )
    return config


def interrupted_note(config) -> str:
    """After Ctrl-C: how to continue, naming the run's last checkpoint, or that there is none."""
    if config is None or config.eval:
        return ""
    from .output import CHECKPOINT, saved_epoch

    path = os.path.join(config.output_dir, CHECKPOINT)
    epoch = saved_epoch(path) if os.path.isfile(path) else None
    if epoch is None:
        return ": no checkpoint was written"
    return f": training stopped; continue it with --resume {path} (the checkpoint of epoch {epoch})"


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    start = time.perf_counter()
    config = None
    try:
        config = parse_config(argv)
        from .engine import fit

        result = fit(config)
    except KeyboardInterrupt:
        if is_rank_zero():
            print(f"interrupted{interrupted_note(config)}", file=sys.stderr)
        return 130
    except (RuntimeError, MemoryError) as error:  # torch's CPU allocator raises a plain RuntimeError
        message = out_of_memory(error)
        if message is None:
            raise
        print(f"error: {message}: lower --batch-size, --input-size or --embed-dim", file=sys.stderr)
        return 1
    except TrainError as error:
        if error.rank_local and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            print(f"error: rank {os.environ['RANK']}: {message_of(error)}", file=sys.stderr)
        elif error.rank_local or is_rank_zero():  # the others raised the same error: one report is enough
            print(f"error: {message_of(error)}", file=sys.stderr)
        return error.exit_code
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if result["records"] and is_rank_zero():
        last, best = result["records"][-1], result["best"]
        ema = f" (EMA {last['val_acc1_ema']:.2f}%)" if "val_acc1_ema" in last else ""
        rate = result["images_per_s"]
        rate = f"{rate:.0f} images/s after warm-up" if rate else "images/s not timed (too few steps per epoch)"
        print(
            f"done: epoch {last['epoch']}, val acc {last['val_acc1']:.2f}%{ema}, best {best['val_acc1']:.2f}% "
            f"(epoch {best['epoch']}), {rate}, wall {time.perf_counter() - start:.1f} s"
        )
    return 0
