"""Create files the way the user's shell would: permissions from the process umask, atomically;
read the user's own text files (configs) with one-line errors.

    write_atomic(target, write) : temp file in target's directory --write--> fsync --> chmod
                                  --> os.replace --> fsync of the directory
    apply_umask(path)           : give a file created 0600 by a library the umask's mode
    read_user_text(path, ...)   : UTF-8 text, or a ValueError naming the file and what is wrong

`tempfile.mkstemp` and safetensors (0.8) create files 0600, so
that a half-written file is private; once complete, the file gets `0o666 & ~umask` like any
file opened with `open(path, "w")`, so a shared cache or an exported model stays readable by
the group when the umask says so.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def process_umask() -> int:
    """The umask of this process, read without changing it where the OS allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode() -> int:
    """Mode of a new regular file under the process umask (0o644 under umask 022)."""
    return 0o666 & ~process_umask()


def apply_umask(path: str | Path) -> None:
    """chmod `path` to the mode a plain `open(path, 'w')` would have given it."""
    os.chmod(path, umask_mode())


def write_atomic(target: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write `target` through a temp file in its directory, then rename it into place.

    A killed process or a power cut leaves either the old file or the new one, never a
    truncated one: the data reaches the disk before the rename, and the rename before the
    return. The new file has the umask's permissions (not mkstemp's 0600).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            # without it a crash after the rename can leave the new name on an empty file
            os.fsync(handle.fileno())
        apply_umask(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_directory(target.parent)


def sync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (the entry lives in the directory's own blocks).

    Where directories cannot be opened or synced (Windows; some network filesystems answer
    EINVAL), the rename keeps the filesystem's own durability, as it did before.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def read_user_text(path: Path, expected: str) -> str:
    """The UTF-8 text of a file the user named (a stage TOML, a DeepSpeed JSON).

    Args:
        expected: what the file should be, for the message, e.g. "the stage's TOML file".

    Raises:
        ValueError: one line naming `path`: missing, a directory, unreadable or not UTF-8.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path} not found") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory; give {expected}") from None
    except OSError as error:
        raise ValueError(f"{path} cannot be read ({error.strerror}); give {expected}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        # the offset lets the user find the byte (an editor's Latin-1 save, a binary file)
        raise ValueError(
            f"{path} is not UTF-8 text (byte {data[error.start]:#04x} at offset {error.start}); "
            f"{expected} must be UTF-8: save it as UTF-8"
        ) from None
