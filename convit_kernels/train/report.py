"""What a run reports: GPSA statistics per layer, the JSON-lines log, TensorBoard scalars, the end-of-run plot.

For every GPSA layer the log holds, per head, the gate sigmoid(lambda) (weight
of the positional attention) and the nonlocality of the paper: the mean over
queries of the attention-weighted distance to the keys, in patches, measured
by the layer's ``get_attention_map`` on a fixed batch of validation images.
Beside it, ``nonlocality_as_convit``: what ConViT's main.py logs, every
block's (GPSA and MHSA) nonlocality, all fed the same input (the patch
embedding of that batch), so the curves compare with the paper's. TensorBoard
gets the log's numbers when the optional tensorboard package is installed.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import torch
from torch import nn

from .. import files
from .errors import WriteFailed


def gpsa_layers(model: nn.Module) -> OrderedDict[str, nn.Module]:
    """Every GPSA-like layer (timm's GPSA or FusedGPSA: it has a gate), by module name."""
    return OrderedDict(
        (name, m) for name, m in model.named_modules() if isinstance(getattr(m, "gating_param", None), torch.Tensor)
    )


def nonlocality(layer: nn.Module, tokens: torch.Tensor) -> list:
    """The layer's get_attention_map per head; 0 for a grid of one patch (which timm's GPSA cannot measure)."""
    if tokens.shape[1] == 1:
        return [0.0] * layer.num_heads
    return layer.get_attention_map(tokens).float().tolist()


@torch.no_grad()
def gpsa_statistics(model: nn.Module, images: torch.Tensor) -> dict:
    """{layer: {"gating": [H], "nonlocality": [H]}} measured on `images` with the model in eval mode."""
    layers = gpsa_layers(model)
    inputs = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0]))
        for name, m in layers.items()
    ]
    was_training = model.training
    model.eval()
    try:
        model(images)
        stats = {
            name: {
                "gating": torch.sigmoid(m.gating_param.float()).tolist(),
                "nonlocality": nonlocality(m, inputs[name]),
            }
            for name, m in layers.items()
        }
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return stats


@torch.no_grad()
def nonlocality_as_convit(model: nn.Module, images: torch.Tensor) -> dict:
    """{block index: [H]}: each block's attention applied to the patch embedding of `images`, as ConViT logs it."""
    was_training = model.training
    model.eval()
    try:
        tokens = model.patch_embed(images)
        return {str(index): nonlocality(block.attn, tokens) for index, block in enumerate(model.blocks)}
    finally:
        model.train(was_training)


class JsonLog:
    """One JSON object per line, one line per epoch, appended and flushed per epoch (written by rank 0 only)."""

    def __init__(self, path: str):
        self.path = path

    def write(self, record: dict) -> None:
        """Append one line; an OSError (a full disk) cuts off what it wrote, so the log stays readable."""
        try:
            fd = files.open_no_follow(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        except OSError as error:
            raise WriteFailed(f"cannot write the log {self.path!r}: {error.strerror or error}") from None
        start = os.fstat(fd).st_size
        try:
            line, written = (json.dumps(record) + "\n").encode(), 0
            while written < len(line):  # a short write is followed by the error that cut it short
                written += os.write(fd, line[written:])
            os.fsync(fd)
        except OSError as error:
            os.ftruncate(fd, start)
            raise WriteFailed(f"cannot write the log {self.path!r}: {error.strerror or error}") from None
        finally:
            os.close(fd)

    def records(self) -> list:
        """The whole records, oldest first; a line that is not one (cut short by a crash, garbage) is left out."""
        return self._read()[0]

    def damaged_lines(self) -> list[int]:
        """The numbers (from 1) of the lines that are not whole records: reported before a continued run trains."""
        return self._read()[1]

    def _read(self) -> tuple[list, list[int]]:
        if not os.path.exists(self.path):
            return [], []
        records, damaged = [], []
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:  # JSONDecodeError and bytes that are not UTF-8
                    record = None
                if isinstance(record, dict) and isinstance(record.get("epoch"), int):
                    records.append(record)
                else:
                    damaged.append(number)
        return records, damaged

    def keep_epochs_up_to(self, epoch: int) -> None:
        """Drop the records after `epoch` (1-based), rewriting the file atomically."""
        kept = [record for record in self.records() if record["epoch"] <= epoch]
        files.write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))


def tensorboard_installed() -> bool:
    """Whether torch's TensorBoard writer can be imported (it needs the optional tensorboard package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


def tensorboard_tag(key: str) -> str:
    """A log key as a TensorBoard tag: train_loss -> train/loss, val_acc1_ema -> val_ema/acc1, lr -> train/lr."""
    if key.startswith(("train_", "val_")):
        split, name = key.split("_", 1)
        if name.endswith("_ema"):
            split, name = f"{split}_ema", name.removesuffix("_ema")
        return f"{split}/{name}"
    return f"train/{key}"


class TensorBoard:
    """The log's numbers as TensorBoard scalars, one point per epoch, and the GPSA layers' mean gate and nonlocality.

    Opened at the first write of a run (rank 0). `purge_step`: continuing a run from epoch e, the events of the
    epochs after e (an abandoned continuation) are hidden, as the log's records are dropped.
    """

    def __init__(self, folder: str, purge_step=None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(folder, purge_step=purge_step)

    def write(self, record: dict) -> None:
        epoch = record["epoch"]
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tensorboard_tag(key), value, epoch)
        for layer, stats in (record.get("gpsa") or {}).items():
            for name, values in stats.items():
                self.writer.add_scalar(f"gpsa/{name}/{layer}", sum(values) / len(values), epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def plot_gpsa(records: list, path: str) -> bool:
    """PNG of nonlocality and gate (mean over heads) per GPSA layer against the epoch. False if nothing to plot."""
    records = [r for r in records if r.get("gpsa")]
    if not records:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in records]
    layers = list(records[0]["gpsa"])
    fig, (ax_nonlocal, ax_gate) = plt.subplots(1, 2, figsize=(11, 4))
    for index, layer in enumerate(layers):
        color = plt.cm.viridis(index / max(1, len(layers) - 1))
        for ax, key in ((ax_nonlocal, "nonlocality"), (ax_gate, "gating")):
            values = [sum(r["gpsa"][layer][key]) / len(r["gpsa"][layer][key]) for r in records]
            ax.plot(epochs, values, marker="o", color=color, label=layer)
    ax_nonlocal.set(xlabel="epoch", ylabel="nonlocality (patches, mean over heads)", title="GPSA nonlocality")
    ax_gate.set(xlabel="epoch", ylabel="sigmoid(lambda), mean over heads", title="GPSA gate (weight of position)")
    ax_gate.legend(fontsize="small")
    for ax in (ax_nonlocal, ax_gate):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    with files.replacing(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return True
