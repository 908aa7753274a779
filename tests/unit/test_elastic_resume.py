"""Resume of the data stream on another shape (data.elastic): a run saved at W ranks x K
workers continues at W' x K' and, within the epoch, trains every record exactly once.

Each test drives real StatefulDataLoaders: the saved run takes a different number of batches
on each rank (so the streams are at different positions and hold open rows), every rank's
state goes through JSON as in a checkpoint, and the resumed run reads to the end of the epoch.
Every record id of the epoch is counted across both runs.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from itertools import islice

import numpy as np
import pytest
import torch
from stream_fakes import COUNTER, FACTS, FakeSource
from torch import nn

from vlpretrain.data import sharding
from vlpretrain.data.elastic import merge_stream_states
from vlpretrain.data.loader import StreamConfig, build_dataloader, stream_states
from vlpretrain.data.packing import PackingConfig
from vlpretrain.data.samples import SkippedSample
from vlpretrain.train.checkpoint.states import TrainState, training_states
from vlpretrain.train.checkpoint.store import load_checkpoint, save_checkpoint

PACKING = PackingConfig(
    max_packed_tokens=128, num_images_expected=6, max_buffer_size=4, rows_per_batch=2
)
SPLITTING = PackingConfig(
    max_packed_tokens=96, num_images_expected=5, max_buffer_size=3, split_at_image_boundary=True
)


def _sources():
    return [
        FakeSource(0, 61, skip_every=7),
        FakeSource(1, 29, max_images=0),
        FakeSource(2, 17, max_images=3, max_tiles=4),  # some exceed the tile budget
    ]


def _loaders(sources, packing, config, world_size, **kwargs):
    return [
        build_dataloader(sources, packing, FACTS, config, rank, world_size, **kwargs)
        for rank in range(world_size)
    ]


def _save(loaders, batches_per_rank, trained):
    """Run each rank for its number of batches, then return every rank's state via JSON."""
    states = []
    for loader, count in zip(loaders, batches_per_rank, strict=True):
        trained.extend(islice(iter(loader), count))
        states.append(json.loads(json.dumps(loader.state_dict())))
    return states


def _resume(states, sources, packing, config, world_size, **kwargs):
    loaders = _loaders(sources, packing, config, world_size, **kwargs)
    for loader in loaders:
        loader.load_resharded_state_dict(states)
    return loaders


def _token_ranges(batches):
    """(dataset, record, epoch) -> sorted token ranges of every piece trained."""
    ranges = defaultdict(list)
    for batch in batches:
        for ref in batch.sample_ids:
            ranges[(ref.dataset_index, ref.record_index, ref.epoch)].append(
                (ref.token_start, ref.token_end)
            )
    return {key: sorted(value) for key, value in ranges.items()}


def _check_epoch_once(batches, sources, packing, seed):
    """Every packable record of epoch 0 trained exactly once (all its pieces, no overlap),
    every other record skipped exactly once."""
    ranges = _token_ranges(batches)
    skipped = Counter()
    for batch in batches:
        skipped.update(dict(batch.stats.skipped_by_reason))
    expected_keep, expected_skips = set(), 0
    for source in sources:
        for record in range(len(source)):
            sample = source.load(record, 0, seed)
            key = (source.dataset_index, record, 0)
            if isinstance(sample, SkippedSample):
                expected_skips += 1
                continue
            if key not in ranges:
                too_big = sample.num_tiles > packing.num_images_expected or (
                    sample.num_tokens > packing.max_packed_tokens
                )
                assert too_big, f"record {key} was lost"
                expected_skips += 1
                continue
            expected_keep.add(key)
            pieces = ranges[key]
            assert pieces[0][0] == 0 and pieces[-1][1] == sample.num_tokens, (key, pieces)
            for (_, end), (start, _) in zip(pieces, pieces[1:], strict=False):
                assert end == start, f"record {key} trained twice or with a gap: {pieces}"
    assert set(ranges) == expected_keep, "a record of another epoch or an invented one"
    assert sum(skipped.values()) == expected_skips, "a skip lost or counted twice"
    return ranges


