"""The self-check's verdict file per device, read and written so that no content of it can break a caller.

A file is ``{"stack": {...}, "verdicts": {key: {"passed": bool, "detail": str}}}``. Reading
(:func:`read_verdicts`) never raises: a missing, unreadable, oversized or non-regular file (a FIFO,
a device, a folder; it is never read from, so it cannot block), invalid JSON, any other shape or
another stack's file give no verdicts, and each entry that is not exactly a bool ``passed`` and a
str ``detail`` is dropped, so that combination is checked again. Storing (:func:`store_verdicts`)
merges into the valid entries and replaces the file atomically; where that fails (read-only file
system, the folder is a file) it warns once per path and carries on: the verdicts then hold for
this process only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
import warnings

__all__ = ["cache_path", "read_verdicts", "store_verdicts"]

# Far above any real file (a few dozen verdicts of ~200 bytes); a larger one is not read whole.
MAX_BYTES = 1 << 20

_WARNED_PATHS: set[str] = set()


def cache_path(device_name: str) -> str:
    """The verdict file of a device name: $XDG_CACHE_HOME (or ~/.cache)/convit_kernels/self-check/<name>.json."""
    root = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(root):  # the XDG spec: a relative value is ignored
        root = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "convit_kernels", "self-check", re.sub(r"[^A-Za-z0-9._-]+", "_", device_name) + ".json")


def _read_regular_file(path: str) -> bytes | None:
    """The bytes of ``path`` if it is a regular file of at most MAX_BYTES, else None; never blocks on a FIFO."""
    try:
        # O_NONBLOCK: opening a FIFO for reading returns at once instead of waiting for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_BYTES:
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


def read_verdicts(path: str, stack: dict) -> dict[str, tuple[bool, str]]:
    """key -> (passed, detail) for the well-formed verdicts in ``path`` written by ``stack``; never raises."""
    data = _read_regular_file(path)
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


def store_verdicts(path: str, stack: dict, found: dict[str, tuple[bool, str]]) -> bool:
    """Merge ``found`` into ``path``'s verdicts of ``stack`` and replace the file atomically.

    Returns whether it was stored; on failure warns once per path (RuntimeWarning) and never raises.
    """
    merged = read_verdicts(path, stack)
    merged.update(found)
    content = {"stack": stack, "verdicts": {k: {"passed": p, "detail": d} for k, (p, d) in merged.items()}}
    partial = None
    try:
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "w") as f:
            json.dump(content, f, indent=1, sort_keys=True)
        os.replace(partial, path)  # replaces whatever non-folder entry was there, a FIFO included
        return True
    except OSError as exc:
        if partial is not None:
            with contextlib.suppress(OSError):
                os.unlink(partial)
        if path not in _WARNED_PATHS:
            _WARNED_PATHS.add(path)
            warnings.warn(
                f"convit-kernels: could not store the self-check verdicts in {path} ({exc}); "
                "they hold for this process only and later processes check again",
                RuntimeWarning,
                stacklevel=3,
            )
        return False
