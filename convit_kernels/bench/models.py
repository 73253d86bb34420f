"""Whole-model throughput: timm ConViT stock vs patched (convit_kernels.patch_convit), DeiT of the same FLOPs
as yardstick."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import timm
import torch
import torch.nn.functional as F

from ..accuracy import accuracy_failure
from ..patch import patch_convit
from .implementations import evaluate
from .timing import time_side_by_side
from .workloads import DTYPES

# model -> whether it has GPSA layers to patch. DeiT-Ti/S have ConViT-Ti/S's width, depth and FLOPs.
MODELS = {"convit_tiny": True, "convit_small": True, "deit_tiny_patch16_224": False, "deit_small_patch16_224": False}
MODES = {"fwd": "inference", "fwd+bwd": "train step"}


def default_model_batch(device_type: str) -> int:
    return 128 if device_type == "cuda" else 8


def _train_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return step


def _inference(model: torch.nn.Module, images: torch.Tensor) -> Callable[[], torch.Tensor]:
    def forward():
        with torch.no_grad():
            return model(images)

    return forward


def run_models(
    device: torch.device,
    dtypes: Sequence[str],
    passes: Sequence[str],
    threads: Sequence[int],
    batch: int,
    warmup: int,
    repeats: int,
    advance: Callable[[int], None] = lambda n: None,
) -> list[dict]:
    """images/s of each model's inference and training step, stock and (ConViT) patched, side by side."""
    records = []
    for model_name, is_convit in MODELS.items():
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            torch.manual_seed(0)
            stock = timm.create_model(model_name, pretrained=False).eval()
            images = torch.randn(batch, 3, 224, 224, dtype=torch.float64)
            labels = torch.randint(0, stock.num_classes, (batch,), device=device)
            # The float64 reference on the timed device: a GPU's FP64 units take seconds where CPU cores take minutes.
            exact_model = copy.deepcopy(stock).to(device=device, dtype=torch.float64)
            exact = evaluate(_inference(exact_model, images.to(device)), None, backward=False)
            del exact_model
            stock = stock.to(device=device, dtype=dtype)
            images = images.to(device=device, dtype=dtype)
            variants: dict[str, torch.nn.Module] = {"stock": stock}
            if is_convit:
                variants["patched"] = patch_convit(copy.deepcopy(stock))
            same_precision = evaluate(_inference(stock, images), None, backward=False)
            refused = {}
            for name, model in variants.items():  # the accuracy rule: eval-mode logits against the float64 stock model
                why = accuracy_failure(
                    evaluate(_inference(model, images), None, False), exact, same_precision, ["logits"], dtype
                )
                if why is not None:
                    refused[name] = why
            passing = {name: m for name, m in variants.items() if name not in refused}
            advance(1)
            for n_threads in threads:
                if device.type == "cpu":
                    torch.set_num_threads(n_threads)
                for pass_ in passes:
                    for model in passing.values():
                        model.train(pass_ == "fwd+bwd")
                    runs = {
                        name: _train_step(m, images, labels) if pass_ == "fwd+bwd" else _inference(m, images)
                        for name, m in passing.items()
                    }
                    timings = time_side_by_side(runs, device, warmup, repeats)
                    advance(1)
                    base = {
                        "model": model_name,
                        "mode": MODES[pass_],
                        "batch": batch,
                        "dtype": dtype_name,
                        "threads": n_threads,
                        "device": str(device),
                    }
                    for name, timing in timings.items():
                        speedup = {"stock": timings["stock"].median_ms / timing.median_ms} if "stock" in timings else {}
                        records.append(
                            {
                                **base,
                                "variant": name,
                                "status": "ok",
                                **timing.as_dict(),
                                "spread": timing.spread,
                                "images_per_s": batch / timing.median_ms * 1e3,
                                "speedup": speedup,
                            }
                        )
                    for name, why in refused.items():
                        records.append({**base, "variant": name, "status": f"refused: {why}"})
    return records


def model_steps(dtypes: Sequence[str], passes: Sequence[str], threads: Sequence[int]) -> int:
    return len(MODELS) * len(dtypes) * (1 + len(threads) * len(passes))