@pytest.mark.parametrize(
    ("saved_shape", "resumed_shape"),
    [
        ((2, 0), (1, 0)),  # 2 -> 1 ranks
        ((2, 0), (3, 0)),  # 2 -> 3 ranks
        ((1, 0), (1, 2)),  # 0 -> 2 workers
        ((2, 2), (3, 0)),  # 2 ranks x 2 workers -> 3 ranks in the main process
    ],
)
def test_resume_on_another_shape_trains_every_record_of_the_epoch_once(saved_shape, resumed_shape):
    (world, workers), (new_world, new_workers) = saved_shape, resumed_shape
    sources = _sources()
    trained = []
    saved = _loaders(
        sources, PACKING, StreamConfig(seed=3, num_workers=workers, num_epochs=1), world
    )
    states = _save(saved, [3 + 2 * rank for rank in range(world)], trained)
    assert any(s["packer"]["rows"] for st in states for s in stream_states(st)), (
        "the test needs open rows at save time"
    )
    config = StreamConfig(seed=3, num_workers=new_workers, num_epochs=1)
    resumed = _resume(states, sources, PACKING, config, new_world)
    after = [batch for loader in resumed for batch in loader]
    assert after, "nothing left to train after the resume"
    _check_epoch_once(trained + after, sources, PACKING, seed=3)
    # Deterministic: the same states on the same new shape give the same batches.
    again = [b for loader in _resume(states, sources, PACKING, config, new_world) for b in loader]
    assert [b.sample_ids for b in again] == [b.sample_ids for b in after]


def test_two_resizes_in_one_epoch_and_split_samples():
    """2 -> 3 -> 1 ranks inside one epoch, with samples split at image boundaries: the open
    rows hold tails of records whose heads were trained; each piece is trained once."""
    sources = _sources()
    config = StreamConfig(seed=11, num_epochs=1)
    trained = []
    first = _save(_loaders(sources, SPLITTING, config, 2), [4, 7], trained)
    second = _save(_resume(first, sources, SPLITTING, config, 3), [2, 5, 3], trained)
    merged = merge_stream_states([s for st in second for s in stream_states(st)], replacement=False)
    assert merged.consumed, "the second save must carry the first resize's progress"
    assert any(p[3] > 0 for p in merged.pieces) or any(
        max(e for _, e in r) < sources[k[0]].load(k[1], 0, 11).num_tokens
        for k, r in _token_ranges(trained).items()
    ), "the test needs a record split across the save"
    after = [b for loader in _resume(second, sources, SPLITTING, config, 1) for b in loader]
    ranges = _check_epoch_once(trained + after, sources, SPLITTING, seed=11)
    assert any(len(pieces) > 1 for pieces in ranges.values())


@pytest.mark.parametrize("replacement", [False, True])
def test_endless_stream_never_repeats_a_record_within_an_epoch(replacement):
    """Without num_epochs the streams cross epochs at different times; after 2 -> 3 ranks no
    (dataset, record, epoch) is trained twice and epoch 0 is completed."""
    sources = [FakeSource(0, 23), FakeSource(1, 9, max_images=0)]
    config = StreamConfig(seed=5, replacement=replacement)
    trained = []
    states = _save(_loaders(sources, PACKING, config, 2), [6, 9], trained)
    resumed = _resume(states, sources, PACKING, config, 3)
    after = [b for loader in resumed for b in islice(iter(loader), 12)]
    counts = Counter(
        (ref.dataset_index, ref.record_index, ref.epoch)
        for batch in trained + after
        for ref in batch.sample_ids
    )
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1]
    epoch0 = {(d, r) for d, r, e in counts if e == 0}
    assert epoch0 == {(s.dataset_index, r) for s in sources for r in range(len(s))}
    assert max(e for _, _, e in counts) >= 1


def test_balanced_packing_running_mean_is_handed_over():
    packing = PackingConfig(
        max_packed_tokens=128, num_images_expected=12, max_buffer_size=6, balance_flops=True
    )
    sources = [FakeSource(0, 41, max_tiles=4, max_text=60), FakeSource(1, 17, max_images=0)]
    config = StreamConfig(seed=3, num_epochs=1)
    trained = []
    flops = {"step_flops": COUNTER.step_flops}
    states = _save(_loaders(sources, packing, config, 2, **flops), [3, 5], trained)
    saved = [s["packer"]["balance"] for st in states for s in stream_states(st)]
    resumed = _resume(states, sources, packing, config, 3, **flops)
    handed = [loader.stream._worker_stream().packer.balance for loader in resumed]
    assert sum(b.total_tokens for b in handed) == sum(b["total_tokens"] for b in saved)
    ratio = sum(b["total_flops"] for b in saved) / sum(b["total_tokens"] for b in saved)
    assert all(np.isclose(b.total_flops / b.total_tokens, ratio) for b in handed)
    after = [b for loader in resumed for b in loader]
    _check_epoch_once(trained + after, sources, packing, seed=3)


