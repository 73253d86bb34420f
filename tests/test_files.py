"""No file of the package's is written through a symbolic link it did not make, and each is whole or absent."""

import json
import os

import pytest

from convit_kernels import files
from convit_kernels.bench.report import ensure_writable, write_json
from convit_kernels.experiments import sample_efficiency
from convit_kernels.train.report import JsonLog


@pytest.fixture
def victim(tmp_path):
    """A file a planted link points at: it must keep its bytes."""
    path = tmp_path / "victim"
    path.write_bytes(b"someone else's")
    return path


def test_replacing_replaces_a_planted_link_and_leaves_its_target(tmp_path, victim):
    target = tmp_path / "out.json"
    target.symlink_to(victim)
    files.write_text(str(target), "ours")
    assert not target.is_symlink() and target.read_text() == "ours"
    assert victim.read_bytes() == b"someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "victim"]  # no temporary file left


def test_replacing_leaves_the_old_file_and_no_temporary_on_error(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), files.replacing(str(target), "w") as f:
        f.write("half")
        raise RuntimeError("stopped while writing")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_open_no_follow_refuses_a_link(tmp_path, victim):
    link = tmp_path / "lock"
    link.symlink_to(victim)
    with pytest.raises(files.SymlinkRefused, match="is a symbolic link"):
        files.open_no_follow(str(link), os.O_RDWR | os.O_CREAT)
    assert victim.read_bytes() == b"someone else's"


def test_the_log_is_neither_appended_nor_rewritten_through_a_link(tmp_path, victim):
    from convit_kernels.train.errors import WriteFailed

    log_path = tmp_path / "log.jsonl"
    log_path.symlink_to(victim)
    with pytest.raises(WriteFailed, match="symbolic link"):
        JsonLog(str(log_path)).write({"epoch": 1})
    log_path.unlink()
    log = JsonLog(str(log_path))
    for epoch in (1, 2, 3):
        log.write({"epoch": epoch})
    (tmp_path / "log.jsonl.tmp").symlink_to(victim)  # the name the rewrite once used
    log.keep_epochs_up_to(2)
    assert [r["epoch"] for r in log.records()] == [1, 2] and victim.read_bytes() == b"someone else's"


def test_the_experiments_and_the_benchs_files_are_not_written_through_links(tmp_path, victim):
    for name in ("results.json", "results.json.tmp", "bench.json", ".bench-write-test"):
        (tmp_path / name).symlink_to(victim)
    sample_efficiency.write_json(str(tmp_path / "results.json"), {"runs": 1})
    write_json(str(tmp_path / "bench.json"), {"device": "cpu"}, [{"status": "ok"}])
    ensure_writable(str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text()) == {"runs": 1}
    assert json.loads((tmp_path / "bench.json").read_text())["results"] == [{"status": "ok"}]
    assert victim.read_bytes() == b"someone else's"


def test_a_disk_that_fills_mid_write_is_an_oserror_even_through_torch_save(tmp_path, monkeypatch):
    """A full disk writes part of a buffer, then refuses: torch.save's zip writer must see the OSError (with
    Python's buffered file it raised RuntimeError "unexpected pos"), so a checkpoint names the full disk."""
    import errno

    import torch

    from convit_kernels.train import checkpoint
    from convit_kernels.train.errors import WriteFailed

    real_write, calls = os.write, []

    def filling_disk(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))  # a short write
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "write", filling_disk)
    path = tmp_path / "checkpoint.pth"
    with pytest.raises(WriteFailed, match="No space left on device; none was written there"):
        checkpoint.atomic_save({"weights": torch.zeros(300_000)}, str(path))
    assert len(calls) >= 2 and list(tmp_path.iterdir()) == []  # the short write was followed by the refusal
