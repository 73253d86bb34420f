"""Evaluation: exact top-1 / top-k accuracy and loss over a loader, shards summed over the processes."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .runtime import Runtime
from .steps import AMP_DTYPES


@torch.no_grad()
def evaluate(model, loader, runtime: Runtime, amp: str, num_classes: int) -> dict:
    """Top-1 / top-5 accuracy (%) and the mean loss over every (images, labels) batch of `loader`, under autocast
    of AMP_DTYPES' `amp`; with several processes each evaluates its shard and the counts are summed."""
    model.eval()
    amp_dtype = AMP_DTYPES[amp]
    top_k = min(5, num_classes)
    totals = torch.zeros(4, dtype=torch.float64, device=runtime.device)  # loss sum, top-1, top-k, count
    for x, y in loader:
        x, y = x.to(runtime.device), y.to(runtime.device)
        with torch.autocast(runtime.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x).float()
        hits = logits.topk(top_k, dim=-1).indices == y[:, None]
        totals += torch.stack(
            [
                F.cross_entropy(logits, y, reduction="sum"),
                hits[:, 0].sum(),
                hits.any(-1).sum(),
                torch.tensor(len(y), device=runtime.device),
            ]
        ).double()
    if runtime.world_size > 1:
        dist.all_reduce(totals)
    loss, top1, topk, count = totals.tolist()
    return {"val_loss": loss / count, "val_acc1": 100 * top1 / count, f"val_acc{top_k}": 100 * topk / count}


def evaluate_ema(ema, loader, runtime: Runtime, amp: str, num_classes: int) -> dict:
    """The EMA weights' metrics, keyed as evaluate's with an _ema suffix."""
    return {f"{key}_ema": value for key, value in evaluate(ema.module, loader, runtime, amp, num_classes).items()}
