"""The experiment's command line, the settings a results folder records, its arms and the plan of its runs."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...train.cli import DefaultsOnce, Parser
from ...train.errors import TrainError
from ...train.model import MODEL_NAMES, patch_size

# The first line of --help (and of the package's docstring).
DESCRIPTION = (
    "ConViT against its DeiT twin, a control twin and ConViT without its identity value init on subsets of "
    "Fashion-MNIST: the paper's sample efficiency."
)
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist


@dataclass(frozen=True)
class Arm:
    """One model of the study: how it differs from ConViT, and what that is in words (written into the results)."""

    label: str
    description: str
    local_up_to_layer: int | None = None  # None: the model's (ConViT's GPSA blocks)
    plain_attention: bool = False  # GPSA layers replaced by freshly initialised self-attention
    random_value: bool = False  # GPSA's value projection drawn as the other weights, not set to the identity


ARMS = {
    "convit": Arm(
        "ConViT",
        "ConViT as the paper builds it: GPSA in the first local_up_to_layer blocks, with the local init (each head's "
        "positional attention centred on one offset of a 3 x 3 kernel, the value projection the identity, gate "
        "sigmoid(1)); the class token joins after the GPSA blocks",
    ),
    "deit": Arm(
        "DeiT twin",
        "the same width, depth and heads with self-attention in every block (local_up_to_layer 0): no positional "
        "attention, every weight drawn at random, the class token from block 0",
        local_up_to_layer=0,
    ),
    "control": Arm(
        "control twin",
        "self-attention in every block (ConViT's GPSA layers replaced by freshly drawn self-attention), the class "
        "token joining where ConViT's does: separates where the class token enters from positional attention",
        plain_attention=True,
    ),
    "randv": Arm(
        "ConViT, random value",
        "ConViT with its GPSA value projections drawn at random as the twins' are, not set to the identity: "
        "separates the identity-value init from positional attention",
        random_value=True,
    ),
}
LABELS = {kind: arm.label for kind, arm in ARMS.items()} | {"stock": "ConViT, timm's layers"}
# Paired differences reported. The first is the paper's gain; the next three add up to it: the identity value
# (convit - randv), positional attention with its local init (randv - control), the class token's entry
# (control - deit).
PAIRS = (("convit", "deit"), ("convit", "randv"), ("randv", "control"), ("control", "deit"))
STUDY_ARMS = ("convit", "deit")  # at every ratio and seed; the others (the ablation) at --ablation-ratios
LONG_ARMS = ("convit", "deit")  # trained longer too: does the twin catch up with more steps?
DEFAULTS = dict(
    ratios=[0.002, 0.01, 0.05, 1.0],
    seeds=[0, 1, 2, 3, 4],
    steps=2000,
    batch_size=16,
    lrs=[1e-3, 3e-3, 1e-2],
    lr_ratio=0.05,
    long_ratio=0.05,
    long_factor=3,
    long_seeds=3,
    ablation_seeds=3,
    validation_per_class=60,
    test_images=0,
    curve_points=30,
)
QUICK = dict(
    ratios=[0.3, 1.0],
    seeds=[0],
    steps=30,
    batch_size=16,
    lrs=[3e-3, 1e-2],
    lr_ratio=1.0,
    long_ratio=1.0,
    long_factor=2,
    long_seeds=1,
    ablation_seeds=1,
    validation_per_class=2,
    test_images=500,
    curve_points=3,
)
STAT_IMAGES = 64  # test images on which the nonlocality is measured
VALIDATION_SEED = 20210  # draws the validation split, the same for every run and seed
# Settings a run folder records: a continued experiment must have the same ones.
SETTINGS = (
    "ratios seeds steps batch_size lrs lr_ratio long_ratio long_factor long_seeds ablation_ratios ablation_seeds "
    "validation_per_class "
    "weight_decay warmup smoothing model embed_dim input_size test_images curve_points fashion_mnist data_path stock"
).split()


@dataclass(frozen=True)
class Run:
    """One training run of the plan."""

    kind: str  # an ARMS key, or "stock": ConViT with timm's layers
    ratio: float
    seed: int
    steps: int
    lr: float

    @property
    def name(self) -> str:
        return f"{self.kind}_f{self.ratio:g}_s{self.seed}_n{self.steps}_lr{self.lr:g}"


def build_parser(prog=None) -> Parser:
    """The experiment's options; a bad one is a TrainError (one line, exit code 2), as the trainer's."""
    p = Parser(prog=prog, description=DESCRIPTION, formatter_class=DefaultsOnce)
    p.add_argument("--out", required=True, help="results folder: new, or one of this experiment to continue")
    study = p.add_argument_group("the study")
    study.add_argument("--ratios", type=float, nargs="+", help=f"sampling ratios f in (0, 1] ({DEFAULTS['ratios']})")
    study.add_argument("--seeds", type=int, nargs="+", help="seeds: subset, initialisation, batches (default 0 to 4)")
    study.add_argument("--steps", type=int, help=f"optimiser steps of every run ({DEFAULTS['steps']})")
    study.add_argument("--batch-size", type=int, help=f"images per step ({DEFAULTS['batch_size']})")
    study.add_argument("--lrs", type=float, nargs="+", help=f"peak lrs of AdamW tried per arm ({DEFAULTS['lrs']})")
    study.add_argument(
        "--lr-ratio", type=float, help="the ratio at which the lr of each arm is chosen, at the first seed (0.05)"
    )
    study.add_argument("--long-ratio", type=float, help="the ratio also trained --long-factor times longer (0.05)")
    study.add_argument("--long-factor", type=int, help="how many times --steps the long runs take (3)")
    study.add_argument("--long-seeds", type=int, help="how many of the seeds (the first) the long runs take (3)")
    study.add_argument(
        "--ablation-ratios",
        type=float,
        nargs="+",
        help="the ratios of the control twin and ConViT, random value (default: the smallest and the largest)",
    )
    study.add_argument("--ablation-seeds", type=int, help="how many of the seeds (the first) the ablation arms take")
    study.add_argument(
        "--validation-per-class",
        type=int,
        help="training images of every class held out for validation: the lr's choice and the curves (60)",
    )
    study.add_argument("--test-images", type=int, help="score on the first N test images (default 0: all)")
    study.add_argument("--curve-points", type=int, help="points of the curves over training (30)")
    study.add_argument("--stock", action="store_true", help="also ConViT with timm's layers, at f = 1, the first seed")
    recipe = p.add_argument_group("the recipe")
    recipe.add_argument(
        "--weight-decay", type=float, default=0.05, help="AdamW's, on weights (not biases, norms, gates)"
    )
    recipe.add_argument("--warmup", type=float, default=0.05, help="warm-up, as a fraction of the steps (at most 0.1)")
    recipe.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    recipe.add_argument(
        "--model", default="convit_fashion", choices=MODEL_NAMES, help="a `convit-kernels train --model`"
    )
    recipe.add_argument("--embed-dim", type=int, help="channels per head (default: the model's, 6)")
    recipe.add_argument("--input-size", type=int, help="image side in pixels (default: 28, or 32 with --data-path)")
    data = p.add_argument_group("the data")
    data.add_argument("--fashion-mnist", default=FASHION_MNIST, help="folder of Fashion-MNIST's 4 idx files")
    data.add_argument("--data-path", help="an ImageFolder root (train/, val/) instead of Fashion-MNIST")
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
    bad = [f for f in args.ratios + [args.lr_ratio, args.long_ratio] if not 0 < f <= 1]
    if bad:
        p.error(f"--ratios, --lr-ratio and --long-ratio must be in (0, 1], got {' '.join(f'{f:g}' for f in bad)}")
    positive = (
        "steps batch_size curve_points jobs embed_dim input_size long_factor long_seeds ablation_seeds "
        "validation_per_class"
    )
    for name in positive.split():
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.test_images < 0:
        p.error("--test-images must be at least 0")
    if args.input_size is not None and args.input_size < patch_size(args.model):
        p.error(f"--input-size {args.input_size} is smaller than a patch of {args.model} ({patch_size(args.model)} px)")
    if not 0 <= args.warmup <= 0.1:
        p.error(f"--warmup must be in [0, 0.1] (a fraction of the steps), got {args.warmup:g}")
    if not all(math.isfinite(lr) and lr > 0 for lr in args.lrs):
        p.error(f"--lrs must be positive numbers, got {' '.join(f'{lr:g}' for lr in args.lrs)}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0) or not 0 <= args.smoothing < 1:
        p.error("--weight-decay must be at least 0 and --smoothing in [0, 1)")
    if args.ablation_ratios is None:
        args.ablation_ratios = [min(args.ratios), max(args.ratios)]
    if not set(args.ablation_ratios) <= set(args.ratios):
        p.error("--ablation-ratios must be some of --ratios")
    args.ratios, args.ablation_ratios = sorted(set(args.ratios)), sorted(set(args.ablation_ratios))
    args.seeds = list(dict.fromkeys(args.seeds))
    args.lrs = sorted(set(args.lrs))
    return args


def lr_grid(args) -> list:
    """The runs that choose each arm's lr: every lr of the grid at --lr-ratio, the first seed."""
    return [Run(kind, args.lr_ratio, args.seeds[0], args.steps, lr) for lr in args.lrs for kind in ARMS]


