"""Wire sharding, mixing, sample loading, skip counting and packing into a resumable stream.

One `WorkerStream` per (rank, dataloader worker); `PackedStream` is the IterableDataset that
picks the right one inside each worker; `build_dataloader` wraps it in a StatefulDataLoader
whose state (workers included) resumes the stream exactly, without replaying data.

    sources ----------------------------------------------------------+
      |  len()                                                         |
      v                                                                |
    DatasetMixer (data.mixing; shares from data.sharding)              |
      |  RecordRef(source, record, epoch)                              |
      v                                                                |
    source.load(record, epoch, seed) --SkippedSample--> next batch's  |
      |  TokenizedSample                  BatchStats.skipped           |
      v                                                                |
    fit_to_budget --too big--> SkippedSample('exceeds_pack_budget')    |
      |  PackItem*                                                     |
      v                                                                |
    BestFitPacker --rows--> SyncedRelease --rows_per_batch rows--> collate --> PackedBatch
      (open and held rows saved as PieceRefs, re-loaded on restore) <--+

SyncedRelease (data.balance) passes rows on in packing order, or with packing.balance_flops
holds back balance_queue_rows of them and releases them in a cost order every rank follows.

Skipped records travel with the next batch (BatchStats.skipped), so that the consumer (the
training loop) reports exactly the skips of the batches it trained on, once each, also across
a resume; the stream itself logs nothing.

The stream is endless (next epoch after the last one; training is bounded by max_steps)
unless `StreamConfig.num_epochs` is set, in which case the open rows are flushed at the end.

Resume on another shape (W' ranks x K' workers): `PackedDataLoader.load_resharded_state_dict`
takes the loader state of every saved rank, merges their streams' progress (data.elastic) and
starts each new stream on its share of what is left, open rows returned to the pool.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

import torch.utils.data

from vlpretrain import packages
from vlpretrain.data import sharding
from vlpretrain.data.balance import StepFlops, SyncedRelease, build_row_balance
from vlpretrain.data.collate import PackedBatch, collate_rows
from vlpretrain.data.elastic import DataProgress, balance_share, deal, merge_stream_states
from vlpretrain.data.mixing import DatasetMixer, RecordRef
from vlpretrain.data.packing import (
    BestFitPacker,
    PackingConfig,
    PackItem,
    PackRow,
    PieceRef,
    fit_to_budget,
    slice_sample,
)
from vlpretrain.data.samples import SampleSource, SkippedSample, TokenizedSample
from vlpretrain.facts import RunFacts

logger = logging.getLogger(__name__)

STREAM_STATE_VERSION = 3
"""3: the mixer state's consumed masks are compressed bitmaps; 2: they are [start, stop)
ranges; 1: there are none (written before elastic resume)."""
READABLE_STREAM_VERSIONS = (1, 2, 3)
LOADER_STATE_KEY = "vlpretrain_stream"
EXCEEDS_BUDGET = "exceeds_pack_budget"
MEDIA_CHANGED = "media_changed"
ChangedMedia = Literal["error", "skip"]
"""Skip reason of a record in a checkpoint's packer buffer that no longer loads as it did."""


class SampleSourceLike(Protocol):
    """What the stream needs from a dataset (data.build.DatasetSource satisfies it)."""

    @property
    def name(self) -> str: ...

    @property
    def dataset_index(self) -> int: ...

    def __len__(self) -> int: ...

    def load(self, record_index: int, epoch: int, seed: int) -> TokenizedSample | SkippedSample:
        """A pure, deterministic function of its arguments."""
        ...


class SkipCounterLike(Protocol):
    """Receives every loaded result exactly once (data.skips.SkipTally satisfies it).

    A TokenizedSample counts as seen; a SkippedSample (from the source, or
    'exceeds_pack_budget' from the packer) as seen and skipped.
    """

    def record(self, sample: TokenizedSample | SkippedSample) -> None: ...


