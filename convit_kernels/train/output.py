"""The output folder: checked before any work, one run per folder, and left as it was until an epoch is done.

A folder that already holds a run (any file of one: checkpoints, log, plot,
TensorBoard events) is continued only by ``--resume`` of one of that folder's
checkpoints and replaced only with ``--overwrite``; anything else is refused,
so a fresh run never overwrites another's checkpoints (the last, the best, the
every-N ones) nor appends to its log or events. Nothing is written before the
first epoch ends: a run that fails earlier (bad data, a bad option) leaves the
folder untouched."""

from __future__ import annotations

import glob
import os
import shutil

from .errors import TrainError

CHECKPOINT = "checkpoint.pth"
BEST = "checkpoint-best.pth"
EVERY = "checkpoint-epoch{epoch:03d}.pth"  # --save-every, the epoch from 1
LOG = "log.jsonl"
PLOT = "gpsa.png"
TENSORBOARD = "tensorboard"  # a folder
# Every file a run writes; a replaced run's are removed so that no file of it stays beside the new run's.
RUN_FILE_PATTERNS = (CHECKPOINT, BEST, "checkpoint-epoch*.pth", LOG, PLOT, TENSORBOARD)


def run_files(folder: str) -> list:
    return sorted(path for pattern in RUN_FILE_PATTERNS for path in glob.glob(os.path.join(folder, pattern)))


def every_path(folder: str, epoch: int) -> str:
    return os.path.join(folder, EVERY.format(epoch=epoch))


def epoch_of_every(path: str) -> int | None:
    """The epoch of a --save-every checkpoint's name, or None for another name."""
    digits = os.path.basename(path).removeprefix("checkpoint-epoch").removesuffix(".pth")
    return int(digits) if digits.isdigit() else None


def saved_epoch(path: str) -> int | None:
    """The epoch (from 1) a checkpoint of ours was saved after, read without loading its tensors; None if unreadable."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"] + 1
    except Exception:
        return None


def remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def continues_run(folder: str, resume: str | None) -> bool:
    """Whether --resume names a checkpoint inside the output folder: the same run, continued."""
    if resume is None or not os.path.isdir(folder):
        return False
    return os.path.samefile(os.path.dirname(os.path.abspath(resume)), folder)


def check(folder: str, *, resume: str | None, overwrite: bool) -> None:
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

    Continuing this folder's run keeps its log, its every-N checkpoints and its best checkpoint up to
    `start_epoch` (later ones belong to the abandoned continuation of an earlier checkpoint, and go; the
    TensorBoard events after it are purged by the writer); otherwise the previous run's files go.
    """
    os.makedirs(folder, exist_ok=True)
    if continues:
        log.keep_epochs_up_to(start_epoch)
        later = [
            path
            for path in glob.glob(os.path.join(folder, "checkpoint-epoch*.pth"))
            if (epoch_of_every(path) or 0) > start_epoch
        ]
        best = os.path.join(folder, BEST)
        if os.path.exists(best) and (saved_epoch(best) or 0) > start_epoch:
            later.append(best)
        for path in later:
            os.unlink(path)
        return
    for path in run_files(folder):
        remove(path)
