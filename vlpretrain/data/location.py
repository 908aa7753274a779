"""Where a meta, annotation or media file lives: a local path or an object URL, one interface.

    text --Location.parse(text, relative_to, settings)--> LocalLocation | RemoteLocation
    root.join(value)                 a media path below its dataset root (a URL value: itself)
    location.open()                  seekable binary stream, also read by range (read_range)
    location.read_range(offset, length), read_all()
    location.info() -> ObjectInfo(size, version, is_dir); exists(), is_file(), is_dir()
    location.fingerprint() -> Fingerprint(digest, size)    what tells that the file changed
    location.is_under(root)          confinement (data.media_under_root)
    location.list_files()            what lies directly below a folder or prefix (frame folders)

This module is the one place that tells the two kinds apart; the rest of data/ holds a
`Location` and never asks which. A local path is read with os and the builtin file objects and
never reaches fsspec (a record read is one pread on a handle the process keeps open). A URL
(`scheme://...`, any installed fsspec protocol, file:// included) is read through data.remote:
per-process filesystems, every request under a timeout with bounded retries. Those settings
travel with the location (`settings`, not part of its equality) and pass to every location
joined to it, so the media of a dataset are read as its root was configured.

Errors name the location as the user wrote it. A missing file or object raises a
FileNotFoundError (data.remote.ObjectMissingError for objects), a folder or prefix where a file
is wanted an IsADirectoryError, and a remote request that kept failing RemoteReadError.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import stat
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Union

from vlpretrain.data import remote
from vlpretrain.data.remote import (
    DEFAULT_SETTINGS,
    ObjectInfo,
    ObjectMissingError,
    RemoteReadError,
    RemoteSettings,
)

__all__ = [
    "Fingerprint",
    "LocalLocation",
    "Location",
    "LocationStream",
    "ObjectInfo",
    "ObjectMissingError",
    "PathLike",
    "RemoteLocation",
    "RemoteReadError",
]

FINGERPRINT_BLOCK = 1 << 16
"""Bytes hashed at each end of a local file (or of an object without a version) for its
fingerprint."""
READ_ALL_CHUNK_BYTES = 1 << 23
"""read_all reads in ranges of this size: a dropped connection costs one chunk, not the file."""


@dataclass(frozen=True)
class Fingerprint:
    """What identifies one version of a file: the index cache is keyed by it."""

    digest: str
    """Hex sha256: of size, mtime_ns, inode, ctime_ns and the first and last
    FINGERPRINT_BLOCK bytes of a local file; of size and version (ETag) of an object, plus its
    first and last blocks when the backend reports no version."""
    size: int
    """Bytes of the file at the time of the fingerprint."""


class LocationStream(io.RawIOBase):
    """A seekable binary stream of one file that can also be read by range.

    `read_range` reads exactly [offset, offset + length) whatever the position: fewer bytes
    where the range passes the end of the file, but `offset` must lie inside it (an object
    store refuses a range that starts past the end); `size` is the length of the file.
    """

    @property
    def size(self) -> int:
        raise NotImplementedError

    def read_range(self, offset: int, length: int) -> bytes:
        raise NotImplementedError


class _LocalStream(io.FileIO, LocationStream):
    """A local file, unbuffered; read_range is os.pread (one system call, no seek)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "rb")

    @property
    def size(self) -> int:
        return os.fstat(self.fileno()).st_size

    def read_range(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fileno(), length, offset)
        while 0 < len(data) < length:  # fewer bytes: the end of the file, or a read above 2 GiB
            more = os.pread(self.fileno(), length - len(data), offset + len(data))
            if not more:
                break
            data += more
        return data