@dataclass(frozen=True, kw_only=True)
class StreamConfig:
    """How records are ordered, mixed and loaded."""

    seed: int = 42
    """Seeds permutations, dataset choice and every sample's augmentation."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0: load in the main process)."""
    use_data_resampling: bool = False
    """Weight datasets by sqrt(length) instead of length."""
    replacement: bool = False
    """An exhausted dataset restarts with its next epoch (True) or waits for the others."""
    prefetch_factor: int = 2
    """Batches prefetched per worker (only with num_workers > 0)."""
    pin_memory: bool = True
    """Pin batch tensors in page-locked host memory when CUDA is available (ignored
    otherwise), so that their copy to the GPU runs asynchronously beside the previous step
    (as the reference's dataloader_pin_memory, on by default)."""
    num_epochs: int | None = None
    """Stop after this many stream epochs (needs replacement=False); None: endless."""

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"StreamConfig.num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ValueError(
                f"StreamConfig.prefetch_factor must be >= 1, got {self.prefetch_factor}"
            )
        if self.num_epochs is not None and (self.num_epochs < 1 or self.replacement):
            raise ValueError(
                f"StreamConfig.num_epochs={self.num_epochs} needs a value >= 1 and "
                "replacement=False (with replacement the stream never ends an epoch)"
            )


