"""Read objects named by URL (s3://, gs://, http(s)://, any installed fsspec protocol): the
backend of data.location's RemoteLocation.

    url --object_info--> ObjectInfo(size, version)     (version: ETag, else modification time)
    url --read_range(url, start, stop, settings)--> bytes, each attempt under a timeout
    url --list_names--> [name]                         (a "folder" of video frames)

Only URLs come here: data.location reads local paths with os and builtin files and never
calls this module for them.

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
import time
from dataclasses import dataclass
from pathlib import PurePosixPath
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


def protocol_of(url: str) -> str:
    """The scheme of `url` (s3 for s3://bucket/key)."""
    return url.split("://", 1)[0]


def check_protocol(protocol: str) -> str | None:
    """None if fsspec can open `protocol`, else the reason (unknown, package missing)."""
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        return f"unknown protocol {protocol!r} (fsspec knows {', '.join(known_protocols())})"
    except ImportError as err:
        hint = " (pip install 'vlpretrain[s3]')" if protocol in ("s3", "s3a") else ""
        return f"protocol {protocol!r} needs a package that is not installed: {err}{hint}"
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


def _call(url: str, settings: RemoteSettings, method: str, *args: Any, **kwargs: Any) -> Any:
    """`fs.method(url, *args)` with the retry policy of the module docstring."""
    fs = filesystem(protocol_of(url), settings)
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


def object_info(url: str, settings: RemoteSettings = DEFAULT_SETTINGS) -> ObjectInfo:
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
    url: str, start: int, stop: int, settings: RemoteSettings = DEFAULT_SETTINGS
) -> bytes:
    """Bytes [start, stop) of the object (fewer at its end); one ranged request per attempt."""
    if stop <= start:
        return b""
    data = _call(url, settings, "cat_file", start=start, end=stop)
    return bytes(data)


def list_names(url: str, settings: RemoteSettings = DEFAULT_SETTINGS) -> list[str]:
    """Names of the objects directly below the prefix `url` (sub-prefixes left out)."""
    entries = _call(url, settings, "ls", detail=True)
    return [
        PurePosixPath(entry["name"]).name for entry in entries if entry.get("type") != "directory"
    ]
