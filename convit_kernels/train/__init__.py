"""Training stack for ConViT with the fused GPSA: ``convit-kernels train`` / ``python -m convit_kernels.train``.

Modules, one idea each: ``data`` (datasets, transforms, samplers), ``model``
(model registry and the DeiT/ConViT recipe), ``engine`` (distributed setup,
train/eval loop), ``checkpoint`` (atomic save, resume, foreign checkpoints),
``report`` (JSON-lines log, progress, GPSA statistics and plot), ``cli``.

From Python: ``config = parse_config([...]); history = fit(config)``.
"""

from .cli import main, parse_config
from .engine import fit
from .errors import TrainError

__all__ = ["main", "parse_config", "fit", "TrainError"]
