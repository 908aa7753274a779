"""The on-disk cache of an annotation index: verified before it is trusted, written durably.

    (2, N) int64 index --write_cache--> temp file --fsync--> os.replace --> cache file
    cache file --read_cache (header, length, checksum, order)--> memory-mapped index
                                        | fails: DamagedCacheError (the caller rebuilds)

A cache file is a 64-byte HEADER (magic, number of records N, size of the indexed file,
blake2b-256 of the array) followed by the (2, N) little-endian int64 array: line start offsets,
then 1-based line numbers. The checksum catches what a crash or a bad disk leaves (zeroed
blocks: every record would read back as line 1), the header and length a 0-byte or truncated
file. A build writes a temp file named after its host and pid, fsyncs it, renames it into
place and fsyncs the directory, so after a crash the cache is whole or absent; the temp files
of builds that died (same host, pid gone) or that are older than a day (any host) are removed
by the next build. What the cache is keyed by, and indexing itself, are data.index's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import struct
import time
from pathlib import Path

import numpy as np

from vlpretrain.files import sync_directory

logger = logging.getLogger(__name__)

CACHE_SUFFIX = ".index"
CACHE_MAGIC = b"VLPIDX01"
HEADER = struct.Struct("<8sQQ32s8x")
"""Cache header (64 bytes): magic, number of records N, size of the indexed file, blake2b-256
of the (2, N) little-endian int64 array (offsets, then line numbers) that follows it."""
STALE_TEMP_SECONDS = 24 * 3600
"""A build's temp file this old is removed whatever host wrote it (no build takes a day)."""


class DamagedCacheError(ValueError):
    """An index cache file that fails verification (says what failed)."""


def _digest(index: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(index, dtype="<i8").data, digest_size=32).digest()


def _header(index: np.ndarray, size: int) -> bytes:
    return HEADER.pack(CACHE_MAGIC, int(index.shape[1]), size, _digest(index))


def _cache_header(target: Path) -> tuple[int, int, bytes]:
    """(records, size of the indexed file, digest) from the header of the cache `target`.

    Raises:
        DamagedCacheError: no valid header, or a file length that does not match it.
    """
    with open(target, "rb") as handle:
        head = handle.read(HEADER.size)
    if len(head) < HEADER.size or head[: len(CACHE_MAGIC)] != CACHE_MAGIC:
        raise DamagedCacheError(f"no index header ({len(head)} bytes)")
    _, num_records, indexed_size, digest = HEADER.unpack(head)
    expected = HEADER.size + 16 * num_records
    actual = target.stat().st_size
    if actual != expected:
        raise DamagedCacheError(
            f"{actual} bytes where a header of {num_records} records needs {expected}"
        )
    return num_records, indexed_size, digest


def _map_records(target: Path, num_records: int) -> np.ndarray:
    if num_records == 0:
        return np.zeros((2, 0), dtype=np.int64)
    mapped = np.memmap(target, dtype="<i8", mode="r", offset=HEADER.size, shape=(2, num_records))
    # A plain ndarray over the same mapped pages: np.memmap's Python-level __getitem__ costs
    # about a microsecond per element read, and a record read does two.
    return np.asarray(mapped)


def map_cache(target: Path) -> np.ndarray:
    """The (2, N) index in `target`, memory-mapped; its length checked against the header
    (loader workers re-map a cache their parent verified)."""
    return _map_records(target, _cache_header(target)[0])


def read_cache(target: Path, size: int) -> np.ndarray:
    """The verified index in `target`, for an annotation file of `size` bytes.

    Raises:
        DamagedCacheError: saying which check failed (header, length, checksum, order).
    """
    num_records, indexed_size, digest = _cache_header(target)
    if indexed_size != size:
        raise DamagedCacheError(f"it indexes {indexed_size} bytes, the file has {size}")
    index = _map_records(target, num_records)
    if _digest(index) != digest:
        raise DamagedCacheError(f"the checksum of its {num_records} offsets does not match")
    offsets, numbers = index
    in_order = bool((np.diff(offsets) > 0).all() and (np.diff(numbers) > 0).all())
    if num_records and not (in_order and offsets[0] >= 0 and offsets[-1] < size):
        raise DamagedCacheError("its offsets are not increasing line starts inside the file")
    return index


def _host_key() -> str:
    """This machine in temp file names (hash of the host name: names may hold dots)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_name(target: Path, pid: int, host_key: str | None = None) -> str:
    """Name of the temp file a process builds `target` in: `.{target}.{host}.{pid}.{nonce}.tmp`,
    so a later build can tell a dead builder's leftovers from a running one's."""
    nonce = os.urandom(4).hex()
    return f".{target.name}.{host_key or _host_key()}.{pid}.{nonce}.tmp"


_TEMP_PATTERN = re.compile(r"^\..+\.(?P<host>[0-9a-f]{8})\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _leftover(path: Path, host: str, now: float) -> bool:
    """True for a temp file of a build that will never finish: its process on this host is
    gone, or (any host) it is older than STALE_TEMP_SECONDS."""
    match = _TEMP_PATTERN.match(path.name)
    if match is None:
        return False
    if match["host"] == host and not _process_alive(int(match["pid"])):
        return True
    try:
        return now - path.stat().st_mtime > STALE_TEMP_SECONDS
    except FileNotFoundError:  # its builder renamed it into place meanwhile
        return False


def remove_leftover_temp_files(cache_dir: Path) -> None:
    """Delete the temp files that killed builds left in `cache_dir` (each the full size of an
    index: a cache directory shared by many jobs would fill up otherwise)."""
    if not cache_dir.is_dir():
        return
    host, now = _host_key(), time.time()
    for path in cache_dir.glob(".*.tmp"):
        if _leftover(path, host, now):
            logger.info("removing %s, left by a killed index build", path)
            path.unlink(missing_ok=True)


def write_cache(target: Path, index: np.ndarray, size: int) -> None:
    """Header + offsets to a temp file, fsync, rename into place, fsync the directory: after a
    crash the cache is whole or absent, never renamed with blocks the disk never got (a file
    of zeros). The file gets the umask's permissions (open, not mkstemp)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / temp_name(target, os.getpid())
    try:
        with open(temp, "xb") as handle:
            handle.write(_header(index, size))
            handle.write(np.ascontiguousarray(index, dtype="<i8").tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    sync_directory(target.parent)


def remove_stale(target: Path) -> None:
    """Delete cache files of earlier versions of the same annotation file (and .npy caches
    of the format before the verified one)."""
    prefix = target.name.rsplit(".", 2)[0]
    for pattern in (f"{prefix}.*{CACHE_SUFFIX}", f"{prefix}.*.npy"):
        for old in target.parent.glob(pattern):
            if old != target:
                old.unlink(missing_ok=True)