class WorkerStream:
    """The whole pipeline of one (rank, worker) stream; yields PackedBatch."""

    def __init__(
        self,
        sources: Sequence[SampleSourceLike],
        packing_config: PackingConfig,
        facts: RunFacts,
        stream_config: StreamConfig,
        *,
        rank: int,
        world_size: int,
        worker: int,
        skip_counter: SkipCounterLike | None = None,
        step_flops: StepFlops | None = None,
        on_changed_media: ChangedMedia = "error",
    ) -> None:
        _check_sources(sources)
        self.sources = list(sources)
        self.packing_config = packing_config
        self.facts = facts
        self.stream_config = stream_config
        self.rank, self.world_size, self.worker = rank, world_size, worker
        self.skip_counter = skip_counter
        self.on_changed_media = on_changed_media
        num_workers = stream_config.num_workers
        self.stream_id = sharding.stream_index(rank, world_size, worker, num_workers)
        self.num_streams = sharding.stream_count(world_size, num_workers)
        self.mixer = DatasetMixer(
            [len(s) for s in self.sources],
            [s.dataset_index for s in self.sources],
            seed=stream_config.seed,
            stream_id=self.stream_id,
            num_streams=self.num_streams,
            use_data_resampling=stream_config.use_data_resampling,
            replacement=stream_config.replacement,
            num_epochs=stream_config.num_epochs,
        )
        balance = build_row_balance(
            packing_config.balance_flops,
            step_flops,
            packing_config.max_packed_tokens,
            packing_config.full_row_slack_tokens,
        )
        self.packer = BestFitPacker(packing_config, facts, balance)
        self._hold = packing_config.balance_queue_rows if balance is not None else 0
        self._position_of = {s.dataset_index: k for k, s in enumerate(self.sources)}
        self._num_datasets = max(self._position_of) + 1
        self._ready: SyncedRelease[PackRow] = SyncedRelease(self._hold)
        self._num_loaded = 0
        self._skipped: list[SkippedSample] = []

    def __iter__(self) -> Iterator[PackedBatch]:
        while (batch := self.next_batch()) is not None:
            yield batch

    def next_batch(self) -> PackedBatch | None:
        """The next micro-batch, or None when a finite stream is exhausted."""
        rows: list[PackRow] = []
        while len(rows) < self.packing_config.rows_per_batch:
            row = self._next_row()
            if row is None:
                break
            rows.append(row)
        if not rows:
            return None
        batch = collate_rows(
            rows,
            self.packing_config,
            self.facts,
            num_datasets=self._num_datasets,
            num_loaded=self._num_loaded,
            skipped=self._skipped,
        )
        self._num_loaded = 0
        self._skipped = []
        return batch

    def _next_row(self) -> PackRow | None:
        """The next row the release order lets go (None: a finite stream is exhausted)."""
        return self._ready.next_row(self._pack_next)

    def _pack_next(self) -> list[PackRow] | None:
        """Rows finished by packing the next record; at the end of a finite stream the open
        rows, then None."""
        ref = self.mixer.next()
        if ref is None:
            return self.packer.flush() or None
        return self._pack(ref)

    def _pack(self, ref: RecordRef) -> list[PackRow]:
        """Load one record, drop or split it to the budget, hand it to the packer."""
        source = self.sources[ref.source_position]
        loaded = source.load(ref.record_index, ref.epoch, self.stream_config.seed)
        self._num_loaded += 1
        if isinstance(loaded, SkippedSample):
            self._skip(loaded)
            return []
        item = PackItem(PieceRef.whole(loaded, ref.record_index, ref.epoch), loaded)
        pieces = fit_to_budget(item, self.packing_config, self.facts)
        if pieces is None:
            self._skip(exceeds_budget(loaded, self.packing_config))
            return []
        if self.skip_counter is not None:
            self.skip_counter.record(loaded)
        rows: list[PackRow] = []
        for piece in pieces:
            rows.extend(self.packer.add(piece))
        return rows

    def _skip(self, skipped: SkippedSample) -> None:
        self._skipped.append(skipped)
        if self.skip_counter is not None:
            self.skip_counter.record(skipped)

    def load_piece(self, ref: PieceRef) -> TokenizedSample | None:
        """Re-create a packed piece from its reference (used on restore); None when its record
        no longer loads as it did and data.on_changed_media is 'skip' (the record then travels
        with the next batch as a media_changed skip)."""
        source = self.sources[self._position_of[ref.dataset_index]]
        loaded = source.load(ref.record_index, ref.epoch, self.stream_config.seed)
        problem = _changed_since_checkpoint(loaded, ref)
        if problem is None:
            assert isinstance(loaded, TokenizedSample)
            return slice_sample(loaded, ref)
        where = f"record {ref.record_index} (epoch {ref.epoch}) of dataset {source.name!r}"
        if self.on_changed_media == "skip":
            self._skipped.append(
                SkippedSample(ref.dataset_index, loaded.source, MEDIA_CHANGED, problem)
            )
            return None
        raise RuntimeError(
            f"{where} ({loaded.source}) is in the checkpoint's packer buffer but {problem}: "
            "the source is not deterministic or its files changed since the checkpoint. "
            "Restore the files, or set data.on_changed_media = 'skip' to leave such records "
            f"out (each is listed in skipped.jsonl as {MEDIA_CHANGED})."
        )

    def start_from(self, progress: DataProgress) -> None:
        """Continue a job of another shape: this stream's share of what it left unread, and
        its part of the pieces it had loaded but not trained on (packed first)."""
        _check_lengths(progress, self.sources)
        stream_id, num_streams = self.stream_id, self.num_streams
        self.mixer.start_from(progress.epochs, progress.passes, progress.consumed)
        balance = progress.balance
        counters = (
            deal(progress.num_rows_emitted, stream_id, num_streams),
            deal(progress.num_tokens_emitted, stream_id, num_streams),
            None if balance is None else balance_share(balance, stream_id, num_streams),
        )
        self.packer.start_from(*counters)
        if stream_id == 0:  # counts not yet reported with a batch: reported once, by one stream
            self._num_loaded = progress.num_loaded
            self._skipped = [_skip_from_state(item) for item in progress.skipped]
        self._ready = SyncedRelease(self._hold)  # every new stream's release count starts at 0
        for values in progress.pieces[stream_id::num_streams]:
            ref = PieceRef.from_tuple(values)
            if (piece := self.load_piece(ref)) is not None:
                self._ready.push(self.packer.add(PackItem(ref, piece)))
        # The saved FLOPs sums already count these pieces: packing them again must not count
        # them twice (rows emitted now are counted: they are new rows).
        packer = self.packer
        packer.start_from(packer.num_rows_emitted, packer.num_tokens_emitted, counters[2])

    def state_dict(self) -> dict[str, Any]:
        """Versioned plain-Python state: mixer, open rows (by reference), ready rows in
        arrival order and their release order's counter."""
        return {
            "version": STREAM_STATE_VERSION,
            "world_size": self.world_size,
            "num_workers": self.stream_config.num_workers,
            "rank": self.rank,
            "worker": self.worker,
            "seed": self.stream_config.seed,
            "mixer": self.mixer.state_dict(),
            "packer": self.packer.state_dict(),
            "ready_rows": [[item.ref.as_tuple() for item in row.items] for row in self._ready.rows],
            "release": self._ready.state_dict(),
            "num_loaded": self._num_loaded,
            "skipped": [_skip_state(skipped) for skipped in self._skipped],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by the same (rank, worker) of a job of the same shape."""
        _check_state(state, self)
        # Always empty between batches; states of version 1 held a dict of counts here. Set
        # first: re-loading the buffered pieces may add media_changed skips.
        pending = state["skipped"] if isinstance(state["skipped"], list) else []
        self._skipped = [_skip_from_state(item) for item in pending]
        self.mixer.load_state_dict(state["mixer"])
        self.packer.load_state_dict(state["packer"], self.load_piece)
        ready = self.packer.restore_rows(state["ready_rows"], self.load_piece)
        release = state.get("release")  # states before it: none
        ready, release = _without_empty_rows(ready, release)
        self._ready.restore(ready, release)
        self._num_loaded = int(state["num_loaded"])


class PackedStream(torch.utils.data.IterableDataset):
    """IterableDataset over packed micro-batches; each DataLoader worker runs its own stream."""

    def __init__(
        self,
        sources: Sequence[SampleSourceLike],
        packing_config: PackingConfig,
        facts: RunFacts,
        stream_config: StreamConfig,
        *,
        rank: int,
        world_size: int,
        skip_counter: SkipCounterLike | None = None,
        step_flops: StepFlops | None = None,
        on_changed_media: ChangedMedia = "error",
    ) -> None:
        super().__init__()
        _check_sources(sources)
        self.sources = list(sources)
        self.packing_config = packing_config
        self.facts = facts
        self.stream_config = stream_config
        self.rank, self.world_size = rank, world_size
        self.skip_counter = skip_counter
        self.step_flops = step_flops
        self.on_changed_media = on_changed_media
        self.progress: DataProgress | None = None
        """Set on a resume on another shape: where every new stream starts (data.elastic)."""
        self._stream: WorkerStream | None = None

    def _worker_stream(self) -> WorkerStream:
        if self._stream is None:
            info = torch.utils.data.get_worker_info()
            expected = self.stream_config.num_workers
            worker, actual = (0, 0) if info is None else (info.id, info.num_workers)
            if actual != expected:
                raise ValueError(
                    f"PackedStream built for num_workers={expected} runs with {actual} "
                    "DataLoader workers; use build_dataloader() or the same StreamConfig"
                )
            self._stream = WorkerStream(
                self.sources,
                self.packing_config,
                self.facts,
                self.stream_config,
                rank=self.rank,
                world_size=self.world_size,
                worker=worker,
                skip_counter=self.skip_counter,
                step_flops=self.step_flops,
                on_changed_media=self.on_changed_media,
            )
            if self.progress is not None:
                self._stream.start_from(self.progress)
        return self._stream

    def start_from(self, progress: DataProgress) -> None:
        """Start every stream (built in its worker) from a job of another shape's progress."""
        self.progress = progress
        self._stream = None

    def __iter__(self) -> Iterator[PackedBatch]:
        return iter(self._worker_stream())

    def state_dict(self) -> dict[str, Any]:
        return self._worker_stream().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._worker_stream().load_state_dict(state)


def stateful_dataloader_class() -> type[Any]:
    """torchdata's StatefulDataLoader (its state covers the worker processes), imported only
    when a loader is built, so that commands which load no data run without torchdata."""
    module = packages.require(
        "torchdata.stateful_dataloader", "the resumable data loader", "torchdata"
    )
    return cast(type[Any], module.StatefulDataLoader)


SET_VITAL_WARNING = "'set_vital' is deprecated"
"""The start of the warning torchdata's StatefulDataLoader causes in its constructor."""


class PackedDataLoader:
    """A StatefulDataLoader over a PackedStream, whose state also records the job shape,
    checked on load."""

    def __init__(self, dataset: PackedStream, **kwargs: Any) -> None:
        loader_class = stateful_dataloader_class()
        with warnings.catch_warnings():
            # torchdata calls torch.set_vital, which torch deprecates: a warning per loader
            # that no user can act on. Only that warning, only here.
            warnings.filterwarnings("ignore", message=SET_VITAL_WARNING, category=UserWarning)
            self.loader = loader_class(dataset, **kwargs)
        self.stream = dataset
        self._shape = _shape(dataset.world_size, dataset.stream_config.num_workers, dataset.rank)

    @property
    def dataset(self) -> PackedStream:
        return self.stream

    def __iter__(self) -> Iterator[PackedBatch]:
        return iter(self.loader)

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.loader.state_dict())
        state[LOADER_STATE_KEY] = dict(self._shape, version=STREAM_STATE_VERSION)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore this rank's own state from a job of the same shape (bit-exact)."""
        state = dict(state_dict)
        saved = _loader_shape(state.pop(LOADER_STATE_KEY, None))
        _check_shape(saved, self._shape)
        self.loader.load_state_dict(state)

    def shape_changed(self, state_dict: dict[str, Any]) -> bool:
        """Whether `state_dict` (a saved rank's) comes from a job of another world size or
        worker count, so that resuming needs every saved rank's state."""
        saved = _loader_shape(state_dict.get(LOADER_STATE_KEY))
        return any(saved[k] != self._shape[k] for k in ("world_size", "num_workers"))

    def load_resharded_state_dict(self, saved_states: Sequence[dict[str, Any]]) -> None:
        """Resume from the states of every rank of a job of another shape: nothing read in
        the current epochs is read again, nothing unread is lost (data.elastic)."""
        streams = [s for state in saved_states for s in stream_states(state)]
        config = self.stream.stream_config
        seeds = {int(s["seed"]) for s in streams}
        if seeds != {config.seed}:
            raise ValueError(
                f"saved streams used seed(s) {sorted(seeds)}, this run has stream.seed "
                f"{config.seed}; the saved permutations would not be this run's"
            )
        progress = merge_stream_states(streams, config.replacement)
        _check_lengths(progress, self.stream.sources)
        saved = _loader_shape(saved_states[0].get(LOADER_STATE_KEY))
        logger.warning(
            "data stream saved on %d ranks x %d workers resumes on %d x %d: the rest of each "
            "epoch is dealt anew (%d loaded but untrained pieces returned to the pool)",
            saved["world_size"], saved["num_workers"], self._shape["world_size"],
            self._shape["num_workers"], len(progress.pieces),
        )  # fmt: skip
        self.stream.start_from(progress)


