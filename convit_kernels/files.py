"""Writing the package's files: whole or not at all, and never through a symbolic link it did not make.

Every file the package writes goes through :func:`replacing` (a new file beside the target, created
with O_EXCL, which neither follows nor reuses a link, then renamed over the target: a link planted
at the target is replaced, its own target untouched) or is opened with :func:`open_no_follow`
(files written in place: the run lock, the appended log). A planted link is refused in one line.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import secrets

__all__ = ["SymlinkRefused", "open_no_follow", "replacing", "write_text", "fsync_folder"]


class SymlinkRefused(OSError):
    """A file the package would write in place is a symbolic link."""


def open_no_follow(path: str, flags: int, mode: int = 0o666) -> int:
    """os.open that refuses a symbolic link at ``path`` (SymlinkRefused) instead of writing through it."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise SymlinkRefused(
                errno.ELOOP, f"{path!r} is a symbolic link, which convit-kernels did not make: not written through"
            ) from None
        raise


def _create_beside(path: str) -> tuple[int, str]:
    """(fd, name) of a new file beside ``path``, mode 0666 less the umask as open() makes (mkstemp's is 0600)."""
    folder, name = os.path.split(os.path.abspath(path))
    while True:
        tmp = os.path.join(folder, f".tmp-{name}.{secrets.token_hex(4)}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (where the OS can open a folder)."""
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class _WholeWrites(io.RawIOBase):
    """A file descriptor whose write() writes every byte or raises (a full disk: OSError ENOSPC).

    Python's buffered writer can report a short write there, which torch.save's zip writer turns into a
    RuntimeError ("unexpected pos") that says nothing of the disk.
    """

    def __init__(self, fd: int):
        self._fd = fd

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view, done = memoryview(data).cast("B"), 0
        while done < len(view):
            done += os.write(self._fd, view[done:])
        return done

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


@contextlib.contextmanager
def replacing(path: str, mode: str = "wb"):
    """A file to write in place of ``path``: a new file beside it, fsynced and renamed over ``path``.

    On any error the new file goes, ``path`` stays as it was (os.replace is atomic on POSIX) and the
    error propagates.
    """
    fd, tmp = _create_beside(path)
    try:
        raw = _WholeWrites(fd)
        binary = io.BufferedWriter(raw, 1 << 20)
        with binary if "b" in mode else io.TextIOWrapper(binary, encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(fd)
        os.replace(tmp, path)  # same folder: same file system
        fsync_folder(os.path.dirname(os.path.abspath(path)))
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str, text: str) -> None:
    """``path`` holds ``text``, whole (through :func:`replacing`)."""
    with replacing(path, "w") as f:
        f.write(text)
