"""Each script under python/ runs as a user would run it."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script,args,expect",
    [("swap_in_fused_gpsa.py", ["--batch", "1", "--img-size", "112"], "patched model agrees with the stock one")],
)
def test_example_script_runs(script, args, expect):
    result = subprocess.run(
        [sys.executable, str(ROOT / "python" / script), *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert expect in result.stdout


def test_check_command_runs():
    result = subprocess.run(
        [sys.executable, "-m", "convit_kernels", "check", "--batch", "2"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert "output            max rel. error" in result.stdout


@pytest.mark.slow
def test_sample_efficiency_quick(tmp_path):
    """`--quick` (2 ratios, 1 seed, 4 epochs, ~1 minute): JSON, table and figure hold both models and every ratio."""
    import json

    out = tmp_path / "se"
    command = [sys.executable, str(ROOT / "python" / "sample_efficiency.py"), "--quick", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "results.json").read_text())
    ratios = [0.25, 1.0]
    for model in ("convit", "deit"):
        fused = [r for r in report["runs"] if r["model"] == model and r["fused"]]
        assert sorted(r["ratio"] for r in fused) == ratios
        assert all(0 <= r["top1"] <= 100 for r in fused)
        assert all(r["gates"] for r in fused) if model == "convit" else not any(r["gates"] for r in fused)
        assert any(not r["fused"] for r in report["runs"] if r["model"] == model)  # the stock-timm images/s run
    assert [row["ratio"] for row in report["summary"]["table"]] == ratios
    assert all("gain" in row for row in report["summary"]["table"])
    table = (out / "results.md").read_text()
    assert "ConViT" in table and "DeiT twin" in table
    assert all(f"| {ratio:g} |" in table for ratio in ratios)
    assert (out / "sample_efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second run into the same folder is refused before any training, and leaves the results as they were.
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "not empty" in again.stderr
    assert json.loads((out / "results.json").read_text()) == report
