"""Read objects named by URL (s3://, gs://, http(s)://, any installed fsspec protocol).

    "s3://bucket/a.jsonl" --as_location--> URL
    URL --object_info--> ObjectInfo(size, version)     (version: ETag, else modification time)
    URL --read_range(url, start, stop, settings)--> bytes, each attempt under a timeout
    URL --list_files--> [URL]                          (a "folder" of video frames)

Only URLs come here: local paths keep their own fast code (data.index's file handle and
offsets, Pillow and PyAV reading the file), and `as_location` keeps them `Path`s.

Credentials and endpoints are each backend's own business; vlpretrain adds no setting of its
own. s3fs (botocore) reads the AWS_* variables and ~/.aws (AWS_ENDPOINT_URL points it at an
S3-compatible store such as Ceph or MinIO), gcsfs Google's application-default credentials,
and fsspec's FSSPEC_<PROTOCOL>_<OPTION> variables or config files set any other option.

Processes: a filesystem is made lazily, one per (process, protocol), and never inherited over
fork. A DataLoader worker makes its own on its first read: an s3fs client and its event loop
do not survive a fork.

Failures: a missing object raises ObjectMissingError (a FileNotFoundError). Any other failure
is retried up to `settings.retries` times with doubling back-off, every attempt bounded by
`settings.timeout_seconds` (enforced by fsspec around the whole request for asynchronous
backends: s3, gcs, http, azure; others use their own timeouts), then raises RemoteReadError
naming the URL. A dropped connection or a stalled server therefore costs a bounded time and
never hangs the loader.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
from fsspec.asyn import AsyncFileSystem

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 30.0
"""Longest one request (one ranged read, one metadata call) may take."""
DEFAULT_RETRIES = 3
"""Attempts after the first one for a failed request."""
BACKOFF_SECONDS = 0.25
"""Wait before the first retry; doubled before every further one (capped at 8 s)."""


class URL(str):
    """A path that names an object through a protocol (`s3://bucket/key`); never a local path.

    Kept a `str` so that records, sources and error messages print it as the user wrote it.
    """

    @property
    def protocol(self) -> str:
        return self.split("://", 1)[0]

    @property
    def name(self) -> str:
        """Last component of the key (the file name)."""
        return PurePosixPath(self.split("://", 1)[1]).name

    @property
    def parent(self) -> URL:
        """The URL of the "folder" holding this object."""
        return URL(self.rstrip("/").rsplit("/", 1)[0])

    def __truediv__(self, relative: str) -> URL:
        """`relative` below this URL (as Path's `/`), "." and ".." segments resolved."""
        protocol, rest = self.split("://", 1)
        return URL(f"{protocol}://{posixpath.normpath(rest.rstrip('/') + '/' + relative)}")

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return URL, (str(self),)


Location = Path | URL
"""Where a meta file, annotation file or media file lives."""


def is_url(value: str | Path) -> bool:
    """True for `scheme://...` strings (file:// included: it still goes through fsspec)."""
    return isinstance(value, str) and "://" in value and value.split("://", 1)[0].isidentifier()


def as_location(value: str | Path) -> Location:
    """A URL for `scheme://...`, otherwise a local Path (user directory expanded)."""
    if isinstance(value, URL):
        return value
    if is_url(value):
        return URL(str(value))
    return Path(value).expanduser()


def check_protocol(url: URL) -> str | None:
    """None if fsspec can open `url`'s protocol, else the reason (unknown, package missing)."""
    try:
        fsspec.get_filesystem_class(url.protocol)
    except ValueError:
        return f"unknown protocol {url.protocol!r} (fsspec knows {', '.join(known_protocols())})"
    except ImportError as err:
        hint = " (pip install 'vlpretrain[s3]')" if url.protocol in ("s3", "s3a") else ""
        return f"protocol {url.protocol!r} needs a package that is not installed: {err}{hint}"
    return None


def known_protocols() -> list[str]:
    """Protocols fsspec can name (their backends may still be missing)."""
    return sorted(fsspec.available_protocols())


@dataclass(frozen=True)
class RemoteSettings:
    """Per-request timeout and retries of remote reads (SampleConfig.remote_* fields)."""

    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    """Bound on one request."""
    retries: int = DEFAULT_RETRIES
    """Attempts after the first one."""
    backoff_seconds: float = BACKOFF_SECONDS
    """Wait before the first retry (doubled each time)."""


DEFAULT_SETTINGS = RemoteSettings()


class ObjectMissingError(FileNotFoundError):
    """No object at the URL."""


class RemoteReadError(OSError):
    """A request failed on every attempt (or cannot succeed: access denied)."""


@dataclass(frozen=True)
class ObjectInfo:
    """What identifies one version of an object."""

    size: int
    """Bytes."""
    version: str
    """ETag (or generation / md5 / modification time where the backend has no ETag); "" if
    the backend reports none of them."""
    is_dir: bool = False
    """A prefix ("folder"), not an object."""


_FILESYSTEMS: dict[tuple[int, str, float], fsspec.AbstractFileSystem] = {}
"""(pid, protocol, timeout_seconds) -> filesystem; retries are ours, so they are not a key."""


def _backend_options(protocol: str, settings: RemoteSettings) -> dict[str, Any]:
    """Backend options that bound each request by our timeout and leave retrying to us."""
    if protocol in ("s3", "s3a"):
        timeout = settings.timeout_seconds
        return {
            "config_kwargs": {
                "connect_timeout": timeout,
                "read_timeout": timeout,
                "retries": {"max_attempts": 1},  # botocore's own retries
            },
        }
    return {}


def filesystem(protocol: str, settings: RemoteSettings) -> fsspec.AbstractFileSystem:
    """This process's filesystem for `protocol` (made on first use; never one from before a
    fork)."""
    key = (os.getpid(), protocol, settings.timeout_seconds)
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        if any(pid != key[0] for pid, _, _ in _FILESYSTEMS):  # forked: drop the parent's
            _FILESYSTEMS.clear()
        fs = fsspec.filesystem(
            protocol, skip_instance_cache=True, **_backend_options(protocol, settings)
        )
        if protocol in ("s3", "s3a"):
            fs.retries = 1  # S3FileSystem's own retry loop (its `retries`): ours replaces it
        _FILESYSTEMS[key] = fs
    return fs


PROGRAMMING_ERRORS = (TypeError, AttributeError, NameError, AssertionError, ImportError,
                      NotImplementedError)  # fmt: skip
"""Raised at once, never retried: a bug or a misconfigured backend, not a flaky network."""


def _attempt(fs: fsspec.AbstractFileSystem, method: str, settings: RemoteSettings, *args: Any,
             **kwargs: Any) -> Any:  # fmt: skip
    if isinstance(fs, AsyncFileSystem):  # fsspec's sync wrapper cancels the call on timeout
        kwargs["timeout"] = settings.timeout_seconds
    return getattr(fs, method)(*args, **kwargs)


def _call(url: URL, settings: RemoteSettings, method: str, *args: Any, **kwargs: Any) -> Any:
    """`fs.method(url, *args)` with the retry policy of the module docstring."""
    fs = filesystem(url.protocol, settings)
    last: BaseException | None = None
    for attempt in range(settings.retries + 1):
        if attempt:
            time.sleep(min(settings.backoff_seconds * 2 ** (attempt - 1), 8.0))
        try:
            return _attempt(fs, method, settings, url, *args, **kwargs)
        except FileNotFoundError as err:
            raise ObjectMissingError(f"no object {url}") from err
        except PermissionError as err:
            raise RemoteReadError(f"{url}: access denied: {err}") from err
        except PROGRAMMING_ERRORS:
            raise
        # backends raise many types (botocore, aiohttp, fsspec's timeout, OSError): all retried
        except Exception as err:  # noqa: BLE001
            last = err
            logger.debug("%s: %s failed (attempt %d): %r", url, method, attempt + 1, err)
    attempts = settings.retries + 1
    raise RemoteReadError(
        f"{url}: {method} failed {attempts} time(s), each with a {settings.timeout_seconds:g} s "
        f"timeout (data.remote_retries, data.remote_timeout_seconds); last error: "
        f"{type(last).__name__}: {last}"
    ) from last


def object_info(url: URL, settings: RemoteSettings = DEFAULT_SETTINGS) -> ObjectInfo:
    """Size and version of the object at `url`.

    Raises:
        ObjectMissingError: nothing there. RemoteReadError: the request kept failing.
    """
    info = _call(url, settings, "info")
    version = ""
    for key in ("ETag", "etag", "generation", "md5Hash", "md5", "LastModified", "mtime",
                "last_modified", "updated", "Last-Modified"):  # fmt: skip
        if info.get(key):
            version = f"{key}={info[key]}"
            break
    is_dir = info.get("type") == "directory"
    return ObjectInfo(size=int(info.get("size") or 0), version=version, is_dir=is_dir)


def read_range(
    url: URL, start: int, stop: int, settings: RemoteSettings = DEFAULT_SETTINGS
) -> bytes:
    """Bytes [start, stop) of the object (fewer at its end); one ranged request per attempt."""
    if stop <= start:
        return b""
    data = _call(url, settings, "cat_file", start=start, end=stop)
    return bytes(data)


def read_all(url: URL, size: int, settings: RemoteSettings = DEFAULT_SETTINGS,
             chunk_bytes: int = 1 << 23) -> bytes:  # fmt: skip
    """The whole object of `size` bytes, in ranged reads of `chunk_bytes` (each retried alone,
    so a dropped connection costs one chunk, not the object)."""
    return b"".join(
        read_range(url, start, min(start + chunk_bytes, size), settings)
        for start in range(0, size, chunk_bytes)
    )


def list_files(url: URL, settings: RemoteSettings = DEFAULT_SETTINGS) -> list[URL]:
    """Objects directly below the prefix `url`, as URLs of the same protocol."""
    entries = _call(url, settings, "ls", detail=True)
    return [
        url / PurePosixPath(entry["name"]).name
        for entry in entries
        if entry.get("type") != "directory"
    ]
