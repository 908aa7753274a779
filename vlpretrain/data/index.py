"""Byte-offset index of a .jsonl annotation file, cached on disk.

    annotation.jsonl --build_line_index--> (offsets, line_numbers) int64 --cache--> .index
    AnnotationIndex.read(i) = seek(offsets[i]) + readline()

Indexing is one pass over blocks of CHUNK_BYTES, linear in the file size whatever its lines:
nothing of a block is kept but the state of the line still open at its end, so a file of one
1 GB line is scanned as fast as any other and never held in memory (reading that record later
reads at most max_record_bytes + 1 bytes of it).

Blank lines are skipped but the real 1-based line numbers are kept for error messages. The
cache lives in a cache directory (never next to the user's data) and is keyed by the absolute
path and a fingerprint of the file (data.location's Fingerprint): size, mtime_ns, inode,
ctime_ns and a hash of its first and last 64 KiB. Size + mtime alone miss a rewrite of the
same size whose mtime was restored (`cp -p`, `rsync -t`); the ctime cannot be restored by
user tools and a new file (rsync's rename) has a new inode.

The cache file (its format, its verification before use, its durable write and the clean-up
of killed builds' temp files) is data.index_cache's; a cache that fails verification is
rebuilt here, with a warning naming it.

Reading checks that the byte before every indexed line start is a newline, so an index that
is stale anyway (the file changed during the run, or on a file system without reliable
ctimes) stops with AnnotationChangedError instead of returning pieces of other lines; and a
caller can bound the bytes read per record (`max_bytes`) before anything is parsed.

Remote annotation objects (a URL: s3://, gs://, https://, see data.location) are indexed the
same way and cached in the same local directory, keyed by the URL and the object's size and
ETag (or the backend's version, or with neither a hash of the first and last blocks): the
fingerprint is the Location's. Every file is read by ranges through its Location: indexing in
ranges of CHUNK_BYTES, a record in one range, from the byte before its line (the newline
check) to the next indexed line (a local file: one pread on a handle the process keeps open;
an object: one ranged request). A remote read that keeps failing is a read_error skip naming
the URL.

Cache directory: the `cache_dir` argument if given (data.cache_dir), else
`$VLPRETRAIN_CACHE/index`, else `~/.cache/vlpretrain/index`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from vlpretrain.data import index_cache, remote
from vlpretrain.data.location import (
    Fingerprint,
    Location,
    LocationStream,
    ObjectMissingError,
    PathLike,
    RemoteReadError,
)
from vlpretrain.data.records import RecordError
from vlpretrain.data.remote import RemoteSettings
from vlpretrain.errors import RefusedError

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 22
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


def _blocks(stream: LocationStream, size: int) -> Iterator[bytes]:
    """The first `size` bytes of `stream`, in ranged reads of CHUNK_BYTES."""
    chunk = CHUNK_BYTES  # read at call time: tests shrink it
    for start in range(0, size, chunk):
        yield stream.read_range(start, min(chunk, size - start))


def build_line_index(path: PathLike, size: int | None = None) -> np.ndarray:
    """Scan the file or object `path` once (see index_blocks); its first `size` bytes if
    given (the size its fingerprint saw), else all of them."""
    with Location.parse(path).open() as stream:
        return index_blocks(_blocks(stream, stream.size if size is None else size))


class AnnotationChangedError(RefusedError, RuntimeError):
    """The annotation file no longer matches its index (it changed after indexing)."""


def cache_file(path: PathLike, cache_dir: Path, fingerprint: Fingerprint | None = None) -> Path:
    """Cache file name for `path` in its current state: its absolute path or URL + its
    fingerprint (computed here unless given)."""
    location = Location.parse(path)
    path_key = hashlib.sha256(str(location).encode()).hexdigest()[:16]
    digest = (fingerprint or location.fingerprint()).digest
    return cache_dir / f"{location.name}.{path_key}.{digest[:16]}{index_cache.CACHE_SUFFIX}"


def _cached(target: Path, size: int) -> np.ndarray | None:
    """The verified index in `target`; None (with a warning naming it) if it is damaged."""
    if not target.is_file():
        return None
    try:
        return index_cache.read_cache(target, size)
    except (index_cache.DamagedCacheError, OSError) as err:
        logger.warning("index cache %s is damaged (%s): rebuilding it", target, err)
        return None


def load_or_build_index(
    path: Location, cache_dir: Path | None
) -> tuple[np.ndarray, Path | None, int]:
    """The (2, N) index of `path` (memory-mapped from a verified cache when possible), its
    cache file and the size of the file it indexes."""
    fingerprint = path.fingerprint()
    size = fingerprint.size
    target = cache_file(path, cache_dir or default_cache_dir(), fingerprint)
    index_cache.remove_leftover_temp_files(target.parent)
    cached = _cached(target, size)
    if cached is not None:
        return cached, target, size
    index = build_line_index(path, size)
    try:
        index_cache.write_cache(target, index, size)
        index_cache.remove_stale(target)
    except OSError as err:
        logger.warning("cannot write index cache %s (%s); keeping it in memory", target, err)
        return index, None, size
    logger.info("indexed %s: %d records -> %s", path, index.shape[1], target)
    return index_cache.map_cache(target), target, size


class AnnotationIndex:
    """Random access to the records of one .jsonl file or object; picklable, opens its file
    lazily, once per process (a remote one's filesystem too: data.remote)."""

    def __init__(
        self,
        path: PathLike,
        cache_dir: str | Path | None = None,
        remote_settings: RemoteSettings = remote.DEFAULT_SETTINGS,
    ) -> None:
        self.path = Location.parse(path, settings=remote_settings).resolve()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self._index, self._cache, self._size = load_or_build_index(self.path, self.cache_dir)
        self._stream: LocationStream | None = None
        self._pid = -1

    def __len__(self) -> int:
        return int(self._index.shape[1])

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_stream"] = None
        if self._cache is not None:  # workers re-map the cache file instead of copying it
            state["_index"] = None
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        if self._index is None:
            self._index = index_cache.map_cache(self._cache)

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
        record = self._read_line(i, max_bytes)
        if max_bytes is not None and len(record) > max_bytes:
            raise RecordError(
                "too_long",
                f"record is more than data.max_record_bytes = {max_bytes} bytes "
                "(refused before parsing)",
            )
        return record

    def _open(self) -> LocationStream:
        """This process's stream of the file (kept open: a record costs one ranged read)."""
        if self._stream is None or self._pid != os.getpid():
            self._stream = self.path.open()
            self._pid = os.getpid()
        return self._stream

    def _read_line(self, i: int, max_bytes: int | None) -> bytes:
        """One ranged read: from the byte before the line (the newline check) to the next
        indexed line start (or the file's end), at most max_bytes + 1 bytes of the line."""
        # Two element reads: a slice of a memory-mapped index would build a memmap view (slow).
        offset = int(self._index[0, i])
        stop = int(self._index[0, i + 1]) if i + 1 < self._index.shape[1] else self._size
        if max_bytes is not None:
            stop = min(stop, offset + max_bytes + 1)
        first = max(offset - 1, 0)
        try:
            data = self._open().read_range(first, stop - first)
        except (RemoteReadError, ObjectMissingError) as err:  # the object is gone or unreachable
            raise RecordError("read_error", f"{self.path}: {err}") from err
        if offset > 0:
            if data[:1] != b"\n":
                raise self._changed(i, offset)
            data = data[1:]
        return data.split(b"\n", 1)[0].rstrip(b"\r")
