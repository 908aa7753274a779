"""Split every dataset's record indices across (rank, dataloader worker) streams, per epoch.

Pure functions over ints and numpy arrays; no files, no process group, no torch.

    (seed, epoch, dataset_index) --permutation--> order of all records (same on every rank)
    order[stream_id :: num_streams]                --> this stream's share

A stream is one (rank, worker) pair; `stream_id = rank * num_workers + worker`. Shares are
disjoint, cover every record and differ in size by at most one (the reference drops
`len % world_size` records and never reshuffles; here every epoch has a new permutation).

After a resume on another number of streams (data.elastic) part of an epoch is already
consumed: `consumed` is a bool mask over the permutation's positions, and the streams split
what is left, in permutation order, the same strided way:

    order[~consumed][stream_id :: num_streams]     --> this stream's share of the rest

In a state file a mask is a zlib-compressed bitmap in base64 (`encode_mask`): at most one bit
per record however the consumed positions interleave, a few KiB when they form long runs.
States of version 2 stored half-open [start, stop) ranges instead (`from_ranges` reads them);
a strided resume leaves a run boundary every few records there, ~800 KiB per stream at 10M.
"""

from __future__ import annotations

import base64
import zlib
from typing import Any

import numpy as np


def workers_per_rank(num_workers: int) -> int:
    """Streams per rank: DataLoader `num_workers` 0 means the main process, i.e. one stream."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return max(1, num_workers)


def stream_count(world_size: int, num_workers: int) -> int:
    """Total number of streams (rank, worker) over the whole job."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return world_size * workers_per_rank(num_workers)


def stream_index(rank: int, world_size: int, worker: int, num_workers: int) -> int:
    """Global id of the (rank, worker) stream: rank * workers_per_rank + worker."""
    per_rank = workers_per_rank(num_workers)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    if not 0 <= worker < per_rank:
        raise ValueError(f"worker {worker} outside [0, {per_rank})")
    return rank * per_rank + worker


def epoch_permutation(num_records: int, seed: int, epoch: int, dataset_index: int) -> np.ndarray:
    """Order of all records of one dataset in one epoch; identical on every rank and worker."""
    rng = np.random.default_rng((seed, epoch, dataset_index))
    return rng.permutation(num_records).astype(np.int64)


def share_length(num_records: int, stream_id: int, num_streams: int) -> int:
    """Number of records in the share of `stream_id` (strided split, sizes differ by <= 1);
    after a resize, `num_records` is the number of positions left (see `num_left`)."""
    if stream_id >= num_records:
        return 0
    return (num_records - stream_id + num_streams - 1) // num_streams


def num_left(num_records: int, consumed: np.ndarray | None) -> int:
    """Positions of an epoch not yet consumed."""
    return num_records if consumed is None else num_records - int(np.count_nonzero(consumed))


def stream_share(
    num_records: int,
    seed: int,
    epoch: int,
    dataset_index: int,
    stream_id: int,
    num_streams: int,
    consumed: np.ndarray | None = None,
) -> np.ndarray:
    """Record indices one stream reads from one dataset in one epoch, in reading order;
    with `consumed`, its share of the positions left."""
    order = epoch_permutation(num_records, seed, epoch, dataset_index)
    if consumed is not None:
        return order[np.flatnonzero(~consumed)[stream_id::num_streams]]
    # A copy, not a strided view: a view keeps the whole permutation alive in every stream
    # (80 MiB per loader process at 10M records instead of its 1/num_streams share).
    return order[stream_id::num_streams].copy()


def mark_consumed(
    num_records: int, consumed: np.ndarray | None, num_streams: int, counts: list[int]
) -> np.ndarray:
    """The mask after stream s of `num_streams` has read the first `counts[s]` records of its
    share (of what `consumed` left)."""
    if len(counts) != num_streams:
        raise ValueError(f"need one count per stream ({num_streams}), got {len(counts)}")
    mask = np.zeros(num_records, dtype=bool) if consumed is None else consumed.copy()
    left = np.flatnonzero(~mask)
    for stream_id, count in enumerate(counts):
        share = left[stream_id::num_streams]
        if not 0 <= count <= len(share):
            raise ValueError(f"stream {stream_id} read {count} records of a share of {len(share)}")
        mask[share[:count]] = True
    return mask


def to_ranges(mask: np.ndarray) -> list[list[int]]:
    """[[start, stop), ...] of the True runs of a bool mask (JSON-able, readable)."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [[int(a), int(b)] for a, b in zip(starts, stops, strict=True)]


def from_ranges(ranges: list[list[int]], num_records: int) -> np.ndarray:
    """The bool mask of `to_ranges`; refuses ranges outside [0, num_records) or out of order."""
    mask = np.zeros(num_records, dtype=bool)
    previous = 0
    for pair in ranges:
        start, stop = (int(v) for v in pair)
        if not previous <= start < stop <= num_records:
            raise ValueError(
                f"consumed range {pair} is not sorted, empty or outside [0, {num_records})"
            )
        mask[start:stop] = True
        previous = stop
    return mask


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """A JSON-able form of a consumed mask: its length, its count of True positions (a check
    on decoding) and its bits packed 8 per byte, zlib-compressed, in base64."""
    packed = np.packbits(mask.astype(bool), bitorder="little").tobytes()
    return {
        "num_records": int(mask.size),
        "num_consumed": int(np.count_nonzero(mask)),
        "bitmap": base64.b64encode(zlib.compress(packed, 6)).decode("ascii"),
    }


def decode_mask(entry: dict[str, Any], num_records: int) -> np.ndarray:
    """The mask of `encode_mask` (or of a version-2 entry with "ranges"); refuses one whose
    length or count disagrees with what was written."""
    if "ranges" in entry:
        return from_ranges(entry["ranges"], num_records)
    if int(entry["num_records"]) != num_records:
        raise ValueError(
            f"consumed mask covers {entry['num_records']} records, the dataset has {num_records}"
        )
    try:
        packed = zlib.decompress(base64.b64decode(entry["bitmap"], validate=True))
    except (ValueError, zlib.error) as error:
        raise ValueError(f"consumed mask bitmap is not base64 zlib data: {error}") from None
    bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), bitorder="little")
    if bits.size != -(-num_records // 8) * 8:
        raise ValueError(f"consumed mask bitmap holds {bits.size} bits for {num_records} records")
    mask = bits[:num_records].astype(bool)
    if bits[num_records:].any() or int(np.count_nonzero(mask)) != int(entry["num_consumed"]):
        raise ValueError(
            f"consumed mask bitmap has {int(np.count_nonzero(bits))} positions set, "
            f"the state says {entry['num_consumed']}: the state file is damaged"
        )
    return mask
