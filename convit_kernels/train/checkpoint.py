"""Checkpoints: atomic save, exact resume (optimiser, scheduler, scaler, RNG), and foreign ConViT weights.

A checkpoint is a dict with ``model`` (the unwrapped state_dict, timm's keys),
``model_ema`` (the EMA weights with --model-ema, else None), ``optimizer``,
``lr_scheduler``, ``scaler``, ``epoch`` (the last completed epoch, from 0),
``best`` (the epoch, from 1, and val acc1 of the best epoch so far), ``rng``,
``config``, ``schedule`` and ``world_size``, all tensors and plain Python data: every file is
read with ``torch.load(weights_only=True)``, which refuses anything else, since
unpickling an arbitrary object can run code. ``load_weights`` also accepts a
bare timm or facebookresearch ConViT state_dict, or one under a ``model`` /
``state_dict`` key, in a ``.pth`` or a ``.safetensors`` file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import random
import shutil
import zipfile

import numpy as np
import torch
from torch import nn

from .. import files
from .errors import TrainError, WriteFailed


@contextlib.contextmanager
def replacing(path: str):
    """A binary file to write in place of `path` (:func:`convit_kernels.files.replacing`): `path` is always whole.

    An OSError (a full disk) becomes a WriteFailed line; `path` stays as it was.
    """
    try:
        with files.replacing(path) as f:
            yield f
    except OSError as error:
        kept = "the previous one is kept" if os.path.exists(path) else "none was written there"
        raise WriteFailed(f"cannot write checkpoint {path!r}: {error.strerror or error}; {kept}") from None


def atomic_save(obj, path: str) -> None:
    """torch.save through `replacing`: `path` is always whole."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with replacing(path) as f:
        torch.save(obj, f)


def atomic_copy(source: str, path: str) -> None:
    """Copy `source` to `path` through `replacing`: `path` is always whole."""
    with replacing(path) as f, open(source, "rb") as src:
        shutil.copyfileobj(src, f, 1 << 24)


