"""The training command under faults and hostile input: data-folder links, two runs on one folder, interrupts,
a full disk, options refused before the first step."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import timm.models.convit as timm_convit
import torch
from PIL import Image

from convit_kernels.train import checkpoint, fit, main, output, parse_config
from convit_kernels.train.data import image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "convit_test", "--input-size", "16", "--threads", "1", "--no-progress", "--stat-images", "8"]
ONE_STEP = ["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2"]
FOLDER = ["--workers", "0", "--no-repeated-aug", "--no-aug"]


def image_tree(root, classes=("a", "b"), per_class=2):
    for split in ("train", "val"):
        for label in classes:
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (16, 16), (40 * i, 100, 200)).save(folder / f"{i}.png")
    return root


def one_error_line(capsys, *parts):
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert all(part in err for part in parts), err
    return err


# ---------------------------------------------------------------------------------------------- data folder links


def test_a_link_loop_in_a_class_folder_is_refused(tmp_path, capsys):
    root = image_tree(tmp_path / "data")
    os.symlink("..", root / "train" / "a" / "up")  # train/a/up/a/up/... and train/a/up/b: class b as a
    out = tmp_path / "out"
    assert main([*TINY, *ONE_STEP, *FOLDER, "--data-path", str(root), "--output-dir", str(out)]) == 2
    one_error_line(capsys, f"data folder link {os.path.join(str(root), 'train', 'a', 'up')!r} is a loop")
    assert not out.exists()


def test_a_folder_reached_through_two_classes_is_refused(tmp_path, capsys):
    root = image_tree(tmp_path / "data")
    os.symlink(root / "train" / "b", root / "train" / "a" / "more")  # b's images labelled a too
    assert main([*TINY, *ONE_STEP, *FOLDER, "--data-path", str(root), "--output-dir", str(tmp_path / "out")]) == 2
    one_error_line(capsys, "twice", os.path.join(str(root), "train", "a", "more"))


def test_a_linked_image_reached_twice_is_refused(tmp_path, capsys):
    root = image_tree(tmp_path / "data")
    os.symlink(root / "train" / "b" / "0.png", root / "train" / "a" / "b0.png")
    assert main([*TINY, *ONE_STEP, *FOLDER, "--data-path", str(root), "--output-dir", str(tmp_path / "out")]) == 2
    one_error_line(capsys, "twice", "b0.png")


def test_a_hard_linked_image_in_two_classes_is_refused(tmp_path, capsys):
    root = image_tree(tmp_path / "data")
    os.link(root / "train" / "b" / "0.png", root / "train" / "a" / "b0.png")  # one file, labels a and b
    assert main([*TINY, *ONE_STEP, *FOLDER, "--data-path", str(root), "--output-dir", str(tmp_path / "out")]) == 2
    one_error_line(capsys, "twice", "b0.png", "(a hard link)")


def test_16_bit_images_are_scaled_to_8_bits_and_32_bit_ones_refused(tmp_path):
    from convit_kernels.train.data import load_image
    from convit_kernels.train.errors import UnreadableImage

    ramp = (np.arange(64 * 64, dtype=np.uint32) * 16).astype(np.uint16).reshape(64, 64)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    pixels = np.asarray(load_image(str(tmp_path / "ramp16.png")))
    assert pixels.shape == (64, 64, 3) and np.array_equal(pixels[..., 0], (ramp >> 8).astype(np.uint8))
    assert len(np.unique(pixels)) == 256  # every 8-bit level, not 3 values clipped to white
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "ints.tif")
    with pytest.raises(UnreadableImage, match="32-bit"):
        load_image(str(tmp_path / "ints.tif"))


def test_linked_class_folders_and_images_are_followed_and_counted_once(tmp_path):
    root = image_tree(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "c").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (16, 16)).save(elsewhere / "c" / f"{i}.png")
    os.symlink(elsewhere / "c", root / "train" / "c")  # a class folder kept on another disk
    (root / "val" / "c").mkdir()
    Image.new("RGB", (16, 16)).save(root / "val" / "c" / "0.png")
    Image.new("RGB", (16, 16)).save(elsewhere / "loose.png")
    os.symlink(elsewhere / "loose.png", root / "train" / "a" / "linked.png")
    config = parse_config(["--data-path", str(root), *FOLDER])
    bundle = image_folder(str(root), 16, config)
    names = [os.path.relpath(path, root / "train") for path, _ in bundle.train.samples]
    assert names == ["a/0.png", "a/1.png", "a/linked.png", "b/0.png", "b/1.png", "c/0.png", "c/1.png", "c/2.png"]
    assert bundle.train.targets == [0, 0, 0, 1, 1, 2, 2, 2] and bundle.num_classes == 3


# ---------------------------------------------------------------------------------------------- one run per folder


def start_train(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.Popen(
        [sys.executable, "-m", "convit_kernels.train", *TINY, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for_claim(out, process):
    """Until `process` holds `out`: its pid is in the folder's lock file."""
    lock = out / output.LOCK
    while not (lock.exists() and lock.read_text().strip() == str(process.pid)):
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.1)


