"""Each script under python/ runs as a user would run it."""

import json
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


QUICK_RATIOS = [0.3, 1.0]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `convit-kernels experiment sample-efficiency --quick` run (2 ratios, 1 seed, 4 epochs, ~1 minute)."""
    out = tmp_path_factory.mktemp("se") / "quick"
    command = [sys.executable, "-m", "convit_kernels", "experiment", "sample-efficiency", "--quick", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return out, command, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_sample_efficiency_runs(quick_run):
    """Every run of both models, the stock-timm images/s runs and the summary table, at every ratio."""
    _, _, report = quick_run
    for model in ("convit", "deit"):
        fused = [r for r in report["runs"] if r["model"] == model and r["fused"]]
        assert sorted(r["ratio"] for r in fused) == QUICK_RATIOS
        assert all(0 <= r["top1"] <= 100 for r in fused)
        assert all(r["gates"] for r in fused) if model == "convit" else not any(r["gates"] for r in fused)
        assert any(not r["fused"] for r in report["runs"] if r["model"] == model)  # the stock-timm images/s run
    table = report["summary"]["table"]
    assert [row["ratio"] for row in table] == QUICK_RATIOS
    assert [row["epochs"] for row in table] == [13, 4]  # round(4 / f)
    assert all("gain" in row for row in table)
    change = report["summary"]["gain_change"]
    assert change["change"] == pytest.approx(table[0]["gain"] - table[-1]["gain"])


@pytest.mark.slow
def test_sample_efficiency_over_training(quick_run):
    """Per run and epoch, each GPSA layer's gate and each block's nonlocality; their mean over seeds per model and
    ratio in the summary; the last epoch's values are the run's final ones."""
    _, _, report = quick_run
    for run in report["runs"]:
        history = run["history"]
        epochs = run["epochs"] if run["fused"] else 2  # the stock runs stop after --speed-epochs
        assert history["epoch"] == list(range(1, epochs + 1))
        assert history["top1"][-1] == run["top1"]
        blocks = history["nonlocality"]
        assert sorted(blocks, key=int) == [str(b) for b in range(6)]  # convit_digits: 6 blocks
        assert all(len(v) == epochs and all(x > 0 for x in v) for v in blocks.values())
        assert run["nonlocality"] == {b: v[-1] for b, v in blocks.items()}
        gates = history["gates"]
        if run["model"] == "convit":
            assert list(gates) == [f"blocks.{i}.attn" for i in range(4)]  # 4 GPSA layers
            assert all(len(v) == epochs and all(0 < x < 1 for x in v) for v in gates.values())
            assert run["gates"] == {layer: v[-1] for layer, v in gates.items()}
        else:
            assert gates == {} and run["gates"] == {}
    entries = report["summary"]["over_training"]
    assert sorted((e["model"], e["ratio"]) for e in entries) == sorted(
        (m, f) for m in ("convit", "deit") for f in QUICK_RATIOS
    )
    for e in entries:
        (run,) = [r for r in report["runs"] if (r["model"], r["ratio"], r["fused"]) == (e["model"], e["ratio"], True)]
        assert e["n"] == 1 and e["epoch"] == run["history"]["epoch"] and e["fraction"][-1] == 1.0
        assert e["gates"] == run["history"]["gates"] and e["nonlocality"] == run["history"]["nonlocality"]


@pytest.mark.slow
def test_sample_efficiency_markdown(quick_run):
    """The table of top-1 per ratio; the gates and nonlocality after the first and the last epoch, from the JSON."""
    out, _, report = quick_run
    text = (out / "results.md").read_text()
    assert "ConViT" in text and "DeiT twin" in text and "ConViT's gain" in text
    assert all(f"| {ratio:g} |" in text for ratio in QUICK_RATIOS)
    for e in report["summary"]["over_training"]:
        label = {"convit": "ConViT", "deit": "DeiT twin"}[e["model"]]
        nonlocality = [
            f"{v[0]:.2f} → {v[-1]:.2f}" for _, v in sorted(e["nonlocality"].items(), key=lambda kv: int(kv[0]))
        ]
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} | {e['ratio']:g} |"))
        assert all(cell in row for cell in nonlocality), row
        if e["model"] == "convit":
            row = next(line for line in text.splitlines() if line.startswith(f"| {e['ratio']:g} | {len(e['epoch'])} |"))
            assert all(f"{v[0]:.3f} → {v[-1]:.3f}" in row for v in e["gates"].values()), row
    assert "stock timm" in text


@pytest.mark.slow
def test_sample_efficiency_figure(quick_run):
    """A PNG of three panels side by side, each with coloured lines drawn in it."""
    import matplotlib.image

    out, _, _ = quick_run
    path = out / "sample_efficiency.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(str(path))[..., :3]
    height, width = image.shape[:2]
    assert 3 < width / height < 4  # 16 x 4.5 inches
    coloured = (image.max(axis=2) - image.min(axis=2)) > 0.3  # lines and markers; axes, text and grid are grey
    for panel in range(3):
        part = coloured[:, panel * width // 3 : (panel + 1) * width // 3]
        assert part.sum() > 500, f"panel {panel} has almost nothing drawn"


@pytest.mark.slow
def test_sample_efficiency_refuses_a_used_folder(quick_run):
    """A second run into the same folder is refused before any training and leaves the results as they were."""
    out, command, report = quick_run
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "not empty" in again.stderr
    assert json.loads((out / "results.json").read_text()) == report


@pytest.mark.parametrize(
    "args,expect",
    [
        (["sample-efficiency", "--ratios", "0", "1"], "--ratios must be in (0, 1], got 0"),
        (["sample-efficiency", "--ratios", "1.5"], "--ratios must be in (0, 1], got 1.5"),
        (["sample-efficiency", "--ratios", "0.001"], "keeps no image of class"),
        (["sample-efficiency", "--ratios", "0.015"], "fewer than one batch"),
        (["sample-efficiency", "--", "--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["no-such-experiment"], "unknown experiment 'no-such-experiment'; choose from sample-efficiency"),
    ],
)
def test_experiment_bad_input(tmp_path, capsys, args, expect):
    """Bad input: exit 2, one line on stderr (no usage block, no traceback), nothing written."""
    from convit_kernels.cli import main

    out = tmp_path / "out"
    assert main(["experiment", args[0], "--out", str(out), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expect in err, err
    assert not out.exists()


def test_experiment_lists_the_experiments(capsys):
    from convit_kernels.cli import main

    assert main(["experiment", "--help"]) == 0
    assert "sample-efficiency" in capsys.readouterr().out
    assert main(["experiment"]) == 2  # no experiment named: the list, and a usage error


@pytest.mark.slow
def test_sample_efficiency_script(tmp_path):
    """python/sample_efficiency.py runs the same experiment (here one ratio, one seed, one epoch)."""
    out = tmp_path / "se"
    script = str(ROOT / "python" / "sample_efficiency.py")
    tiny = ["--ratios", "1", "--seeds", "0", "--epochs", "1", "--no-speed", "--out", str(out)]
    result = subprocess.run([sys.executable, script, *tiny], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "results.json").read_text())
    assert [(r["model"], r["epochs"]) for r in report["runs"]] == [("convit", 1), ("deit", 1)]
    assert (out / "results.md").exists() and (out / "sample_efficiency.png").exists()