def build_dataloader(
    sources: Sequence[SampleSourceLike],
    packing_config: PackingConfig,
    facts: RunFacts,
    stream_config: StreamConfig,
    rank: int,
    world_size: int,
    skip_counter: SkipCounterLike | None = None,
    step_flops: StepFlops | None = None,
    on_changed_media: ChangedMedia = "error",
    worker_init_fn: Callable[[int], None] | None = None,
) -> PackedDataLoader:
    """The resumable loader of packed micro-batches for one rank (`step_flops`: the model's
    FLOPs counter, needed by packing.balance_flops; `worker_init_fn`: run in each worker
    process as it starts, e.g. the trainer's signal set-up)."""
    dataset = PackedStream(
        sources,
        packing_config,
        facts,
        stream_config,
        rank=rank,
        world_size=world_size,
        skip_counter=skip_counter,
        step_flops=step_flops,
        on_changed_media=on_changed_media,
    )
    extra: dict[str, Any] = {}
    if stream_config.num_workers > 0:
        extra["prefetch_factor"] = stream_config.prefetch_factor
    return PackedDataLoader(
        dataset,
        batch_size=None,
        num_workers=stream_config.num_workers,
        collate_fn=_pass_through,
        pin_memory=stream_config.pin_memory and torch.cuda.is_available(),
        worker_init_fn=worker_init_fn,
        **extra,
    )


