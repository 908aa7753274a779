"""Resume a data stream saved at W ranks x K workers on W' x K': re-deal what is left.

Every saved stream state (data.loader.WorkerStream.state_dict) says, per dataset, in which
epoch its mixer is and how many records of its share it has read. With the saved layout's
own consumed masks (data.sharding) that gives, per (dataset, epoch), the set of permutation
positions the whole job has consumed: a description of progress that names no rank.

    W*K stream states --merge_stream_states--> DataProgress
        consumed[(k, e)]   positions of epoch e's permutation already read (bool masks)
        epochs, passes     where every new stream starts
        pieces             packer buffers and ready rows: loaded, never trained on
        balance, counters  packing.balance_flops running sums, emitted rows, pending counts
    DataProgress --stream s' of S'--> mixer.start_from (its share of what is left)
                                      pieces[s' :: S'] packed before anything new

Records in a packer buffer at save time were not trained on: they go back to the pool as
pieces (a record split at image boundaries may have only its tail left) and are dealt
round-robin to the new streams. So within every epoch no record is lost and none is read
twice, and the new order is a function of (seed, epoch, W', K') and the saved progress.
Memory: one bool per record for each (dataset, epoch) in progress, no Python object per
record; merging never builds a permutation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlpretrain.data import sharding
from vlpretrain.data.mixing import consumed_from_state


@dataclass
class DataProgress:
    """What a job has read, independent of how many streams read it."""

    lengths: list[int]
    """Records of every dataset (the mixer's order)."""
    epochs: list[int]
    """Epoch each dataset starts in on the new streams."""
    passes: int
    """Stream epochs already completed (replacement=False; data.mixing)."""
    consumed: dict[tuple[int, int], np.ndarray]
    """(dataset position, epoch) -> bool mask of the permutation positions already read."""
    pieces: list[tuple[int, ...]] = field(default_factory=list)
    """PieceRef tuples of every row loaded but not trained on, in saved stream order."""
    balance: tuple[int, float] | None = None
    """Summed (tokens, FLOPs) of the balance_flops running mean; None when it is off."""
    num_rows_emitted: int = 0
    num_tokens_emitted: int = 0
    num_loaded: int = 0
    """Records loaded but not yet reported with a batch (normally 0 between batches)."""
    skipped: list[list[Any]] = field(default_factory=list)
    """Skips not yet reported with a batch (normally none between batches)."""

    def num_read(self) -> int:
        """Records read over all epochs: the epochs before `epochs[k]` whole, plus the
        consumed positions of the later ones (each record once, however many streams)."""
        whole = sum(e * n for e, n in zip(self.epochs, self.lengths, strict=True))
        return whole + sum(int(np.count_nonzero(m)) for m in self.consumed.values())


def deal(total: int, stream_id: int, num_streams: int) -> int:
    """Stream `stream_id`'s part of `total` when it is split as evenly as integers allow."""
    return total // num_streams + (1 if stream_id < total % num_streams else 0)


def old_stream_id(state: dict[str, Any]) -> tuple[int, int]:
    """(stream id, number of streams) of a saved stream state."""
    num_streams = sharding.stream_count(int(state["world_size"]), int(state["num_workers"]))
    stream_id = sharding.stream_index(
        int(state["rank"]), int(state["world_size"]), int(state["worker"]),
        int(state["num_workers"]),
    )  # fmt: skip
    return stream_id, num_streams


def _in_stream_order(states: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The states sorted by stream id; refuses a set that is not exactly one job's streams."""
    if not states:
        raise ValueError("no saved stream state to resume from")
    ids = [old_stream_id(s) for s in states]
    num_streams = {n for _, n in ids}
    if len(num_streams) != 1:
        raise ValueError(f"saved stream states come from jobs of different shapes: {ids}")
    (total,) = num_streams
    found = sorted(i for i, _ in ids)
    if found != list(range(total)):
        raise ValueError(
            f"need the state of every one of the {total} saved streams (rank x worker) to "
            f"resume on another shape; found streams {found}"
        )
    by_id = dict(zip((i for i, _ in ids), states, strict=True))
    return [by_id[i] for i in range(total)]


def _saved_mask(
    mixers: list[dict[str, Any]],
    masks: list[dict[tuple[int, int], np.ndarray]],
    key: tuple[int, int],
) -> np.ndarray | None:
    """The saved layout's own consumed mask of `key`; every stream that holds it agrees."""
    held = [m[key] for m in masks if key in m]
    if any(not np.array_equal(held[0], other) for other in held[1:]):
        raise ValueError(f"saved streams disagree on the consumed positions of {key}")
    return held[0] if held else None


def merge_stream_states(states: Sequence[dict[str, Any]], replacement: bool) -> DataProgress:
    """The progress of a whole job from the state of each of its streams."""
    ordered = _in_stream_order(states)
    mixers = [s["mixer"] for s in ordered]
    lengths = [int(n) for n in mixers[0]["lengths"]]
    if any([int(n) for n in m["lengths"]] != lengths for m in mixers):
        raise ValueError("saved streams disagree on the dataset lengths")
    masks = [consumed_from_state(m) for m in mixers]
    num_streams = len(ordered)
    epochs_of = [[int(e) for e in m["epochs"]] for m in mixers]
    if replacement:
        starts = [min(e[k] for e in epochs_of) for k in range(len(lengths))]
        passes = min(int(m["passes"]) for m in mixers)
    else:  # all datasets of a stream share its pass; a finished stream is one pass ahead
        first = min(min(e) for e in epochs_of)
        starts, passes = [first] * len(lengths), first
    consumed: dict[tuple[int, int], np.ndarray] = {}
    for k, length in enumerate(lengths):
        for epoch in range(starts[k], max(e[k] for e in epochs_of) + 1):
            before = _saved_mask(mixers, masks, (k, epoch))
            left = sharding.num_left(length, before)
            counts = [
                sharding.share_length(left, s, num_streams) if e[k] > epoch
                else int(m["positions"][k]) if e[k] == epoch else 0
                for s, (e, m) in enumerate(zip(epochs_of, mixers, strict=True))
            ]  # fmt: skip
            mask = sharding.mark_consumed(length, before, num_streams, counts)
            if mask.any():
                consumed[(k, epoch)] = mask
    progress = DataProgress(lengths, starts, passes, consumed)
    _merge_buffers(progress, ordered)
    return progress


def _merge_buffers(progress: DataProgress, ordered: list[dict[str, Any]]) -> None:
    """Pieces of every ready row and open row, the balance sums and the counters."""
    balances = [s["packer"].get("balance") for s in ordered]
    if any((b is None) != (balances[0] is None) for b in balances):
        raise ValueError("saved streams disagree on packing.balance_flops")
    for state in ordered:
        packer = state["packer"]
        for row in [*state["ready_rows"], *packer["rows"]]:
            progress.pieces.extend(tuple(int(v) for v in ref) for ref in row)
        progress.num_rows_emitted += int(packer["num_rows_emitted"])
        progress.num_tokens_emitted += int(packer["num_tokens_emitted"])
        progress.num_loaded += int(state["num_loaded"])
        if isinstance(state["skipped"], list):
            progress.skipped.extend(state["skipped"])
    if balances[0] is not None:
        tokens = sum(int(b["total_tokens"]) for b in balances)
        flops = sum(float(b["total_flops"]) for b in balances)
        progress.balance = (tokens, flops)


def balance_share(
    balance: tuple[int, float], stream_id: int, num_streams: int
) -> tuple[int, float]:
    """A new stream's part of the summed running mean: same FLOPs per token, 1/S' the weight."""
    tokens, flops = balance
    part = deal(tokens, stream_id, num_streams)
    return part, (flops * part / tokens if tokens else 0.0)
