"""Starting weights of a new run: ``--finetune FILE|timm name`` and ``--pretrained`` (timm's weights for --model).

The weights are fetched before any other work (a file is read with
``weights_only=True``; timm's come from the Hugging Face hub or its cache) and
loaded into the new model as DeiT's and ConViT's fine-tuning does: a head of
another class count is left at its fresh initialisation, and ``pos_embed`` is
resampled (timm's ``resample_abs_pos_embed``, bicubic) when the patch grid of
``--input-size`` differs. Everything else must match the model exactly.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from . import checkpoint
from .errors import TrainError
from .model import TIMM_MODELS

HEAD_KEYS = ("head.weight", "head.bias")


def timm_names() -> list:
    """The timm names --finetune accepts: timm's ConViTs, bare (their default weights) or tagged."""
    import timm

    return list(TIMM_MODELS) + timm.list_pretrained("convit_*")


def is_timm_name(source: str) -> bool:
    return source in timm_names()


def validate_finetune_source(source: str) -> None:
    """At parse time: --finetune names a file or timm weights."""
    if os.path.isfile(source) or is_timm_name(source):
        return
    what = "is a folder, not a file" if os.path.isdir(source) else "does not exist"
    raise TrainError(
        f"--finetune {source!r} {what}, and is not one of timm's ConViT weights ({', '.join(timm_names())})"
    )


def source_of(config) -> str | None:
    """The weights the run starts from: --finetune's, timm's for --model with --pretrained, or none."""
    if config.finetune is not None:
        return config.finetune
    return config.model if config.pretrained else None


def download(name: str, flag: str) -> dict:
    """timm's pretrained state_dict for `name`, from the Hugging Face hub or its local cache; TrainError if neither."""
    import timm
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError  # the hub unreachable, the file not cached
    from huggingface_hub.utils import logging as hub_logging

    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # its retry warnings would bury the one-line error
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as error:
        cause = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        if constants.is_offline_mode():
            reason = "offline (HF_HUB_OFFLINE is set) and they are not in the local Hugging Face cache"
        elif isinstance(error, (LocalEntryNotFoundError, ConnectionError, TimeoutError)):
            reason = (
                f"the Hugging Face hub cannot be reached and they are not in its local cache ({type(error).__name__})"
            )
        else:
            reason = cause
        raise TrainError(
            f"{flag} {name}: cannot get timm's pretrained weights: {reason}; fetch them where the hub "
            f"is reachable, or pass a local file with --finetune FILE"
        ) from None
    finally:
        hub_logging.set_verbosity(verbosity)


def fetch(config, announce: Callable[[str], None]) -> dict | None:
    """Before any other work (and before seeding: building timm's model draws random numbers): the start weights."""
    source = source_of(config)
    if source is None:
        return None
    flag = "--finetune" if config.finetune is not None else "--pretrained"
    if os.path.isfile(source):
        return checkpoint.model_state(checkpoint.read(source))
    announce(f"{flag}: fetching timm's weights {source} (Hugging Face hub, or its cache)")
    return download(source, flag)


def grid_of(tokens: int) -> int:
    side = int(round(tokens**0.5))
    return side if side * side == tokens else 0


def apply(model: nn.Module, state: dict, source: str) -> list:
    """Load `state` into a new model, fine-tuning style. Returns what was adapted, as phrases for the log."""
    from timm.layers import resample_abs_pos_embed

    own = model.state_dict()
    state = dict(state)
    notes = []
    dropped = [k for k in HEAD_KEYS if k in state and k in own and state[k].shape != own[k].shape]
    if dropped:
        theirs = state["head.weight"].shape[0] if "head.weight" in dropped else "another count of"
        for key in dropped:
            del state[key]
        notes.append(f"a new head for {own['head.weight'].shape[0]} classes (the weights': {theirs})")
    pos_embed = state.get("pos_embed")
    if (
        isinstance(pos_embed, torch.Tensor)
        and pos_embed.dim() == 3
        and pos_embed.shape != own["pos_embed"].shape
        and pos_embed.shape[-1] == own["pos_embed"].shape[-1]
        and grid_of(pos_embed.shape[1])
    ):
        new_grid = list(model.patch_embed.grid_size)
        old = grid_of(pos_embed.shape[1])
        # ConViT's pos_embed covers the patches only: its class token joins after the GPSA blocks
        resampled = resample_abs_pos_embed(pos_embed.float(), new_grid, num_prefix_tokens=0)
        state["pos_embed"] = resampled.to(pos_embed.dtype)
        notes.append(f"pos_embed resampled from {old}x{old} to {new_grid[0]}x{new_grid[1]} patches")
    checkpoint.load_weights(model, state, source, may_miss=dropped)
    return notes
