"""Atomic file writes: a temporary file next to the destination, then a rename over it, so a crash or a
concurrent reader never sees a partial file and what the user had is kept until the new file is complete."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path


def _named(err: OSError, target: Path) -> OSError:
    """The same kind of error, naming the file the user asked for rather than our temporary name."""
    reason = err.strerror or str(err)
    new = type(err)(f"cannot write {target}: {reason}")
    new.errno = err.errno
    return new


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (its directory is created when missing).

    The temporary name is unique per process, so concurrent writers do not clobber each other's temporary.
    A path that exists but is not a regular file (a device such as /dev/null, a pipe, /dev/stdout) is written
    to directly: a rename would replace the device by a regular file. A symbolic link to a regular file is
    kept, and the file it points to is replaced.

    Raises:
        OSError: of the original kind, with a message that names `path`.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode  # follows links: /dev/stdout -> the pipe or file behind it
    except FileNotFoundError:
        mode = None
    except OSError as err:
        raise _named(err, path) from None
    if mode is not None and stat.S_ISDIR(mode):
        raise _named(IsADirectoryError(errno.EISDIR, "it is a directory"), path)
    if mode is not None and not stat.S_ISREG(mode):
        try:
            with open(path, "wb") as handle:
                handle.write(data)
        except OSError as err:
            raise _named(err, path) from None
        return
    real = Path(os.path.realpath(path))
    tmp = real.with_name(f".{real.name}.{os.getpid()}.tmp")
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, real)
    except OSError as err:
        raise _named(err, path) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` as UTF-8 to `path` atomically (see `write_bytes_atomic`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def replace_directory(dst: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Write a new directory `dst` with `write(folder)` and move it into place only once complete: until then
    `dst` keeps what it had, and a failure leaves no half-written output.

    A new `dst` is written beside it and renamed. An existing one is rebuilt from the inside (new files
    written into a hidden folder in it, the old entries moved aside into another, deleted last), so that
    every move stays on `dst`'s filesystem: `dst` may be a mount point, which cannot itself be renamed.
    """
    target = Path(os.path.realpath(dst))
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            write(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    tmp, old = target / f".new-{os.getpid()}.tmp", target / f".old-{os.getpid()}.tmp"
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        old.mkdir()
        previous = [p for p in target.iterdir() if p not in (tmp, old)]
        moved_in: list[Path] = []
        try:
            for path in previous:
                os.replace(path, old / path.name)
            for path in list(tmp.iterdir()):
                os.replace(path, target / path.name)
                moved_in.append(target / path.name)
        except BaseException:
            for path in moved_in:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            for path in list(old.iterdir()):
                os.replace(path, target / path.name)
            old.rmdir()  # only once empty: the user's files are never deleted on this path
            raise
        shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
