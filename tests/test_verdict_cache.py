"""The self-check's verdict file: no content, file type or file system state makes reading or storing raise or hang;
concurrent stores all land; a file someone else could have written is not trusted."""

import errno
import json
import multiprocessing
import os
import stat
import threading
import warnings

import pytest

from convit_kernels import verdict_cache

STACK = {"convit_kernels": "0.1.0", "torch": "2.0", "triton": "3.0"}
FOUND = {"triton sm_90 float32 d=64 N=196 W=14": (False, "out: max error 1")}


def _write(path, content: str | bytes):
    """A file as store_verdicts would leave it: only this user's, whatever the umask."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)


def _entries(folder) -> list[str]:
    """The folder's entries but the store's lock file, which stays."""
    return sorted(name for name in os.listdir(folder) if not name.endswith(".lock"))


def _file(stack=STACK, verdicts=None) -> str:
    return json.dumps({"stack": stack, "verdicts": {} if verdicts is None else verdicts})


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "self-check" / "GPU.json")


def test_a_stored_verdict_is_read_back_and_merged(path):
    assert verdict_cache.read_verdicts(path, STACK) == {}  # no file yet
    assert verdict_cache.store_verdicts(path, STACK, FOUND)
    assert verdict_cache.store_verdicts(path, STACK, {"cuda d=48": (True, "matches")})
    assert verdict_cache.read_verdicts(path, STACK) == {**FOUND, "cuda d=48": (True, "matches")}
    assert verdict_cache.read_verdicts(path, {**STACK, "torch": "2.1"}) == {}  # another stack's verdicts
    assert _entries(os.path.dirname(path)) == ["GPU.json"]  # no partial file left behind


BAD_CONTENTS = {
    "empty": "",
    "not json": "{'stack':",
    "not utf-8": b'{"stack": "\xff\xfe"}',
    "a list": "[]",
    "a string": '"x"',
    "a number": "42",
    "null": "null",
    "verdicts a list": _file(verdicts=[]),
    "verdicts without a stack": json.dumps(
        {"verdicts": {k: {"passed": p, "detail": d} for k, (p, d) in FOUND.items()}}
    ),
    "stack a list": _file(stack=[STACK]),
    "a verdict that is a string": _file(verdicts={"k": "passed"}),
    "a verdict without passed": _file(verdicts={"k": {"detail": "ok"}}),
    "a verdict without detail": _file(verdicts={"k": {"passed": True}}),
    "deeply nested lists": "[" * 100_000 + "]" * 100_000,
    "nested lists as a stack": '{"stack": ' + "[" * 500 + "]" * 500 + ', "verdicts": {}}',
}


@pytest.mark.parametrize("content", BAD_CONTENTS.values(), ids=BAD_CONTENTS.keys())
def test_a_file_of_any_other_shape_gives_no_verdicts_and_is_repaired_by_a_store(path, content):
    _write(path, content)
    assert verdict_cache.read_verdicts(path, STACK) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert verdict_cache.store_verdicts(path, STACK, FOUND)
    assert verdict_cache.read_verdicts(path, STACK) == FOUND


@pytest.mark.parametrize("passed", ["false", "true", 1, 0, None, [True]])
def test_passed_must_be_a_json_bool(path, passed):
    good = {"passed": False, "detail": "wrong on this device"}
    _write(path, _file(verdicts={"bad": {"passed": passed, "detail": "x"}, "good": good}))
    assert verdict_cache.read_verdicts(path, STACK) == {"good": (False, "wrong on this device")}


def test_detail_must_be_a_string(path):
    _write(path, _file(verdicts={"k": {"passed": True, "detail": 5}}))
    assert verdict_cache.read_verdicts(path, STACK) == {}


def test_an_oversized_file_is_not_read(path, monkeypatch):
    _write(path, _file(verdicts={k: {"passed": p, "detail": d} for k, (p, d) in FOUND.items()}))
    assert verdict_cache.read_verdicts(path, STACK) == FOUND
    monkeypatch.setattr(verdict_cache, "MAX_BYTES", os.path.getsize(path) - 1)
    assert verdict_cache.read_verdicts(path, STACK) == {}


def _within(seconds, function, *args):
    """function(*args), failing (not hanging) when it does not return within ``seconds``."""
    result = []
    thread = threading.Thread(target=lambda: result.append(function(*args)), daemon=True)
    thread.start()
    thread.join(seconds)
    return thread, result


def test_a_fifo_at_the_path_is_never_opened_for_a_blocking_read(path):
    os.makedirs(os.path.dirname(path))
    os.mkfifo(path)
    thread, result = _within(30, verdict_cache.read_verdicts, path, STACK)
    if thread.is_alive():  # the regression: a reader blocked in open() until a writer comes; release it
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail("read_verdicts blocked on a FIFO")
    assert result == [{}]
    thread, result = _within(30, verdict_cache.store_verdicts, path, STACK, FOUND)
    assert result == [True]  # the FIFO is replaced by a regular file
    assert verdict_cache.read_verdicts(path, STACK) == FOUND


def test_a_folder_at_the_path_gives_no_verdicts_and_a_store_warns(path):
    os.makedirs(path)
    assert verdict_cache.read_verdicts(path, STACK) == {}
    with pytest.warns(RuntimeWarning, match="could not store the self-check verdicts in .*GPU.json"):
        assert not verdict_cache.store_verdicts(path, STACK, FOUND)


def test_a_cache_folder_that_is_a_file_warns_once(tmp_path):
    _write(str(tmp_path / "cache"), "not a folder")
    path = str(tmp_path / "cache" / "self-check" / "GPU.json")
    assert verdict_cache.read_verdicts(path, STACK) == {}
    with pytest.warns(RuntimeWarning, match=r"could not store .* hold for this process only") as caught:
        assert not verdict_cache.store_verdicts(path, STACK, FOUND)
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not verdict_cache.store_verdicts(path, STACK, FOUND)  # the second failure is silent


def test_a_read_only_file_system_warns_and_leaves_no_partial_file(path, monkeypatch):
    # Root ignores permission bits, so the file system's refusal is simulated where the file is put in place.
    def read_only(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), dst)

    assert verdict_cache.store_verdicts(path, STACK, FOUND)
    monkeypatch.setattr(verdict_cache.os, "replace", read_only)
    with pytest.warns(RuntimeWarning, match="Read-only file system"):
        assert not verdict_cache.store_verdicts(path, STACK, {"other": (True, "ok")})
    assert _entries(os.path.dirname(path)) == ["GPU.json"]
    assert verdict_cache.read_verdicts(path, STACK) == FOUND


def test_cache_path(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert verdict_cache.cache_path("NVIDIA H100 80GB HBM3") == str(
        tmp_path / "convit_kernels" / "self-check" / "NVIDIA_H100_80GB_HBM3.json"
    )
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path))
    assert verdict_cache.cache_path("GPU") == str(tmp_path / ".cache" / "convit_kernels" / "self-check" / "GPU.json")


def _store_keys(path, barrier, worker, count):
    barrier.wait()  # all start together, so that their stores overlap
    for i in range(count):
        assert verdict_cache.store_verdicts(path, STACK, {f"worker {worker} key {i}": (i % 2 == 0, f"{worker}/{i}")})


def test_concurrent_stores_from_many_processes_all_land(path):
    # The regression: each store read, merged and replaced unlocked, so 120 processes left 11 verdicts.
    workers, count = 12, 5
    context = multiprocessing.get_context("fork")  # a child runs only this module's code, never torch
    barrier = context.Barrier(workers)
    processes = [context.Process(target=_store_keys, args=(path, barrier, w, count)) for w in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    assert [p.exitcode for p in processes] == [0] * workers
    stored = verdict_cache.read_verdicts(path, STACK)
    expected = {f"worker {w} key {i}": (i % 2 == 0, f"{w}/{i}") for w in range(workers) for i in range(count)}
    assert stored == expected, f"{len(expected) - len(stored)} of {len(expected)} verdicts lost"
    assert _entries(os.path.dirname(path)) == ["GPU.json"]


def test_the_lock_file_is_never_opened_through_a_link(path, tmp_path):
    target = tmp_path / "elsewhere"
    os.makedirs(os.path.dirname(path), mode=0o700)
    os.symlink(target, path + ".lock")
    with pytest.warns(RuntimeWarning, match="could not store"):
        assert not verdict_cache.store_verdicts(path, STACK, FOUND)
    assert not target.exists()


def test_the_folder_is_created_for_this_user_only_whatever_the_umask(path):
    old_umask = os.umask(0)
    try:
        assert verdict_cache.store_verdicts(path, STACK, FOUND)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert verdict_cache.read_verdicts(path, STACK) == FOUND


PLANTED = _file(verdicts={"triton sm_90 float32 d=64 N=196 W=14": {"passed": True, "detail": "planted"}})


def _owned_by_another_user(monkeypatch, target):
    if os.getuid() == 0:
        os.chown(target, 65534, 65534)  # nobody
    else:  # a user cannot give a file away: this user becomes someone else instead
        monkeypatch.setattr(verdict_cache.os, "getuid", lambda: os.stat(target).st_uid + 1)


UNTRUSTED = {
    "file writable by others": lambda path, mp: os.chmod(path, 0o646),
    "file writable by group": lambda path, mp: os.chmod(path, 0o620),
    "folder writable by others": lambda path, mp: os.chmod(os.path.dirname(path), 0o703),
    "folder writable by group": lambda path, mp: os.chmod(os.path.dirname(path), 0o770),
    "file of another user": lambda path, mp: _owned_by_another_user(mp, path),
    "folder of another user": lambda path, mp: _owned_by_another_user(mp, os.path.dirname(path)),
}


@pytest.mark.parametrize("make_untrusted", UNTRUSTED.values(), ids=UNTRUSTED.keys())
def test_a_file_someone_else_could_have_written_gives_no_verdicts_and_warns_once(path, monkeypatch, make_untrusted):
    _write(path, PLANTED)
    assert verdict_cache.read_verdicts(path, STACK) != {}  # trusted as written
    make_untrusted(path, monkeypatch)
    with pytest.warns(RuntimeWarning, match=r"not trusting the self-check verdicts in .*GPU.json: .* (owned|writable)"):
        assert verdict_cache.read_verdicts(path, STACK) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert verdict_cache.read_verdicts(path, STACK) == {}  # the second time is silent


def test_a_store_replaces_a_file_of_another_user_with_this_users_own(path, monkeypatch):
    _write(path, PLANTED)
    _owned_by_another_user(monkeypatch, path)
    with pytest.warns(RuntimeWarning, match="not trusting"):
        assert verdict_cache.store_verdicts(path, STACK, {"cuda d=48": (True, "matches")})
    monkeypatch.undo()
    assert verdict_cache.read_verdicts(path, STACK) == {"cuda d=48": (True, "matches")}  # nothing planted kept