def test_consumed_masks_round_trip_and_bad_ranges_are_refused():
    mask = np.zeros(20, dtype=bool)
    mask[[0, 1, 2, 5, 9, 10, 19]] = True
    ranges = sharding.to_ranges(mask)
    assert ranges == [[0, 3], [5, 6], [9, 11], [19, 20]]
    assert np.array_equal(sharding.from_ranges(ranges, 20), mask)
    assert np.array_equal(sharding.decode_mask({"ranges": ranges}, 20), mask), "version 2"
    with pytest.raises(ValueError, match="outside"):
        sharding.from_ranges([[18, 21]], 20)
    with pytest.raises(ValueError, match="sorted"):
        sharding.from_ranges([[5, 6], [0, 3]], 20)


@pytest.mark.parametrize("num_records", [1, 7, 8, 20, 1001])
def test_consumed_bitmaps_round_trip_through_json(num_records):
    rng = np.random.default_rng(num_records)
    for mask in (rng.random(num_records) < 0.5, np.ones(num_records, bool)):
        entry = json.loads(json.dumps(sharding.encode_mask(mask)))
        assert np.array_equal(sharding.decode_mask(entry, num_records), mask)


def test_a_strided_resume_mask_is_small_in_the_state():
    """The mask a resize leaves (strided shares, each read to a different depth) costs at
    most a bit per record, and far less than its run list did in version 2."""
    num_records, num_streams = 200_000, 64
    counts = np.random.default_rng(0).integers(1400, 1700, num_streams).tolist()
    mask = sharding.mark_consumed(num_records, None, num_streams, counts)
    bitmap = len(json.dumps(sharding.encode_mask(mask)))
    ranges = len(json.dumps(sharding.to_ranges(mask)))
    assert bitmap < num_records / 8 and bitmap * 10 < ranges


def test_a_damaged_bitmap_is_refused_with_the_reason():
    entry = sharding.encode_mask(np.arange(30) % 3 == 0)
    with pytest.raises(ValueError, match="covers 30 records, the dataset has 31"):
        sharding.decode_mask(entry, 31)
    with pytest.raises(ValueError, match="has 10 positions set, the state says 11"):
        sharding.decode_mask(dict(entry, num_consumed=11), 30)
    with pytest.raises(ValueError, match="not base64 zlib data"):
        sharding.decode_mask(dict(entry, bitmap="AAAA"), 30)


def test_shares_of_what_is_left_cover_it_exactly():
    consumed = sharding.mark_consumed(50, None, 4, [3, 5, 0, 12])
    assert int(consumed.sum()) == 20
    shares = [sharding.stream_share(50, 1, 0, 2, s, 3, consumed) for s in range(3)]
    order = sharding.epoch_permutation(50, 1, 0, 2)
    left = set(order[~consumed].tolist())
    assert sorted(np.concatenate(shares).tolist()) == sorted(left)
    with pytest.raises(ValueError, match="share of"):
        sharding.mark_consumed(50, None, 4, [3, 5, 0, 13])


def test_incomplete_or_mixed_saved_states_are_refused():
    sources = _sources()
    config = StreamConfig(seed=3)
    states = _save(_loaders(sources, PACKING, config, 2), [1, 1], [])
    target = build_dataloader(sources, PACKING, FACTS, config, 0, 3)
    with pytest.raises(ValueError, match="every one of the 2 saved streams"):
        target.load_resharded_state_dict(states[:1])
    with pytest.raises(ValueError, match="seed"):
        build_dataloader(
            sources, PACKING, FACTS, StreamConfig(seed=4), 0, 3
        ).load_resharded_state_dict(states)
    fewer = build_dataloader(sources[:2], PACKING, FACTS, config, 0, 3)
    with pytest.raises(ValueError, match="dataset lengths changed"):
        fewer.load_resharded_state_dict(states)
    newer = json.loads(json.dumps(states))
    newer[1]["vlpretrain_stream"]["version"] = 99
    with pytest.raises(ValueError, match="version 99: this vlpretrain reads versions 1, 2, 3"):
        target.load_resharded_state_dict(newer)
    same_shape = _loaders(sources, PACKING, config, 2)[0]
    assert target.shape_changed(states[0]) and not same_shape.shape_changed(states[0])


