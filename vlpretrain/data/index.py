"""Byte-offset index of a .jsonl annotation file, cached on disk.

    annotation.jsonl --build_line_index--> (offsets, line_numbers) int64 --cache--> .index
    AnnotationIndex.read(i) = seek(offsets[i]) + readline()

Indexing is one pass over blocks of CHUNK_BYTES, linear in the file size whatever its lines:
nothing of a block is kept but the state of the line still open at its end, so a file of one
1 GB line is scanned as fast as any other and never held in memory (reading that record later
reads at most max_record_bytes + 1 bytes of it).

Blank lines are skipped but the real 1-based line numbers are kept for error messages. The
cache lives in a cache directory (never next to the user's data) and is keyed by the absolute
path and a fingerprint of the file: size, mtime_ns, inode, ctime_ns and a hash of its first and
last FINGERPRINT_BLOCK bytes. Size + mtime alone miss a rewrite of the same size whose mtime
was restored (`cp -p`, `rsync -t`); the ctime cannot be restored by user tools and a new file
(rsync's rename) has a new inode.

The cache is verified before it is trusted: a 64-byte header (HEADER) holds the number of
records, the size of the indexed file and a checksum of the offsets and line numbers; a cache
that fails (0 bytes, truncated, zeroed offsets, out of order) is rebuilt with a warning naming
it. It is written to a temp file named after the builder's host and pid, fsynced, renamed into
place and the directory fsynced, with the umask's permissions; a later build removes the temp
files of builders that died (same host, pid gone) or that are older than a day (any host).

Reading checks that the byte before every indexed line start is a newline, so an index that
is stale anyway (the file changed during the run, or on a file system without reliable
ctimes) stops with AnnotationChangedError instead of returning pieces of other lines; and a
caller can bound the bytes read per record (`max_bytes`) before anything is parsed.

Remote annotation objects (a URL: s3://, gs://, https://, see data.remote) are indexed from
ranged reads of CHUNK_BYTES and cached in the same local directory, keyed by the URL and the
object's size and ETag (or the backend's version, or with neither a hash of the first and last
blocks). A record is then one ranged read, from the byte before its line (the newline check)
to the next indexed line; a read that keeps failing is a read_error skip naming the URL.

Cache directory: the `cache_dir` argument if given (data.cache_dir), else
`$VLPRETRAIN_CACHE/index`, else `~/.cache/vlpretrain/index`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import struct
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO

import numpy as np

from vlpretrain.data import remote
from vlpretrain.data.records import RecordError
from vlpretrain.data.remote import URL, Location, RemoteSettings

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 22
FINGERPRINT_BLOCK = 1 << 16
"""Bytes hashed at each end of an annotation file for its cache key."""
CACHE_SUFFIX = ".index"
CACHE_MAGIC = b"VLPIDX01"
HEADER = struct.Struct("<8sQQ32s8x")
"""Cache header (64 bytes): magic, number of records N, size of the indexed file, blake2b-256
of the (2, N) little-endian int64 array (offsets, then line numbers) that follows it."""
STALE_TEMP_SECONDS = 24 * 3600
"""A build's temp file this old is removed whatever host wrote it (no build takes a day)."""
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True


def default_cache_dir() -> Path:
    """Directory for index files when none is configured (see module docstring)."""
    env = os.environ.get("VLPRETRAIN_CACHE")
    if env:
        return Path(env).expanduser() / "index"
    return Path.home() / ".cache" / "vlpretrain" / "index"


