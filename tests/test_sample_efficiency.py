"""`convit-kernels experiment sample-efficiency`: data, models, a --quick run that stops and continues, bad input."""

import gzip
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convit_kernels.experiments import sample_efficiency as se
from convit_kernels.train.errors import TrainError

ROOT = Path(__file__).resolve().parents[1]
CLASSES, TRAIN_PER_CLASS, TEST_IMAGES = 10, 12, 40


def idx_bytes(array: torch.Tensor) -> bytes:
    """An idx file of unsigned bytes: the format of (Fashion-)MNIST."""
    header = bytes([0, 0, 8, array.dim()]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.to(torch.uint8).numpy().tobytes()


def class_images(labels: torch.Tensor, generator) -> torch.Tensor:
    """28 x 28 images on a black background, a bright bar at a row that depends on the class, plus noise."""
    images = torch.zeros(len(labels), 28, 28)
    for i, label in enumerate(labels.tolist()):
        images[i, 4 + 2 * label : 6 + 2 * label, 4:24] = 200
    return (images + 40 * torch.rand(images.shape, generator=generator)).clamp(0, 255)


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> Path:
    """A tiny data set in Fashion-MNIST's 4 idx files: the training ones gzipped (as Debian ships them), the test
    ones plain (as torchvision's raw/ folder holds them)."""
    folder = tmp_path_factory.mktemp("fashion-mnist")
    generator = torch.Generator().manual_seed(0)
    train_y = torch.arange(CLASSES).repeat_interleave(TRAIN_PER_CLASS)
    test_y = torch.arange(TEST_IMAGES) % CLASSES
    files = {
        "train-images-idx3-ubyte.gz": class_images(train_y, generator),
        "train-labels-idx1-ubyte.gz": train_y,
        "t10k-images-idx3-ubyte": class_images(test_y, generator),
        "t10k-labels-idx1-ubyte": test_y,
    }
    for name, array in files.items():
        data = idx_bytes(array)
        (folder / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return folder


def test_reads_the_idx_files(fashion):
    data = se.fashion_mnist(str(fashion))
    assert data.train_x.shape == (CLASSES * TRAIN_PER_CLASS, 1, 28, 28) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (TEST_IMAGES, 1, 28, 28) and data.classes == CLASSES
    assert data.train_y.tolist() == torch.arange(CLASSES).repeat_interleave(TRAIN_PER_CLASS).tolist()


def test_a_bad_idx_file_is_one_line(tmp_path, fashion):
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes((fashion / name).read_bytes())
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(torch.zeros(3, 28, 28))[:-5])  # truncated
    with pytest.raises(TrainError, match="is not an idx file of images"):
        se.fashion_mnist(str(tmp_path))


@pytest.mark.slow
def test_an_image_folder_instead(tmp_path, capsys):
    """--data-path: an ImageFolder (train/ and val/, here 2 classes of RGB images) read into memory at --input-size."""
    from PIL import Image

    for split in ("train", "val"):
        for label, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (20, 20), colour).save(tmp_path / "data" / split / label / f"{i}.png")
    options = ["--data-path", str(tmp_path / "data"), "--input-size", "16", "--ratios", "1", "--steps", "2"]
    options += ["--lrs", "1e-3", "--validation-per-class", "1", "--jobs", "1"]
    assert se.main([*quick(tmp_path / "se", tmp_path / "nowhere"), *options]) == 0
    assert "6 train / 2 validation / 8 test images, 2 classes; the lr grid: 4 runs" in capsys.readouterr().out
    data = se.image_folder(str(tmp_path / "data"), 16)
    assert data.train_x.shape == (8, 3, 16, 16) and data.test_y.tolist() == [0] * 4 + [1] * 4