def test_a_second_run_into_a_folder_in_use_is_refused_and_a_killed_runs_claim_is_not(tmp_path, capsys):
    out = tmp_path / "out"
    long_run = ["--epochs", "1000", "--steps-per-epoch", "1", "--batch-size", "2", "--output-dir", str(out)]
    first = start_train(*long_run)
    try:
        wait_for_claim(out, first)
        assert main([*TINY, *ONE_STEP, "--output-dir", str(out), "--overwrite"]) == 2
        one_error_line(capsys, f"--output-dir {str(out)!r} is in use by another run (pid {first.pid})")
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)  # a claim left behind, as by a crash or `kill -9`
        first.wait()
    assert (out / output.LOCK).exists()
    assert main([*TINY, *ONE_STEP, "--output-dir", str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["checkpoint-best.pth", "checkpoint.pth", "gpsa.png", "log.jsonl"]


def test_a_run_that_fails_before_writing_leaves_no_folder_nor_claim(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*TINY, *ONE_STEP, "--output-dir", str(out), "--data-path", str(tmp_path / "nowhere")]) == 2
    one_error_line(capsys, "does not exist")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- one line, no traceback


def test_ctrl_c_stops_with_exit_130_and_names_the_last_checkpoint(tmp_path):
    out = tmp_path / "out"
    process = start_train("--epochs", "1000", "--steps-per-epoch", "1", "--batch-size", "2", "--output-dir", str(out))
    try:
        while not (out / "log.jsonl").exists():  # an epoch is done: a checkpoint to name
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    last = out / "checkpoint.pth"
    epoch = torch.load(last, weights_only=True)["epoch"] + 1
    assert process.returncode == 130, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("interrupted: ") and f"--resume {last} (the checkpoint of epoch {epoch})" in err, err


def test_ctrl_c_before_the_first_checkpoint_says_none_was_written(tmp_path, capsys, monkeypatch):
    from convit_kernels.train import engine

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "train_one_epoch", interrupted)
    assert main([*TINY, *ONE_STEP, "--output-dir", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    assert err == "interrupted: no checkpoint was written\n", err
    assert not (tmp_path / "out").exists()


def test_a_full_disk_while_saving_stops_with_exit_1_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    args = [*TINY, "--epochs", "2", "--steps-per-epoch", "1", "--batch-size", "2", "--output-dir", str(out)]
    assert main([*args, "--stop-after", "1"]) == 0
    previous = (out / "checkpoint.pth").read_bytes()

    def full_disk(obj, f):
        f.write(b"the first part of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    capsys.readouterr()
    assert main([*args, "--resume", str(out / "checkpoint.pth")]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"cannot write checkpoint {str(out / 'checkpoint.pth')!r}: No space left on device" in err, err
    assert "the previous one is kept" in err, err
    assert (out / "checkpoint.pth").read_bytes() == previous
    assert sorted(os.listdir(out)) == ["checkpoint-best.pth", "checkpoint.pth", "gpsa.png", "log.jsonl"]


@pytest.mark.parametrize(
    "options, message",
    [
        (["--opt", "bogus"], "--opt bogus: not one of timm's optimizers"),
        (["--input-size", "3"], "--input-size 3 is smaller than a patch of convit_test (4 x 4 pixels)"),
        (["--input-size", "8", "--model", "convit_tiny"], "smaller than a patch of convit_tiny (16 x 16 pixels)"),
    ],
    ids=["opt", "input below a patch", "timm model"],
)
def test_options_refused_before_any_work(tmp_path, capsys, monkeypatch, options, message):
    from convit_kernels.train import data

    monkeypatch.setattr(data, "build_data", lambda config: pytest.fail("the data was read"))
    assert main([*TINY, *ONE_STEP, "--output-dir", str(tmp_path / "out"), *options]) == 2
    one_error_line(capsys, message)


def test_a_corrupt_validation_image_is_found_before_training(tmp_path, capsys, monkeypatch):
    from convit_kernels.train import engine

    root = image_tree(tmp_path / "data")
    (root / "val" / "b" / "1.png").write_bytes(b"not an image")
    monkeypatch.setattr(engine, "train_one_epoch", lambda *args, **kwargs: pytest.fail("a training step ran"))
    args = [*TINY, *ONE_STEP, *FOLDER, "--data-path", str(root), "--output-dir", str(tmp_path / "out")]
    assert main([*args, "--stat-images", "1"]) == 2  # the statistics' image is not the corrupt one
    one_error_line(capsys, "cannot read image", os.path.join("val", "b", "1.png"))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "stock"])
def test_a_one_patch_grid_trains_and_logs_zero_nonlocality(tmp_path, fused):
    result = fit(
        parse_config(
            [*TINY, *ONE_STEP, "--input-size", "4", "--output-dir", str(tmp_path / "out")]
            + ([] if fused else ["--no-fused"])
        )
    )
    record = result["records"][0]
    assert record["gpsa"]["blocks.0.attn"]["nonlocality"] == [0.0] * 4
    assert record["nonlocality_convit"] == {"0": [0.0] * 4, "1": [0.0] * 4}


def test_fused_gpsa_attention_map_of_one_patch():
    from convit_kernels import FusedGPSA

    layer = FusedGPSA(dim=16, num_heads=2)
    x = torch.randn(3, 1, 16)
    distance, attention = layer.get_attention_map(x, return_map=True)
    assert distance.tolist() == [0.0, 0.0] and attention.shape == (2, 1, 1)
    many = torch.randn(3, 9, 16)
    torch.testing.assert_close(layer.get_attention_map(many), timm_convit.GPSA.get_attention_map(layer, many))


# ---------------------------------------------------------------------------------------------- smaller ones


@pytest.mark.parametrize(
    "kind, message",
    [
        ("text", "cannot read checkpoint {path!r}: torch.save writes a zip archive (or a pickle), this file is "),
        ("folder", "checkpoint {path!r} is a folder, not a checkpoint file"),
    ],
)
def test_resume_of_a_text_file_or_a_folder_says_what_it_is(tmp_path, capsys, kind, message):
    path = tmp_path / "weights.pth"
    path.mkdir() if kind == "folder" else path.write_text("not a checkpoint\n")
    assert main([*TINY, *ONE_STEP, "--output-dir", str(tmp_path / "out"), "--resume", str(path)]) == 2
    err = one_error_line(capsys, message.format(path=str(path)))
    assert "could run code" not in err and "does not exist" not in err


def test_an_infinite_number_is_refused_with_an_interval_that_excludes_it(capsys):
    assert main([*TINY, "--lr", "inf"]) == 2
    one_error_line(capsys, "argument --lr: must be in (0, inf), got 'inf'")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoints_and_log_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        fit(parse_config([*TINY, *ONE_STEP, "--save-every", "1", "--output-dir", str(tmp_path / "out")]))
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "out").iterdir()}
    assert modes == dict.fromkeys(
        ["checkpoint.pth", "checkpoint-best.pth", "checkpoint-epoch001.pth", "log.jsonl", "gpsa.png"], 0o666 & ~umask
    )