def test_train_state_counters_keep_their_sums_over_ranks():
    saved = [
        TrainState(step=7, tokens_seen=100 + r, records_seen=10, skipped={"a": r}).state_dict()
        for r in range(3)
    ]
    parts = []
    for rank in range(2):
        state = TrainState()
        state.load_resharded_state_dict(saved, rank, 2)
        parts.append(state)
    assert [p.step for p in parts] == [7, 7]
    assert sum(p.tokens_seen for p in parts) == 303 and sum(p.records_seen for p in parts) == 30
    assert parts[0].skipped == {"a": 2} and parts[1].skipped == {"a": 1}
    saved[1]["step"] = 8
    with pytest.raises(ValueError, match="disagree.*step"):
        TrainState().load_resharded_state_dict(saved, 0, 2)


def test_a_version_1_state_is_still_read_on_the_same_shape():
    """States written before elastic resume (version 1, no consumed masks) resume exactly."""
    sources = _sources()
    config = StreamConfig(seed=3)
    expected = list(islice(build_dataloader(sources, PACKING, FACTS, config, 1, 2), 7))
    first = build_dataloader(sources, PACKING, FACTS, config, 1, 2)
    head = list(islice(iter(first), 3))
    state = json.loads(json.dumps(first.state_dict()))
    state["vlpretrain_stream"]["version"] = 1
    state["dataset_state"]["version"] = 1
    del state["dataset_state"]["mixer"]["consumed"]
    resumed = build_dataloader(sources, PACKING, FACTS, config, 1, 2)
    resumed.load_state_dict(state)
    tail = list(islice(iter(resumed), 4))
    assert [b.sample_ids for b in head + tail] == [b.sample_ids for b in expected]


def test_after_a_resize_a_same_shape_resume_is_bit_exact():
    """A crash after an elastic resume resumes exactly (the consumed masks are in the state)."""
    sources = [FakeSource(0, 200), FakeSource(1, 90, max_images=0)]
    config = StreamConfig(seed=3, num_workers=2)
    states = _save(_loaders(sources, PACKING, config, 2), [3, 4], [])
    expected = list(islice(_resume(states, sources, PACKING, config, 3)[1], 9))
    first = _resume(states, sources, PACKING, config, 3)[1]
    head = list(islice(iter(first), 4))
    saved = json.loads(json.dumps(first.state_dict()))
    masks = [s["mixer"]["consumed"] for s in stream_states(saved)]
    assert all(masks) and masks[0] == masks[1], "still in the resized epoch, masks held"
    again = build_dataloader(sources, PACKING, FACTS, config, 1, 3)
    again.load_state_dict(saved)
    tail = list(islice(iter(again), 5))
    assert [b.sample_ids for b in head + tail] == [b.sample_ids for b in expected]
    as_version_2 = _with_range_masks(saved)
    again = build_dataloader(sources, PACKING, FACTS, config, 1, 3)
    again.load_state_dict(as_version_2)
    assert [b.sample_ids for b in islice(iter(again), 5)] == [b.sample_ids for b in tail]


def _with_range_masks(loader_state):
    """The state as version 2 wrote it: consumed masks as [start, stop) ranges."""
    state = json.loads(json.dumps(loader_state))
    state["vlpretrain_stream"]["version"] = 2
    for stream in stream_states(state):
        stream["version"] = 2
        lengths = stream["mixer"]["lengths"]
        for item in stream["mixer"]["consumed"]:
            mask = sharding.decode_mask(item, lengths[item["dataset"]])
            for key in ("num_records", "num_consumed", "bitmap"):
                del item[key]
            item["ranges"] = sharding.to_ranges(mask)
    return state


def test_a_checkpoint_resumes_with_another_worker_count(tmp_path):
    """Same world size, 0 -> 2 workers: load_checkpoint hands the loader every saved rank's
    state (here the one rank's) and the stream continues the epoch."""
    sources = _sources()

    def run(num_workers):
        torch.manual_seed(0)
        model = nn.Linear(2, 2)
        optimizer = torch.optim.AdamW(model.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        config = StreamConfig(seed=3, num_workers=num_workers, num_epochs=1)
        loader = build_dataloader(sources, PACKING, FACTS, config, 0, 1)
        return training_states(model, optimizer, scheduler, loader, TrainState())

    saved = run(0)
    trained = list(islice(saved["loader"].iterator, 5))
    path = save_checkpoint(tmp_path, saved, step=5, config={}, keep=1)
    resumed = run(2)
    load_checkpoint(path, resumed)
    after = list(resumed["loader"].iterator)
    _check_epoch_once(trained + after, sources, PACKING, seed=3)
