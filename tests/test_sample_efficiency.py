"""`convit-kernels experiment sample-efficiency`: data, models, a --quick run that stops and continues, bad input."""

import gzip
import json
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
    assert se.main([*quick(tmp_path / "se", tmp_path / "nowhere"), *options, "--no-stock", "--jobs", "1"]) == 0
    assert "8 train / 8 test images, 2 classes; 3 runs" in capsys.readouterr().out
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


def test_subsets_are_stratified_and_drawn_by_the_seed():
    labels = torch.arange(10).repeat_interleave(50)
    a, b = se.subset(labels, 0.1, seed=0), se.subset(labels, 0.1, seed=1)
    assert torch.bincount(labels[a]).tolist() == [5] * 10 and not torch.equal(a, b)
    assert torch.equal(a, se.subset(labels, 0.1, seed=0))
    assert torch.bincount(labels[se.subset(labels, 0.001, seed=0)]).tolist() == [1] * 10  # at least one


def test_the_three_models(fashion):
    """ConViT (GPSA in all but the last 2 of 5 blocks, 9 heads), the DeiT twin (no GPSA, the class token from block
    0) and the control twin (no GPSA, the class token joining at ConViT's block 3)."""
    args = se.parse_args(["--out", "unused"])
    data = se.fashion_mnist(str(fashion))
    models = {kind: se.build_model(args, data, kind, fused=False) for kind in se.MODELS}
    gpsa = {kind: sum(hasattr(b.attn, "gating_param") for b in m.blocks) for kind, m in models.items()}
    assert gpsa == {"convit": 3, "deit": 0, "control": 0}
    assert [m.local_up_to_layer for m in models.values()] == [3, 0, 3]
    assert all(b.attn.num_heads == 9 for m in models.values() for b in m.blocks)
    assert models["control"](torch.zeros(2, 1, 28, 28)).shape == (2, CLASSES)


def quick(out, fashion, *extra):
    return ["--quick", "--out", str(out), "--fashion-mnist", str(fashion), *extra]


@pytest.mark.slow
def test_quick_run_stops_and_continues(tmp_path, fashion, monkeypatch, capsys):
    """A run stopped after 2 of its 7 runs keeps them; the same command trains only the other 5 (in 2 processes)
    and writes the summary: every model at every ratio, the same steps at each, and time-to-accuracy."""
    out = tmp_path / "se"
    real, calls = se.experiment.train_run, []

    def stop_at_the_third(*args, **kwargs):
        calls.append(args[2:6])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(se.experiment, "train_run", stop_at_the_third)
    assert se.main(quick(out, fashion, "--jobs", "1")) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the 2 runs done are kept" in err and "same command continues" in err
    kept = {p.name: p.read_bytes() for p in (out / "runs").glob("*.json")}
    assert sorted(kept) == ["convit_f0.3_s0.json", "deit_f0.3_s0.json"]
    assert se.main(quick(out, fashion, "--summary-only")) == 0  # what the 2 runs show, marked partial
    assert (out / "results.md").read_text().startswith("**Partial: 2 of the 7 runs planned.**")

    monkeypatch.setattr(se.experiment, "train_run", real)
    assert se.main(quick(out, fashion)) == 0
    assert "7 runs of 30 steps, 2 done before" in capsys.readouterr().out
    assert {name: (out / "runs" / name).read_bytes() for name in kept} == kept  # not trained again
    summary = json.loads((out / "results.json").read_text())
    assert [row["ratio"] for row in summary["table"]] == [0.3, 1.0]
    for row in summary["table"]:
        assert all(row[kind]["n"] == 1 for kind in se.MODELS)
        assert set(row["gains"]) == {"convit-deit", "convit-control", "control-deit"}
    runs = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert {tuple(r["history"]["step"]) for r in runs} == {(0, 10, 20, 30)}  # the same steps at every ratio
    assert sorted(summary["time_to_accuracy"]["runs"]) == ["control", "convit", "deit", "stock"]
    convit = next(c for c in summary["curves"] if c["model"] == "convit")
    assert list(convit["gates"]) == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    assert all(len(values) == 4 for values in convit["nonlocality"].values())
    assert (out / "results.md").read_text().count("\n| 0.3 |") == 2  # the accuracy and the gate tables
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
        (["--ratios", "0", "1"], "--ratios must be in (0, 1], got 0"),
        (["--ratios", "1.5"], "--ratios must be in (0, 1], got 1.5"),
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
    """python/sample_efficiency.py runs the same experiment (here one ratio, one seed, 5 steps)."""
    out = tmp_path / "se"
    tiny = ["--ratios", "1", "--seeds", "0", "--steps", "5", "--no-stock", "--jobs", "1"]
    command = [sys.executable, str(ROOT / "python" / "sample_efficiency.py"), *quick(out, fashion, *tiny)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        f"{kind}_f1_s0.json" for kind in ("control", "convit", "deit")
    ]


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
    (out / "runs" / "convit_f0.3_s0.json").write_text('{"top1": 8')  # cut short by a crash
    trained = []

    def first_run_then_stop(spec):
        trained.append(spec)
        raise KeyboardInterrupt

    monkeypatch.setattr(se.experiment, "work", first_run_then_stop)
    assert se.main(quick(out, fashion, "--jobs", "1")) == 130
    err = capsys.readouterr().err
    assert "convit_f0.3_s0.json is not a whole run's record: that run trains again" in err
    assert se.run_name(*trained[0][:3]) == "convit_f0.3_s0"


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
