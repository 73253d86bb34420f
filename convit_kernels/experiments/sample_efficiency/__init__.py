"""ConViT against its DeiT twin, a control twin and ConViT without its identity value init on subsets of
Fashion-MNIST: the paper's sample efficiency.

    convit-kernels experiment sample-efficiency --out se-results          # the default run (wall time: docs/)
    convit-kernels experiment sample-efficiency --out se-quick --quick    # a smoke run: 2 ratios, 1 seed, 30 steps

Four arms of one width, depth and 9 heads (`convit_fashion`: 28 px / patch 4 = a 7 x 7 grid, GPSA in all but the
last 2 blocks), each described in `options.ARMS` and in the results: ConViT; its DeiT twin; the control twin
(self-attention only, the class token joining at ConViT's block); ConViT with a random value projection. A
validation split is held out of the training images; each arm's peak lr is chosen on it from a small grid (one
seed, one ratio), then every arm trains the same optimiser steps at every ratio f on round(n x f) images of every
class of the rest, drawn by the seed; the arms of a seed share its subset, batches and augmentation. The runs at one
ratio are also trained --long-factor times longer. Each run records its validation curve and is scored on the test
split once, at its end; gains are paired per seed, with 95% t intervals, and their trend against log f is each
seed's slope. `--jobs` runs train at once, one process (1 thread) each.

A stopped experiment continues where it stopped: the same command skips the runs done in `--out` (runs/*.json); a
folder of other settings is refused. `--summary-only` writes the results of the runs done so far (marked partial).
Writes results.json (a compact summary that names the model and the arms), results.md and sample_efficiency.png;
full per-run logs under runs/.

Modules: ``options`` (the command line, the settings, the arms and the plan of runs), ``data`` (the images in
memory, the validation split, subsets, augmentation), ``one_run`` (a model trained by the training stack's step
loop, measured along the way), ``summary`` (the statistics over runs), ``report`` (results.md and the figure),
``experiment`` (the runs in worker processes, the results folder, ``main``).
"""

from .data import augment, fashion_mnist, image_folder, subset
from .experiment import main, write_json
from .one_run import build_model, train_run
from .options import ARMS, Run, parse_args, plan

__all__ = [
    "ARMS",
    "Run",
    "augment",
    "build_model",
    "fashion_mnist",
    "image_folder",
    "main",
    "parse_args",
    "plan",
    "subset",
    "train_run",
    "write_json",
]