class _LineScanner:
    """Line starts of a byte stream fed in blocks of any split, one pass, O(block) memory.

    Nothing of an earlier block is kept but the state of the line still open at its end
    (where it starts, whether it holds a non-whitespace byte yet), so a file of one 1 GB line
    costs what a file of a million short lines costs: each byte is looked at once.
    """

    def __init__(self) -> None:
        self.base = 0  # file offset of the next block
        self.line = 1  # 1-based number of the open line
        self.open_start = 0  # file offset of the open line
        self.open_content = False  # the open line holds a non-whitespace byte
        self.offsets: list[np.ndarray] = []
        self.numbers: list[np.ndarray] = []

    def feed(self, block: bytes) -> None:
        buf = np.frombuffer(block, dtype=np.uint8)
        content = ~_WHITESPACE[buf]
        ends = np.flatnonzero(buf == 10)  # the newline closing each line of this block
        if ends.size:
            starts = np.concatenate(([0], ends[:-1] + 1))
            # each closed line holds >= 1 byte (its newline), so reduceat gives "any content"
            has_content = np.logical_or.reduceat(content[: ends[-1] + 1], starts)
            has_content[0] |= self.open_content
            line_starts = starts.astype(np.int64) + self.base
            line_starts[0] = self.open_start  # the first one began in an earlier block
            numbers = np.arange(self.line, self.line + starts.size, dtype=np.int64)
            self.offsets.append(line_starts[has_content])
            self.numbers.append(numbers[has_content])
            self.line += starts.size
            self.open_start = self.base + int(ends[-1]) + 1
            self.open_content = bool(content[ends[-1] + 1 :].any())
        else:
            self.open_content = self.open_content or bool(content.any())
        self.base += buf.size

    def finish(self) -> np.ndarray:
        """(2, N) int64: line start offsets and 1-based line numbers of non-blank lines."""
        if self.open_content:  # a last line without trailing newline
            self.offsets.append(np.array([self.open_start], dtype=np.int64))
            self.numbers.append(np.array([self.line], dtype=np.int64))
        if not self.offsets:
            return np.zeros((2, 0), dtype=np.int64)
        return np.stack([np.concatenate(self.offsets), np.concatenate(self.numbers)])


def index_blocks(blocks: Iterable[bytes]) -> np.ndarray:
    """Index the file whose bytes arrive as `blocks` (any split); (2, N) int64 array: line
    start offsets and 1-based line numbers. Linear in the bytes, whatever the lines."""
    scanner = _LineScanner()
    for block in blocks:
        scanner.feed(block)
    return scanner.finish()


def build_line_index(path: str | Path) -> np.ndarray:
    """Scan the local file `path` once (see index_blocks)."""
    with open(path, "rb") as handle:
        return index_blocks(iter(lambda: handle.read(CHUNK_BYTES), b""))


class AnnotationChangedError(RuntimeError):
    """The annotation file no longer matches its index (it changed after indexing)."""


def file_fingerprint(path: Path) -> str:
    """Hex digest of size, mtime_ns, inode, ctime_ns and the first and last blocks of `path`."""
    stat = path.stat()
    digest = hashlib.sha256(
        f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}:{stat.st_ctime_ns}".encode()
    )
    with open(path, "rb") as handle:
        digest.update(handle.read(FINGERPRINT_BLOCK))
        if stat.st_size > FINGERPRINT_BLOCK:
            handle.seek(max(FINGERPRINT_BLOCK, stat.st_size - FINGERPRINT_BLOCK))
            digest.update(handle.read(FINGERPRINT_BLOCK))
    return digest.hexdigest()


def object_fingerprint(url: URL, settings: RemoteSettings) -> tuple[str, int]:
    """Hex digest of a remote object's size and version (ETag), and its size. Without any
    version from the backend, the first and last FINGERPRINT_BLOCK bytes are hashed too."""
    info = remote.object_info(url, settings)
    if info.is_dir:
        raise IsADirectoryError(f"{url} is a prefix (folder), not an annotation object")
    digest = hashlib.sha256(f"{info.size}:{info.version}".encode())
    if not info.version:
        digest.update(remote.read_range(url, 0, FINGERPRINT_BLOCK, settings))
        tail = max(FINGERPRINT_BLOCK, info.size - FINGERPRINT_BLOCK)
        digest.update(remote.read_range(url, tail, info.size, settings))
    return digest.hexdigest(), info.size


