"""Training stack for ConViT with the fused GPSA: ``convit-kernels train`` / ``python -m convit_kernels.train``.

Modules, one idea each: ``data`` (datasets, transforms, samplers), ``model``
(model registry and the DeiT/ConViT recipe), ``runtime`` (device and process
group), ``steps`` (the step loop: accumulation, clipping, EMA; one epoch),
``evaluation`` (accuracy and loss), ``run_setup`` (a run's model, optimiser,
schedule and resumed state), ``engine`` (``fit``: the epochs and what each
writes), ``checkpoint`` (atomic save, resume, foreign checkpoints),
``pretrained`` (--finetune / --pretrained start weights), ``report``
(JSON-lines log, TensorBoard, progress, GPSA statistics and plot), ``output``
(the output folder: one run each), ``errors``, ``cli``.

Without ``--data-path`` it trains offline on scikit-learn's 8x8 digits
(convit_digits at 16 px, 30 epochs; docs/training.md gives the accuracy and time).

From Python: ``config = parse_config([...]); history = fit(config)``
(see python/train_digits.py).
"""

from .cli import main, parse_config
from .engine import fit
from .errors import Diverged, TrainError

__all__ = ["main", "parse_config", "fit", "TrainError", "Diverged"]