class _RemoteStream(LocationStream):
    """An object: every read is one ranged request (retried, under the timeout); the size is
    asked once, when a sequential read needs it (ranged reads never do)."""

    def __init__(self, url: str, settings: RemoteSettings) -> None:
        super().__init__()
        self._url = url
        self._settings = settings
        self._position = 0
        self._size: int | None = None

    @property
    def size(self) -> int:
        if self._size is None:
            info = remote.object_info(self._url, self._settings)
            if info.is_dir:
                raise IsADirectoryError(f"{self._url} is a prefix (folder), not an object")
            self._size = info.size
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position}.get(whence)
        self._position = max(0, offset + (self.size if base is None else base))
        return self._position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        stop = min(self._position + len(view), self.size)
        data = self.read_range(self._position, stop - self._position)
        view[: len(data)] = data
        self._position += len(data)
        return len(data)

    def readall(self) -> bytes:
        """The rest of the object in one ranged request (not io's many small reads)."""
        data = self.read_range(self._position, max(self.size - self._position, 0))
        self._position += len(data)
        return data

    def read_range(self, offset: int, length: int) -> bytes:
        return remote.read_range(self._url, offset, offset + length, self._settings)


def _is_url(text: str) -> bool:
    """True for `scheme://...` (file:// included: it still goes through fsspec)."""
    return "://" in text and text.split("://", 1)[0].isidentifier()


class Location(ABC):
    """A local file or folder, or an object or prefix named by URL; a frozen value."""

    settings: RemoteSettings
    """Timeout and retries of remote reads, of this location and of those joined to it."""

    @staticmethod
    def parse(
        text: PathLike,
        relative_to: Location | None = None,
        *,
        settings: RemoteSettings | None = None,
        current_directory_first: bool = False,
    ) -> Location:
        """The location `text` names: a URL for `scheme://...`, else a local path.

        Args:
            text: the path or URL as the user wrote it (a Location is returned as it is, with
                `settings` if given).
            relative_to: the folder or prefix a relative `text` is below (`relative_to.join`).
            settings: remote timeout and retries; None: those of `relative_to`, else defaults.
            current_directory_first: the meta file's path rule: `~` expanded, a relative path
                that exists in the current directory is taken from there (never below a URL
                `relative_to`), and local paths are made absolute with symlinks resolved.
        """
        if isinstance(text, Location):
            return text if settings is None else text.with_settings(settings)
        value = os.fspath(text)
        if settings is None:
            settings = DEFAULT_SETTINGS if relative_to is None else relative_to.settings
        if _is_url(value):
            return RemoteLocation(value, settings)
        path = Path(value)
        if current_directory_first:
            return _meta_rule(path.expanduser(), relative_to, settings)
        if relative_to is None:
            return LocalLocation(path.expanduser(), settings)
        return relative_to.join(value)

    @abstractmethod
    def __str__(self) -> str: ...

    @property
    @abstractmethod
    def name(self) -> str:
        """The last component (the file name)."""

    @property
    @abstractmethod
    def parent(self) -> Location:
        """The folder or prefix holding this location."""

    @property
    @abstractmethod
    def noun(self) -> str:
        """What a file is called here, for messages: 'file' or 'object'."""

    @property
    @abstractmethod
    def folder_noun(self) -> str:
        """What a folder is called here, for messages: 'folder' or 'prefix'."""

    def with_settings(self, settings: RemoteSettings) -> Location:
        """The same location, read with `settings`."""
        return replace(self, settings=settings)  # type: ignore[type-var]  # both are dataclasses

    @abstractmethod
    def join(self, relative: str) -> Location:
        """`relative` below this folder or prefix (a dataset root joining a media path); a
        URL `relative` stands for itself. Keeps this location's settings."""

    @abstractmethod
    def resolve(self) -> Location:
        """An absolute local path with symlinks resolved; a URL as it is."""

    @abstractmethod
    def open(self) -> LocationStream:
        """A seekable binary stream of the file (opened now; an object is read as it is
        consumed, each read one ranged request)."""

    @abstractmethod
    def info(self) -> ObjectInfo:
        """Size and kind (file or folder); FileNotFoundError if there is nothing."""

    @abstractmethod
    def fingerprint(self) -> Fingerprint:
        """What identifies this version of the file (see Fingerprint.digest)."""

    @abstractmethod
    def list_files(self) -> list[Location]:
        """What lies directly below this folder (every entry) or prefix (its objects)."""

    @abstractmethod
    def is_under(self, root: Location) -> bool:
        """True if this location stays inside `root`: a local path after symlinks are
        resolved (a link inside that points out leaves it), a URL by its root's prefix (the
        join resolved its ".." segments); a local path is never inside a URL, nor the reverse."""

    @abstractmethod
    def protocol_problem(self) -> str | None:
        """Why this location cannot be read on this machine (unknown protocol, package not
        installed), or None."""

    @abstractmethod
    def may_be_folder(self) -> bool:
        """False if this cannot be a dataset root: a local path that is no directory (object
        stores keep no folders to check: any URL prefix may be one)."""

    @abstractmethod
    def may_be_file(self) -> bool:
        """False if this is known, without a network request, not to be a file: a local path
        that is none (an object is checked when it is read)."""

    def read_range(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) (fewer at the end of the file; see LocationStream)."""
        with self.open() as stream:
            return stream.read_range(offset, length)

    def read_all(self) -> bytes:
        """The whole file, in ranges of READ_ALL_CHUNK_BYTES (each retried alone remotely)."""
        with self.open() as stream:
            size = stream.size
            return b"".join(
                stream.read_range(start, min(READ_ALL_CHUNK_BYTES, size - start))
                for start in range(0, size, READ_ALL_CHUNK_BYTES)
            )

    def exists(self) -> bool:
        try:
            self.info()
        except FileNotFoundError:
            return False
        return True

    def is_file(self) -> bool:
        try:
            return not self.info().is_dir
        except FileNotFoundError:
            return False

    def is_dir(self) -> bool:
        try:
            return self.info().is_dir
        except FileNotFoundError:
            return False


PathLike = Union[Location, str, "os.PathLike[str]"]
"""What entry points accept; Location.parse makes it a Location."""


def _meta_rule(path: Path, meta_dir: Location | None, settings: RemoteSettings) -> Location:
    """The meta file's path rule (Location.parse with current_directory_first)."""
    if path.is_absolute() or meta_dir is None:
        return LocalLocation(path.resolve(), settings)
    if isinstance(meta_dir, RemoteLocation):  # below a URL: never the current directory
        return meta_dir.join(str(path))
    if path.exists():
        return LocalLocation(path.resolve(), settings)
    return LocalLocation((Path(str(meta_dir)) / path).resolve(), settings)