def cache_file(path: Location, cache_dir: Path, fingerprint: str | None = None) -> Path:
    """Cache file name for `path` in its current state: its absolute path or URL + its
    fingerprint (file_fingerprint for a local file, computed here unless given)."""
    path_key = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    if fingerprint is None:
        assert isinstance(path, Path), "remote objects pass their object_fingerprint"
        fingerprint = file_fingerprint(path)
    return cache_dir / f"{path.name}.{path_key}.{fingerprint[:16]}{CACHE_SUFFIX}"


class DamagedCacheError(ValueError):
    """An index cache file that fails verification (says what failed)."""


def _digest(index: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(index, dtype="<i8").data, digest_size=32).digest()


def _header(index: np.ndarray, size: int) -> bytes:
    return HEADER.pack(CACHE_MAGIC, int(index.shape[1]), size, _digest(index))


def _map_cache(target: Path) -> np.ndarray:
    """The (2, N) index in `target`, memory-mapped; its length checked against the header.

    Raises:
        DamagedCacheError: no valid header, or a file size that does not match it.
    """
    with open(target, "rb") as handle:
        head = handle.read(HEADER.size)
    if len(head) < HEADER.size or head[: len(CACHE_MAGIC)] != CACHE_MAGIC:
        raise DamagedCacheError(f"no index header ({len(head)} bytes)")
    num_records = HEADER.unpack(head)[1]
    expected = HEADER.size + 16 * num_records
    actual = target.stat().st_size
    if actual != expected:
        raise DamagedCacheError(
            f"{actual} bytes where a header of {num_records} records needs {expected}"
        )
    if num_records == 0:
        return np.zeros((2, 0), dtype=np.int64)
    return np.memmap(target, dtype="<i8", mode="r", offset=HEADER.size, shape=(2, num_records))


