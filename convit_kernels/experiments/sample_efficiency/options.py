"""The experiment's command line, the settings a results folder records, and the plan of its runs."""

from __future__ import annotations

import math

from ...train.cli import DefaultsOnce, Parser
from ...train.model import MODEL_NAMES, patch_size

# The first line of --help (and of the package's docstring).
DESCRIPTION = (
    "ConViT against its DeiT twin and a control twin on subsets of Fashion-MNIST: the paper's sample efficiency."
)
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
# kind -> (local_up_to_layer: None = the model's, plain_attention)
MODELS = {"convit": (None, False), "deit": (0, False), "control": (None, True)}
LABELS = {"convit": "ConViT", "deit": "DeiT twin", "control": "control twin", "stock": "ConViT, timm's layers"}
PAIRS = (("convit", "deit"), ("convit", "control"), ("control", "deit"))
DEFAULTS = dict(
    ratios=[0.05, 0.25, 1.0],
    seeds=[0, 1, 2, 3, 4],
    steps=3000,
    batch_size=16,
    test_images=0,
    curve_points=10,
    curve_images=2000,
)
QUICK = dict(ratios=[0.3, 1.0], seeds=[0], steps=30, batch_size=16, test_images=500, curve_points=3, curve_images=200)
STAT_IMAGES = 64  # test images on which the nonlocality is measured
# Settings a run folder records: a continued experiment must have the same ones.
SETTINGS = (
    "ratios seeds steps batch_size lr weight_decay warmup smoothing model embed_dim input_size "
    "test_images curve_points curve_images fashion_mnist data_path stock"
).split()


def build_parser(prog=None) -> Parser:
    """The experiment's options; a bad one is a TrainError (one line, exit code 2), as the trainer's."""
    p = Parser(prog=prog, description=DESCRIPTION, formatter_class=DefaultsOnce)
    p.add_argument("--out", required=True, help="results folder: new, or one of this experiment to continue")
    p.add_argument(
        "--ratios", type=float, nargs="+", help=f"sampling ratios f in (0, 1] (default {DEFAULTS['ratios']})"
    )
    p.add_argument("--seeds", type=int, nargs="+", help="seeds: subset, initialisation, batches (default 0 to 4)")
    p.add_argument("--steps", type=int, help=f"optimiser steps of every run (default {DEFAULTS['steps']})")
    p.add_argument("--batch-size", type=int, help=f"images per step (default {DEFAULTS['batch_size']})")
    p.add_argument("--lr", type=float, default=3e-3, help="peak lr of AdamW (cosine schedule)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW's, on weights (not biases, norms, gates)")
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up, as a fraction of the steps (at most 0.1)")
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--model", default="convit_fashion", choices=MODEL_NAMES, help="a `convit-kernels train --model`")
    p.add_argument("--embed-dim", type=int, help="channels per head (default: the model's, 6)")
    p.add_argument("--input-size", type=int, help="image side in pixels (default: 28, or 32 with --data-path)")
    p.add_argument("--fashion-mnist", default=FASHION_MNIST, help="folder of Fashion-MNIST's 4 idx files")
    p.add_argument("--data-path", help="an ImageFolder root (train/, val/) instead of Fashion-MNIST")
    p.add_argument("--test-images", type=int, help="score on the first N test images (default 0: all)")
    p.add_argument("--curve-points", type=int, help="points of the curves over training (default 10)")
    p.add_argument(
        "--curve-images", type=int, help="test images of the accuracy curves, for time-to-accuracy (default 2000)"
    )
    p.add_argument("--no-stock", dest="stock", action="store_false", help="no run of ConViT with timm's layers")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once, in as many processes of 1 thread each")
    p.add_argument(
        "--summary-only",
        action="store_true",
        help="train nothing: write the results of the runs done so far in --out (marked partial if runs are missing)",
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 ratios, 1 seed, 30 steps, 500 test images")
    return p


def parse_args(argv, prog=None):
    """The options, --quick's or the full run's settings where none is given, validated; ratios sorted, seeds once."""
    p = build_parser(prog)
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    bad = [f for f in args.ratios if not 0 < f <= 1]
    if bad:
        p.error(f"--ratios must be in (0, 1], got {' '.join(f'{f:g}' for f in bad)}")
    for name in ("steps", "batch_size", "curve_points", "curve_images", "jobs", "embed_dim", "input_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.test_images < 0:
        p.error("--test-images must be at least 0")
    if args.input_size is not None and args.input_size < patch_size(args.model):
        p.error(f"--input-size {args.input_size} is smaller than a patch of {args.model} ({patch_size(args.model)} px)")
    if not 0 <= args.warmup <= 0.1:
        p.error(f"--warmup must be in [0, 0.1] (a fraction of the steps), got {args.warmup:g}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a positive number, got {args.lr:g}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0) or not 0 <= args.smoothing < 1:
        p.error("--weight-decay must be at least 0 and --smoothing in [0, 1)")
    args.ratios = sorted(set(args.ratios))
    args.seeds = list(dict.fromkeys(args.seeds))
    return args


def run_name(kind: str, ratio: float, seed: int) -> str:
    return f"{kind}_f{ratio:g}_s{seed}"


def plan(args) -> list:
    """(kind, ratio, seed, fused, curve) of every run, seed by seed (a stopped experiment then has whole seeds: paired
    comparisons at every ratio), the three models of a ratio together; ConViT with timm's layers after the first seed.
    The runs at the largest ratio and the first seed record accuracy curves, for time-to-accuracy."""
    timed = (args.ratios[-1], args.seeds[0])
    runs = []
    for seed in args.seeds:
        runs += [(kind, ratio, seed, True, (ratio, seed) == timed) for ratio in args.ratios for kind in MODELS]
        if args.stock and seed == timed[1]:
            runs.append(("stock", *timed, False, True))
    return runs