@dataclass(frozen=True)
class LocalLocation(Location):
    """A path on this machine; read with os and builtin files, never through fsspec."""

    path: Path
    settings: RemoteSettings = field(default=DEFAULT_SETTINGS, compare=False, repr=False)

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def parent(self) -> LocalLocation:
        return LocalLocation(self.path.parent, self.settings)

    @property
    def noun(self) -> str:
        return "file"

    @property
    def folder_noun(self) -> str:
        return "folder"

    def join(self, relative: str) -> Location:
        if _is_url(relative):
            return RemoteLocation(relative, self.settings)
        return LocalLocation(self.path / relative, self.settings)

    def resolve(self) -> LocalLocation:
        return LocalLocation(self.path.resolve(), self.settings)

    def open(self) -> LocationStream:
        return _LocalStream(self.path)

    def info(self) -> ObjectInfo:
        status = self.path.stat()
        is_dir = stat.S_ISDIR(status.st_mode)
        return ObjectInfo(size=status.st_size, version=str(status.st_mtime_ns), is_dir=is_dir)

    def fingerprint(self) -> Fingerprint:
        # the formula index caches and checkpoints were written with: never change it
        status = self.path.stat()
        digest = hashlib.sha256(
            f"{status.st_size}:{status.st_mtime_ns}:{status.st_ino}:{status.st_ctime_ns}".encode()
        )
        with open(self.path, "rb") as handle:
            digest.update(handle.read(FINGERPRINT_BLOCK))
            if status.st_size > FINGERPRINT_BLOCK:
                handle.seek(max(FINGERPRINT_BLOCK, status.st_size - FINGERPRINT_BLOCK))
                digest.update(handle.read(FINGERPRINT_BLOCK))
        return Fingerprint(digest.hexdigest(), status.st_size)

    def list_files(self) -> list[Location]:
        return [LocalLocation(entry, self.settings) for entry in self.path.iterdir()]

    def is_under(self, root: Location) -> bool:
        if not isinstance(root, LocalLocation):
            return False
        return Path(os.path.realpath(self.path)).is_relative_to(os.path.realpath(root.path))

    def protocol_problem(self) -> str | None:
        return None

    def may_be_folder(self) -> bool:
        return self.path.is_dir()

    def may_be_file(self) -> bool:
        return self.path.is_file()

    # the fast paths of the base class's generic methods: one system call each
    def exists(self) -> bool:
        return self.path.exists()

    def is_file(self) -> bool:
        return self.path.is_file()

    def is_dir(self) -> bool:
        return self.path.is_dir()