def _read_cache(target: Path, size: int) -> np.ndarray:
    """The verified index in `target`, for an annotation file of `size` bytes.

    Raises:
        DamagedCacheError: saying which check failed (header, length, checksum, order).
    """
    index = _map_cache(target)
    with open(target, "rb") as handle:
        _, num_records, indexed_size, digest = HEADER.unpack(handle.read(HEADER.size))
    if indexed_size != size:
        raise DamagedCacheError(f"it indexes {indexed_size} bytes, the file has {size}")
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


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (not every file system can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_cache(target: Path, index: np.ndarray, size: int) -> None:
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
    _fsync_directory(target.parent)


def _remove_stale(target: Path) -> None:
    """Delete cache files of earlier versions of the same annotation file (and .npy caches
    of the format before the verified one)."""
    prefix = target.name.rsplit(".", 2)[0]
    for pattern in (f"{prefix}.*{CACHE_SUFFIX}", f"{prefix}.*.npy"):
        for old in target.parent.glob(pattern):
            if old != target:
                old.unlink(missing_ok=True)


def _cached(target: Path, size: int) -> np.ndarray | None:
    """The verified index in `target`; None (with a warning naming it) if it is damaged."""
    if not target.is_file():
        return None
    try:
        return _read_cache(target, size)
    except (DamagedCacheError, OSError) as err:
        logger.warning("index cache %s is damaged (%s): rebuilding it", target, err)
        return None


def load_or_build_index(
    path: Location,
    cache_dir: Path | None,
    settings: RemoteSettings = remote.DEFAULT_SETTINGS,
) -> tuple[np.ndarray, Path | None, int]:
    """The (2, N) index of `path` (memory-mapped from a verified cache when possible), its
    cache file and the size of the file it indexes."""
    if isinstance(path, URL):
        fingerprint, size = object_fingerprint(path, settings)
        target = cache_file(path, cache_dir or default_cache_dir(), fingerprint)
    else:
        target, size = cache_file(path, cache_dir or default_cache_dir()), path.stat().st_size
    remove_leftover_temp_files(target.parent)
    cached = _cached(target, size)
    if cached is not None:
        return cached, target, size
    if isinstance(path, URL):
        blocks = (
            remote.read_range(path, start, min(start + CHUNK_BYTES, size), settings)
            for start in range(0, size, CHUNK_BYTES)
        )
        index = index_blocks(blocks)
    else:
        index = build_line_index(path)
    try:
        _write_cache(target, index, size)
        _remove_stale(target)
    except OSError as err:
        logger.warning("cannot write index cache %s (%s); keeping it in memory", target, err)
        return index, None, size
    logger.info("indexed %s: %d records -> %s", path, index.shape[1], target)
    return _map_cache(target), target, size


class AnnotationIndex:
    """Random access to the records of one .jsonl file or object; picklable, opens files
    lazily (a remote one through data.remote, one filesystem per process)."""

    def __init__(
        self,
        path: str | Path,
        cache_dir: str | Path | None = None,
        remote_settings: RemoteSettings = remote.DEFAULT_SETTINGS,
    ) -> None:
        location = remote.as_location(path)
        self.path: Location = location if isinstance(location, URL) else location.resolve()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.remote_settings = remote_settings
        self._index, self._cache, self._size = load_or_build_index(
            self.path, self.cache_dir, remote_settings
        )
        self._handle: IO[bytes] | None = None
        self._pid = -1

    def __len__(self) -> int:
        return int(self._index.shape[1])

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_handle"] = None
        if self._cache is not None:  # workers re-map the cache file instead of copying it
            state["_index"] = None
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        if self._index is None:
            self._index = _map_cache(self._cache)

    def line_number(self, i: int) -> int:
        """1-based line number in the file of record `i`."""
        return int(self._index[1, i])

    def _changed(self, i: int, offset: int) -> AnnotationChangedError:
        return AnnotationChangedError(
            f"{self.path}: line {self.line_number(i)} no longer starts at byte {offset}"
            " of its index: the file changed after it was indexed. Restart the job so"
            " it is indexed again (and keep annotation files unchanged during a run)."
        )

    def read(self, i: int, max_bytes: int | None = None) -> bytes:
        """Raw bytes of record `i` (without the line terminator); decoding is the caller's.

        Raises:
            RecordError: too_long when the record holds more than `max_bytes` bytes (only
                max_bytes + 1 bytes are read); read_error when a remote read kept failing.
            AnnotationChangedError: the indexed offset is no longer a line start.
        """
        if isinstance(self.path, URL):
            record = self._read_remote(i, max_bytes)
        else:
            record = self._read_local(i, max_bytes)
        if max_bytes is not None and len(record) > max_bytes:
            raise RecordError(
                "too_long",
                f"record is more than data.max_record_bytes = {max_bytes} bytes "
                "(refused before parsing)",
            )
        return record

    def _read_local(self, i: int, max_bytes: int | None) -> bytes:
        if self._handle is None or self._pid != os.getpid():
            self._handle = open(self.path, "rb")  # noqa: SIM115 - kept open for the process
            self._pid = os.getpid()
        offset = int(self._index[0, i])
        if offset > 0:
            self._handle.seek(offset - 1)
            if self._handle.read(1) != b"\n":
                raise self._changed(i, offset)
        else:
            self._handle.seek(0)
        line = self._handle.readline(-1 if max_bytes is None else max_bytes + 1)
        return line.rstrip(b"\r\n")

    def _read_remote(self, i: int, max_bytes: int | None) -> bytes:
        """One ranged read: from the byte before the line (the newline check) to the next
        indexed line start (or the object's end), at most max_bytes + 1 bytes of the line."""
        assert isinstance(self.path, URL)
        offset = int(self._index[0, i])
        stop = int(self._index[0, i + 1]) if i + 1 < len(self) else self._size
        if max_bytes is not None:
            stop = min(stop, offset + max_bytes + 1)
        first = max(offset - 1, 0)
        try:
            data = remote.read_range(self.path, first, stop, self.remote_settings)
        except OSError as err:  # RemoteReadError, or the object is gone
            raise RecordError("read_error", f"{self.path}: {err}") from err
        if offset > 0:
            if data[:1] != b"\n":
                raise self._changed(i, offset)
            data = data[1:]
        return data.split(b"\n", 1)[0].rstrip(b"\r")
