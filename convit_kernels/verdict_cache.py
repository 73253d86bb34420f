"""The self-check's verdict file per device, read and written so that no content of it can break a caller.

A file is ``{"stack": {...}, "verdicts": {key: {"passed": bool, "detail": str}}}``. Reading
(:func:`read_verdicts`) never raises: a missing, unreadable, oversized or non-regular file (a FIFO,
a device, a folder; it is never read from, so it cannot block), invalid JSON, any other shape or
another stack's file give no verdicts, and each entry that is not exactly a bool ``passed`` and a
str ``detail`` is dropped, so that combination is checked again. A file that someone else could have
written is not trusted either, as ssh trusts no such key file: the file and its folder must be owned
by this user (or root) and not writable by group or others, else it gives no verdicts and a warning
(once per path) says why. Storing (:func:`store_verdicts`) creates the folder 0700, and under an
exclusive lock on ``<file>.lock`` beside the file reads the valid entries, merges into them and
replaces the file atomically, so that processes storing at once all land; where that fails
(read-only file system, the folder is a file) it warns once per path and carries on: the verdicts
then hold for this process only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
import tempfile
import time
import warnings

__all__ = ["cache_path", "read_verdicts", "store_verdicts"]

# Far above any real file (a few dozen verdicts of ~200 bytes); a larger one is not read whole.
MAX_BYTES = 1 << 20
# A store holds the lock for milliseconds; one held longer belongs to a stopped or hung process.
LOCK_WAIT_S = 30.0

_WARNED: set[tuple[str, str]] = set()  # (what went wrong, path): each warned once per process


def _warn_once(kind: str, path: str, message: str) -> None:
    if (kind, path) not in _WARNED:
        _WARNED.add((kind, path))
        # stacklevel 4: out of this module (and, for a store, out of verification.store_verdicts too)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def cache_path(device_name: str) -> str:
    """The verdict file of a device name: $XDG_CACHE_HOME (or ~/.cache)/convit_kernels/self-check/<name>.json."""
    root = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(root):  # the XDG spec: a relative value is ignored
        root = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "convit_kernels", "self-check", re.sub(r"[^A-Za-z0-9._-]+", "_", device_name) + ".json")


def _untrusted(what: str, info: os.stat_result) -> str | None:
    """Why a file or folder with stat ``info`` may hold what another user wrote, or None (ssh's rule)."""
    uid = os.getuid()
    if info.st_uid not in (uid, 0):  # root could write it anyway
        return f"{what} is owned by uid {info.st_uid}, not by this user (uid {uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def _read_trusted_file(path: str) -> bytes | None:
    """The bytes of ``path`` if it is a trusted regular file of at most MAX_BYTES, else None; never blocks."""
    cloexec = getattr(os, "O_CLOEXEC", 0)
    try:
        folder_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | cloexec)
    except OSError:
        return None
    try:
        # O_NONBLOCK: opening a FIFO for reading returns at once instead of waiting for a writer.
        # Relative to the folder's descriptor, so that the folder checked is the one the file is in.
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | cloexec
        fd = os.open(os.path.basename(path), flags, dir_fd=folder_fd)
    except OSError:
        os.close(folder_fd)
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_BYTES:
            return None
        problem = _untrusted("the file", info) or _untrusted("its folder", os.fstat(folder_fd))
        if problem is not None:
            _warn_once(
                "untrusted",
                path,
                f"convit-kernels: not trusting the self-check verdicts in {path}: {problem}; the kernels are "
                "checked again (make the file and its folder yours and run chmod go-w on them to trust it)",
            )
            return None
        chunks, size = [], 0
        while size <= MAX_BYTES:  # a file that grows while read stops at the cap too
            chunk = os.read(fd, MAX_BYTES + 1 - size)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
        return None
    except OSError:
        return None
    finally:
        os.close(fd)
        os.close(folder_fd)


def read_verdicts(path: str, stack: dict) -> dict[str, tuple[bool, str]]:
    """key -> (passed, detail) for the well-formed verdicts in ``path`` written by ``stack``; never raises."""
    data = _read_trusted_file(path)
    if data is None:
        return {}
    try:
        content = json.loads(data)
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8; RecursionError deeply nested arrays
        return {}
    if not isinstance(content, dict) or content.get("stack") != stack:
        return {}
    stored = content.get("verdicts")
    if not isinstance(stored, dict):
        return {}
    return {
        key: (entry["passed"], entry["detail"])
        for key, entry in stored.items()
        if isinstance(entry, dict)
        and isinstance(entry.get("passed"), bool)  # not "false", not 1: only a JSON true or false
        and isinstance(entry.get("detail"), str)
    }


@contextlib.contextmanager
def _exclusive_lock(path: str):
    """Hold an exclusive flock on the file ``path`` (created 0600, never through a link) for the block.

    Waits at most LOCK_WAIT_S (then TimeoutError). Where the file system has no flock (ENOLCK, some network
    file systems), the block runs unlocked: a lost concurrent update beats no store at all.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o600)
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} stayed locked by another process for {LOCK_WAIT_S:g} s") from None
                time.sleep(0.002)
            except OSError:
                break
        yield
    finally:
        os.close(fd)  # releases the lock


def store_verdicts(path: str, stack: dict, found: dict[str, tuple[bool, str]]) -> bool:
    """Merge ``found`` into ``path``'s verdicts of ``stack`` and replace the file atomically, under a lock.

    Returns whether it was stored; on failure warns once per path (RuntimeWarning) and never raises.
    """
    partial = None
    try:
        folder = os.path.dirname(path)
        os.makedirs(folder, mode=0o700, exist_ok=True)  # only this user's: else its files are not trusted
        with _exclusive_lock(path + ".lock"):
            merged = read_verdicts(path, stack)  # read under the lock: no store in between is lost
            merged.update(found)
            content = {"stack": stack, "verdicts": {k: {"passed": p, "detail": d} for k, (p, d) in merged.items()}}
            fd, partial = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
            with os.fdopen(fd, "w") as f:
                json.dump(content, f, indent=1, sort_keys=True)
            os.replace(partial, path)  # replaces whatever non-folder entry was there, a FIFO included
        return True
    except OSError as exc:
        if partial is not None:
            with contextlib.suppress(OSError):
                os.unlink(partial)
        _warn_once(
            "store",
            path,
            f"convit-kernels: could not store the self-check verdicts in {path} ({exc}); "
            "they hold for this process only and later processes check again",
        )
        return False
