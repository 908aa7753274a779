import pickle
from collections import Counter
from dataclasses import fields
from itertools import islice

import pytest
import torch
from stream_fakes import FACTS, FakeSource, make_sample

from vlpretrain.data.collate import PackedLayout
from vlpretrain.data.loader import (
    PackedStream,
    StreamConfig,
    WorkerStream,
    build_dataloader,
)
from vlpretrain.data.packing import PackingConfig
from vlpretrain.data.samples import SkippedSample

PACKING = PackingConfig(max_packed_tokens=128, num_images_expected=6, max_buffer_size=4)


def _sources():
    return [
        FakeSource(0, 37, skip_every=5),
        FakeSource(1, 23, max_images=0),
        FakeSource(2, 11, max_images=3, max_tiles=4),  # some exceed the 6-tile budget
    ]


def _expected_records(sources, seed):
    """(dataset, record) of epoch 0 that must be packed, and the number that must be skipped."""
    keep, skipped = set(), 0
    for source in sources:
        for r in range(len(source)):
            sample = source.load(r, 0, seed)
            too_big = not isinstance(sample, SkippedSample) and (
                sample.num_tokens > PACKING.max_packed_tokens
                or sample.num_tiles > PACKING.num_images_expected
            )
            if isinstance(sample, SkippedSample) or too_big:
                skipped += 1
            else:
                keep.add((source.dataset_index, r))
    return keep, skipped


def _check_one_epoch(batches, sources, seed):
    seen = Counter()
    skipped = Counter()
    for batch in batches:
        for ref in batch.sample_ids:
            assert ref.epoch == 0
            seen[(ref.dataset_index, ref.record_index)] += 1
        skipped.update(dict(batch.stats.skipped_by_reason))
        assert batch.stats.num_skipped == sum(dict(batch.stats.skipped_by_reason).values())
    keep, num_skipped = _expected_records(sources, seed)
    assert set(seen) == keep, "a record was lost or invented"
    assert set(seen.values()) == {1}, "a record was packed twice"
    assert sum(skipped.values()) == num_skipped
    assert skipped["missing_image"] == 7 and skipped["exceeds_pack_budget"] > 0


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_epoch_over_all_ranks_and_workers_packs_every_record_exactly_once(
    world_size, num_workers
):
    sources = _sources()
    config = StreamConfig(seed=3, num_workers=num_workers, num_epochs=1)
    batches = []
    for rank in range(world_size):
        for worker in range(max(1, num_workers)):
            stream = WorkerStream(
                sources, PACKING, FACTS, config, rank=rank, world_size=world_size, worker=worker
            )
            batches.extend(stream)
    _check_one_epoch(batches, sources, seed=3)


def test_one_epoch_through_stateful_dataloaders_with_two_workers_on_two_ranks():
    sources = _sources()
    config = StreamConfig(seed=3, num_workers=2, num_epochs=1)
    batches = []
    for rank in range(2):
        batches.extend(build_dataloader(sources, PACKING, FACTS, config, rank, 2))
    _check_one_epoch(batches, sources, seed=3)


def _assert_same_batch(a, b):
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), f.name
        elif isinstance(x, PackedLayout):
            _assert_same_batch(x, y)
        else:
            assert x == y, f.name


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("resume_at", [1, 6, 11])
def test_resume_reproduces_the_stream_bit_for_bit(num_workers, resume_at):
    sources = _sources()
    packing = PackingConfig(
        max_packed_tokens=128,
        num_images_expected=6,
        max_buffer_size=4,
        rows_per_batch=2,
    )
    config = StreamConfig(seed=5, num_workers=num_workers)  # endless: crosses epochs
    total = 16
    expected = list(islice(build_dataloader(sources, packing, FACTS, config, 1, 2), total))
    first = build_dataloader(sources, packing, FACTS, config, 1, 2)
    head = list(islice(iter(first), resume_at))
    state = pickle.loads(pickle.dumps(first.state_dict()))  # must survive serialisation
    resumed = build_dataloader(sources, packing, FACTS, config, 1, 2)
    resumed.load_state_dict(state)
    tail = list(islice(iter(resumed), total - resume_at))
    assert len(head + tail) == total
    for a, b in zip(head + tail, expected, strict=True):
        _assert_same_batch(a, b)
    assert {ref.epoch for b in expected for ref in b.sample_ids} >= {0, 1}


def test_building_a_loader_shows_no_torchdata_deprecation_warning():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning, even one shown before
        build_dataloader(_sources(), PACKING, FACTS, StreamConfig(num_workers=0), 0, 1)
    assert [str(w.message) for w in caught] == []


def test_state_from_another_job_shape_is_refused():
    sources = _sources()
    loader = build_dataloader(sources, PACKING, FACTS, StreamConfig(num_workers=0), 0, 2)
    next(iter(loader))
    state = loader.state_dict()
    with pytest.raises(ValueError, match="world_size"):
        build_dataloader(
            sources, PACKING, FACTS, StreamConfig(num_workers=0), 0, 4
        ).load_state_dict(state)
    with pytest.raises(ValueError, match="num_workers"):
        build_dataloader(
            sources, PACKING, FACTS, StreamConfig(num_workers=2), 0, 2
        ).load_state_dict(state)
    stream = WorkerStream(sources, PACKING, FACTS, StreamConfig(), rank=1, world_size=2, worker=0)
    with pytest.raises(ValueError, match="rank"):
        stream.load_state_dict(loader.dataset.state_dict())
    with pytest.raises(ValueError, match="version"):
        stream.load_state_dict({"version": 99})


