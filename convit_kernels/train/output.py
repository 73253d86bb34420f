"""The output folder: checked before any work, one run per folder, and left as it was until an epoch is done.

A folder that already holds a run (its checkpoint or log) is continued only by
``--resume`` of that folder's checkpoint and replaced only with ``--overwrite``;
anything else is refused, so a fresh run never overwrites another's checkpoint
nor appends to its log. Nothing is written before the first epoch ends: a run
that fails earlier (bad data, a bad option) leaves the folder untouched.
"""

from __future__ import annotations

import glob
import os
from typing import Optional

from .errors import TrainError

CHECKPOINT = "checkpoint.pth"
LOG = "log.jsonl"
PLOT = "gpsa.png"
# Every file a run writes; a replaced run's are removed so that no file of it stays beside the new run's.
RUN_FILE_PATTERNS = (CHECKPOINT, LOG, PLOT)


def run_files(folder: str) -> list:
    return sorted(path for pattern in RUN_FILE_PATTERNS for path in glob.glob(os.path.join(folder, pattern)))


def continues_run(folder: str, resume: Optional[str]) -> bool:
    """Whether --resume names a checkpoint inside the output folder: the same run, continued."""
    if resume is None or not os.path.isdir(folder):
        return False
    return os.path.samefile(os.path.dirname(os.path.abspath(resume)), folder)


def check(folder: str, *, resume: Optional[str], overwrite: bool) -> None:
    """Before any work: `folder` can be created and written, and holds no other run unless resumed or replaced."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise TrainError(f"--output-dir {folder!r} is a file, not a folder")
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise TrainError(f"--output-dir {folder!r} cannot be created: {existing!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrainError(f"--output-dir {folder!r} is not writable (no write permission on {existing!r})")
    previous = run_files(folder) if existing == os.path.abspath(folder) else []
    if previous and not overwrite and not continues_run(folder, resume):
        names = ", ".join(os.path.basename(path) for path in previous)
        raise TrainError(
            f"--output-dir {folder!r} already holds a run ({names}): continue it with --resume "
            f"{os.path.join(folder, CHECKPOINT)}, replace it with --overwrite, or choose another --output-dir"
        )


def claim(folder: str, *, continues: bool, start_epoch: int, log) -> None:
    """At the first write of a run: create the folder and clear what another run left there.

    Continuing this folder's run keeps its log up to `start_epoch` (later records belong to the
    abandoned continuation of an earlier checkpoint); otherwise the previous run's files go.
    """
    os.makedirs(folder, exist_ok=True)
    if continues:
        log.keep_epochs_up_to(start_epoch)
        return
    for path in run_files(folder):
        os.unlink(path)
