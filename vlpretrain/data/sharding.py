"""Split every dataset's record indices across (rank, dataloader worker) streams, per epoch.

Pure functions over ints and numpy arrays; no files, no process group, no torch.

    (seed, epoch, dataset_index) --permutation--> order of all records (same on every rank)
    order[stream_id :: num_streams]                --> this stream's share

A stream is one (rank, worker) pair; `stream_id = rank * num_workers + worker`. Shares are
disjoint, cover every record and differ in size by at most one (the reference drops
`len % world_size` records and never reshuffles; here every epoch has a new permutation).
"""

from __future__ import annotations

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
    """Number of records in the share of `stream_id` (strided split, sizes differ by <= 1)."""
    if stream_id >= num_records:
        return 0
    return (num_records - stream_id + num_streams - 1) // num_streams


def stream_share(
    num_records: int, seed: int, epoch: int, dataset_index: int, stream_id: int, num_streams: int
) -> np.ndarray:
    """Record indices one stream reads from one dataset in one epoch, in reading order."""
    order = epoch_permutation(num_records, seed, epoch, dataset_index)
    # A copy, not a strided view: a view keeps the whole permutation alive in every stream
    # (80 MiB per loader process at 10M records instead of its 1/num_streams share).
    return order[stream_id::num_streams].copy()
