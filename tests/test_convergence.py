"""Convergence: a patched ConViT trains as the stock one does, step after step, within float32's own error.

A small ConViT (convit_test: one GPSA and one MHSA block on a 4 x 4 grid, timm's ConVit class) is trained
from the same weights on the same fixed random batches with timm's AdamW (the recipe's weight-decay groups)
three times: stock timm in float64 (the reference), stock timm in float32, and patched (FusedGPSA and
SDPAMHSA) in float32. Flash-attention's rule, over a training run: the patched run's distance to the float64
run is at most a small multiple of the stock float32 run's distance to it, for the loss at every step (as a
running maximum: the first forward's rounding sets the level, then the runs drift apart as their weights do)
and for every parameter tensor after the last step. A kernel whose gradients are off by a part in 10^4 drifts
past that within a few steps; one that is right drifts as timm's float32 math does (1-2x here, up to ~3x for
the torch backend's eager formula).

pos_proj.bias is left out of the weight comparison: the positional softmax does not depend on it, so its exact
gradient is zero; the fused backends return that zero, while timm's float32 gradient is rounding noise that
AdamW normalises into steps of ~lr (the stock float32 run moves it by ~1e-3, the float64 run by ~1e-12).
Both runs' losses show it has no effect.
"""

import pytest
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from convit_kernels.module import FusedGPSA
from convit_kernels.train.model import create_model

STEPS = 24
BATCHES = 4  # fixed random batches, taken in turn
LR = 1e-3
# The fused run's distance to the fp64 run: at most FACTOR x the stock fp32 run's, plus FLOOR_ULPS float32 ulps of
# the value (a tensor the fp32 stock run happens to round less in).
FACTOR = 4.0
FLOOR_ULPS = 4


def _batches():
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 10, (16,), generator=g))
        for _ in range(BATCHES)
    ]


def _model(fused: bool, dtype: torch.dtype, backend: str = "auto") -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights for every run
    model = create_model(
        "convit_test", num_classes=10, img_size=16, in_chans=3, drop_path=0.0, fused=fused, backend=backend
    )
    return model.to(dtype)


def train(fused: bool, dtype: torch.dtype, backend: str = "auto"):
    """(loss at each step as float64, the final weights as float64) of STEPS AdamW steps."""
    model = _model(fused, dtype, backend)
    assert any(isinstance(m, FusedGPSA) for m in model.modules()) == fused
    optimizer = create_optimizer_v2(model, "adamw", lr=LR, weight_decay=0.05)
    batches, losses = _batches(), []
    for step in range(STEPS):
        images, labels = batches[step % BATCHES]
        loss = F.cross_entropy(model(images.to(dtype)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    weights = {name: t.detach().double() for name, t in model.state_dict().items()}
    return torch.tensor(losses, dtype=torch.float64), weights


@pytest.fixture(scope="module")
def stock_runs():
    """The float64 reference run and the stock float32 run."""
    return train(False, torch.float64), train(False, torch.float32)


def _ulps(values: torch.Tensor) -> torch.Tensor:
    return FLOOR_ULPS * 2.0**-23 * values.abs()


@pytest.mark.parametrize("backend", ["cpu", "sdpa", "torch"])
def test_fused_training_stays_within_the_fp32_error_of_stock(stock_runs, backend):
    (exact_losses, exact), (stock_losses, stock) = stock_runs
    losses, weights = train(True, torch.float32, backend)
    assert torch.isfinite(losses).all()
    assert exact_losses[-1] < exact_losses[0] - 0.1, exact_losses  # it learns: the runs have somewhere to drift

    stock_drift = (stock_losses - exact_losses).abs().cummax(0).values
    fused_drift = (losses - exact_losses).abs().cummax(0).values
    bound = FACTOR * stock_drift + _ulps(exact_losses)
    worst = int((fused_drift - bound).argmax())
    assert (fused_drift <= bound).all(), (
        f"step {worst}: loss {losses[worst].item():.9f} is {fused_drift[worst].item():.2e} from the fp64 run's "
        f"{exact_losses[worst].item():.9f} (running max), stock fp32 {stock_drift[worst].item():.2e}"
    )

    assert weights.keys() == exact.keys()
    for name, want in exact.items():
        if name.endswith("pos_proj.bias"):  # no effect on the output: see the module's docstring
            continue
        have_error = (weights[name] - want).abs().max().item()
        stock_error = (stock[name] - want).abs().max().item()
        allowed = FACTOR * stock_error + _ulps(want).max().item()
        assert have_error <= allowed, f"{name}: {have_error:.2e} from the fp64 weights, stock fp32 {stock_error:.2e}"
