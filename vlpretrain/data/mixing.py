"""Choose which dataset, record and epoch one (rank, worker) stream reads next.

    weights (len or sqrt(len)) --rng.choice--> dataset k
    dataset k: share of epoch e (data.sharding) --position--> record index

Deterministic given (seed, stream id): the choice generator is seeded with
`(seed, num_streams, stream_id)`. Stateful: positions, epochs, active flags and the generator
state round-trip through `state_dict()`.

Exhaustion follows the reference's `replacement` flag: True restarts the dataset with the
next epoch's permutation; False drops it until every dataset is dropped, which ends the
stream epoch; the stream then starts the next epoch of every dataset (training is bounded by
max_steps, not by data), unless `num_epochs` says to stop.

A mixer may start part-way into epochs (`start_from`, after a resume on another number of
streams, data.elastic): per (dataset, epoch) a mask of the permutation positions consumed
before, whose rest the streams share (data.sharding); masks of epochs behind are forgotten.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlpretrain.data import sharding

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecordRef:
    """One record to load: which source, which record, which epoch (for its augmentations)."""

    source_position: int
    """Position of the source in the list given to the mixer."""
    record_index: int
    """Index of the record in the source (after repeat_time)."""
    epoch: int
    """Epoch of that dataset in which the record is read."""


class DatasetMixer:
    """Weighted, exhaustion-aware choice of the next record for one stream."""

    def __init__(
        self,
        lengths: Sequence[int],
        dataset_indices: Sequence[int],
        *,
        seed: int,
        stream_id: int,
        num_streams: int,
        use_data_resampling: bool = False,
        replacement: bool = False,
        num_epochs: int | None = None,
    ) -> None:
        if len(lengths) != len(dataset_indices) or not lengths:
            raise ValueError(
                f"need one length per dataset and at least one dataset, got lengths={lengths}"
                f" dataset_indices={dataset_indices}"
            )
        self._lengths = [int(n) for n in lengths]
        self._dataset_indices = [int(i) for i in dataset_indices]
        self._seed = seed
        self._stream_id = stream_id
        self._num_streams = num_streams
        self._replacement = replacement
        self._num_epochs = num_epochs
        self._share_lengths = [
            sharding.share_length(n, stream_id, num_streams) for n in self._lengths
        ]
        if not any(self._share_lengths):
            raise ValueError(
                f"stream {stream_id} of {num_streams} gets no record from any dataset"
                f" (lengths {self._lengths}); use fewer ranks/workers or more data"
            )
        self._weights = np.array(
            [math.sqrt(n) if use_data_resampling else float(n) for n in self._lengths]
        )
        self._rng = np.random.default_rng((seed, num_streams, stream_id))
        self._positions = [0] * len(self._lengths)
        self._epochs = [0] * len(self._lengths)
        self._active = [n > 0 for n in self._share_lengths]
        self._passes = 0
        self._share_cache: dict[int, tuple[int, np.ndarray]] = {}
        self._consumed: dict[tuple[int, int], np.ndarray] = {}
        """(dataset position, epoch) -> positions consumed before this mixer's layout."""
        self._encoded_consumed: dict[tuple[int, int], dict[str, Any]] = {}
        """The JSON form of each mask, made once: a mask never changes, a state is taken
        every step."""

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(self._lengths)

    @property
    def epochs(self) -> tuple[int, ...]:
        """Current epoch of every dataset."""
        return tuple(self._epochs)

    @property
    def passes(self) -> int:
        """Stream epochs completed (all datasets exhausted; only with replacement=False)."""
        return self._passes

    def sampling_probabilities(self) -> np.ndarray:
        """Probability of each dataset at the next draw (0 for dropped ones)."""
        weights = np.where(self._active, self._weights, 0.0)
        return weights / weights.sum()

    def next(self) -> RecordRef | None:
        """Next record of this stream; None once `num_epochs` stream epochs are done."""
        if self._num_epochs is not None and self._passes >= self._num_epochs:
            return None
        while True:
            if not any(self._active):
                if not self._end_stream_epoch():
                    return None
            k = self._choose()
            if self._positions[k] < len(self._share(k)):
                return self._take(k)
            self._on_exhausted(k)

    def _choose(self) -> int:
        probabilities = self.sampling_probabilities()
        return int(self._rng.choice(len(probabilities), p=probabilities))

    def _take(self, k: int) -> RecordRef:
        share = self._share(k)
        record_index = int(share[self._positions[k]])
        self._positions[k] += 1
        return RecordRef(source_position=k, record_index=record_index, epoch=self._epochs[k])

    def _share(self, k: int) -> np.ndarray:
        cached = self._share_cache.get(k)
        if cached is None or cached[0] != self._epochs[k]:
            share = sharding.stream_share(
                self._lengths[k],
                self._seed,
                self._epochs[k],
                self._dataset_indices[k],
                self._stream_id,
                self._num_streams,
                self._consumed.get((k, self._epochs[k])),
            )
            cached = (self._epochs[k], share)
            self._share_cache[k] = cached
        return cached[1]

    def _on_exhausted(self, k: int) -> None:
        if self._replacement:
            logger.debug("dataset %d exhausted in epoch %d; restarting", k, self._epochs[k])
            self._epochs[k] += 1
            self._positions[k] = 0
            self._forget_consumed()
        else:
            logger.debug("dataset %d exhausted in epoch %d; dropped", k, self._epochs[k])
            self._active[k] = False

    def _end_stream_epoch(self) -> bool:
        self._passes += 1
        # Debug only: every loader stream ends its epochs, so a small run would log this
        # once per stream per epoch; the epoch of each trained record is in its skip entries.
        logger.debug(
            "stream %d: all datasets exhausted, stream epoch %d done",
            self._stream_id,
            self._passes,
        )
        if self._num_epochs is not None and self._passes >= self._num_epochs:
            return False
        for k in range(len(self._lengths)):
            self._epochs[k] += 1
            self._positions[k] = 0
        self._forget_consumed()
        self._active = self._has_records()
        return True

    def _has_records(self) -> list[bool]:
        """Per dataset: does this stream's share of its current epoch hold a record?"""
        return [self.share_size(k, epoch) > 0 for k, epoch in enumerate(self._epochs)]

    def _forget_consumed(self) -> None:
        self._consumed = {
            (k, epoch): mask
            for (k, epoch), mask in self._consumed.items()
            if epoch >= self._epochs[k]
        }

    def share_size(self, k: int, epoch: int) -> int:
        """Records of dataset k this stream reads in `epoch` (all of them, from the start)."""
        left = sharding.num_left(self._lengths[k], self._consumed.get((k, epoch)))
        return sharding.share_length(left, self._stream_id, self._num_streams)

    def start_from(
        self, epochs: Sequence[int], passes: int, consumed: dict[tuple[int, int], np.ndarray]
    ) -> None:
        """Start every dataset at the beginning of this stream's share of `epochs[k]`, with
        the positions of `consumed[(k, epoch)]` already read by an earlier layout."""
        for (k, epoch), mask in consumed.items():
            if mask.shape != (self._lengths[k],) or mask.dtype != bool:
                raise ValueError(f"consumed mask of dataset {k} epoch {epoch} has the wrong shape")
        self._epochs = [int(e) for e in epochs]
        self._positions = [0] * len(self._lengths)
        self._passes = int(passes)
        self._consumed = dict(consumed)
        self._encoded_consumed = {}
        self._forget_consumed()
        self._share_cache = {}
        # With replacement a dataset is only ever inactive when it has no share at all.
        self._active = (
            [n > 0 for n in self._share_lengths] if self._replacement else (self._has_records())
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python snapshot (ints, lists, the generator state)."""
        return {
            "lengths": list(self._lengths),
            "positions": list(self._positions),
            "epochs": list(self._epochs),
            "active": list(self._active),
            "passes": self._passes,
            "rng": self._rng.bit_generator.state,
            "consumed": [
                {"dataset": k, "epoch": epoch, **self._encoded_mask(k, epoch)}
                for k, epoch in sorted(self._consumed)
            ],
        }

    def _encoded_mask(self, k: int, epoch: int) -> dict[str, Any]:
        key = (k, epoch)
        if key not in self._encoded_consumed:
            self._encoded_consumed[key] = sharding.encode_mask(self._consumed[key])
        return self._encoded_consumed[key]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a snapshot taken by `state_dict` on a mixer over the same datasets."""
        if list(state["lengths"]) != self._lengths:
            raise ValueError(
                f"dataset lengths changed since the checkpoint: saved {state['lengths']},"
                f" now {self._lengths}; resume needs the same meta file and repeat_time"
            )
        self._positions = [int(p) for p in state["positions"]]
        self._epochs = [int(e) for e in state["epochs"]]
        self._active = [bool(a) for a in state["active"]]
        self._passes = int(state["passes"])
        self._rng.bit_generator.state = state["rng"]
        self._consumed = consumed_from_state(state)
        self._encoded_consumed = {}
        self._share_cache = {}


def consumed_from_state(state: dict[str, Any]) -> dict[tuple[int, int], np.ndarray]:
    """The consumed masks of a mixer state (states written before elastic resume have none)."""
    lengths = [int(n) for n in state["lengths"]]
    return {
        (int(item["dataset"]), int(item["epoch"])): sharding.decode_mask(
            item, lengths[int(item["dataset"])]
        )
        for item in state.get("consumed", [])
    }
