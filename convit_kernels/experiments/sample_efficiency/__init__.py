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

Modules: ``options`` (the command line, the settings and the plan of runs), ``data`` (the images in memory, subsets,
augmentation), ``one_run`` (a model trained by the training stack's step loop, measured along the way),
``summary`` (the statistics over runs), ``report`` (results.md and the figure), ``experiment`` (the runs in worker
processes, the results folder, ``main``).
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
