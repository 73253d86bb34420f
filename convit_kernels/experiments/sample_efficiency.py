"""ConViT against its DeiT twin and a control twin on subsets of Fashion-MNIST: the paper's sample efficiency.

    convit-kernels experiment sample-efficiency --out se-results          # the default run (wall time: docs/)
    convit-kernels experiment sample-efficiency --out se-quick --quick    # a smoke run: 2 ratios, 1 seed, 30 steps

Three models of one width, depth and 9 heads (`convit_fashion`: 28 px / patch 4 = a 7 x 7 grid, GPSA in all but the
last 2 blocks): ConViT; its DeiT twin (local_up_to_layer 0: self-attention only, the class token from block 0); the
control twin (self-attention only, the class token joining at ConViT's block). Every run takes the same optimiser
steps at every ratio f (epochs proportional to 1 / f) on round(n x f) images of every class drawn by the seed; the
models of a seed share its subset, batches and augmentation (affine and flip of the [0, 1] image, filled with the
black background, then normalised). Each run is scored on the whole test split; gains are paired per seed, with
95% t intervals. `--jobs` runs train at once, one process (1 thread) each.

A stopped experiment continues where it stopped: the same command skips the runs done in `--out` (runs/*.json); a
folder of other settings is refused. `--summary-only` writes the results of the runs done so far (marked partial).
Writes results.json (a compact summary), results.md and sample_efficiency.png; full per-run logs under runs/.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import multiprocessing
import os
import signal
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from .. import files
from ..train import output
from ..train.errors import TrainError

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MISSING_DATA = (
    "install Debian's package (apt-get install dataset-fashion-mnist), or give --fashion-mnist DIR "
    "(its 4 idx files, gzipped or not) or --data-path ROOT (an ImageFolder with train/ and val/)"
)
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


class UsageError(Exception):
    """Bad input or missing data, found before any training: one line on stderr, exit code 2."""


class Diverged(Exception):
    """A run whose loss stopped being finite: one line on stderr, exit code 1 (the runs done so far are kept)."""


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" where the help does not give the default itself, except None and flags' booleans."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def parse_args(argv, prog=None):
    from convit_kernels.train.model import MODEL_NAMES

    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], formatter_class=DefaultsFormatter)
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
    from convit_kernels.train.model import patch_size

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


# ---------------------------------------------------------------------------------------------- data


class Images:
    """A training and a test split held in memory: uint8 N x C x H x W images, int64 labels."""

    def __init__(self, train_x, train_y, test_x, test_y, name):
        self.train_x, self.train_y, self.test_x, self.test_y, self.name = train_x, train_y, test_x, test_y, name
        pixels = train_x.float().div_(255)
        self.mean = pixels.mean(dim=(0, 2, 3), keepdim=True)
        self.std = pixels.std(dim=(0, 2, 3), keepdim=True).clamp_min(1 / 255)  # a constant channel: no division by 0
        self.classes = int(train_y.max()) + 1

    def scored(self, count: int) -> int:
        """How many test images a run is scored on: the first `count` (0: all)."""
        return min(count or len(self.test_y), len(self.test_y))

    def normalise(self, images_01: torch.Tensor) -> torch.Tensor:
        return (images_01 - self.mean) / self.std


def read_idx(folder: str, name: str) -> torch.Tensor:
    """One idx file (name or name.gz in folder): uint8 images N x 28 x 28 or labels N."""
    for path in (os.path.join(folder, name), os.path.join(folder, name + ".gz")):
        if os.path.isfile(path):
            break
    else:
        raise UsageError(f"Fashion-MNIST not found: no {name}[.gz] in {folder!r}: {MISSING_DATA}")
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as error:
        raise UsageError(f"cannot read {path!r}: {error}") from None
    # idx: two zero bytes, the type (0x08: unsigned byte), the number of dimensions, then each size (4 bytes, big end)
    dims = raw[3] if len(raw) >= 4 and raw[:3] == b"\x00\x00\x08" else 0
    sizes = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    expected_dims = 3 if "images" in name else 1
    what = "images" if expected_dims == 3 else "labels"
    if dims != expected_dims or len(raw) != 4 + 4 * dims + math.prod(sizes):
        raise UsageError(f"{path!r} is not an idx file of {what}")
    if math.prod(sizes) == 0:
        raise UsageError(f"{path!r} holds no {what}")
    return torch.frombuffer(bytearray(raw[4 + 4 * dims :]), dtype=torch.uint8).reshape(sizes)


def fashion_mnist(folder: str) -> Images:
    splits = {}
    for split, (images_name, labels_name) in FASHION_FILES.items():
        images, labels = read_idx(folder, images_name), read_idx(folder, labels_name).long()
        if len(images) != len(labels):
            raise UsageError(f"{folder!r}: {len(images)} {split} images but {len(labels)} labels")
        splits[split] = (images[:, None], labels)
    return Images(*splits["train"], *splits["test"], name=f"Fashion-MNIST ({folder})")


def image_folder(root: str, size: int) -> Images:
    """An ImageFolder's train/ and val/ (the test split), resized and centre-cropped to `size`, in memory.

    The trainer's scan and loader: a link loop or an image reached twice is refused, 16-bit images are scaled.
    """
    from torchvision.transforms import v2

    from ..train.data import CheckedImageFolder, load_image

    splits = []
    for split in ("train", "val"):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise UsageError(f"--data-path {root!r} has no {split}/ folder (expected {path}/<class>/<image>)")
        transform = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])
        try:
            folder = CheckedImageFolder(path, transform=transform, loader=load_image)
            splits.append(folder)
        except (FileNotFoundError, OSError) as error:
            raise UsageError(f"--data-path {root!r}: {error}") from None
    if splits[0].classes != splits[1].classes:
        raise UsageError(f"train/ and val/ in {root!r} have different class folders")
    tensors = []
    for folder in splits:
        try:
            images = torch.stack([image for image, _ in folder])
        except TrainError as error:  # the loader's one line for a file PIL cannot read
            raise UsageError(f"--data-path {root!r}: {error}") from None
        tensors += [images, torch.as_tensor(folder.targets)]
    return Images(*tensors, name=f"ImageFolder {root}")


def load_data(args) -> Images:
    if args.data_path is not None:
        if not os.path.isdir(args.data_path):
            raise UsageError(f"--data-path {args.data_path!r} is not a folder")
        return image_folder(args.data_path, args.input_size or 32)
    data = fashion_mnist(args.fashion_mnist)
    if args.input_size not in (None, 28):
        data.train_x, data.test_x = (resize(x, args.input_size) for x in (data.train_x, data.test_x))
    return data


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    scaled = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return scaled.round_().clamp_(0, 255).to(torch.uint8)


def subset(labels: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    """Indices of round(n x ratio) images of every class (at least one), drawn by the seed, sorted."""
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for label in labels.unique(sorted=True).tolist():
        members = (labels == label).nonzero().flatten()
        count = max(1, round(len(members) * ratio))
        keep.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(keep).sort().values


def augment(images_01: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random affine (rotation up to 10 degrees, scale 0.9 to 1.1, shift up to 10%) and a horizontal flip with
    probability 1/2, on [0, 1] images, the border filled with 0: the background of Fashion-MNIST."""
    n = len(images_01)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * 0.2  # affine_grid's units: half the image side
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(images_01.shape), align_corners=False)
    return F.grid_sample(images_01, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def batches(indices: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Endless batches of `indices`: reshuffled every pass, the last partial batch of a pass dropped (a pass
    smaller than one batch is drawn with repeats instead)."""
    while True:
        order = indices[torch.randperm(len(indices), generator=generator)]
        if len(order) < batch_size:
            yield indices[torch.randint(len(indices), (batch_size,), generator=generator)]
            continue
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


# ---------------------------------------------------------------------------------------------- one run


def build_model(args, data: Images, kind: str, fused: bool):
    from convit_kernels.train.model import create_model

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


@torch.no_grad()
def accuracy(model, data: Images, count: int) -> float:
    """Top-1 (%) on the first `count` test images (0: all)."""
    images, labels = (data.test_x, data.test_y) if not count else (data.test_x[:count], data.test_y[:count])
    model.eval()
    hits = 0
    for start in range(0, len(labels), 500):
        x = data.normalise(images[start : start + 500].float().div_(255))
        hits += (model(x).argmax(-1) == labels[start : start + 500]).sum().item()
    model.train()
    return 100.0 * hits / len(labels)


def train_run(args, data: Images, kind: str, ratio: float, seed: int, fused: bool, curve: bool) -> dict:
    """One model trained for args.steps; at every curve point its gates and per-block nonlocality (and with
    `curve`, its accuracy on the curve images and the training seconds so far, evaluation excluded)."""
    from convit_kernels.train.model import cosine_schedule, create_optimizer
    from convit_kernels.train.report import gpsa_layers, nonlocality_as_convit

    indices = subset(data.train_y, ratio, seed)
    torch.manual_seed(seed)
    model = build_model(args, data, kind, fused)
    optimizer = create_optimizer(model, args.lr, argparse.Namespace(weight_decay=args.weight_decay, opt="adamw"))
    scheduler = cosine_schedule(optimizer, args.steps, round(args.warmup * args.steps), 1e-6, 1e-5)
    generator = torch.Generator().manual_seed(seed)  # the same batches and augmentation for every model of a seed
    stream = batches(indices, args.batch_size, generator)
    stat_images = data.normalise(data.test_x[:STAT_IMAGES].float().div_(255))
    points = sorted({round(k * args.steps / args.curve_points) for k in range(args.curve_points + 1)})
    history = {"step": [], "train_s": [], "lr": [], "train_loss": [], "gates": {}, "nonlocality": {}, "top1": []}
    train_s, losses = 0.0, []
    wall_start = time.perf_counter()
    with torch.no_grad():  # timm's GPSA builds its position table in its first forward, which its maps need
        model.eval()(stat_images[:1])
    model.train()
    for step in range(args.steps + 1):
        if step in points:
            history["step"].append(step)
            history["train_s"].append(train_s)
            history["lr"].append(optimizer.param_groups[0]["lr"])
            history["train_loss"].append(sum(losses) / len(losses) if losses else None)
            losses = []
            for name, layer in gpsa_layers(model).items():
                history["gates"].setdefault(name, []).append(torch.sigmoid(layer.gating_param).mean().item())
            for block, values in nonlocality_as_convit(model, stat_images).items():
                history["nonlocality"].setdefault(block, []).append(sum(values) / len(values))
            if curve:
                history["top1"].append(accuracy(model, data, args.curve_images))
            if step in (points[len(points) // 2], points[-1]):
                loss = history["train_loss"][-1] or 0
                print(f"{run_name(kind if fused else 'stock', ratio, seed)}: step {step}, loss {loss:.3f}", flush=True)
        if step == args.steps:
            break
        start = time.perf_counter()
        batch = next(stream)
        x = data.normalise(augment(data.train_x[batch].float().div_(255), generator))
        loss = F.cross_entropy(model(x), data.train_y[batch], label_smoothing=args.smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step(step + 1)
        losses.append(loss.item())
        train_s += time.perf_counter() - start
        if not math.isfinite(losses[-1]):
            raise Diverged(f"{kind} f={ratio:g} seed {seed}: the loss is not finite at step {step + 1} (lower --lr)")
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


# ---------------------------------------------------------------------------------------------- the experiment


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


def write_json(path: str, value) -> None:
    """Atomically: a stopped experiment never leaves a half-written file."""
    files.write_text(path, json.dumps(value, indent=1))


def open_out(args) -> dict:
    """Create --out, or continue the experiment in it: {run name: result} of the runs already done there."""
    settings = {key: getattr(args, key) for key in SETTINGS}
    path = os.path.join(args.out, "settings.json")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} is a file: choose a folder")
    if os.path.isdir(args.out) and set(os.listdir(args.out)) - {output.LOCK}:
        try:
            with open(path) as f:
                recorded = json.load(f)
        except (OSError, ValueError):
            raise UsageError(
                f"--out {args.out!r} is not empty and holds no experiment of this kind: choose a new folder"
            ) from None
        changed = [key for key in SETTINGS if recorded.get(key) != settings[key]]
        if changed:
            raise UsageError(
                f"--out {args.out!r} holds an experiment with other settings ({', '.join(changed)}): "
                f"choose a new folder, or the same options to continue it"
            )
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    write_json(path, settings)
    done = {}
    for kind, ratio, seed, _, _ in plan(args):
        run_path = os.path.join(args.out, "runs", run_name(kind, ratio, seed) + ".json")
        if os.path.exists(run_path):
            try:
                with open(run_path) as f:
                    done[run_name(kind, ratio, seed)] = json.load(f)
            except (OSError, ValueError):  # cut short by a crash, or garbage: the run is not done
                print(f"warning: {run_path} is not a whole run's record: that run trains again", file=sys.stderr)
    return done


def t_interval(values: list) -> dict:
    """Mean, sample std and the half-width of the 95% t interval of the mean (None with fewer than 2 values)."""
    from scipy import stats

    mean = sum(values) / len(values)
    if len(values) < 2:
        return {"mean": mean, "std": None, "ci95": None, "n": len(values)}
    std = statistics.stdev(values)
    return {
        "mean": mean,
        "std": std,
        "ci95": stats.t.ppf(0.975, len(values) - 1) * std / math.sqrt(len(values)),
        "n": len(values),
    }


def time_to_accuracy(runs: list) -> dict | None:
    """Training seconds (evaluation excluded) for each curve-recording run to first reach the DeiT twin's final
    accuracy on the curve images, measured at the curve points."""
    curves = {r["model"]: r for r in runs if r["history"]["top1"]}
    if "deit" not in curves:
        return None
    target = curves["deit"]["history"]["top1"][-1]
    reached = {}
    for kind, r in curves.items():
        h = r["history"]
        first = next((i for i, top1 in enumerate(h["top1"]) if top1 >= target), None)
        reached[kind] = {
            "step": h["step"][first] if first is not None else None,
            "train_s": h["train_s"][first] if first is not None else None,
            "total_train_s": r["train_s"],
            "final_top1": h["top1"][-1],
            "steps_per_s": h["step"][-1] / r["train_s"],
        }
    return {"target_top1": target, "ratio": runs[0]["ratio"], "seed": runs[0]["seed"], "runs": reached}


def mean_curves(runs: list, key: str) -> dict:
    """{layer or block: [mean over the runs, point by point]}."""
    names = runs[0]["history"][key]
    return {
        name: [
            sum(r["history"][key][name][i] for r in runs) / len(runs) for i in range(len(runs[0]["history"]["step"]))
        ]
        for name in names
    }


def summarise(args, data: Images, results: dict, run_s: float) -> dict:
    table = []
    for ratio in args.ratios:
        these = {
            kind: {r["seed"]: r for r in results.values() if r["model"] == kind and r["ratio"] == ratio}
            for kind in MODELS
        }
        row = {"ratio": ratio, "train_images": None, "epochs": None}
        for kind, by_seed in these.items():
            if by_seed:
                some = next(iter(by_seed.values()))
                row["train_images"], row["epochs"] = some["train_images"], round(some["epochs"], 2)
                row[kind] = {
                    **t_interval([r["top1"] for r in by_seed.values()]),
                    "by_seed": {s: r["top1"] for s, r in by_seed.items()},
                }
        row["gains"] = {}
        for a, b in PAIRS:
            seeds = sorted(set(these[a]) & set(these[b]))
            if seeds:
                diffs = [these[a][s]["top1"] - these[b][s]["top1"] for s in seeds]
                row["gains"][f"{a}-{b}"] = {**t_interval(diffs), "by_seed": dict(zip(seeds, diffs))}
        table.append(row)
    curves = []
    for ratio in args.ratios:
        for kind in MODELS:
            these = [r for r in results.values() if r["model"] == kind and r["ratio"] == ratio]
            if these:
                curves.append(
                    {
                        "model": kind,
                        "ratio": ratio,
                        "n": len(these),
                        "step": these[0]["history"]["step"],
                        "gates": mean_curves(these, "gates"),
                        "nonlocality": mean_curves(these, "nonlocality"),
                    }
                )
    timed = [r for r in results.values() if r["history"]["top1"]]
    return {
        "data": data.name,
        "train_images": len(data.train_y),
        "test_images": data.scored(args.test_images),
        "seeds_complete": [
            seed for seed in args.seeds if all(run_name(k, f, seed) in results for k in MODELS for f in args.ratios)
        ],
        "table": table,
        "curves": curves,
        "time_to_accuracy": time_to_accuracy(timed) if timed else None,
        "run_s": run_s,
    }


def interval(stat: dict, sign=False) -> str:
    value = f"{stat['mean']:+.2f}" if sign else f"{stat['mean']:.2f}"
    return value if stat["ci95"] is None else f"{value} ± {stat['ci95']:.2f}"


def layer_label(name: str) -> str:
    """'blocks.2.attn' -> 'block 2' (the GPSA layer of that block)."""
    parts = name.split(".")
    return f"block {parts[1]}" if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else name


def markdown(args, summary: dict) -> str:
    seeds = ", ".join(str(s) for s in args.seeds)
    lines = []
    if summary["runs"] < summary["runs_planned"]:
        lines += [f"**Partial: {summary['runs']} of the {summary['runs_planned']} runs planned.**", ""]
    lines += [
        f"{summary['data']}: top-1 (%) on {summary['test_images']} test images after {args.steps} steps of "
        f"{args.batch_size} images, mean ± the 95% t interval's half-width over seeds {seeds}; the gains are "
        "paired per seed.",
        "",
        "| f | train images | epochs | ConViT | DeiT twin | control twin | ConViT - DeiT | ConViT - control "
        "| control - DeiT |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in (row for row in summary["table"] if row["epochs"] is not None):  # a partial run may lack a ratio
        cells = [interval(row[kind]) if kind in row else "-" for kind in MODELS]
        cells += [
            interval(row["gains"][f"{a}-{b}"], sign=True) if f"{a}-{b}" in row["gains"] else "-" for a, b in PAIRS
        ]
        lines.append(f"| {row['ratio']:g} | {row['train_images']} | {row['epochs']:g} | " + " | ".join(cells) + " |")
    convit = [c for c in summary["curves"] if c["gates"]]
    if convit:
        layers = list(convit[0]["gates"])
        lines += [
            "",
            "ConViT's gate sigmoid(lambda) per GPSA layer (1 = positional attention only), mean over heads and seeds: "
            "at the start → half-way → the end:",
            "",
            "| f | " + " | ".join(layer_label(layer) for layer in layers) + " |",
            "|---:|" + "---:|" * len(layers),
        ]
        for c in convit:
            mid = len(c["step"]) // 2
            cells = [f"{v[0]:.3f} → {v[mid]:.3f} → {v[-1]:.3f}" for v in (c["gates"][layer] for layer in layers)]
            lines.append(f"| {c['ratio']:g} | " + " | ".join(cells) + " |")
    if summary["curves"]:
        blocks = sorted(summary["curves"][0]["nonlocality"], key=int)
        lines += [
            "",
            "Nonlocality (patches) per block, mean over heads and seeds (every block fed the patch embedding of "
            f"{STAT_IMAGES} test images, as ConViT's main.py): at the start → the end; GPSA blocks marked *:",
            "",
            "| model | f | " + " | ".join(f"block {b}" for b in blocks) + " |",
            "|---|---:|" + "---:|" * len(blocks),
        ]
        for c in summary["curves"]:
            gpsa = {layer_label(layer) for layer in c["gates"]}
            cells = [
                f"{'*' if f'block {b}' in gpsa else ''}{c['nonlocality'][b][0]:.2f} → {c['nonlocality'][b][-1]:.2f}"
                for b in blocks
            ]
            lines.append(f"| {LABELS[c['model']]} | {c['ratio']:g} | " + " | ".join(cells) + " |")
    tta = summary["time_to_accuracy"]
    if tta:
        lines += [
            "",
            f"Time to the DeiT twin's final accuracy ({tta['target_top1']:.2f}% on the first {args.curve_images} test "
            f"images) at f = {tta['ratio']:g}, seed {tta['seed']}: training seconds, evaluation excluded, measured at "
            f"{args.curve_points} points of the run (on a shared machine: noisy):",
            "",
            "| model | reached at step | seconds to reach | seconds, whole run | steps/s "
            "| final top-1 (curve images) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for kind, r in tta["runs"].items():
            step = r["step"] if r["step"] is not None else "not reached"
            seconds = f"{r['train_s']:.0f}" if r["train_s"] is not None else "-"
            lines.append(
                f"| {LABELS[kind]} | {step} | {seconds} | {r['total_train_s']:.0f} | {r['steps_per_s']:.2f} | "
                f"{r['final_top1']:.2f} |"
            )
    lines += ["", f"The runs took {summary['run_s']:.0f} s in all (training and evaluation, summed over runs)."]
    return "\n".join(lines) + "\n"


def plot(args, summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_gate, ax_nl) = plt.subplots(1, 3, figsize=(16, 4.5))
    for kind, marker in zip(MODELS, "osD"):
        rows = [r for r in summary["table"] if kind in r]
        ax_acc.errorbar(
            [r["ratio"] for r in rows],
            [r[kind]["mean"] for r in rows],
            yerr=[r[kind]["ci95"] or 0 for r in rows],
            marker=marker,
            capsize=3,
            label=LABELS[kind],
        )
    ax_acc.set(xscale="log", xlabel="sampling ratio f", ylabel="test top-1 (%), 95% interval", title="accuracy vs data")
    ax_acc.set_xticks(args.ratios, [f"{f:g}" for f in args.ratios])
    ax_acc.minorticks_off()
    ax_acc.legend()
    curves = {(c["model"], c["ratio"]): c for c in summary["curves"]}
    for ratio, style in zip(dict.fromkeys((args.ratios[0], args.ratios[-1])), ("-", ":")):
        c = curves.get(("convit", ratio))
        if c:
            for index, (layer, values) in enumerate(c["gates"].items()):
                colour = plt.cm.viridis(index / max(1, len(c["gates"]) - 1))
                ax_gate.plot(
                    c["step"], values, style, color=colour, marker=".", label=f"{layer_label(layer)}, f = {ratio:g}"
                )
    ax_gate.set(
        xlabel="optimiser step",
        ylabel="sigmoid(lambda), mean over heads and seeds",
        title="ConViT: gate per GPSA layer",
    )
    for kind, style in (("convit", "-"), ("control", ":"), ("deit", "--")):
        c = curves.get((kind, args.ratios[0]))
        if c:
            blocks = sorted(c["nonlocality"], key=int)
            for b in blocks:
                colour = plt.cm.plasma(int(b) / max(1, len(blocks)))
                ax_nl.plot(c["step"], c["nonlocality"][b], style, color=colour, label=f"{LABELS[kind]}, block {b}")
    ax_nl.set(
        xlabel="optimiser step",
        ylabel="nonlocality (patches), mean over heads and seeds",
        title=f"nonlocality per block, f = {args.ratios[0]:g}",
    )
    for ax in (ax_gate, ax_nl):
        if ax.lines:
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    with files.replacing(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


# The experiment's args and data, set before the worker processes fork: they inherit them instead of a copy.
SHARED = {}


def work(spec) -> tuple:
    """Train one run of the plan and write its log: (its name, its result)."""
    args, data = SHARED["args"], SHARED["data"]
    kind, ratio, seed, fused, curve = spec
    name = run_name(kind, ratio, seed)
    print(f"{name}: {LABELS[kind]}, f = {ratio:g}, seed {seed}: started", flush=True)
    result = train_run(args, data, "convit" if kind == "stock" else kind, ratio, seed, fused, curve)
    write_json(os.path.join(args.out, "runs", name + ".json"), result)
    return name, result


def stop(signum, frame):
    raise KeyboardInterrupt


def start_worker() -> None:
    torch.set_num_threads(1)  # one process per core: these small ops do not pay for a thread pool's barriers
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the experiment in the parent, one line
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's pool.terminate()


def run(args) -> int:
    torch.set_num_threads(1)
    data = load_data(args)  # first: a missing data set is reported before anything is written
    if min(args.ratios) * len(data.train_y) / data.classes < 1:
        raise UsageError(f"--ratios {min(args.ratios):g} keeps less than one image of a class: raise it")
    with output.lock(args.out, "--out"):  # one experiment per folder: a second would train the same runs
        return _run_in(args, data)


def _run_in(args, data) -> int:
    done = open_out(args)
    todo = [spec for spec in plan(args) if run_name(*spec[:3]) not in done and not args.summary_only]
    print(
        f"data: {data.name}, {len(data.train_y)} train / {data.scored(args.test_images)} test images, "
        f"{data.classes} classes; {len(todo) + len(done)} runs of {args.steps} steps, {len(done)} done before in "
        f"{args.out}, {min(args.jobs, len(todo))} at once",
        flush=True,
    )
    SHARED.update(args=args, data=data)
    start = time.perf_counter()
    jobs = min(args.jobs, len(todo))
    pool = multiprocessing.get_context("fork").Pool(jobs, initializer=start_worker) if jobs > 1 else None
    # After the fork: a worker that inherited this handler would raise in its start-up when
    # pool.terminate() stops it, a traceback instead of the one line.
    signal.signal(signal.SIGTERM, stop)  # as Ctrl-C: the workers stop with the experiment, one line
    try:
        total = len(done) + len(todo)
        for trained, (name, result) in enumerate(pool.imap_unordered(work, todo) if pool else map(work, todo), 1):
            done[name] = result
            elapsed = time.perf_counter() - start
            print(
                f"[{len(done)}/{total}] {name}: top-1 {result['top1']:.2f}%, {result['train_s']:.0f} s training; "
                f"elapsed {elapsed:.0f} s, about {elapsed / trained * (len(todo) - trained):.0f} s left",
                flush=True,
            )
    except KeyboardInterrupt:
        print(f"stopped: the {len(done)} runs done are kept in {args.out}; the same command continues", file=sys.stderr)
        return 130
    finally:
        if pool:
            pool.terminate()
    summary = summarise(args, data, done, sum(r["wall_s"] for r in done.values()))
    summary["runs"], summary["runs_planned"] = len(done), len(plan(args))
    summary["settings"] = {key: getattr(args, key) for key in SETTINGS}
    write_json(os.path.join(args.out, "results.json"), summary)
    table = markdown(args, summary)
    files.write_text(os.path.join(args.out, "results.md"), table)
    plot(args, summary, os.path.join(args.out, "sample_efficiency.png"))
    print("\n" + table)
    print(f"results: {args.out}/results.json, results.md, sample_efficiency.png; every run's log in {args.out}/runs/")
    return 0


def main(argv=None, prog=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv, prog)
        return run(args)
    except (UsageError, TrainError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Diverged as error:
        print(f"error: {error}; the runs done are kept in {args.out}: the same command continues", file=sys.stderr)
        return 1