def plan(args, lrs: dict) -> list:
    """The runs of the study at each arm's chosen lr: the long runs first (the longest, so that two workers end
    together), then seed by seed (a stopped experiment has whole seeds: paired comparisons at every ratio), the
    arms of a ratio together (the ablation arms at its ratios and seeds); ConViT with timm's layers (--stock)
    last."""
    runs = [
        Run(kind, args.long_ratio, seed, args.steps * args.long_factor, lrs[kind])
        for seed in args.seeds[: args.long_seeds]
        for kind in LONG_ARMS
    ]
    ablation = {(ratio, seed) for ratio in args.ablation_ratios for seed in args.seeds[: args.ablation_seeds]}
    runs += [
        Run(kind, ratio, seed, args.steps, lrs[kind])
        for seed in args.seeds
        for ratio in args.ratios
        for kind in ARMS
        if kind in STUDY_ARMS or (ratio, seed) in ablation
    ]
    if args.stock:
        runs.append(Run("stock", args.ratios[-1], args.seeds[0], args.steps, lrs["convit"]))
    return runs


def chosen_lrs(args, results: dict) -> dict | None:
    """{arm: the lr of its best final validation top-1 in the grid} (a diverged run never chosen; ties: the lower
    lr), or None while a grid run is missing."""
    grid = lr_grid(args)
    if any(run.name not in results for run in grid):
        return None
    chosen = {}
    for kind in ARMS:
        scored = [
            (results[r.name]["val_top1"], -r.lr) for r in grid if r.kind == kind and not results[r.name]["diverged"]
        ]
        if not scored:
            raise TrainError(f"every lr of --lrs diverged for the {ARMS[kind].label}: give lower ones")
        chosen[kind] = -max(scored)[1]
    return chosen
