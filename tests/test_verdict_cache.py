"""The self-check's verdict file: no content, file type or file system state makes reading or storing raise or hang."""

import errno
import json
import os
import threading
import warnings

import pytest

from convit_kernels import verdict_cache

STACK = {"convit_kernels": "0.1.0", "torch": "2.0", "triton": "3.0"}
FOUND = {"triton sm_90 float32 d=64 N=196 W=14": (False, "out: max error 1")}


def _write(path, content: str | bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)


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
    assert os.listdir(os.path.dirname(path)) == ["GPU.json"]  # no partial file left behind


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
    assert os.listdir(os.path.dirname(path)) == ["GPU.json"]
    assert verdict_cache.read_verdicts(path, STACK) == FOUND


def test_cache_path(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert verdict_cache.cache_path("NVIDIA H100 80GB HBM3") == str(
        tmp_path / "convit_kernels" / "self-check" / "NVIDIA_H100_80GB_HBM3.json"
    )
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path))
    assert verdict_cache.cache_path("GPU") == str(tmp_path / ".cache" / "convit_kernels" / "self-check" / "GPU.json")