def _skip_state(skipped: SkippedSample) -> list[Any]:
    """A pending skip as plain JSON-able values (the stream state holds no objects)."""
    source = skipped.source
    return [skipped.dataset_index, source.dataset, source.path, source.line, skipped.reason,
            skipped.detail]  # fmt: skip


def _skip_from_state(item: list[Any]) -> SkippedSample:
    index, dataset, path, line, reason, detail = item
    source = SampleSource(str(dataset), str(path), int(line))
    return SkippedSample(int(index), source, str(reason), str(detail))


def _changed_since_checkpoint(loaded: TokenizedSample | SkippedSample, ref: PieceRef) -> str | None:
    """How a re-loaded record differs from the piece the checkpoint saved (None: it fits)."""
    if isinstance(loaded, SkippedSample):
        return f"is now skipped ({loaded.reason}: {loaded.detail})"
    if ref.token_end > loaded.num_tokens or ref.tile_end > loaded.num_tiles:
        return (
            f"now has {loaded.num_tokens} tokens and {loaded.num_tiles} tiles, fewer than its "
            f"saved piece (tokens {ref.token_start}:{ref.token_end}, tiles "
            f"{ref.tile_start}:{ref.tile_end})"
        )
    return None


def _without_empty_rows(
    rows: list[PackRow], release: dict[str, Any] | None
) -> tuple[list[PackRow], dict[str, Any] | None]:
    """Ready rows whose every piece was skipped on restore, dropped with their arrival times."""
    keep = [bool(row.items) for row in rows]
    if all(keep):
        return rows, release
    kept = [row for row, flag in zip(rows, keep, strict=True) if flag]
    if release is None or release.get("arrived_at") is None:
        return kept, release
    arrived = [a for a, flag in zip(release["arrived_at"], keep, strict=True) if flag]
    return kept, {**release, "arrived_at": arrived}


