"""Crash-safe file writes: whoever reads ``path`` finds the old file or the new one, whole.

A writer that opens ``path`` itself and is killed half-way (a job past its time limit, an
out-of-memory kill, a power cut) leaves a truncated file where the last good checkpoint
was. :func:`atomic_path` hands the writer a temporary name in the same directory instead;
only when the writer has returned is the file flushed to disk (``fsync``) and renamed onto
``path`` (``os.replace``, atomic on POSIX and Windows), and the directory entry is flushed
too. On an exception the temporary file is removed and ``path`` is untouched. A process
killed while writing leaves ``path`` untouched and a stray ``.<name>.<random>.tmp<ext>``
beside it, which nothing reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections.abc import Iterator

__all__ = ["atomic_path", "safetensors_header"]


def _fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (POSIX; Windows cannot open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:      # some file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _new_temp(directory: str, name: str) -> tuple[str, int]:
    """Create an empty temporary file for ``name`` in ``directory``; return its path and the
    mode a new file gets here (0o666 less the umask, which the kernel applies at creation)."""
    stem, ext = os.path.splitext(name)
    for _ in range(100):
        tmp = os.path.join(directory, f".{stem}.{secrets.token_hex(4)}.tmp{ext}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        return tmp, mode
    raise FileExistsError(f"could not create a temporary file next to {name!r} in {directory}")


@contextlib.contextmanager
def atomic_path(path) -> Iterator[str]:
    """Yield a temporary path for the writer; when the ``with`` block ends without an
    exception, put the written file in place of ``path`` (durably, atomically).

    ``path`` may be a ``str`` or ``os.PathLike``; a symbolic link is written through (its
    target is replaced), as opening the link would. The new file keeps the permission
    bits of the file it replaces, or gets the usual ones for a new file (whatever the
    writer, e.g. a library that creates private temporary files, left on it)::

        with atomic_path(path) as tmp:
            save_file(tensors, tmp)
    """
    target = os.path.realpath(os.fspath(path))
    directory, name = os.path.split(target)
    if os.path.isdir(target):
        raise IsADirectoryError(f"{os.fspath(path)!r} is a directory")
    tmp, mode = _new_temp(directory, name)
    try:
        with contextlib.suppress(FileNotFoundError):
            mode = stat.S_IMODE(os.stat(target).st_mode)
        yield tmp
        with open(tmp, "r+b") as f:     # the writer may have replaced the file: reopen it
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def safetensors_header(entries: list[tuple[str, str, list[int], int]], metadata: dict[str, str]) -> bytes:
    """The first bytes of a safetensors file whose tensors follow in the order of
    ``entries`` (``(name, dtype name such as "F32", shape, bytes)``), back to back: the
    8-byte little-endian length of the JSON header, then the header, padded with spaces
    to a multiple of 8 bytes. For writers that stream the data instead of holding it."""
    head: dict = {"__metadata__": metadata}
    at = 0
    for name, dtype, shape, nbytes in entries:
        head[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + nbytes]}
        at += nbytes
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text
