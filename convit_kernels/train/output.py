"""The output folder: validated before any work, one run per folder, and left as it was until an epoch is done.

A folder that already holds a run (any file of one: checkpoints, log, plot,
TensorBoard events) is continued only by ``--resume`` of one of that folder's
checkpoints and replaced only with ``--overwrite``; anything else is refused,
so a fresh run never overwrites another's checkpoints (the last, the best, the
every-N ones) nor appends to its log or events. Nothing is written before the
first epoch ends: a run that fails earlier (bad data, a bad option) leaves the
folder untouched. For its whole life a run holds an exclusive flock on
``.train.lock`` in the folder (its pid inside): a second run into the same folder
is refused, and the claim of a killed run goes with its process."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil

from .. import files
from .errors import TrainError

CHECKPOINT = "checkpoint.pth"
BEST = "checkpoint-best.pth"
EVERY = "checkpoint-epoch{epoch:03d}.pth"  # --save-every, the epoch from 1
LOG = "log.jsonl"
PLOT = "gpsa.png"
TENSORBOARD = "tensorboard"  # a folder
LOCK = ".train.lock"  # not a run file: it goes when the run ends, and a stale one (kill -9) is free to take
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


def validate_folder(folder: str, *, resume: str | None, overwrite: bool) -> None:
    """Before any work: `folder` can be created and written, and holds no other run unless resumed or replaced."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise TrainError(f"--output-dir {folder!r} is a file, not a folder")
    if os.path.islink(folder) and not os.path.exists(folder):
        raise TrainError(
            f"--output-dir {folder!r} is a symbolic link to {os.readlink(folder)!r}, which does not exist: create "
            "that folder, or choose another --output-dir"
        )
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


@contextlib.contextmanager
def lock(folder: str, option: str = "--output-dir"):
    """Hold `folder` for one run: an exclusive flock on its LOCK file, or TrainError naming the holder's pid.

    The kernel releases a flock when its process dies, so a killed run's claim never blocks. A folder created
    here and still empty at the end (the run failed before writing) is removed again. `option`: how the user
    named the folder, for the messages (the experiment's is --out).
    """
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK)
    while True:
        try:
            fd = files.open_no_follow(path, os.O_RDWR | os.O_CREAT)
        except files.SymlinkRefused:
            raise TrainError(
                f"{option} {folder!r}: {LOCK} is a symbolic link, which no run of convit-kernels makes: "
                "remove it (a run writes its pid there)"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise TrainError(
                f"{option} {folder!r} is in use by another run (pid {owner}): wait for it to end, or choose "
                f"another {option}"
            ) from None
        # The previous holder may have removed the file between our open and flock: then lock the new one.
        if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.unlink(path)  # before the lock goes, so that no other run takes a file about to vanish
        os.close(fd)
        if created and not os.listdir(folder):
            os.rmdir(folder)


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
