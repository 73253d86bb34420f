"""A torchrun entry for tests: `convit-kernels train` whose rank 1 SIGKILLs itself at the second step of the second
epoch, in torchrun's first attempt only (as a lost worker)."""

import os
import signal
import sys

from convit_kernels.train import model as recipe
from convit_kernels.train.cli import main

if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
    real_criterion = recipe.create_criterion

    def create_criterion(config, mixup):
        criterion, calls = real_criterion(config, mixup), []

        def loss(logits, y):
            calls.append(None)
            if len(calls) == config.steps_per_epoch + 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return criterion(logits, y)

        return loss

    recipe.create_criterion = create_criterion

sys.exit(main())
