"""`convit-kernels compare-timm` exits 1 when the fused layer disagrees with timm's, 0 when it agrees."""

import dataclasses

import pytest

from convit_kernels import backends
from convit_kernels.compare_timm import main


def _inject(monkeypatch, forward_error=0.0, backward_error=0.0):
    """Replace the torch backend by one whose output or dq is off by the given relative error."""
    described = backends.get_backend("torch")

    def forward(*args):
        out, stats = described.forward(*args)
        return out * (1 + forward_error), stats

    def backward(*args):
        dq, *rest = described.backward(*args)
        return (dq * (1 + backward_error), *rest)

    replaced = dataclasses.replace(described, forward=forward, backward=backward)
    monkeypatch.setitem(backends._BACKENDS, "torch", replaced)


def test_agreement_exits_0(capsys):
    assert main(["--backend", "torch", "--batch", "1"]) == 0
    assert "ok: backend 'torch' agrees with timm" in capsys.readouterr().out


@pytest.mark.parametrize(
    "errors,named",
    [({"forward_error": 1e-3}, "output"), ({"backward_error": 1e-3}, "grad qk.weight")],
    ids=["output", "gradient"],
)
def test_injected_disagreement_exits_1(monkeypatch, capsys, errors, named):
    _inject(monkeypatch, **errors)
    assert main(["--backend", "torch", "--batch", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: backend 'torch' disagrees with timm" in out and named in out.splitlines()[-1]


def test_nan_exits_1(monkeypatch, capsys):
    _inject(monkeypatch, forward_error=float("nan"))
    assert main(["--backend", "torch", "--batch", "1"]) == 1


def test_the_reference_backend_is_not_reported_as_exactly_zero(capsys):
    assert main(["--backend", "reference", "--batch", "1"]) == 0
    bias_line = next(line for line in capsys.readouterr().out.splitlines() if "pos_proj.bias" in line)
    assert "(exactly 0)" not in bias_line and "fused" in bias_line