def _pass_through(batch: PackedBatch) -> PackedBatch:
    return batch


def exceeds_budget(sample: TokenizedSample, config: PackingConfig) -> SkippedSample:
    """The skip of a sample that fits no row (also what `data check` reports)."""
    return SkippedSample(
        dataset_index=sample.dataset_index,
        source=sample.source,
        reason=EXCEEDS_BUDGET,
        detail=(
            f"{sample.num_tokens} tokens / {sample.num_tiles} tiles do not fit a row of "
            f"{config.max_packed_tokens} tokens / {config.num_images_expected} tiles"
            + ("" if config.split_at_image_boundary else " (split_at_image_boundary is off)")
        ),
    )


def _check_sources(sources: Sequence[SampleSourceLike]) -> None:
    if not sources:
        raise ValueError("the data stream needs at least one source")
    indices = [s.dataset_index for s in sources]
    if len(set(indices)) != len(indices) or min(indices) < 0:
        raise ValueError(f"source dataset_index values must be unique and >= 0, got {indices}")


def _shape(world_size: int, num_workers: int, rank: int) -> dict[str, int]:
    return {"world_size": world_size, "num_workers": num_workers, "rank": rank}


def _check_version(version: Any, what: str) -> None:
    if version not in READABLE_STREAM_VERSIONS:
        raise ValueError(
            f"{what} version {version!r}: this vlpretrain reads versions "
            f"{', '.join(map(str, READABLE_STREAM_VERSIONS))} (a newer vlpretrain wrote it? "
            "resume with that one)"
        )


def _loader_shape(saved: dict[str, Any] | None) -> dict[str, int]:
    if saved is None:
        raise ValueError("not a vlpretrain data-loader state (no stream metadata)")
    _check_version(saved.get("version"), "data-loader state")
    return {k: int(saved[k]) for k in ("world_size", "num_workers", "rank")}


def stream_states(loader_state: dict[str, Any]) -> list[dict[str, Any]]:
    """The WorkerStream state of every worker in one rank's saved loader state."""
    shape = _loader_shape(loader_state.get(LOADER_STATE_KEY))
    if shape["num_workers"] == 0:
        return [loader_state["dataset_state"]]
    workers = loader_state["_snapshot"]["_worker_snapshots"]
    states = [workers[f"worker_{i}"]["dataset_state"] for i in range(shape["num_workers"])]
    for state in states:
        _check_version(state.get("version"), "stream state")
    return states


def _check_lengths(progress: DataProgress, sources: Sequence[SampleSourceLike]) -> None:
    lengths = [len(s) for s in sources]
    if progress.lengths != lengths:
        raise ValueError(
            f"dataset lengths changed since the checkpoint: saved {progress.lengths}, now "
            f"{lengths}; resume needs the same meta file and repeat_time"
        )


def _check_shape(saved: dict[str, int], current: dict[str, int]) -> None:
    if saved != current:
        raise ValueError(
            f"data-loader state was saved with {saved} but this job has {current}; this "
            "rank's state alone cannot resume it (each (rank, worker) owns its own share of "
            "the data): load every saved rank's state with load_resharded_state_dict"
        )


def _check_state(state: dict[str, Any], stream: WorkerStream) -> None:
    _check_version(state.get("version"), "stream state")
    saved = _shape(state["world_size"], state["num_workers"], state["rank"])
    _check_shape(saved, _shape(stream.world_size, stream.stream_config.num_workers, stream.rank))
    if state["worker"] != stream.worker or state["seed"] != stream.stream_config.seed:
        raise ValueError(
            f"stream state of worker {state['worker']} (seed {state['seed']}) cannot restore "
            f"worker {stream.worker} (seed {stream.stream_config.seed})"
        )
