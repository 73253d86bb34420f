"""`convit-kernels train` / `python -m convit_kernels.train`: options, recipe defaults, error handling."""

from __future__ import annotations

import argparse
import sys
import time

from .errors import TrainError, message_of
from .model import MODEL_NAMES

# Defaults that depend on the data. With --data-path: the DeiT/ConViT ImageNet recipe.
IMAGENET_RECIPE = dict(
    model="convit_tiny", input_size=224, batch_size=64, epochs=300, lr_base=5e-4, warmup_epochs=5,
    smoothing=0.1, mixup=0.8, cutmix=1.0, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25, drop_path=0.1,
    workers=8, threads=0,
)
# Without it: the embedded 8x8 digits, upscaled to 16 px, patch 4: a 4 x 4 grid of 2 x 2-pixel patches (at 32 px,
# an 8 x 8 grid, the 10 epochs that fit in the same CPU time reached 74% instead of 98%). No RandAugment / Mixup /
# CutMix / erasing / flips: on 8x8 digits they destroy the digit (a flipped 2 is no digit) and the run does not
# learn in minutes; a small random affine instead, and a larger lr (2e-3 for the batch of 32), 1 warm-up epoch.
# One thread: this model's ops (32 x 16 tokens x 64 channels) are too small to pay for a thread pool's barriers,
# and on shared cores those barriers stalled 2 threads to ~3 s per step against ~0.05 s for one.
DIGITS_RECIPE = dict(
    model="convit_digits", input_size=16, batch_size=32, epochs=30, lr_base=3.2e-2, warmup_epochs=1,
    smoothing=0.1, mixup=0.0, cutmix=0.0, auto_augment="", reprob=0.0, drop_path=0.0, workers=0, threads=1,
)
# Measured with `convit-kernels train` (no options), seed 0, on a shared 2-core CPU: 97.78% after 30 epochs,
# 2 min 12 s wall (120 s in training and evaluation).
DIGITS_RESULT = "97.8% validation accuracy (360 held-out digits) in about 2 minutes on a 2-core CPU"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convit-kernels train",
        description=(
            "Train a timm ConViT with the fused GPSA (DeiT/ConViT recipe). Without --data-path it trains "
            f"offline on scikit-learn's 8x8 digits (convit_digits, 16 px, 30 epochs): {DIGITS_RESULT}. "
            "Under torchrun it trains with DistributedDataParallel (NCCL on GPUs, gloo on CPU)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = parser.add_argument_group("model")
    g.add_argument("--model", choices=MODEL_NAMES, help="default convit_tiny, or convit_digits on the digits")
    g.add_argument("--no-fused", dest="fused", action="store_false", help="train timm's stock GPSA/MHSA instead")
    g.add_argument("--backend", default="auto", help="fused GPSA backend (see `convit-kernels backends`)")
    g.add_argument("--drop-path", type=float, help="stochastic depth (0.1 ImageNet, 0 digits)")
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", help="ImageFolder root with train/<class>/ and val/<class>/ (default: digits)")
    g.add_argument("--sampling-ratio", type=float, default=1.0,
                   help="keep this deterministic fraction of every training class")
    g.add_argument("--input-size", type=int, help="image side in pixels (224 ImageNet, 16 digits)")
    g.add_argument("--batch-size", type=int,
                   help="per process; the total batch is this x world size (64 ImageNet, 32 digits)")
    g.add_argument("--workers", type=int, help="DataLoader workers per process (8 ImageNet, 0 digits)")
    g.add_argument("--no-aug", dest="augment", action="store_false", help="no random augmentation at all")
    g.add_argument("--auto-augment", help="timm RandAugment spec ('' for none)")
    g.add_argument("--color-jitter", type=float, default=0.4)
    g.add_argument("--reprob", type=float, help="random erasing probability (0.25 ImageNet)")
    g.add_argument("--repeated-aug", action="store_true", help="timm's RepeatAugSampler (3 repeats)")
    g.add_argument("--mixup", type=float, help="Mixup alpha (0.8 ImageNet, 0 disables)")
    g.add_argument("--cutmix", type=float, help="CutMix alpha (1.0 ImageNet, 0 disables)")
    g.add_argument("--smoothing", type=float, help="label smoothing (0.1)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--opt", default="adamw")
    g.add_argument("--lr", type=float, help="absolute lr; default lr-base x total batch / 512")
    g.add_argument("--lr-base", type=float, help="lr for a total batch of 512 (5e-4 ImageNet)")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--warmup-epochs", type=int)
    g.add_argument("--warmup-lr", type=float, default=1e-6)
    g.add_argument("--min-lr", type=float, default=1e-5)
    g = parser.add_argument_group("execution")
    g.add_argument("--amp", choices=("bf16", "fp16", "off"), help="autocast dtype (default bf16 on GPU, off on CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--device", choices=("auto", "cpu"), default="auto")
    g.add_argument("--threads", type=int, help="CPU threads per process (0: cores / local processes; 1 digits)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps-per-epoch", type=int, default=0, help="cap the steps of an epoch (0: whole epoch)")
    g.add_argument("--stop-after", type=int, default=0,
                   help="stop after this many epochs of this invocation; the schedule still spans --epochs")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")
    g = parser.add_argument_group("output")
    g.add_argument("--output-dir", default="convit-train", help="checkpoint.pth, log.jsonl, gpsa.png")
    g.add_argument("--resume", help="checkpoint to continue from (or timm/facebookresearch weights to start from)")
    g.add_argument("--eval", action="store_true", help="only evaluate the --resume checkpoint")
    g.add_argument("--stat-images", type=int, default=64, help="validation images for the GPSA statistics")
    return parser


def parse_config(argv=None) -> argparse.Namespace:
    """Parse options and fill the data-dependent defaults from the ImageNet or the digits recipe."""
    config = build_parser().parse_args(argv)
    recipe = IMAGENET_RECIPE if config.data_path is not None else DIGITS_RECIPE
    for key, value in recipe.items():
        if getattr(config, key) is None:
            setattr(config, key, value)
    if config.amp is None:
        import torch

        config.amp = "bf16" if torch.cuda.is_available() and config.device != "cpu" else "off"
    return config


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    config = parse_config(argv)
    start = time.perf_counter()
    try:
        from .engine import fit

        result = fit(config)
    except TrainError as error:
        print(f"error: {message_of(error)}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if result["records"]:
        last = result["records"][-1]
        print(f"done: epoch {last['epoch']}, val acc {last['val_acc1']:.2f}%, "
              f"wall {time.perf_counter() - start:.1f} s")
    return 0