def test_an_image_folder_is_scanned_as_the_trainer_scans_it(tmp_path, capsys):
    """Link loops and a file reached twice refused in one line (they once inflated the count and mixed labels)."""
    from PIL import Image

    root = tmp_path / "data"
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / split / label / "0.png")
    os.symlink("..", root / "train" / "a" / "up")
    options = ["--data-path", str(root), "--input-size", "8", "--ratios", "1", "--steps", "2"]
    assert se.main([*quick(tmp_path / "se", tmp_path / "nowhere"), *options]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a loop" in err, err
    assert not (tmp_path / "se").exists()


def test_missing_data_says_what_to_install(tmp_path, capsys):
    out = tmp_path / "out"
    assert se.main(["--quick", "--out", str(out), "--fashion-mnist", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "apt-get install dataset-fashion-mnist" in err, err
    assert not out.exists()  # the data are checked before anything is written


def test_augmentation_fills_with_the_background():
    """The affine runs on [0, 1] images and fills with 0, Fashion-MNIST's black: a blank image stays blank (the old
    recipe filled normalised tensors with 0, a mid-grey border the test images never have)."""
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(se.augment(torch.zeros(8, 1, 28, 28), generator), torch.zeros(8, 1, 28, 28))
    moved = se.augment(torch.ones(64, 1, 28, 28), generator)
    assert 0 <= moved.min() and moved.max() <= 1 + 1e-6 and (moved < 0.5).any()  # borders: background


def test_subsets_are_stratified_drawn_by_the_seed_and_never_from_the_validation_images():
    labels = torch.arange(10).repeat_interleave(60)
    data = se.data.Images(torch.zeros(600, 1, 4, 4, dtype=torch.uint8), labels, None, None, "synthetic")
    data.hold_out(10, seed=7)
    assert torch.bincount(labels[data.validation]).tolist() == [10] * 10
    assert sorted(data.validation.tolist() + data.pool.tolist()) == list(range(600))  # disjoint, nothing lost
    a, b = se.subset(labels, 0.1, 0, data.pool), se.subset(labels, 0.1, 1, data.pool)
    assert torch.bincount(labels[a]).tolist() == [5] * 10 and not torch.equal(a, b)
    assert torch.equal(a, se.subset(labels, 0.1, 0, data.pool))
    assert not set(a.tolist()) & set(data.validation.tolist())
    assert torch.bincount(labels[se.subset(labels, 0.001, 0, data.pool)]).tolist() == [1] * 10  # at least one
    with pytest.raises(TrainError, match="--validation-per-class 60 leaves no training image of class 0"):
        data.hold_out(60, seed=7)


@pytest.mark.parametrize("fused", [True, False])
def test_the_four_arms(fashion, fused):
    """ConViT (GPSA in all but the last 2 of 5 blocks, 9 heads, the value projection the identity), the DeiT twin
    (no GPSA, the class token from block 0), the control twin (no GPSA, the class token joining at ConViT's block
    3) and ConViT with a random value projection (the rest of its local init kept)."""
    args = se.parse_args(["--out", "unused"])
    data = se.fashion_mnist(str(fashion))
    torch.manual_seed(0)
    models = {kind: se.build_model(args, data, kind, fused=fused) for kind in se.ARMS}
    gpsa = {kind: sum(hasattr(b.attn, "gating_param") for b in m.blocks) for kind, m in models.items()}
    assert gpsa == {"convit": 3, "deit": 0, "control": 0, "randv": 3}
    assert [m.local_up_to_layer for m in models.values()] == [3, 0, 3, 3]
    assert all(b.attn.num_heads == 9 for m in models.values() for b in m.blocks)
    assert models["control"](torch.zeros(2, 1, 28, 28)).shape == (2, CLASSES)
    for block in range(3):
        convit, randv = models["convit"].blocks[block].attn, models["randv"].blocks[block].attn
        assert torch.equal(convit.v.weight, torch.eye(54))
        assert not torch.equal(randv.v.weight, torch.eye(54)) and 0.01 < randv.v.weight.std() < 0.03  # timm's draw
        assert torch.equal(convit.pos_proj.weight, randv.pos_proj.weight)  # the positional local init is kept


def quick(out, fashion, *extra):
    return ["--quick", "--out", str(out), "--fashion-mnist", str(fashion), *extra]


@pytest.mark.slow
def test_quick_run_stops_and_continues(tmp_path, fashion, monkeypatch, capsys):
    """A run stopped after 2 of its lr grid's 8 runs keeps them; the same command trains the rest of the grid, then
    the study at each arm's chosen lr (in 2 processes), reusing the grid's runs, and writes the summary."""
    out = tmp_path / "se"
    real, calls = se.experiment.train_run, []

    def stop_at_the_third(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(se.experiment, "train_run", stop_at_the_third)
    assert se.main(quick(out, fashion, "--jobs", "1")) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the 2 runs done are kept" in err and "same command continues" in err
    kept = {p.name: p.read_bytes() for p in (out / "runs").glob("*.json")}
    assert sorted(kept) == ["convit_f1_s0_n30_lr0.003.json", "deit_f1_s0_n30_lr0.003.json"]
    assert se.main(quick(out, fashion, "--summary-only")) == 0  # what the 2 runs show, marked partial
    assert (out / "results.md").read_text().startswith("**Partial: 2 of the 8 runs planned")

    monkeypatch.setattr(se.experiment, "train_run", real)
    assert se.main(quick(out, fashion)) == 0
    printed = capsys.readouterr().out
    assert "the lr grid: 8 runs of 30 steps (2 done before" in printed and "the study: 10 runs, 6 to train" in printed
    assert {name: (out / "runs" / name).read_bytes() for name in kept} == kept  # not trained again
    summary = json.loads((out / "results.json").read_text())
    assert (summary["runs"], summary["runs_planned"], summary["seeds_complete"]) == (14, 14, [0])
    lrs = {kind: arm["lr"] for kind, arm in summary["arms"].items()}
    for kind, scores in summary["lr_grid"]["val_top1"].items():  # the best validation top-1, ties to the lower lr
        assert lrs[kind] == float(max(scores, key=lambda lr: (scores[lr], -float(lr))))
    assert [row["ratio"] for row in summary["table"]] == [0.3, 1.0]
    for row in summary["table"]:
        assert all(row["arms"][kind]["n"] == 1 for kind in se.ARMS)
        assert set(row["gains"]) == {"convit-deit", "convit-randv", "randv-control", "control-deit"}
    assert summary["model"]["grid"] == [7, 7] and summary["model"]["arms"]["deit"]["gpsa_blocks"] == []
    assert all(summary["arms"][kind]["description"] for kind in se.ARMS)
    runs = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert {tuple(r["history"]["step"]) for r in runs if r["steps"] == 30} == {(0, 10, 20, 30)}
    assert {tuple(r["history"]["step"]) for r in runs if r["steps"] == 60} == {(0, 20, 40, 60)}
    assert summary["long"]["long_steps"] == 60 and summary["long"]["gain_long"]["n"] == 1
    assert [sorted(row["arms"]) for row in summary["time_to_accuracy"]] == [sorted(se.ARMS)] * 2
    assert set(summary["trends"]) == {"convit-deit", "convit-randv", "randv-control", "control-deit"}
    convit = next(c for c in summary["curves"] if c["model"] == "convit")
    assert list(convit["gates"]) == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    assert all(len(values) == 4 for values in convit["nonlocality"].values()) and len(convit["val_top1"]) == 4
    assert "\n| 0.3 | 30 | 16 | " in (out / "results.md").read_text()  # 3 images of each class, 16 epochs
    assert (out / "sample_efficiency.png").read_bytes()[:4] == b"\x89PNG"

    # Other settings into the same folder: refused, one line, nothing changed.
    assert se.main(quick(out, fashion, "--steps", "31")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other settings (steps)" in err
    assert json.loads((out / "results.json").read_text()) == summary


@pytest.mark.slow
def test_sigterm_stops_the_experiment_and_its_workers_in_one_line(tmp_path, fashion):
    out = tmp_path / "se"
    command = [sys.executable, "-m", "convit_kernels", "experiment", "sample-efficiency", *quick(out, fashion)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while "started" not in process.stdout.readline():  # a worker is training
        assert process.poll() is None, process.stderr.read()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and err.count("\n") == 1 and "the same command continues" in err, err


def test_a_foreign_folder_is_refused(tmp_path, fashion, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert se.main(quick(tmp_path, fashion)) == 2
    assert "holds no experiment of this kind" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--ratios", "0", "1"], "--ratios, --lr-ratio and --long-ratio must be in (0, 1], got 0"),
        (["--ratios", "1.5"], "must be in (0, 1], got 1.5"),
        (["--long-ratio", "2"], "must be in (0, 1], got 2"),
        (["--ratios", "0.1", "1", "--ablation-ratios", "0.5"], "--ablation-ratios must be some of --ratios"),
        (["--lrs", "0.001", "-1"], "--lrs must be positive numbers, got 0.001 -1"),
        (["--validation-per-class", "0"], "--validation-per-class must be at least 1"),
        (["--warmup", "0.2"], "--warmup must be in [0, 0.1]"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["--model", "convit_huge"], "argument --model: invalid choice: 'convit_huge'"),
        (["--embed-dim", "0"], "--embed-dim must be at least 1"),
        (["--smoothing", "1"], "--smoothing in [0, 1)"),
    ],
)
def test_bad_input(tmp_path, capsys, args, expect):
    """Bad input: exit 2, one line on stderr (no usage block, no traceback), nothing written."""
    from convit_kernels.cli import main

    out = tmp_path / "out"
    assert main(["experiment", "sample-efficiency", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expect in err, err
    assert not out.exists()


def test_experiment_lists_the_experiments(capsys):
    from convit_kernels.cli import main

    assert main(["experiment", "--help"]) == 0
    assert "sample-efficiency" in capsys.readouterr().out
    assert main(["experiment"]) == 2  # no experiment named: the list, and a usage error
    assert main(["experiment", "no-such-experiment"]) == 2
    assert "unknown experiment 'no-such-experiment'; choose from sample-efficiency" in capsys.readouterr().err


@pytest.mark.slow
def test_the_script(tmp_path, fashion):
    """python/sample_efficiency.py runs the same experiment (here one ratio, one seed, 5 steps, and --stock: ConViT
    with timm's layers beside it, timed alone with --jobs 1)."""
    out = tmp_path / "se"
    tiny = ["--ratios", "1", "--seeds", "0", "--steps", "5", "--lrs", "1e-3", "--long-factor", "1", "--jobs", "1"]
    command = [sys.executable, str(ROOT / "python" / "sample_efficiency.py"), *quick(out, fashion, *tiny, "--stock")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        f"{kind}_f1_s0_n5_lr0.001.json" for kind in ("control", "convit", "deit", "randv", "stock")
    ]
    report = (out / "results.md").read_text()
    assert "ConViT with timm's layers at f = 1, seed 0: test top-1" in report and "both timed alone" in report


def test_a_second_experiment_into_a_folder_in_use_is_refused(tmp_path, fashion, capsys):
    from convit_kernels.train import output

    out = tmp_path / "se"
    with output.lock(str(out), "--out"):  # as a first experiment holds it
        assert se.main(quick(out, fashion, "--summary-only")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {str(out)!r} is in use by another run (pid {os.getpid()})" in err
    assert not out.exists()  # made for the lock, empty, gone with it


def test_a_damaged_run_record_trains_that_run_again(tmp_path, fashion, monkeypatch, capsys):
    out = tmp_path / "se"
    assert se.main(quick(out, fashion, "--summary-only")) == 0  # the folder and its settings, no run
    (out / "runs" / "convit_f1_s0_n30_lr0.003.json").write_text('{"top1": 8')  # cut short by a crash
    trained = []

    def first_run_then_stop(run):
        trained.append(run)
        raise KeyboardInterrupt

    monkeypatch.setattr(se.experiment, "work", first_run_then_stop)
    assert se.main(quick(out, fashion, "--jobs", "1")) == 130
    err = capsys.readouterr().err
    assert "convit_f1_s0_n30_lr0.003.json is not a whole run's record: that run trains again" in err
    assert trained[0].name == "convit_f1_s0_n30_lr0.003"


def test_an_input_size_below_a_patch_and_empty_idx_files_are_refused_before_writing(tmp_path, fashion, capsys):
    out = tmp_path / "se"
    assert se.main(quick(out, fashion, "--input-size", "2")) == 2  # once: settings.json written, then a traceback
    err = capsys.readouterr().err
    assert "--input-size 2 is smaller than a patch" in err and "Traceback" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        (empty / name).write_bytes(idx_bytes(torch.zeros(0, 28, 28, dtype=torch.uint8)))
    for name in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        (empty / name).write_bytes(idx_bytes(torch.zeros(0, dtype=torch.uint8)))
    assert se.main(quick(out, empty)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no images" in err, err
    assert not out.exists()
    assert se.main(quick(out, fashion, "--summary-only")) == 0  # the folder is free for a good run


def record(kind, ratio, seed, top1, steps=100, lr=1e-3, diverged=None):
    """A run's record with what the statistics read."""
    history = {"step": [0, steps], "train_s": [0.0, 1.0], "val_top1": [10.0, top1], "gates": {}, "nonlocality": {}}
    return se.Run(kind, ratio, seed, steps, lr).name, {
        "model": kind,
        "ratio": ratio,
        "seed": seed,
        "steps": steps,
        "lr": lr,
        "train_images": 10,
        "epochs": 160.0,
        "top1": top1,
        "val_top1": None if diverged else top1,
        "diverged": diverged,
        "timed_alone": False,
        "history": history,
        "wall_s": 1.0,
    }


def test_the_lr_of_an_arm_is_its_best_validation_score_never_a_diverged_one():
    args = se.parse_args(["--out", "unused", "--lrs", "1e-3", "3e-3", "1e-2", "--steps", "100"])
    scores = {"convit": (70, 75, None), "deit": (60, 60, 50), "control": (55, 50, 45), "randv": (40, 41, None)}
    done = dict(
        record(kind, args.lr_ratio, args.seeds[0], score, lr=lr, diverged=None if score else "not finite")
        for kind, row in scores.items()
        for lr, score in zip(args.lrs, row)
    )
    assert se.options.chosen_lrs(args, done) == {"convit": 3e-3, "deit": 1e-3, "control": 1e-3, "randv": 3e-3}
    del done[se.Run("deit", args.lr_ratio, 0, 100, 1e-2).name]
    assert se.options.chosen_lrs(args, done) is None  # the grid is not done: no study planned yet
    for lr in args.lrs:
        done.update([record("deit", args.lr_ratio, 0, None, lr=lr, diverged="not finite")])
    with pytest.raises(TrainError, match="every lr of --lrs diverged for the DeiT twin"):
        se.options.chosen_lrs(args, done)


def test_the_trend_the_relative_gap_and_the_long_runs_are_paired_per_seed():
    """Gains made to fall by 2 points per decade of f for seed 0 and by 4 for seed 1: the slopes are exactly those;
    the relative gap is (ConViT - DeiT) / DeiT per seed; the long runs compare the same seeds at both lengths."""
    from convit_kernels.experiments.sample_efficiency import summary

    args = se.parse_args(["--out", "unused", "--ratios", "0.001", "0.01", "0.1", "1", "--seeds", "0", "1"])
    args.steps, args.long_factor, args.long_seeds, args.long_ratio = 100, 3, 2, 0.1
    done = {}
    for seed, fall in ((0, 2.0), (1, 4.0)):
        for ratio in args.ratios:
            deit = 50.0 + 10 * seed
            done.update(
                [record("deit", ratio, seed, deit), record("convit", ratio, seed, deit - fall * math.log10(ratio))]
            )
        done.update([record("deit", 0.1, seed, 70.0, steps=300), record("convit", 0.1, seed, 71.0 + seed, steps=300)])
    results = {k: v for k, v in done.items()}
    trend = summary.trends(args, results)["convit-deit"]
    assert trend["by_seed"] == pytest.approx({0: -2.0, 1: -4.0}) and trend["mean"] == pytest.approx(-3.0)
    table = summary.accuracy_table(args, results)
    assert table[0]["relative_gap"]["by_seed"] == pytest.approx({0: 100 * 6 / 50, 1: 100 * 12 / 60})
    long = summary.long_runs(args, results)
    assert long["gain_long"]["by_seed"] == pytest.approx({0: 1.0, 1: 2.0})
    assert long["gain_short"]["by_seed"] == pytest.approx({0: 2.0, 1: 4.0})
    assert long["gain_change"]["by_seed"] == pytest.approx({0: -1.0, 1: -2.0})
    assert long["twin_long_minus_convit_short"]["by_seed"] == pytest.approx({0: 70 - 52.0, 1: 70 - 64.0})
    check = summary.full_data_check(args, results)
    assert check["by_seed"] == pytest.approx({0: 0.0, 1: 0.0}) and (check["smallest"], check["largest"]) == (0.001, 1)
