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
# One epoch of one step at batch 16: the runs that check what a step or an epoch writes.
ONE_STEP = ["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "16"]
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


@pytest.mark.parametrize(
    "extra",
    [(), ("--model-ema", "--model-ema-decay", "0.9", "--accum-steps", "2", "--clip-grad", "0.5")],
    ids=["plain", "ema-accum-clip"],
)
def test_resume_matches_uninterrupted(tmp_path, extra):
    # Augmentation and drop path on: the RNG state must be restored too.
    args = ("--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "16", "--drop-path", "0.1", *extra)
    straight = run(tmp_path, *args, out="straight")["records"]
    first = run(tmp_path, *args, "--stop-after", "1", out="resumed")["records"]
    resumed_path = str(tmp_path / "resumed" / "checkpoint.pth")
    second = run(tmp_path, *args, "--resume", resumed_path, out="resumed")["records"]
    assert [r["epoch"] for r in first + second] == [1, 2]
    assert first[0]["step_losses"] == straight[0]["step_losses"]
    assert second[0]["step_losses"] == straight[1]["step_losses"]
    a, b = weights(tmp_path / "straight" / "checkpoint.pth"), weights(resumed_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    if extra:  # the EMA weights resume exactly too, and are evaluated every epoch
        a = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)["model_ema"]
        b = torch.load(resumed_path, weights_only=True)["model_ema"]
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert second[0]["val_acc1_ema"] == straight[1]["val_acc1_ema"]
    log = (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    assert len(log) == 2 and (tmp_path / "resumed" / "gpsa.png").stat().st_size > 0


def test_torchrun_two_processes_match_one(tmp_path):
    args = [
        "--epochs",
        "1",
        "--steps-per-epoch",
        "1",
        "--no-aug",
        "--smoothing",
        "0",
        "--drop-path",
        "0",
        "--lr",
        "0.64",
        "--warmup-epochs",
        "0",  # lr 0.64 x total batch 8 / 512 = 1e-2
        "--model-ema",
        "--model-ema-decay",
        "0.5",
    ]  # every rank's EMA must start from the same weights
    run(tmp_path, *args, "--batch-size", "8", out="single")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "convit_kernels.train",
        *TINY,
        *args,
        "--batch-size",
        "4",
        "--output-dir",
        str(tmp_path / "ddp"),
    ]
    done = subprocess.run(torchrun, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x 2" in done.stdout  # rank 0 reports the world size, and only rank 0 prints
    assert done.stdout.count("epoch 1:") == 1 and done.stdout.count("done:") == 1
    # The same command again: both processes refuse the folder that now holds a run, and one reports it.
    again = subprocess.run(torchrun, capture_output=True, text=True, env=env, timeout=180)
    assert again.returncode != 0
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "already holds a run" in errors[0], again.stderr[-3000:]
    # Accumulating 2 micro-batches of 2 per process (no_sync on the first): the same step, at the same lr.
    accumulated = [*torchrun[:-4], "--batch-size", "2", "--accum-steps", "2", "--output-dir", str(tmp_path / "acc")]
    done = subprocess.run(accumulated, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "total batch 8 (2 x 2 accumulated)" in done.stdout
    single, init = weights(tmp_path / "single" / "checkpoint.pth"), initial_weights()
    # Adam's first step is about lr x sign(grad): where a gradient is near Adam's eps, the different summation
    # order of the all-reduce moves the update by a small fraction of lr (1e-2).
    single_log = json.loads((tmp_path / "single" / "log.jsonl").read_text())
    for out in ("ddp", "acc"):
        ddp = weights(tmp_path / out / "checkpoint.pth")
        for key in single:
            torch.testing.assert_close(ddp[key], single[key], rtol=1e-5, atol=1e-5)
        # evaluated on two shards, each by its rank's EMA: the same weights as one process's
        ddp_log = json.loads((tmp_path / out / "log.jsonl").read_text())
        assert ddp_log["val_loss_ema"] == pytest.approx(single_log["val_loss_ema"], rel=1e-4)
    assert not torch.allclose(single["head.weight"], init["head.weight"])  # the step did move the weights


def test_overwrite_replaces_the_previous_run(tmp_path):
    out = previous_run(tmp_path / "out")
    (out / "gpsa.png").write_bytes(b"previous plot")
    run(
        tmp_path,
        *ONE_STEP,
        "--stat-images",
        "0",
        "--overwrite",
        out="out",
    )
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
    measured = nonlocality_as_convit(result["model"], images)  # block -> per-head values
    assert measured.keys() == logged.keys()
    assert all(measured[block] == pytest.approx(logged[block]) for block in logged)


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
        torch.save(
            {
                "model": {f"module.{k}": v for k, v in stock.state_dict().items()},
                "args": argparse.Namespace(model="convit_test", lr=5e-4),
            },
            path,
        )
    else:
        path = tmp_path / "timm.safetensors"
        save_file(stock.state_dict(), str(path))
    result = run(tmp_path, "--eval", "--resume", str(path))
    assert 0 <= result["eval"]["val_acc1"] <= 100
    loaded = result["model"].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in stock.state_dict().items())


@pytest.mark.parametrize("kind", ["facebookresearch main.py", "timm train.py"])
def test_a_foreign_training_checkpoint_resumes_what_maps_and_says_what_does_not(tmp_path, capsys, kind):
    args = ("--epochs", "3", "--steps-per-epoch", "1", "--batch-size", "16")
    run(tmp_path, *args, "--stop-after", "1", out="ours")
    ours = torch.load(tmp_path / "ours" / "checkpoint.pth", weights_only=True)
    options = argparse.Namespace(model="convit_test", lr=5e-4)
    if kind == "facebookresearch main.py":  # its keys; the model's under DDP's "module." prefix
        foreign = {
            "model": {f"module.{k}": v for k, v in ours["model"].items()},
            "optimizer": ours["optimizer"],
            "lr_scheduler": {"t_initial": 300, "warmup_t": 5},  # another schedule's state
            "epoch": ours["epoch"],
            "scaler": None,
            "args": options,
        }
    else:  # timm's CheckpointSaver
        foreign = {"epoch": ours["epoch"], "arch": "convit_test", "state_dict": ours["model"], "version": 2}
        foreign.update(optimizer=ours["optimizer"], args=options)
    path = tmp_path / "foreign.pth"
    torch.save(foreign, path)
    capsys.readouterr()
    result = run(tmp_path, *args, "--resume", str(path), out="continued")
    out = capsys.readouterr().out
    assert "(not written by convit-kernels) at epoch 2; not restored: the lr scheduler's state" in out, out
    assert "the random number generators' states" in out and "the optimizer state" not in out, out
    assert [record["epoch"] for record in result["records"]] == [2, 3]
    assert [r["lr"] for r in result["records"]] == pytest.approx([r["lr"] for r in run(tmp_path, *args)["records"][1:]])


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
    accumulated = parse_config(["--data-path", "/imagenet", "--accum-steps", "4"])
    assert recipe.scaled_lr(accumulated, world_size=8) == 5e-4 * 64 * 8 * 4 / 512  # the batch of a step
    assert not config.model_ema and config.model_ema_decay == 0.99996 and config.clip_grad is None  # ConViT's
    assert not recipe.mixup_active(parse_config(["--data-path", "/imagenet", "--no-aug"]))
    assert not parse_config([]).repeated_aug  # the digits recipe


def test_schedule_steps_per_epoch_as_convit_and_resume_refuses_another(tmp_path, capsys):
    # ConViT steps the scheduler after each epoch with its index: epochs 1 and 2 both train at --warmup-lr (a tenth
    # of these 20 epochs; the first 3 run).
    args = [
        "--epochs",
        "20",
        "--stop-after",
        "3",
        "--steps-per-epoch",
        "1",
        "--batch-size",
        "16",
        "--warmup-epochs",
        "1",
        "--lr",
        "0.512",
        "--min-lr",
        "1e-5",
        "--warmup-lr",
        "1e-6",
    ]  # scaled lr 0.512 x 16 / 512 = 0.016
    records = run(tmp_path, *args)["records"]
    cosine_at_1_of_20 = 1e-5 + 0.5 * (0.016 - 1e-5) * (1 + math.cos(math.pi / 20))
    assert [r["lr"] for r in records] == pytest.approx([1e-6, 1e-6, cosine_at_1_of_20])
    last = str(tmp_path / "run" / "checkpoint.pth")
    for changed, message, hint in (
        (["--epochs", "21"], "epochs 20 -> 21", "(--epochs 20)"),
        (["--lr", "1"], "lr 0.016 -> 0.03125", "(--lr 0.512 --batch-size 16 --accum-steps 1 on 1 process)"),
        (["--accum-steps", "2", "--batch-size", "8"], "accum_steps 1 -> 2", "(--accum-steps 1)"),
        (["--model", "convit_digits"], "model convit_test -> convit_digits", "(--model convit_test)"),
    ):
        options = [*TINY, *args, "--output-dir", str(tmp_path / "run"), "--resume", last, *changed]
        assert main(options) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and message in err, err
        # how to proceed: resume with the checkpoint's options, or a new run from its weights
        assert f"resume with the checkpoint's options {hint}" in err, err
        assert f"start a new run with --finetune {last} and another --output-dir" in err, err


def test_short_runs_warm_up_per_update_for_a_tenth_of_the_run(tmp_path, capsys):
    """Where ConViT's per-epoch warm-up would take more than a tenth of the run, the lr steps per update and warms
    up for a tenth of the updates: `--epochs 3 --stop-after 1` no longer trains its whole epoch at --warmup-lr."""
    args = ["--epochs", "3", "--steps-per-epoch", "10", "--batch-size", "16", "--warmup-epochs", "1", "--lr", "0.512"]
    record = run(tmp_path, *args, "--stop-after", "1")["records"][0]  # scaled lr 0.016; warm-up 3 of 30 updates
    cosine_at_10_of_30 = 1e-5 + 0.5 * (0.016 - 1e-5) * (1 + math.cos(math.pi / 3))
    assert (record["lr_first"], record["lr"]) == pytest.approx((1e-6, cosine_at_10_of_30))
    assert f", lr 1e-06 to {cosine_at_10_of_30:.3g}\n" in capsys.readouterr().out  # the epoch's line
    # `--epochs 1`: the weights move (at --warmup-lr for the whole epoch, Adam moved them by about 1e-5 at most)
    start = initial_weights()
    result = run(tmp_path, "--epochs", "1", "--steps-per-epoch", "10", "--batch-size", "16", out="one")
    moved = max((result["model"].state_dict()[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3
    assert recipe.per_update_schedule(300, 5) is False  # the ImageNet recipe keeps ConViT's per-epoch schedule


@pytest.mark.parametrize("magnitude", range(11))
def test_imagenet_augmentation_runs_at_every_magnitude_randaugment_draws(magnitude):
    # The recipe's rand-m9-mstd0.5 draws magnitudes in [0, 10] (clipped); at 10 the increasing posterize keeps
    # 0 bits, which Pillow 13 refuses: the transform's own posterize takes it on every Pillow.
    from convit_kernels.train.cli import IMAGENET_RECIPE
    from convit_kernels.train.data import train_transform

    config = argparse.Namespace(
        **{**IMAGENET_RECIPE, "augment": True, "color_jitter": 0.4, "auto_augment": f"rand-m{magnitude}-mstd0-inc1"}
    )
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
    "epochs 0": (["--epochs", "0"], "argument --epochs: must be in [1, inf)"),
    "epochs -1": (["--epochs", "-1"], "argument --epochs: must be in [1, inf)"),
    "batch size 0": (["--batch-size", "0"], "argument --batch-size: must be in [1, inf)"),
    "workers -1": (["--workers", "-1"], "argument --workers: must be in [0, 256]"),
    "workers 100000": (["--workers", "100000"], "argument --workers: must be in [0, 256]"),  # forked until killed
    "threads -1": (["--threads", "-1"], "argument --threads: must be in [0, 1024]"),
    "threads 100000": (["--threads", "100000"], "argument --threads: must be in [0, 1024]"),  # MemoryError
    "seed -1": (["--seed", "-1"], "argument --seed: must be in [0, 4294967295]"),
    "seed 2**32": (["--seed", "4294967296"], "argument --seed: must be in [0, 4294967295]"),
    "input size 100000": (["--input-size", "100000"], "argument --input-size: must be in [1, 8192]"),
    "steps per epoch -1": (["--steps-per-epoch", "-1"], "argument --steps-per-epoch: must be in [0, inf)"),
    "lr nan": (["--lr", "nan"], "argument --lr: must be in (0, inf)"),
    "unknown backend": (["--backend", "bogus"], "argument --backend: invalid choice: 'bogus'"),
    "backend that cannot run here": (["--backend", "cuda"], "cannot run here"),
    "odd batch with Mixup": (["--mixup", "0.8", "--batch-size", "3"], "--batch-size must be even"),
    "output dir under a file": (["--output-dir", "{tmp}/data.txt/out"], "is a file"),
    "output dir not writable": (["--output-dir", "{tmp}/read-only/out"], "is not writable"),
    "data path a file": (["--data-path", "{tmp}/data.txt"], "is not a folder"),
    "eval without weights": (["--eval"], "--eval needs the weights"),
    "existing run": ([], "already holds a run"),
    "missing data": (["--data-path", "{tmp}/nowhere"], "does not exist"),
    # the data path first, before the augmentation: the user fixes what is missing before tuning
    "missing data and a bad policy": (["--data-path", "{tmp}/nowhere", "--auto-augment", "bogus"], "does not exist"),
    "empty data": (["--data-path", "{tmp}/empty"], "has no train/ folder"),
    "empty class": (["--data-path", "{tmp}/empty-class"], "has no images"),
    "unreadable image": (
        ["--data-path", "{tmp}/broken", "--batch-size", "4", "--workers", "0", "--no-repeated-aug"],
        "cannot read image",
    ),
    "unreadable image, workers": (
        ["--data-path", "{tmp}/broken", "--batch-size", "4", "--workers", "1", "--no-repeated-aug"],
        "cannot read image",
    ),
    "missing resume": (["--resume", "{tmp}/missing.pth"], "does not exist"),
    "resume of another model": (["--resume", "{tmp}/other.pth"], "does not match the model"),
    "resume not a checkpoint": (["--resume", "{tmp}/out/checkpoint.pth"], "cannot read checkpoint"),
    "accum steps 0": (["--accum-steps", "0"], "argument --accum-steps: must be in [1, inf)"),
    "accumulation longer than the epoch": (["--accum-steps", "1000"], "fewer than --accum-steps 1000"),
    "clip grad negative": (["--clip-grad", "-1"], "argument --clip-grad: must be in (0, inf)"),
    "clip grad 0": (["--clip-grad", "0"], "argument --clip-grad: must be in (0, inf)"),
    "unknown clip mode": (["--clip-mode", "max"], "argument --clip-mode: invalid choice: 'max'"),
    "ema decay 1": (["--model-ema", "--model-ema-decay", "1"], "argument --model-ema-decay: must be in (0, 1)"),
    "ema decay 0": (["--model-ema", "--model-ema-decay", "0"], "argument --model-ema-decay: must be in (0, 1)"),
    "eval of EMA weights the file lacks": (
        ["--eval", "--model-ema", "--resume", "{tmp}/same.pth"],
        "holds no EMA weights",
    ),
    "save every -1": (["--save-every", "-1"], "argument --save-every: must be in [0, inf)"),
    "embed dim 0": (["--embed-dim", "0"], "argument --embed-dim: must be in [1, 8192]"),
    "local up to layer past the depth": (["--local-up-to-layer", "3"], "convit_test has 2 blocks"),
    "locality strength negative": (["--locality-strength", "-1"], "argument --locality-strength: must be in [0, inf)"),
    "finetune file missing": (["--finetune", "{tmp}/missing.pth"], "does not exist"),
    "finetune a folder": (["--finetune", "{tmp}/empty"], "is a folder"),
    "finetune unknown timm name": (["--finetune", "convit_huge"], "not one of timm's ConViT weights"),
    "finetune weights of another model": (["--finetune", "{tmp}/wide.pth"], "does not match the model"),
    "finetune and resume": (["--finetune", "{tmp}/same.pth", "--resume", "{tmp}/same.pth"], "choose one"),
    "pretrained and finetune": (
        ["--pretrained", "--model", "convit_tiny", "--finetune", "{tmp}/same.pth"],
        "choose one",
    ),
    "pretrained without timm weights": (["--pretrained"], "timm has no weights for convit_test"),
    # The harness sets HF_HUB_OFFLINE and an empty hub cache: nothing is downloaded.
    "pretrained offline": (
        ["--pretrained", "--model", "convit_tiny"],
        "--pretrained convit_tiny: cannot get timm's pretrained weights: offline (HF_HUB_OFFLINE is set)",
    ),
    "finetune timm weights offline": (["--finetune", "convit_tiny.fb_in1k"], "not in the local Hugging Face cache"),
    "tensorboard not installed": (["--tensorboard"], "the tensorboard package is not installed"),
}


def hub_offline(monkeypatch, tmp_path):
    """The Hugging Face hub offline, with an empty cache: timm's pretrained weights cannot be had."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_one_line_exit_2_output_untouched(tmp_path, capsys, monkeypatch, case):
    options, message = BAD_INPUT[case]
    hub_offline(monkeypatch, tmp_path)
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
    same = create_model("convit_test", num_classes=10, img_size=16, in_chans=1, drop_path=0, fused=False)
    torch.save(same.state_dict(), tmp_path / "same.pth")
    wide = create_model("convit_test", num_classes=10, img_size=16, in_chans=1, drop_path=0, fused=False, embed_dim=16)
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
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
        [
            sys.executable,
            os.path.join(ROOT, "python", "train_digits.py"),
            *TINY,
            "--epochs",
            "1",
            "--steps-per-epoch",
            "2",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "predicted" in done.stdout and (tmp_path / "checkpoint.pth").exists()


# ---------------------------------------------------------------------------------------------- recipe options


def initial_weights(**arch):
    torch.manual_seed(0)  # the seed fit uses: the same initial weights
    return create_model(
        "convit_test", num_classes=10, img_size=16, in_chans=1, drop_path=0, fused=False, **arch
    ).state_dict()


def test_accumulation_matches_a_batch_twice_as_large(tmp_path):
    # No Mixup, dropout nor drop path; the same sampler order (micro-batches 2k, 2k + 1 are batch k of twice the
    # size), and the same lr: it is scaled by the batch of a step, --batch-size x processes x --accum-steps.
    # SGD with momentum, whose steps scale with the gradient (Adam's would hide a gradient twice too large).
    args = (
        "--epochs",
        "1",
        "--steps-per-epoch",
        "3",
        "--drop-path",
        "0",
        "--warmup-epochs",
        "0",
        "--lr",
        "16",
        "--opt",
        "momentum",
    )  # lr 16 x 16 / 512 = 0.5
    one = run(tmp_path, *args, "--batch-size", "16", out="one")["records"][0]
    two = run(tmp_path, *args, "--batch-size", "8", "--accum-steps", "2", out="two")["records"][0]
    assert two["lr"] == one["lr"]
    assert two["step_losses"] == pytest.approx(one["step_losses"], rel=1e-6)
    a, b = weights(tmp_path / "one" / "checkpoint.pth"), weights(tmp_path / "two" / "checkpoint.pth")
    for key in a:  # the summation order differs: a few ulp
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    init = initial_weights()
    assert not torch.allclose(a["head.weight"], init["head.weight"])


class CountingNoSync(torch.nn.Module):
    """A model wrapper with DDP's no_sync, counting the micro-batches that skip the all-reduce."""

    def __init__(self, net):
        super().__init__()
        self.net, self.skipped = net, 0

    def forward(self, x):
        return self.net(x)

    def no_sync(self):
        import contextlib

        self.skipped += 1
        return contextlib.nullcontext()


def test_accumulation_skips_the_all_reduce_of_non_stepping_micro_batches():
    from convit_kernels.train.engine import Runtime, train_one_epoch

    config = parse_config([*TINY, "--accum-steps", "3"])
    net = create_model("convit_test", num_classes=10, img_size=16, in_chans=1, drop_path=0, fused=True)
    model = CountingNoSync(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    batches = [(torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,))) for _ in range(6)]
    runtime = Runtime(torch.device("cpu"), rank=0, world_size=1, local_rank=0)
    record = train_one_epoch(
        model,
        batches,
        2,
        optimizer,
        None,
        torch.nn.CrossEntropyLoss(),
        None,
        runtime,
        config,
        0,
        net=net,
        no_sync=model.no_sync,
    )
    assert model.skipped == 2 * (3 - 1)  # every micro-batch of a step but the last
    assert len(record["step_losses"]) == 2


def test_clip_grad_bounds_the_step(tmp_path):
    # SGD with momentum, no weight decay: the first step is lr x the (clipped) gradient.
    args = (
        *ONE_STEP,
        "--opt",
        "momentum",
        "--weight-decay",
        "0",
        "--warmup-epochs",
        "0",
        "--lr",
        "0.512",
    )  # lr 0.512 x 16 / 512 = 0.016
    init = initial_weights()

    def step_norm(out):
        moved = weights(tmp_path / out / "checkpoint.pth")
        return torch.cat([(moved[k] - init[k]).flatten() for k in init]).norm().item() / 0.016

    run(tmp_path, *args, out="free")
    run(tmp_path, *args, "--clip-grad", "0.01", out="clipped")
    assert step_norm("free") > 0.1  # the gradient's norm: well above the clip
    assert step_norm("clipped") == pytest.approx(0.01, rel=1e-3)


def test_model_ema_averages_every_step_and_is_evaluated(tmp_path):
    result = run(
        tmp_path,
        *ONE_STEP,
        "--model-ema",
        "--model-ema-decay",
        "0.75",
    )
    path = tmp_path / "run" / "checkpoint.pth"
    saved = torch.load(path, weights_only=True)
    init, model, ema = initial_weights(), saved["model"], saved["model_ema"]
    for key in init:  # one step: ema = 0.75 x initial + 0.25 x trained
        torch.testing.assert_close(ema[key], 0.75 * init[key] + 0.25 * model[key])
    assert not torch.equal(ema["head.weight"], model["head.weight"])
    record = result["records"][0]
    evaluated = run(tmp_path, "--eval", "--model-ema", "--resume", str(path))["eval"]
    assert record["val_acc1_ema"] == evaluated["val_acc1_ema"] and record["val_acc1"] == evaluated["val_acc1"]
    assert json.loads((tmp_path / "run" / "log.jsonl").read_text())["val_loss_ema"] == record["val_loss_ema"]


def test_architecture_options(tmp_path):
    arch = ("--embed-dim", "16", "--local-up-to-layer", "2", "--locality-strength", "3")
    net = run(tmp_path, *ONE_STEP, "--warmup-epochs", "0", "--lr", "1e-9", *arch)["model"]
    assert net.embed_dim == 16 * 4 and net.local_up_to_layer == 2
    assert all(hasattr(block.attn, "gating_param") for block in net.blocks)  # both blocks GPSA
    init = initial_weights(embed_dim=16, local_up_to_layer=2)  # locality strength 1
    # One step at lr 1e-9 x 16 / 512 leaves the weights where the init put them, to ~1e-10.
    torch.testing.assert_close(
        net.blocks[0].attn.pos_proj.weight.detach(), 3 * init["blocks.0.attn.pos_proj.weight"], rtol=0, atol=1e-4
    )


def test_finetune_replaces_the_head_and_resamples_pos_embed(tmp_path, capsys):
    from timm.layers import resample_abs_pos_embed

    source = create_model("convit_test", num_classes=5, img_size=16, in_chans=1, drop_path=0, fused=False)
    with torch.no_grad():
        source.pos_embed.normal_()  # timm initialises it to trunc_normal(0.02): make the resampling visible
    torch.save({"model": source.state_dict(), "epoch": 7}, tmp_path / "source.pth")
    # lr 1e-9 x 16 / 512 and no warm-up: the one step leaves the loaded weights as they were, to ~1e-10
    args = (
        *ONE_STEP,
        "--warmup-epochs",
        "0",
        "--lr",
        "1e-9",
        "--input-size",
        "24",
    )  # 6 x 6 patches instead of 4 x 4
    net = run(tmp_path, *args, "--finetune", str(tmp_path / "source.pth"))["model"]
    assert "a new head for 10 classes (the weights': 5), pos_embed resampled from 4x4 to 6x6" in capsys.readouterr().out
    tuned, loaded = net.state_dict(), source.state_dict()
    for key in loaded:
        if key.startswith("head.") or key == "pos_embed":
            continue
        torch.testing.assert_close(tuned[key], loaded[key], rtol=0, atol=1e-8)
    expected = resample_abs_pos_embed(loaded["pos_embed"], [6, 6], num_prefix_tokens=0)
    torch.testing.assert_close(tuned["pos_embed"], expected, rtol=0, atol=1e-8)
    assert tuned["head.weight"].shape == (10, 32)
    assert not (tmp_path / "run" / "checkpoint.pth").samefile(tmp_path / "source.pth")


def test_pretrained_says_when_the_hub_cannot_be_reached(monkeypatch):
    # Online mode, no network: huggingface_hub retries, then raises LocalEntryNotFoundError (stood in for here).
    import timm
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    from convit_kernels.train import pretrained
    from convit_kernels.train.errors import TrainError

    def unreachable(name, pretrained=False, **kwargs):
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(timm, "create_model", unreachable)
    with pytest.raises(
        TrainError,
        match="--pretrained convit_tiny: cannot get timm's pretrained weights: the Hugging "
        "Face hub cannot be reached and they are not in its local cache",
    ):
        pretrained.download("convit_tiny", "--pretrained")


def scripted_accuracy(monkeypatch, accuracies):
    """evaluate() reports these val_acc1 in turn (the EMA's evaluation, if any, too)."""
    from convit_kernels.train import engine

    real, queue = engine.evaluate, list(accuracies)

    def evaluate(*args, **kwargs):
        return {**real(*args, **kwargs), "val_acc1": queue.pop(0)}

    monkeypatch.setattr(engine, "evaluate", evaluate)


def test_best_and_every_n_checkpoints(tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ("--epochs", "4", "--steps-per-epoch", "1", "--batch-size", "16", "--save-every", "2")
    scripted_accuracy(monkeypatch, [50.0, 70.0, 60.0, 70.0])  # best: epoch 2 (a tie does not replace it)
    result = run(tmp_path, *args)
    assert result["best"] == {"epoch": 2, "val_acc1": 70.0}
    assert sorted(p.name for p in out.glob("checkpoint*")) == [
        "checkpoint-best.pth",
        "checkpoint-epoch002.pth",
        "checkpoint-epoch004.pth",
        "checkpoint.pth",
    ]
    assert (out / "checkpoint-best.pth").read_bytes() == (out / "checkpoint-epoch002.pth").read_bytes()
    assert (out / "checkpoint-epoch004.pth").read_bytes() == (out / "checkpoint.pth").read_bytes()
    assert torch.load(out / "checkpoint-best.pth", weights_only=True)["epoch"] == 1  # from 0, as "epoch" always is
    # Continuing from epoch 2: epoch 4's checkpoint belongs to the abandoned continuation and goes; the best
    # so far (epoch 2, 70%) comes from the checkpoint, and epoch 3 at 80% replaces it.
    monkeypatch.undo()
    scripted_accuracy(monkeypatch, [80.0])
    resumed = run(tmp_path, *args, "--stop-after", "1", "--resume", str(out / "checkpoint-epoch002.pth"))
    assert resumed["best"] == {"epoch": 3, "val_acc1": 80.0}
    assert sorted(p.name for p in out.glob("checkpoint*")) == [
        "checkpoint-best.pth",
        "checkpoint-epoch002.pth",
        "checkpoint.pth",
    ]
    assert torch.load(out / "checkpoint-best.pth", weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("name", ["checkpoint-best.pth", "checkpoint-epoch005.pth", "tensorboard"])
def test_another_runs_best_every_n_and_tensorboard_files_are_never_replaced(tmp_path, capsys, name):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).mkdir() if name == "tensorboard" else (out / name).write_bytes(b"another run's")
    before = sorted(os.listdir(out))
    assert main([*TINY, "--epochs", "1", "--steps-per-epoch", "1", "--output-dir", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err and sorted(os.listdir(out)) == before
    run(tmp_path, "--epochs", "1", "--steps-per-epoch", "1", "--overwrite", out="out")
    assert name not in os.listdir(out) or name == "checkpoint-best.pth"  # the new run's best, then
    if name == "checkpoint-best.pth":
        assert (out / name).read_bytes() != b"another run's"


class FakeSummaryWriter:
    writers = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, {}, False
        FakeSummaryWriter.writers.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, value))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_when_installed(tmp_path, monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeSummaryWriter))
    FakeSummaryWriter.writers = []
    args = ("--epochs", "3", "--steps-per-epoch", "1", "--batch-size", "16", "--model-ema")
    run(tmp_path, *args, "--stop-after", "2")
    run(tmp_path, *args, "--resume", str(tmp_path / "run" / "checkpoint.pth"))
    first, second = FakeSummaryWriter.writers
    assert first.log_dir == str(tmp_path / "run" / "tensorboard") and first.purge_step is None and first.closed
    assert [step for step, _ in first.scalars["val/acc1"]] == [1, 2]
    assert {"train/loss", "train/lr", "val/loss", "val_ema/acc1", "gpsa/gating/blocks.0.attn"} <= set(first.scalars)
    assert second.purge_step == 3 and [step for step, _ in second.scalars["train/loss"]] == [3]
    # Without the package: nothing written, no error (tensorboard is not a requirement).
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    run(tmp_path, "--epochs", "1", "--steps-per-epoch", "1", out="plain")
    assert not (tmp_path / "plain" / "tensorboard").exists() and len(FakeSummaryWriter.writers) == 2


def test_tensorboard_event_files_with_the_installed_package(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="the optional tensorboard package is not installed")
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard")  # the real one, imported anew
    run(tmp_path, "--epochs", "2", "--steps-per-epoch", "1", "--batch-size", "16")
    (events,) = (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")
    assert events.stat().st_size > 0


def test_images_per_second_leave_out_the_warm_up_steps(tmp_path, monkeypatch):
    import time

    from convit_kernels.train.engine import WARMUP_STEPS

    real = recipe.create_criterion

    def slow_first_step(config, mixup):  # as a first step that compiles, or waits for the data loader workers
        criterion, calls = real(config, mixup), []

        def loss(logits, y):
            calls.append(None)
            if len(calls) == 1:
                time.sleep(1.0)
            return criterion(logits, y)

        return loss

    monkeypatch.setattr(recipe, "create_criterion", slow_first_step)
    result = run(tmp_path, "--epochs", "1", "--steps-per-epoch", str(WARMUP_STEPS + 3), "--batch-size", "16")
    record = result["records"][0]
    whole_epoch = 16 * (WARMUP_STEPS + 3) / record["epoch_time_s"]  # what was reported before: the sleep included
    assert record["images_per_s"] > 3 * whole_epoch
    assert result["images_per_s"] == pytest.approx(record["images_per_s"])
    assert json.loads((tmp_path / "run" / "log.jsonl").read_text())["images_per_s"] == record["images_per_s"]


def test_zero_bit_posterize_gives_pillow_12s_image_on_every_pillow(monkeypatch):
    from PIL import ImageOps

    from convit_kernels.train import data
    from convit_kernels.train.cli import IMAGENET_RECIPE

    image = Image.fromarray(np.arange(48 * 3, dtype=np.uint8).reshape(4, 4, 9)[..., :3].copy())
    black = np.zeros((4, 4, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(data.posterize_any_bits(image, 0)), black)  # what Pillow 12 returns
    assert np.array_equal(np.asarray(data.posterize_any_bits(image, 3)), np.asarray(ImageOps.posterize(image, 3)))
    assert data.posterize_any_bits(image, 8) is image
    real = ImageOps.posterize

    def pillow_13(image, bits):  # Pillow 13 keeps 1 to 8 bits
        if not 1 <= bits <= 8:
            raise ValueError("bits must be between or equal to 1 and 8")
        return real(image, bits)

    monkeypatch.setattr(ImageOps, "posterize", pillow_13)
    config = argparse.Namespace(
        **{**IMAGENET_RECIPE, "augment": True, "color_jitter": 0.4, "auto_augment": "rand-m10-mstd0-n8-inc1"}
    )
    transform = data.train_transform(32, config)
    posterize = [op for op in data._augment_ops(transform) if op.name == "PosterizeIncreasing"]
    assert posterize and posterize[0].level_fn(10, posterize[0].hparams) == (0,)  # magnitude 10: 0 bits kept
    random.seed(0)
    np.random.seed(0)
    for _ in range(10):  # 8 ops of 15 a draw: the 0-bit posterize runs in most of these
        assert transform(image.resize((40, 40))).shape == (3, 32, 32)