def rng_state() -> dict:
    """The RNG states of torch, numpy and Python as tensors, lists and numbers (what weights_only loads)."""
    algorithm, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [algorithm, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    algorithm, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((algorithm, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read(path: str) -> dict:
    """A checkpoint or weights file as a dict, loaded without running any code the file could carry."""
    if os.path.isdir(path):
        raise TrainError(f"checkpoint {path!r} is a folder, not a checkpoint file (such as its checkpoint.pth)")
    if not os.path.isfile(path):
        raise TrainError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file  # timm's own weight format; safetensors comes with timm

        try:
            return load_file(path)
        except Exception as error:
            raise TrainError(f"cannot read checkpoint {path!r}: {type(error).__name__}: {error}") from None
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save's zip archive, its legacy pickle (PROTO)
        raise TrainError(
            f"cannot read checkpoint {path!r}: torch.save writes a zip archive (or a pickle), this file is neither"
        )
    _refuse_damaged_archive(path)
    try:
        # argparse.Namespace: facebookresearch's checkpoints keep their options in one; it only holds attributes.
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line]  # torch names it there
        raise TrainError(
            f"cannot read checkpoint {path!r}: it holds objects other than tensors and plain data, and loading "
            f"those could run code{' (' + refused[0] + ')' if refused else ''}"
        ) from None
    except Exception as error:
        raise TrainError(f"cannot read checkpoint {path!r}: {type(error).__name__}: {error}") from None
    if not isinstance(checkpoint, dict):
        raise TrainError(f"checkpoint {path!r} holds a {type(checkpoint).__name__}, not a state_dict")
    return checkpoint


def _refuse_damaged_archive(path: str) -> None:
    """Every record of torch.save's zip archive against its CRC-32 (torch.load tests none: a changed byte in a
    tensor loads as a wrong weight). A legacy pickle has no checksum."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as error:
        raise TrainError(f"checkpoint {path!r} is damaged: {error}") from None
    if damaged is not None:
        raise TrainError(
            f"checkpoint {path!r} is damaged: its record {damaged!r} fails its CRC-32 check (the file changed "
            "after it was written): use another checkpoint"
        )


def model_state(checkpoint: dict) -> dict:
    """The state_dict inside a checkpoint of ours, timm's or facebookresearch's (DDP 'module.' prefixes removed)."""
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in checkpoint.items()}


def load_weights(model: nn.Module, state: dict, path: str, may_miss=()) -> None:
    """Strict load with a readable summary of what does not match; `may_miss`: keys left at their initial values."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state) - set(may_miss))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
            if items
        ]
        raise TrainError(f"checkpoint {path!r} does not match the model ({'; '.join(parts)})")
    model.load_state_dict(state, strict=not may_miss)


def save(
    path: str,
    *,
    model,
    optimizer,
    scheduler,
    scaler,
    epoch: int,
    config,
    schedule: dict,
    rng_states: list,
    ema=None,
    best: dict | None = None,
    world_size: int = 1,
) -> None:
    """`rng_states`: one rng_state() per rank, so every rank's augmentation stream resumes where it stopped."""
    atomic_save(
        {
            "model": model.state_dict(),
            "model_ema": ema.module.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch,
            "best": best,
            "rng": rng_states,
            "config": vars(config),
            "schedule": schedule,
            "world_size": world_size,
        },
        path,
    )


# The schedule entries of checkpoints written before they existed: the value that ran then.
SCHEDULE_DEFAULTS = {"accum_steps": 1, "clip_grad": None, "clip_mode": None, "model_ema_decay": None}
# The options behind each schedule entry, to tell how to resume.
SCHEDULE_OPTIONS = {
    "model": ("model",),
    "epochs": ("epochs",),
    "lr": ("lr", "batch_size", "accum_steps"),
    "steps_per_epoch": ("steps_per_epoch", "batch_size", "accum_steps", "sampling_ratio"),
    "opt": ("opt",),
    "weight_decay": ("weight_decay",),
    "warmup_epochs": ("warmup_epochs",),
    "warmup_lr": ("warmup_lr",),
    "min_lr": ("min_lr",),
    "accum_steps": ("accum_steps",),
    "clip_grad": ("clip_grad", "clip_mode"),
    "clip_mode": ("clip_grad", "clip_mode"),
    "model_ema_decay": ("model_ema", "model_ema_decay"),
}


def as_options(config: dict, keys) -> list:
    """The command-line spelling of `keys` of a saved config: ['--epochs 3', '--model-ema', 'no --clip-grad']."""
    options = []
    for key in keys:
        if key not in config:
            continue
        value, flag = config[key], "--" + key.replace("_", "-")
        if key == "model_ema_decay" and not config.get("model_ema"):
            continue
        if isinstance(value, bool):
            options.append(flag if value else f"no {flag}")
        elif value is None:
            options.append(f"no {flag}")
        elif key != "clip_mode" or config.get("clip_grad") is not None:
            options.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return options


def refuse_other_schedule(checkpoint: dict, schedule: dict, path: str) -> None:
    """The optimiser and scheduler states would keep the checkpoint's lr and epochs: refuse other values.

    The error names the checkpoint's options that differ, and the two ways on: resume with them, or start a new
    run from the checkpoint's weights with the new options (--finetune).
    """
    saved = checkpoint["schedule"]
    changed = [key for key, value in schedule.items() if saved.get(key, SCHEDULE_DEFAULTS.get(key)) != value]
    if not changed:
        return
    described = ", ".join(f"{key} {saved.get(key, SCHEDULE_DEFAULTS.get(key))} -> {schedule[key]}" for key in changed)
    config = checkpoint.get("config") or {}
    keys = list(dict.fromkeys(option for key in changed for option in SCHEDULE_OPTIONS.get(key, ())))
    options = " ".join(as_options(config, keys))
    processes = checkpoint.get("world_size")
    if processes and ({"lr", "steps_per_epoch"} & set(changed)):
        options += f" on {processes} process{'es' if processes > 1 else ''}"
    with_options = (
        f"resume with the checkpoint's options ({options})"
        if options.strip()
        else "resume with the checkpoint's options"
    )
    raise TrainError(
        f"checkpoint {path!r} continues another schedule than this run's ({described}): to continue "
        f"it, {with_options}; to train its weights with these options, start a new run with "
        f"--finetune {path} and another --output-dir"
    )


def resume(
    path: str, *, model, optimizer, scheduler, scaler, restore_training: bool, schedule: dict, rank: int = 0, ema=None
) -> dict:
    """Load `path` into the model (and the training state when present and wanted).

    Returns {"start_epoch": the next epoch (0 for weights only), "best": the best epoch so far or None,
    "scheduler_restored": whether the lr scheduler's state was loaded, "not_restored": what of the training state
    the checkpoint could not give (a facebookresearch or timm training checkpoint: RNG states, scheduler, ...)}.
    `schedule`: this run's model, epochs, scaled lr, steps per epoch and optimiser settings, which must be the
    checkpoint's to continue its training state. `ema`: the run's ModelEmaV3, given the checkpoint's EMA weights,
    or (weights only) the loaded weights.
    """
    checkpoint = read(path)
    if restore_training and "schedule" in checkpoint:  # before the weights: a changed model is named as such
        refuse_other_schedule(checkpoint, schedule, path)
    load_weights(model, model_state(checkpoint), path)
    if ema is not None:
        if isinstance(checkpoint.get("model_ema"), dict):
            load_weights(ema.module, model_state(checkpoint["model_ema"]), f"{path} (model_ema)")
        elif not restore_training:
            raise TrainError(f"--model-ema: checkpoint {path!r} holds no EMA weights (trained without --model-ema)")
        else:
            ema.set(model)  # weights to start from: the average starts there
    if not restore_training or "optimizer" not in checkpoint or not isinstance(checkpoint.get("epoch"), int):
        # weights only: a bare state_dict, a checkpoint without its training state, or --eval
        return {"start_epoch": 0, "best": None, "scheduler_restored": False, "not_restored": []}
    ours = "schedule" in checkpoint  # facebookresearch's main.py and timm's train.py write the rest, not all
    not_restored = []
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError, TypeError) as error:
        if ours:
            raise TrainError(f"checkpoint {path!r}: optimizer state does not match ({error})") from None
        not_restored.append(f"the optimizer state (its parameter groups are not this run's: {error})")
    # Another program's scheduler state holds its own schedule (epochs, warm-up): this run's applies instead.
    scheduler_restored = ours
    if ours:
        scheduler.load_state_dict(checkpoint["lr_scheduler"])
    else:
        not_restored.append("the lr scheduler's state (this run's schedule goes on from the checkpoint's epoch)")
    if scaler is not None:
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        else:
            not_restored.append("the fp16 loss scaler's state")
    states = checkpoint.get("rng")
    if states:
        set_rng_state(states[rank % len(states)])  # another world size resumes, but not bit for bit
    else:
        not_restored.append("the random number generators' states (the data order and augmentation differ)")
    return {
        "start_epoch": checkpoint["epoch"] + 1,
        "best": checkpoint.get("best"),
        "scheduler_restored": scheduler_restored,
        "not_restored": not_restored,
    }