@dataclass(frozen=True)
class RemoteLocation(Location):
    """An object or prefix named by URL, read through data.remote (fsspec)."""

    url: str
    """As the user wrote it (after joining), e.g. s3://bucket/images/a.jpg."""
    settings: RemoteSettings = field(default=DEFAULT_SETTINGS, compare=False, repr=False)

    def __str__(self) -> str:
        return self.url

    @property
    def protocol(self) -> str:
        return self.url.split("://", 1)[0]

    @property
    def name(self) -> str:
        return PurePosixPath(self.url.split("://", 1)[1]).name

    @property
    def parent(self) -> RemoteLocation:
        return RemoteLocation(self.url.rstrip("/").rsplit("/", 1)[0], self.settings)

    @property
    def noun(self) -> str:
        return "object"

    @property
    def folder_noun(self) -> str:
        return "prefix"

    def join(self, relative: str) -> RemoteLocation:
        """`relative` below this prefix, "." and ".." segments resolved (the reference
        concatenates root + value for s3:// roots; the "/" keeps names apart)."""
        if _is_url(relative):
            return RemoteLocation(relative, self.settings)
        protocol, rest = self.url.split("://", 1)
        joined = posixpath.normpath(rest.rstrip("/") + "/" + relative)
        return RemoteLocation(f"{protocol}://{joined}", self.settings)

    def resolve(self) -> RemoteLocation:
        return self

    def open(self) -> LocationStream:
        return _RemoteStream(self.url, self.settings)

    def info(self) -> ObjectInfo:
        return remote.object_info(self.url, self.settings)

    def fingerprint(self) -> Fingerprint:
        info = self.info()
        if info.is_dir:
            raise IsADirectoryError(f"{self.url} is a prefix (folder), not an object")
        digest = hashlib.sha256(f"{info.size}:{info.version}".encode())
        if not info.version:  # nothing else tells a rewrite apart: hash both ends
            digest.update(self.read_range(0, FINGERPRINT_BLOCK))
            tail = max(FINGERPRINT_BLOCK, info.size - FINGERPRINT_BLOCK)
            digest.update(self.read_range(tail, info.size - tail))
        return Fingerprint(digest.hexdigest(), info.size)

    def list_files(self) -> list[Location]:
        return [self.join(name) for name in remote.list_names(self.url, self.settings)]

    def is_under(self, root: Location) -> bool:
        if not isinstance(root, RemoteLocation):
            return False
        return self.url.startswith(root.url.rstrip("/") + "/")

    def protocol_problem(self) -> str | None:
        return remote.check_protocol(self.protocol)

    def may_be_folder(self) -> bool:
        return True

    def may_be_file(self) -> bool:
        return True