def test_one_class_warns_that_accuracy_means_nothing(tmp_path, capsys):
    root = image_tree(tmp_path / "data", classes=("only",))
    args = [*TINY, *ONE_STEP, *FOLDER, "--data-path", str(root), "--output-dir", str(tmp_path / "out")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "warning: the data set has one class" in err, err


# ---------------------------------------------------------------------------------------------- beyond one machine


def torchrun(*options, entry=("-m", "convit_kernels.train"), out, wait=True):
    args = [*TINY, "--epochs", "3", "--steps-per-epoch", "3", "--batch-size", "4", "--resume", "auto"]
    command = [sys.executable, "-m", "torch.distributed.run", *options, *entry, *args, "--output-dir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    # A session of its own: a timeout stops torchrun's workers too, not only torchrun.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    if not wait:
        return process
    stdout, stderr = finish(process)
    assert process.returncode == 0, stderr[-3000:]
    return stdout


def finish(process: subprocess.Popen, timeout: float = 900) -> tuple[str, str]:
    """The process's output; on a timeout (minutes per launch on a busy 2-core machine) its whole group is killed."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_end_with_the_weights_of_one_node(tmp_path):
    torchrun("--standalone", "--nproc-per-node", "2", out=tmp_path / "one-node")
    expected = torch.load(tmp_path / "one-node" / "checkpoint.pth", weights_only=True)["model"]

    # 2 nodes x 1 process on localhost, through the c10d rendezvous of docs/training.md's multi-node command
    rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{free_port()}", "--rdzv-id", "test"]
    nodes = [torchrun("--nnodes", "2", "--nproc-per-node", "1", *rendezvous, out=tmp_path / "two", wait=False)]
    nodes.append(torchrun("--nnodes", "2", "--nproc-per-node", "1", *rendezvous, out=tmp_path / "two", wait=False))
    for node in nodes:
        _, stderr = finish(node)
        assert node.returncode == 0, stderr[-3000:]
    two_nodes = torch.load(tmp_path / "two" / "checkpoint.pth", weights_only=True)["model"]
    assert all(torch.equal(two_nodes[key], value) for key, value in expected.items())


def test_each_torchrun_attempt_keeps_its_own_keys_in_the_agent_store(monkeypatch):
    from torch.distributed import TCPStore

    from convit_kernels.train.runtime import attempt_store

    agent = TCPStore("127.0.0.1", 0, 1, is_master=True)  # what torchrun's agent serves, restarts or not
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(agent.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    stores = []
    for attempt in ("0", "1"):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", attempt)
        stores.append(attempt_store(0, 2))
    stores[0].set("rank0/address", "a dead rank's port")
    assert not stores[1].check(["rank0/address"])  # the restarted ranks never read it
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    assert attempt_store(0, 2) is None  # not under torchrun: init_process_group's own env:// store


@pytest.mark.slow
def test_a_killed_rank_under_max_restarts_ends_with_the_weights_of_one_node(tmp_path):
    """Before each attempt had its own store prefix, the restarted ranks often met the dead ones' gloo addresses."""
    torchrun("--standalone", "--nproc-per-node", "2", out=tmp_path / "one-node")
    expected = torch.load(tmp_path / "one-node" / "checkpoint.pth", weights_only=True)["model"]
    # rank 1 killed in epoch 2; torchrun restarts both ranks, which continue from epoch 1's checkpoint by themselves
    killed = os.path.join(ROOT, "tests", "killed_rank.py")
    restarts = ("--standalone", "--nproc-per-node", "2", "--max-restarts", "1")
    stdout = torchrun(*restarts, entry=(killed,), out=tmp_path / "k")
    assert stdout.count("data: ") == 2 and stdout.count("epoch 1: ") == 1, stdout  # two attempts, epoch 1 once
    log = [json.loads(line)["epoch"] for line in (tmp_path / "k" / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3]
    restarted = torch.load(tmp_path / "k" / "checkpoint.pth", weights_only=True)["model"]
    assert all(torch.equal(restarted[key], value) for key, value in expected.items())


def test_a_lock_planted_as_a_link_is_refused_and_its_target_untouched(tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.write_bytes(b"someone else's")
    out = tmp_path / "out"
    out.mkdir()
    (out / output.LOCK).symlink_to(victim)
    assert main([*TINY, *ONE_STEP, "--output-dir", str(out)]) == 2
    one_error_line(capsys, f"{output.LOCK} is a symbolic link")
    assert victim.read_bytes() == b"someone else's" and os.listdir(out) == [output.LOCK]


def test_a_damaged_checkpoint_is_refused_in_one_line_naming_the_record(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*TINY, *ONE_STEP, "--output-dir", str(out)]) == 0
    capsys.readouterr()
    last = out / "checkpoint.pth"
    data = bytearray(last.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(4096)  # 4 KiB overwritten inside the tensors' records
    last.write_bytes(bytes(data))
    assert main([*TINY, "--eval", "--resume", str(last)]) == 2
    one_error_line(capsys, "fails its CRC-32 check")


def test_a_damaged_log_line_is_named_before_training_and_dropped_on_resume(tmp_path, capsys):
    out = tmp_path / "out"
    args = [*TINY, "--epochs", "3", "--steps-per-epoch", "1", "--batch-size", "2", "--output-dir", str(out)]
    assert main([*args, "--stop-after", "2"]) == 0
    log = out / "log.jsonl"
    lines = log.read_text().splitlines()
    log.write_text(lines[0] + "\nnot json at all\n" + lines[1] + '\n{"epoch": 2, "train_lo')  # garbage, cut short
    capsys.readouterr()
    assert main([*args, "--resume", str(out / "checkpoint.pth")]) == 0
    err = capsys.readouterr().err
    assert "log.jsonl: lines 2, 4 are not a whole record" in err and "Traceback" not in err, err
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2, 3]


def test_an_output_dir_that_is_a_dangling_link_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "gone")
    assert main([*TINY, *ONE_STEP, "--output-dir", str(out)]) == 2
    one_error_line(capsys, "is a symbolic link to", "which does not exist")
    assert out.is_symlink() and not (tmp_path / "gone").exists()
