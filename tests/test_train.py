"""The training stack on a tiny ConViT (convit_test: 16 px, 4 x 4 grid, 2 blocks) and the embedded digits."""

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from convit_kernels.train import checkpoint, fit, main, parse_config
from convit_kernels.train import model as recipe
from convit_kernels.train.model import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "convit_test", "--input-size", "16", "--threads", "1", "--no-progress", "--stat-images", "8"]


def run(tmp_path, *args, out="run"):
    return fit(parse_config([*TINY, "--output-dir", str(tmp_path / out), *args]))


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_fused_matches_stock_first_steps(tmp_path):
    args = ("--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16")
    fused = run(tmp_path, *args, out="fused")["records"][0]["step_losses"]
    stock = run(tmp_path, *args, "--no-fused", out="stock")["records"][0]["step_losses"]
    assert len(fused) == len(stock) == 2
    assert fused[0] == pytest.approx(stock[0], rel=1e-5)
    assert fused[1] == pytest.approx(stock[1], rel=1e-3)


def test_resume_matches_uninterrupted(tmp_path):
    # Augmentation and drop path on: the RNG state must be restored too.
    args = ("--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "16", "--drop-path", "0.1")
    straight = run(tmp_path, *args, out="straight")["records"]
    first = run(tmp_path, *args, "--stop-after", "1", out="resumed")["records"]
    resumed_path = str(tmp_path / "resumed" / "checkpoint.pth")
    second = run(tmp_path, *args, "--resume", resumed_path, out="resumed")["records"]
    assert [r["epoch"] for r in first + second] == [1, 2]
    assert first[0]["step_losses"] == straight[0]["step_losses"]
    assert second[0]["step_losses"] == straight[1]["step_losses"]
    a, b = weights(tmp_path / "straight" / "checkpoint.pth"), weights(resumed_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    assert len(log) == 2 and (tmp_path / "resumed" / "gpsa.png").stat().st_size > 0


def test_torchrun_two_processes_match_one(tmp_path):
    args = ["--epochs", "1", "--steps-per-epoch", "1", "--no-aug", "--smoothing", "0", "--drop-path", "0",
            "--lr", "0.64", "--warmup-epochs", "0"]  # lr 0.64 x total batch 8 / 512 = 1e-2
    run(tmp_path, *args, "--batch-size", "8", out="single")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "convit_kernels.train", *TINY, *args, "--batch-size", "4", "--output-dir", str(tmp_path / "ddp")]
    done = subprocess.run(torchrun, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x 2" in done.stdout  # rank 0 reports the world size, and only rank 0 prints
    assert done.stdout.count("epoch 1:") == 1 and done.stdout.count("done:") == 1
    # The same command again: both processes refuse the folder that now holds a run, and one reports it.
    again = subprocess.run(torchrun, capture_output=True, text=True, env=env, timeout=180)
    assert again.returncode != 0
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "already holds a run" in errors[0], again.stderr[-3000:]
    single, ddp = weights(tmp_path / "single" / "checkpoint.pth"), weights(tmp_path / "ddp" / "checkpoint.pth")
    torch.manual_seed(0)  # the seed fit uses: the same initial weights
    init = create_model("convit_test", num_classes=10, img_size=16, in_chans=1, drop_path=0, fused=False).state_dict()
    # Adam's first step is about lr x sign(grad): where a gradient is near Adam's eps, the different summation
    # order of the all-reduce moves the update by a small fraction of lr (1e-2).
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(single["head.weight"], init["head.weight"])  # the step did move the weights


def test_overwrite_replaces_the_previous_run(tmp_path):
    out = previous_run(tmp_path / "out")
    (out / "gpsa.png").write_bytes(b"previous plot")
    run(tmp_path, "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "16", "--stat-images", "0",
        "--overwrite", out="out")
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1]
    assert sorted(os.listdir(out)) == ["checkpoint-best.pth", "checkpoint.pth", "log.jsonl"]  # no previous plot
    assert weights(out / "checkpoint.pth")


def test_resuming_an_earlier_checkpoint_of_a_run_rewrites_its_log_from_there(tmp_path):
    args = ("--epochs", "2", "--steps-per-epoch", "1", "--batch-size", "16")
    out = tmp_path / "run"
    run(tmp_path, *args, "--stop-after", "1", out="run")
    shutil.copy(out / "checkpoint.pth", out / "epoch1.pth")
    run(tmp_path, *args, "--resume", str(out / "checkpoint.pth"), out="run")
    run(tmp_path, *args, "--resume", str(out / "epoch1.pth"), out="run")
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_non_finite_loss_stops_with_an_error_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = [*TINY, "--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "16", "--output-dir", str(out)]
    assert main([*args, "--stop-after", "1"]) == 0
    good = (out / "checkpoint.pth").read_bytes()
    monkeypatch.setattr(recipe, "create_criterion", lambda config, mixup: lambda logits, y: logits.sum() * math.nan)
    capsys.readouterr()
    assert main([*args, "--resume", str(out / "checkpoint.pth")]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "the loss is not finite" in err and "Traceback" not in err, err
    assert (out / "checkpoint.pth").read_bytes() == good
    assert len((out / "log.jsonl").read_text().splitlines()) == 1


def test_log_holds_convit_nonlocality_of_every_block(tmp_path):
    from convit_kernels.train.data import digits, fixed_batch
    from convit_kernels.train.report import nonlocality_as_convit

    result = run(tmp_path, "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "16")
    logged = json.loads((tmp_path / "run" / "log.jsonl").read_text())["nonlocality_convit"]
    assert sorted(logged) == ["0", "1"]  # convit_test: a GPSA block and an MHSA block
    assert all(len(heads) == 4 for heads in logged.values())
    images = fixed_batch(digits(16, augment=False).val, 8)  # TINY's --stat-images
    assert nonlocality_as_convit(result["model"], images) == pytest.approx(logged)


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    checkpoint.atomic_save({"step": 1}, path)

    def crash_mid_write(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. the job is killed while writing

    monkeypatch.setattr(checkpoint.torch, "save", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # no temporary file left behind


@pytest.mark.parametrize("kind", ["facebookresearch", "timm safetensors"])
def test_foreign_state_dict_loads_into_fused_model(tmp_path, kind):
    from safetensors.torch import save_file

    stock = create_model("convit_test", num_classes=10, img_size=16, in_chans=1, drop_path=0, fused=False)
    if kind == "facebookresearch":  # its main.py saves the DDP model's keys and its options as a Namespace
        path = tmp_path / "facebook.pth"
        torch.save({"model": {f"module.{k}": v for k, v in stock.state_dict().items()},
                    "args": argparse.Namespace(model="convit_test", lr=5e-4)}, path)
    else:
        path = tmp_path / "timm.safetensors"
        save_file(stock.state_dict(), str(path))
    result = run(tmp_path, "--eval", "--resume", str(path))
    assert 0 <= result["eval"]["val_acc1"] <= 100
    loaded = result["model"].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in stock.state_dict().items())


class RunsCode:
    """A pickle that creates a file when unpickled: what a crafted checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("flag", ["--resume", "--eval"])
def test_checkpoint_that_would_run_code_is_refused(tmp_path, capsys, flag):
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.pth"
    torch.save({"model": RunsCode(str(marker)), "epoch": 0}, crafted)
    args = ["--eval", "--resume", str(crafted)] if flag == "--eval" else ["--resume", str(crafted)]
    assert main([*TINY, "--epochs", "1", "--output-dir", str(tmp_path / "out"), *args]) == 2
    assert "could run code" in capsys.readouterr().err
    assert not marker.exists()


def test_sampling_ratio_keeps_the_first_images_of_every_class_as_convit(tmp_path):
    from convit_kernels.train.data import image_folder, subsample_per_class

    for label, count in (("a", 5), ("b", 3)):
        (tmp_path / "train" / label).mkdir(parents=True)
        (tmp_path / "val" / label).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "val" / label / "0.png")
        for i in reversed(range(count)):  # created in reverse: the order must come from the sorted names
            Image.new("RGB", (8, 8)).save(tmp_path / "train" / label / f"{i}.png")
    config = parse_config(["--data-path", str(tmp_path), "--no-aug"])
    train = image_folder(str(tmp_path), 16, config).train
    kept = subsample_per_class(train, 0.5)  # int(5 x 0.5) = 2 of a, int(3 x 0.5) = 1 of b
    names = [os.path.relpath(train.samples[i][0], tmp_path / "train") for i in kept.indices]
    assert names == ["a/0.png", "a/1.png", "b/0.png"]


def test_imagenet_recipe_follows_convit():
    config = parse_config(["--data-path", "/imagenet"])
    assert config.repeated_aug and recipe.mixup_active(config)
    assert recipe.scaled_lr(config, world_size=8) == 5e-4 * 64 * 8 / 512  # --lr is ConViT's base lr
    assert not recipe.mixup_active(parse_config(["--data-path", "/imagenet", "--no-aug"]))
    assert not parse_config([]).repeated_aug  # the digits recipe


def test_schedule_steps_per_epoch_as_convit_and_resume_refuses_another(tmp_path, capsys):
    # ConViT steps the scheduler after each epoch with its index: epochs 1 and 2 both train at --warmup-lr.
    args = ["--epochs", "3", "--steps-per-epoch", "1", "--batch-size", "16", "--warmup-epochs", "1",
            "--lr", "0.512", "--min-lr", "1e-5", "--warmup-lr", "1e-6"]  # scaled lr 0.512 x 16 / 512 = 0.016
    records = run(tmp_path, *args)["records"]
    cosine_at_1_of_3 = 1e-5 + 0.5 * (0.016 - 1e-5) * (1 + math.cos(math.pi / 3))
    assert [r["lr"] for r in records] == pytest.approx([1e-6, 1e-6, cosine_at_1_of_3])
    last = str(tmp_path / "run" / "checkpoint.pth")
    for changed, message in ((["--epochs", "4"], "epochs 3 -> 4"), (["--lr", "1"], "lr 0.016 -> 0.03125"),
                             (["--model", "convit_digits"], "model convit_test -> convit_digits")):
        options = [*TINY, *args, "--output-dir", str(tmp_path / "run"), "--resume", last, *changed]
        assert main(options) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("magnitude", range(11))
def test_imagenet_augmentation_runs_at_every_magnitude_randaugment_draws(magnitude):
    # The recipe's rand-m9-mstd0.5 draws magnitudes in [0, 10] (clipped); at 10 the increasing posterize keeps
    # 0 bits, which Pillow 13 refuses mid-epoch (requirements.txt pins Pillow 12).
    from convit_kernels.train.cli import IMAGENET_RECIPE
    from convit_kernels.train.data import train_transform

    config = argparse.Namespace(**{**IMAGENET_RECIPE, "augment": True, "color_jitter": 0.4,
                                   "auto_augment": f"rand-m{magnitude}-mstd0-inc1"})
    transform = train_transform(32, config)
    random.seed(magnitude)  # RandAugment draws its ops from Python's and numpy's generators
    np.random.seed(magnitude)
    generator = torch.Generator().manual_seed(magnitude)
    for _ in range(40):  # at magnitude 10 these draw the 0-bit posterize 3 times
        pixels = torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8, generator=generator)
        assert transform(Image.fromarray(pixels.numpy())).shape == (3, 32, 32)


def image_tree(root, broken=None, empty_class=False):
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            if empty_class and split == "train" and label == "b":
                continue
            for i in range(2):
                Image.new("RGB", (16, 16), (40 * i, 100, 200)).save(folder / f"{i}.png")
    if broken:
        (root / "train" / "a" / "0.png").write_bytes(b"not an image")
    return root


def previous_run(folder):
    """An output folder that holds another run's files."""
    folder.mkdir()
    (folder / "checkpoint.pth").write_bytes(b"previous checkpoint")
    (folder / "log.jsonl").write_text('{"epoch": 1}\n')
    return folder


def contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else None


# case: (options, a part of the message); "{tmp}" is the test's folder. Every case but "existing run" passes
# --overwrite, so that the previous run in the output folder does not stop it first.
BAD_INPUT = {
    "epochs 0": (["--epochs", "0"], "argument --epochs: must be in [1, inf]"),
    "epochs -1": (["--epochs", "-1"], "argument --epochs: must be in [1, inf]"),
    "batch size 0": (["--batch-size", "0"], "argument --batch-size: must be in [1, inf]"),
    "workers -1": (["--workers", "-1"], "argument --workers: must be in [0, inf]"),
    "threads -1": (["--threads", "-1"], "argument --threads: must be in [0, inf]"),
    "steps per epoch -1": (["--steps-per-epoch", "-1"], "argument --steps-per-epoch: must be in [0, inf]"),
    "lr nan": (["--lr", "nan"], "argument --lr: must be in (0, inf]"),
    "unknown backend": (["--backend", "bogus"], "argument --backend: invalid choice: 'bogus'"),
    "backend that cannot run here": (["--backend", "cuda"], "cannot run here"),
    "odd batch with Mixup": (["--mixup", "0.8", "--batch-size", "3"], "--batch-size must be even"),
    "output dir under a file": (["--output-dir", "{tmp}/data.txt/out"], "is a file"),
    "output dir not writable": (["--output-dir", "{tmp}/read-only/out"], "is not writable"),
    "data path a file": (["--data-path", "{tmp}/data.txt"], "is not a folder"),
    "eval without weights": (["--eval"], "--eval needs the weights"),
    "existing run": ([], "already holds a run"),
    "missing data": (["--data-path", "{tmp}/nowhere"], "does not exist"),
    "empty data": (["--data-path", "{tmp}/empty"], "has no train/ folder"),
    "empty class": (["--data-path", "{tmp}/empty-class"], "has no images"),
    "unreadable image": (["--data-path", "{tmp}/broken", "--batch-size", "4", "--workers", "0",
                          "--no-repeated-aug"], "cannot read image"),
    "unreadable image, workers": (["--data-path", "{tmp}/broken", "--batch-size", "4", "--workers", "1",
                                   "--no-repeated-aug"], "cannot read image"),
    "missing resume": (["--resume", "{tmp}/missing.pth"], "does not exist"),
    "resume of another model": (["--resume", "{tmp}/other.pth"], "does not match the model"),
    "resume not a checkpoint": (["--resume", "{tmp}/out/checkpoint.pth"], "cannot read checkpoint"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_one_line_exit_2_output_untouched(tmp_path, capsys, case):
    options, message = BAD_INPUT[case]
    if case == "backend that cannot run here" and torch.cuda.is_available():
        pytest.skip("the cuda backend runs here")
    if case == "output dir not writable" and os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    out = previous_run(tmp_path / "out")
    (tmp_path / "data.txt").write_text("a file")
    (tmp_path / "read-only").mkdir(mode=0o500)
    (tmp_path / "empty").mkdir()
    image_tree(tmp_path / "empty-class", empty_class=True)
    image_tree(tmp_path / "broken", broken=True)
    other = create_model("convit_test", num_classes=3, img_size=16, in_chans=1, drop_path=0, fused=False)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    before = contents(out)
    args = ["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--output-dir", str(out)]
    args += [] if case == "existing run" else ["--overwrite"]
    assert main([*TINY, *args, *(option.format(tmp=tmp_path) for option in options)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    assert contents(out) == before
    assert not (tmp_path / "data.txt" / "out").exists() and not (tmp_path / "read-only" / "out").exists()


def test_train_digits_example_runs(tmp_path):
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "python", "train_digits.py"), *TINY, "--epochs", "1",
         "--steps-per-epoch", "2", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "predicted" in done.stdout and (tmp_path / "checkpoint.pth").exists()