def test_skips_reach_the_skip_counter_and_the_batch_stats():
    class Recorder:
        def __init__(self):
            self.reasons = Counter()
            self.seen = 0

        def record(self, sample):
            self.seen += 1
            if isinstance(sample, SkippedSample):
                self.reasons[sample.reason] += 1

    recorder = Recorder()
    sources = _sources()
    stream = WorkerStream(
        sources,
        PACKING,
        FACTS,
        StreamConfig(num_epochs=1),
        rank=0,
        world_size=1,
        worker=0,
        skip_counter=recorder,
    )
    batches = list(stream)
    from_stats = Counter()
    for batch in batches:
        from_stats.update(dict(batch.stats.skipped_by_reason))
    assert from_stats == recorder.reasons and recorder.reasons["missing_image"] == 7
    loaded = sum(b.stats.num_loaded for b in batches)
    assert loaded == sum(len(s) for s in sources) == recorder.seen  # each result once


def test_dummy_tile_only_in_batches_without_real_tiles():
    stream = WorkerStream(
        [FakeSource(0, 40, max_images=0), FakeSource(1, 5)],
        PACKING,
        FACTS,
        StreamConfig(num_epochs=1),
        rank=0,
        world_size=1,
        worker=0,
    )
    kinds = set()
    for batch in stream:
        real = int(batch.image_flags.sum())
        if real == 0:
            assert batch.image_flags.tolist() == [0] and batch.stats.num_dummy_tiles == 1
        else:
            assert batch.stats.num_dummy_tiles == 0
        kinds.add(real > 0)
    assert kinds == {True, False}


def test_stream_refuses_a_different_worker_count():
    dataset = PackedStream(
        _sources(), PACKING, FACTS, StreamConfig(num_workers=2), rank=0, world_size=1
    )
    with pytest.raises(ValueError, match="num_workers=2"):
        next(iter(dataset))


class _CountingSource(FakeSource):
    calls = 0

    def load(self, record_index, epoch, seed):
        type(self).calls += 1
        return super().load(record_index, epoch, seed)


def test_resume_does_not_replay_the_stream(monkeypatch):
    sources = [_CountingSource(0, 200), _CountingSource(1, 100, max_images=0)]
    config = StreamConfig(num_workers=0)
    loader = build_dataloader(sources, PACKING, FACTS, config, 0, 1)
    list(islice(iter(loader), 30))
    loads_before = _CountingSource.calls
    state = loader.state_dict()
    monkeypatch.setattr(_CountingSource, "calls", 0)
    resumed = build_dataloader(sources, PACKING, FACTS, config, 0, 1)
    resumed.load_state_dict(state)
    next(iter(resumed))
    # only the open rows (at most 4 rows of a few samples) and one batch worth are loaded
    assert _CountingSource.calls < 40 < loads_before


class ChangedSource:
    """A FakeSource whose record `changed` no longer loads as before the checkpoint."""

    def __init__(self, inner, changed, how):
        self.inner, self.changed, self.how = inner, changed, how
        self.name, self.dataset_index = inner.name, inner.dataset_index

    def __len__(self):
        return len(self.inner)

    def load(self, record_index, epoch, seed):
        loaded = self.inner.load(record_index, epoch, seed)
        if record_index != self.changed:
            return loaded
        if self.how == "vanished":
            return SkippedSample(self.dataset_index, loaded.source, "missing_image", "gone")
        # replaced by a smaller image: the sample is shorter than its saved piece
        return make_sample(self.dataset_index, (), 1, line=loaded.source.line)


def _stream(sources, on_changed_media="error"):
    return WorkerStream(sources, PACKING, FACTS, StreamConfig(seed=3), rank=0, world_size=1,
                        worker=0, on_changed_media=on_changed_media)  # fmt: skip


def _buffered_record(state):
    """A (dataset_index, record_index) of a piece held in the saved packer buffer."""
    refs = [ref for row in state["packer"]["rows"] for ref in row]
    refs += [ref for row in state["ready_rows"] for ref in row]
    return refs[0][0], refs[0][1]


def _resume_with_changed_media(how: str) -> tuple[list, dict, int, int]:
    """Sources whose record held in a saved packer buffer changed its media, that state, and
    the (dataset, record) of the changed piece."""
    sources = _sources()
    before = _stream(sources)
    list(islice(before, 3))
    state = pickle.loads(pickle.dumps(before.state_dict()))
    dataset, record = _buffered_record(state)
    sources[dataset] = ChangedSource(sources[dataset], record, how)
    return sources, state, dataset, record


@pytest.mark.parametrize("how", ["vanished", "shrunk"])
def test_changed_media_in_the_packer_buffer_stops_resume_by_default(how):
    sources, state, dataset, record = _resume_with_changed_media(how)
    with pytest.raises(RuntimeError, match="data.on_changed_media = 'skip'") as caught:
        _stream(sources).load_state_dict(state)
    assert f"record {record} (epoch 0) of dataset 'ds{dataset}'" in str(caught.value)


@pytest.mark.parametrize("how", ["vanished", "shrunk"])
def test_changed_media_in_the_packer_buffer_is_skipped_with_on_changed_media_skip(how):
    sources, state, dataset, record = _resume_with_changed_media(how)
    resumed = _stream(sources, on_changed_media="skip")
    resumed.load_state_dict(state)
    batch = next(iter(resumed))
    changed = [s for s in batch.stats.skipped if s.reason == "media_changed"]
    assert [(s.dataset_index, s.source.line) for s in changed] == [(dataset, record + 1)]
    assert dict(batch.stats.skipped_by_reason)["media_changed"] == 1
    # The record is not trained on (in this batch or the next few).
    trained = {(r.dataset_index, r.record_index, r.epoch) for b in [batch, *islice(resumed, 5)]
               for r in b.sample_ids}  # fmt: skip
    assert (dataset, record, 0) not in trained
