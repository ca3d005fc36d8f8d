"""Writing output files so that a failure never leaves a partial file behind."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from typing import IO, Any

from ptools.errors import BadInputError


def path_kind(path: str) -> str:
    """``file`` or ``folder``, else what the path is instead (a FIFO, a device, a symlink loop…),
    found without opening it: opening a FIFO would wait for a writer forever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken symlink" if os.path.islink(path) else "no such file"
    except OSError as failure:
        return f"cannot be read ({failure.strerror or failure})"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def require_regular_file(path: str, what: str = "file", hint: str | None = None) -> None:
    """Refuse anything but an existing regular file (or a symlink to one), without opening it.

    Raises:
        BadInputError: naming what the path is instead (with ``hint`` when it exists).
    """
    kind = path_kind(path)
    if kind == "no such file":
        raise BadInputError(f"{path}: no such file")
    if kind != "file":
        raise BadInputError(f"{path}: {kind}, not a {what}", hint)


def is_within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies below it, both after symlinks."""
    real, base = os.path.realpath(path), os.path.realpath(folder)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def size_on_disk(path: str) -> int:
    """Bytes of a file, or of the files directly in a folder; 0 for a path that is neither."""
    if os.path.isdir(path):
        return sum(os.path.getsize(entry.path) for entry in os.scandir(path) if entry.is_file())
    return os.path.getsize(path) if os.path.isfile(path) else 0


_TEMPORARY_SUFFIX = ".ptools-tmp"


def temporary_path(destination: str, directory: bool = False) -> str:
    """A new temporary file (or folder) beside ``destination``, hidden, ending ``.ptools-tmp``."""
    folder = os.path.dirname(os.path.abspath(destination))
    prefix = f".{os.path.basename(destination)}."
    try:
        if directory:
            return tempfile.mkdtemp(prefix=prefix, suffix=_TEMPORARY_SUFFIX, dir=folder)
        handle, path = tempfile.mkstemp(prefix=prefix, suffix=_TEMPORARY_SUFFIX, dir=folder)
    except OSError as failure:
        raise BadInputError(f"cannot write to folder {folder}: {failure.strerror or failure}") from None
    os.close(handle)
    return path


def stale_temporaries(destination: str) -> list[str]:
    """Temporary files (of :func:`temporary_path`) that an interrupted earlier run left beside
    ``destination``, or inside it when it is a folder; never removed silently: the user decides."""
    folder = os.path.dirname(os.path.abspath(destination))
    prefix = f".{os.path.basename(destination)}."
    places = [folder] + ([destination] if os.path.isdir(destination) else [])
    found = []
    for place in places:
        try:
            names = os.listdir(place)
        except OSError:
            continue
        found += [
            os.path.join(place, name)
            for name in names
            if name.endswith(_TEMPORARY_SUFFIX) and (place != folder or name.startswith(prefix))
        ]
    return sorted(found)


def fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (best effort where folders cannot be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_file(path: str, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` with ``write(handle)``, flushed and fsynced; OS errors become one line."""
    try:
        with open(path, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as failure:
        raise BadInputError(f"cannot write {path}: {failure.strerror or failure}") from None


def write_atomically(
    destination: str, write: Callable[[IO[bytes]], Any], check: Callable[[str], None] | None = None
) -> None:
    """Write to a temporary file beside ``destination``, ``check`` it, then rename it into place.

    On any failure or Ctrl-C the temporary file is removed and ``destination`` is untouched.
    """
    temporary = temporary_path(destination)
    try:
        write_file(temporary, write)
        if check is not None:
            check(temporary)
        os.chmod(temporary, 0o644)
        os.replace(temporary, destination)
        fsync_folder(os.path.dirname(os.path.abspath(destination)))
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def is_one_of(path: str, files: set[str]) -> bool:
    """Whether ``path`` is one of ``files`` (real paths): the same path after symlinks, or the
    same file through a hard link."""
    real = os.path.realpath(path)
    if real in files:
        return True
    if not os.path.exists(path):
        return False
    return any(os.path.exists(other) and os.path.samefile(path, other) for other in files)
